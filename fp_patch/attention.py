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

Masks are checked, not trusted: from the mask's last query row we read each batch row's valid key
range ``[start, end)`` and then compare the whole mask with the causal range mask the operator
implements (for the candidate key lengths ``Lk``, ``max(end)`` and ``Lq``). That costs one host sync
per forward pass (the result is reused by every layer that gets the same mask tensor).
"""

from __future__ import annotations

import logging
import weakref
from typing import NamedTuple

import fp_kernels
import torch
from fp_kernels import SUPPORTED_HEAD_DIMS
from fp_kernels.api import kernel_backend_reason
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .config import config_for_module
from .recording import active_recorder

logger = logging.getLogger(__name__)

# fallbacks that are the intended routing, not a degradation: logged at INFO, never raised in strict mode
BY_DESIGN = frozenset({"non_causal", "decode", "sliding_window", "dense_layer", "short_query"})
# keyword arguments that change the math in ways the sparse operator does not implement
_UNSUPPORTED_KWARGS = ("softcap", "position_bias", "s_aux", "sinks", "head_mask")
_logged: set[str] = set()


class FlashPrefillFallbackError(RuntimeError):
    """A call that should run sparse cannot (raised only with ``strict=True``)."""


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


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _log_once(level: int, message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.log(level, message)


def _log_once_while_tracing(ctx) -> None:
    """Run by torch.compile while it traces (``comptime``): a log line without a graph break."""
    _log_once(ctx.get_local("level").as_python_constant(), ctx.get_local("message").as_python_constant())


def _fallback(module, reason: str, detail: str, cfg, q_len: int, k_len: int) -> None:
    """Log (once), record, or raise in strict mode, why this call runs dense SDPA."""
    if cfg.strict and reason not in BY_DESIGN:
        raise FlashPrefillFallbackError(
            f"flashprefill cannot run this call sparse ({reason}: {detail}); fix the cause, or use "
            "strict=False to let it run dense SDPA"
        )
    level = logging.INFO if reason in BY_DESIGN else logging.WARNING
    message = f"flashprefill: dense SDPA for {reason} calls ({detail})"
    if _compiling():
        # a Python side effect would break the graph: log once at trace time, and record nothing
        from torch._dynamo.comptime import comptime

        comptime(_log_once_while_tracing)
        return
    _log_once(level, message)
    rec = active_recorder()
    if rec is not None:
        rec.add_fallback(module, getattr(module, "layer_idx", None), reason, q_len=q_len, k_len=k_len)


def _sdpa(module, query, key, value, attention_mask, dropout, scaling, kwargs):
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


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


# -- masks ------------------------------------------------------------------------------------------

# last analysed mask: (weakref, (version, q_len, k_len, batch), result); every layer of a forward pass
# receives the same mask tensor, so only the first layer pays for the check
_mask_cache: list = [None]


def _version(t: torch.Tensor):
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return None


# mask elements compared at once: bounds the check's temporaries (a padded 32K batch has a 1G-entry mask)
_CHECK_ELEMENTS = 1 << 26


def _allowed(rows: torch.Tensor):
    """``(allowed, values_ok)`` of mask rows: bool masks as they are; for an additive mask 0 is
    "attend" and a very negative value (``finfo.min`` as Transformers writes it, or -inf) "blocked",
    anything else is a bias the sparse operator does not apply (``values_ok`` False)."""
    if rows.dtype == torch.bool:
        return rows, None
    allowed = rows == 0
    return allowed, (allowed | (rows <= torch.finfo(rows.dtype).min / 2)).all()


def _analyse_mask(mask: torch.Tensor, batch: int, q_len: int, k_len: int):
    """:class:`Sparse` when ``mask`` is a causal per-row key range, else :class:`Dense`.

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
    step = max(1, _CHECK_ELEMENTS // (m.shape[0] * k_len))
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


def _mask_ranges(mask: torch.Tensor, batch: int, q_len: int, k_len: int) -> Route:
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, batch) or mask.shape[2] != q_len:
        return Dense("mask_layout", f"mask of shape {tuple(mask.shape)} (expected [B or 1, 1, Lq, Lk])")
    if mask.shape[-1] < k_len:
        return Dense("mask_layout", f"mask has {mask.shape[-1]} key columns for {k_len} keys")
    cached = _mask_cache[0]
    key = (_version(mask), q_len, k_len, batch)
    if cached is not None and cached[0]() is mask and cached[1] == key:
        return cached[2]
    result = _analyse_mask(mask[..., :k_len], batch, q_len, k_len)  # cut as Transformers' SDPA path does
    _mask_cache[0] = (weakref.ref(mask), key, result)
    return result


# -- the attention function -------------------------------------------------------------------------


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
    if _compiling():
        return Dense("compiled_mask", "checking a mask under torch.compile would need a host sync")
    return _mask_ranges(attention_mask, batch, q_len, k_len)


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
    compiling = _compiling()
    cfg = config_for_module(module, cache=not compiling)
    if scaling is None:
        scaling = getattr(module, "scaling", None)
    if kwargs.get("cu_seq_lens_q") is not None or kwargs.get("cu_seq_lens_k") is not None:
        return _packed(module, query, key, value, dropout, scaling, kwargs, cfg), None
    where = route(module, query, key, value, attention_mask, dropout, kwargs, cfg)
    if type(where) is Dense:
        _fallback(module, where.reason, where.detail, cfg, query.shape[2], key.shape[2])
        return _sdpa(module, query, key, value, attention_mask, dropout, scaling, kwargs)
    layer_idx = getattr(module, "layer_idx", None)
    rules = cfg.rules_for(layer_idx)
    rec = None if compiling else active_recorder()
    if rec is None:
        return _sparse(query, key, value, where, cfg, rules, scaling), None
    want_info = rec.wants_info
    result = _sparse(query, key, value, where, cfg, rules, scaling, want_info)
    out, info = result if want_info else (result, None)
    scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)

    def dense_fn():
        return _sdpa(module, query, key, value, attention_mask, 0.0, scale, kwargs)[0]

    k_eff = where.k_len
    rec.add_sparse(
        module, layer_idx, info, q_len=query.shape[2], k_len=k_eff, out=out, dense_fn=dense_fn,
        q=query.transpose(1, 2), k=key.transpose(1, 2)[:, :k_eff], scale=scale, kv_start=where.kv_start,
        kv_end=where.kv_end,
    )
    return out, None


def _packed(module, query, key, value, dropout, scaling, kwargs, cfg):
    """``cu_seq_lens_q/k`` calls: dense SDPA per sequence (logged/recorded as ``packed_sequences``)."""
    _fallback(module, "packed_sequences", "packed sequences run dense SDPA per sequence", cfg, query.shape[2],
              key.shape[2])
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    is_causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    cu_q = cu_k if cu_q is None else cu_q
    cu_k = cu_q if cu_k is None else cu_k
    return _sdpa_packed(query, key, value, cu_q, cu_k, bool(causal), dropout, scaling)


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
