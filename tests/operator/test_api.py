"""Public API contract: every bad input is a clear error, backends route as documented, random shapes work."""

from __future__ import annotations

import logging

import pytest
import torch
from fp_kernels import flash_prefill, flash_prefill_reference, sparse_attention_reference
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.kernel_checks import ON_GPU, assert_close_to_reference, assert_selection_matches, kernel_dtypes

from fp_tools.synthetic import structured_qkv

DEVICE = "cuda" if ON_GPU else "cpu"


def qkv(q_len=64, k_len=64, hq=4, hkv=2, dim=64, dtype=torch.float16):
    return (
        torch.randn(1, q_len, hq, dim, dtype=dtype, device=DEVICE),
        torch.randn(1, k_len, hkv, dim, dtype=dtype, device=DEVICE),
        torch.randn(1, k_len, hkv, dim, dtype=dtype, device=DEVICE),
    )


BAD_CALLS = {
    "q not a tensor": (lambda q, k, v: flash_prefill(q.tolist(), k, v), TypeError, "torch.Tensor"),
    "3-D q": (lambda q, k, v: flash_prefill(q[0], k, v), ValueError, "4-D"),
    "integer dtype": (lambda q, k, v: flash_prefill(q.int(), k.int(), v.int()), TypeError, "float16.*cast it"),
    "mixed dtypes": (lambda q, k, v: flash_prefill(q, k.float(), v), TypeError, "share one dtype"),
    "different devices": (lambda q, k, v: flash_prefill(q, k.to("meta"), v), ValueError, "one device.*move them"),
    "k/v shapes differ": (lambda q, k, v: flash_prefill(q, k, v[:, :10]), ValueError, "same shape.*pass keys"),
    "batch differs": (lambda q, k, v: flash_prefill(q.expand(2, -1, -1, -1), k, v), ValueError, "batch"),
    "head_dim differs": (lambda q, k, v: flash_prefill(q[..., :32], k, v), ValueError, "head_dim"),
    "heads not a multiple": (lambda q, k, v: flash_prefill(q[:, :, :3], k, v), ValueError, "multiple"),
    "Lq > Lk": (lambda q, k, v: flash_prefill(q, k[:, :10], v[:, :10]), ValueError, "Lq <= Lk"),
    "unsupported head_dim": (lambda q, k, v: flash_prefill(q[..., :48], k[..., :48], v[..., :48]), ValueError,
                             "not supported"),
    "alpha below 0": (lambda q, k, v: flash_prefill(q, k, v, alpha=-0.1), ValueError, "alpha"),
    "alpha above 1": (lambda q, k, v: flash_prefill(q, k, v, alpha=1.5), ValueError, "alpha"),
    "alpha nan": (lambda q, k, v: flash_prefill(q, k, v, alpha=float("nan")), ValueError, "alpha"),
    "alpha as string": (lambda q, k, v: flash_prefill(q, k, v, alpha="0.1"), TypeError, "alpha.*float"),
    "alpha as bool": (lambda q, k, v: flash_prefill(q, k, v, alpha=True), TypeError, "alpha"),
    "block_size not a power of two": (lambda q, k, v: flash_prefill(q, k, v, block_size=100), ValueError,
                                      "power of two"),
    "block_size too small": (lambda q, k, v: flash_prefill(q, k, v, block_size=8), ValueError, "power of two"),
    "block_size as float": (lambda q, k, v: flash_prefill(q, k, v, block_size=128.0), TypeError, "block_size"),
    "negative sink_blocks": (lambda q, k, v: flash_prefill(q, k, v, sink_blocks=-1), ValueError, "sink_blocks"),
    "fractional window": (lambda q, k, v: flash_prefill(q, k, v, window_blocks=1.5), TypeError, "window_blocks"),
    "zero scale": (lambda q, k, v: flash_prefill(q, k, v, scale=0.0), ValueError, "scale"),
    "infinite scale": (lambda q, k, v: flash_prefill(q, k, v, scale=float("inf")), ValueError, "scale"),
    "scale as string": (lambda q, k, v: flash_prefill(q, k, v, scale="0.1"), TypeError, "scale"),
    "kv_start wrong shape": (lambda q, k, v: flash_prefill(q, k, v, kv_start=torch.zeros(2, dtype=torch.long,
                             device=DEVICE)), ValueError, "kv_start"),
    "kv_end float": (lambda q, k, v: flash_prefill(q, k, v, kv_end=torch.zeros(1, device=DEVICE)), TypeError,
                     "kv_end.*integer"),
    "kv_start a list": (lambda q, k, v: flash_prefill(q, k, v, kv_start=[0]), TypeError, "kv_start.*integer"),
    "kv_start on another device": (lambda q, k, v: flash_prefill(q, k, v, kv_start=torch.zeros(1, dtype=torch.long,
                                   device="meta")), ValueError, "kv_start.*move it"),
    "unknown backend": (lambda q, k, v: flash_prefill(q, k, v, backend="cuda"), ValueError, "backend"),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_is_a_clear_error(name):
    call, error, words = BAD_CALLS[name]
    q, k, v = qkv()
    with pytest.raises(error, match=words):
        call(q, k, v)


def test_reference_validates_the_same_way():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="alpha"):
        flash_prefill_reference(q, k, v, alpha=2.0)
    with pytest.raises(ValueError, match="Lq <= Lk"):
        flash_prefill_reference(q, k[:, :3], v[:, :3])


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_out_of_range_kv_bounds_are_clamped_and_empty_ranges_give_zeros(backend):
    """Documented contract (no host sync, so no value check): kv_start/kv_end are clamped to [0, Lk];
    a row whose range is empty after clamping (kv_end <= kv_start) is all zeros with density 0."""
    q, k, v = (torch.cat([x, x.roll(1, 1)]) for x in qkv(q_len=80, k_len=80, dtype=kernel_dtypes()[-1]))

    def run(start, end):
        start = torch.tensor(start, device=DEVICE)
        end = torch.tensor(end, device=DEVICE)
        return flash_prefill(q, k, v, 0.3, 16, 1, 1, 1, kv_start=start, kv_end=end, backend=backend,
                             return_info=True)

    out, info = run([-5, 10], [200, 80])
    want, want_info = run([0, 10], [80, 80])
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    torch.testing.assert_close(info.density, want_info.density)
    out, info = run([50, 90], [20, 95])  # start > end; both past Lk
    assert (out == 0).all() and (info.density == 0).all()


def test_inputs_the_kernels_cannot_take_go_to_the_reference_with_a_note(caplog):
    # bfloat16 on the CPU interpreter (or float32 on the GPU) runs the reference, logged once
    dtype = torch.float32 if ON_GPU else torch.bfloat16
    q, k, v = qkv(dtype=dtype)
    with caplog.at_level(logging.INFO, logger="fp_kernels.api"):
        import fp_kernels.api as api

        api.log_once.cache_clear()
        out = flash_prefill(q, k, v, alpha=0.3, block_size=16)
        flash_prefill(q, k, v, alpha=0.3, block_size=16)
    notes = [r for r in caplog.records if "using the PyTorch reference" in r.getMessage()]
    assert len(notes) == 1
    torch.testing.assert_close(out, flash_prefill_reference(q, k, v, alpha=0.3, block_size=16))
    with pytest.raises(ValueError, match="backend='triton' cannot run"):
        flash_prefill(q, k, v, backend="triton")


def test_triton_older_than_the_floor_is_refused_clearly(monkeypatch):
    """pyproject asks for triton>=3.6; an older one (e.g. installed with --no-deps) must not crash inside
    the kernels: the reference runs (auto) or a clear error names the fix (backend="triton")."""
    import fp_kernels.api as api
    import triton

    q, k, v = qkv(dtype=kernel_dtypes()[0])
    monkeypatch.setattr(triton, "__version__", "3.2.0")
    api.triton_problem.cache_clear()
    try:
        assert "older than 3.6" in api.kernel_backend_reason(q)
        with pytest.raises(ValueError, match="Triton 3.2.0 is older than 3.6.*pip install -U triton"):
            flash_prefill(q, k, v, alpha=0.3, block_size=16, backend="triton")
        torch.testing.assert_close(flash_prefill(q, k, v, alpha=0.3, block_size=16),
                                   flash_prefill_reference(q, k, v, alpha=0.3, block_size=16))
    finally:
        monkeypatch.undo()
        api.triton_problem.cache_clear()
    assert api.kernel_backend_reason(q) is None


def test_explicit_reference_backend_and_strided_inputs():
    """Transposed (B, H, L, D) memory, as Transformers hands it, gives the same answer as contiguous."""
    q, k, v = qkv(q_len=96, k_len=96, dtype=kernel_dtypes()[0])
    strided = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v)]
    assert not strided[0].is_contiguous()
    a = flash_prefill(q, k, v, alpha=0.3, block_size=32)
    b = flash_prefill(*strided, alpha=0.3, block_size=32)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    ref = flash_prefill(q, k, v, alpha=0.3, block_size=32, backend="reference")
    assert ref.shape == a.shape and ref.is_contiguous()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    k_len=st.integers(1, 90),
    q_frac=st.floats(0.01, 1.0),
    hkv=st.integers(1, 2),
    group=st.integers(1, 3),
    dim=st.sampled_from([64, 80]),
    block_size=st.sampled_from([16, 32]),
    alpha=st.floats(0.0, 1.0),
    sink=st.integers(0, 2),
    window=st.integers(0, 2),
    last_dense=st.integers(0, 2),
    budget=st.integers(0, 3),
    group_select=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_match_reference(k_len, q_frac, hkv, group, dim, block_size, alpha, sink, window,
                                       last_dense, budget, group_select, seed):
    dtype = kernel_dtypes()[-1]
    q_len = max(1, int(k_len * q_frac))
    q, k, v = structured_qkv(1, k_len, hkv * group, hkv, dim, block_size=block_size, topics=3, seed=seed,
                             device=DEVICE, dtype=dtype)
    q = q[:, k_len - q_len :]
    rules = {"sink_blocks": sink, "window_blocks": window, "last_dense_blocks": last_dense, "min_budget": budget}
    out, info = flash_prefill(q, k, v, alpha, block_size, **rules, group_select=group_select, return_info=True)
    assert_selection_matches(q, k, info, alpha, block_size, rules)
    ref32 = sparse_attention_reference(q.float(), k.float(), v.float(), info.block_index, info.block_count,
                                       block_size)
    ref_lowp = sparse_attention_reference(q, k, v, info.block_index, info.block_count, block_size, round_probs=True)
    assert_close_to_reference(out, ref32, ref_lowp, "random shape")
