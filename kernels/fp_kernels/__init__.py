"""FlashPrefill operator: Triton pipeline and its pure-PyTorch reference (import name ``fp_kernels``).

Stages (each with a Triton version and a reference):
``pool_keys`` (block-mean keys) -> ``select_blocks`` (fused block scoring + thresholding +
compaction) -> ``sparse_attention`` (index-driven block-sparse attention forward). The block rules
(``alpha``, ``block_size``, sinks, window, ...) travel as one :class:`BlockRules`.
"""

from .api import SUPPORTED_HEAD_DIMS, flash_prefill
from .info import FlashPrefillInfo
from .reference import (
    block_scores_reference,
    flash_prefill_reference,
    pool_keys_reference,
    select_blocks_reference,
    sparse_attention_reference,
)
from .rules import BlockRules

__all__ = [
    "SUPPORTED_HEAD_DIMS",
    "BlockRules",
    "FlashPrefillInfo",
    "block_scores_reference",
    "flash_prefill",
    "flash_prefill_reference",
    "pool_keys_reference",
    "select_blocks_reference",
    "sparse_attention_reference",
]
