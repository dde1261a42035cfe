"""Record which key blocks FlashPrefill computed, layer by layer and head by head, and plot it.

Shows ``fp_patch.record_density``: one prompt through the model, then ``rec.to_frame()`` (one row
per layer and head), ``rec.summary()``, and ``rec.plot(...)`` saved as PNGs: the layers x heads
density heat map and the block map of one head (kept blocks over the block scores).

Run (CPU default: the embedded SmolLM2-135M-Instruct, a 512-token prompt, 32-token blocks)::

    python examples/density_by_layer.py --out density/
    python examples/density_by_layer.py --model path/to/model --length 16384 --block-size 128   # GPU
"""

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import fp_patch
from fp_patch.models import smollm2_path

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default=None, help="local model folder (default: the embedded SmolLM2)")
parser.add_argument("--length", type=int, default=512, help="prompt tokens")
parser.add_argument("--block-size", type=int, default=32)
parser.add_argument("--out", default="density-by-layer", help="folder for the PNGs and the CSV")
args = parser.parse_args()

device = "cuda" if torch.cuda.is_available() else "cpu"
path = args.model or smollm2_path()
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(
    path, dtype=torch.bfloat16 if device == "cuda" else torch.float32, attn_implementation="flashprefill"
).to(device).eval()
fp_patch.configure(model, block_size=args.block_size, min_sparse_len=min(2048, args.length // 2))

# any prose works; repeat this docstring up to the length
text = (__doc__ + " ") * (args.length // len(tokenizer(__doc__).input_ids) + 1)
ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.length].to(device)
middle = model.config.num_hidden_layers // 2
with torch.inference_mode(), fp_patch.record_density(model, block_maps=[middle]) as rec:
    model(ids, logits_to_keep=1)

print(rec.summary())
frame = rec.to_frame()  # columns: run, layer, head, tokens, kv_tokens, batch, density, blocks, causal_blocks
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
frame.to_csv(out / "density.csv", index=False)
rec.plot("heatmap", path=out / "density_heatmap.png")
sparsest = int(frame[frame.layer == middle].sort_values("density").iloc[0]["head"])
rec.plot("block_map", layer=middle, head=sparsest, path=out / f"block_map_L{middle}_H{sparsest}_sparsest.png")
print(f"saved {sorted(p.name for p in out.iterdir())} in {out}/")

assert len(frame) == model.config.num_hidden_layers * model.config.num_attention_heads
assert frame["density"].min() < 1, "no head skipped a block"
assert (out / "density_heatmap.png").stat().st_size > 0
