"""Stage 1: block-mean keys, ``k [B, Lk, Hkv, D] -> kbar [B, nkb, Hkv, D]`` (float32)."""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .geometry import num_key_blocks

# Integer kernel arguments that change with the prompt length. Triton specialises integers on
# "== 1" and "divisible by 16" by default, so lengths coming and going would compile new variants
# (a stall of seconds on a new prompt length). These are only compared and multiplied (block ids
# and counts are loaded one scalar at a time): nothing is lost by not specialising them. Tensor
# strides that change with the length are multiples of the head dim, hence always of 16.
LENGTH_ARGS = ["q_len", "k_len", "n_slots", "stride_ib", "stride_ih", "stride_is", "stride_cb", "stride_ch"]


def launch_device(t: torch.Tensor):
    """Context for a kernel launch on ``t``'s device. Triton launches on the *current* CUDA device and
    its stream, not on the tensors' device: with a model spread over GPUs (accelerate's ``device_map``)
    the current device is usually ``cuda:0`` while a layer's tensors live on ``cuda:1``. (Entering
    ``torch.cuda.device`` costs ~4 µs of host time, so it is skipped when ``t``'s device is current.)"""
    if t.is_cuda and t.get_device() != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return _NO_SWITCH


_NO_SWITCH = contextlib.nullcontext()


@triton.jit
def valid_range(KV_START, KV_END, b, k_len, HAS_RANGES: tl.constexpr):
    """``[start, end)`` of batch row ``b``, clamped to ``0 <= start <= end <= k_len``."""
    if HAS_RANGES:
        start = tl.minimum(tl.maximum(tl.load(KV_START + b), 0), k_len)
        end = tl.minimum(tl.maximum(tl.load(KV_END + b), start), k_len)
    else:
        start = tl.full([], 0, tl.int32)
        end = tl.full([], 0, tl.int32) + k_len
    return start, end


@triton.jit(do_not_specialize=["k_len"])
def _pool_keys_kernel(
    K, KBAR, V, VBAR, KV_START, KV_END,
    stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    stride_ob, stride_oj, stride_oh,
    k_len, num_kv_heads,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, ROWS: tl.constexpr,
    HAS_RANGES: tl.constexpr, POOL_V: tl.constexpr,
):
    j = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_kv_heads
    h = bh % num_kv_heads
    start, end = valid_range(KV_START, KV_END, b, k_len, HAS_RANGES)
    lo = start + j * BLOCK_SIZE
    hi = tl.minimum(lo + BLOCK_SIZE, end)
    d = tl.arange(0, BLOCK_D)
    base = K + b.to(tl.int64) * stride_kb + h * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h * stride_vh
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    v_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for r0 in range(0, BLOCK_SIZE, ROWS):
        rows = lo + r0 + tl.arange(0, ROWS)
        mask = (rows < hi)[:, None] & (d < HEAD_DIM)[None, :]
        x = tl.load(base + rows.to(tl.int64)[:, None] * stride_kl + d[None, :], mask=mask, other=0.0)
        acc += tl.sum(x.to(tl.float32), axis=0)
        if POOL_V:
            y = tl.load(v_base + rows.to(tl.int64)[:, None] * stride_vl + d[None, :], mask=mask, other=0.0)
            v_acc += tl.sum(y.to(tl.float32), axis=0)
    count = tl.maximum(hi - lo, 1).to(tl.float32)  # blocks past the valid range are written as 0
    offset = b.to(tl.int64) * stride_ob + j * stride_oj + h * stride_oh
    tl.store(KBAR + offset + d, (acc / count).to(KBAR.dtype.element_ty), mask=d < HEAD_DIM)
    if POOL_V:
        tl.store(VBAR + offset + d, (v_acc / count).to(VBAR.dtype.element_ty), mask=d < HEAD_DIM)


def pool_keys(
    k: torch.Tensor,
    block_size: int,
    kv_start: torch.Tensor | None = None,
    kv_end: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    v: torch.Tensor | None = None,
    config: dict | None = None,
):
    """Mean key of every block: ``k [B, Lk, Hkv, D] -> [B, nkb, Hkv, D]`` (Triton).

    Sums are accumulated in float32 and rounded once to ``out_dtype`` (default ``k.dtype``: the
    scoring matmul then runs on the tensor cores at the input precision). Blocks start at
    ``kv_start[b]`` and average only valid keys; blocks past ``kv_end`` are 0. Same result as
    :func:`fp_kernels.pool_keys_reference` up to that rounding.

    With ``v`` (``[B, Lk, Hkv, D]``, the values of the same tokens) the mean values of the same
    blocks are pooled in the same pass and ``(kbar, vbar)`` is returned (both ``out_dtype``).
    ``config`` overrides ``ROWS`` (key rows summed per step) and ``num_warps`` for benchmarking.
    """
    batch, k_len, heads, dim = k.shape
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v is not None and v.stride(-1) != 1:
        v = v.contiguous()
    nkb = num_key_blocks(k_len, block_size)
    kbar = torch.empty(batch, nkb, heads, dim, dtype=out_dtype or k.dtype, device=k.device)
    vbar = None if v is None else torch.empty(batch, nkb, heads, dim, dtype=kbar.dtype, device=k.device)
    if nkb > 0:
        has_ranges = kv_start is not None
        dummy = kbar if not has_ranges else None
        pool_v = v is not None
        # a whole block's rows per step when V is pooled too, half of them otherwise: all its loads in
        # flight at once (H100, 128K: 1.6 -> 2.6 TB/s keys only, 1.6 -> 2.8 keys and values)
        cfg = {"ROWS": min(block_size, 128 if pool_v else 64), "num_warps": 4}
        cfg.update(config or {})
        with launch_device(k):
            _pool_keys_kernel[(nkb, batch * heads)](
                k, kbar, v if pool_v else k, vbar if pool_v else kbar,
                kv_start if has_ranges else dummy, kv_end if has_ranges else dummy,
                k.stride(0), k.stride(1), k.stride(2),
                *(v if pool_v else k).stride()[:3],
                kbar.stride(0), kbar.stride(1), kbar.stride(2),
                k_len, heads,
                HEAD_DIM=dim, BLOCK_D=triton.next_power_of_2(dim), BLOCK_SIZE=block_size,
                HAS_RANGES=has_ranges, POOL_V=pool_v, **cfg,
            )
    return kbar if v is None else (kbar, vbar)
