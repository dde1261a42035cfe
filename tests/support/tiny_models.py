"""Tiny models of the supported families and their inputs, shared by the model-level tests.

On a CPU-only machine the models run in float32 with ``backend="reference"`` (the pure-PyTorch operator);
with a GPU (or ``FLASHPREFILL_TEST_DEVICE=cuda``) in bfloat16 through the Triton kernels.
"""

from __future__ import annotations

import inspect
import math
import os

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

import fp_patch
from fp_patch.config import is_decoder_attention

VL_FAMILIES = {"qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"}
VOCAB = 256
TEXT_TOKENS = 240  # ids 240.. are reserved for the special tokens below
IMAGE, VIDEO, V_START, V_END = 250, 251, 252, 253
DEVICE = torch.device(os.environ.get("FLASHPREFILL_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
DTYPE = torch.float32 if DEVICE.type == "cpu" else torch.bfloat16

# settings every model test uses: many blocks from a few hundred tokens; on the CPU the PyTorch operator
# (tests/conftest.py may set TRITON_INTERPRET=1, which would route CPU calls through the slow interpreter)
TEST_SETTINGS = {"block_size": 16, "min_sparse_len": 32, "backend": "triton" if DEVICE.type == "cuda" else "reference"}


def tiny_config(family: str):
    """A fresh 2-layer config of ``family`` (configs are mutated by from_config: never share one)."""
    text = {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": VOCAB,
        "max_position_embeddings": 4096,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": None,
    }
    moe = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64, "decoder_sparse_step": 1}
    if family == "llama":
        return transformers.LlamaConfig(**text)
    if family == "qwen2":
        return transformers.Qwen2Config(**text)
    if family == "qwen3":
        return transformers.Qwen3Config(**text, head_dim=64)
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**text, head_dim=64, **moe)
    # VL: head dim 128 so that the usual M-RoPE sections (sum 64) fit
    text_vl = {**text, "hidden_size": 256, "head_dim": 128}
    special = {"image_token_id": IMAGE, "video_token_id": VIDEO, "vision_start_token_id": V_START,
               "vision_end_token_id": V_END}
    vision = {"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2, "out_hidden_size": 256,
              "spatial_merge_size": 2, "temporal_patch_size": 2}
    if family == "qwen2_5_vl":
        vision = {**vision, "patch_size": 14, "window_size": 56, "fullatt_block_indexes": [1]}
        rope = {"rope_type": "default", "mrope_section": [16, 24, 24]}  # transformers 4.57 wants it spelt out
        return transformers.Qwen2_5_VLConfig(text_config={**text_vl, "rope_scaling": rope}, vision_config=vision,
                                             **special)
    vision = {**vision, "patch_size": 16, "deepstack_visual_indexes": [0], "num_position_embeddings": 64}
    text_vl["rope_scaling"] = {"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True}
    if family == "qwen3_vl":
        return transformers.Qwen3VLConfig(text_config=text_vl, vision_config=vision, **special)
    if family == "qwen3_vl_moe":
        return transformers.Qwen3VLMoeConfig(text_config={**text_vl, **moe}, vision_config=vision, **special)
    raise ValueError(family)


def build(family: str, attn: str, seed: int = 0, local: float | None = None):
    """A tiny model of ``family``; ``local``: give it local attention of that sharpness (see below)."""
    torch.manual_seed(seed)
    auto = AutoModelForImageTextToText if family in VL_FAMILIES else AutoModelForCausalLM
    model = auto.from_config(tiny_config(family), attn_implementation=attn).eval()
    if local:
        make_attention_local(model, sharpness=local)
    return model.to(DEVICE, DTYPE)


def build_pair(family: str, local: float | None = None, **settings):
    """``(flashprefill model, sdpa model)`` with the same weights; ``settings`` on top of TEST_SETTINGS."""
    fp = build(family, "flashprefill", local=local)
    ref = build(family, "sdpa", seed=1)
    ref.load_state_dict(fp.state_dict())
    fp_patch.configure(fp, **{**TEST_SETTINGS, **settings})
    return fp, ref


# sharpness of make_attention_local: 15 keeps logits close with ~70-90 % density at 384 tokens;
# 27 skips more, for the shorter prompts of the padding and chunking tests
LOCAL, LOCAL_SHARP = 15.0, 27.0


def make_attention_local(model, sharpness: float, noise: float = 0.3):
    """Give the random model the attention structure of real LMs (mass near the diagonal), so that
    dropping far blocks is harmless and "sparse logits stay close to dense" is a real check.

    Every token embedding shares one large direction ``u``; with ``k_proj = q_proj`` (first heads)
    the query and key of every text token are nearly the same vector, so after RoPE the score depends
    on the distance ``i - j`` and peaks at 0 with ``scaling * q.k ~ sharpness`` (each q/k component
    gets magnitude ``c``: ``D c^2 / sqrt(D) = sharpness``). Image tokens (vision features) do not
    share ``u``; they are few and the text around them keeps the property.
    """
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.copy_(torch.randn(emb.shape[1]) + noise * torch.randn_like(emb))
        for module in model.modules():
            if not is_decoder_attention(module):
                continue
            q, k = module.q_proj, module.k_proj
            c = math.sqrt(sharpness / math.sqrt(module.head_dim))
            if getattr(module, "q_norm", None) is not None:  # Qwen3: q/k are RMS-normalised per head
                module.q_norm.weight.fill_(c)
                module.k_norm.weight.fill_(c)
            else:  # the normed hidden state has unit RMS, so a row of norm c gives components ~ c
                q.weight.mul_(c / q.weight.norm(dim=1, keepdim=True))
            k.weight.copy_(q.weight[: k.weight.shape[0]])
            for proj in (q, k):
                if proj.bias is not None:
                    proj.bias.zero_()


def text_ids(n: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(2, TEXT_TOKENS, (batch, n), generator=gen)


def model_inputs(model, family: str, n: int, with_image: bool = True) -> dict:
    """``n`` prompt tokens; VL families get a 4x4-patch image in the middle."""
    if family not in VL_FAMILIES or not with_image:
        return {"input_ids": text_ids(n)}
    vc = model.config.vision_config
    merged = 16 // vc.spatial_merge_size**2
    channels = getattr(vc, "in_channels", None) or getattr(vc, "in_chans", 3)
    ids = text_ids(n - merged - 2)
    half = ids.shape[1] // 2
    image = torch.tensor([[V_START] + [IMAGE] * merged + [V_END]])
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.cat([ids[:, :half], image, ids[:, half:]], dim=1)
    inputs = {
        "input_ids": input_ids,
        "pixel_values": torch.randn(16, channels * vc.temporal_patch_size * vc.patch_size**2, generator=gen),
        "image_grid_thw": torch.tensor([[1, 4, 4]]),
    }
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:  # transformers 5.x
        inputs["mm_token_type_ids"] = (input_ids == IMAGE).long()
    return inputs


def on_device(inputs: dict) -> dict:
    out = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(DEVICE, DTYPE if value.is_floating_point() else None)
        out[name] = value
    return out


def forward(model, **inputs):
    with torch.no_grad():
        return model(**on_device(inputs)).logits.float().cpu()


def padded_batch(n_long: int, n_short: int, side: str):
    """Two prompts; the second is shorter and padded on ``side`` (pad id 0)."""
    long_ids, short_ids = text_ids(n_long, seed=3), text_ids(n_short, seed=4)
    pad = torch.zeros(1, n_long - n_short, dtype=torch.long)
    if side == "left":
        short_row, short_mask = torch.cat([pad, short_ids], 1), torch.cat([pad, torch.ones_like(short_ids)], 1)
    else:
        short_row, short_mask = torch.cat([short_ids, pad], 1), torch.cat([torch.ones_like(short_ids), pad], 1)
    ids = torch.cat([long_ids, short_row])
    mask = torch.cat([torch.ones_like(long_ids), short_mask])
    return ids, mask, short_ids


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


needs_cuda = pytest.mark.skipif(
    DEVICE.type != "cuda", reason="needs a CUDA device (runs on a GPU, or with FLASHPREFILL_TEST_DEVICE=cuda)"
)
