"""FlashPrefillConfig: validation, JSON files, per-model defaults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fp_patch import MODEL_DEFAULTS, FlashPrefillConfig, defaults_for

ROOT = Path(__file__).resolve().parents[2]
# loads two files carrying the retired key in a fresh process; the warnings go to stderr
RETIRED_KEY_PROBE = """
import logging
logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
from fp_patch import FlashPrefillConfig
for guard in ("true", "false"):
    assert FlashPrefillConfig.from_json('{"alpha": 0.3, "speed_guard": ' + guard + '}') == FlashPrefillConfig(alpha=0.3)
"""

PUBLISHED_ALPHAS = {
    "llama": 0.18,
    "qwen2": 0.08,
    "qwen3": 0.12,
    "qwen3_moe": 0.12,
    "qwen2_5_vl": 0.10,
    "qwen3_vl": 0.22,
    "qwen3_vl_moe": 0.22,
}


def test_defaults_are_the_paper_block_rules():
    cfg = FlashPrefillConfig()
    assert (cfg.block_size, cfg.sink_blocks, cfg.window_blocks, cfg.last_dense_blocks) == (128, 2, 4, 2)
    assert (cfg.min_budget, cfg.dense_layers, cfg.layer_alpha, cfg.backend, cfg.strict) == (0, (), {}, "auto", False)


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        ({"alpha": -0.1}, ValueError), ({"alpha": 1.5}, ValueError), ({"alpha": float("nan")}, ValueError),
        ({"alpha": True}, TypeError), ({"alpha": "0.1"}, TypeError), ({"block_size": 100}, ValueError),
        ({"block_size": 8}, ValueError), ({"block_size": 128.0}, TypeError), ({"sink_blocks": -1}, ValueError),
        ({"window_blocks": 1.5}, TypeError), ({"last_dense_blocks": None}, TypeError),
        ({"min_budget": -2}, ValueError), ({"min_sparse_len": 1}, ValueError), ({"dense_layers": "0,1"}, TypeError),
        ({"dense_layers": [-1]}, ValueError), ({"dense_layers": 3}, TypeError), ({"layer_alpha": [0.1]}, TypeError),
        ({"layer_alpha": {0: 2.0}}, ValueError), ({"layer_alpha": {-1: 0.1}}, ValueError),
        ({"group_select": 1}, TypeError), ({"strict": "yes"}, TypeError), ({"backend": "cuda"}, ValueError),
    ],
    ids=lambda x: "-".join(f"{k}={v!r}" for k, v in x.items()) if isinstance(x, dict) else x.__name__,
)
def test_invalid_values_raise_naming_the_field(bad, error):
    """A value of the wrong type is a TypeError, one out of range a ValueError (as the operator's)."""
    with pytest.raises(error, match=next(iter(bad)).split("_")[0]):
        FlashPrefillConfig(**bad)


def test_normalisation_and_per_layer_alpha():
    cfg = FlashPrefillConfig(alpha=0.2, dense_layers=[3, 0, 3], layer_alpha={"5": 0.5, 2: 0})
    assert cfg.dense_layers == (0, 3)
    assert cfg.layer_alpha == {2: 0.0, 5: 0.5}
    assert [cfg.alpha_for(i) for i in (0, 2, 5, None)] == [0.2, 0.0, 0.5, 0.2]
    assert hash(cfg) == hash(FlashPrefillConfig(alpha=0.2, dense_layers=(0, 3), layer_alpha={5: 0.5, 2: 0.0}))


def test_frozen_and_replace():
    cfg = FlashPrefillConfig()
    with pytest.raises(AttributeError):
        cfg.alpha = 0.5
    assert cfg.replace(alpha=0.5).alpha == 0.5 and cfg.alpha == 0.12
    with pytest.raises(ValueError, match="alfa"):
        cfg.replace(alfa=0.5)
    with pytest.raises(ValueError, match="alpha"):
        cfg.replace(alpha=3)


def test_json_round_trip(tmp_path):
    cfg = FlashPrefillConfig(alpha=0.3, block_size=64, dense_layers=[0, 1], layer_alpha={7: 0.05},
                             group_select=True, min_sparse_len=4096)
    text = cfg.to_json()
    data = json.loads(text)
    assert data["layer_alpha"] == {"7": 0.05} and data["dense_layers"] == [0, 1]
    assert FlashPrefillConfig.from_json(text) == cfg
    path = tmp_path / "calibrated.json"
    cfg.to_json(path)
    assert FlashPrefillConfig.from_json(path) == cfg
    assert FlashPrefillConfig.from_json(str(path)) == cfg
    assert FlashPrefillConfig.from_dict({"alpha": 0.3}) == FlashPrefillConfig(alpha=0.3)
    with pytest.raises(ValueError, match="min_buget"):
        FlashPrefillConfig.from_dict({"min_buget": 3})
    with pytest.raises(ValueError, match="mapping"):
        FlashPrefillConfig.from_dict([("alpha", 0.1)])


def test_per_model_defaults_are_the_published_alphas():
    assert {k: v["alpha"] for k, v in MODEL_DEFAULTS.items()} == PUBLISHED_ALPHAS
    for model_type, alpha in PUBLISHED_ALPHAS.items():
        min_sparse_len = MODEL_DEFAULTS[model_type]["min_sparse_len"]
        assert defaults_for(model_type) == FlashPrefillConfig(alpha=alpha, min_sparse_len=min_sparse_len)
    # the text decoder of a VL model reports "<type>_text"
    assert defaults_for("qwen2_5_vl_text").alpha == 0.10 and defaults_for("qwen3_vl_moe_text").alpha == 0.22


def test_unknown_model_type_logs_once(caplog):
    with caplog.at_level("INFO", logger="fp_patch.config"):
        assert defaults_for("some_new_arch") == FlashPrefillConfig()
        assert defaults_for("some_new_arch") == FlashPrefillConfig()
    assert len([r for r in caplog.records if "some_new_arch" in r.getMessage()]) == 1


def test_min_sparse_len_is_read_from_the_per_model_table(monkeypatch):
    assert all(isinstance(v["min_sparse_len"], int) and v["min_sparse_len"] >= 2 for v in MODEL_DEFAULTS.values())
    monkeypatch.setitem(MODEL_DEFAULTS, "llama", {**MODEL_DEFAULTS["llama"], "min_sparse_len": 12345})
    assert defaults_for("llama").min_sparse_len == 12345


def test_retired_speed_guard_key_is_ignored_with_one_warning():
    """Files written by older versions carry "speed_guard": they load (the key is ignored), with one
    warning per process (seen in a fresh process: other tests load such files too); the field itself is gone."""
    assert "speed_guard" not in FlashPrefillConfig().to_dict()
    paths = [str(ROOT / "kernels"), str(ROOT), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    proc = subprocess.run([sys.executable, "-c", RETIRED_KEY_PROBE], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if "speed_guard" in line]
    assert len(warnings) == 1 and "ignored" in warnings[0], proc.stderr[-3000:]
    with pytest.raises(TypeError):
        FlashPrefillConfig(speed_guard=True)
    with pytest.raises(ValueError, match="speed_guard"):
        FlashPrefillConfig().replace(speed_guard=False)
def test_untested_model_type_warns_once_with_the_generic_defaults(caplog):
    import logging

    untested = "untested_by_anyone_else"  # a model type no other test asks for: its first warning is here
    with caplog.at_level(logging.WARNING, logger="fp_patch.config"):
        assert defaults_for(untested) == FlashPrefillConfig()
        defaults_for(untested)
        defaults_for("llama")
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    generic = FlashPrefillConfig()
    assert f"'{untested}' is untested" in record.getMessage()
    assert f"alpha={generic.alpha}, block_size={generic.block_size}" in record.getMessage()


def test_small_models_get_the_small_model_min_sparse_len():
    """Models of at most SMALL_MODEL_HIDDEN_SIZE are host-bound below SMALL_MODEL_MIN_SPARSE_LEN (measured on
    SmolLM2-135M); larger ones keep their model type's crossover, and a larger explicit value stays."""
    from transformers import LlamaConfig, Qwen2_5_VLConfig

    from fp_patch.config import SMALL_MODEL_HIDDEN_SIZE, SMALL_MODEL_MIN_SPARSE_LEN, model_defaults

    small = model_defaults(LlamaConfig(hidden_size=SMALL_MODEL_HIDDEN_SIZE, num_attention_heads=8))
    large = model_defaults(LlamaConfig(hidden_size=4096))
    assert small.min_sparse_len == SMALL_MODEL_MIN_SPARSE_LEN and small.alpha == MODEL_DEFAULTS["llama"]["alpha"]
    assert large == defaults_for("llama") and large.min_sparse_len < SMALL_MODEL_MIN_SPARSE_LEN
    assert defaults_for("llama", hidden_size=SMALL_MODEL_HIDDEN_SIZE + 1) == defaults_for("llama")
    vl = Qwen2_5_VLConfig(text_config={"hidden_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2})
    assert model_defaults(vl).min_sparse_len == SMALL_MODEL_MIN_SPARSE_LEN
