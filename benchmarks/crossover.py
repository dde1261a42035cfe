"""Crossover: from which prompt length sparse prefill beats dense SDPA, per model shape (CUDA).

    PYTHONPATH=$PWD/kernels:$PWD python benchmarks/crossover.py --out benchmarks/results/crossover_h200.json
    PYTHONPATH=$PWD/kernels:$PWD python benchmarks/crossover.py --models qwen2.5-7b qwen3moe --layers 24 \\
        --out benchmarks/results/crossover_qwen_h200.json
    PYTHONPATH=$PWD/kernels:$PWD python benchmarks/crossover.py --models smollm2 --lengths 1024 2048 4096 8192 16384 \\
        --out benchmarks/results/crossover_smollm2_h200.json

For each model and length: the whole prefill (``model(input_ids, logits_to_keep=1)``, no_grad) with
``attn_implementation="sdpa"`` and with ``"flashprefill"`` sparse in every layer (``min_sparse_len=2``),
taking turns call by call, medians of ``--repeats`` after one warm-up call each. Random-weight
shapes (``llama8b``, ``qwen2.5-7b``, ``qwen3moe`` with ``--layers``; built by
:func:`fp_tools.ttft.build_random`) run at a FIXED density that follows the paper's curve (about
70 % at 4K falling log-linearly to 3.5 % at 256K, capped at 100 %), through the public knobs:
``alpha=1.0`` and the ``min_budget`` that gives it (:func:`fp_patch.budget.budget_for_density`), so
the real selection runs with its real cost. ``smollm2`` runs on its real weights (needle prompts
over real prose; the lead brings the weights) at real selection (its model's alpha). After the
timed calls one recorded flashprefill pass with the same settings gives the realised density and
checks that every layer ran sparse (a row where one did not is marked and excluded from the
crossover). The crossover is the smallest measured length from which sparse beats dense at that and
every longer measured length (:func:`fp_tools.speed_calibration.crossover`).

Saves JSON and Markdown (``--out`` and the same name with ``.md``) with the GPU, versions and commit
after every row; stops starting new lengths after ``--max-seconds`` (default 270: the default
arguments, Llama-3.1-8B shape at 1K-64K, take about 2-4 minutes on an H200).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

RANDOM_SHAPES = ("llama8b", "qwen2.5-7b", "qwen3moe")
CURVE = ((4096, 0.70), (262144, 0.035))  # the paper's block density at 4K and 256K (log-linear between)


def curve_density(length: int) -> float:
    """The paper's density curve: log-linear in the length through :data:`CURVE`, capped at 1.0."""
    (l0, d0), (l1, d1) = CURVE
    t = (math.log(length) - math.log(l0)) / (math.log(l1) - math.log(l0))
    return min(1.0, math.exp(math.log(d0) + t * (math.log(d1) - math.log(d0))))


def sync_ms(fn) -> float:
    """Wall time of ``fn()`` in ms, the GPU synchronised before and after (a CPU dry run: no sync)."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def measure(model, name: str, inputs: dict, settings, repeats: int) -> dict:
    """Dense vs sparse prefill of ``inputs`` (taking turns), then one recorded pass of the sparse one."""
    import fp_patch
    from fp_tools.ttft import checked_pass

    def forward():
        with torch.no_grad():
            model(**inputs, logits_to_keep=1)

    times = {"sdpa": [], "flashprefill": []}
    for round_ in range(repeats + 1):
        order = ["sdpa", "flashprefill"] if round_ % 2 == 0 else ["flashprefill", "sdpa"]
        for impl in order:
            model.set_attn_implementation(impl)
            if impl == "flashprefill":
                fp_patch.configure(model, settings)
            times[impl].append(sync_ms(forward))
    model.set_attn_implementation("flashprefill")
    fp_patch.configure(model, settings)
    path = checked_pass(model, inputs)
    dense_ms, sparse_ms = (statistics.median(times[i][1:]) for i in ("sdpa", "flashprefill"))
    return {"model": name, "length": int(inputs["input_ids"].shape[1]), "dense_ms": dense_ms, "sparse_ms": sparse_ms,
            "speedup": dense_ms / sparse_ms, "first_dense_ms": times["sdpa"][0],
            "first_sparse_ms": times["flashprefill"][0], "alpha": settings.alpha, "min_budget": settings.min_budget,
            **path, "all_sparse": path["sparse_layers"] == path["layers"]}


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [f"Crossover, {env.get('gpu')}, torch {env['torch']}, triton {env['triton']}, transformers "
             f"{env.get('transformers')}, commit {results['commit']}, {env['date']}. Whole prefill "
             f"(logits_to_keep=1), median of {results['repeats']} after a warm-up call, sdpa and flashprefill taking "
             "turns; flashprefill sparse in every layer; density and path from one recorded pass with the same "
             "settings.", ""]
    for model, summary in results["models"].items():
        lines += [f"**{model}** ({summary['note']}): crossover **{summary['crossover']}** tokens "
                  "(smallest measured length from which sparse wins at every longer one).", "",
                  "| tokens | target density | realised density | path | sdpa ms | flashprefill ms | speed-up |",
                  "|---|---|---|---|---|---|---|"]
        for r in (r for r in results["rows"] if r["model"] == model):
            target = "real selection" if r.get("target_density") is None else f"{r['target_density']:.1%}"
            dens = "-" if r["density"] is None else f"{r['density']:.1%}"
            path = f"sparse {r['sparse_layers']}/{r['layers']}" + ("" if r["all_sparse"] else " **not all sparse**")
            lines.append(f"| {r['length']} | {target} | {dens} | {path} | {r['dense_ms']:.1f} | {r['sparse_ms']:.1f} "
                         f"| {r['speedup']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=["llama8b"], choices=[*RANDOM_SHAPES, "smollm2"])
    parser.add_argument("--lengths", type=int, nargs="*", default=[1024, 2048, 4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--layers", type=int, default=None, help="random shapes: keep the first N layers")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-seconds", type=float, default=270.0, help="start no new length after this")
    parser.add_argument("--out", type=Path, default=Path("crossover.json"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("crossover.py needs a CUDA GPU")
    import fp_patch
    from fp_patch.budget import budget_for_density
    from fp_tools.benchmark import environment
    from fp_tools.provenance import git_commit
    from fp_tools.speed_calibration import crossover
    from fp_tools.ttft import build_random, prompt_inputs

    started = time.perf_counter()
    results = {"environment": environment(), "commit": git_commit(), "repeats": args.repeats,
               "curve": CURVE, "models": {}, "rows": []}

    def save():
        args.out.write_text(json.dumps(results, indent=1))
        args.out.with_suffix(".md").write_text(markdown(results) + "\n")

    for name in args.models:
        if name == "smollm2":
            from fp_patch.models import load_smollm2

            model, tokenizer = load_smollm2("sdpa", device="cuda", dtype=torch.bfloat16)
            note = "SmolLM2-135M-Instruct, real weights, needle prompts, real selection"
        else:
            model, tokenizer = build_random(name, args.layers, "cuda"), None
            note = f"{name} shape, random weights, {model.config.num_hidden_layers} layers, fixed density (curve)"
        base = fp_patch.model_defaults(model.config).replace(min_sparse_len=2)
        summary = results["models"][name] = {"note": note, "crossover": None}
        for length in args.lengths:
            if time.perf_counter() - started > args.max_seconds:
                print(f"{name}: stopped before {length} tokens (--max-seconds {args.max_seconds:g})", flush=True)
                break
            inputs, _ = prompt_inputs(model, tokenizer, length, "cuda")
            tokens = int(inputs["input_ids"].shape[1])
            target = None if tokenizer is not None else curve_density(tokens)
            settings = base if target is None else base.replace(alpha=1.0, min_budget=budget_for_density(
                tokens, target, base))
            row = measure(model, name, inputs, settings, args.repeats)
            row["target_density"] = target
            results["rows"].append(row)
            good = [r for r in results["rows"] if r["model"] == name and r["all_sparse"]]
            summary["crossover"] = crossover(good) if good else None
            dens = "-" if row["density"] is None else f"{row['density']:.1%}"
            print(f"{name} L={tokens:6d} target {'real' if target is None else f'{target:.1%}'} density {dens} "
                  f"sparse {row['sparse_layers']}/{row['layers']} layers | sdpa {row['dense_ms']:8.1f} ms "
                  f"flashprefill {row['sparse_ms']:8.1f} ms x{row['speedup']:.2f}", flush=True)
            save()
            torch.cuda.empty_cache()
        print(f"{name}: crossover {summary['crossover']} tokens", flush=True)
        del model
        torch.cuda.empty_cache()
    save()
    print(markdown(results))
    print(f"saved {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
