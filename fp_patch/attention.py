"""The ``"flashprefill"`` attention function: sparse prefill where it applies, dense SDPA elsewhere.

Same signature and return contract as Transformers' ``sdpa_attention_forward``: ``query`` is
``[B, Hq, Lq, D]``, ``key``/``value`` are ``[B, Hkv, Lk, D]`` (not repeated for GQA), and the output
is ``[B, Lq, Hq, D]`` contiguous (the caller reshapes it to ``[B, Lq, Hq * D]``).

Routing, in order (the first match decides):

============================================  ===========================================
call                                          goes to
============================================  ===========================================
``cu_seq_lens_q/k`` given (packed sequences)  dense SDPA per sequence (``packed_sequences``)
non-causal (vision towers, encoders)          dense SDPA (``non_causal``)
``Lq == 1`` (decode)                          dense SDPA (``decode``)
autograd or dropout (training)                dense SDPA (``training``)
softcap / position bias / sinks / head mask   dense SDPA (``unsupported_argument``)
sliding-window layer                          dense SDPA (``sliding_window``)
layer in ``dense_layers``                     dense SDPA (``dense_layer``)
``Lq < min_sparse_len``                       dense SDPA (``short_query``)
head dim not in 64/80/96/128/256              dense SDPA (``head_dim``)
GPU dtype/device the kernels can't take       dense SDPA (``device_dtype``)
mask ``None`` (``Lq == Lk``, or an empty      FlashPrefill; with ``Lk > Lq`` only the first
StaticCache: ``Lk = max_cache_len > Lq``)     ``Lq`` keys are real and the rest is cut off,
                                              exactly as Transformers' SDPA path does
bool/additive mask that is a causal per-row   FlashPrefill with ``kv_start``/``kv_end``
key range (left/right padding, chunked        (padded query rows give zeros)
prefill on a cache)
any other mask (packed, custom, per-head)     dense SDPA (``mask_not_range``/``mask_layout``)
a mask while compiling                        dense SDPA (``compiled_mask``: checking it
                                              would need a host sync)
============================================  ===========================================

Routing is a pure function of the call (shapes, dtype, device, mask, keyword arguments, the module's
``layer_idx``/``is_causal``/``sliding_window``) and the settings (:class:`fp_patch.FlashPrefillConfig`):
no timings, no call counters, nothing kept on the modules between calls. The same prompt with the
same settings runs the same kernels and gives the same bits. Below ``min_sparse_len`` (per model in
:data:`fp_patch.MODEL_DEFAULTS`) a call is exactly Transformers' SDPA call, so the logits are those of
``attn_implementation="sdpa"`` bit for bit. :func:`fp_patch.record_density` sees exactly these calls
(recording only asks the operator for its block lists as well).

Each fallback reason is logged once (INFO for the by-design ones, WARNING otherwise); with
``strict=True`` the non-by-design ones raise :class:`FlashPrefillFallbackError` instead.

Masks are checked, not trusted (:mod:`fp_patch.masks`): one host sync per mask tensor, shared by
every layer of a forward pass.
"""

from __future__ import annotations

import functools
import logging

import fp_kernels
import torch
from fp_kernels import SUPPORTED_HEAD_DIMS
from fp_kernels.backend import kernel_backend_reason
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .config import config_for_module
from .masks import key_ranges
from .recording import active_recorder
from .routes import BY_DESIGN, Dense, Route, Sparse

__all__ = [
    "BY_DESIGN",
    "Dense",
    "FlashPrefillFallbackError",
    "Route",
    "Sparse",
    "flashprefill_attention_forward",
    "log_once",
    "route",
]

logger = logging.getLogger(__name__)

# keyword arguments that change the math in ways the sparse operator does not implement
_UNSUPPORTED_KWARGS = ("softcap", "position_bias", "s_aux", "sinks", "head_mask")


class FlashPrefillFallbackError(RuntimeError):
    """A call that should run sparse cannot (raised only with ``strict=True``)."""


def flashprefill_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Transformers attention function for ``attn_implementation="flashprefill"`` (see module docstring)."""
    compiling = torch.compiler.is_compiling()
    cfg = config_for_module(module, cache=not compiling)
    if scaling is None:
        scaling = getattr(module, "scaling", None)
    q_len, k_len = query.shape[2], key.shape[2]

    if kwargs.get("cu_seq_lens_q") is not None or kwargs.get("cu_seq_lens_k") is not None:
        _report_dense(module, Dense("packed_sequences", "packed sequences run dense SDPA per sequence"), cfg,
                      q_len, k_len)
        return _packed_sdpa(module, query, key, value, dropout, scaling, kwargs), None

    where = route(module, query, key, value, attention_mask, dropout, kwargs, cfg)
    if isinstance(where, Dense):
        _report_dense(module, where, cfg, q_len, k_len)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)

    layer_idx = getattr(module, "layer_idx", None)
    rules = cfg.rules_for(layer_idx)
    rec = None if compiling else active_recorder()
    if rec is None:
        return _sparse(query, key, value, where, cfg, rules, scaling), None

    # recording: the same operator call, asked for its block lists too
    want_info = rec.wants_info
    result = _sparse(query, key, value, where, cfg, rules, scaling, want_info)
    out, info = result if want_info else (result, None)
    scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)

    def dense_fn():
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=scale,
                                      **kwargs)[0]

    rec.add_sparse(
        module, layer_idx, info, q_len=q_len, k_len=where.k_len, out=out, dense_fn=dense_fn,
        q=query.transpose(1, 2), k=key.transpose(1, 2)[:, : where.k_len], scale=scale, kv_start=where.kv_start,
        kv_end=where.kv_end,
    )
    return out, None


def route(module, query, key, value, attention_mask, dropout, kwargs, cfg) -> Route:
    """Where a (non-packed) call runs: :class:`Sparse` or :class:`Dense`, from the call and the
    settings alone (the table in the module docstring, in order)."""
    batch, _, q_len, head_dim = query.shape
    k_len = key.shape[2]
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    if not is_causal:
        return Dense("non_causal", "non-causal attention (vision/encoder) is always dense")
    if q_len == 1:
        return Dense("decode", "one query token")
    if dropout > 0 or (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)):
        return Dense("training", (
            "inputs need gradients or dropout: the sparse operator is inference-only (no backward); "
            "run under torch.no_grad() or torch.inference_mode() for the sparse path"
        ))
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            return Dense("unsupported_argument", f"the sparse operator does not implement {name!r}")
    if kwargs.get("sliding_window", getattr(module, "sliding_window", None)) is not None:
        return Dense("sliding_window", "sliding-window layers are already local")
    if getattr(module, "layer_idx", None) in cfg.dense_layers:
        return Dense("dense_layer", "layer listed in dense_layers")
    if q_len < cfg.min_sparse_len:
        return Dense("short_query", f"fewer than min_sparse_len={cfg.min_sparse_len} query tokens")
    if head_dim not in SUPPORTED_HEAD_DIMS or value.shape[-1] != head_dim:
        return Dense("head_dim", f"head dim {head_dim}/{value.shape[-1]} (supported: {SUPPORTED_HEAD_DIMS})")
    if cfg.backend == "auto" and query.device.type != "cpu":
        why = kernel_backend_reason(query)
        if why is not None:
            return Dense("device_dtype", why)
    if attention_mask is None:
        # Lk > Lq without a mask only happens on an empty StaticCache: the first Lq keys are the prompt,
        # the rest unfilled slots (Transformers' sdpa_attention_forward cuts them off the same way)
        return Sparse(q_len)
    if torch.compiler.is_compiling():
        return Dense("compiled_mask", "checking a mask under torch.compile would need a host sync")
    return key_ranges(attention_mask, batch, q_len, k_len)


# -- dense calls: say why (once), record, or raise in strict mode -----------------------------------


@functools.cache
def log_once(level: int, message: str) -> None:
    """Log ``message`` the first time it is seen (``log_once.cache_clear()`` forgets)."""
    logger.log(level, message)


def _log_once_while_tracing(ctx) -> None:
    """Run by torch.compile while it traces (``comptime``): a log line without a graph break."""
    log_once(ctx.get_local("level").as_python_constant(), ctx.get_local("message").as_python_constant())


def _report_dense(module, where: Dense, cfg, q_len: int, k_len: int) -> None:
    """Log (once) and record why this call runs dense SDPA; in strict mode raise instead, unless the
    reason is :data:`BY_DESIGN`."""
    reason, detail = where
    if cfg.strict and reason not in BY_DESIGN:
        raise FlashPrefillFallbackError(
            f"flashprefill cannot run this call sparse ({reason}: {detail}); fix the cause, or use "
            "strict=False to let it run dense SDPA"
        )
    level = logging.INFO if reason in BY_DESIGN else logging.WARNING
    message = f"flashprefill: dense SDPA for {reason} calls ({detail})"
    if torch.compiler.is_compiling():
        # a Python side effect would break the graph: log once at trace time, and record nothing
        from torch._dynamo.comptime import comptime

        comptime(_log_once_while_tracing)
        return
    log_once(level, message)
    rec = active_recorder()
    if rec is not None:
        rec.add_fallback(module, getattr(module, "layer_idx", None), reason, q_len=q_len, k_len=k_len)


def _packed_sdpa(module, query, key, value, dropout, scaling, kwargs) -> torch.Tensor:
    """``cu_seq_lens_q/k`` calls: dense SDPA per sequence, ``[1, T, H, D]``."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    is_causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    cu_q = cu_k if cu_q is None else cu_q
    cu_k = cu_q if cu_k is None else cu_k
    return _sdpa_packed(query, key, value, cu_q, cu_k, bool(causal), dropout, scaling)


def _sdpa_packed(query, key, value, cu_q, cu_k, causal: bool, dropout: float, scaling):
    """Dense attention over packed sequences ``[1, H, T, D]`` split by ``cu_seq_lens``; causal masks
    are aligned bottom-right per sequence (FlashAttention's varlen convention)."""
    if query.shape[0] != 1:
        raise ValueError(f"packed sequences (cu_seq_lens_q/k) need batch size 1, got {query.shape[0]}")
    group = query.shape[1] // key.shape[1]
    if group > 1:
        key = key.repeat_interleave(group, dim=1)
        value = value.repeat_interleave(group, dim=1)
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    if len(bounds_q) != len(bounds_k):
        raise ValueError(f"cu_seq_lens_q and cu_seq_lens_k disagree on the number of sequences: {cu_q}, {cu_k}")
    outs = []
    pairs_q = zip(bounds_q[:-1], bounds_q[1:], strict=True)
    pairs_k = zip(bounds_k[:-1], bounds_k[1:], strict=True)
    for (q0, q1), (k0, k1) in zip(pairs_q, pairs_k, strict=True):
        q, k, v = query[:, :, q0:q1], key[:, :, k0:k1], value[:, :, k0:k1]
        mask = None
        if causal and q1 - q0 > 1:
            rows = torch.arange(q1 - q0, device=q.device)[:, None] + (k1 - k0) - (q1 - q0)
            mask = torch.arange(k1 - k0, device=q.device)[None, :] <= rows
        outs.append(torch.nn.functional.scaled_dot_product_attention(q, k, v, mask, dropout, scale=scaling))
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous()


# -- sparse calls: the operator ------------------------------------------------------------------


def _sparse(query, key, value, where: Sparse, cfg, rules: fp_kernels.BlockRules, scaling, want_info: bool = False):
    """The FlashPrefill operator on Transformers' ``[B, H, L, D]`` tensors (viewed as ``[B, L, H, D]``);
    ``(out, info)`` with ``want_info``, else ``out``."""
    k_eff = where.k_len
    q = query.transpose(1, 2)
    k = key.transpose(1, 2)[:, :k_eff]
    v = value.transpose(1, 2)[:, :k_eff]
    scale = q.shape[-1] ** -0.5 if scaling is None else float(scaling)
    return fp_kernels.flash_prefill(  # looked up per call: tests and tools may wrap it
        q, k, v, scale=scale, kv_start=where.kv_start, kv_end=where.kv_end, rules=rules, return_info=want_info,
        backend=cfg.backend,
    )
