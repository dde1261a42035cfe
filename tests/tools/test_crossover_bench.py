"""benchmarks/crossover.py on the CPU: the paper's density curve, and one measured row of a tiny model
(timings mean nothing here; the settings, the recorded density and path, and the Markdown are checked)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from support.tiny_models import TEST_SETTINGS, build, text_ids

import fp_patch
from fp_patch.budget import budget_for_density

SPEC = importlib.util.spec_from_file_location("crossover", Path(__file__).resolve().parents[2] / "benchmarks" /
                                              "crossover.py")
crossover = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(crossover)


def test_curve_follows_the_paper():
    assert crossover.curve_density(4096) == pytest.approx(0.70)
    assert crossover.curve_density(262144) == pytest.approx(0.035)
    assert crossover.curve_density(32768) == pytest.approx(0.70 * (0.035 / 0.70) ** 0.5)  # halfway in log(L)
    values = [crossover.curve_density(n) for n in (1024, 2048, 4096, 8192, 65536, 131072)]
    assert values[0] == 1.0 and values == sorted(values, reverse=True)
    # log-linear: equal ratios per doubling
    assert crossover.curve_density(16384) / crossover.curve_density(8192) == pytest.approx(
        crossover.curve_density(131072) / crossover.curve_density(65536))


def test_one_row_on_a_tiny_model():
    model = build("llama", "sdpa")
    base = fp_patch.FlashPrefillConfig(**TEST_SETTINGS).replace(min_sparse_len=2)
    settings = base.replace(alpha=1.0, min_budget=budget_for_density(512, 0.5, base))
    row = crossover.measure(model, "tiny", {"input_ids": text_ids(512).to(model.device)}, settings, repeats=1)
    assert row["length"] == 512 and row["dense_ms"] > 0 and row["sparse_ms"] > 0
    assert row["all_sparse"] and row["sparse_layers"] == row["layers"] == 2
    assert abs(row["density"] - 0.5) < 0.1 and row["alpha"] == 1.0 and row["min_budget"] > 0
    row["target_density"] = 0.5
    md = crossover.markdown({"environment": {"torch": "t", "triton": "t", "date": "d"}, "commit": "c0ffee",
                             "repeats": 1, "models": {"tiny": {"note": "n", "crossover": 512}}, "rows": [row]})
    assert "crossover **512**" in md and "| 512 | 50.0% |" in md and "sparse 2/2" in md and "commit c0ffee" in md
