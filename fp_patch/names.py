"""The implementation's names, and whether a model runs it (see :mod:`fp_patch.registration` for why
there are two names)."""

from __future__ import annotations

ATTN_NAME = "flashprefill"
INTERNAL_NAME = "fp_prefill"


def uses_flashprefill(model_or_config) -> bool:
    """Whether a model (or config) runs the ``"flashprefill"`` implementation in any of its parts."""
    configs = []
    if hasattr(model_or_config, "modules"):
        configs = [getattr(m, "config", None) for m in model_or_config.modules()]
    else:
        stack = [model_or_config]
        while stack:
            config = stack.pop()
            configs.append(config)
            stack.extend(getattr(config, k, None) for k in getattr(config, "sub_configs", {}))
    return any(getattr(c, "_attn_implementation", None) == INTERNAL_NAME for c in configs if c is not None)
