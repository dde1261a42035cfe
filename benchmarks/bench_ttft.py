"""Time to first token: ``generate(max_new_tokens=1)`` with "sdpa" and "flashprefill" in one run.

    python benchmarks/bench_ttft.py --model smollm2 --lengths 2048 4096 8000 --alphas 0.1 0.18 0.3
    python benchmarks/bench_ttft.py --model llama8b --lengths 32768

``smollm2`` is the embedded real model (needle prompts over real prose: the answer of each
implementation is checked, the block density recorded). ``llama8b`` is a Llama-3.1-8B-shaped model
with random weights (32 layers, 32/8 heads, D=128) built directly on the GPU: random weights give
near-uniform attention, hence high density, which is reported as measured. One model serves every
implementation (``set_attn_implementation``). The first call of each implementation (kernel
compilation) is reported apart from the steady state (median of ``--repeats``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def ttft(model, inputs, repeats: int) -> tuple[float, float]:
    """(first call, median of the following calls) of generate(max_new_tokens=1), in seconds."""
    times = []
    for _ in range(repeats + 1):
        _sync()
        start = time.perf_counter()
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
        _sync()
        times.append(time.perf_counter() - start)
    return times[0], statistics.median(times[1:])


def build_llama8b():
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
    )
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model.eval(), None


def main() -> int:
    import fp_patch
    from fp_patch.demo import needle_prompt
    from fp_patch.models import load_smollm2

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["smollm2", "llama8b"], default="smollm2")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8000])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.18])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench_ttft.json"))
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    from fp_kernels.benchmark import environment

    if args.model == "smollm2":
        dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        model, tokenizer = load_smollm2("sdpa", device=args.device, dtype=dtype)
    else:
        model, tokenizer = build_llama8b()
    rows = []
    for length in args.lengths:
        if tokenizer is not None:
            prompt = needle_prompt(tokenizer, length)
            inputs = {k: v.to(args.device) for k, v in prompt["inputs"].items()}
        else:
            inputs = {"input_ids": torch.randint(0, 128000, (1, length), device="cuda")}
        for impl, alpha in [("sdpa", None)] + [("flashprefill", a) for a in args.alphas]:
            model.set_attn_implementation(impl)
            if alpha is not None:
                fp_patch.configure(model, alpha=alpha, min_sparse_len=1024)
            first, steady = ttft(model, inputs, args.repeats)
            row = {"model": args.model, "tokens": int(inputs["input_ids"].shape[1]), "impl": impl, "alpha": alpha,
                   "ttft_first_s": first, "ttft_s": steady}
            if alpha is not None:
                with torch.no_grad(), fp_patch.record_density(model) as rec:
                    model(**inputs, logits_to_keep=1)
                row["density"] = rec.density()
            if tokenizer is not None:
                out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
                answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
                row["answer"] = answer.strip()
                row["found"] = str(prompt["number"]) in answer
            rows.append(row)
            dens = f"density {row['density']:.1%}" if "density" in row else ""
            print(f"{args.model} L={row['tokens']:>6} {impl:>12} alpha={alpha} ttft {steady * 1e3:8.1f} ms "
                  f"(first {first * 1e3:8.1f} ms) {dens} {row.get('answer', '')!r}", flush=True)
    args.out.write_text(json.dumps({"environment": environment(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
