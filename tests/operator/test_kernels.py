"""Triton kernels against the fp32 PyTorch reference.

On a CPU-only machine these run under the Triton interpreter (conftest sets TRITON_INTERPRET=1) at
small sizes in fp16/fp32; on a GPU the same tests run in bf16/fp16 and add real sizes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from fp_kernels import (
    BlockRules,
    flash_prefill,
    pool_keys_reference,
    sparse_attention_reference,
)
from fp_kernels.api import make_info
from fp_kernels.geometry import normalize_ranges, num_query_slots, slot_geometry
from fp_kernels.pool import pool_keys
from fp_kernels.select import select_blocks
from fp_kernels.sparse_attention import sparse_attention
from support.kernel_checks import (
    ON_GPU,
    assert_close_to_reference,
    assert_selection_matches,
    case_id,
    kernel_dtypes,
    poison_allocator,
    short_failure,
)

from fp_tools.synthetic import random_block_lists, structured_qkv

# every flash_prefill call in this file must run the Triton pipeline (tests/operator/conftest.py)
pytestmark = pytest.mark.usefixtures("triton_calls")

DTYPES = kernel_dtypes()
DTYPE_IDS = [str(d).removeprefix("torch.") for d in DTYPES]

# (batch, q_len, k_len, hq, hkv, dim, block_size): awkward lengths, Lq < Lk, GQA groups 1, 2, 4, 7
SHAPES_CPU = [
    (1, 1, 1, 2, 1, 64, 32),
    (1, 63, 63, 4, 2, 64, 32),
    (2, 127, 127, 4, 1, 64, 32),
    (1, 128, 128, 7, 1, 64, 32),
    (1, 129, 129, 2, 2, 80, 32),
    (1, 100, 300, 4, 2, 96, 32),
    (1, 1000, 1000, 2, 1, 64, 128),
    (1, 200, 200, 2, 1, 128, 64),
]
SHAPES_GPU = SHAPES_CPU + [
    (1, 4224, 4224, 8, 2, 128, 128),
    (2, 1000, 1000, 28, 4, 128, 128),
    (1, 3000, 4224, 32, 8, 128, 128),
    (1, 4096, 4096, 8, 8, 80, 128),
    (1, 4096, 4096, 8, 2, 256, 128),
    (1, 8192, 8192, 9, 3, 64, 128),
    (1, 32768, 32768, 32, 8, 128, 128),
]
SHAPES = SHAPES_GPU if ON_GPU else SHAPES_CPU
SHAPE_IDS = [case_id(*s[:6], bs=s[6]) for s in SHAPES]


def make_inputs(shape, dtype, device, seed=0, topics=4):
    batch, q_len, k_len, hq, hkv, dim, bs = shape
    q, k, v = structured_qkv(batch, k_len, hq, hkv, dim, block_size=bs, topics=topics, seed=seed, device=device)
    return q[:, k_len - q_len :].to(dtype), k.to(dtype), v.to(dtype)


def reference_error_budget(q, k, v, index, count, bs, kv_start=None, kv_end=None):
    ref32 = sparse_attention_reference(q.float(), k.float(), v.float(), index, count, bs, kv_start=kv_start,
                                       kv_end=kv_end)
    ref_lowp = sparse_attention_reference(q, k, v, index, count, bs, kv_start=kv_start, kv_end=kv_end,
                                          round_probs=True)
    return ref32, ref_lowp


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_pool_keys_matches_reference(shape, dtype, device):
    _, k, _ = make_inputs(shape, dtype, device)
    bs = shape[-1]
    start, end = normalize_ranges(k.shape[0], k.shape[1], None, None, device)
    want = pool_keys_reference(k, bs, start, end)
    got = pool_keys(k, bs, out_dtype=torch.float32)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("density", [0.3, 1.0])
def test_sparse_attention_on_random_lists(shape, dtype, density, device):
    batch, q_len, k_len, hq, hkv, dim, bs = shape
    q, k, v = make_inputs(shape, dtype, device, seed=1)
    index, count = random_block_lists(batch, hq, q_len, k_len, bs, density, device=device, seed=2)
    out = torch.full_like(q, float("nan"))
    sparse_attention(q, k, v, index, count, bs, out=out)
    ref32, ref_lowp = reference_error_budget(q, k, v, index, count, bs)
    assert_close_to_reference(out, ref32, ref_lowp, "sparse_attention")
    if density == 1.0:  # every block listed: dense causal attention
        if q_len * k_len <= 1 << 24:
            allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)
            dense = F.scaled_dot_product_attention(
                q.transpose(1, 2).float(), k.transpose(1, 2).float(), v.transpose(1, 2).float(), attn_mask=allowed,
                enable_gqa=True,
            ).transpose(1, 2)
            assert_close_to_reference(out, dense, ref_lowp, "all blocks vs dense SDPA")
        else:  # an explicit fp32 mask would not fit: fused causal SDPA in the input dtype
            assert q_len == k_len
            dense = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
            ).transpose(1, 2)
            rel = ((out.float() - dense.float()).norm() / dense.float().norm()).item()
            assert rel < 1e-2, rel


@pytest.mark.parametrize("dtype", DTYPES[:1], ids=DTYPE_IDS[:1])
def test_sparse_attention_without_diagonal_and_empty_lists(dtype, device):
    """Lists may skip the diagonal or be empty: rows that see nothing listed are 0, never NaN."""
    q, k, v = make_inputs((1, 160, 160, 2, 1, 64, 32), dtype, device)
    index, count = random_block_lists(1, 2, 160, 160, 32, 0.4, device=device, keep_diagonal=False, seed=3)
    count[0, 1, 2] = 0
    out = torch.full_like(q, float("nan"))
    sparse_attention(q, k, v, index, count, 32, out=out)
    ref32, ref_lowp = reference_error_budget(q, k, v, index, count, 32)
    assert_close_to_reference(out, ref32, ref_lowp, "no-diagonal lists")
    assert (out[0, 64:96, 1] == 0).all()


@pytest.mark.parametrize("group_select", [False, True], ids=["per-head", "per-group"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_flash_prefill_matches_reference(shape, dtype, group_select, device, monkeypatch, triton_calls):
    batch, q_len, k_len, hq, hkv, dim, bs = shape
    q, k, v = make_inputs(shape, dtype, device, seed=4)
    rules = {"sink_blocks": 1, "window_blocks": 1, "last_dense_blocks": 1} if bs < 128 else {}
    alpha = 0.3
    poisoned = poison_allocator(device, monkeypatch)
    out, info = flash_prefill(q, k, v, alpha, bs, **rules, group_select=group_select, return_info=True)
    assert triton_calls and poisoned, "the Triton pipeline did not run on poisoned buffers"
    assert out.is_contiguous() and out.shape == q.shape and out.dtype == q.dtype
    assert_selection_matches(q, k, info, alpha, bs, rules)
    # the attention itself, on the kernel's own lists
    ref32, ref_lowp = reference_error_budget(q, k, v, info.block_index, info.block_count, bs)
    assert_close_to_reference(out, ref32, ref_lowp, "flash_prefill")
    assert ((info.density > 0) & (info.density <= 1)).all()


@pytest.mark.parametrize("dtype", DTYPES[:1], ids=DTYPE_IDS[:1])
@pytest.mark.parametrize("side", ["left", "right", "both"])
def test_padded_batch_rows_equal_rows_alone(side, dtype, device, monkeypatch, triton_calls):
    """kv_start/kv_end: every padded row equals the same row run alone; rows before kv_start are 0."""
    batch, length, bs = 3, 300, 32
    q, k, v = make_inputs((batch, length, length, 4, 2, 64, bs), dtype, device, seed=5)
    lengths = torch.tensor([300, 190, 33], device=device)
    start = {"left": length - lengths, "right": torch.zeros_like(lengths), "both": (length - lengths) // 2}[side]
    end = start + lengths if side != "left" else torch.full_like(lengths, length)
    rules = {"sink_blocks": 1, "window_blocks": 1, "last_dense_blocks": 1}
    poisoned = poison_allocator(device, monkeypatch)
    out, info = flash_prefill(q, k, v, 0.3, bs, **rules, kv_start=start, kv_end=end, return_info=True)
    assert triton_calls and poisoned
    assert not torch.isnan(out).any()
    for b in range(batch):
        lo, hi = int(start[b]), int(end[b])
        alone, alone_info = flash_prefill(q[b : b + 1, lo:hi], k[b : b + 1, lo:hi], v[b : b + 1, lo:hi], 0.3, bs,
                                          **rules, return_info=True)
        torch.testing.assert_close(out[b, lo:hi], alone[0], atol=0, rtol=0)
        torch.testing.assert_close(info.density[b], alone_info.density[0])
        assert (out[b, :lo] == 0).all()
    ref32, ref_lowp = reference_error_budget(q, k, v, info.block_index, info.block_count, bs, start, end)
    assert_close_to_reference(out, ref32, ref_lowp, "padded batch")


@pytest.mark.parametrize("dtype", DTYPES[:1], ids=DTYPE_IDS[:1])
def test_fully_padded_row_is_zero(dtype, device, monkeypatch, triton_calls):
    q, k, v = make_inputs((2, 96, 96, 2, 1, 64, 32), dtype, device)
    start = torch.tensor([0, 50], device=device)
    end = torch.tensor([96, 50], device=device)
    poisoned = poison_allocator(device, monkeypatch)
    out = flash_prefill(q, k, v, 0.3, 32, kv_start=start, kv_end=end)
    assert triton_calls and (tuple(out.shape), out.dtype) in poisoned
    assert (out[1] == 0).all() and not torch.isnan(out).any()


@pytest.mark.parametrize("budget", [1, 3, 40])
def test_min_budget_keeps_the_best_blocks(budget, device):
    dtype = DTYPES[0]
    q, k, v = make_inputs((1, 400, 400, 2, 1, 64, 16), dtype, device, seed=6)
    rules = {"sink_blocks": 0, "window_blocks": 1, "last_dense_blocks": 0, "min_budget": budget}
    out, info = flash_prefill(q, k, v, 0.99, 16, **rules, return_info=True)
    assert_selection_matches(q, k, info, 0.99, 16, rules)
    n_vis = torch.arange(1, info.block_count.shape[-1] + 1, device=device)
    assert (info.block_count[0] >= torch.minimum(n_vis, torch.tensor(budget, device=device))).all()


def test_alpha_zero_is_dense_and_alpha_one_is_sparsest(device):
    dtype = DTYPES[0]
    q, k, v = make_inputs((1, 512, 512, 2, 1, 64, 32), dtype, device, topics=8)
    _, dense = flash_prefill(q, k, v, 0.0, 32, return_info=True)
    _, mid = flash_prefill(q, k, v, 0.3, 32, return_info=True)
    _, sparsest = flash_prefill(q, k, v, 1.0, 32, return_info=True)
    assert (dense.density == 1).all()
    assert (sparsest.density <= mid.density).all() and (mid.density < 1).all()


def test_kernel_tests_really_run_the_kernels(device, triton_calls):
    """The Triton pipeline, not the reference, produces flash_prefill's output in these tests (on the
    CPU under TRITON_INTERPRET), and the guard of this file turns a silent fallback into a failure."""
    import fp_kernels.api

    if not ON_GPU:
        assert fp_kernels.api.interpreter_enabled(), "conftest.py did not set TRITON_INTERPRET=1"
    q, k, v = make_inputs((1, 64, 64, 2, 1, 64, 32), DTYPES[0], device)
    out = flash_prefill(q, k, v, 0.3, 32)
    assert triton_calls == [tuple(q.shape)] and out.shape == q.shape
    # inputs the kernels cannot take (bf16 in the interpreter, fp32 on the GPU) would run the reference
    unsupported = torch.float32 if ON_GPU else torch.bfloat16
    with pytest.raises(AssertionError, match="reference instead of the Triton kernels"):
        flash_prefill(q.to(unsupported), k.to(unsupported), v.to(unsupported), 0.3, 32)
    assert len(triton_calls) == 1


def test_select_blocks_writes_every_count(device, monkeypatch):
    """Counts are written for every slot, also empty ones (poisoned buffer)."""
    dtype = DTYPES[0]
    q, k, _ = make_inputs((2, 70, 200, 2, 1, 64, 32), dtype, device)
    start = torch.tensor([0, 150], device=device, dtype=torch.int32)
    end = torch.tensor([200, 200], device=device, dtype=torch.int32)
    poisoned = poison_allocator(device, monkeypatch)
    rules = BlockRules(alpha=0.3, block_size=32, sink_blocks=1, window_blocks=1, last_dense_blocks=1)
    index, count = select_blocks(q, pool_keys(k, 32, start, end), 200, rules, None, start, end)
    n_slots = num_query_slots(70, 200, 32, True)
    geo = slot_geometry(70, 200, 32, start, end, n_slots, 1)
    assert (tuple(count.shape), torch.int32) in poisoned
    assert ((count >= 0) & (count <= geo["n_vis"][:, None, :])).all()
    assert (count[:, :, geo["n_vis"][0] == 0] == 0).all()


@pytest.mark.parametrize("rows", [16, 32])
def test_row_tiled_scoring_matches_the_reference(rows, device):
    """Scoring the slot's rows in tiles of ``ROWS`` (reloaded for every chunk of key blocks: the
    ``config={"ROWS": ...}`` variants of benchmarks/routes_operator.py) keeps the reference's selection,
    with padding ranges, ``Lq < Lk`` and a partial last block."""
    dtype = DTYPES[0]
    q, k, v = make_inputs((2, 150, 300, 4, 2, 64, 64), dtype, device, seed=3)
    start = torch.tensor([0, 70], device=device, dtype=torch.int32)
    end = torch.tensor([300, 290], device=device, dtype=torch.int32)
    rules = BlockRules(alpha=0.3, block_size=64, sink_blocks=1, window_blocks=1, last_dense_blocks=0)
    kbar = pool_keys(k, 64, start, end)
    index, count = select_blocks(q, kbar, 300, rules, None, start, end, config={"ROWS": rows})
    default = select_blocks(q, kbar, 300, rules, None, start, end)
    info = make_info(q, k, index, count, rules, start, end)
    placement = {"sink_blocks": 1, "window_blocks": 1, "last_dense_blocks": 0}
    assert_selection_matches(q, k, info, rules.alpha, 64, placement, kv_start=start, kv_end=end)
    assert torch.equal(count, default[1])
    assert 0 < float(info.density.mean()) < 1  # the selection really thresholded something
    with pytest.raises(ValueError, match="ROWS must be a power of two"):
        select_blocks(q, kbar, 300, rules, None, start, end, config={"ROWS": 24})


def test_custom_op_fake_matches_real():
    """The torch.library op's fake (meta) implementation agrees with the real one (torch.compile)."""
    dtype = DTYPES[0]
    device = "cuda" if ON_GPU else "cpu"
    q, k, v = make_inputs((1, 96, 96, 2, 1, 64, 32), dtype, device)
    rules = BlockRules(alpha=0.3, block_size=32, sink_blocks=1, window_blocks=1, last_dense_blocks=1)
    for ranges in [(None, None), (torch.tensor([3], device=device), torch.tensor([96], device=device))]:
        with short_failure():
            torch.library.opcheck(
                torch.ops.fp_kernels.flash_prefill.default, (q, k, v, *ranges, 0.125, "auto", *rules.as_scalars()),
                test_utils=("test_schema", "test_faketensor"),
            )


@pytest.mark.skipif(not ON_GPU, reason="long sequences need the GPU")
@pytest.mark.parametrize("seq_len", [65536, 131072])
def test_long_spot_checks_against_dense(seq_len):
    """64K/128K: alpha=0 equals cuDNN/flash dense SDPA; at alpha=0.18, sampled rows equal an fp32
    recomputation from the kernel's own lists."""
    from fp_tools.benchmark import dense_attention, spot_check

    q, k, v = structured_qkv(1, seq_len, 32, 8, 128, dtype=torch.bfloat16, device="cuda", topics=16)
    out = flash_prefill(q, k, v, alpha=0.0)
    dense = dense_attention(q, k, v, "flash")().transpose(1, 2)
    rel = ((out.float() - dense.float()).norm() / dense.float().norm()).item()
    assert rel < 1e-2, rel
    out, info = flash_prefill(q, k, v, alpha=0.18, return_info=True)
    assert not torch.isnan(out).any()
    assert spot_check(q, k, v, out, info.block_index, info.block_count, 128, rows=128) < 2e-2
    assert float(info.density.mean()) < 0.5



def test_length_dependent_arguments_are_not_specialised():
    """Triton compiles a new variant when an integer argument changes between "== 1", "divisible by 16"
    and neither; lengths, slot counts and index strides change with every prompt length, so they must
    be excluded (a new prompt length then never compiles). Checked on the compiled (non-interpreted)
    JIT objects, in a subprocess without TRITON_INTERPRET."""
    code = (
        "import json\n"
        "from fp_kernels import pool, select, sparse_attention as sa\n"
        "print(json.dumps([[[p.name for p in f.params if p.do_not_specialize],"
        " [p.name for p in f.params if p.name in pool.LENGTH_ARGS]]"
        " for f in (pool._pool_keys_kernel, select._select_blocks_kernel, sa._sparse_attention_kernel)]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (pool_dns, pool_len), *others = json.loads(proc.stdout.strip().splitlines()[-1])
    assert pool_dns == pool_len == ["k_len"]
    for not_specialised, length_args in others:
        assert sorted(not_specialised) == sorted(length_args) and len(length_args) == 8


def test_selection_check_agrees_with_the_reference_and_catches_a_wrong_selection():
    """The benchmark's sampled check of block decisions (run before anything is timed on the GPU):
    zero disagreement on the reference's own selection, a clear one on a selection made with
    another alpha."""
    from fp_tools.benchmark import selection_check

    q, k, v = structured_qkv(1, 2048, 4, 2, 64, block_size=64)
    rules = BlockRules(alpha=0.3, block_size=64, sink_blocks=1, window_blocks=1, last_dense_blocks=1)
    _, info = flash_prefill(q, k, v, rules=rules, backend="reference", return_info=True)
    _, other = flash_prefill(q, k, v, rules=rules.replace(alpha=0.9), backend="reference", return_info=True)
    assert float(info.density.mean()) < 0.9
    assert selection_check(q, k, info, rules, slots=64) == 0.0
    assert selection_check(q, k, other, rules, slots=64) > 0.01
