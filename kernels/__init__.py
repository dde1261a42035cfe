"""FlashPrefill operator: Triton pipeline and its pure-PyTorch reference (import name ``fp_kernels``).

Stages (each with a Triton version and a reference):
``pool_keys`` (block-mean keys) -> ``select_blocks`` (fused block scoring + thresholding +
compaction) -> ``sparse_attention`` (index-driven block-sparse attention forward).
"""

if __name__ != "fp_kernels":
    # This folder was imported under another name: "kernels", because the root of a checkout is on
    # sys.path (``python -m ...`` run there) and something probed for a package of that name
    # (Transformers looks for Hugging Face's ``kernels`` package by importing it). Running the package
    # a second time would define the ``fp_kernels::flash_prefill`` torch.library op again, which
    # destroys the first registration while compiled code and ``fp_kernels`` still call it (a crash
    # or a garbled error, depending on the heap). So under any other name this package stays empty.
    __all__: list[str] = []
else:
    from .api import SUPPORTED_HEAD_DIMS, flash_prefill
    from .info import FlashPrefillInfo
    from .reference import (
        block_scores_reference,
        flash_prefill_reference,
        pool_keys_reference,
        select_blocks_reference,
        sparse_attention_reference,
    )

    __all__ = [
        "SUPPORTED_HEAD_DIMS",
        "FlashPrefillInfo",
        "block_scores_reference",
        "flash_prefill",
        "flash_prefill_reference",
        "pool_keys_reference",
        "select_blocks_reference",
        "sparse_attention_reference",
    ]
