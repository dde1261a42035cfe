"""Generate from a long prompt with attn_implementation="flashprefill" and with "sdpa"; compare.

Shows the main use: load a causal LM with ``attn_implementation="flashprefill"`` (after
``import fp_patch``), generate from a long prompt, and compare the answer and the time to first
token (TTFT) with dense ``"sdpa"``. The prompt hides one fact in filler text and asks for it.

Run (CPU default: the embedded SmolLM2-135M-Instruct, a 600-token prompt, 32-token blocks)::

    python examples/long_prompt_generate.py
    python examples/long_prompt_generate.py --model path/to/model --device cuda --length 32768 --block-size 128

On the CPU FlashPrefill runs its pure-PyTorch reference: the TTFTs there check nothing about speed.
"""

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList

import fp_patch  # registers attn_implementation="flashprefill"
from fp_patch.models import smollm2_path

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default=None, help="local model folder (default: the embedded SmolLM2)")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--length", type=int, default=600, help="prompt tokens (about)")
parser.add_argument("--block-size", type=int, default=32, help="128 on a GPU")
parser.add_argument("--max-new-tokens", type=int, default=16)
args = parser.parse_args()

path = args.model or smollm2_path()
dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="flashprefill")
model = model.to(args.device).eval()
# short prompts run dense by default (min_sparse_len 2048): lower it so that this one runs sparse
fp_patch.configure(model, block_size=args.block_size, min_sparse_len=min(2048, args.length // 4))

filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
n_fill = args.length // len(tokenizer(filler).input_ids)
fact = "The special magic number is 7311. "
text = filler * (n_fill // 2) + fact + filler * (n_fill - n_fill // 2)
messages = [{"role": "user", "content": text + "\nWhat is the special magic number?"}]
ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
ids = ids["input_ids"].to(args.device)


class FirstTokenTimer(StoppingCriteria):
    """Notes when the first new token exists: prefill + first decode step = time to first token."""

    def __call__(self, input_ids, scores, **kwargs):
        if self.first is None:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            self.first = time.perf_counter()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def answer(impl: str) -> tuple[str, float]:
    model.set_attn_implementation(impl)
    timer = FirstTokenTimer()
    with torch.inference_mode():
        if args.device.startswith("cuda"):  # warm-up: kernel compilation is not part of the TTFT
            model.generate(ids, max_new_tokens=1, do_sample=False)
        timer.first, start = None, time.perf_counter()
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                             stopping_criteria=StoppingCriteriaList([timer]))
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), timer.first - start


dense, dense_ttft = answer("sdpa")
sparse, sparse_ttft = answer("flashprefill")  # timed as users run it: no recorder
with torch.inference_mode(), fp_patch.record_density(model) as rec:  # density: one more prefill, recorded
    model(ids, logits_to_keep=1)
print(f"prompt: {ids.shape[1]} tokens on {args.device}; TTFT = generate() without a recorder")
print(f"sdpa          TTFT {dense_ttft:7.2f} s  {dense!r}")
print(f"flashprefill  TTFT {sparse_ttft:7.2f} s  {sparse!r}")
print(f"blocks computed by FlashPrefill (a separate recorded prefill): {rec.density():.1%} of the causal ones")
assert rec.density() < 1.0, "the prefill did not run sparse"
assert "7311" in sparse, f"FlashPrefill missed the fact: {sparse!r} (sdpa: {dense!r})"
