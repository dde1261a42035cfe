"""FlashPrefill settings: one frozen dataclass, per-model defaults, JSON files.

``FlashPrefillConfig`` holds every knob of the sparse prefill with one spelling each; it is
validated when built, so a bad value fails where it is written, not deep inside a forward pass.
Its block rules are :class:`fp_kernels.BlockRules`' fields (it extends that class), so a rule added
there is a setting here, in ``configure`` and in the JSON files with no change to this module.
``MODEL_DEFAULTS`` maps ``config.model_type`` to the published per-model settings.

JSON format (what :meth:`FlashPrefillConfig.to_json` writes and :meth:`FlashPrefillConfig.from_json`
reads): one object with the field names below as keys; every key is optional (missing keys take the
dataclass defaults), unknown keys are an error. ``layer_alpha`` is an object keyed by layer index::

    {"alpha": 0.12, "block_size": 128, "dense_layers": [0, 1], "layer_alpha": {"5": 0.2}}

A ``"speed_guard"`` key (written by older versions) is ignored, with one logged warning: which calls
run sparse is decided by ``min_sparse_len`` and ``dense_layers`` alone (:mod:`fp_tools.speed_calibration`
measures both for a model and GPU).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fp_kernels.rules import BlockRules, check_count, check_flag, check_fraction

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "reference")
RETIRED_KEY = "speed_guard"  # a field of older versions; from_dict ignores it (one warning)
_retired_logged: list = []


@dataclass(frozen=True)
class FlashPrefillConfig(BlockRules):
    """Settings of the ``"flashprefill"`` attention implementation.

    The block rules are :class:`fp_kernels.BlockRules`' fields, inherited with their defaults and
    their checks (``alpha``, ``block_size``, ``sink_blocks``, ``window_blocks``, ``last_dense_blocks``,
    ``min_budget``, ``group_select``, ``mean_correction``: see :class:`fp_kernels.BlockRules`);
    :meth:`rules_for` gives the rules of one layer, which the attention function passes to the
    operator. The fields below are this layer's own. A value of the wrong type raises ``TypeError``,
    one out of range ``ValueError``.

    Attributes:
        min_sparse_len: calls with fewer query tokens than this run dense SDPA (short prompts gain
            nothing from block skipping; decode, one token, is always dense). Together with
            ``dense_layers`` this is the whole speed policy: which calls run sparse is a pure
            function of the call and these settings (never of timings), so one prompt gives one
            answer. Per-model values live in :data:`MODEL_DEFAULTS`; ``flashprefill calibrate
            MODEL --speed`` measures them on your GPU.
        dense_layers: layer indices that always run dense SDPA (e.g. ``(0, 1)``).
        layer_alpha: per-layer ``alpha`` overrides, ``{layer_idx: alpha}``.
        backend: ``"auto"`` (Triton kernels where they run, the PyTorch reference on the CPU, dense
            SDPA on other devices/dtypes the kernels can't take), ``"triton"`` (kernels or an error)
            or ``"reference"`` (always the pure-PyTorch reference; slow, for tests).
        strict: raise :class:`fp_patch.FlashPrefillFallbackError` instead of silently running dense
            SDPA when a call that should be sparse cannot be (unsupported head dim, mask, device...).
            Calls that are dense by design (decode, short or non-causal queries, sliding-window and
            ``dense_layers`` layers) never raise.
    """

    min_sparse_len: int = 2048
    dense_layers: tuple[int, ...] = ()
    layer_alpha: Mapping[int, float] = field(default_factory=dict)
    backend: str = "auto"
    strict: bool = False

    def __post_init__(self):
        super().__post_init__()  # the block rules
        check_count("min_sparse_len", self.min_sparse_len, 2, "query tokens")
        if isinstance(self.dense_layers, (str, bytes)) or not isinstance(self.dense_layers, Iterable):
            raise TypeError(
                f"dense_layers must be a list of layer indices, got {type(self.dense_layers).__name__} "
                f"{self.dense_layers!r}; e.g. dense_layers=[0, 1]"
            )
        layers = tuple(sorted({check_count("dense_layers entry", i, 0, "a layer index") for i in self.dense_layers}))
        object.__setattr__(self, "dense_layers", layers)
        if not isinstance(self.layer_alpha, Mapping):
            raise TypeError(
                f"layer_alpha must be a mapping {{layer_idx: alpha}}, got {type(self.layer_alpha).__name__} "
                f"{self.layer_alpha!r}; e.g. layer_alpha={{5: 0.2}}"
            )
        overrides = {}
        for key, value in self.layer_alpha.items():
            # JSON object keys are strings; accept "5" as layer 5
            layer = int(key) if isinstance(key, str) and key.isdigit() else key
            overrides[check_count("layer_alpha key", layer, 0, "a layer index")] = check_fraction(
                f"layer_alpha[{layer}]", value)
        object.__setattr__(self, "layer_alpha", dict(sorted(overrides.items())))
        check_flag("strict", self.strict)
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        # what the attention function passes per call, built once: the rules of every layer
        base = self.block_rules()
        object.__setattr__(self, "_rules", base)
        object.__setattr__(self, "_layer_rules", {i: base.replace(alpha=a) for i, a in self.layer_alpha.items()})

    def __hash__(self):
        return hash(self.to_json())

    def alpha_for(self, layer_idx: int | None) -> float:
        """The alpha of layer ``layer_idx`` (its override, else :attr:`alpha`)."""
        return self.layer_alpha.get(layer_idx, self.alpha)

    def rules_for(self, layer_idx: int | None) -> BlockRules:
        """The :class:`fp_kernels.BlockRules` of layer ``layer_idx``: these rules with the layer's
        ``layer_alpha`` override applied (built once, with the settings)."""
        return self._layer_rules.get(layer_idx, self._rules)

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (``layer_alpha`` keys become strings, tuples become lists)."""
        out = dataclasses.asdict(self)
        out["dense_layers"] = list(self.dense_layers)
        out["layer_alpha"] = {str(k): v for k, v in self.layer_alpha.items()}
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> FlashPrefillConfig:
        """Inverse of :meth:`to_dict`; missing keys take the defaults, unknown keys raise ``ValueError``
        (except the retired ``"speed_guard"``: ignored, with one logged warning)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"expected a mapping of FlashPrefillConfig fields, got {type(data).__name__}")
        if RETIRED_KEY in data:
            data = {key: value for key, value in data.items() if key != RETIRED_KEY}
            if not _retired_logged:
                _retired_logged.append(True)
                logger.warning(
                    "flashprefill: the setting %r is ignored: the runtime speed guard was removed; which calls "
                    "run sparse is decided by min_sparse_len and dense_layers (measure them with "
                    "`flashprefill calibrate MODEL --speed`). Delete the key to silence this warning.",
                    RETIRED_KEY,
                )
        unknown = set(data) - set(field_names())
        if unknown:
            raise ValueError(f"unknown FlashPrefillConfig field(s) {sorted(unknown)}; valid: {field_names()}")
        return cls(**data)

    def to_json(self, path: str | Path | None = None) -> str:
        """The JSON text (sorted keys); also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, source: str | Path) -> FlashPrefillConfig:
        """Read a config from JSON text or from a file path."""
        text = str(source)
        if not text.lstrip().startswith("{"):
            text = Path(source).read_text()
        return cls.from_dict(json.loads(text))


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(FlashPrefillConfig)]


# Per-model defaults: the published alphas (official FlashPrefill code) and the prompt length from
# which sparse prefill is faster than dense SDPA (min_sparse_len); everything else keeps the
# dataclass defaults above.
MODEL_DEFAULTS: dict[str, dict] = {
    "llama": {"alpha": 0.18, "min_sparse_len": 8192},
    "qwen2": {"alpha": 0.08, "min_sparse_len": 4096},
    "qwen3": {"alpha": 0.12, "min_sparse_len": 8192},
    "qwen3_moe": {"alpha": 0.12, "min_sparse_len": 8192},
    "qwen2_5_vl": {"alpha": 0.10, "min_sparse_len": 4096},
    "qwen3_vl": {"alpha": 0.22, "min_sparse_len": 8192},
    "qwen3_vl_moe": {"alpha": 0.22, "min_sparse_len": 8192},
}
# min_sparse_len: the crossover length on an H200 (benchmarks/crossover.py), from which sparse prefill
# is faster than SDPA at every longer length, at the densities the paper reports (70 % at 4K falling to
# 3.5 % at 256K). Qwen3 and Qwen3-VL take Llama-3.1-8B's value (the same 32/8-head, D=128 attention),
# Qwen2.5-VL Qwen2.5-7B's. `flashprefill calibrate --model DIR --speed` finds it for another model or GPU.

# Small models are bound by the host issuing kernels well past those lengths (SmolLM2-135M, hidden
# size 576): models of at most this hidden size get at least this min_sparse_len.
SMALL_MODEL_HIDDEN_SIZE = 1024
SMALL_MODEL_MIN_SPARSE_LEN = 16384

_unknown_logged: set[str] = set()


def canonical_model_type(model_type: str | None) -> str | None:
    """``config.model_type`` of the whole model: the text decoder of a VL model reports
    ``"qwen2_5_vl_text"``, whose defaults are those of ``"qwen2_5_vl"``."""
    if model_type and model_type not in MODEL_DEFAULTS and model_type.endswith("_text"):
        return model_type[: -len("_text")]
    return model_type


def defaults_for(model_type: str | None, hidden_size: int | None = None) -> FlashPrefillConfig:
    """Per-model defaults for ``config.model_type``; unknown types get the generic defaults (logged once).
    With ``hidden_size`` at most ``SMALL_MODEL_HIDDEN_SIZE``, ``min_sparse_len`` is at least
    ``SMALL_MODEL_MIN_SPARSE_LEN`` (see :func:`model_defaults`)."""
    key = canonical_model_type(model_type)
    cfg = FlashPrefillConfig(**MODEL_DEFAULTS[key]) if key in MODEL_DEFAULTS else _generic_defaults(model_type)
    small = hidden_size is not None and hidden_size <= SMALL_MODEL_HIDDEN_SIZE
    if small and cfg.min_sparse_len < SMALL_MODEL_MIN_SPARSE_LEN:
        cfg = cfg.replace(min_sparse_len=SMALL_MODEL_MIN_SPARSE_LEN)
    return cfg


def model_defaults(config) -> FlashPrefillConfig:
    """:func:`defaults_for` a Transformers config: its ``model_type`` and the hidden size of its text
    decoder (the text config of a VL model)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return defaults_for(getattr(config, "model_type", None), getattr(text, "hidden_size", None))


def _generic_defaults(model_type: str | None) -> FlashPrefillConfig:
    key = canonical_model_type(model_type)
    generic = FlashPrefillConfig()
    if key not in _unknown_logged:
        _unknown_logged.add(key)
        # visible by default: the model runs sparse with settings nobody checked on it
        logger.log(
            logging.INFO if model_type is None else logging.WARNING,
            "flashprefill: model_type %r is untested (not in fp_patch.MODEL_DEFAULTS); it runs sparse with the "
            "generic defaults alpha=%s, block_size=%d, sink_blocks=%d, window_blocks=%d, last_dense_blocks=%d, "
            "min_sparse_len=%d. Compare with sdpa (flashprefill eval --model DIR) or calibrate "
            "(flashprefill calibrate --model DIR), then fp_patch.configure(model, alpha=...)",
            model_type,
            generic.alpha,
            generic.block_size,
            generic.sink_blocks,
            generic.window_blocks,
            generic.last_dense_blocks,
            generic.min_sparse_len,
        )
    return generic


# ---------------------------------------------------------------------------------------------
# Which settings a model's attention layers use
#
# Each decoder attention module carries its FlashPrefillConfig in the attribute below (set by
# `configure` or `fp_patch.configured`, or on its first call from the per-model defaults), so the
# attention function reads one plain attribute per call (also under torch.compile).

MODULE_ATTR = "_flashprefill_config"


def is_decoder_attention(module) -> bool:
    """Causal self-attention modules of a decoder (they carry ``layer_idx``; vision ones don't)."""
    return getattr(module, "is_causal", None) is True and hasattr(module, "layer_idx")


def config_for_module(module, *, cache: bool = True) -> FlashPrefillConfig:
    """The settings an attention module runs with: set by ``configure``, else the defaults of its
    model type (then remembered on the module when ``cache``)."""
    cfg = getattr(module, MODULE_ATTR, None)
    if cfg is not None:
        return cfg
    config = getattr(module, "config", None)
    cfg = model_defaults(config) if config is not None else defaults_for(None)
    if cache:
        setattr(module, MODULE_ATTR, cfg)
    return cfg


def _decoder_attention_modules(model) -> list:
    modules = [m for m in model.modules() if is_decoder_attention(m)]
    if not modules:
        raise ValueError(
            f"{type(model).__name__} has no decoder attention modules (modules with is_causal=True and a "
            "layer_idx); pass the Transformers model itself"
        )
    return modules


def get_config(model) -> FlashPrefillConfig:
    """The settings ``model``'s decoder layers currently use (per-model defaults until configured)."""
    return config_for_module(_decoder_attention_modules(model)[0])


def configure(model, config: FlashPrefillConfig | None = None, **overrides) -> FlashPrefillConfig:
    """Set the FlashPrefill settings of ``model`` (all its decoder layers); returns them.

    ``config`` replaces the current settings; ``overrides`` (any :class:`FlashPrefillConfig` field)
    apply on top of ``config``, or of the model's current settings (its per-model defaults at
    first)::

        fp_patch.configure(model, alpha=0.1, dense_layers=[0, 1])
        fp_patch.configure(model, FlashPrefillConfig.from_json("calibrated.json"))
        fp_patch.configure(model, fp_patch.defaults_for(model.config.model_type))   # back to defaults

    Takes effect at the next forward pass; works whether or not the model already runs
    ``"flashprefill"`` (select it with ``model.set_attn_implementation("flashprefill")``).
    """
    if config is not None and not isinstance(config, FlashPrefillConfig):
        raise TypeError(
            f"config must be a FlashPrefillConfig, got {type(config).__name__}; "
            "for a dict use FlashPrefillConfig.from_dict(...)"
        )
    modules = _decoder_attention_modules(model)
    if config is not None and not overrides:
        cfg = config  # frozen: shared as is
    else:
        cfg = (config or config_for_module(modules[0])).replace(**overrides)
    for module in modules:
        if getattr(module, MODULE_ATTR, None) != cfg:  # equal settings keep their object (and what hangs on it)
            setattr(module, MODULE_ATTR, cfg)
    return config_for_module(modules[0])
