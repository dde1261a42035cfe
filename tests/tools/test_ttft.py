"""The TTFT benchmark (fp_tools.ttft, ``flashprefill bench --ttft``) runs end to end on a tiny model.

Timings on a CPU mean nothing; what is checked is the bookkeeping: every variant runs and is
reported against sdpa, densities and paths are measured on a recorded pass with the row's exact
settings (fixed rows: alpha=1.0 and the solved min_budget, which the kernels honour on every call),
the ten-lengths run uses ten distinct lengths averaging to the one length, and the results render
as Markdown. The real runs are on the GPU (benchmarks/README.md).
"""

from __future__ import annotations

import argparse

import pytest
from support.tiny_models import DEVICE, TEST_SETTINGS, build

from fp_patch import MODEL_DEFAULTS, defaults_for
from fp_tools import bench, ttft


def tiny_args(**over) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--ttft", "--device", DEVICE.type, "--lengths", "256", "--repeats", "1",
                              "--min-sparse-len", "64"])  # the tiny model's device (CPU in CI, a GPU there)
    bench.check(args)
    for key, value in over.items():
        setattr(args, key, value)
    return args


@pytest.fixture
def tiny(monkeypatch):
    """The tiny Llama, whose per-model defaults use 16-token blocks (many blocks from a few hundred
    tokens) and the backend the other model tests use."""
    small = {"block_size": 16, "backend": TEST_SETTINGS["backend"]}
    monkeypatch.setitem(MODEL_DEFAULTS, "llama", {**MODEL_DEFAULTS["llama"], **small})
    return build("llama", "sdpa")


def test_rows_cover_every_variant(tiny):
    args = tiny_args(densities=[0.5], model="llama8b", lengths=[512])
    rows = ttft.run_lengths(tiny, None, args, log=lambda _: None)
    assert [r["impl"] for r in rows] == ["sdpa", "flashprefill", "flashprefill @50% fixed"]
    assert rows[0]["speedup_vs_sdpa"] == 1.0 and rows[0].get("density") is None and rows[0]["commit"]
    for r in rows[1:]:
        assert r["ttft_s"] > 0 and r["ttft_first_s"] > 0 and len(r["ttft_all_s"]) == 2
        assert 0.0 < r["density"] <= 1.0
        assert r["sparse_layers"] == r["layers"] == 2 and r["path_ok"] and r["min_sparse_len"] == 64
    real, fixed = rows[1], rows[2]
    assert real["alpha"] == MODEL_DEFAULTS["llama"]["alpha"] and real["min_budget"] == 0
    # the fixed row: the public knobs, solved for the target; the recorded pass measured what it got
    assert fixed["alpha"] == 1.0 and fixed["min_budget"] == ttft.variant_settings(
        defaults_for("llama"), 0.18, 64, 0.5, 512).min_budget > 0
    assert abs(fixed["density"] - 0.5) < 0.1 and fixed["fixed_density"] == 0.5
    md = ttft.markdown({"environment": {"torch": "t", "triton": "t", "date": "d"}, "model_note": "tiny",
                        "repeats": 1, "rows": rows, "commit": "abc1234"})
    assert md.count("\n| 512 |") == 3 and "(target 50%, min_budget" in md and "commit abc1234" in md
    assert md.count("sparse 2/2 layers") == 2


def test_rows_below_min_sparse_len_say_dense_and_those_above_check_every_layer(tiny, caplog):
    """A prompt below min_sparse_len runs dense in every layer (the path says why); at or above it, a
    layer that ran dense is flagged (here: a dense_layers entry that the row's settings do not expect)."""
    rows = ttft.run_lengths(tiny, None, tiny_args(lengths=[48]), log=lambda _: None)
    assert rows[1]["density"] is None and rows[1]["sparse_layers"] == 0 and rows[1]["path_ok"]
    assert ttft.path_text(rows[1]) == "dense (short_query)"
    row = {"layers": 2, "sparse_layers": 1, "dense_reasons": ["dense_layer"], "path_ok": False, "model": "m",
           "tokens": 512, "impl": "flashprefill", "ttft_s": 1.0, "ttft_first_s": 1.0, "speedup_vs_sdpa": 1.0}
    assert "sparse 1/2 layers (NOT ALL SPARSE)" in ttft.format_row(row)


def test_gc_is_off_inside_timed_calls_and_rounds_are_paired(tiny, monkeypatch):
    """The garbage collector never runs inside a timed call; the per-round speed-ups (sdpa / variant of
    the same round) are reported with their quartiles."""
    import gc

    gc_inside = []
    real_generate = tiny.generate

    def generate(**kwargs):
        gc_inside.append(gc.isenabled())
        return real_generate(**kwargs)

    monkeypatch.setattr(tiny, "generate", generate)
    rows = ttft.run_lengths(tiny, None, tiny_args(repeats=3), log=lambda _: None)
    assert gc.isenabled() and gc_inside == [False] * 8
    sdpa, guard = rows[0], rows[1]
    assert sdpa["speedup_paired"] == (1.0, 1.0, 1.0)
    paired = sorted(b / t for b, t in zip(sdpa["ttft_all_s"][1:], guard["ttft_all_s"][1:], strict=True))
    assert guard["speedup_paired"] == pytest.approx((paired[0] / 2 + paired[1] / 2, paired[1],
                                                     paired[1] / 2 + paired[2] / 2))
    assert f"per round {guard['speedup_paired'][1]:.2f} [" in ttft.format_row(guard)


def test_warmup_calls_are_reported_apart(tiny):
    """``--warmup 2``: the first two calls of each variant (the guard still measuring) are kept out of
    the steady state and the pairing, and shown in the first-calls column."""
    rows = ttft.run_lengths(tiny, None, tiny_args(repeats=2, warmup=2), log=lambda _: None)
    for r in rows:
        assert len(r["ttft_all_s"]) == 4 and r["ttft_warmup_s"] == r["ttft_all_s"][:2]
        assert r["ttft_s"] == pytest.approx(sum(r["ttft_all_s"][2:]) / 2)
    md = ttft.markdown({"environment": {"torch": "t", "triton": "t", "date": "d"}, "model_note": "tiny",
                        "repeats": 2, "warmup": 2, "rows": rows})
    assert "after the first 2 calls" in md and "| first 2 calls ms |" in md
    assert f"| {rows[1]['ttft_all_s'][0] * 1e3:.1f} / {rows[1]['ttft_all_s'][1] * 1e3:.1f} |" in md
    with pytest.raises(SystemExit):
        tiny_args_parse(["--warmup", "0"])


def tiny_args_parse(extra: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(["--ttft", *extra])


def test_ten_lengths_are_distinct_and_average_to_the_one_length(tiny):
    args = tiny_args(ten_lengths=300)
    result = ttft.run_ten_lengths(tiny, None, args, log=lambda _: None)
    lengths = result["lengths"]
    assert len(set(lengths)) == 10 and sum(lengths) == 10 * 300
    assert len({n % 16 for n in lengths}) >= 5
    assert result["one_length"]["total_s"] > 0 and result["ten_lengths"]["total_s"] > 0
    assert result["ratio"] == pytest.approx(result["ten_lengths"]["total_s"] / result["one_length"]["total_s"])
    assert result["sdpa"]["ratio"] > 0 and result["flashprefill"]["ratio"] == result["ratio"]  # sdpa: the control


def test_profile_groups_kernels_by_name():
    """The --profile split: our three kernels, SDPA's dense kernels (flash, cuDNN, memory-efficient) and
    everything else (matmuls, norms...), by the kernel names the GPU profiler reports."""
    times = [("_pool_keys_kernel", 1.0), ("_select_blocks_kernel", 2.0), ("_sparse_attention_kernel", 10.0),
             ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 20.0), ("void pytorch_flash::flash_fwd_kernel", 5.0),
             ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80", 3.0), ("sm90_xmma_gemm_bf16bf16_bf16f32", 40.0),
             ("void at::native::vectorized_elementwise_kernel", 4.0)]
    groups = ttft.group_kernel_times(times)
    assert groups == {"index: pool + select": 3.0, "sparse attention": 10.0, "dense attention (SDPA)": 28.0,
                      "rest of the model": 44.0, "total": 85.0}

def test_every_row_is_saved_as_it_comes_and_profiles_render(tiny):
    """A GPU run cut short by its time limit keeps the rows measured so far (``on_row`` after each);
    ``--profile`` columns become a second Markdown table."""
    args = tiny_args(model="llama8b")
    rows, seen = [], []
    ttft.run_lengths(tiny, None, args, log=lambda _: None, rows=rows, on_row=lambda: seen.append(len(rows)))
    assert seen == [1, 2]
    rows[1]["profile_ms"] = {"index: pool + select": 1.0, "sparse attention": 2.0, "total": 3.0,
                             "forward wall (unprofiled)": 4.5}
    md = ttft.markdown({"environment": {"torch": "t", "triton": "t", "date": "d"}, "model_note": "tiny",
                        "repeats": 1, "rows": rows})
    header = "| tokens | implementation | index: pool + select | sparse attention | total | forward wall (unprofiled) |"
    assert header in md
    assert "| 256 | flashprefill | 1.0 | 2.0 | 3.0 | 4.5 |" in md


def test_variants_take_turns(tiny, monkeypatch):
    """Calls alternate between the variants (first calls, then each round, each round starting one
    variant further on), so drift over the run touches all alike and none always follows the same
    other; each flashprefill variant runs with its own settings."""
    import fp_patch

    seen = []

    def fake_ttft(model, inputs, repeats):
        impl = model.config._attn_implementation
        seen.append("sdpa" if impl == "sdpa" else f"fp alpha={fp_patch.get_config(model).alpha}")
        return 0.01, 0.01, [0.01]

    monkeypatch.setattr(ttft, "ttft", fake_ttft)
    rows = ttft.run_lengths(tiny, None, tiny_args(model="llama8b", repeats=2, densities=[0.5], lengths=[512]),
                            log=lambda _: None)
    sdpa, real, fixed = "sdpa", "fp alpha=0.18", "fp alpha=1.0"
    assert seen == [sdpa, real, fixed, real, fixed, sdpa, fixed, sdpa, real]
    assert [len(r["ttft_all_s"]) for r in rows] == [3, 3, 3]


def test_only_keeps_sdpa_and_the_named_rows(tiny):
    args = tiny_args(model="llama8b", densities=[0.5], only=["flashprefill @50% fixed"])
    rows = ttft.run_lengths(tiny, None, args, log=lambda _: None)
    assert [r["impl"] for r in rows] == ["sdpa", "flashprefill @50% fixed"]
