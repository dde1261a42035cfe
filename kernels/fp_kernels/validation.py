"""Argument checks of ``flash_prefill`` and ``flash_prefill_reference`` (shared, so neither imports the other)."""

from __future__ import annotations

import math
import numbers

import torch

SUPPORTED_HEAD_DIMS = (64, 80, 96, 128, 256)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def validate_inputs(q, k, v, scale, kv_start, kv_end, *, for_kernel: bool) -> None:
    """Raise ``TypeError`` (wrong type) or ``ValueError`` (wrong value), naming what was expected,
    what came, and what to do. Reads no tensor values (no host sync): ``kv_start``/``kv_end`` are
    checked for shape, dtype and device only; their values are clamped as documented in
    :func:`flash_prefill`. The block rules are checked where they are built (:class:`BlockRules`)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}; convert it with torch.as_tensor")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D [batch, seqlen, heads, head_dim] (FlashAttention layout), got shape "
                f"{tuple(t.shape)}; for [batch, heads, seqlen, head_dim] tensors pass x.transpose(1, 2)"
            )
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"{name} must be float16, bfloat16 or float32, got {t.dtype}; cast it, e.g. {name}.to(torch.bfloat16)"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them first")
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}; move them with "
            "k.to(q.device), v.to(q.device)"
        )
    (batch, q_len, hq, dim), (kb, k_len, hkv, kd) = q.shape, k.shape
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape [batch, Lk, Hkv, D], got {tuple(k.shape)} and {tuple(v.shape)}; "
            "pass keys and values of the same tokens and heads (a value head dim other than the key's is "
            "not supported)"
        )
    if kb != batch:
        raise ValueError(f"q has batch {batch} but k/v have batch {kb}; pass the keys/values of the same batch rows")
    if kd != dim:
        raise ValueError(f"q has head_dim {dim} but k/v have head_dim {kd}; q, k and v must share one head_dim")
    if hkv == 0 or hq % hkv:
        raise ValueError(
            f"query heads ({hq}) must be a multiple of key/value heads ({hkv}) for grouped-query attention"
        )
    if q_len > k_len:
        raise ValueError(
            f"q has {q_len} tokens but k/v only {k_len}: queries are aligned bottom-right to the keys "
            "(the last query is the last key), so Lq <= Lk is required; pass the whole cache as k/v"
        )
    if for_kernel and dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"head_dim {dim} is not supported by the kernels (supported: {SUPPORTED_HEAD_DIMS}); "
            "use flash_prefill_reference or dense attention for this model"
        )
    if scale is not None:
        if not _is_real(scale):
            raise TypeError(f"scale must be a float or None (1/sqrt(head_dim)), got {type(scale).__name__} {scale!r}")
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale must be a positive finite number or None (1/sqrt(head_dim)), got {scale!r}")
    for name, t in (("kv_start", kv_start), ("kv_end", kv_end)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(
                f"{name} must be an integer tensor of shape ({batch},) (one key position per batch row), got "
                f"{t!r}; build it with torch.tensor([...], dtype=torch.int32, device=q.device)"
            )
        if t.shape != (batch,):
            raise ValueError(
                f"{name} must have shape ({batch},) (one key position per batch row), got {tuple(t.shape)}"
            )
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; move it with {name}.to(q.device)")


def _tensor_signature(t):
    """What :func:`validate_inputs` reads of an optional tensor argument (its type, shape, dtype, device)."""
    if t is None:
        return None
    return type(t), tuple(t.shape), t.dtype, t.device


def _scalar_signature(x):
    # the type too: True == 1 and 1.0 == 1 hash alike, but validation tells them apart
    return type(x), x


# signatures already validated (a set of hashable keys; validation reads no tensor values, so a call
# with the same signature as a validated one is valid too). Bounded: cleared when it grows past MAX.
_VALIDATED: set = set()
_MAX_VALIDATED = 4096


def validate_inputs_once(q, k, v, scale, kv_start, kv_end, *, for_kernel: bool) -> None:
    """:func:`validate_inputs`, run once per call signature (types, shapes, dtypes, devices and the
    scale): a model calls the operator with one signature in every layer. While torch.compile
    traces, the check runs in full (it costs nothing at run time there)."""
    if torch.compiler.is_compiling():
        validate_inputs(q, k, v, scale, kv_start, kv_end, for_kernel=for_kernel)
        return
    try:
        key = (
            type(q), type(k), type(v), tuple(q.shape), tuple(k.shape), tuple(v.shape), q.dtype, k.dtype, v.dtype,
            q.device, k.device, v.device, _scalar_signature(scale), _tensor_signature(kv_start),
            _tensor_signature(kv_end), for_kernel,
        )
        hash(key)
    except (AttributeError, TypeError):  # not tensors, or an unhashable setting: the full check says what is wrong
        key = None
    if key is not None and key in _VALIDATED:
        return
    validate_inputs(q, k, v, scale, kv_start, kv_end, for_kernel=for_kernel)
    if key is not None:
        if len(_VALIDATED) >= _MAX_VALIDATED:
            _VALIDATED.clear()
        _VALIDATED.add(key)
