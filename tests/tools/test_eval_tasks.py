"""Task generators: exact token length, answers at the recorded places, depth, reproducibility, datasets I/O.

Uses the tokenizer of the embedded SmolLM2 (no model weights are run here).
"""

from __future__ import annotations

import collections
import re

import datasets
import pytest

from fp_tools.evaluation import TASKS, build_case, build_suite, parse_length
from fp_tools.evaluation.tasks import suite_cases

DEPTH_TASKS = [t for t, spec in TASKS.items() if spec.uses_depth]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from fp_patch.models import smollm2_path

    return AutoTokenizer.from_pretrained(smollm2_path())


@pytest.mark.parametrize("length", [700, 1024, 3000])
@pytest.mark.parametrize("task", list(TASKS))
def test_exact_length_and_answers_in_needles(tokenizer, task, length):
    case = build_case(tokenizer, task, length, depth=0.3, sample=1, seed=7)
    ids = case["input_ids"]
    assert len(ids) == length
    assert case["id"] == f"{task}-L{length}-d{'NA' if not TASKS[task].uses_depth else '030'}-s1"
    text = tokenizer.decode(ids)
    assert case["question"] in text and text.rstrip().endswith(case["answer_prefix"])
    for answer in case["answers"]:
        assert answer in text
    if not TASKS[task].uses_depth:
        assert case["needle_starts"] == [] and case["depth"] is None
        return
    # each needle is exactly at its recorded token offset, and every answer is inside one of them
    spans = []
    for start, n, needle in zip(case["needle_starts"], case["needle_lengths"], case["needles"], strict=True):
        assert tokenizer.decode(ids[start : start + n]).strip() == needle
        spans.append(needle)
    for answer in case["answers"]:
        assert any(answer in s for s in spans), f"{answer!r} is in no needle"


@pytest.mark.parametrize("task", DEPTH_TASKS)
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_main_needle_sits_at_the_requested_depth(tokenizer, task, depth):
    case = build_case(tokenizer, task, 2048, depth=depth, seed=3)
    lo, hi = case["context_start"], case["context_end"]
    start = case["needle_starts"][0]
    assert lo <= start <= hi
    # the context holds the haystack and all pieces; the main piece's offset among the haystack tokens
    pieces = zip(case["needle_starts"], case["needle_lengths"], strict=True)
    before = start - lo - sum(n for s, n in pieces if s < start)
    haystack_tokens = hi - lo - sum(case["needle_lengths"])
    # snapped to a sentence boundary: the essays' sentences are at most a few dozen tokens
    assert abs(before / haystack_tokens - depth) < 0.04, f"needle at {before / haystack_tokens:.3f} for depth {depth}"


def test_variable_tracking_chain_is_in_order(tokenizer):
    case = build_case(tokenizer, "variable_tracking", 4096, depth=0.2, seed=1)
    starts = case["needle_starts"]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)
    names = case["answers"]
    assert case["needles"][0].startswith(f"VAR {names[0]} = ")
    for prev, cur, needle in zip(names, names[1:], case["needles"][1:], strict=False):
        assert needle == f"VAR {cur} = VAR {prev}."
    assert len(names) == 5 and all(re.fullmatch(r"[A-Z]{5}", n) for n in names)


@pytest.mark.parametrize("length", [1024, 4096])
def test_common_words_answers_are_the_most_frequent(tokenizer, length):
    case = build_case(tokenizer, "common_words", length, seed=5)
    text = tokenizer.decode(case["input_ids"])
    listed = re.findall(r"^\d+\. (\w+)$", text, flags=re.M)
    counts = collections.Counter(listed)
    common = set(case["answers"])
    assert len(common) == 10
    least_common = min(counts[w] for w in common)
    assert least_common >= 3
    assert all(c < least_common for w, c in counts.items() if w not in common)
    numbers = [int(n) for n in re.findall(r"^(\d+)\. \w+$", text, flags=re.M)]
    assert numbers == list(range(1, len(numbers) + 1))


def test_qa_retrieval_has_one_right_fact_and_distractors(tokenizer):
    case = build_case(tokenizer, "qa_retrieval", 2048, depth=0.6, seed=2)
    (answer,) = case["answers"]
    assert answer in case["needles"][0] and all(answer not in n for n in case["needles"][1:])
    place = case["question"].rstrip("?").split()[-1]
    assert place in case["needles"][0]


def test_reproducible_and_seeded(tokenizer):
    a = build_case(tokenizer, "niah_multikey", 1500, depth=0.4, sample=2, seed=11)
    b = build_case(tokenizer, "niah_multikey", 1500, depth=0.4, sample=2, seed=11)
    c = build_case(tokenizer, "niah_multikey", 1500, depth=0.4, sample=2, seed=12)
    d = build_case(tokenizer, "niah_multikey", 1500, depth=0.4, sample=3, seed=11)
    assert a == b
    assert a["input_ids"] != c["input_ids"] and a["answers"] != c["answers"]
    assert a["answers"] != d["answers"]


def test_noise_haystack_and_plain_prompt(tokenizer):
    case = build_case(tokenizer, "niah_single", 900, depth=0.5, haystack="noise", chat=False)
    text = tokenizer.decode(case["input_ids"])
    assert len(case["input_ids"]) == 900 and case["haystack"] == "noise"
    assert "The grass is green." in text and "<|im_start|>" not in text
    assert text.endswith(case["answer_prefix"])


def test_suite_dataset_saves_and_reloads(tokenizer, tmp_path):
    ds = build_suite(tokenizer, tasks=["niah_single", "common_words"], lengths=["1K", 1500], depths=[0.1, 0.9],
                     samples=2, seed=4)
    assert isinstance(ds, datasets.Dataset)
    # niah: 2 lengths x 2 depths x 2 samples; common_words: 2 lengths x 2 samples (no depth)
    assert len(ds) == 8 + 4 and len(set(ds["id"])) == len(ds)
    assert sorted(set(ds["length"])) == [1024, 1500]
    assert all(len(ids) == n for ids, n in zip(ds["input_ids"], ds["length"], strict=True))
    ds.save_to_disk(str(tmp_path / "suite"))
    back = datasets.load_from_disk(str(tmp_path / "suite"))
    assert back.to_list() == ds.to_list()


def test_errors_are_explicit(tokenizer):
    with pytest.raises(ValueError, match="too short"):
        build_case(tokenizer, "niah_multivalue", 100)
    with pytest.raises(ValueError, match="unknown task"):
        build_case(tokenizer, "niah_triple", 1000)
    with pytest.raises(ValueError, match="depth"):
        build_case(tokenizer, "niah_single", 1000, depth=1.5)
    with pytest.raises(ValueError, match="token count"):
        parse_length("four thousand")
    with pytest.raises(ValueError, match="haystack"):
        build_case(tokenizer, "niah_single", 1000, haystack="wikipedia")


def test_parse_length_and_grid():
    assert parse_length("4K") == 4096 and parse_length("1.5k") == 1536 and parse_length("1000") == 1000
    grid = suite_cases(["niah_single", "common_words"], [1024], [0.0, 1.0], samples=1)
    assert grid == [("niah_single", 1024, 0.0, 0), ("niah_single", 1024, 1.0, 0), ("common_words", 1024, None, 0)]
