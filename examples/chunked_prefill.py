"""Chunked (continued) prefill: a long prompt fed in pieces on one cache gives the one-shot answer.

Shows FlashPrefill on a continued prefill: every chunk after the first attends to the cached keys
of the earlier ones (``Lq < Lk``, causal mask aligned bottom-right) and still runs block-sparse.
With ``alpha=0`` (keep every block) the chunked logits equal the one-shot dense logits to float
rounding; with the default alpha the greedy answer after a chunked prefill is compared with the
one-shot FlashPrefill answer (the selections differ slightly: a chunk's query blocks start elsewhere).

Run (CPU default: the embedded SmolLM2-135M-Instruct, ~500 tokens: one 256-token chunk, then the rest)::

    python examples/chunked_prefill.py
    python examples/chunked_prefill.py --model path/to/model --length 32768 --chunk 8192 --block-size 128   # GPU
"""

import argparse
import inspect

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

import fp_patch
from fp_patch.models import smollm2_path

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default=None, help="local model folder (default: the embedded SmolLM2)")
parser.add_argument("--length", type=int, default=480, help="prompt tokens (about)")
parser.add_argument("--chunk", type=int, default=256, help="tokens per prefill chunk")
parser.add_argument("--block-size", type=int, default=32)
args = parser.parse_args()

device = "cuda" if torch.cuda.is_available() else "cpu"
path = args.model or smollm2_path()
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(
    path, dtype=torch.bfloat16 if device == "cuda" else torch.float32, attn_implementation="flashprefill"
).to(device).eval()
fp_patch.configure(model, block_size=args.block_size, min_sparse_len=min(2048, args.chunk // 2))

filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
n_fill = args.length // len(tokenizer(filler).input_ids)
text = filler * (n_fill // 2) + "The special magic number is 7311. " + filler * (n_fill - n_fill // 2)
messages = [{"role": "user", "content": text + "\nWhat is the special magic number?"}]
ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
ids = ids["input_ids"].to(device)
cut = (ids.shape[1] - 1) // args.chunk * args.chunk  # the last chunk (the rest) is prefilled by generate


# Transformers 5.25 renamed forward's past_key_values to cache (the old name warns until 5.40)
CACHE = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def chunked_cache() -> DynamicCache:
    """The cache after feeding ``ids[:, :cut]`` chunk by chunk."""
    cache = DynamicCache()
    for start in range(0, cut, args.chunk):
        model(ids[:, start : start + args.chunk], use_cache=True, logits_to_keep=1, **{CACHE: cache})
    return cache


def greedy(**kwargs) -> str:
    out = model.generate(ids, max_new_tokens=12, do_sample=False, **kwargs)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


with torch.inference_mode():
    model.set_attn_implementation("sdpa")
    one_shot_logits = model(ids, logits_to_keep=1).logits
    model.set_attn_implementation("flashprefill")
    fp_patch.configure(model, alpha=0.0)  # keep every block: exact up to float rounding
    cache = chunked_cache()
    chunked_logits = model(ids[:, cut:], use_cache=True, logits_to_keep=1, **{CACHE: cache}).logits
    fp_patch.configure(model, alpha=fp_patch.model_defaults(model.config).alpha)
    one_shot = greedy()
    with fp_patch.record_density(model) as rec:
        chunked = greedy(past_key_values=chunked_cache())
err = (chunked_logits - one_shot_logits).abs().max().item()
print(f"{ids.shape[1]} tokens, chunks of {args.chunk}; alpha=0: max |chunked - one-shot logits| = {err:.2e}")
frame = rec.to_frame()
continued = frame[frame.tokens < frame.kv_tokens]
print(f"continued-prefill calls (Lq < Lk) ran sparse at {continued.blocks.sum() / continued.causal_blocks.sum():.1%}")
print(f"one-shot: {one_shot!r}\nchunked:  {chunked!r}")

# float32: rounding only; bfloat16 (GPU): chunking changes the order of the sums, allow 2 % of the logit range
assert err < (1e-3 if device == "cpu" else 0.02 * one_shot_logits.abs().max().item()), err
assert len(continued) and (continued.density < 1).any(), "the continued prefill did not run sparse"
assert chunked == one_shot, "greedy answers differ"
