"""Stage 3 on Hopper: the index-driven sparse forward, warp-specialised (Gluon).

The same computation as :func:`fp_kernels.sparse_attention` (same lists, same masks, same mean
correction), laid out as FlashAttention 3 does on sm_90, which plain Triton cannot express (Triton
3.6 neither warp-specialises our loop nor leaves a score dot in flight; benchmarks/sm90_resources.py):

- **persistent**: one program per SM. A work item is (batch, query head, query block of 128 rows); items go
  head after head, each head's longest rows first, so the programs at work at one time read the same keys
  (L2). A program takes its own first item, then, each time it is done, the next one left (a work counter,
  one atomic per item): none runs ahead of the rest and the longest come first. Which program computes an
  item changes nothing in its bits. With padding ranges there is one program per item (its key descriptors
  start at its batch row's valid keys);
- a 1-warp **producer** partition copies each item's two 64-row query halves (once the consumers are done
  with the last item's), then the K and V tiles of every listed block, with the copy engine (TMA, 4-D
  descriptors over whole ``[B, L, H, D]`` tensors made once per program), into a ring of ``STAGES``
  shared-memory slots that runs on across items; it refills a slot when both consumers released it, so the
  next item's loads overlap the last one's final value dot and store;
- two **consumer** warpgroups (64 rows each, 4 warps) walk the list: the score dot of block ``i`` and
  the value dot of block ``i - 1`` are in flight together while the softmax of block ``i`` runs, and the
  two warpgroups drift apart freely, so one's softmax overlaps the other's dots;
- only the last listed block can straddle the diagonal or the end of the valid keys: it alone is masked;
- with ``MEAN_CORRECTION`` the ring goes on after the list with chunks of 128 mean keys / mean values
  (``kbar``/``vbar`` rows ``j < qb``), the same tile shape as a key block; a second loop folds a stand-in
  column ``scale q . kbar_j + log n_j`` for every skipped ``j`` into each consumer's online softmax (listed ids
  from the kept-flag map of :func:`fp_kernels.sparse_attention.kept_flags`, loaded beside the chunk's score dot).

Used by :func:`fp_kernels.sparse_attention` on sm_90 for D=64 and D=128, 128-token blocks, fp16 / bf16 and
copy-engine-aligned tensors; everything else runs the Triton kernel. H100 (benchmarks/gluon_sparse_forward.py;
benchmarks/results/gluon_sparse_forward_h100_d128.md, _d64.md): 1.22-1.30x the Triton kernel at D=128 for
6-100 % density from 8K to 128K (1.04-1.11x cuDNN at 100 %); 0.95-1.21x at D=64.
"""

from __future__ import annotations

import functools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

from .pool import valid_range
from .select import flag_row, slot_rows

# The version switches of this module: Triton 3.6 names the TMA load ``async_copy_global_to_shared``;
# 3.7+ name it ``async_load`` (the old name raises). Same arguments. Both are compiled for sm_90 in CI
# (tests/tools/test_sm90_resources.py) and 3.6 runs on the GPU machines.
tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
# and the partition-wide barrier: ``thread_barrier`` in 3.6, ``barrier`` in 3.9
thread_barrier = gl.thread_barrier if hasattr(gl, "thread_barrier") else gl.barrier

BLOCK = 128  # query rows per program and keys per listed block
HALF = BLOCK // 2  # query rows per consumer warpgroup
STAGES = 3  # ring slots (D=128: 3 x 64 KiB of K+V tiles plus 32 KiB of queries, under the 227 KiB limit)


@gluon.jit
def _item(w, n_slots, num_q_heads):
    """Work item ``w``'s slot, batch row and query head (the order of :func:`_tile`)."""
    bh = w // n_slots
    return n_slots - 1 - w % n_slots, bh // num_q_heads, bh % num_q_heads


@gluon.jit
def _tile(w, n_bh, num_q_heads, n_slots, q_len, k_len, COUNT, stride_cb, stride_ch, KV_START, KV_END,
          GROUP: gl.constexpr, SEL_GROUP: gl.constexpr, HAS_RANGES: gl.constexpr, MEAN_CORRECTION: gl.constexpr,
          BLOCK: gl.constexpr):
    """Work item ``w``: (batch, query head, slot), head after head and each head's longest rows first (the
    programs at work at one time share their keys in L2: the slots of one head, and of its GQA group next),
    and its geometry as the selection has it (local positions: key ``u`` is row ``start + u``)."""
    s, b, h = _item(w, n_slots, num_q_heads)
    hkv = h // GROUP
    if SEL_GROUP:
        hsel = hkv
    else:
        hsel = h
    if HAS_RANGES:
        start, end = valid_range(KV_START, KV_END, b, k_len, HAS_RANGES)  # clamped: 0 <= start <= end <= k_len
    else:  # (valid_range's own zero is a Triton tensor without a Gluon layout)
        start = k_len * 0
        end = k_len
    qb, t_lo, t_hi, n_vis, nkb, valid = slot_rows(q_len, k_len, start, end, s, BLOCK)
    count = gl.load(COUNT + b * stride_cb + hsel * stride_ch + s)
    count = gl.where(valid, count, 0)
    t_hi = gl.where(valid, t_hi, t_lo)
    n_corr = gl.minimum(qb, n_vis)
    if MEAN_CORRECTION:
        total = count + gl.where(valid, (n_corr + BLOCK - 1) // BLOCK, 0)
    else:
        total = count
    return b, h, hkv, hsel, s, start, end, qb, t_lo, t_hi, count, n_corr, total


@gluon.jit
def _producer(q_desc, k_desc, v_desc, kbar_desc, vbar_desc, q_smem, k_smem, v_smem, q_bar, q_free, k_bars, v_bars,
              empty_bars, item_smem, WORK, INDEX, COUNT, KV_START, KV_END, stride_ib, stride_ih, stride_is,
              stride_cb, stride_ch, n_work, n_bh, num_q_heads, n_slots, q_len, k_len, GROUP: gl.constexpr,
              SEL_GROUP: gl.constexpr, HAS_RANGES: gl.constexpr, MEAN_CORRECTION: gl.constexpr, HEAD_DIM: gl.constexpr,
              STAGES: gl.constexpr, BLOCK: gl.constexpr, HALF: gl.constexpr):
    """Per work item (the program's id, then one from the work counter ``WORK`` after each): the item's id for
    the consumers and its two query halves (once the consumers are done with the last item's), then ring
    entry ``i``: the K and V tiles of listed block ``index[i]`` for ``i < count``, then the mean-key /
    mean-value chunk ``i - count`` (rows ``(i - count) * BLOCK + [0, BLOCK)``). The ring runs on across items;
    at the end, an id past the list and the query barrier without queries."""
    entry = 0
    n_done = 0
    w = gl.program_id(0)  # the first item; the next ones come from the work counter
    while w < n_work:
        b, h, hkv, hsel, s, start, end, qb, t_lo, t_hi, count, n_corr, total = _tile(
            w, n_bh, num_q_heads, n_slots, q_len, k_len, COUNT, stride_cb, stride_ch, KV_START, KV_END,
            GROUP, SEL_GROUP, HAS_RANGES, MEAN_CORRECTION, BLOCK)
        if HAS_RANGES:  # this program's own descriptors start at its batch row's valid keys
            kb = 0
        else:
            kb = b
        q_row = qb * BLOCK + start - (k_len - q_len)  # rows out of range (even negative) read as 0
        mbarrier.wait(q_free, (n_done & 1) ^ 1)  # (a fresh barrier passes phase 1)
        _post_item(item_smem, w)
        mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
        tma_load(q_desc, [b, q_row, h, 0], q_bar, q_smem.index(0).reshape([1, HALF, 1, HEAD_DIM]))
        tma_load(q_desc, [b, q_row + HALF, h, 0], q_bar, q_smem.index(1).reshape([1, HALF, 1, HEAD_DIM]))
        index_base = INDEX + b.to(gl.int64) * stride_ib + hsel * stride_ih + s * stride_is
        for i in range(total):
            e = entry + i
            slot = e % STAGES
            mbarrier.wait(empty_bars.index(slot), ((e // STAGES) & 1) ^ 1)
            k_bar = k_bars.index(slot)
            v_bar = v_bars.index(slot)
            k_dst = k_smem.index(slot).reshape([1, BLOCK, 1, HEAD_DIM])
            v_dst = v_smem.index(slot).reshape([1, BLOCK, 1, HEAD_DIM])
            mbarrier.expect(k_bar, k_desc.block_type.nbytes)
            mbarrier.expect(v_bar, v_desc.block_type.nbytes)
            if i < count:
                row = gl.load(index_base + i) * BLOCK
                tma_load(k_desc, [kb, row, hkv, 0], k_bar, k_dst)
                tma_load(v_desc, [kb, row, hkv, 0], v_bar, v_dst)
            else:
                row = (i - count) * BLOCK
                tma_load(kbar_desc, [kb, row, hkv, 0], k_bar, k_dst)
                tma_load(vbar_desc, [kb, row, hkv, 0], v_bar, v_dst)
        entry += total
        n_done += 1
        w = gl.atomic_add(WORK, 1) + gl.num_programs(0)
    mbarrier.wait(q_free, (n_done & 1) ^ 1)
    _post_item(item_smem, w)  # (>= n_work: no more items)
    mbarrier.arrive(q_bar, count=1)


@gluon.jit
def _post_item(item_smem, w):
    """Publish the producer's next work item to the consumers (read after the query barrier completes)."""
    item_smem.store(gl.full([1], 0, gl.int32, layout=gl.BlockedLayout([1], [32], [1], [0])) + w)
    thread_barrier()  # (every lane's store before the barrier's arrive)


@gluon.jit
def _read_item(item_smem):
    return gl.max(item_smem.load(gl.BlockedLayout([1], [32], [4], [0])), axis=0)


@gluon.jit
def _mask_last(qk, i, count, index_base, t, cols, n, BLOCK: gl.constexpr):
    """The last listed block alone may straddle the diagonal or the end of the valid keys: mask it there."""
    if i == count - 1:
        u = gl.load(index_base + i) * BLOCK + cols
        qk = gl.where((u[None, :] <= t[:, None]) & (u < n)[None, :], qk, float("-inf"))
    return qk


@gluon.jit
def _listed_step(qk, m_i, l_i, i, count, index_base, t, cols, n, scale_log2, BLOCK: gl.constexpr):
    """Online softmax step over listed block ``i``'s keys (base 2). The scale enters once per element: the
    row maximum is taken on the raw scores (the scale is > 0); a row with nothing attended yet pivots on 0
    (0 out, not NaN)."""
    qk = _mask_last(qk, i, count, index_base, t, cols, n, BLOCK)
    m_new = gl.maximum(m_i, gl.max(qk, axis=1) * scale_log2)
    m_new = gl.where(m_new == float("-inf"), 0.0, m_new)
    probs = gl.exp2(qk * scale_log2 - m_new[:, None])
    alpha = gl.exp2(m_i - m_new)
    return m_new, l_i * alpha + gl.sum(probs, axis=1), probs, alpha


@gluon.jit
def _chunk_flags(flag_base, i, count, cols, n_corr, BLOCK: gl.constexpr):
    """Mean-key chunk ``i - count``'s kept flags: 1 for a listed id, or one at or past ``n_corr``."""
    j = (i - count) * BLOCK + cols
    return gl.load(flag_base + j, mask=j < n_corr, other=1)


@gluon.jit
def _stand_in_step(qk, m_i, l_i, i, count, flags, cols, n, scale_log2, BLOCK: gl.constexpr,
                   HAS_RANGES: gl.constexpr):
    """Online softmax step over the stand-in columns of mean-key chunk ``i - count``: logit
    ``scale q . kbar_j + log2 n_j`` for a skipped ``j < n_corr``, ``-inf`` (no column) for a listed or later one
    (``flags``: :func:`_chunk_flags`)."""
    listed = flags != 0
    if HAS_RANGES:
        # only query rows past the end of the valid keys (padding on the right) see the keys' last block
        # whole: then it is corrected, with its true length
        j = (i - count) * BLOCK + cols
        last = gl.maximum(n - 1, 0) // BLOCK
        log2_n = gl.where(j == last, gl.log2((n - last * BLOCK).to(gl.float32)), 7.0)  # log2(BLOCK) = 7
        bias = gl.where(listed, float("-inf"), log2_n)
    else:
        bias = gl.where(listed, float("-inf"), 7.0)  # (j < n_corr = qb: never the last, partial, block)
    logit = qk * scale_log2 + bias[None, :]
    m_new = gl.maximum(m_i, gl.max(logit, axis=1))
    pivot = gl.where(m_new == float("-inf"), 0.0, m_new)
    probs = gl.exp2(logit - pivot[:, None])
    alpha = gl.exp2(m_i - pivot)
    return pivot, l_i * alpha + gl.sum(probs, axis=1), probs, alpha


@gluon.jit
def _entry(i, entry, q, k_smem, v_smem, k_bars, v_bars, empty_bars, qk, p, acc, m_i, l_i, count, index_base,
           flag_base, t, cols, n, n_corr, scale_log2, STAND_IN: gl.constexpr, HAS_RANGES: gl.constexpr,
           STAGES: gl.constexpr, BLOCK: gl.constexpr, dtype: gl.constexpr, p_layout: gl.constexpr,
           row_o: gl.constexpr):
    """Ring entry ``i >= 1`` of the item (ring position ``entry + i``): its score dot and softmax, with the
    value dot of entry ``i - 1`` beside them; a listed block's (``STAND_IN`` false) or a mean-key chunk's."""
    e = entry + i
    slot = e % STAGES
    prev = (e - 1) % STAGES
    mbarrier.wait(k_bars.index(slot), (e // STAGES) & 1)
    qk_tok = warpgroup_mma(q, k_smem.index(slot).permute((1, 0)), qk, use_acc=False, is_async=True)
    if STAND_IN:
        flags = _chunk_flags(flag_base, i, count, cols, n_corr, BLOCK)  # (in flight with the dot)
    mbarrier.wait(v_bars.index(prev), ((e - 1) // STAGES) & 1)
    acc_tok = warpgroup_mma(p, v_smem.index(prev), acc, is_async=True)
    qk = warpgroup_mma_wait(num_outstanding=1, deps=(qk_tok,))
    if STAND_IN:
        m_i, l_i, probs, alpha = _stand_in_step(qk, m_i, l_i, i, count, flags, cols, n, scale_log2, BLOCK,
                                                HAS_RANGES)
    else:
        m_i, l_i, probs, alpha = _listed_step(qk, m_i, l_i, i, count, index_base, t, cols, n, scale_log2, BLOCK)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc_tok,))
    mbarrier.arrive(empty_bars.index(prev), count=1)  # this warpgroup is done with entry i - 1
    acc = acc * gl.convert_layout(alpha, row_o)[:, None]
    p = gl.convert_layout(probs.to(dtype), p_layout)
    return qk, p, acc, m_i, l_i


@gluon.jit
def _consumer(q_smem, k_smem, v_smem, q_bar, q_free, k_bars, v_bars, empty_bars, item_smem, OUT, INDEX, COUNT, KV_START,
              KV_END, FLAGS, stride_ob, stride_ol, stride_oh, stride_ib, stride_ih, stride_is, stride_cb, stride_ch,
              n_work, n_bh, num_q_heads, n_slots, q_len, k_len, scale_log2, WHICH: gl.constexpr,
              GROUP: gl.constexpr, SEL_GROUP: gl.constexpr, HAS_RANGES: gl.constexpr,
              MEAN_CORRECTION: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, BLOCK: gl.constexpr,
              HALF: gl.constexpr):
    """Per work item: rows ``t0 + WHICH * HALF + [0, HALF)`` (local positions) over its ring entries, then
    their store (while the producer already fills the ring for the next item)."""
    dtype: gl.constexpr = q_smem.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    col_o: gl.constexpr = gl.SliceLayout(0, o_layout)
    q = q_smem.index(WHICH)
    cols = gl.arange(0, BLOCK, layout=gl.SliceLayout(0, s_layout))
    n_keys = (k_len + BLOCK - 1) // BLOCK  # the kept-flag map's row width
    if SEL_GROUP:
        n_sel = num_q_heads // GROUP
    else:
        n_sel = num_q_heads
    entry = 0
    n_done = 0
    mbarrier.wait(q_bar, 0)
    w = _read_item(item_smem)
    while w < n_work:
        b, h, hkv, hsel, s, start, end, qb, t_lo, t_hi, count, n_corr, total = _tile(
            w, n_bh, num_q_heads, n_slots, q_len, k_len, COUNT, stride_cb, stride_ch, KV_START, KV_END,
            GROUP, SEL_GROUP, HAS_RANGES, MEAN_CORRECTION, BLOCK)
        n = end - start
        t0 = qb * BLOCK + WHICH * HALF
        index_base = INDEX + b.to(gl.int64) * stride_ib + hsel * stride_ih + s * stride_is
        flag_base = flag_row(FLAGS, b, hsel, s, n_sel, n_slots, n_keys)
        t = t0 + gl.arange(0, HALF, layout=gl.SliceLayout(1, s_layout))
        m_i = gl.full([HALF], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([HALF], gl.float32, layout=gl.SliceLayout(1, s_layout))
        acc = gl.zeros([HALF, HEAD_DIM], gl.float32, layout=o_layout)
        qk = gl.zeros([HALF, BLOCK], gl.float32, layout=s_layout)
        if total > 0:
            mbarrier.wait(k_bars.index(entry % STAGES), (entry // STAGES) & 1)
            qk = warpgroup_mma(q, k_smem.index(entry % STAGES).permute((1, 0)), qk, use_acc=False)
            if count > 0:
                m_i, l_i, probs, alpha = _listed_step(qk, m_i, l_i, 0, count, index_base, t, cols, n, scale_log2,
                                                      BLOCK)
            else:  # (an empty list: with the correction, the stand-ins only)
                flags = _chunk_flags(flag_base, 0, count, cols, n_corr, BLOCK)
                m_i, l_i, probs, alpha = _stand_in_step(qk, m_i, l_i, 0, count, flags, cols, n, scale_log2, BLOCK,
                                                        HAS_RANGES)
            p = gl.convert_layout(probs.to(dtype), p_layout)
            # the listed blocks, then the mean-key chunks: two loops, so that neither branches per entry
            for i in range(1, count):
                qk, p, acc, m_i, l_i = _entry(i, entry, q, k_smem, v_smem, k_bars, v_bars, empty_bars, qk, p, acc,
                                              m_i, l_i, count, index_base, flag_base, t, cols, n, n_corr,
                                              scale_log2, False, HAS_RANGES, STAGES, BLOCK, dtype, p_layout, row_o)
            if MEAN_CORRECTION:
                for i in range(gl.maximum(count, 1), total):
                    qk, p, acc, m_i, l_i = _entry(i, entry, q, k_smem, v_smem, k_bars, v_bars, empty_bars, qk, p,
                                                  acc, m_i, l_i, count, index_base, flag_base, t, cols, n, n_corr,
                                                  scale_log2, True, HAS_RANGES, STAGES, BLOCK, dtype, p_layout,
                                                  row_o)
            mbarrier.arrive(q_free, count=1)  # every score dot of the item is done: the next queries may come
            last = (entry + total - 1) % STAGES
            mbarrier.wait(v_bars.index(last), ((entry + total - 1) // STAGES) & 1)
            acc = warpgroup_mma(p, v_smem.index(last), acc)
            mbarrier.arrive(empty_bars.index(last), count=1)
        else:
            mbarrier.arrive(q_free, count=1)
        l_o = gl.convert_layout(l_i, row_o)
        out = acc / gl.where(l_o > 0, l_o, 1.0)[:, None]
        rows = t0 + gl.arange(0, HALF, layout=row_o)
        d = gl.arange(0, HEAD_DIM, layout=col_o)
        out_base = OUT + b.to(gl.int64) * stride_ob + h * stride_oh
        ptrs = out_base + (rows + start - (k_len - q_len)).to(gl.int64)[:, None] * stride_ol + d[None, :]
        gl.store(ptrs, out.to(dtype), mask=((rows >= t_lo) & (rows < t_hi))[:, None])
        entry += total
        n_done += 1
        mbarrier.wait(q_bar, n_done & 1)  # the next item's id (and queries), or the end
        w = _read_item(item_smem)


@gluon.jit(do_not_specialize=["q_len", "k_len", "n_slots", "n_work", "n_means", "batch"])
def _sparse_attention_sm90_kernel(
    Q, K, V, OUT, INDEX, COUNT, KV_START, KV_END, KBAR, VBAR, FLAGS, WORK,
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    stride_ob, stride_ol, stride_oh,
    stride_ib, stride_ih, stride_is,
    stride_cb, stride_ch,
    stride_mb, stride_mj, stride_mh,
    q_len, k_len, batch, num_q_heads, n_slots, n_work, n_means, scale_log2,
    GROUP: gl.constexpr, SEL_GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, HAS_RANGES: gl.constexpr,
    MEAN_CORRECTION: gl.constexpr, STAGES: gl.constexpr, Q_LAYOUT: gl.constexpr, TILE_LAYOUT: gl.constexpr,
    Q_BOX_LAYOUT: gl.constexpr, TILE_BOX_LAYOUT: gl.constexpr, num_warps: gl.constexpr,
):
    BLOCK: gl.constexpr = 128
    HALF: gl.constexpr = 64
    n_bh = batch * num_q_heads
    num_kv_heads = num_q_heads // GROUP
    dtype: gl.constexpr = Q.dtype.element_ty
    # descriptors over whole [B, L, H, D] tensors, made once per program; boxes of one head's rows
    q_desc = tma.make_tensor_descriptor(Q, [batch, q_len, num_q_heads, HEAD_DIM], [stride_qb, stride_ql, stride_qh, 1],
                                        [1, HALF, 1, HEAD_DIM], Q_BOX_LAYOUT)
    if HAS_RANGES:
        # one work item per program (the grid is the work list): its K, V and means are described from its
        # batch row's valid keys on, so that keys past their end read as 0 like those past the tensor's
        _, b, _ = _item(gl.program_id(0), n_slots, num_q_heads)
        start, end = valid_range(KV_START, KV_END, b, k_len, HAS_RANGES)
        n = end - start
        n_rows = gl.maximum(n, 1)  # (a descriptor of an empty range; nothing is loaded through it then)
        k_desc = tma.make_tensor_descriptor(K + b.to(gl.int64) * stride_kb + start.to(gl.int64) * stride_kl,
                                            [1, n_rows, num_kv_heads, HEAD_DIM], [stride_kb, stride_kl, stride_kh, 1],
                                            [1, BLOCK, 1, HEAD_DIM], TILE_BOX_LAYOUT)
        v_desc = tma.make_tensor_descriptor(V + b.to(gl.int64) * stride_vb + start.to(gl.int64) * stride_vl,
                                            [1, n_rows, num_kv_heads, HEAD_DIM], [stride_vb, stride_vl, stride_vh, 1],
                                            [1, BLOCK, 1, HEAD_DIM], TILE_BOX_LAYOUT)
        means_base = b.to(gl.int64) * stride_mb
        mean_rows = gl.maximum((n + BLOCK - 1) // BLOCK, 1)
        mean_batch = 1
    else:
        k_desc = tma.make_tensor_descriptor(K, [batch, k_len, num_kv_heads, HEAD_DIM],
                                            [stride_kb, stride_kl, stride_kh, 1], [1, BLOCK, 1, HEAD_DIM],
                                            TILE_BOX_LAYOUT)
        v_desc = tma.make_tensor_descriptor(V, [batch, k_len, num_kv_heads, HEAD_DIM],
                                            [stride_vb, stride_vl, stride_vh, 1], [1, BLOCK, 1, HEAD_DIM],
                                            TILE_BOX_LAYOUT)
        means_base = 0
        mean_rows = n_means
        mean_batch = batch
    if MEAN_CORRECTION:
        kbar_desc = tma.make_tensor_descriptor(KBAR + means_base, [mean_batch, mean_rows, num_kv_heads, HEAD_DIM],
                                               [stride_mb, stride_mj, stride_mh, 1], [1, BLOCK, 1, HEAD_DIM],
                                               TILE_BOX_LAYOUT)
        vbar_desc = tma.make_tensor_descriptor(VBAR + means_base, [mean_batch, mean_rows, num_kv_heads, HEAD_DIM],
                                               [stride_mb, stride_mj, stride_mh, 1], [1, BLOCK, 1, HEAD_DIM],
                                               TILE_BOX_LAYOUT)
    else:
        kbar_desc = k_desc
        vbar_desc = v_desc

    q_smem = gl.allocate_shared_memory(dtype, [2, HALF, HEAD_DIM], Q_LAYOUT)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK, HEAD_DIM], TILE_LAYOUT)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK, HEAD_DIM], TILE_LAYOUT)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_free = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    item_smem = gl.allocate_shared_memory(gl.int32, [1], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
    mbarrier.init(q_bar, count=1)
    mbarrier.init(q_free, count=2)  # both consumers release the queries
    for st in gl.static_range(STAGES):
        mbarrier.init(k_bars.index(st), count=1)
        mbarrier.init(v_bars.index(st), count=1)
        mbarrier.init(empty_bars.index(st), count=2)  # both consumers release a slot
    gl.warp_specialize([
        (_consumer, (q_smem, k_smem, v_smem, q_bar, q_free, k_bars, v_bars, empty_bars, item_smem, OUT, INDEX, COUNT,
                     KV_START, KV_END, FLAGS, stride_ob, stride_ol, stride_oh, stride_ib, stride_ih, stride_is,
                     stride_cb, stride_ch, n_work, n_bh, num_q_heads, n_slots, q_len, k_len, scale_log2, 0, GROUP,
                     SEL_GROUP, HAS_RANGES, MEAN_CORRECTION, HEAD_DIM, STAGES, BLOCK, HALF)),
        (_consumer, (q_smem, k_smem, v_smem, q_bar, q_free, k_bars, v_bars, empty_bars, item_smem, OUT, INDEX, COUNT,
                     KV_START, KV_END, FLAGS, stride_ob, stride_ol, stride_oh, stride_ib, stride_ih, stride_is,
                     stride_cb, stride_ch, n_work, n_bh, num_q_heads, n_slots, q_len, k_len, scale_log2, 1, GROUP,
                     SEL_GROUP, HAS_RANGES, MEAN_CORRECTION, HEAD_DIM, STAGES, BLOCK, HALF)),
        (_producer, (q_desc, k_desc, v_desc, kbar_desc, vbar_desc, q_smem, k_smem, v_smem, q_bar, q_free, k_bars,
                     v_bars, empty_bars, item_smem, WORK, INDEX, COUNT, KV_START, KV_END, stride_ib, stride_ih,
                     stride_is, stride_cb, stride_ch, n_work, n_bh, num_q_heads, n_slots, q_len, k_len, GROUP,
                     SEL_GROUP, HAS_RANGES, MEAN_CORRECTION, HEAD_DIM, STAGES, BLOCK, HALF)),
    ], [4, 1], [240, 24])
    mbarrier.invalidate(q_bar)
    mbarrier.invalidate(q_free)
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
    """Shared-memory layouts of a query half and of a K/V tile, 2-D (the dots) and as the copy engine's
    ``[1, rows, 1, D]`` boxes of a ``[B, L, H, D]`` tensor (the same bytes; cached: ~7 us of host time each)."""
    gdt = gl.bfloat16 if bf16 else gl.float16
    return tuple(gl.NVMMASharedLayout.get_default_for(shape, gdt)
                 for shape in ([HALF, dim], [BLOCK, dim], [1, HALF, 1, dim], [1, BLOCK, 1, dim]))


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":  # (benchmarks/sm90_resources.py compiles the launch from CPU tensors)
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def launch(q, k, v, out, block_index, block_count, kv_start, kv_end, kbar, vbar, flags, scale_log2,
           mean_correction: bool, stages: int = STAGES, programs: int | None = None) -> None:
    """One launch over every (batch, query head, slot) work item (the caller validated the arguments and set
    the TMA allocator). ``programs`` (default: one per SM) take items in order (head after head, each head's
    longest rows first): its own first, then the next one left on the work counter each time one is done, so
    that the next item's queries and keys load while the last one's rows are stored; with padding ranges
    (whose key descriptors are per batch row) there is one program per item."""
    batch, q_len, hq, dim = q.shape
    k_len, hkv = k.shape[1], k.shape[2]
    n_slots = block_count.shape[-1]
    has_ranges = kv_start is not None
    n_work = n_slots * batch * hq
    n_programs = n_work if has_ranges else min(n_work, max(1, programs or _sm_count(q.device)))
    q_layout, tile_layout, q_box, tile_box = _smem_layouts(dim, q.dtype == torch.bfloat16)
    mean_strides = kbar.stride()[:3] if mean_correction else (0, 0, 0)
    _sparse_attention_sm90_kernel[(n_programs,)](
        q, k, v, out, block_index, block_count,
        kv_start if has_ranges else block_count, kv_end if has_ranges else block_count,
        kbar if mean_correction else q, vbar if mean_correction else q, flags,
        torch.zeros(1, dtype=torch.int32, device=q.device),  # the work counter (items past the first per program)
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        block_index.stride(0), block_index.stride(1), block_index.stride(2),
        block_count.stride(0), block_count.stride(1),
        *mean_strides,
        q_len, k_len, batch, hq, n_slots, n_work, kbar.shape[1] if mean_correction else 1, scale_log2,
        GROUP=hq // hkv, SEL_GROUP=block_index.shape[1] != hq, HEAD_DIM=dim, HAS_RANGES=has_ranges,
        MEAN_CORRECTION=mean_correction, STAGES=stages,
        Q_LAYOUT=q_layout, TILE_LAYOUT=tile_layout, Q_BOX_LAYOUT=q_box, TILE_BOX_LAYOUT=tile_box,
        # 3 warpgroups (2 consumers, the producer's warp rounded up) x 168 registers fit one SM's 64K; the
        # producer gives back down to 24 so each consumer gets 240
        num_warps=4, maxnreg=168,
    )
