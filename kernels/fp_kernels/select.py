"""Stage 2: fused block scoring, max-relative thresholding and in-kernel compaction.

One program per (batch, selection head, query-block slot). It computes the slot's block scores
``T_j = logsumexp_r(scale * q_r . kbar_j)`` for every causally visible key block ``j`` with an
online (max-shifted) reduction over the query rows, keeps the whole score row in registers (a
``[N_CHUNKS, CHUNK]`` tile: the row length is bucketed to a power of two, so a new prompt length
only recompiles when it crosses a bucket), thresholds it against its own maximum and writes the
kept ids in ascending order plus their count. Nothing quadratic reaches global memory, there is no
sort and no host sync.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .geometry import num_key_blocks, num_query_slots
from .pool import LENGTH_ARGS, launch_device, valid_range
from .rules import BlockRules

_CHUNK = 64  # key blocks scored per dot (H200, D=64/128/256: benchmarks/routes_operator.py --part select)
_MIN_ROW = 256  # the in-register score row is padded to at least this many blocks


def launch_config(dim: int, device: torch.device) -> dict:
    """Pipelining stages and register cap of the scoring pass by head dim (CUDA only). Its loop waits on
    each chunk's dot, so programs per SM, not prefetch depth, hide the latency: one stage and a register
    cap let 4 (D=128, cap 128) or 3 (D=64, cap 168) programs share an SM instead of 2 (H100, D=128:
    1.35x at 32K, 1.42x at 128K; benchmarks/routes_operator.py --part select). ptxas spills nothing at
    these caps (benchmarks/sm90_resources.py). D=256 keeps Triton's defaults (the caps gained nothing
    measurable there)."""
    if device.type != "cuda" or dim > 128:
        return {}
    return {"num_stages": 1, "maxnreg": 168 if dim <= 64 else 128}


@triton.jit
def slot_rows(q_len, k_len, start, end, s, BLOCK_SIZE: tl.constexpr):
    """Local query block, row range ``[t_lo, t_hi)`` (local positions) and visible blocks of slot ``s``."""
    n = end - start
    nkb = (n + BLOCK_SIZE - 1) // BLOCK_SIZE
    t_first = tl.maximum(k_len - q_len - start, 0)
    qb = t_first // BLOCK_SIZE + s
    t_lo = tl.maximum(qb * BLOCK_SIZE, t_first)
    t_hi = tl.minimum((qb + 1) * BLOCK_SIZE, k_len - start)
    n_vis = tl.minimum(qb, nkb - 1) + 1
    valid = (t_lo < t_hi) & (n > 0)
    return qb, t_lo, t_hi, n_vis, nkb, valid


@triton.jit
def flag_row(FLAGS, b, h, s, n_heads, n_slots, width):
    """Row ``(b, h, s)`` of a contiguous ``[B, n_heads, n_slots, width]`` per-slot map (the kept-flag map of
    :func:`fp_kernels.sparse_attention.kept_flags`; both sparse kernels read it)."""
    return FLAGS + ((b * n_heads + h) * n_slots + s).to(tl.int64) * width


@triton.jit
def _load_rows(q_base, stride_ql, row_base, t, row_ok, d, HEAD_DIM: tl.constexpr):
    return tl.load(q_base + (t + row_base).to(tl.int64)[:, None] * stride_ql + d[None, :],
                   mask=row_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)


@triton.jit
def _score_chunk(
    q_base, stride_ql, kbar_base, stride_kj, row_base, t_lo, t_hi, qb, n_vis, n, scale_log2, c, q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, ROWS: tl.constexpr,
    CHUNK: tl.constexpr, MASKED: tl.constexpr,
):
    """Scores (log2 units) of key blocks ``c * CHUNK + [0, CHUNK)``, ``-inf`` past ``n_vis``.

    Without ``MASKED`` every row of the slot is valid and sees every block of the chunk whole (all of
    them lie before the query block), so the raw dots need no mask: the row maximum is taken on
    them and the scale enters once, in ``exp2(s * scale - m * scale)`` (one FMA per element; the
    scale is positive, so it commutes with the maximum)."""
    d = tl.arange(0, BLOCK_D)
    j = c * CHUNK + tl.arange(0, CHUNK)
    kbar = tl.load(kbar_base + j[:, None] * stride_kj + d[None, :],
                   mask=(j < n_vis)[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
    m = tl.full([CHUNK], float("-inf"), tl.float32)
    acc = tl.zeros([CHUNK], tl.float32)
    for r0 in range(0, BLOCK_SIZE, ROWS):
        t = qb * BLOCK_SIZE + r0 + tl.arange(0, ROWS)
        row_ok = (t >= t_lo) & (t < t_hi)
        if BLOCK_SIZE == ROWS:
            q_rows = q
        else:
            q_rows = _load_rows(q_base, stride_ql, row_base, t, row_ok, d, HEAD_DIM)
        # blocks x rows: the reduction over rows runs along the dot's N axis, inside each warp
        # (rows x blocks reduced across warps through shared memory on every chunk, 1.3-1.7x slower)
        s = tl.dot(kbar.to(q_rows.dtype), tl.trans(q_rows))
        if MASKED:
            # a row counts towards block j only if it sees all of j (row >= the block's last key)
            last_key = tl.minimum((j + 1) * BLOCK_SIZE, n) - 1
            s = tl.where(row_ok[None, :] & (t[None, :] >= last_key[:, None]), s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        # a block no row sees whole (past the diagonal) stays at -inf: pivot 0, sum 0
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new) * scale_log2
        acc = acc * tl.exp2(m * scale_log2 - m_safe) + tl.sum(tl.exp2(s * scale_log2 - m_safe[:, None]), axis=1)
        m = m_new
    return tl.where(j < n_vis, m * scale_log2 + tl.log2(acc), float("-inf"))


@triton.jit
def _score_row(
    q_base, stride_ql, kbar_base, stride_kj,
    row_base, t_lo, t_hi, qb, n_vis, n, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, ROWS: tl.constexpr,
    CHUNK: tl.constexpr, N_CHUNKS: tl.constexpr,
):
    """Scores (log2 units) of all visible blocks as a ``[N_CHUNKS, CHUNK]`` tile, ``-inf`` elsewhere.

    Chunks of blocks that lie wholly before the query block, in a slot whose rows are all valid,
    run without masks; the rest (the diagonal's chunk, partial slots) with them."""
    d = tl.arange(0, BLOCK_D)
    chunk_ids = tl.arange(0, N_CHUNKS)
    scores = tl.full([N_CHUNKS, CHUNK], float("-inf"), tl.float32)
    t = qb * BLOCK_SIZE + tl.arange(0, ROWS)
    if BLOCK_SIZE == ROWS:  # one row tile: load the queries once for all chunks
        q = _load_rows(q_base, stride_ql, row_base, t, (t >= t_lo) & (t < t_hi), d, HEAD_DIM)
    else:  # each chunk loads its row tiles
        q = None
    full_rows = (t_lo == qb * BLOCK_SIZE) & (t_hi == (qb + 1) * BLOCK_SIZE)
    n_plain = tl.where(full_rows, tl.minimum(qb, n_vis) // CHUNK, 0)
    for c in range(0, n_plain):
        t_chunk = _score_chunk(q_base, stride_ql, kbar_base, stride_kj, row_base, t_lo, t_hi, qb, n_vis, n,
                               scale_log2, c, q, HEAD_DIM, BLOCK_D, BLOCK_SIZE, ROWS, CHUNK, False)
        scores = tl.where(chunk_ids[:, None] == c, t_chunk[None, :], scores)
    for c in range(n_plain, tl.cdiv(n_vis, CHUNK)):
        t_chunk = _score_chunk(q_base, stride_ql, kbar_base, stride_kj, row_base, t_lo, t_hi, qb, n_vis, n,
                               scale_log2, c, q, HEAD_DIM, BLOCK_D, BLOCK_SIZE, ROWS, CHUNK, True)
        scores = tl.where(chunk_ids[:, None] == c, t_chunk[None, :], scores)
    return scores


@triton.jit(do_not_specialize=LENGTH_ARGS)
def _select_blocks_kernel(
    Q, KBAR, KV_START, KV_END, INDEX, COUNT,
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kj, stride_kh,
    stride_ib, stride_ih, stride_is,
    stride_cb, stride_ch,
    q_len, k_len, num_sel_heads, n_slots,
    scale_log2, log2_alpha,
    sink_blocks, window_blocks, last_dense_blocks, min_budget,
    GROUP: tl.constexpr, SEL_GROUP: tl.constexpr, SCORE: tl.constexpr, HAS_BUDGET: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, ROWS: tl.constexpr,
    CHUNK: tl.constexpr, N_CHUNKS: tl.constexpr, HAS_RANGES: tl.constexpr,
):
    s = n_slots - 1 - tl.program_id(0)  # long rows first
    bh = tl.program_id(1)
    b = bh // num_sel_heads
    hsel = bh % num_sel_heads
    start, end = valid_range(KV_START, KV_END, b, k_len, HAS_RANGES)
    qb, t_lo, t_hi, n_vis, nkb, valid = slot_rows(q_len, k_len, start, end, s, BLOCK_SIZE)
    n_vis = tl.where(valid, n_vis, 0)
    index_base = INDEX + b.to(tl.int64) * stride_ib + hsel * stride_ih + s * stride_is
    count_ptr = COUNT + b * stride_cb + hsel * stride_ch + s
    dense = (qb >= nkb - last_dense_blocks) | (n_vis <= sink_blocks + window_blocks)
    if not SCORE:
        dense = n_vis >= 0
    cols = tl.arange(0, CHUNK)
    if dense:
        for c in range(0, tl.cdiv(n_vis, CHUNK)):
            j = c * CHUNK + cols
            tl.store(index_base + j, j, mask=j < n_vis)
        tl.store(count_ptr, n_vis)
    else:
        j2 = tl.arange(0, N_CHUNKS)[:, None] * CHUNK + cols[None, :]
        visible = j2 < n_vis
        keep = visible & ((j2 < sink_blocks) | (j2 >= n_vis - window_blocks))
        row_base = start - (k_len - q_len)  # local position t is query row t + row_base
        heads = GROUP if SEL_GROUP else 1
        for g in range(0, heads):
            if SEL_GROUP:
                h = hsel * GROUP + g
            else:
                h = hsel + g
            hkv = h // GROUP
            scores = _score_row(
                Q + b.to(tl.int64) * stride_qb + h * stride_qh, stride_ql,
                KBAR + b.to(tl.int64) * stride_kb + hkv * stride_kh, stride_kj,
                row_base, t_lo, t_hi, qb, n_vis, end - start, scale_log2,
                HEAD_DIM, BLOCK_D, BLOCK_SIZE, ROWS, CHUNK, N_CHUNKS,
            )
            keep |= scores >= tl.max(tl.max(scores, axis=1), axis=0) + log2_alpha
            if HAS_BUDGET:
                # the min_budget-th largest visible score (ties included): the largest t with
                # count(key >= t) >= min_budget, by bisection over the scores' order-preserving int32
                # keys (one count per step, 32 steps whatever min_budget is); fewer visible blocks
                # than min_budget keep them all
                bits = scores.to(tl.int32, bitcast=True)
                key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
                lo = tl.full([], -2147483648, tl.int64)
                hi = tl.max(tl.max(tl.where(visible, key, -2147483648), axis=1), axis=0)
                for _ in range(0, 32):
                    mid = lo + (hi - lo + 1) // 2
                    n_ge = tl.sum(tl.sum(((key >= mid) & visible).to(tl.int32), axis=1), axis=0)
                    ok = n_ge >= min_budget
                    lo = tl.where(ok, mid, lo)
                    hi = tl.where(ok, hi, mid - 1)
                keep |= key >= lo
            keep &= visible
        # compaction: a prefix sum over the flattened row (ids in order) gives each kept id its place;
        # the row holds >= 256 entries so the scan spans every thread (smaller scans hit a Triton
        # lowering assertion on sm_90)
        kept = tl.reshape(keep.to(tl.int32), [N_CHUNKS * CHUNK])
        ids = tl.arange(0, N_CHUNKS * CHUNK)
        pos = tl.cumsum(kept, axis=0) - 1
        tl.store(index_base + pos, ids, mask=kept != 0)
        tl.store(count_ptr, tl.sum(kept, axis=0))


def select_blocks(
    q: torch.Tensor,
    kbar: torch.Tensor | None,
    k_len: int,
    rules: BlockRules,
    scale: float | None = None,
    kv_start: torch.Tensor | None = None,
    kv_end: torch.Tensor | None = None,
    num_kv_heads: int | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score and threshold key blocks by ``rules`` (:class:`BlockRules`; ``mean_correction`` is not
    read here); write compact ascending lists (Triton).

    ``q [B, Lq, Hq, D]``; ``kbar [B, nkb, Hkv, D]`` from :func:`pool_keys` (may be None when
    ``alpha == 0`` and ``min_budget == 0``: nothing is scored; then ``num_kv_heads`` gives ``Hkv``).
    ``config`` overrides ``CHUNK`` (key blocks per dot), ``ROWS`` (query rows per dot: fewer than the block
    reloads them for every chunk; default 128, 64 for D > 128), ``num_warps``, ``num_stages`` and ``maxnreg``
    for benchmarking; none of them changes the selection. Returns
    ``block_index [B, Hsel, S, nkb]`` int32 (entries past the count are unspecified) and
    ``block_count [B, Hsel, S]`` int32, the same selection as :func:`select_blocks_reference` up to
    float rounding of scores that sit on the threshold.
    """
    alpha, block_size, min_budget, group_select = rules.alpha, rules.block_size, rules.min_budget, rules.group_select
    batch, q_len, hq, dim = q.shape
    if q.stride(-1) != 1:
        q = q.contiguous()
    hkv = kbar.shape[2] if kbar is not None else num_kv_heads
    group = hq // hkv
    hsel = hkv if group_select else hq
    scale = dim**-0.5 if scale is None else scale
    has_ranges = kv_start is not None
    n_slots = num_query_slots(q_len, k_len, block_size, has_ranges)
    nkb = num_key_blocks(k_len, block_size)
    index = torch.empty(batch, hsel, n_slots, nkb, dtype=torch.int32, device=q.device)
    count = torch.empty(batch, hsel, n_slots, dtype=torch.int32, device=q.device)
    if n_slots == 0 or nkb == 0:
        return index, count.zero_()
    score = rules.needs_scores
    if kbar is None:
        if score:
            raise ValueError("kbar is required when alpha > 0 or min_budget > 0")
        kbar = q.new_zeros(1, 1, 1, dim)
    cfg = {"CHUNK": _CHUNK, "num_warps": 4, **launch_config(dim, q.device)}
    cfg.update(config or {})
    chunk = cfg.pop("CHUNK")
    n_chunks = max(triton.next_power_of_2(nkb) // chunk, max(_MIN_ROW // chunk, 1))
    rows = min(block_size, cfg.pop("ROWS", 128 if dim <= 128 else 64))
    if rows < 16 or rows & (rows - 1):
        raise ValueError(f"config ROWS must be a power of two >= 16, got {rows}")
    with launch_device(q):
        _select_blocks_kernel[(n_slots, batch * hsel)](
            q, kbar, kv_start if has_ranges else count, kv_end if has_ranges else count, index, count,
            q.stride(0), q.stride(1), q.stride(2),
            kbar.stride(0), kbar.stride(1), kbar.stride(2),
            index.stride(0), index.stride(1), index.stride(2),
            count.stride(0), count.stride(1),
            q_len, k_len, hsel, n_slots,
            scale * math.log2(math.e), math.log2(alpha) if alpha > 0 else -math.inf,
            rules.sink_blocks, rules.window_blocks, rules.last_dense_blocks, min_budget,
            GROUP=group, SEL_GROUP=group_select, SCORE=score, HAS_BUDGET=min_budget > 0,
            HEAD_DIM=dim, BLOCK_D=triton.next_power_of_2(dim), BLOCK_SIZE=block_size, ROWS=rows,
            CHUNK=chunk, N_CHUNKS=n_chunks, HAS_RANGES=has_ranges,
            **cfg,
        )
    return index, count
