"""Public entry point: backend choice, the ``torch.library`` custom op and :func:`flash_prefill`."""

from __future__ import annotations

import functools
import logging

import torch

from .backend import MIN_TRITON, interpreter_enabled, kernel_backend_reason, triton_available, triton_problem
from .geometry import density_from_counts, normalize_ranges, num_key_blocks, num_query_slots, slot_geometry
from .info import FlashPrefillInfo
from .rules import BlockRules, resolve_rules, schema_arguments
from .validation import SUPPORTED_HEAD_DIMS, validate_inputs, validate_inputs_once

logger = logging.getLogger(__name__)

# re-exported: fp_kernels.api is where callers have found them
__all__ = [
    "BACKENDS",
    "MIN_TRITON",
    "SUPPORTED_HEAD_DIMS",
    "flash_prefill",
    "interpreter_enabled",
    "kernel_backend_reason",
    "log_once",
    "make_info",
    "triton_available",
    "triton_problem",
    "validate_inputs",
    "validate_inputs_once",
]


@functools.cache
def log_once(message: str) -> None:
    """Log ``message`` at INFO level the first time it is seen (``log_once.cache_clear()`` forgets)."""
    logger.info(message)


BACKENDS = ("auto", "triton", "reference")


def _run(q, k, v, kv_start, kv_end, scale: float, backend: str, rules: BlockRules):
    reason = kernel_backend_reason(q) if backend != "reference" else "backend='reference' was asked for"
    if backend == "triton" and reason is not None:
        raise ValueError(f"backend='triton' cannot run these inputs: {reason}")
    if reason is None:
        from .pipeline import flash_prefill_triton

        return flash_prefill_triton(q, k, v, rules, scale, kv_start, kv_end)
    log_once(f"flash_prefill: using the PyTorch reference: {reason}")
    from .reference import flash_prefill_reference

    out, info = flash_prefill_reference(
        q, k, v, scale=scale, kv_start=kv_start, kv_end=kv_end, rules=rules, return_info=True,
    )
    return out, info.block_index, info.block_count


# The custom op takes scalars, not objects: the block rules cross this one boundary as their fields, in
# BlockRules' declaration order (the schema is built from those fields, BlockRules.as_scalars /
# from_scalars convert).
OP_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor? kv_start, Tensor? kv_end, float scale, str backend, "
    f"{schema_arguments()}) -> (Tensor, Tensor, Tensor)"
)


def _flash_prefill_op_impl(q, k, v, kv_start, kv_end, scale, backend, *rule_values):
    out, index, count = _run(q, k, v, kv_start, kv_end, scale, backend, BlockRules.from_scalars(rule_values))
    return out, index, count


_flash_prefill_op = torch.library.custom_op(
    "fp_kernels::flash_prefill", _flash_prefill_op_impl, mutates_args=(), schema=OP_SCHEMA
)


@_flash_prefill_op.register_fake
def _(q, k, v, kv_start, kv_end, scale, backend, *rule_values):
    rules = BlockRules.from_scalars(rule_values)
    batch, q_len, hq, _ = q.shape
    k_len, hkv = k.shape[1], k.shape[2]
    hsel = hkv if rules.group_select else hq
    n_slots = num_query_slots(q_len, k_len, rules.block_size, kv_start is not None or kv_end is not None)
    nkb = num_key_blocks(k_len, rules.block_size)
    out = q.new_empty(batch, q_len, hq, v.shape[-1])
    index = q.new_empty(batch, hsel, n_slots, nkb, dtype=torch.int32)
    count = q.new_empty(batch, hsel, n_slots, dtype=torch.int32)
    return out, index, count


def flash_prefill(
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
    backend: str = "auto",
    mean_correction: bool | None = None,
    rules: BlockRules | None = None,
):
    """Block-sparse causal prefill attention (FlashPrefill).

    The block rules come either as one :class:`BlockRules` (``rules=``, the way to pass them on) or as
    the individual keywords ``alpha, block_size, sink_blocks, window_blocks, last_dense_blocks,
    min_budget, group_select, mean_correction``, of which the ones left out (``None``) take
    :class:`BlockRules`' defaults (``0.12, 128, 2, 4, 2, 0, False, False``): ``flash_prefill(q, k, v,
    0.2, 64)`` equals ``flash_prefill(q, k, v, rules=BlockRules(alpha=0.2, block_size=64))``. Giving
    ``rules=`` and a rule keyword raises ``ValueError``.

    Args:
        q: ``[B, Lq, Hq, D]``; k, v: ``[B, Lk, Hkv, D]`` (FlashAttention layout, any strides).
            ``Hq`` must be a multiple of ``Hkv`` (GQA: query head ``h`` reads kv head
            ``h // (Hq // Hkv)``; K/V are never repeated). ``D`` in 64, 80, 96, 128, 256.
        alpha: a float in [0, 1]. Keep key block ``j`` of a query block when its score is at least
            ``alpha`` times the best block's (in probability terms); 0 keeps everything (dense),
            larger is sparser. The score of block ``j`` is ``logsumexp_r(scale * q_r . mean_key_j)``
            over the query rows ``r`` of the block that see *all* of block ``j`` (row position >= the
            block's last key): every row for an earlier block, only the block's last row for the
            diagonal block (a row never scores a mean that includes its future keys).
        block_size: tokens per query/key block, a power of two >= 16.
        sink_blocks, window_blocks, last_dense_blocks: always computed: the first key blocks, the
            last visible ones (diagonal included), and every block of the final query blocks.
        min_budget: additionally keep the ``min_budget`` best-scoring blocks of each query block.
        scale: softmax scale, default ``1 / sqrt(D)``.
        kv_start, kv_end: optional ``[B]`` integer tensors on ``q``'s device, the valid key range
            ``[start, end)`` of each row (left/right padding; default ``0`` and ``Lk``). Blocks are
            laid out from ``kv_start``, so a padded row gets exactly the result it would get alone;
            query rows before ``kv_start`` are 0. The values are not checked (that would need a
            host sync): they are clamped to ``[0, Lk]``, and a row with ``kv_end <= kv_start``
            (after clamping) has no valid key, so its output is all zeros and its density 0. The
            kernels and the reference apply the same rule.
        group_select: share one selection per GQA group (the union of its heads' selections)
            instead of selecting per query head.
        return_info: also return a :class:`FlashPrefillInfo` (density, block lists).
        backend: ``"auto"`` (below), ``"triton"`` (raise if the kernels cannot run) or
            ``"reference"`` (always :func:`flash_prefill_reference`).
        mean_correction: give every skipped key block before the query block one stand-in term
            in the softmax instead of dropping it (as FlashPrefill v2's optional correction). For a
            query row of local query block ``i`` (block coordinates as for the selection: from
            ``kv_start``, queries aligned bottom-right) and every key block ``j < i`` that the row's
            selection does not list, with ``n_j`` its valid keys (the last valid block counts its
            true length) and ``kbar_j``/``vbar_j`` its mean key/value, the softmax denominator gains
            ``n_j exp(scale q . kbar_j)`` and the numerator that times ``vbar_j``. Blocks ``j >= i``
            (the diagonal band) are never corrected; every row of block ``i`` sees all of a block
            ``j < i``, so no row gets a mean over its future keys (query rows past ``kv_end`` see
            every valid block, and all of them are ``< i``). By Jensen each stand-in is a lower bound of the skipped
            block's mass. With ``alpha=0`` and ``min_budget=0`` nothing is skipped and the output is
            unchanged. The kernels and the reference apply the same rule; costs one more pooled
            tensor (mean values), a byte map of the listed blocks (a quarter of the block lists'
            size) and one stand-in column per key block before the query block (the kernel
            computes the listed ones too and masks them: its loop is latency-bound).
        rules: all of the above block rules as one :class:`BlockRules` (instead of the keywords).

    Causal alignment is bottom-right when ``Lq < Lk`` (a continued prefill on a cache): query row
    ``i`` sees keys ``0 .. i + Lk - Lq``. For ``Lq = 2``, ``Lk = 5`` (``x`` = attended)::

        x x x x 0
        x x x x x

    Returns ``out [B, Lq, Hq, D]`` (contiguous, ``q.dtype``), and the info when asked.

    CUDA fp16/bf16 inputs run the Triton kernels; so do CPU fp16/fp32 inputs under
    ``TRITON_INTERPRET=1``. Anything else (fp32 on the GPU, CPU without the interpreter, no Triton)
    runs :func:`flash_prefill_reference`, with one logged note.
    """
    validate_inputs_once(q, k, v, scale, kv_start, kv_end, for_kernel=True)
    compiling = torch.compiler.is_compiling()
    rules = resolve_rules(rules, {
        "alpha": alpha, "block_size": block_size, "sink_blocks": sink_blocks, "window_blocks": window_blocks,
        "last_dense_blocks": last_dense_blocks, "min_budget": min_budget, "group_select": group_select,
        "mean_correction": mean_correction,
    }, "flash_prefill", remember=not compiling)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    # the custom op is what torch.compile/CUDA-graph tracing needs; eager calls skip its dispatch cost
    if compiling:
        out, index, count = _flash_prefill_op(q, k, v, kv_start, kv_end, scale, backend, *rules.as_scalars())
    else:
        out, index, count = _run(q, k, v, kv_start, kv_end, scale, backend, rules)
    if not return_info:
        return out
    return out, make_info(q, k, index, count, rules, kv_start, kv_end)


def make_info(q, k, index, count, rules: BlockRules, kv_start, kv_end):
    """Build :class:`FlashPrefillInfo` from kernel outputs (device ops only, no host sync), with exact
    ``computed_blocks``/``visible_blocks`` counts over the prompt's query blocks."""
    from .geometry import block_totals

    block_size = rules.block_size
    batch, q_len, hq, _ = q.shape
    k_len = k.shape[1]
    start, end = normalize_ranges(batch, k_len, kv_start, kv_end, q.device)
    geo = slot_geometry(q_len, k_len, block_size, start, end, count.shape[-1], rules.last_dense_blocks)
    nkb = index.shape[-1]
    # entries past the count are scratch in the kernel output; make them -1 as documented
    valid = torch.arange(nkb, device=index.device) < count[..., None]
    index = torch.where(valid, index, torch.full_like(index, -1))
    computed, visible = block_totals(count, geo, hq)
    return FlashPrefillInfo(
        density=density_from_counts(count, geo, hq),  # = computed / visible
        block_index=index,
        block_count=count,
        block_size=block_size,
        group_select=rules.group_select,
        computed_blocks=computed,
        visible_blocks=visible,
    )
