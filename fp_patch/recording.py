"""Density recording (issue 4). CONTRACT used by fp_patch.attention (do not change the signatures).

The attention function calls, for every call it handles while a recorder is active:

    rec = active_recorder()          # None when not recording: the attention path must do nothing else
    if rec is not None:
        rec.add_sparse(module, layer_idx, info, q_len=..., k_len=..., out=out, dense_fn=fn)
        # or, when the call went to dense SDPA:
        rec.add_fallback(module, layer_idx, reason, q_len=..., k_len=...)

``info`` is an ``fp_kernels.FlashPrefillInfo``. ``dense_fn()`` recomputes the dense SDPA output
``[B, Lq, Hq, D]`` for the same call; it is only called in ``error=True`` mode. ``rec.wants_info``
tells the attention function whether to ask the operator for ``return_info=True``.
"""

from __future__ import annotations

import contextlib

_ACTIVE: list = []


def active_recorder():
    """The innermost active recorder, or None."""
    return _ACTIVE[-1] if _ACTIVE else None


class DensityRecorder:
    """Placeholder: issue 4 implements this."""

    wants_info = True

    def add_sparse(self, module, layer_idx, info, *, q_len, k_len, out=None, dense_fn=None):
        raise NotImplementedError

    def add_fallback(self, module, layer_idx, reason, *, q_len, k_len):
        raise NotImplementedError


@contextlib.contextmanager
def record_density(model, **options):
    rec = DensityRecorder()
    _ACTIVE.append(rec)
    try:
        yield rec
    finally:
        _ACTIVE.remove(rec)
