"""The fixed-density budget (fp_patch.budget): ``alpha=1.0`` plus ``min_budget=n`` solved from a target
density gives about that density with the real selection (the reference operator), on random inputs."""

from __future__ import annotations

import pytest
import torch
from fp_kernels import BlockRules, block_scores_reference, select_blocks_reference
from fp_kernels.geometry import density_from_counts, num_query_slots, slot_geometry

from fp_patch.budget import budget_for_density, expected_density


def realised_density(q_len: int, budget: int, rules: BlockRules, seed: int = 0) -> float:
    """Mean block density the reference selection computes with alpha=1.0 and ``budget`` on random q/k."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, q_len, 2, 64, generator=gen)
    k = torch.randn(1, q_len, 1, 64, generator=gen)
    block_size = rules.block_size
    n_slots = num_query_slots(q_len, q_len, block_size, False)
    geo = slot_geometry(q_len, q_len, block_size, torch.zeros(1, dtype=torch.long),
                        torch.full((1,), q_len), n_slots, rules.last_dense_blocks)
    scores = block_scores_reference(q, k, block_size)
    _, count = select_blocks_reference(scores, geo["n_vis"], geo["dense"], rules.replace(alpha=1.0, min_budget=budget))
    return float(density_from_counts(count, geo, 2).mean())


@pytest.mark.parametrize(("q_len", "block_size", "target"), [
    (8192, 64, 0.2), (8192, 64, 0.5), (16384, 64, 0.05), (16384, 64, 0.1), (4096, 32, 0.7), (6000, 64, 0.3),
], ids=lambda x: str(x))
def test_realised_density_is_near_the_target(q_len, block_size, target):
    rules = BlockRules(block_size=block_size, sink_blocks=2, window_blocks=4, last_dense_blocks=2)
    n = budget_for_density(q_len, target, rules)
    got = realised_density(q_len, n, rules)
    assert abs(got - target) < 0.02, (n, got)
    assert abs(expected_density(q_len, n, rules) - got) < 0.015  # the model behind the solver


def test_bounds_and_monotonicity():
    # below what the always-kept blocks give: the best block only; 1.0: every block
    assert budget_for_density(4096, 0.05) == 0 and expected_density(4096, 0) > 0.4
    assert expected_density(4096, budget_for_density(4096, 1.0)) == pytest.approx(1.0)
    assert expected_density(100, 0) == 1.0  # one block: dense
    budgets = [budget_for_density(131072, d) for d in (0.035, 0.05, 0.1, 0.2, 0.5, 0.7)]
    assert budgets == sorted(budgets) and len(set(budgets)) == len(budgets)
    densities = [expected_density(65536, n) for n in range(0, 512, 16)]
    assert densities == sorted(densities)
    for bad in (0, -0.1, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="density"):
            budget_for_density(4096, bad)
    with pytest.raises(ValueError, match="q_len"):
        budget_for_density(0, 0.2)
