"""What a FlashPrefill call selected."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FlashPrefillInfo:
    """Selection made by one ``flash_prefill(..., return_info=True)`` call.

    Attributes:
        density: ``[B, Hq]`` float32, fraction of the causally visible key blocks that were computed
            (1.0 = dense). With ``group_select`` all heads of a GQA group report the group's value.
        block_index: ``[B, Hsel, S, nkb]`` int32; row ``(b, h, s)`` lists the kept key blocks of
            query-block slot ``s`` in ascending order, then ``-1``. ``Hsel`` is ``Hq`` (per-head
            selection) or ``Hkv`` (``group_select=True``).
        block_count: ``[B, Hsel, S]`` int32, number of valid entries in each ``block_index`` row.
        block_size: tokens per block.
        group_select: whether each GQA group shared one selection.
        computed_blocks: ``[B, Hq]`` int64, key blocks computed for the query blocks of the prompt
            (``density = computed_blocks / visible_blocks``; slots made only of right-padding queries,
            which ``block_count`` also lists, are not counted).
        visible_blocks: ``[B, Hq]`` int64, causally visible key blocks of those query blocks (what a
            dense causal prefill computes; 0 for a fully padded row).
            Both are set by ``flash_prefill(..., return_info=True)``; ``None`` where an info is built
            without them (``flash_prefill_reference``).
    """

    density: torch.Tensor
    block_index: torch.Tensor
    block_count: torch.Tensor
    block_size: int
    group_select: bool
    computed_blocks: torch.Tensor | None = None
    visible_blocks: torch.Tensor | None = None

    def block_mask(self, batch: int = 0, head: int = 0) -> torch.Tensor:
        """Dense ``[S, nkb]`` bool map of the blocks computed for one (batch, query head)."""
        sel_head = head // (self.density.shape[1] // self.block_index.shape[1])
        index = self.block_index[batch, sel_head].long()
        count = self.block_count[batch, sel_head].long()
        n_slots, nkb = index.shape
        valid = torch.arange(nkb, device=index.device)[None, :] < count[:, None]
        mask = torch.zeros(n_slots, nkb + 1, dtype=torch.bool, device=index.device)
        mask.scatter_(1, torch.where(valid, index, torch.full_like(index, nkb)), True)
        return mask[:, :nkb]
