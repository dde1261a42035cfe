"""FlashPrefill for Hugging Face Transformers: ``import fp_patch`` registers ``attn_implementation="flashprefill"``.

::

    import fp_patch
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="flashprefill")
    fp_patch.configure(model, alpha=0.1, dense_layers=[0, 1])   # per-model defaults otherwise
    with fp_patch.record_density(model) as rec:
        model(input_ids)
"""

from .attention import BY_DESIGN, FlashPrefillFallbackError, flashprefill_attention_forward
from .config import MODEL_DEFAULTS, FlashPrefillConfig, configure, defaults_for, get_config, model_defaults
from .recording import record_density
from .registration import ATTN_NAME, INTERNAL_NAME, configured, register, unregister, uses_flashprefill

__all__ = [
    "ATTN_NAME",
    "BY_DESIGN",
    "INTERNAL_NAME",
    "MODEL_DEFAULTS",
    "FlashPrefillConfig",
    "FlashPrefillFallbackError",
    "configure",
    "configured",
    "defaults_for",
    "flashprefill_attention_forward",
    "get_config",
    "model_defaults",
    "record_density",
    "register",
    "unregister",
    "uses_flashprefill",
]

register()
