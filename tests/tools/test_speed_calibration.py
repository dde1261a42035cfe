"""Speed calibration (fp_tools.speed_calibration): the decision rules on made-up rows (CPU), the CPU
refusal, and on a GPU a real calibration of a tiny model."""

from __future__ import annotations

import pytest
import torch
from support.tiny_models import build, needs_cuda

import fp_patch
from fp_tools.speed_calibration import SpeedCalibration, calibrate_speed, crossover, slow_layers


def row(length, dense_ms, sparse_ms, dense_us=(10.0, 10.0, 10.0), sparse_us=(5.0, 12.0, None)):
    return {"length": length, "dense_ms": dense_ms, "sparse_ms": sparse_ms, "speedup": dense_ms / sparse_ms,
            "density": 0.5, "layer_dense_us": list(dense_us), "layer_sparse_us": list(sparse_us)}


def test_crossover_is_where_sparse_wins_from_then_on():
    rows = [row(1024, 1.0, 1.5), row(2048, 2.0, 1.9), row(4096, 4.0, 4.1), row(8192, 8.0, 6.0), row(16384, 16, 9)]
    assert crossover(rows) == 8192  # a win at 2048 followed by a loss at 4096 does not count
    assert crossover(list(reversed(rows))) == 8192  # order of the rows does not matter
    assert crossover([row(1024, 1.0, 0.5), row(2048, 2.0, 1.0)]) == 1024
    assert crossover([row(1024, 1.0, 1.5), row(2048, 2.0, 2.0)]) == 2049  # a tie is no win; none: max + 1
    with pytest.raises(ValueError, match="at least one"):
        crossover([])


def test_dense_layers_are_those_never_faster_sparse_at_or_above_the_crossover():
    rows = [
        row(1024, 1.0, 1.5, sparse_us=(50.0, 50.0, None)),  # below the crossover: not considered
        row(4096, 4.0, 3.0, sparse_us=(5.0, 12.0, None)),
        row(8192, 8.0, 6.0, sparse_us=(5.0, 10.0, None)),  # layer 1 ties: still never faster
    ]
    assert slow_layers(rows, 4096) == (1,)  # layer 2 was never sparse (None): dense by design, not listed
    rows[2]["layer_sparse_us"][1] = 9.0
    assert slow_layers(rows, 4096) == ()  # layer 1 beats dense at 8192
    assert slow_layers(rows, 1024) == ()
    assert slow_layers(rows, 1 << 20) == ()  # nothing measured at or above: nothing runs sparse anyway


def test_from_rows_apply_and_to_dict():
    rows = [row(8192, 8.0, 6.0), row(2048, 2.0, 2.5), row(4096, 4.0, 3.0)]
    cal = SpeedCalibration.from_rows(rows)
    assert [r["length"] for r in cal.rows] == [2048, 4096, 8192]
    assert cal.min_sparse_len == 4096 and cal.dense_layers == (1,)
    cfg = cal.apply(fp_patch.FlashPrefillConfig(alpha=0.3, dense_layers=[7]))
    assert cfg == fp_patch.FlashPrefillConfig(alpha=0.3, min_sparse_len=4096, dense_layers=[1])
    data = cal.to_dict()
    assert data["min_sparse_len"] == 4096 and data["dense_layers"] == [1] and len(data["rows"]) == 3
    import json

    assert json.loads(json.dumps(data)) == data


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_calibrate_speed_refuses_the_cpu():
    model = build("llama", "sdpa")
    with pytest.raises(ValueError, match="CUDA GPU"):
        calibrate_speed(model, {64: torch.zeros(1, 64, dtype=torch.long)}, progress=False)


@pytest.mark.gpu
@needs_cuda
def test_calibrate_speed_on_a_tiny_model():
    import transformers
    from transformers import AutoModelForCausalLM

    config = transformers.LlamaConfig(hidden_size=1024, num_attention_heads=8, num_key_value_heads=2,
                                      num_hidden_layers=3, intermediate_size=1024, vocab_size=512,
                                      max_position_embeddings=16384)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    before = fp_patch.get_config(model)
    ids = torch.randint(0, 512, (1, 8192), device="cuda")
    cal = calibrate_speed(model, {n: ids[:, :n] for n in (1024, 8192)}, repeats=2, progress=False)
    assert [r["length"] for r in cal.rows] == [1024, 8192]
    for r in cal.rows:
        assert r["dense_ms"] > 0 and r["sparse_ms"] > 0 and 0 < r["density"] <= 1
        assert r["sparse_layers"] == r["layers"] == 3
        assert len(r["layer_dense_us"]) == len(r["layer_sparse_us"]) == 3
        assert all(x is not None and x > 0 for x in r["layer_dense_us"] + r["layer_sparse_us"])
    assert cal.min_sparse_len in (1024, 8192, 8193)
    # restored: implementation and settings
    assert not fp_patch.uses_flashprefill(model) and fp_patch.get_config(model) == before
