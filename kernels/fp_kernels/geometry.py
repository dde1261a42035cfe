"""Block geometry shared by the Triton pipeline and the PyTorch reference.

Every batch row ``b`` has a valid key range ``[kv_start[b], kv_end[b])`` (left/right padding).
Blocks are laid out from ``kv_start[b]``, so a left-padded row is split into exactly the blocks it
would have alone. In these *local* coordinates (``t = absolute position - kv_start[b]``):

* key block ``j`` holds keys ``[j*B, min((j+1)*B, n))`` where ``n = kv_end - kv_start``;
* query row ``i`` (of ``Lq``) sits at absolute position ``i + Lk - Lq`` (bottom-right causal
  alignment) and sees local keys ``0 .. min(t, n-1)``; rows with ``t < 0`` see nothing (zeros);
* the query rows are grouped by local block ``t // B``; *slot* ``s`` is the ``s``-th non-empty one.

Per slot: ``n_vis`` visible key blocks (the last one is the diagonal, or the last valid block for
rows past ``kv_end``), and whether it is one of the ``last_dense_blocks`` final query blocks of the
valid prompt.
"""

from __future__ import annotations

import torch


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def num_query_slots(q_len: int, k_len: int, block_size: int, padded: bool) -> int:
    """Upper bound on the number of query-block slots of any batch row (static: no host sync)."""
    extra = 1 if (padded or (k_len - q_len) % block_size) else 0
    return cdiv(q_len, block_size) + extra


def num_key_blocks(k_len: int, block_size: int) -> int:
    return cdiv(k_len, block_size)


def normalize_ranges(
    batch: int, k_len: int, kv_start: torch.Tensor | None, kv_end: torch.Tensor | None, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clamped ``(kv_start, kv_end)`` as int32 device tensors, ``0 <= start <= end <= k_len``.

    Clamping (instead of validating) keeps device tensors free of host syncs; the kernels apply the
    same clamp, so out-of-range values have one defined meaning everywhere: values below 0 read as
    0, values above ``k_len`` as ``k_len``, and ``end < start`` as an empty range (the row's output is
    zeros). This is the documented contract of ``flash_prefill(kv_start=, kv_end=)``.
    """
    start = (
        torch.zeros(batch, dtype=torch.int32, device=device)
        if kv_start is None
        else kv_start.to(device=device, dtype=torch.int32).clamp(0, k_len)
    )
    end = (
        torch.full((batch,), k_len, dtype=torch.int32, device=device)
        if kv_end is None
        else kv_end.to(device=device, dtype=torch.int32).clamp(0, k_len)
    )
    end = torch.maximum(end, start)
    return start, end


def slot_geometry(
    q_len: int,
    k_len: int,
    block_size: int,
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    n_slots: int,
    last_dense_blocks: int,
) -> dict[str, torch.Tensor]:
    """Per (batch, slot) geometry as ``(B, n_slots)`` int64 tensors (vectorised, on the ranges' device).

    Keys: ``qb`` local query block, ``n_vis`` visible key blocks (0 for empty slots), ``dense``
    (bool) whether the slot is forced dense, ``row_lo``/``row_hi`` the query rows ``[lo, hi)`` in
    ``0..Lq`` that the slot covers, ``in_prompt`` (bool) whether the slot's query block lies in the
    valid range (slots made only of right-padding queries are computed but not counted in density).
    """
    bs = block_size
    start = kv_start.long()
    n = (kv_end.long() - start).clamp(min=0)
    nkb = (n + bs - 1) // bs
    off = k_len - q_len
    t_first = (off - start).clamp(min=0)
    qb = t_first[:, None] // bs + torch.arange(n_slots, device=start.device)[None, :]
    t_lo = torch.maximum(qb * bs, t_first[:, None])
    t_hi = torch.minimum((qb + 1) * bs, (k_len - start)[:, None])
    valid = (t_lo < t_hi) & (n[:, None] > 0)
    n_vis = torch.where(valid, torch.minimum(qb, nkb[:, None] - 1) + 1, torch.zeros_like(qb))
    dense = valid & (qb >= nkb[:, None] - last_dense_blocks)
    row_lo = torch.where(valid, t_lo + start[:, None] - off, torch.zeros_like(qb))
    row_hi = torch.where(valid, t_hi + start[:, None] - off, torch.zeros_like(qb))
    in_prompt = valid & (qb < nkb[:, None])
    return {"qb": qb, "n_vis": n_vis, "dense": dense, "row_lo": row_lo, "row_hi": row_hi, "in_prompt": in_prompt}


def density_from_counts(block_count: torch.Tensor, geometry: dict, num_q_heads: int) -> torch.Tensor:
    """Fraction of causally visible blocks computed, per (batch, query head): ``(B, Hq)`` float32.

    ``block_count``: ``(B, Hsel, n_slots)``; ``geometry`` from :func:`slot_geometry`; only slots
    ``in_prompt`` count. With group selection (``Hsel = Hkv``) each query head of a group reports
    its group's density. A row with nothing visible (fully padded) reports 0.
    """
    computed, visible = block_totals(block_count, geometry, num_q_heads)
    return computed.float() / visible.float().clamp(min=1.0)


def block_totals(block_count: torch.Tensor, geometry: dict, num_q_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(computed, visible)``: blocks computed and causally visible blocks per (batch, query head), as
    ``(B, Hq)`` int64 tensors, counting only the slots ``in_prompt`` (as :func:`density_from_counts`;
    slots made only of right-padding queries are left out of both). A fully padded row gives ``0, 0``.
    """
    counted = geometry["in_prompt"]
    computed = (block_count.long() * counted[:, None, :]).sum(-1)
    if block_count.shape[1] != num_q_heads:
        computed = computed.repeat_interleave(num_q_heads // block_count.shape[1], dim=1)
    visible = (geometry["n_vis"] * counted).sum(-1)[:, None].expand(-1, num_q_heads).contiguous()
    return computed, visible
