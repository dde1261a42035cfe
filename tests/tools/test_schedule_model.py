"""benchmarks/schedule_model.py: its work-list orders (span 1: the sm_90 kernel's) are permutations with the documented
shape, and the work-counter model finishes where a hand count does."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location(
    "schedule_model", Path(__file__).resolve().parents[2] / "benchmarks" / "schedule_model.py")
model = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(model)


@pytest.mark.parametrize("span", [1, 2, 3, 6])
def test_the_order_is_a_permutation_longest_rows_first_within_a_span(span):
    n_slots, n_heads = 5, 6
    order = model.kernel_order(n_slots, n_heads, span)
    assert sorted(order) == list(range(n_slots * n_heads))
    heads = [w // n_slots for w in order]
    slots = [w % n_slots for w in order]
    per_span = span * n_slots
    for start in range(0, len(order), per_span):  # a span's heads, slot by slot from the last (longest)
        assert {h // span for h in heads[start:start + per_span]} == {start // per_span}
        assert slots[start:start + per_span] == sorted(slots[start:start + per_span], reverse=True)
    if span == 1:
        assert order == [h * n_slots + s for h in range(n_heads) for s in reversed(range(n_slots))]


def test_makespan_of_the_work_counter():
    # two programs: items 0 and 1 first (3 and 1), then the counter hands 2 (4) to the one done first (t=1)
    assert model.makespan([3, 1, 4, 1], [0, 1, 2, 3], programs=2) == 5
    assert model.makespan([1, 1, 2], [0, 1, 2], programs=2) == 3  # the long item last: a tail
    assert model.makespan([1, 1, 2], [2, 0, 1], programs=2) == 2  # longest first: balanced
    assert model.makespan([2, 2], [0, 1], programs=8) == 2  # more programs than items
