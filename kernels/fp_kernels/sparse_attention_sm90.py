"""Stage 3 on Hopper: the index-driven sparse forward, warp-specialised (Gluon).

The same computation as :func:`fp_kernels.sparse_attention` (same lists, same masks, same mean
correction), laid out as FlashAttention 3 does on sm_90, which plain Triton cannot express (Triton
3.6 neither warp-specialises our loop nor leaves a score dot in flight; benchmarks/sm90_resources.py):

- one program per (batch, query head, query block of 128 rows); a 1-warp **producer** partition copies
  the two 64-row query halves once, then the K and V tiles of every listed block, with the copy engine
  (TMA), into a ring of ``STAGES`` shared-memory slots; it refills a slot when both consumers released it;
- two **consumer** warpgroups (64 rows each, 4 warps) walk the list: the score dot of block ``i`` and
  the value dot of block ``i - 1`` are in flight together while the softmax of block ``i`` runs, and the
  two warpgroups drift apart freely, so one's softmax overlaps the other's dots;
- only the last listed block can straddle the diagonal or the end of the valid keys: it alone is masked;
- with ``MEAN_CORRECTION`` the ring goes on after the list with chunks of 128 mean keys / mean values
  (``kbar``/``vbar`` rows ``j < qb``), the same tile shape as a key block, and each consumer folds a
  stand-in column ``scale q . kbar_j + log n_j`` for every skipped ``j`` into its online softmax (listed
  ids come from the kept-flag map of :func:`fp_kernels.sparse_attention.kept_flags`).

Used by :func:`fp_kernels.sparse_attention` on sm_90 for D=128 (D=64 with ``config={"GLUON": True}``),
128-token blocks, fp16 / bf16 and copy-engine-aligned tensors; everything else runs the Triton kernel.
H100: 1.24-1.26x the Triton kernel at 60-100 % density for L >= 32K, 0.89x at 6 % on 8K
(benchmarks/gluon_sparse_forward.py; benchmarks/results/gluon_sparse_forward_h100_d128.md).
"""

from __future__ import annotations

import functools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

from .pool import valid_range
from .select import flag_row, slot_rows

# The one version switch of this module: Triton 3.6 names the TMA load ``async_copy_global_to_shared``;
# 3.7+ name it ``async_load`` (the old name raises). Same arguments. Both are compiled for sm_90 in CI
# (tests/tools/test_sm90_resources.py) and 3.6 runs on the GPU machines.
tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared

BLOCK = 128  # query rows per program and keys per listed block
HALF = BLOCK // 2  # query rows per consumer warpgroup
STAGES = 3  # ring slots (D=128: 3 x 64 KiB of K+V tiles plus 32 KiB of queries, under the 227 KiB limit)


@gluon.jit
def _producer(q_desc, k_desc, v_desc, kbar_desc, vbar_desc, q_smem, k_smem, v_smem, q_bar, k_bars, v_bars,
              empty_bars, index_base, count, total, q_row0, STAGES: gl.constexpr, BLOCK: gl.constexpr,
              HALF: gl.constexpr):
    """Ring entry ``i``: the K and V tiles of listed block ``index_base[i]`` for ``i < count``, then the
    mean-key / mean-value chunk ``i - count`` (rows ``(i - count) * BLOCK + [0, BLOCK)``)."""
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
    tma_load(q_desc, [q_row0, 0], q_bar, q_smem.index(0))  # rows out of range (even negative) read as 0
    tma_load(q_desc, [q_row0 + HALF, 0], q_bar, q_smem.index(1))
    for i in range(total):
        slot = i % STAGES
        mbarrier.wait(empty_bars.index(slot), ((i // STAGES) & 1) ^ 1)  # (a fresh barrier passes phase 1)
        k_bar = k_bars.index(slot)
        v_bar = v_bars.index(slot)
        mbarrier.expect(k_bar, k_desc.block_type.nbytes)
        mbarrier.expect(v_bar, v_desc.block_type.nbytes)
        if i < count:
            row = gl.load(index_base + i) * BLOCK
            tma_load(k_desc, [row, 0], k_bar, k_smem.index(slot))
            tma_load(v_desc, [row, 0], v_bar, v_smem.index(slot))
        else:
            row = (i - count) * BLOCK
            tma_load(kbar_desc, [row, 0], k_bar, k_smem.index(slot))
            tma_load(vbar_desc, [row, 0], v_bar, v_smem.index(slot))


@gluon.jit
def _mask_last(qk, i, count, index_base, t, cols, n, BLOCK: gl.constexpr):
    """The last listed block alone may straddle the diagonal or the end of the valid keys: mask it there."""
    if i == count - 1:
        u = gl.load(index_base + i) * BLOCK + cols
        qk = gl.where((u[None, :] <= t[:, None]) & (u < n)[None, :], qk, float("-inf"))
    return qk


@gluon.jit
def _softmax(logit, m_i, l_i):
    """Online softmax step on logits in log2 units; a row with nothing attended yet pivots on 0 (0, not NaN)."""
    m_new = gl.maximum(m_i, gl.max(logit, axis=1))
    pivot = gl.where(m_new == float("-inf"), 0.0, m_new)
    probs = gl.exp2(logit - pivot[:, None])
    alpha = gl.exp2(m_i - pivot)
    return pivot, l_i * alpha + gl.sum(probs, axis=1), probs, alpha


@gluon.jit
def _step_softmax(qk, m_i, l_i, i, count, index_base, flag_base, t, cols, n, n_corr, scale_log2,
                  BLOCK: gl.constexpr, MEAN_CORRECTION: gl.constexpr):
    """Entry ``i``'s online softmax step: a listed block's keys, or (``i >= count``) the stand-in columns of
    mean-key chunk ``i - count``: logit ``scale q . kbar_j + log2 n_j`` for a skipped ``j < n_corr``,
    ``-inf`` (no column) for a listed or later one."""
    if MEAN_CORRECTION:
        if i < count:
            logit = _mask_last(qk, i, count, index_base, t, cols, n, BLOCK) * scale_log2
        else:
            j = (i - count) * BLOCK + cols
            listed = gl.load(flag_base + j, mask=j < n_corr, other=1) != 0
            last = gl.maximum(n - 1, 0) // BLOCK  # the keys' last block may be partial
            log2_n = gl.where(j == last, gl.log2((n - last * BLOCK).to(gl.float32)), 7.0)  # log2(BLOCK) = 7
            logit = qk * scale_log2 + gl.where(listed, float("-inf"), log2_n)[None, :]
        return _softmax(logit, m_i, l_i)
    else:
        # the scale enters once per element: the row maximum is taken on the raw scores (the scale is > 0)
        qk = _mask_last(qk, i, count, index_base, t, cols, n, BLOCK)
        m_new = gl.maximum(m_i, gl.max(qk, axis=1) * scale_log2)
        m_new = gl.where(m_new == float("-inf"), 0.0, m_new)
        probs = gl.exp2(qk * scale_log2 - m_new[:, None])
        alpha = gl.exp2(m_i - m_new)
        return m_new, l_i * alpha + gl.sum(probs, axis=1), probs, alpha


@gluon.jit
def _consumer(q_smem, k_smem, v_smem, q_bar, k_bars, v_bars, empty_bars, out_base, stride_ol, index_base,
              flag_base, count, total, t0, t_lo, t_hi, row_base, n, n_corr, scale_log2, WHICH: gl.constexpr,
              HEAD_DIM: gl.constexpr, BLOCK: gl.constexpr, HALF: gl.constexpr, STAGES: gl.constexpr,
              MEAN_CORRECTION: gl.constexpr):
    """Rows ``t0 + WHICH * HALF + [0, HALF)`` (local positions) over every ring entry, then the store."""
    dtype: gl.constexpr = q_smem.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    col_o: gl.constexpr = gl.SliceLayout(0, o_layout)
    q = q_smem.index(WHICH)
    t = t0 + WHICH * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(1, s_layout))
    cols = gl.arange(0, BLOCK, layout=gl.SliceLayout(0, s_layout))
    m_i = gl.full([HALF], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([HALF], gl.float32, layout=gl.SliceLayout(1, s_layout))
    acc = gl.zeros([HALF, HEAD_DIM], gl.float32, layout=o_layout)
    qk = gl.zeros([HALF, BLOCK], gl.float32, layout=s_layout)
    mbarrier.wait(q_bar, 0)
    if total > 0:
        mbarrier.wait(k_bars.index(0), 0)
        qk = warpgroup_mma(q, k_smem.index(0).permute((1, 0)), qk, use_acc=False)
        m_i, l_i, probs, alpha = _step_softmax(qk, m_i, l_i, 0, count, index_base, flag_base, t, cols, n, n_corr,
                                               scale_log2, BLOCK, MEAN_CORRECTION)
        p = gl.convert_layout(probs.to(dtype), p_layout)
        for i in range(1, total):
            slot = i % STAGES
            prev = (i - 1) % STAGES
            mbarrier.wait(k_bars.index(slot), (i // STAGES) & 1)
            qk_tok = warpgroup_mma(q, k_smem.index(slot).permute((1, 0)), qk, use_acc=False, is_async=True)
            # the value dot of entry i - 1 runs beside this entry's score dot and softmax
            mbarrier.wait(v_bars.index(prev), ((i - 1) // STAGES) & 1)
            acc_tok = warpgroup_mma(p, v_smem.index(prev), acc, is_async=True)
            qk = warpgroup_mma_wait(num_outstanding=1, deps=(qk_tok,))
            m_i, l_i, probs, alpha = _step_softmax(qk, m_i, l_i, i, count, index_base, flag_base, t, cols, n,
                                                   n_corr, scale_log2, BLOCK, MEAN_CORRECTION)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc_tok,))
            mbarrier.arrive(empty_bars.index(prev), count=1)  # this warpgroup is done with entry i - 1
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            p = gl.convert_layout(probs.to(dtype), p_layout)
        last = (total - 1) % STAGES
        mbarrier.wait(v_bars.index(last), ((total - 1) // STAGES) & 1)
        acc = warpgroup_mma(p, v_smem.index(last), acc)
        mbarrier.arrive(empty_bars.index(last), count=1)
    l_o = gl.convert_layout(l_i, row_o)
    out = acc / gl.where(l_o > 0, l_o, 1.0)[:, None]
    rows = t0 + WHICH * HALF + gl.arange(0, HALF, layout=row_o)
    d = gl.arange(0, HEAD_DIM, layout=col_o)
    ptrs = out_base + (rows + row_base).to(gl.int64)[:, None] * stride_ol + d[None, :]
    gl.store(ptrs, out.to(dtype), mask=((rows >= t_lo) & (rows < t_hi))[:, None])


@gluon.jit(do_not_specialize=["q_len", "k_len", "n_slots"])
def _sparse_attention_sm90_kernel(
    Q, K, V, OUT, INDEX, COUNT, KV_START, KV_END, KBAR, VBAR, FLAGS,
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    stride_ob, stride_ol, stride_oh,
    stride_ib, stride_ih, stride_is,
    stride_cb, stride_ch,
    stride_mb, stride_mj, stride_mh,
    q_len, k_len, num_q_heads, n_slots, scale_log2,
    GROUP: gl.constexpr, SEL_GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, HAS_RANGES: gl.constexpr,
    MEAN_CORRECTION: gl.constexpr, STAGES: gl.constexpr, Q_LAYOUT: gl.constexpr, TILE_LAYOUT: gl.constexpr,
    num_warps: gl.constexpr,
):
    BLOCK: gl.constexpr = 128
    HALF: gl.constexpr = 64
    s = n_slots - 1 - gl.program_id(0)  # long rows first
    bh = gl.program_id(1)
    b = bh // num_q_heads
    h = bh % num_q_heads
    hkv = h // GROUP
    if SEL_GROUP:
        hsel = hkv
        n_sel = num_q_heads // GROUP
    else:
        hsel = h
        n_sel = num_q_heads
    # the slot's geometry, as the selection has it (local positions: key u is row start + u)
    if HAS_RANGES:
        start, end = valid_range(KV_START, KV_END, b, k_len, HAS_RANGES)  # clamped: 0 <= start <= end <= k_len
    else:  # (valid_range's own zero is a Triton tensor without a Gluon layout)
        start = k_len * 0
        end = k_len
    qb, t_lo, t_hi, n_vis, nkb, valid = slot_rows(q_len, k_len, start, end, s, BLOCK)
    n = end - start
    row_base = start - (k_len - q_len)  # local position t is query row t + row_base
    count = gl.load(COUNT + b * stride_cb + hsel * stride_ch + s)
    count = gl.where(valid, count, 0)
    t_hi = gl.where(valid, t_hi, t_lo)
    n_corr = gl.minimum(qb, n_vis)
    if MEAN_CORRECTION:
        total = count + gl.where(valid, (n_corr + BLOCK - 1) // BLOCK, 0)
    else:
        total = count
    dtype: gl.constexpr = Q.dtype.element_ty
    n_rows = gl.maximum(n, 1)  # (a descriptor of an empty range; nothing is loaded through it then)
    q_desc = tma.make_tensor_descriptor(Q + b.to(gl.int64) * stride_qb + h * stride_qh, [q_len, HEAD_DIM],
                                        [stride_ql, 1], [HALF, HEAD_DIM], Q_LAYOUT)
    k_desc = tma.make_tensor_descriptor(K + b.to(gl.int64) * stride_kb + hkv * stride_kh
                                        + start.to(gl.int64) * stride_kl, [n_rows, HEAD_DIM], [stride_kl, 1],
                                        [BLOCK, HEAD_DIM], TILE_LAYOUT)
    v_desc = tma.make_tensor_descriptor(V + b.to(gl.int64) * stride_vb + hkv * stride_vh
                                        + start.to(gl.int64) * stride_vl, [n_rows, HEAD_DIM], [stride_vl, 1],
                                        [BLOCK, HEAD_DIM], TILE_LAYOUT)
    if MEAN_CORRECTION:
        mean_off = b.to(gl.int64) * stride_mb + hkv * stride_mh
        n_means = gl.maximum(nkb, 1)
        kbar_desc = tma.make_tensor_descriptor(KBAR + mean_off, [n_means, HEAD_DIM], [stride_mj, 1],
                                               [BLOCK, HEAD_DIM], TILE_LAYOUT)
        vbar_desc = tma.make_tensor_descriptor(VBAR + mean_off, [n_means, HEAD_DIM], [stride_mj, 1],
                                               [BLOCK, HEAD_DIM], TILE_LAYOUT)
        flag_base = flag_row(FLAGS, b, hsel, s, n_sel, n_slots, (k_len + BLOCK - 1) // BLOCK)
    else:
        kbar_desc = k_desc
        vbar_desc = v_desc
        flag_base = FLAGS
    index_base = INDEX + b.to(gl.int64) * stride_ib + hsel * stride_ih + s * stride_is
    out_base = OUT + b.to(gl.int64) * stride_ob + h * stride_oh

    q_smem = gl.allocate_shared_memory(dtype, [2, HALF, HEAD_DIM], Q_LAYOUT)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK, HEAD_DIM], TILE_LAYOUT)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK, HEAD_DIM], TILE_LAYOUT)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for st in gl.static_range(STAGES):
        mbarrier.init(k_bars.index(st), count=1)
        mbarrier.init(v_bars.index(st), count=1)
        mbarrier.init(empty_bars.index(st), count=2)  # both consumers release a slot
    t0 = qb * BLOCK
    gl.warp_specialize([
        (_consumer, (q_smem, k_smem, v_smem, q_bar, k_bars, v_bars, empty_bars, out_base, stride_ol, index_base,
                     flag_base, count, total, t0, t_lo, t_hi, row_base, n, n_corr, scale_log2, 0, HEAD_DIM, BLOCK,
                     HALF, STAGES, MEAN_CORRECTION)),
        (_consumer, (q_smem, k_smem, v_smem, q_bar, k_bars, v_bars, empty_bars, out_base, stride_ol, index_base,
                     flag_base, count, total, t0, t_lo, t_hi, row_base, n, n_corr, scale_log2, 1, HEAD_DIM, BLOCK,
                     HALF, STAGES, MEAN_CORRECTION)),
        (_producer, (q_desc, k_desc, v_desc, kbar_desc, vbar_desc, q_smem, k_smem, v_smem, q_bar, k_bars, v_bars,
                     empty_bars, index_base, count, total, t0 + row_base, STAGES, BLOCK, HALF)),
    ], [4, 1], [240, 24])
    mbarrier.invalidate(q_bar)
    for st in gl.static_range(STAGES):
        mbarrier.invalidate(k_bars.index(st))
        mbarrier.invalidate(v_bars.index(st))
        mbarrier.invalidate(empty_bars.index(st))


def supported(q, k, v, block_size: int, mean_correction: bool, kbar=None) -> bool:
    """Whether the shape class runs here: fp16 / bf16, D 64 or 128, 128-token blocks, and (with the
    correction) means in the input dtype. Copy-engine alignment and the GPU are checked by the caller."""
    dims_ok = q.shape[-1] in (64, 128) and block_size == BLOCK
    dtype_ok = q.dtype in (torch.float16, torch.bfloat16) and k.dtype == v.dtype == q.dtype
    means_ok = not mean_correction or (kbar is not None and kbar.dtype == q.dtype)
    return dims_ok and dtype_ok and means_ok


@functools.cache
def _smem_layouts(dim: int, bf16: bool) -> tuple:
    """Shared-memory layouts of a query half and of a K/V tile (cached: ~7 us of host time each)."""
    gdt = gl.bfloat16 if bf16 else gl.float16
    return (gl.NVMMASharedLayout.get_default_for([HALF, dim], gdt),
            gl.NVMMASharedLayout.get_default_for([BLOCK, dim], gdt))


def launch(q, k, v, out, block_index, block_count, kv_start, kv_end, kbar, vbar, flags, scale_log2,
           mean_correction: bool, stages: int = STAGES) -> None:
    """One launch over every slot (the caller validated the arguments and set the TMA allocator)."""
    batch, q_len, hq, dim = q.shape
    k_len, hkv = k.shape[1], k.shape[2]
    n_slots = block_count.shape[-1]
    has_ranges = kv_start is not None
    q_layout, tile_layout = _smem_layouts(dim, q.dtype == torch.bfloat16)
    mean_strides = kbar.stride()[:3] if mean_correction else (0, 0, 0)
    _sparse_attention_sm90_kernel[(n_slots, batch * hq)](
        q, k, v, out, block_index, block_count,
        kv_start if has_ranges else block_count, kv_end if has_ranges else block_count,
        kbar if mean_correction else q, vbar if mean_correction else q, flags,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        block_index.stride(0), block_index.stride(1), block_index.stride(2),
        block_count.stride(0), block_count.stride(1),
        *mean_strides,
        q_len, k_len, hq, n_slots, scale_log2,
        GROUP=hq // hkv, SEL_GROUP=block_index.shape[1] != hq, HEAD_DIM=dim, HAS_RANGES=has_ranges,
        MEAN_CORRECTION=mean_correction, STAGES=stages,
        Q_LAYOUT=q_layout, TILE_LAYOUT=tile_layout,
        # 3 warpgroups (2 consumers, the producer's warp rounded up) x 168 registers fit one SM's 64K; the
        # producer gives back down to 24 so each consumer gets 240
        num_warps=4, maxnreg=168,
    )

