"""Pure-PyTorch FlashPrefill: the semantic reference for the Triton pipeline and the CPU backend.

All math is fp32 on the inputs' device. Memory stays bounded: attention is computed one query
block (and a chunk of heads) at a time, so nothing of size ``L x L`` is ever materialised; the only
quadratic object is the ``(L/B) x (L/B)`` block-score table of :func:`block_scores_reference`.

The stages mirror the Triton ones and are separately callable:
:func:`pool_keys_reference` -> :func:`block_scores_reference` -> :func:`select_blocks_reference`
-> :func:`sparse_attention_reference`; :func:`flash_prefill_reference` chains them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .geometry import density_from_counts, normalize_ranges, num_key_blocks, num_query_slots, slot_geometry
from .info import FlashPrefillInfo
from .rules import BlockRules, resolve_rules
from .validation import validate_inputs

# elements of the (heads x rows x keys) fp32 score tile computed at once (64 MiB)
_TILE_ELEMENTS = 1 << 24


def pool_keys_reference(
    k: torch.Tensor, block_size: int, kv_start: torch.Tensor, kv_end: torch.Tensor
) -> torch.Tensor:
    """Mean key of every block: ``k [B, Lk, Hkv, D] -> [B, nkb, Hkv, D]`` float32.

    Blocks start at ``kv_start[b]`` and count only valid keys; blocks past the valid range are 0.
    """
    batch, k_len, heads, dim = k.shape
    nkb = num_key_blocks(k_len, block_size)
    out = torch.zeros(batch, nkb, heads, dim, dtype=torch.float32, device=k.device)
    for b in range(batch):
        lo, hi = int(kv_start[b]), int(kv_end[b])
        for j in range(num_key_blocks(hi - lo, block_size)):
            a = lo + j * block_size
            out[b, j] = k[b, a : min(a + block_size, hi)].float().mean(0)
    return out


def block_scores_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int = 128,
    scale: float | None = None,
    kv_start: torch.Tensor | None = None,
    kv_end: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block scores ``T[b, h, s, j] = logsumexp_r(scale * q_r . mean_key_j)`` over the rows ``r`` of slot ``s``
    that see all of block ``j`` (row position >= the block's last valid key), not over all the rows
    of the slot.

    Row-level causality keeps a query from scoring a mean that includes keys in its future: a block
    before the diagonal is scored by every row of the slot, the diagonal block by the slot's last
    row only (for a short last key block, by the rows at or after its last valid key), so it does not
    inflate the row maximum.
    Returns ``[B, Hq, n_slots, nkb]`` float32 (natural log), ``-inf`` where block ``j`` is not
    causally visible from slot ``s``, no row of the slot sees all of it, or the slot is empty. For
    plots and tests; the kernels never store this table.
    """
    batch, q_len, hq, dim = q.shape
    k_len, hkv = k.shape[1], k.shape[2]
    scale = dim**-0.5 if scale is None else scale
    start, end = normalize_ranges(batch, k_len, kv_start, kv_end, q.device)
    n_slots = num_query_slots(q_len, k_len, block_size, kv_start is not None or kv_end is not None)
    geo = slot_geometry(q_len, k_len, block_size, start, end, n_slots, 0)
    kbar = pool_keys_reference(k, block_size, start, end)
    kbar = kbar.repeat_interleave(hq // hkv, dim=2)  # [B, nkb, Hq, D]
    nkb = kbar.shape[1]
    scores = torch.full((batch, hq, n_slots, nkb), -math.inf, dtype=torch.float32, device=q.device)
    off = k_len - q_len
    for b in range(batch):
        n = int(end[b] - start[b])
        for s in range(n_slots):
            n_vis = int(geo["n_vis"][b, s])
            if n_vis == 0:
                continue
            lo, hi = int(geo["row_lo"][b, s]), int(geo["row_hi"][b, s])
            rows = q[b, lo:hi].float()  # [R, Hq, D]
            logits = torch.einsum("rhd,jhd->hrj", rows, kbar[b, :n_vis]) * scale
            t = torch.arange(lo, hi, device=q.device) + off - int(start[b])  # local row positions
            last_key = torch.clamp((torch.arange(n_vis, device=q.device) + 1) * block_size, max=n) - 1
            sees_block = t[:, None] >= last_key[None, :]
            logits = logits.masked_fill(~sees_block[None], -math.inf)
            scores[b, :, s, :n_vis] = torch.logsumexp(logits, dim=1)
    return scores


def select_blocks_reference(
    scores: torch.Tensor,
    n_vis: torch.Tensor,
    dense: torch.Tensor,
    rules: BlockRules,
    group_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Threshold block scores into compact ascending block lists.

    ``scores``: ``[B, Hq, S, nkb]``; ``n_vis``/``dense``: ``[B, S]`` from :func:`slot_geometry` (which
    applies ``rules.last_dense_blocks``). Keeps block ``j`` of slot ``s`` iff it is visible and one of:
    ``T >= log(rules.alpha) + max T``; among the first ``rules.sink_blocks``; among the last
    ``rules.window_blocks`` visible ones (diagonal included); among the ``rules.min_budget`` best (ties
    with the last one kept too); or the slot is ``dense``.
    With ``group_size > 1`` (``Hq / Hkv`` when ``rules.group_select``) each group of consecutive query
    heads shares the union of its heads' selections.

    Returns ``block_index [B, Hsel, S, nkb]`` int32 (kept ids ascending, then -1) and
    ``block_count [B, Hsel, S]`` int32, ``Hsel = Hq / group_size``.
    """
    alpha, sink_blocks, window_blocks, min_budget = (
        rules.alpha, rules.sink_blocks, rules.window_blocks, rules.min_budget)
    batch, hq, n_slots, nkb = scores.shape
    j = torch.arange(nkb, device=scores.device)
    nv = n_vis[:, None, :, None]
    visible = j < nv
    keep = ((j < sink_blocks) | (j >= nv - window_blocks) | dense[:, None, :, None]).expand(scores.shape).clone()
    if alpha > 0:
        row_max = scores.masked_fill(~visible, -math.inf).amax(-1, keepdim=True)
        keep |= scores >= row_max + math.log(alpha)
    else:
        keep = torch.ones_like(keep)
    if min_budget > 0:
        kth = min(min_budget, nkb)
        vals = scores.masked_fill(~visible, -math.inf).topk(kth, dim=-1).values[..., -1:]
        # slots with fewer visible blocks than the budget keep all of them
        keep |= (scores >= vals) | (nv <= min_budget)
    keep &= visible
    if group_size > 1:
        keep = keep.view(batch, hq // group_size, group_size, n_slots, nkb).any(2)
    return compact_block_mask(keep)


def compact_block_mask(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[..., nkb]`` bool -> (kept ids ascending then -1 as int32, count as int32)."""
    count = keep.sum(-1, dtype=torch.int32)
    # a stable sort puts the kept ids first, in ascending order
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    j = torch.arange(keep.shape[-1], device=keep.device)
    index = torch.where(j < count[..., None], order, torch.full_like(order, -1))
    return index, count


def sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_index: torch.Tensor,
    block_count: torch.Tensor,
    block_size: int = 128,
    scale: float | None = None,
    kv_start: torch.Tensor | None = None,
    kv_end: torch.Tensor | None = None,
    round_probs: bool = False,
    mean_correction: bool = False,
) -> torch.Tensor:
    """Causal attention restricted to the listed key blocks; fp32 math, output in ``q.dtype``.

    ``q [B, Lq, Hq, D]``, ``k``/``v [B, Lk, Hkv, D]``; ``block_index [B, Hsel, S, nkb]`` with the
    first ``block_count [B, Hsel, S]`` entries valid (``Hsel`` is ``Hq`` or ``Hkv``). Query rows that
    see no listed key (and rows before ``kv_start``) are 0. ``round_probs`` rounds the unnormalised
    probabilities to ``q.dtype`` before ``P @ V`` (and the stand-ins' block means, below), as the
    kernels do: the difference to the exact result is the reference's own low-precision error, which
    test tolerances are scaled by.

    ``mean_correction``: every key block ``j`` before slot ``s``'s query block ``qb`` (``j <
    min(qb, n_vis)``) that the head's list skips adds one stand-in column to each row of the slot:
    key ``kbar_j``, value ``vbar_j`` (fp32 block means of the valid keys/values), logit
    ``scale * q . kbar_j + log n_j`` with ``n_j`` the block's valid keys (rules in
    :func:`fp_kernels.flash_prefill`). A row with no listed key but stand-ins gets their mixture.
    """
    batch, q_len, hq, dim = q.shape
    k_len = k.shape[1]
    scale = dim**-0.5 if scale is None else scale
    start, end = normalize_ranges(batch, k_len, kv_start, kv_end, q.device)
    n_slots = block_count.shape[-1]
    geo = slot_geometry(q_len, k_len, block_size, start, end, n_slots, 0)
    sel_per_q = hq // block_index.shape[1]
    out = torch.zeros(batch, q_len, hq, v.shape[-1], dtype=torch.float32, device=q.device)
    off = k_len - q_len
    group = hq // k.shape[2]
    probs_dtype = q.dtype if round_probs else None
    heads = torch.arange(hq, device=q.device)
    if mean_correction:
        kbar, vbar = (pool_keys_reference(x, block_size, start, end) for x in (k, v))
        if round_probs:
            kbar, vbar = (x.to(q.dtype).float() for x in (kbar, vbar))
    for b in range(batch):
        o, n = int(start[b]), int(end[b] - start[b])
        for s in range(n_slots):
            n_vis = int(geo["n_vis"][b, s])
            if n_vis == 0:
                continue
            lo, hi = int(geo["row_lo"][b, s]), int(geo["row_hi"][b, s])
            # the listed blocks of each query head, padded to the slot's longest list: the work
            # follows the density instead of the visible range
            ids = block_index[b, :, s].long().repeat_interleave(sel_per_q, 0)  # [Hq, nkb]
            count = block_count[b, :, s].long().repeat_interleave(sel_per_q, 0)
            listed = (torch.arange(ids.shape[-1], device=q.device) < count[:, None]) & (ids >= 0) & (ids < n_vis)
            width = int(listed.sum(-1).max())
            order = torch.sort((~listed).to(torch.int8), dim=-1, stable=True).indices[:, :width]
            blocks = torch.gather(ids, 1, order)
            block_ok = torch.gather(listed, 1, order)
            tokens = (blocks[:, :, None] * block_size + torch.arange(block_size, device=q.device)).flatten(1)
            token_ok = block_ok.repeat_interleave(block_size, 1) & (tokens < n)
            tokens = torch.where(token_ok, tokens, torch.zeros_like(tokens))  # [Hq, W]
            t = torch.arange(lo, hi, device=q.device) + off - o
            mask = token_ok[:, None, :] & (tokens[:, None, :] <= t[None, :, None])  # [Hq, R, W]
            k_sel = k[b, o + tokens, (heads // group)[:, None]].float()  # [Hq, W, D]
            v_sel = v[b, o + tokens, (heads // group)[:, None]].float()
            bias = None
            n_corr = min(int(geo["qb"][b, s]), n_vis)
            skipped = None
            if mean_correction and n_corr > 0:
                is_listed = torch.zeros(hq, ids.shape[-1] + 1, dtype=torch.bool, device=q.device)
                is_listed.scatter_(1, torch.where(listed, ids, ids.shape[-1]), True)
                skipped = ~is_listed[:, :n_corr]  # [Hq, n_corr]
            if skipped is not None and skipped.any():
                j = torch.arange(n_corr, device=q.device)
                sizes = (torch.clamp((j + 1) * block_size, max=n) - j * block_size).float()
                k_sel = torch.cat([k_sel, kbar[b, :n_corr, heads // group].transpose(0, 1)], 1)
                v_sel = torch.cat([v_sel, vbar[b, :n_corr, heads // group].transpose(0, 1)], 1)
                mask = torch.cat([mask, skipped[:, None, :].expand(-1, hi - lo, -1)], 2)
                bias = torch.cat([torch.zeros(hq, tokens.shape[1], device=q.device),
                                  torch.log(sizes).expand(hq, -1)], 1)  # [Hq, W + n_corr]
            if mask.shape[-1] == 0:
                continue
            _attend_rows(out[b, lo:hi], q[b, lo:hi], k_sel, v_sel, mask, scale, probs_dtype, bias)
    return out.to(q.dtype)


def _attend_rows(out, q_rows, k_sel, v_sel, mask, scale, probs_dtype=None, bias=None):
    """``out[r, h] = softmax_w(scale q[r,h].k_sel[h,w] + bias[h,w] | mask[h,r,w]) . v_sel[h]``:
    ``q_rows [R, Hq, D]``, ``k_sel``/``v_sel [Hq, W, D]`` (each head's gathered keys), ``mask [Hq, R, W]``,
    ``bias [Hq, W]`` or None (0). Rows with nothing allowed stay 0. With ``probs_dtype`` the unnormalised
    probabilities are rounded as the kernels do."""
    rows, hq, _ = q_rows.shape
    chunk = max(1, _TILE_ELEMENTS // max(1, rows * k_sel.shape[1]))
    for h0 in range(0, hq, chunk):
        heads = slice(h0, min(h0 + chunk, hq))
        qh = q_rows[:, heads].float().transpose(0, 1)  # [h, R, D]
        kh, vh, m = k_sel[heads].float(), v_sel[heads].float(), mask[heads]
        if probs_dtype is None:
            # exact fp32 path through the fused kernel; rows with nothing allowed are 0, not NaN
            attn_mask = m if bias is None else torch.where(m, bias[heads, None, :], -math.inf)
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=attn_mask, scale=scale)
            out[:, heads] = torch.where(m.any(-1, keepdim=True), o, torch.zeros_like(o)).transpose(0, 1)
            continue
        logits = (qh @ kh.transpose(1, 2)) * scale
        if bias is not None:
            logits = logits + bias[heads, None, :]
        logits = logits.masked_fill(~m, -math.inf)
        row_max = logits.amax(-1, keepdim=True)
        # a row with no allowed key keeps a finite pivot so it yields 0 instead of NaN
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        p = torch.exp(logits - row_max)
        denom = p.sum(-1, keepdim=True)
        p = p.to(probs_dtype).float()
        o = (p @ vh) / torch.where(denom > 0, denom, torch.ones_like(denom))
        out[:, heads] = o.transpose(0, 1)


def flash_prefill_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alpha: float | None = None,
    block_size: int | None = None,
    sink_blocks: int | None = None,
    window_blocks: int | None = None,
    last_dense_blocks: int | None = None,
    min_budget: int | None = None,
    scale: float | None = None,
    *,
    kv_start: torch.Tensor | None = None,
    kv_end: torch.Tensor | None = None,
    group_select: bool | None = None,
    return_info: bool = False,
    mean_correction: bool | None = None,
    rules: BlockRules | None = None,
):
    """FlashPrefill in pure PyTorch: same signature and meaning as :func:`fp_kernels.flash_prefill`
    (the block rules as one ``rules=`` :class:`BlockRules` or as keywords, not both).

    Inputs are validated the same way; any float dtype and any device are accepted.
    """
    validate_inputs(q, k, v, scale, kv_start, kv_end, for_kernel=False)
    rules = resolve_rules(rules, {
        "alpha": alpha, "block_size": block_size, "sink_blocks": sink_blocks, "window_blocks": window_blocks,
        "last_dense_blocks": last_dense_blocks, "min_budget": min_budget, "group_select": group_select,
        "mean_correction": mean_correction,
    }, "flash_prefill_reference")
    block_size = rules.block_size
    batch, q_len, hq, dim = q.shape
    k_len, hkv = k.shape[1], k.shape[2]
    scale = dim**-0.5 if scale is None else float(scale)
    start, end = normalize_ranges(batch, k_len, kv_start, kv_end, q.device)
    padded = kv_start is not None or kv_end is not None
    n_slots = num_query_slots(q_len, k_len, block_size, padded)
    geo = slot_geometry(q_len, k_len, block_size, start, end, n_slots, rules.last_dense_blocks)
    if rules.needs_scores:
        scores = block_scores_reference(q, k, block_size, scale, kv_start, kv_end)
    else:
        scores = torch.zeros(batch, hq, n_slots, num_key_blocks(k_len, block_size), device=q.device)
    index, count = select_blocks_reference(
        scores, geo["n_vis"], geo["dense"], rules, hq // hkv if rules.group_select else 1,
    )
    out = sparse_attention_reference(q, k, v, index, count, block_size, scale, start, end,
                                     mean_correction=rules.mean_correction)
    if not return_info:
        return out
    return out, FlashPrefillInfo(
        density=density_from_counts(count, geo, hq),
        block_index=index,
        block_count=count,
        block_size=block_size,
        group_select=rules.group_select,
    )
