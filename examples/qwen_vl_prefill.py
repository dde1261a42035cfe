"""A Qwen2.5-VL / Qwen3-VL model: an image plus a long text prompt, text decoder sparse, vision dense.

``attn_implementation="flashprefill"`` makes the text decoder's prefill block-sparse (image tokens
included); the vision tower stays on ``"sdpa"`` (not causal). The answer is compared with all-``"sdpa"``.
Run (CPU default: a tiny random Qwen2.5-VL, a 4x4-patch image, 1024 text tokens)::

    python examples/qwen_vl_prefill.py
    python examples/qwen_vl_prefill.py --model path/to/Qwen2.5-VL-7B-Instruct --length 16384   # GPU
"""

import argparse
import inspect

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, Qwen2_5_VLConfig

import fp_patch

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default=None, help="local Qwen2.5-VL / Qwen3-VL folder (default: tiny random model)")
parser.add_argument("--length", type=int, default=1024, help="text tokens (about)")
args = parser.parse_args()
torch.manual_seed(0)
device = "cuda" if torch.cuda.is_available() else "cpu"
load = {"dtype": torch.bfloat16 if device == "cuda" else torch.float32, "attn_implementation": "flashprefill"}
if args.model:  # a real checkpoint: its processor turns an image and text into model inputs
    model = AutoModelForImageTextToText.from_pretrained(args.model, **load)
    processor = AutoProcessor.from_pretrained(args.model)
    text = "The grass is green. The sky is blue. " * (args.length // 10) + "Describe the image."
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    chat = processor.apply_chat_template(chat, add_generation_prompt=True)
    inputs = processor(images=[Image.new("RGB", (448, 448), "teal")], text=[chat], return_tensors="pt")
else:  # 2 text layers, a 2-layer vision tower; ids 252, 250 x4, 253 = one 4x4-patch image in the middle
    text = {"hidden_size": 256, "head_dim": 128, "intermediate_size": 256, "num_hidden_layers": 2, "vocab_size": 256,
            "num_attention_heads": 2, "num_key_value_heads": 1, "pad_token_id": 0,
            "rope_scaling": {"rope_type": "default", "mrope_section": [16, 24, 24]}}
    vision = {"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2, "out_hidden_size": 256,
              "patch_size": 14, "window_size": 56, "fullatt_block_indexes": [1]}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=250, video_token_id=251,
                              vision_start_token_id=252, vision_end_token_id=253)
    model = AutoModelForImageTextToText.from_config(config, **load)
    ids = torch.randint(1, 240, (1, args.length)).split([args.length // 2, args.length - args.length // 2], dim=1)
    input_ids = torch.cat([ids[0], torch.tensor([[252, 250, 250, 250, 250, 253]]), ids[1]], dim=1)
    patches = torch.randn(16, 3 * 2 * 14 * 14)  # 4x4 patches of 2 frames x 14x14 RGB pixels
    inputs = {"input_ids": input_ids, "pixel_values": patches, "image_grid_thw": torch.tensor([[1, 4, 4]])}
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:  # transformers 5.x
        inputs["mm_token_type_ids"] = (input_ids == 250).long()
    # random weights attend uniformly (no block matters more than another): give the text attention the
    # locality of trained models, a fixed positive q = k (the q/k biases) whose RoPE score falls with distance
    with torch.no_grad():
        for attn in (layer.self_attn for layer in model.model.language_model.layers):
            for proj in (attn.q_proj, attn.k_proj):
                proj.weight.zero_()
                proj.bias.copy_(torch.rand(proj.bias.shape) * 4)
model = model.to(device).eval()
inputs = {k: v.to(device) for k, v in inputs.items()}
fp_patch.configure(model, block_size=128 if args.model else 32, min_sparse_len=256)  # per-model default alpha
uses = [fp_patch.uses_flashprefill(part) for part in (model.model.language_model, model.model.visual)]
print(f"fp_patch.uses_flashprefill: text decoder {uses[0]}, vision tower {uses[1]}")
n = inputs["input_ids"].shape[1]
with torch.inference_mode(), fp_patch.record_density(model) as rec:
    sparse = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, n:].tolist()
model.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa"})
with torch.inference_mode():
    dense = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, n:].tolist()
print(rec.summary(), f"\nflashprefill: {sparse}\nsdpa:         {dense}")
assert uses == [True, False] and set(rec.to_frame()["layer"]) == set(range(len(model.model.language_model.layers)))
assert rec.density() < 1.0 if args.model else rec.density() <= 0.9, f"density {rec.density():.1%}: too dense"
assert args.model or sparse == dense, "tiny model: sparse and dense greedy tokens differ"
