"""The Triton FlashPrefill pipeline: pool -> score/select/compact -> sparse attention."""

from __future__ import annotations

import torch

from .geometry import num_key_blocks, num_query_slots
from .pool import pool_keys
from .rules import BlockRules
from .select import select_blocks
from .sparse_attention import sparse_attention


def flash_prefill_triton(q, k, v, rules: BlockRules, scale: float, kv_start=None, kv_end=None):
    """Run the three kernels (each an ordinary ``kernel[grid](...)`` launch); returns
    ``(out, block_index, block_count)``. Inputs are validated."""
    block_size = rules.block_size
    batch, q_len, hq, dim = q.shape
    k_len, hkv = k.shape[1], k.shape[2]
    has_ranges = kv_start is not None or kv_end is not None
    if has_ranges:
        kv_start = (torch.zeros(batch, dtype=torch.int32, device=q.device) if kv_start is None
                    else kv_start.to(torch.int32))
        kv_end = (torch.full((batch,), k_len, dtype=torch.int32, device=q.device) if kv_end is None
                  else kv_end.to(torch.int32))
    if q_len == 0:
        hsel = hkv if rules.group_select else hq
        n_slots = num_query_slots(q_len, k_len, block_size, has_ranges)
        nkb = num_key_blocks(k_len, block_size)
        return (q.new_empty(batch, 0, hq, dim), q.new_zeros(batch, hsel, n_slots, nkb, dtype=torch.int32),
                q.new_zeros(batch, hsel, n_slots, dtype=torch.int32))
    needs_scores = rules.needs_scores
    # without scores every visible block is listed, so no block is skipped and nothing is corrected
    mean_correction = rules.mean_correction and needs_scores
    if mean_correction:  # the mean values in the same pass; kbar (and so the selection) is unchanged
        means = pool_keys(k, block_size, kv_start, kv_end, v=v)
    else:
        means = (pool_keys(k, block_size, kv_start, kv_end),) if needs_scores else ()
    kbar = means[0] if means else None
    index, count = select_blocks(q, kbar, k_len, rules, scale, kv_start, kv_end, num_kv_heads=hkv)
    out = sparse_attention(q, k, v, index, count, block_size, scale, kv_start, kv_end,
                           mean_correction=mean_correction, kbar=kbar, vbar=means[-1] if mean_correction else None)
    return out, index, count
