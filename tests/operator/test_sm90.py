"""The warp-specialised sm_90 sparse forward (fp_kernels.sparse_attention_sm90) against the fp32 reference.

It is the default of ``sparse_attention`` on an sm_90 GPU for D=64 and D=128 and 128-token blocks, so the
GPU runs of test_kernels.py exercise it too. Here every case
asserts that it is the kernel that ran, and covers what those do not: padding ranges, Lq < Lk,
per-group lists, lists without the diagonal, an empty list, junk past the counts, and the mean
correction (whose other tests pin the Triton kernel's knobs). Skipped off sm_90; on the CPU,
tests/tools/test_sm90_resources.py compiles it for sm_90.
"""

from __future__ import annotations

import pytest
import torch
from fp_kernels import sparse_attention_reference
from fp_kernels.pool import pool_keys
from fp_kernels.sparse_attention import kernel_for, sparse_attention
from support.kernel_checks import ON_GPU, assert_close_to_reference, case_id

from fp_tools.synthetic import random_block_lists, structured_qkv

pytestmark = pytest.mark.skipif(not ON_GPU or torch.cuda.get_device_capability()[0] != 9, reason="an sm_90 GPU")

# batch, q_len, k_len, hq, hkv, dim, ranges (kv_start, kv_end per batch row, or None)
CASES = [
    (1, 129, 129, 2, 2, 64, None),
    (1, 1000, 1000, 4, 1, 64, None),
    (2, 700, 1300, 4, 2, 128, None),
    (2, 1200, 1200, 8, 2, 128, ([0, 300], [1200, 1000])),
    (3, 640, 900, 4, 4, 128, ([0, 37, 500], [900, 870, 900])),
    (1, 4224, 4224, 8, 2, 128, None),
]
IDS = [case_id(*c[:6], pad=int(c[6] is not None)) for c in CASES]


@pytest.mark.parametrize("mean_correction", [False, True], ids=["plain", "mean-corr"])
@pytest.mark.parametrize("per_group", [False, True], ids=["per-head", "per-group"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_sm90_kernel_matches_reference(case, per_group, mean_correction):
    batch, q_len, k_len, hq, hkv, dim, ranges = case
    device = "cuda"
    q, k, v = structured_qkv(batch, k_len, hq, hkv, dim, block_size=128, topics=4, seed=5, device=device)
    q, k, v = (x.to(torch.bfloat16) for x in (q[:, k_len - q_len :], k, v))
    start = end = None
    if ranges is not None:
        start = torch.tensor(ranges[0], device=device, dtype=torch.int32)
        end = torch.tensor(ranges[1], device=device, dtype=torch.int32)
    hsel = hkv if per_group else hq
    index, count = random_block_lists(batch, hsel, q_len, k_len, 128, 0.4, device=device, kv_start=start,
                                      kv_end=end, keep_diagonal=not mean_correction, seed=6)
    count[0, -1, count.shape[-1] // 2] = 0  # an empty list: its rows get only the stand-ins (or 0)
    past = torch.arange(index.shape[-1], device=device) >= count[..., None]
    index = torch.where(past, torch.full_like(index, index.shape[-1] - 1), index)  # junk past the counts
    means = pool_keys(k, 128, start, end, v=v) if mean_correction else (None, None)
    assert kernel_for(q, k, v, 128, mean_correction, means[0], vbar=means[1]) == "gluon_sm90"
    out = torch.full_like(q, float("nan"))
    sparse_attention(q, k, v, index, count, 128, kv_start=start, kv_end=end, out=out,
                     mean_correction=mean_correction, kbar=means[0], vbar=means[1])
    kw = {"kv_start": start, "kv_end": end, "mean_correction": mean_correction}
    ref32 = sparse_attention_reference(q.float(), k.float(), v.float(), index, count, 128, **kw)
    ref_lowp = sparse_attention_reference(q, k, v, index, count, 128, round_probs=True, **kw)
    assert_close_to_reference(out, ref32, ref_lowp, "sm_90 kernel")
    # three programs share every work item through the work counter (the ring and the query barrier run on
    # across items of different lengths): the same bits as one program per SM (with ranges: one per item)
    few = sparse_attention(q, k, v, index, count, 128, kv_start=start, kv_end=end, config={"GLUON_PROGRAMS": 3},
                           mean_correction=mean_correction, kbar=means[0], vbar=means[1])
    assert torch.equal(few, out)
    triton = sparse_attention(q, k, v, index, count, 128, kv_start=start, kv_end=end, config={"GLUON": False},
                              mean_correction=mean_correction, kbar=means[0], vbar=means[1])
    assert_close_to_reference(triton, ref32, ref_lowp, "Triton kernel")  # (the two agree through the reference)


def test_a_triton_knob_selects_the_triton_kernel():
    q = torch.zeros(1, 256, 2, 128, dtype=torch.bfloat16, device="cuda")
    assert kernel_for(q, q, q, 128) == "gluon_sm90"
    assert kernel_for(q, q, q, 128, config={"BLOCK_N": 64}) == "triton"
    assert kernel_for(q, q, q, 128, config={"GLUON": False}) == "triton"
    assert kernel_for(q, q, q, 64) == "triton"  # 64-token blocks
    q64 = q[..., :64].contiguous()
    assert kernel_for(q64, q64, q64, 128) == "gluon_sm90"  # D=64 too
    assert kernel_for(q64, q64, q64, 128, config={"GLUON": False}) == "triton"
    q256 = torch.zeros(1, 256, 2, 256, dtype=torch.bfloat16, device="cuda")
    assert kernel_for(q256, q256, q256, 128) == "triton"  # D=256: the Triton kernel
    assert kernel_for(q.float(), q.float(), q.float(), 128) == "triton"
    means = torch.zeros(2, 1, 2, 8, 128, dtype=torch.bfloat16, device="cuda")
    kbar, vbar = means[0], means[1]
    assert kernel_for(q, q, q, 128, True, kbar, vbar=vbar) == "gluon_sm90"
    # the copy engine reads the mean values too: a misaligned vbar sends the call to the Triton kernel
    off = torch.zeros(2 * 8 * 128 + 1, dtype=torch.bfloat16, device="cuda")[1:].view(1, 2, 8, 128)
    assert kernel_for(q, q, q, 128, True, kbar, vbar=off) == "triton"


def test_out_of_range_padding_is_clamped_as_documented():
    """``kv_start``/``kv_end`` outside ``[0, Lk]`` act as if clamped there (docs/operator.md), as in the Triton
    kernel: the same bits as the clamped ranges."""
    q, k, v = structured_qkv(2, 1000, 4, 2, 128, block_size=128, topics=4, seed=7, device="cuda")
    q, k, v = (x.to(torch.bfloat16) for x in (q, k, v))
    clamped = (torch.tensor([0, 200], device="cuda", dtype=torch.int32),
               torch.tensor([1000, 1000], device="cuda", dtype=torch.int32))
    raw = (torch.tensor([-50, 200], device="cuda"), torch.tensor([1000, 5000], device="cuda"))  # int64
    index, count = random_block_lists(2, 4, 1000, 1000, 128, 0.5, device="cuda", kv_start=clamped[0],
                                      kv_end=clamped[1], seed=8)
    assert kernel_for(q, k, v, 128) == "gluon_sm90"
    want = sparse_attention(q, k, v, index, count, 128, kv_start=clamped[0], kv_end=clamped[1])
    got = sparse_attention(q, k, v, index, count, 128, kv_start=raw[0], kv_end=raw[1])
    assert not torch.isnan(got).any() and torch.equal(got, want)


@pytest.mark.parametrize("mean_correction", [False, True], ids=["plain", "mean-corr"])
def test_the_result_does_not_depend_on_the_number_of_programs(mean_correction):
    """A work item is computed by one program in one order whatever the grid: 1, 7, the SM count (the
    default) and one program per item give the same bits, on more items than SMs."""
    q, k, v = structured_qkv(1, 8192, 8, 2, 128, block_size=128, topics=4, seed=9, device="cuda")
    q, k, v = (x.to(torch.bfloat16) for x in (q, k, v))
    index, count = random_block_lists(1, 8, 8192, 8192, 128, 0.3, device="cuda", seed=10)
    means = pool_keys(k, 128, v=v) if mean_correction else (None, None)
    runs = [sparse_attention(q, k, v, index, count, 128, config=None if n is None else {"GLUON_PROGRAMS": n},
                             mean_correction=mean_correction, kbar=means[0], vbar=means[1])
            for n in (None, 1, 7, 64 * 8)]
    assert not torch.isnan(runs[0]).any() and runs[0].abs().sum() > 0
    for run in runs[1:]:
        assert torch.equal(run, runs[0])
