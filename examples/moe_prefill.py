"""A Qwen3-MoE model with per-layer FlashPrefill settings: first layers dense, per-layer alpha.

Shows ``fp_patch.configure(model, dense_layers=..., layer_alpha=...)`` on a mixture-of-experts
model (attention is unchanged by MoE, so every decoder layer's attention runs FlashPrefill), and
``rec.layer_frame()`` reporting which layers ran sparse, at what density, and why others ran dense;
a second pass with the last layer at the base alpha shows what its own alpha saved.

Run (CPU default: a tiny random 4-layer Qwen3-MoE built from a config, 1024 tokens, 32-token blocks)::

    python examples/moe_prefill.py
    python examples/moe_prefill.py --model path/to/Qwen3-30B-A3B --length 16384 --block-size 128   # GPU
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

import fp_patch

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default=None, help="local Qwen3-MoE folder (default: a tiny random model)")
parser.add_argument("--length", type=int, default=1024)
parser.add_argument("--block-size", type=int, default=32)
args = parser.parse_args()

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
if args.model:
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="flashprefill")
else:
    torch.manual_seed(0)
    config = Qwen3MoeConfig(hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_experts=4,
                            num_experts_per_tok=2, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=64, vocab_size=1000)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="flashprefill")
model = model.to(device).eval()
n_layers = model.config.num_hidden_layers

# on top of the qwen3_moe defaults (alpha 0.12): layer 0 dense, the last layer sparser. A random model
# attends almost uniformly (every block scores alike), so the tiny one needs large alphas to skip blocks
alpha, last_alpha = (0.12, 0.3) if args.model else (0.6, 0.95)
cfg = fp_patch.configure(model, alpha=alpha, dense_layers=[0], layer_alpha={n_layers - 1: last_alpha},
                         block_size=args.block_size, min_sparse_len=min(2048, args.length // 4))
print(cfg)

ids = torch.randint(0, model.config.vocab_size, (1, args.length), generator=torch.Generator().manual_seed(0))
with torch.inference_mode(), fp_patch.record_density(model) as rec:
    logits = model(ids.to(device)).logits
layers = rec.layer_frame()
print(layers.to_string(index=False))
# the same prompt with the last layer at the base alpha: its larger alpha must have kept fewer blocks
fp_patch.configure(model, layer_alpha={})
with torch.inference_mode(), fp_patch.record_density(model) as rec_base:
    model(ids.to(device))
last, last_base = rec.layer_frame().iloc[-1], rec_base.layer_frame().iloc[-1]
print(f"layer {n_layers - 1}: density {last.density:.1%} at alpha {last_alpha}, {last_base.density:.1%} at {alpha}")
model.set_attn_implementation("sdpa")
with torch.inference_mode():
    dense_logits = model(ids.to(device)).logits
diff = (logits.float() - dense_logits.float()).abs().max().item()
print(f"max |logits - sdpa logits| = {diff:.3g} (logit std {dense_logits.float().std():.3g})")

assert set(rec.fallback_frame().query("reason == 'dense_layer'")["layer"]) == {0}
assert (layers["reason"][1:] == "").all(), "a layer expected to run FlashPrefill ran dense"
assert last.layer == last_base.layer == n_layers - 1
assert last.density <= last_base.density, f"alpha {last_alpha} kept more blocks than alpha {alpha}"  # never
assert args.model or last.density < last_base.density, "the tiny model's last layer should be sparser at 0.95"
