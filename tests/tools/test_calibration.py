"""Alpha calibration: the searches on synthetic curves, convergence on the real SmolLM2, the command."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
import transformers

import fp_patch
from fp_patch.config import FlashPrefillConfig
from fp_tools.calibration import (
    DensityMeter,
    bisect_alpha,
    bisect_layer_alphas,
    calibrate,
    calibration_prompts,
    largest_alpha_within,
)
from fp_tools.cli import main


def curve(floor: float, slope: float):
    """A density that falls linearly in log10(alpha) from 1.0 down to ``floor`` (like a real model's)."""
    return lambda alpha: min(1.0, max(floor, floor + slope * -math.log10(alpha)))


@pytest.mark.parametrize("target", [0.45, 0.6, 0.7, 0.9])
@pytest.mark.parametrize("start", [0.18, 1e-3])
def test_bisect_alpha_converges(target, start):
    calls = []
    f = curve(0.3, 0.1)

    def density(alpha):
        calls.append(alpha)
        return f(alpha)

    alpha, d, history = bisect_alpha(density, target, start=start, tol=0.005, max_steps=12)
    assert abs(d - target) <= 0.005 and f(alpha) == d
    assert len(calls) == len(history) <= 12 and calls[0] == start


def test_bisect_alpha_on_a_staircase_returns_the_nearest_measured():
    # a real density moves in steps (whole blocks): the exact target may not exist
    f = lambda a: round(curve(0.3, 0.1)(a) * 16) / 16  # noqa: E731
    alpha, d, history = bisect_alpha(f, 0.7, start=0.18, tol=0.001, max_steps=10)
    assert len(history) == 10
    assert abs(d - 0.7) == min(abs(h["density"] - 0.7) for h in history) <= 1 / 32 + 1e-9


def test_bisect_alpha_out_of_reach(caplog):
    with caplog.at_level(logging.WARNING):
        alpha, d, _ = bisect_alpha(curve(0.5, 0.1), 0.3, start=0.1)
    assert alpha == 1.0 and d == 0.5 and "above the target" in caplog.text
    with caplog.at_level(logging.WARNING):
        alpha, d, _ = bisect_alpha(curve(0.3, 0.01), 0.99, start=0.1, alpha_min=1e-6)
    assert alpha == pytest.approx(1e-6) and "below the target" in caplog.text
    with pytest.raises(ValueError, match="target"):
        bisect_alpha(curve(0.3, 0.1), 1.5)


def test_bisect_layer_alphas_each_layer_its_own():
    curves = {0: curve(0.2, 0.1), 3: curve(0.3, 0.1), 7: curve(0.25, 0.2)}
    passes = []

    def measure(alphas):
        passes.append(dict(alphas))
        return {i: curves[i](a) for i, a in alphas.items()}

    alphas, densities, history = bisect_layer_alphas(measure, 0.6, [0, 3, 7], tol=0.005, max_steps=20)
    assert set(alphas) == {0, 3, 7} and len(history) == len(passes) <= 20
    for i in curves:
        assert abs(densities[i] - 0.6) <= 0.005 and curves[i](alphas[i]) == densities[i]
    assert alphas[0] < alphas[3] < alphas[7]  # a steeper curve needs a larger alpha for the same density


def test_largest_alpha_within_tolerance():
    acc = lambda a: 90.0 if a <= 0.3 else 40.0  # noqa: E731
    alpha, history = largest_alpha_within(acc, 88.0, alpha_good=0.01, alpha_max=1.0, steps=8)
    assert 0.25 < alpha <= 0.3 and all(h["passes"] == (h["alpha"] <= 0.3) for h in history)
    alpha, _ = largest_alpha_within(lambda a: 90.0, 88.0, alpha_good=0.01)
    assert alpha == 1.0


@pytest.fixture(scope="module")
def smollm2_head():
    """The real SmolLM2 weights cut to their first 6 layers (a full 30-layer pass is too slow for CI)."""
    from fp_patch.models import load_smollm2

    model, tokenizer = load_smollm2("sdpa")
    model.model.layers = model.model.layers[:6]
    model.config.num_hidden_layers = 6
    return model, tokenizer


def test_calibration_converges_on_smollm2(smollm2_head, tmp_path):
    """Real weights on 512 tokens of prose with 32-token blocks (16 blocks): the density hits the target."""
    model, tokenizer = smollm2_head
    base = FlashPrefillConfig(alpha=0.5, block_size=32, min_sparse_len=256, backend="reference")
    result = calibrate(model, tokenizer, target_density=0.85, length=512, prompts=1, base=base, tol=0.02,
                       max_steps=6)
    assert abs(result.density - 0.85) <= 0.02, result.history
    assert model.config._attn_implementation == "sdpa"  # restored
    assert result.config.block_size == 32 and result.config.alpha == result.density_alpha
    assert 0 < result.config.alpha < 0.5  # denser than at the start needs a smaller alpha
    assert sorted(result.layer_density) == list(range(6))
    # the saved config reproduces the measured density when passed to fp_patch.configure
    result.save(tmp_path / "cal.json", tmp_path / "cal.report.json")
    loaded = FlashPrefillConfig.from_json(tmp_path / "cal.json")
    assert loaded == result.config
    fp_patch.configure(model, loaded)
    density, _ = DensityMeter(model, calibration_prompts(tokenizer, 512, 1))(fp_patch.get_config(model))
    assert density == pytest.approx(result.density)
    report = json.loads((tmp_path / "cal.report.json").read_text())
    assert report["history"]["density"][0]["alpha"] == 0.5


def test_calibrate_command_per_layer_and_accuracy(tmp_path):
    from fp_patch.models import smollm2_path

    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_path())
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=len(tokenizer), tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
    )
    folder = tmp_path / "tiny"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    base = tmp_path / "base.json"
    FlashPrefillConfig(block_size=16, min_sparse_len=32, backend="reference").to_json(base)
    out = tmp_path / "cal.json"
    code = main(["calibrate", "--model", str(folder), "--length", "256", "--prompts", "1", "--target-density", "0.9",
                 "--base-config", str(base), "--max-steps", "4", "--per-layer", "--accuracy-tolerance", "5",
                 "--accuracy-lengths", "300", "--accuracy-tasks", "niah_single", "--accuracy-depths", "0.5",
                 "--alpha-max", "0.3", "--accuracy-steps", "1", "--out", str(out)])
    assert code == 0
    cfg = FlashPrefillConfig.from_json(out)
    assert cfg.block_size == 16 and cfg.backend == "reference"
    report = json.loads((tmp_path / "cal.report.json").read_text())
    assert {"density", "per_layer", "accuracy"} <= set(report["history"])
    assert report["accuracy"]["floor"] == report["accuracy"]["dense_accuracy"] - 5
    # --alpha-max bounds every search; --accuracy-steps bounds the accuracy bisection (after its two ends)
    tried = [h["alpha"] for h in report["history"]["density"] + report["history"]["accuracy"]]
    tried += [a for h in report["history"]["per_layer"] for a in h["alphas"].values()]
    assert max(tried) <= 0.3 + 1e-12 and report["history"]["accuracy"][0]["alpha"] == pytest.approx(0.3)
    assert len(report["history"]["accuracy"]) <= 3
    # the accuracy search validated one alpha for every layer: that is what is saved, per-layer alphas dropped
    assert cfg.layer_alpha == {} and cfg.alpha == report["accuracy"]["alpha"]


@pytest.mark.parametrize(("flag", "value", "match"), [
    ("--alpha-max", "0", "--alpha-max must be in"), ("--alpha-max", "1.5", "--alpha-max must be in"),
    ("--accuracy-steps", "-1", "--accuracy-steps must be an integer >= 0")])
def test_calibrate_command_refuses_bad_bounds_before_loading(flag, value, match, monkeypatch, capsys):
    import fp_tools.evaluation.cli as eval_cli

    monkeypatch.setattr(eval_cli, "load_model", lambda *a: pytest.fail("the model was loaded"))
    assert main(["calibrate", flag, value]) == 2
    assert match in capsys.readouterr().err


def test_calibrate_help_says_the_accuracy_search_gives_one_alpha(capsys):
    with pytest.raises(SystemExit):
        main(["calibrate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--alpha-max" in text and "--accuracy-steps" in text
    assert "ONE alpha for every layer (it replaces the --per-layer alphas)" in text


def test_bisect_alpha_warns_only_when_the_target_is_missed(caplog):
    with caplog.at_level(logging.WARNING):
        alpha, d, history = bisect_alpha(curve(0.3, 0.1), 0.45, start=0.1, tol=0.1)  # the start is within tol
    assert len(history) == 1 and alpha == 0.1 and not caplog.records
    with caplog.at_level(logging.WARNING):
        # a curve so flat that two decade steps cannot bracket the target: the steps ran out
        bisect_alpha(curve(0.98, 0.97), 0.5, start=1e-3, alpha_min=1e-9, tol=0.001, max_steps=2)
    assert "max_steps=2 before bracketing" in caplog.text and "alpha_min" not in caplog.text


def test_density_meter_measures_each_config_once(monkeypatch):
    """calibrate() asks for the chosen config's per-layer densities after the search: no second pass."""
    meter = DensityMeter(model=None, prompts=[[1, 2]])
    calls = []
    monkeypatch.setattr(meter, "_measure", lambda cfg: calls.append(cfg) or (0.5, {0: 0.5}))
    first = meter(FlashPrefillConfig(alpha=0.2))
    first[1][0] = 9.0  # a caller changing the returned dict does not change what is remembered
    assert meter(FlashPrefillConfig(alpha=0.2)) == (0.5, {0: 0.5})
    meter(FlashPrefillConfig(alpha=0.3))
    assert [c.alpha for c in calls] == [0.2, 0.3]
