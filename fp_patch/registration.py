"""Registration of ``attn_implementation="flashprefill"`` with Hugging Face Transformers.

What is registered, through the public interfaces:

* ``AttentionInterface.register(INTERNAL_NAME, flashprefill_attention_forward)``;
* ``AttentionMaskInterface.register(INTERNAL_NAME, <the "sdpa" mask function>)``: our function
  receives exactly the masks SDPA would (``None`` for unpadded causal prefill, a 4-D bool mask
  otherwise).

The one place Transformers is touched: the user-facing name
-------------------------------------------------------------
Transformers 5.x treats every implementation name containing ``"flash"`` as a FlashAttention request
(``utils.generic.is_flash_attention_requested`` is ``"flash" in name``, consulted in ~170 places:
``from_pretrained`` then tries to load a FlashAttention kernel and raises, masks are built for
FlashAttention, the Qwen-VL vision towers switch to packed ``cu_seq_lens`` calls...). So the
implementation is registered and stored in model configs under :data:`INTERNAL_NAME`, which contains
no ``"flash"``, and the user-facing :data:`ATTN_NAME` ``"flashprefill"`` is translated at the two
entry points through which a user's name reaches Transformers:

1. the ``PretrainedConfig._attn_implementation`` property setter, used by ``from_pretrained``,
   ``from_config``, ``Config(attn_implementation=...)`` and ``config._attn_implementation = ...``
   (it recurses into sub-configs through the same setter);
2. ``PreTrainedModel.set_attn_implementation``, which validates the name before storing it.

Both wrappers only rewrite the name argument and call the original; nothing else of Transformers is
replaced, and :func:`unregister` restores the originals. The translation is the same on every
supported version (4.57 would accept the name as is, but storing one name everywhere keeps behaviour
identical across versions). Vision sub-configs (``base_config_key`` naming a vision/audio encoder)
get ``"sdpa"`` instead: those towers are non-causal and always dense, so they never call our function.
``model.config._attn_implementation`` therefore reads :data:`INTERNAL_NAME`; use
:func:`uses_flashprefill` to ask whether a model runs FlashPrefill.
"""

from __future__ import annotations

import functools
import logging
import threading
from contextlib import contextmanager

from .config import FlashPrefillConfig, configure, is_decoder_attention, model_defaults
from .names import ATTN_NAME, INTERNAL_NAME, uses_flashprefill

logger = logging.getLogger(__name__)

__all__ = [
    "ATTN_NAME",
    "INTERNAL_NAME",
    "configured",
    "is_registered",
    "register",
    "translate_name",
    "unregister",
    "uses_flashprefill",
]

_OUR_NAMES = (ATTN_NAME, INTERNAL_NAME)
# sub-configs whose modules are encoders: they keep dense SDPA
_ENCODER_KEY_PARTS = ("vision", "audio", "image", "visual", "encoder")

_lock = threading.Lock()
# attribute of our wrappers holding what they wrap (restored by unregister)
_MARK = "__fp_patch_original__"


def _is_encoder_config(config) -> bool:
    key = getattr(type(config), "base_config_key", "") or ""
    return any(part in key for part in _ENCODER_KEY_PARTS)


def translate_name(config, name):
    """The name to store for ``config`` when the user asked for ``name`` (non-dict)."""
    if not isinstance(name, str) or name not in _OUR_NAMES:
        return name
    if config is not None and _is_encoder_config(config):
        return "sdpa"
    return INTERNAL_NAME


def _translate_tree(config, value):
    """Translate a ``set_attn_implementation`` argument (str or ``{sub_config_key: ...}``) for ``config``.

    A bare ``"flashprefill"`` becomes a dict so that encoder sub-configs get ``"sdpa"``.
    """
    if isinstance(value, dict):
        out = {}
        for key, sub in value.items():
            sub_config = config if key == "" else getattr(config, key, None)
            out[key] = translate_name(sub_config, sub) if key == "" else _translate_tree(sub_config, sub)
        return out
    if value not in _OUR_NAMES or config is None:
        return translate_name(config, value)
    sub_keys = [k for k in getattr(config, "sub_configs", {}) if getattr(config, k, None) is not None]
    if not sub_keys:
        return translate_name(config, value)
    out = {"": translate_name(config, value)}
    for key in sub_keys:
        out[key] = _translate_tree(getattr(config, key), value)
    return out


def _wrap_config_setter(prop: property) -> property:
    original_set = prop.fset

    @functools.wraps(original_set)
    def fset(self, value):
        if isinstance(value, dict):
            if "" in value:
                value = {**value, "": translate_name(self, value[""])}
        else:
            value = translate_name(self, value)
        original_set(self, value)

    setattr(fset, _MARK, prop)
    return property(prop.fget, fset, prop.fdel, prop.__doc__)


def _wrap_set_attn_implementation(original):
    @functools.wraps(original)
    def set_attn_implementation(self, attn_implementation, *args, **kwargs):
        return original(self, _translate_tree(self.config, attn_implementation), *args, **kwargs)

    setattr(set_attn_implementation, _MARK, original)
    return set_attn_implementation


def register() -> None:
    """Register ``attn_implementation="flashprefill"`` (idempotent; done by ``import fp_patch``)."""
    from transformers import AttentionInterface, PretrainedConfig, PreTrainedModel
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    from .attention import flashprefill_attention_forward

    with _lock:
        AttentionInterface.register(INTERNAL_NAME, flashprefill_attention_forward)
        AttentionMaskInterface.register(INTERNAL_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
        # the wrappers carry their original: registering twice (or after a module reload) wraps once
        prop = PretrainedConfig.__dict__["_attn_implementation"]
        if not hasattr(prop.fset, _MARK):
            PretrainedConfig._attn_implementation = _wrap_config_setter(prop)
        method = PreTrainedModel.__dict__["set_attn_implementation"]
        if not hasattr(method, _MARK):
            PreTrainedModel.set_attn_implementation = _wrap_set_attn_implementation(method)


def unregister() -> None:
    """Undo :func:`register`: remove both registrations and restore the wrapped Transformers methods.

    Models already built with the implementation keep its name in their config and will fail to
    find it; switch them first with ``model.set_attn_implementation("sdpa")``.
    """
    from transformers import AttentionInterface, PretrainedConfig, PreTrainedModel
    from transformers.masking_utils import AttentionMaskInterface

    with _lock:
        for interface in (AttentionInterface, AttentionMaskInterface):
            interface._global_mapping.pop(INTERNAL_NAME, None)
        prop = PretrainedConfig.__dict__["_attn_implementation"]
        if hasattr(prop.fset, _MARK):
            PretrainedConfig._attn_implementation = getattr(prop.fset, _MARK)
        method = PreTrainedModel.__dict__["set_attn_implementation"]
        if hasattr(method, _MARK):
            PreTrainedModel.set_attn_implementation = getattr(method, _MARK)


def is_registered() -> bool:
    from transformers import AttentionInterface, PretrainedConfig

    name_translated = hasattr(PretrainedConfig.__dict__["_attn_implementation"].fset, _MARK)
    return INTERNAL_NAME in AttentionInterface._global_mapping and name_translated


@contextmanager
def configured(config: FlashPrefillConfig | None = None, **overrides):
    """Settings for the models built inside the ``with`` block (a way to pass them at load time)::

        with fp_patch.configured(alpha=0.1, dense_layers=[0]):
            model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="flashprefill")

    ``config`` replaces the per-model defaults; ``overrides`` apply on top of ``config`` (or of the
    per-model defaults of each model built). Every model whose construction finishes inside the block
    and that runs ``"flashprefill"`` is configured as by :func:`fp_patch.configure`; others are left
    alone. While the block is open ``PreTrainedModel.post_init`` is wrapped to do this (restored on
    exit; not meant for several threads loading models at once).
    """
    from transformers import PreTrainedModel

    if config is not None and not isinstance(config, FlashPrefillConfig):
        raise TypeError(f"config must be a FlashPrefillConfig or None, got {type(config).__name__}")
    (config or FlashPrefillConfig()).replace(**overrides)  # validate now, not when a model is built
    original = PreTrainedModel.__dict__["post_init"]

    @functools.wraps(original)
    def post_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if uses_flashprefill(self) and any(is_decoder_attention(m) for m in self.modules()):
            base = config or model_defaults(self.config)
            configure(self, base, **overrides)

    PreTrainedModel.post_init = post_init
    try:
        yield
    finally:
        PreTrainedModel.post_init = original
