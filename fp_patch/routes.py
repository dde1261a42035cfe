"""Where one attention call runs: :class:`Sparse` (FlashPrefill) or :class:`Dense` (SDPA, and why)."""

from __future__ import annotations

from typing import NamedTuple

import torch

# fallbacks that are the intended routing, not a degradation: logged at INFO, never raised in strict mode
BY_DESIGN = frozenset({"non_causal", "decode", "sliding_window", "dense_layer", "short_query"})


class Sparse(NamedTuple):
    """A call routed to FlashPrefill: the first ``k_len`` keys are real; ``kv_start``/``kv_end`` are
    ``(B,)`` int32 device tensors of each batch row's valid key range, or ``None`` (all ``k_len``)."""

    k_len: int
    kv_start: torch.Tensor | None = None
    kv_end: torch.Tensor | None = None


class Dense(NamedTuple):
    """A call routed to dense SDPA, and why: ``reason`` is a short key (``"decode"``,
    ``"short_query"``...; see :data:`BY_DESIGN`), ``detail`` a sentence for the log."""

    reason: str
    detail: str


Route = Sparse | Dense
