"""Attention masks the sparse operator can take: a causal key range ``[start, end)`` per batch row.

:func:`key_ranges` turns a mask into :class:`~fp_patch.routes.Sparse` (the number of real keys and each
row's ``kv_start``/``kv_end``) or :class:`~fp_patch.routes.Dense` (why not). Masks are checked, not
trusted: each row's range is read from the mask's last query row (it sees every valid key), then the
whole mask is compared with the causal range mask the operator implements, for the candidate key
lengths ``Lk``, ``max(end)`` and ``Lq``. That costs one host sync per mask tensor: every layer of a
forward pass gets the same mask tensor, so the last result is reused while the same tensor (same
version, same shapes) comes back. The reuse never changes a result, only whether it is recomputed.
"""

from __future__ import annotations

import weakref

import torch

from .routes import Dense, Route, Sparse

# mask elements compared at once: bounds the check's temporaries (a padded 32K batch has a 1G-entry mask)
CHECK_ELEMENTS = 1 << 26

# last analysed mask: (weakref, (version, q_len, k_len, batch), result)
_last: list = [None]


def clear_cache() -> None:
    """Forget the last analysed mask (the next :func:`key_ranges` call analyses its mask again)."""
    _last[0] = None


def _version(t: torch.Tensor):
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return None


def _allowed(rows: torch.Tensor):
    """``(allowed, values_ok)`` of mask rows: bool masks as they are; for an additive mask 0 is
    "attend" and a very negative value (``finfo.min`` as Transformers writes it, or -inf) "blocked",
    anything else is a bias the sparse operator does not apply (``values_ok`` False)."""
    if rows.dtype == torch.bool:
        return rows, None
    allowed = rows == 0
    return allowed, (allowed | (rows <= torch.finfo(rows.dtype).min / 2)).all()


def key_ranges(mask: torch.Tensor, batch: int, q_len: int, k_len: int) -> Route:
    """:class:`Sparse` when ``mask`` (``[B or 1, 1, Lq, >= Lk]``, bool or additive) is a causal key
    range per batch row, else :class:`Dense` (``mask_layout`` or ``mask_not_range``). Key columns past
    ``k_len`` are cut off, as Transformers' SDPA path does. One host sync per new mask tensor."""
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, batch) or mask.shape[2] != q_len:
        return Dense("mask_layout", f"mask of shape {tuple(mask.shape)} (expected [B or 1, 1, Lq, Lk])")
    if mask.shape[-1] < k_len:
        return Dense("mask_layout", f"mask has {mask.shape[-1]} key columns for {k_len} keys")
    cached = _last[0]
    key = (_version(mask), q_len, k_len, batch)
    if cached is not None and cached[0]() is mask and cached[1] == key:
        return cached[2]
    result = analyse_mask(mask[..., :k_len], batch, q_len, k_len)
    _last[0] = (weakref.ref(mask), key, result)
    return result


def analyse_mask(mask: torch.Tensor, batch: int, q_len: int, k_len: int) -> Route:
    """:class:`Sparse` when ``mask`` (``[B or 1, 1, Lq, Lk]``) is a causal per-row key range, else
    :class:`Dense`; no cache (use :func:`key_ranges`).

    Each batch row's range ``[start, end)`` is read from the last query row (it sees every valid key),
    then the whole mask is compared with the operator's mask for three key lengths ``k_eff`` (keys past
    it are cut off, query row ``i`` sits at ``i + k_eff - Lq`` and sees ``start <= j < end, j <= pos``):
    ``Lk`` (no cache or a DynamicCache), ``max(end)`` and ``Lq`` (a StaticCache with unfilled slots).
    ``kv_start``/``kv_end`` are ``(B,)`` int32 device tensors, or ``None`` when every row sees all
    ``k_eff`` keys. One host sync.
    """
    m = mask[:, 0]
    device = m.device
    last, _ = _allowed(m[:, -1])
    j = torch.arange(k_len, device=device)
    has = last.any(-1)
    start = torch.where(has, torch.where(last, j, k_len).amin(-1), 0)
    end = torch.where(last, j + 1, 0).amax(-1)
    e_max = end.amax()
    offsets = [k_len - q_len, e_max - q_len, 0]  # k_eff - Lq per candidate
    in_range = (j >= start[:, None]) & (j < end[:, None])  # [B', Lk]
    oks = [torch.ones((), dtype=torch.bool, device=device) for _ in offsets]
    values_ok = torch.ones((), dtype=torch.bool, device=device)
    step = max(1, CHECK_ELEMENTS // (m.shape[0] * k_len))
    for r0 in range(0, q_len, step):
        allowed, chunk_values_ok = _allowed(m[:, r0 : r0 + step])
        if chunk_values_ok is not None:
            values_ok = values_ok & chunk_values_ok
        rows = torch.arange(r0, r0 + allowed.shape[1], device=device)
        for c, offset in enumerate(offsets):
            expected = in_range[:, None, :] & (j[None, :] <= rows[:, None] + offset)[None]
            oks[c] = oks[c] & (expected == allowed).all()
    host = torch.cat([torch.stack([*oks, values_ok]).long(), e_max[None], start, end]).tolist()
    ok_flags, values_ok_h, e_max_h = host[:3], host[3], host[4]
    n = start.shape[0]
    starts, ends = host[5 : 5 + n], host[5 + n :]
    if not values_ok_h:
        return Dense("mask_not_range", "additive mask with biases other than 0 / -inf")
    for ok, k_eff in zip(ok_flags, (k_len, e_max_h, q_len), strict=True):
        if ok and q_len <= k_eff <= k_len:
            break
    else:
        return Dense("mask_not_range", "mask is not a causal key range per row (packed sequences, custom masks...)")
    if all(s == 0 for s in starts) and all(e == k_eff for e in ends):
        return Sparse(k_eff)
    kv_start = start.to(torch.int32).expand(batch).contiguous()
    kv_end = end.to(torch.int32).expand(batch).contiguous()
    return Sparse(k_eff, kv_start, kv_end)
