"""Calibrate alpha to a target block density, save the config, reload it and apply it.

Shows ``fp_tools.calibration.calibrate``: a bracketed search over alpha on the model's own forward
passes over prose prompts until the fraction of causal blocks computed is near ``--target``
(the paper's recipe: ~70 % at 4K tokens; at the CPU default of 512 tokens the always-computed
sink, window and last blocks alone are ~74 %, hence a target of 80 % there). The result is a
``FlashPrefillConfig``, saved as JSON, reloaded with ``FlashPrefillConfig.from_json`` and applied
with ``fp_patch.configure``.
(``flashprefill calibrate`` is the same search from the command line.)

Run (CPU default: the embedded SmolLM2-135M-Instruct, a 512-token prompt, 32-token blocks, 3 steps)::

    python examples/calibrate_alpha.py --out calibrated.json
    python examples/calibrate_alpha.py --model path/to/model --target 0.7 --length 4096 --block-size 128 --steps 12
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import fp_patch
from fp_patch import FlashPrefillConfig
from fp_patch.models import smollm2_path
from fp_tools.calibration import calibrate, calibration_prompts

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default=None, help="local model folder (default: the embedded SmolLM2)")
parser.add_argument("--target", type=float, default=0.8, help="fraction of causal blocks to compute")
parser.add_argument("--length", type=int, default=512)
parser.add_argument("--block-size", type=int, default=32)
parser.add_argument("--steps", type=int, default=3, help="most forward passes in the search")
parser.add_argument("--out", default="calibrated.json")
args = parser.parse_args()

device = "cuda" if torch.cuda.is_available() else "cpu"
path = args.model or smollm2_path()
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(
    path, dtype=torch.bfloat16 if device == "cuda" else torch.float32, attn_implementation="flashprefill"
).to(device).eval()

# every other knob: the per-model defaults, with blocks and min_sparse_len fitted to the length
base = fp_patch.model_defaults(model.config)
base = base.replace(block_size=args.block_size, min_sparse_len=min(base.min_sparse_len, args.length // 2))
result = calibrate(model, tokenizer, target_density=args.target, length=args.length, prompts=1, base=base,
                   max_steps=args.steps)
for step in result.history["density"]:
    print(f"  alpha {step['alpha']:.4g} -> density {step['density']:.3f}")
print(f"calibrated alpha {result.config.alpha:.4g}: density {result.density:.3f} (target {args.target})")
result.config.to_json(args.out)

# later, or in another program: reload and apply
config = FlashPrefillConfig.from_json(args.out)
fp_patch.configure(model, config)
(prompt,) = calibration_prompts(tokenizer, args.length, 1)  # the same prose the search measured
with torch.inference_mode(), fp_patch.record_density(model) as rec:
    model(torch.tensor([prompt], device=device), logits_to_keep=1)
print(f"reloaded from {args.out}: alpha {fp_patch.get_config(model).alpha:.4g}, density {rec.density():.3f}")

assert config == result.config and fp_patch.get_config(model) == config
assert abs(rec.density() - result.density) < 1e-6, "same prompt and config, same blocks"
assert rec.density() < 1
