"""Stage 3: index-driven block-sparse causal attention forward.

The Triton kernel below; on sm_90 at D=64 and D=128 :func:`sparse_attention` launches the warp-specialised Gluon
kernel of :mod:`fp_kernels.sparse_attention_sm90` instead (same lists, masks and correction; which one
runs: :func:`kernel_for`).

One program per (batch, query head, query tile). It walks its slot's compact list of key blocks
and jumps straight to each one (FlashAttention-2 online softmax, base-2 exponentials). Only the
last listed block can straddle the diagonal or the end of the valid keys (lists are ascending and
every earlier block lies fully below the diagonal), so the main loop runs without masks and the
last block is done once with them. K/V are indexed per kv head (GQA without repeating K/V).

With ``MEAN_CORRECTION`` the program then walks the complement of its list among the blocks before
its query block (``j < qb``) in chunks of ``CORR_CHUNK`` block ids, and folds one stand-in score
column per skipped block into the same online softmax: logit ``scale * q . kbar_j + log n_j``,
value ``vbar_j`` (``n_j`` the block's valid keys), i.e. ``n_j exp(scale q . kbar_j)`` added to the
denominator and that times ``vbar_j`` to the numerator. The means are pooled in float32 and rounded
once to the input dtype (``kbar`` is the one the selection scores with); like ``K``, ``V`` and ``P``
they enter the dots in that dtype. (Splitting them into two input-dtype halves would double the
correction's dot work for a rounding the reference's low-precision variant already accounts for.)

The correction does ~1/128 of a dense block's work per block id, so its loop is bound by latency,
not by math: it is written for the software pipeliner. Every chunk ``j < qb`` is computed (a chunk
with nothing skipped adds exact zeros, as if skipped), its ``kbar``/``vbar`` rows are loaded with
masks that depend on the loop index only (``CORR_STAGES`` pipelining stages prefetch the next
chunks), and a listed id just masks its logit to ``-inf``. Which ids are listed comes, by default
(``CORR_FLAGS``), from a ``[B, Hsel, S, nkb]`` byte map that one small kernel sets from the lists
before the launch (one load per chunk, off the critical path); otherwise from a walk of the list
whose position depends on the previous chunk (no extra memory, one dependent load per chunk).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import sparse_attention_sm90 as sm90
from .backend import interpreter_enabled
from .geometry import normalize_ranges, num_key_blocks
from .pool import LENGTH_ARGS, launch_device, valid_range
from .select import flag_row, slot_rows


@triton.jit
def _load_tile(desc, ptrs, u0, u, n, d_ok, MASKED: tl.constexpr, USE_TMA: tl.constexpr, EVEN_D: tl.constexpr):
    """One [BLOCK_N, BLOCK_D] K or V tile starting at local key ``u0`` (zeros past ``n`` / ``HEAD_DIM``)."""
    if USE_TMA:
        return desc.load([u0.to(tl.int32), 0])  # the copy engine zero-fills rows past n
    elif MASKED:
        return tl.load(ptrs, mask=(u < n)[:, None] & d_ok[None, :], other=0.0)
    elif EVEN_D:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=d_ok[None, :], other=0.0)


@triton.jit
def _attend_block(acc, m_i, l_i, q, k, v, t, u, n, scale_log2, MASKED: tl.constexpr):
    qk = tl.dot(q, tl.trans(k))
    if MASKED:
        qk = tl.where((u[None, :] <= t[:, None]) & (u < n)[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, axis=1) * scale_log2)
    if MASKED:
        # a row with no valid key keeps a finite pivot, so it yields 0 instead of NaN
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(qk * scale_log2 - m_new[:, None])
    rescale = tl.exp2(m_i - m_new)
    l_i = l_i * rescale + tl.sum(p, axis=1)
    acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def _attend_skipped_means(
    acc, m_i, l_i, q, kbar_head, vbar_head, stride_mj, index_base, flag_base, count, n_corr, n, d, d_ok,
    scale_log2, BLOCK_SIZE: tl.constexpr, EVEN_D: tl.constexpr,
    CORR_CHUNK: tl.constexpr, CORR_STAGES: tl.constexpr, CORR_FLAGS: tl.constexpr,
):
    """Fold a stand-in column for every block ``j < n_corr`` missing from the ascending list
    ``index_base[:count]`` into the online softmax ``(acc, m_i, l_i)``.

    Chunk ``c`` covers ids ``j = c0 + [0, CORR_CHUNK)``. Its mean keys and values are loaded at the top
    of the iteration with masks that depend on ``c0`` only (``j < n_corr``), so the pipeliner can
    fetch chunk ``c + 1`` while chunk ``c`` computes; every chunk runs the same code (no branch on
    the list): a listed id only masks its logit to ``-inf``. Which ids are listed comes either
    (``CORR_FLAGS``) from ``flag_base[j]``, a byte per block set by :func:`_kept_flags_kernel`, or from
    a walk of the list: the entries in the chunk's range are the (at most ``CORR_CHUNK``) entries
    from ``pos`` on, where ``pos`` counts the entries below ``c0``, and one ``[CORR_CHUNK,
    CORR_CHUNK]`` comparison marks them. A chunk with nothing skipped adds exact zeros with a rescale
    of exactly 1, so the result equals skipping it. The means and the probabilities enter the dots
    in the input dtype, as ``K``, ``V`` and ``P`` do in the main loop."""
    cols = tl.arange(0, CORR_CHUNK)
    tile = cols[:, None] * stride_mj + d[None, :]  # int32 offsets inside a chunk; the bases advance
    kbar_ptrs = kbar_head + tile
    vbar_ptrs = vbar_head + tile
    # log2 of a block's valid keys: log2(BLOCK_SIZE), but for the keys' last block (partial)
    last = tl.maximum(n - 1, 0) // BLOCK_SIZE
    log2_last = tl.log2((n - last * BLOCK_SIZE).to(tl.float32))
    log2_full = tl.log2(tl.full([], BLOCK_SIZE, tl.float32))
    pos = tl.zeros([], dtype=tl.int32)
    for c0 in tl.range(0, n_corr, CORR_CHUNK, num_stages=CORR_STAGES):
        j = c0 + cols
        inb = j < n_corr
        if EVEN_D:
            mask = inb[:, None]
        else:
            mask = inb[:, None] & d_ok[None, :]
        kbar = tl.load(kbar_ptrs, mask=mask, other=0.0)
        vbar = tl.load(vbar_ptrs, mask=mask, other=0.0)
        kbar_ptrs += CORR_CHUNK * stride_mj
        vbar_ptrs += CORR_CHUNK * stride_mj
        if CORR_FLAGS:
            listed_here = tl.load(flag_base + j, mask=inb, other=0) != 0
        else:
            at = pos + cols
            listed = tl.load(index_base + at, mask=at < count, other=-1)
            listed_here = tl.sum((listed[None, :] == j[:, None]).to(tl.int32), axis=1) > 0
            pos += tl.sum(((listed >= 0) & (listed < c0 + CORR_CHUNK)).to(tl.int32), axis=0)
        skipped = inb & (listed_here == 0)
        qk = tl.dot(q, tl.trans(kbar.to(q.dtype)))
        # per column: log2 n_j for a skipped block, -inf (no stand-in) otherwise
        bias = tl.where(skipped, tl.where(j == last, log2_last, log2_full), float("-inf"))
        logit = qk * scale_log2 + bias[None, :]
        m_new = tl.maximum(m_i, tl.max(logit, axis=1))
        # a row with no valid key and nothing skipped yet stays at -inf; it pivots on 0 (0 out, not NaN)
        pivot = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(logit - pivot[:, None])
        rescale = tl.exp2(m_i - pivot)
        l_i = l_i * rescale + tl.sum(p, axis=1)
        acc = acc * rescale[:, None] + tl.dot(p.to(q.dtype), vbar.to(q.dtype))
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["n_slots", "width", "stride_ib", "stride_ih", "stride_is", "stride_cb", "stride_ch"])
def _kept_flags_kernel(
    INDEX, COUNT, FLAGS,
    stride_ib, stride_ih, stride_is,
    stride_cb, stride_ch,
    n_heads, n_slots, width, CHUNK: tl.constexpr,
):
    """Flag map row ``(b, h, s)`` gets a 1 at every listed id of slot ``s`` (the map is zeroed before)."""
    s = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    count = tl.load(COUNT + b * stride_cb + h * stride_ch + s)
    index_base = INDEX + b.to(tl.int64) * stride_ib + h * stride_ih + s * stride_is
    flag_base = flag_row(FLAGS, b, h, s, n_heads, n_slots, width)
    cols = tl.arange(0, CHUNK)
    for p0 in range(0, count, CHUNK):
        at = p0 + cols
        ids = tl.load(index_base + at, mask=at < count, other=-1)
        ok = (ids >= 0) & (ids < width)  # (masked lanes read -1)
        tl.store(flag_base + ids, tl.full([CHUNK], 1, tl.int8), mask=ok)


def kept_flags(block_index: torch.Tensor, block_count: torch.Tensor, width: int) -> torch.Tensor:
    """``[B, Hsel, S, width]`` int8, contiguous: 1 where a slot's list holds the block id, else 0
    (Triton). ``width``: the key blocks of the keys, ``ceil(Lk / block_size)`` (every valid id is below)."""
    flags = torch.zeros(*block_count.shape, width, dtype=torch.int8, device=block_index.device)
    batch, hsel, n_slots = block_count.shape
    if flags.numel():
        with launch_device(block_index):
            _kept_flags_kernel[(n_slots, batch * hsel)](
                block_index, block_count, flags,
                block_index.stride(0), block_index.stride(1), block_index.stride(2),
                block_count.stride(0), block_count.stride(1),
                hsel, n_slots, width, CHUNK=128, num_warps=4,
            )
    return flags


@triton.jit(do_not_specialize=LENGTH_ARGS)
def _sparse_attention_kernel(
    Q, K, V, OUT, INDEX, COUNT, KV_START, KV_END, KBAR, VBAR, FLAGS,
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    stride_ob, stride_ol, stride_oh,
    stride_ib, stride_ih, stride_is,
    stride_cb, stride_ch,
    stride_mb, stride_mj, stride_mh,
    q_len, k_len, num_q_heads, n_slots, scale_log2,
    GROUP: tl.constexpr, SEL_GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_RANGES: tl.constexpr,
    USE_TMA: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
    MEAN_CORRECTION: tl.constexpr, CORR_CHUNK: tl.constexpr, CORR_STAGES: tl.constexpr, CORR_FLAGS: tl.constexpr,
):
    TILES_M: tl.constexpr = BLOCK_SIZE // BLOCK_M
    TILES_N: tl.constexpr = BLOCK_SIZE // BLOCK_N
    pid = n_slots * TILES_M - 1 - tl.program_id(0)  # long rows first
    s = pid // TILES_M
    bh = tl.program_id(1)
    b = bh // num_q_heads
    h = bh % num_q_heads
    hkv = h // GROUP
    if SEL_GROUP:
        hsel = hkv
    else:
        hsel = h
    start, end = valid_range(KV_START, KV_END, b, k_len, HAS_RANGES)
    qb, t_lo, t_hi, n_vis, nkb, valid = slot_rows(q_len, k_len, start, end, s, BLOCK_SIZE)
    t = qb * BLOCK_SIZE + (pid % TILES_M) * BLOCK_M + tl.arange(0, BLOCK_M)
    t_hi = tl.where(valid, t_hi, t_lo)  # (a 0-d bool does not broadcast into masks in the interpreter)
    row_ok = (t >= t_lo) & (t < t_hi)
    if tl.max(row_ok.to(tl.int32), axis=0) == 0:
        return
    n = end - start
    row_base = start - (k_len - q_len)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q_ptrs = Q + b.to(tl.int64) * stride_qb + h * stride_qh + (t + row_base).to(tl.int64)[:, None] * stride_ql
    q = tl.load(q_ptrs + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    # per-head bases are scalars; the [BLOCK_N, BLOCK_D] offsets inside a tile are loop-invariant int32
    k_head = K + b.to(tl.int64) * stride_kb + hkv * stride_kh + start.to(tl.int64) * stride_kl
    v_head = V + b.to(tl.int64) * stride_vb + hkv * stride_vh + start.to(tl.int64) * stride_vl
    cols = tl.arange(0, BLOCK_N)
    k_tile = cols[:, None] * stride_kl + d[None, :]
    v_tile = cols[:, None] * stride_vl + d[None, :]
    if USE_TMA:
        k_desc = tl.make_tensor_descriptor(k_head, [n, HEAD_DIM], [stride_kl, 1], [BLOCK_N, BLOCK_D])
        v_desc = tl.make_tensor_descriptor(v_head, [n, HEAD_DIM], [stride_vl, 1], [BLOCK_N, BLOCK_D])
    else:
        k_desc = k_head
        v_desc = v_head
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    index_base = INDEX + b.to(tl.int64) * stride_ib + hsel * stride_ih + s * stride_is
    count = tl.load(COUNT + b * stride_cb + hsel * stride_ch + s)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # every listed block but the last: fully valid and fully below the diagonal
    # the block ids are loaded one step ahead, off the address path of each step's tiles (H200: up to
    # 1.08x at 60-100 % density)
    n_steps = (count - 1) * TILES_N
    kb_next = tl.load(index_base, mask=n_steps > 0, other=0)
    for it in tl.range(0, n_steps, warp_specialize=WARP_SPECIALIZE):
        kb = kb_next
        kb_next = tl.load(index_base + (it + 1) // TILES_N, mask=it + 1 < n_steps, other=0)
        u0 = (kb * BLOCK_SIZE + (it % TILES_N) * BLOCK_N).to(tl.int64)
        u = u0 + cols
        k = _load_tile(k_desc, k_head + u0 * stride_kl + k_tile, u0, u, n, d_ok, False, USE_TMA, EVEN_D)
        v = _load_tile(v_desc, v_head + u0 * stride_vl + v_tile, u0, u, n, d_ok, False, USE_TMA, EVEN_D)
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k, v, t, u, n, scale_log2, False)
    if count > 0:
        kb = tl.load(index_base + count - 1)
        for sub in range(0, TILES_N):
            u0 = (kb * BLOCK_SIZE + sub * BLOCK_N).to(tl.int64)
            u = u0 + cols
            k = _load_tile(k_desc, k_head + u0 * stride_kl + k_tile, u0, u, n, d_ok, True, USE_TMA, EVEN_D)
            v = _load_tile(v_desc, v_head + u0 * stride_vl + v_tile, u0, u, n, d_ok, True, USE_TMA, EVEN_D)
            acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k, v, t, u, n, scale_log2, True)
    if MEAN_CORRECTION:
        # skipped blocks before the query block (j < qb): every row of the slot sees all of them
        mean_off = b.to(tl.int64) * stride_mb + hkv * stride_mh
        # the flag map is [B, Hsel, n_slots, ceil(k_len / BLOCK_SIZE)], contiguous (kept_flags)
        n_sel = num_q_heads
        if SEL_GROUP:
            n_sel = num_q_heads // GROUP
        flag_base = flag_row(FLAGS, b, hsel, s, n_sel, n_slots, (k_len + BLOCK_SIZE - 1) // BLOCK_SIZE)
        acc, m_i, l_i = _attend_skipped_means(
            acc, m_i, l_i, q, KBAR + mean_off, VBAR + mean_off, stride_mj, index_base, flag_base, count,
            tl.minimum(qb, n_vis), n, d, d_ok, scale_log2, BLOCK_SIZE, EVEN_D, CORR_CHUNK, CORR_STAGES, CORR_FLAGS,
        )
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = OUT + b.to(tl.int64) * stride_ob + h * stride_oh + (t + row_base).to(tl.int64)[:, None] * stride_ol
    tl.store(o_ptrs + d[None, :], out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@functools.cache
def compute_capability_major(device_index: int) -> int:
    """The CUDA device's major compute capability (cached: the query costs ~8 µs of host time)."""
    return torch.cuda.get_device_capability(device_index)[0]


# The mean-correction loop's knobs (``config`` keys of :func:`sparse_attention`, defaults per shape class
# in ``tile_config``; benchmarks/sweep_tiles.py --mean-correction): block ids per stand-in chunk
# (columns of its two dots), software-pipelining stages of its loop, and how it learns which ids are
# listed (a kept-flag map built by one small kernel, or a walk of the list). Without the correction
# they are fixed, so the plain kernel compiles once whatever the config.
CORR_KEYS = ("CORR_CHUNK", "CORR_STAGES", "CORR_FLAGS")
GLUON_KEYS = ("GLUON", "GLUON_STAGES", "GLUON_PROGRAMS")  # the sm_90 kernel's (kernel_for)
_PLAIN_CORR = {"CORR_CHUNK": 16, "CORR_STAGES": 1, "CORR_FLAGS": False}


@functools.cache
def _tile_config_cached(block_size: int, dim: int, device_index: int | None, interpret: bool) -> tuple:
    if interpret:
        cfg = {"BLOCK_M": min(block_size, 64), "BLOCK_N": min(block_size, 64), "num_warps": 4, "num_stages": 1,
               "CORR_CHUNK": 64, "CORR_STAGES": 1, "CORR_FLAGS": True, "GLUON": False}
        return tuple(cfg.items())
    hopper = compute_capability_major(device_index) >= 9
    if dim <= 64:
        cfg = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    elif dim <= 128:
        cfg = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3, "WARP_SPECIALIZE": hopper}
    elif hopper:
        cfg = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}
    else:
        cfg = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
    cfg["BLOCK_M"] = min(cfg["BLOCK_M"], block_size)
    cfg["BLOCK_N"] = min(cfg["BLOCK_N"], block_size)
    # the correction's pipelined mean loads take (stages - 1) x 2 x chunk x D input-dtype elements of shared
    # memory beside the main loop's: D=256 halves the chunk (64 overflowed the H200's 227 KiB); GPUs
    # before Hopper load them unpipelined (less shared memory there; not measured)
    cfg.update(CORR_CHUNK=64 if dim <= 128 else 32, CORR_STAGES=3 if hopper else 1, CORR_FLAGS=True)
    # sm_90 exactly (its wgmma; not Blackwell's), D=64 and D=128: the warp-specialised Gluon kernel
    # (sparse_attention_sm90; H100, persistent: 1.22-1.30x the Triton kernel at D=128, 6-100 % density, 8K-128K;
    # 0.95-1.21x at D=64, its 0.95 at 6 % on 8K; benchmarks/README.md)
    cfg["GLUON"] = compute_capability_major(device_index) == 9 and dim in (64, 128)
    return tuple(cfg.items())


def tile_config(block_size: int, dim: int, device: torch.device, interpret: bool) -> dict:
    """Tiles by shape class (head dim, block size, GPU generation), never by sequence length; a
    fresh dict (cached per device and shape class): D=128 takes 128x128 tiles, 8 warps, 3 stages;
    D=64 128x64 tiles, 4 warps, 3 stages; D=256 on Hopper 128x64 tiles, 8 warps, 2 stages (1.7x the
    64x64 tiles kept for older GPUs, whose shared memory is smaller). The fastest on an H200 in
    ``benchmarks/routes_operator.py --part tiles`` (results in benchmarks/results/routes_h200.jsonl).
    """
    index = device.index if device.type == "cuda" and not interpret else None
    if index is None and device.type == "cuda" and not interpret:
        index = torch.cuda.current_device()
    return dict(_tile_config_cached(block_size, dim, index, interpret))


def _tma_ok(*tensors: torch.Tensor) -> bool:
    """The copy engine needs sm_90+, a 16-byte aligned base and 16-byte multiple row strides."""
    if not tensors[0].is_cuda or compute_capability_major(tensors[0].get_device()) < 9:
        return False
    for x in tensors:
        size = x.element_size()
        if x.data_ptr() % 16 or any((st * size) % 16 for st in x.stride()[:-1]):
            return False
    return True


_TMA_ALLOCATOR_SET = False


def ensure_tma_allocator() -> None:
    """Device-side tensor descriptors need a small global scratch buffer per launch (set once per
    process; benchmarks/gluon_sparse_forward.py uses it too)."""
    global _TMA_ALLOCATOR_SET
    if not _TMA_ALLOCATOR_SET:
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        _TMA_ALLOCATOR_SET = True


def kernel_for(q, k, v, block_size: int, mean_correction: bool = False, kbar=None, config: dict | None = None,
               vbar=None) -> str:
    """Which kernel :func:`sparse_attention` runs for these arguments: ``"gluon_sm90"`` (the warp-specialised
    kernel of :mod:`fp_kernels.sparse_attention_sm90`: by default on an sm_90 GPU for D=64 and D=128, 128-token
    blocks, fp16 / bf16, copy-engine-aligned tensors, means in the input dtype) or ``"triton"``. A pure function
    of the arguments; ``config`` picks one with ``GLUON`` (True / False), and a config that sets any
    Triton-kernel key (``BLOCK_M``, ``CORR_CHUNK``, ...) without ``GLUON`` times the Triton kernel."""
    config = config or {}
    interpret = interpreter_enabled()
    if interpret or not q.is_cuda:
        return "triton"
    default = tile_config(block_size, q.shape[-1], q.device, interpret)["GLUON"]
    wanted = config.get("GLUON", default and not (set(config) - set(GLUON_KEYS)))
    means = tuple(x for x in (kbar, vbar) if x is not None) if mean_correction else ()  # both go through TMA
    ok = wanted and sm90.supported(q, k, v, block_size, mean_correction, kbar)
    return "gluon_sm90" if ok and _tma_ok(q, k, v, *means) else "triton"


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_index: torch.Tensor,
    block_count: torch.Tensor,
    block_size: int = 128,
    scale: float | None = None,
    kv_start: torch.Tensor | None = None,
    kv_end: torch.Tensor | None = None,
    config: dict | None = None,
    out: torch.Tensor | None = None,
    mean_correction: bool = False,
    kbar: torch.Tensor | None = None,
    vbar: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention over the listed key blocks only (Triton).

    ``q [B, Lq, Hq, D]``, ``k``/``v [B, Lk, Hkv, D]``; ``block_index [B, Hsel, S, nkb]`` int32 with
    ascending ids, the first ``block_count [B, Hsel, S]`` valid; ``Hsel`` is ``Hq`` (per head) or
    ``Hkv`` (per GQA group). Returns ``[B, Lq, Hq, D]`` contiguous in ``q.dtype``; rows that see no
    listed key, and rows before ``kv_start``, are 0. Same result as
    :func:`fp_kernels.sparse_attention_reference`. ``config`` overrides the tile choice
    (``BLOCK_M``, ``BLOCK_N``, ``num_warps``, ``num_stages``, ``USE_TMA``, ``WARP_SPECIALIZE``) and the
    mean-correction loop's (``CORR_CHUNK``: block ids per chunk, a power of two >= 16;
    ``CORR_STAGES``: its pipelining stages; ``CORR_FLAGS``: a kept-flag map instead of the list walk)
    for benchmarking, and ``GLUON`` / ``GLUON_STAGES`` / ``GLUON_PROGRAMS`` (the sm_90 kernel or not, its
    ring depth, and its number of programs, by default one per SM; see :func:`kernel_for`); none of them
    changes what is computed. ``out`` (``[B, Lq, Hq, D]``,
    ``q.dtype``, unit last stride) is written in place when given; every element is written.

    ``mean_correction``: also add, for every key block ``j`` before a slot's query block that its
    list skips, ``n_j exp(scale q . kbar_j)`` to each row's softmax denominator and that times
    ``vbar_j`` to its numerator (``n_j`` the block's valid keys); see :func:`fp_kernels.flash_prefill`.
    ``kbar``/``vbar`` (``[B, nkb, Hkv, D]``, from ``pool_keys(k, block_size, kv_start, kv_end, v=v)``,
    any float dtype: they are rounded to ``q.dtype`` in the kernel) are pooled here when not given.
    """
    batch, q_len, hq, dim = q.shape
    k_len, hkv = k.shape[1], k.shape[2]
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    scale = dim**-0.5 if scale is None else scale
    has_ranges = kv_start is not None
    n_slots = block_count.shape[-1]
    if out is None:
        out = torch.empty(batch, q_len, hq, dim, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} with unit last stride, got {tuple(out.shape)}")
    if has_ranges:
        # rows before kv_start, and rows of a row with no valid key, belong to no slot: they read as 0
        start, end = normalize_ranges(batch, k_len, kv_start, kv_end, q.device)
        unseen = torch.arange(q_len, device=q.device)[None, :] < (start.long() - (k_len - q_len))[:, None]
        unseen |= (end <= start)[:, None]
        out.masked_fill_(unseen[:, :, None, None], 0)
    if n_slots == 0 or q_len == 0:
        return out
    if mean_correction and (kbar is None or vbar is None):
        from .pool import pool_keys

        ranges = normalize_ranges(batch, k_len, kv_start, kv_end, q.device) if has_ranges else (None, None)
        kbar, vbar = pool_keys(k, block_size, *ranges, v=v)
    if mean_correction and not (kbar.shape == vbar.shape == (batch, block_index.shape[-1], hkv, dim)
                                and kbar.dtype == vbar.dtype and kbar.dtype.is_floating_point
                                and kbar.stride() == vbar.stride() and kbar.stride(-1) == 1):
        raise ValueError(
            f"kbar and vbar must be [B, nkb, Hkv, D] = {(batch, block_index.shape[-1], hkv, dim)} of one float dtype "
            f"with the same strides, got {tuple(kbar.shape)} {kbar.dtype} and {tuple(vbar.shape)} {vbar.dtype}; "
            "pool them with pool_keys(k, block_size, kv_start, kv_end, v=v)"
        )
    means = (kbar, vbar) if mean_correction else (block_count, block_count)
    mean_strides = kbar.stride()[:3] if mean_correction else (0, 0, 0)
    scale_log2 = scale * 1.4426950408889634
    config = dict(config or {})
    if kernel_for(q, k, v, block_size, mean_correction, kbar, config, vbar) == "gluon_sm90":
        stages = config.pop("GLUON_STAGES", sm90.STAGES)
        programs = config.pop("GLUON_PROGRAMS", None)
        config.pop("GLUON", None)
        if config:
            raise ValueError(f"the sm_90 kernel takes only {', '.join(GLUON_KEYS)}, got {sorted(config)}")
        ensure_tma_allocator()
        flags = (kept_flags(block_index, block_count, num_key_blocks(k_len, block_size)) if mean_correction
                 else block_count)
        with launch_device(q):
            ranges = (kv_start.to(torch.int32), kv_end.to(torch.int32)) if has_ranges else (None, None)
            sm90.launch(q, k, v, out, block_index, block_count, *ranges, kbar, vbar, flags, scale_log2,
                        mean_correction, stages, programs)
        return out
    interpret = interpreter_enabled()
    cfg = tile_config(block_size, dim, q.device, interpret)
    cfg.pop("GLUON", None)
    for key in GLUON_KEYS:
        config.pop(key, None)
    cfg.update(config)
    block_m, block_n = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    use_tma = cfg.pop("USE_TMA", False) and not interpret and _tma_ok(k, v)
    if use_tma:
        ensure_tma_allocator()
    warp_specialize = cfg.pop("WARP_SPECIALIZE", False)
    corr = {key: cfg.pop(key) for key in CORR_KEYS}
    if mean_correction:
        corr = dict(corr, CORR_FLAGS=bool(corr["CORR_FLAGS"]))
    else:
        corr = dict(_PLAIN_CORR)
    use_flags = mean_correction and corr["CORR_FLAGS"]
    flags = kept_flags(block_index, block_count, num_key_blocks(k_len, block_size)) if use_flags else block_count
    grid = (n_slots * (block_size // block_m), batch * hq)
    with launch_device(q):
        _sparse_attention_kernel[grid](
            q, k, v, out, block_index, block_count,
            kv_start if has_ranges else block_count, kv_end if has_ranges else block_count, *means, flags,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            block_index.stride(0), block_index.stride(1), block_index.stride(2),
            block_count.stride(0), block_count.stride(1),
            *mean_strides,
            q_len, k_len, hq, n_slots, scale_log2,
            GROUP=hq // hkv, SEL_GROUP=block_index.shape[1] != hq,
            HEAD_DIM=dim, BLOCK_D=triton.next_power_of_2(dim), BLOCK_SIZE=block_size,
            BLOCK_M=block_m, BLOCK_N=block_n, HAS_RANGES=has_ranges,
            USE_TMA=use_tma, WARP_SPECIALIZE=warp_specialize,
            MEAN_CORRECTION=mean_correction, **corr,
            **cfg,
        )
    return out
