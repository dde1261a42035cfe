"""A Qwen2.5-VL / Qwen3-VL model: an image plus a long text prompt, text decoder sparse, vision dense.

Shows that ``attn_implementation="flashprefill"`` on a VL model makes the text decoder's prefill
block-sparse (image tokens included) while the vision tower keeps dense ``"sdpa"`` (its attention
is not causal), and that the generated answer can be compared with an all-``"sdpa"`` run.

Run (CPU default: a tiny random Qwen2.5-VL built from a config, a 4x4-patch image, 1024 tokens)::

    python examples/qwen_vl_prefill.py                      # or --family qwen3_vl
    python examples/qwen_vl_prefill.py --model path/to/Qwen2.5-VL-7B-Instruct --length 16384   # GPU
"""

import argparse
import inspect

import numpy as np
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

import fp_patch

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default=None, help="local Qwen2.5-VL / Qwen3-VL folder (default: tiny random model)")
parser.add_argument("--family", default="qwen2_5_vl", choices=["qwen2_5_vl", "qwen3_vl"], help="tiny model type")
parser.add_argument("--length", type=int, default=1024, help="text tokens (about)")
args = parser.parse_args()
device = "cuda" if torch.cuda.is_available() else "cpu"

if args.model:  # a real checkpoint: its processor turns an image and text into model inputs
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.bfloat16,
                                                        attn_implementation="flashprefill")
    processor = AutoProcessor.from_pretrained(args.model)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (448, 448, 3), dtype=np.uint8))
    text = "The grass is green. The sky is blue. " * (args.length // 10) + "Describe the image."
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    block_size = 128
else:  # tiny random model: 2 decoder layers, a 2-layer vision tower, ids 250-253 for the image tokens
    torch.manual_seed(0)
    text = {"hidden_size": 256, "head_dim": 128, "intermediate_size": 256, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 256,
            "bos_token_id": None, "eos_token_id": None, "pad_token_id": 0}
    vision = {"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2, "out_hidden_size": 256,
              "spatial_merge_size": 2, "temporal_patch_size": 2}
    if args.family == "qwen2_5_vl":
        vision |= {"patch_size": 14, "window_size": 56, "fullatt_block_indexes": [1]}
        text |= {"rope_scaling": {"rope_type": "default", "mrope_section": [16, 24, 24]}}
    else:
        vision |= {"patch_size": 16, "deepstack_visual_indexes": [0], "num_position_embeddings": 64}
    config = AutoConfig.for_model(args.family, text_config=text, vision_config=vision, image_token_id=250,
                                  video_token_id=251, vision_start_token_id=252, vision_end_token_id=253)
    model = AutoModelForImageTextToText.from_config(config, attn_implementation="flashprefill")
    # one image of 4x4 patches = 4 merged image tokens, between vision start/end, in the middle of the text
    ids = torch.randint(1, 240, (1, args.length), generator=torch.Generator().manual_seed(0))
    image_ids = torch.tensor([[252, 250, 250, 250, 250, 253]])
    input_ids = torch.cat([ids[:, : args.length // 2], image_ids, ids[:, args.length // 2:]], dim=1)
    patch = 3 * vision["temporal_patch_size"] * vision["patch_size"] ** 2
    inputs = {"input_ids": input_ids, "pixel_values": torch.randn(16, patch),
              "image_grid_thw": torch.tensor([[1, 4, 4]])}
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:  # transformers 5.x
        inputs["mm_token_type_ids"] = (input_ids == 250).long()
    # random weights attend almost uniformly (every key block scores alike, nothing to skip):
    # sharpen the text attention so that, as in trained models, some blocks matter more than others
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("self_attn") and "visual" not in name:
                qwen3 = hasattr(module, "q_norm")  # Qwen3-VL normalises q and k per head: scale the norms
                for layer in (module.q_norm, module.k_norm) if qwen3 else (module.q_proj, module.k_proj):
                    layer.weight.mul_(8)
    block_size = 32
model = model.to(device).eval()
inputs = {k: v.to(device) for k, v in inputs.items()}
fp_patch.configure(model, block_size=block_size, min_sparse_len=256)  # per-model default alpha
text_cfg, vision_cfg = model.config.text_config, model.config.vision_config
print(f"attention: text {text_cfg._attn_implementation!r}, vision {vision_cfg._attn_implementation!r}")
assert fp_patch.uses_flashprefill(model) and vision_cfg._attn_implementation == "sdpa"

n = inputs["input_ids"].shape[1]
with torch.inference_mode(), fp_patch.record_density(model) as rec:
    sparse = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, n:]
model.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa"})
with torch.inference_mode():
    dense = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, n:]
print(rec.summary())
print("flashprefill:", sparse.tolist(), "\nsdpa:        ", dense.tolist())

frame = rec.to_frame()
assert set(frame["layer"]) == set(range(model.config.text_config.num_hidden_layers)), "every text layer sparse"
assert rec.density() < 1, "no block was skipped"
assert len(sparse) == len(dense) == 8
