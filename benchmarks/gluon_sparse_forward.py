"""The sparse forward on sm_90: the package's warp-specialised Gluon kernel against the Triton kernel.

    python benchmarks/gluon_sparse_forward.py [--lengths 8192 32768] [--stages 2 3] [--out results.json]

Times, on the same random lists and in one process: cuDNN dense causal SDPA, the Triton kernel
(``sparse_attention(..., config={"GLUON": False})``) and ``fp_kernels.sparse_attention_sm90`` per ring
depth (``GLUON_STAGES``), with one program per SM (the default) and one per work item. Every output is
checked against an fp32 recomputation of sampled rows and against the Triton kernel before it is timed
(CUDA-graph medians); ``--out`` writes JSON and a Markdown table. Hopper only. (Until 8d9b697 this file
also held the single-partition Gluon prototype that led to the package's kernel: its ``prototype_s3``
columns in results/ ran from that file at their commit.)
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import torch

PER_ITEM = 2**31 - 1  # GLUON_PROGRAMS: one program per work item (the launch caps it at the item count)


def variants(stages_list):
    """(name, runner) of every variant timed beside the Triton kernel: the package's warp-specialised sm_90
    kernel (``fp_kernels.sparse_attention_sm90``) per ring depth, with one program per SM (``sm90_s{n}``, the
    default) and with one program per work item (``sm90_s{n}_per_item``, the launch before 2026-12-07's)."""
    out = []
    for stages in stages_list:
        config = {"GLUON": True, "GLUON_STAGES": stages}
        out.append((f"sm90_s{stages}", partial(_package, config=config)))
        out.append((f"sm90_s{stages}_per_item", partial(_package, config={**config, "GLUON_PROGRAMS": PER_ITEM})))
    return out


def _package(q, k, v, index, count, config):
    from fp_kernels.sparse_attention import kernel_for, sparse_attention

    assert kernel_for(q, k, v, 128, config=config) == "gluon_sm90", "an sm90_* row must time the sm_90 kernel"
    return sparse_attention(q, k, v, index, count, 128, config=config)


def main():
    from fp_kernels.sparse_attention import kernel_for, sparse_attention
    from triton.testing import do_bench_cudagraph

    from fp_tools.benchmark import causal_flops, dense_attention, environment, list_density, spot_check
    from fp_tools.synthetic import random_block_lists, structured_qkv

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.06, 0.6, 1.0])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--stages", type=int, nargs="+", default=[3], help="ring depths of the sm_90 kernel")
    parser.add_argument("--only", nargs="*", default=None, help="variant names to run (default: all)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    env = environment()
    print(f"{env.get('gpu')} torch {env['torch']} triton {env['triton']} commit {env['commit']}", flush=True)
    runs = [(name, fn) for name, fn in variants(args.stages) if args.only is None or name in args.only]
    rows = []
    for seq_len in args.lengths:
        q, k, v = structured_qkv(1, seq_len, args.heads, args.kv_heads, args.head_dim, dtype=torch.bfloat16,
                                 device="cuda", seed=seq_len)
        flops = causal_flops(1, args.heads, seq_len, seq_len, args.head_dim)
        cudnn_ms = float(do_bench_cudagraph(dense_attention(q, k, v, "cudnn"), rep=60, return_mode="median"))
        for target in args.densities:
            index, count = random_block_lists(1, args.heads, seq_len, seq_len, 128, target, device="cuda",
                                              seed=seq_len)
            density = list_density(count, seq_len, seq_len, 128)
            triton_only = {"GLUON": False}
            ours = sparse_attention(q, k, v, index, count, 128, config=triton_only)
            assert kernel_for(q, k, v, 128, config=triton_only) == "triton"
            row = {"L": seq_len, "target": target, "density": density, "default_kernel": kernel_for(q, k, v, 128),
                   "cudnn_dense_ms": cudnn_ms,
                   "cudnn_tflops": flops / cudnn_ms / 1e9,
                   "triton_ms": float(do_bench_cudagraph(partial(sparse_attention, q, k, v, index, count, 128,
                                                                 config=triton_only),
                                                         rep=60, return_mode="median"))}
            row["triton_tflops"] = density * flops / row["triton_ms"] / 1e9
            for key, fn in runs:
                try:
                    got = fn(q, k, v, index, count)
                    err = spot_check(q, k, v, got, index, count, 128, rows=24)
                    diff = float((got.float() - ours.float()).abs().max())
                    row[f"{key}_err"], row[f"{key}_max_diff_vs_triton"] = err, diff
                    if err > 2e-2 or not torch.isfinite(got).all():
                        row[f"{key}_wrong"] = True
                    else:
                        ms = float(do_bench_cudagraph(partial(fn, q, k, v, index, count), rep=60,
                                                      return_mode="median"))
                        row[f"{key}_ms"], row[f"{key}_tflops"] = ms, density * flops / ms / 1e9
                except Exception as exc:  # a compile or launch failure is the result
                    row[f"{key}_failed"] = f"{type(exc).__name__}: {str(exc)[-600:]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"environment": env, "args": vars(args), "rows": rows}, fh, indent=1)
        with open(args.out.removesuffix(".json") + ".md", "w") as fh:
            fh.write(markdown(env, args, rows))


def markdown(env, args, rows) -> str:
    """The run as a Markdown table: TFLOP/s of computed work per kernel beside the density, and ratios."""
    names = [name for name, _ in variants(args.stages) if args.only is None or name in args.only]
    head = (f"Sparse forward on the same random lists, B=1, {args.heads} q / {args.kv_heads} kv heads, "
            f"D={args.head_dim}, bf16; {env.get('gpu')}, torch {env['torch']}, triton {env['triton']}, commit "
            f"{env['commit']}, {env['date']}. `python benchmarks/gluon_sparse_forward.py --head-dim {args.head_dim} "
            f"--heads {args.heads} --kv-heads {args.kv_heads} --stages {' '.join(map(str, args.stages))}`. "
            "TFLOP/s of computed work (density x dense causal FLOPs); cuDNN: dense causal SDPA. Every output "
            "was checked (fp32 spot check) before it was timed.\n\n")
    from fp_kernels.sparse_attention_sm90 import STAGES

    main = f"sm90_s{STAGES}" if f"sm90_s{STAGES}" in names else names[0]  # the package's default first
    cols = ["L", "density", "cuDNN dense", "Triton kernel", *names, f"{main} / Triton", f"{main} / cuDNN",
            f"{main} / per item"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        def tf(key, r=r):
            return f"{r[key]:.0f}" if key in r else r.get(key.replace("_tflops", "_failed"), "wrong")[:40]
        first = f"{main}_tflops"
        item = f"{main}_per_item_tflops"
        ratios = [f"{r[first] / r['triton_tflops']:.2f}" if first in r else "-",
                  f"{r[first] / r['cudnn_tflops']:.2f}" if first in r else "-",
                  f"{r[first] / r[item]:.2f}" if first in r and item in r else "-"]
        cells = [f"{r['L'] // 1024}K", f"{r['density']:.1%}", tf("cudnn_tflops"), tf("triton_tflops"),
                 *[tf(f"{n}_tflops") for n in names], *ratios]
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
