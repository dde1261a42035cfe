"""Kernel routes of issue 17, measured side by side on one GPU (each variant checked before timing).

    python benchmarks/routes_operator.py --part sparse     # main-loop variants of the sparse forward
    python benchmarks/routes_operator.py --part select     # scoring-pass variants (index building)
    python benchmarks/routes_operator.py --part tiles --head-dim 64 --heads 14 --kv-heads 2

``sparse``: the default tile config with and without warp specialisation, on random block lists at
6 / 60 / 100 % density. ``select``: key pooling per rows-per-step (K, K+V), and the scoring pass per
chunk width, warp count, stages and register cap, with its selection compared to the default's
(``--defaults-only`` with an older ``fp_kernels`` on ``PYTHONPATH`` times that baseline in the same
session). ``tiles``: the sparse forward's tile space for one head dim.
Measured earlier (benchmarks/results/routes_h200.md, each run with its commit): block ids loaded one
step ahead and blocks x rows scoring dots won and are the kernels' code now; TMA loads and exp2 on the
FMA units (half or all of the exponentials; ``FMA_SHARE`` at commit c797220) lost and were removed.
Every line: CUDA-graph median ms, TFLOP/s of computed work, realised density, the variant.
"""

import argparse
import itertools
import json
from functools import partial

import torch
from fp_kernels import BlockRules
from fp_kernels.pool import pool_keys
from fp_kernels.select import select_blocks
from fp_kernels.sparse_attention import sparse_attention
from triton.testing import do_bench_cudagraph

from fp_tools.benchmark import causal_flops, environment, list_density, spot_check
from fp_tools.synthetic import random_block_lists, structured_qkv


def graph_ms(fn) -> float:
    return float(do_bench_cudagraph(fn, rep=60, return_mode="median"))


def sparse_variants(head_dim: int) -> list[dict]:
    return [{}, {"WARP_SPECIALIZE": False}, {"USE_TMA": True}]


def tile_space(head_dim: int) -> list[dict]:
    if head_dim <= 64:
        shapes = [(128, 64, 4), (128, 64, 8), (128, 128, 8), (64, 64, 4), (64, 128, 4)]
        stages = (2, 3, 4)
    else:
        shapes = [(64, 64, 4), (64, 32, 4), (128, 64, 8), (64, 64, 8), (128, 32, 8)]
        stages = (1, 2)
    return [
        {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st, "WARP_SPECIALIZE": ws}
        for (bm, bn, w), st, ws in itertools.product(shapes, stages, (False, True))
    ]


def time_sparse(rows, q, k, v, lists, seq_len, configs, flops_dense, tag):
    for density_target, (index, count) in lists.items():
        density = list_density(count, seq_len, seq_len, 128)
        for cfg in configs:
            line = {"part": tag, "L": seq_len, "D": q.shape[-1], "target": density_target, "density": density,
                    "config": cfg}
            try:
                out = sparse_attention(q, k, v, index, count, 128, config=cfg)
                err = spot_check(q, k, v, out, index, count, 128, rows=24)
                if err > 2e-2 or torch.isnan(out).any():
                    line["wrong"] = err
                else:
                    ms = graph_ms(partial(sparse_attention, q, k, v, index, count, 128, config=cfg))
                    line.update(ms=ms, tflops=density * flops_dense / ms / 1e9)
            except Exception as exc:  # out of shared memory or registers, or unsupported here
                line["failed"] = f"{type(exc).__name__}: {str(exc)[-1500:]}"
            rows.append(line)
            print(json.dumps(line), flush=True)


def part_sparse(args, rows):
    for seq_len in args.lengths:
        q, k, v = structured_qkv(1, seq_len, args.heads, args.kv_heads, args.head_dim, dtype=torch.bfloat16,
                                 device="cuda", seed=seq_len)
        lists = {t: random_block_lists(1, args.heads, seq_len, seq_len, 128, t, device="cuda", seed=seq_len)
                 for t in (0.06, 0.6, 1.0)}
        configs = sparse_variants(args.head_dim) if args.part == "sparse" else tile_space(args.head_dim)
        if args.part == "tiles":
            lists = {t: lists[t] for t in (0.06, 0.6)}
        time_sparse(rows, q, k, v, lists, seq_len, configs, causal_flops(1, args.heads, seq_len, seq_len,
                                                                          args.head_dim), args.part)
        torch.cuda.empty_cache()


def select_space() -> list[dict]:
    """The scoring pass's variants: warps and chunk width, pipelining stages and register caps (a cap
    of 128 lets 4 programs share an SM: ptxas spills nothing there, benchmarks/sm90_resources.py), and
    row tiles below the block (``ROWS``: each chunk reloads its rows from L2; less shared memory and fewer
    registers per program, so more programs per SM: ROWS 32 with a cap of 80 fits 6, Triton 3.6 spills
    16 bytes at stage 1 and none at stage 2). e4m3 dots (SCORE_FP8 at commit c5ae459) were no faster and
    changed the selection: removed."""
    space = [{}, {"num_warps": 8}, {"CHUNK": 32}, {"CHUNK": 128}]
    space += [{"num_stages": st, "maxnreg": r} for st, r in ((2, None), (2, 168), (2, 128), (1, 128))]
    space += [{"ROWS": rows, "num_stages": st, "maxnreg": r}
              for rows, st, r in ((64, 1, 128), (64, 2, 128), (32, 1, 96), (32, 1, 80), (32, 2, 80))]
    return [{k: v for k, v in cfg.items() if v is not None} for cfg in space]


def pool_space() -> list[dict]:
    return [{}, {"ROWS": 64}, {"ROWS": 128}, {"ROWS": 128, "num_warps": 8}]


def part_select(args, rows):
    rules = BlockRules(alpha=0.18, block_size=128)
    for seq_len in args.lengths:
        q, k, v = structured_qkv(1, seq_len, args.heads, args.kv_heads, args.head_dim, dtype=torch.bfloat16,
                                 device="cuda", seed=seq_len)
        kbar = pool_keys(k, 128)
        ref_index, ref_count = select_blocks(q, kbar, seq_len, rules)
        ref_mask = _mask(ref_index, ref_count)
        for cfg in [{}] if args.defaults_only else pool_space():
            for with_v in (False, True):
                line = {"part": "pool", "L": seq_len, "D": args.head_dim, "config": cfg, "with_v": with_v}
                extra = {"v": v} if with_v else {}
                extra.update({"config": cfg} if cfg else {})  # (a baseline's pool_keys may have no config=)
                got = pool_keys(k, 128, **extra)
                got = got[0] if with_v else got
                line["max_abs_diff"] = float((got.float() - kbar.float()).abs().max())
                line["ms"] = graph_ms(partial(pool_keys, k, 128, **extra))
                moved = k.numel() * k.element_size() * (2 if with_v else 1)
                line["TB/s"] = moved / line["ms"] / 1e9
                rows.append(line)
                print(json.dumps(line), flush=True)
        for cfg in [{}] if args.defaults_only else select_space():
            line = {"part": "select", "L": seq_len, "D": args.head_dim, "config": cfg}
            try:
                index, count = select_blocks(q, kbar, seq_len, rules, config=cfg)
                line["decisions_differing"] = float((_mask(index, count) != ref_mask).float().mean())
                line["density"] = list_density(count, seq_len, seq_len, 128)
                line["ms"] = graph_ms(partial(select_blocks, q, kbar, seq_len, rules, config=cfg))
            except Exception as exc:
                line["failed"] = f"{type(exc).__name__}: {str(exc)[-1500:]}"
            rows.append(line)
            print(json.dumps(line), flush=True)
        torch.cuda.empty_cache()


def _mask(index, count):
    nkb = index.shape[-1]
    j = torch.arange(nkb, device=index.device)
    valid = j < count[..., None]
    mask = torch.zeros(*index.shape[:-1], nkb + 1, dtype=torch.bool, device=index.device)
    mask.scatter_(-1, torch.where(valid, index.long(), nkb), True)
    return mask[..., :nkb]


def _select_row(r: dict) -> str:
    if "ms" not in r:
        return f"| {r['L']} | {r['part']} | {r.get('config')} | failed | - |"
    if r["part"] == "pool":
        what = "pool K+V" if r.get("with_v") else "pool K"
        moved = f"{r['TB/s']:.2f} TB/s" if "TB/s" in r else "-"
        return f"| {r['L']} | {what} | {r.get('config', {})} | {r['ms']:.4f} | {moved} |"
    return f"| {r['L']} | select | {r.get('config')} | {r['ms']:.4f} | {r.get('decisions_differing', '-')} |"


def summarize(path: str) -> str:
    """Markdown of a results file: one table per run, the variants side by side (ms or TFLOP/s)."""
    out = []
    for line in open(path):
        run = json.loads(line)
        env, args = run["environment"], run["args"]
        out.append(f"### {args['part']}, {args['heads']} q / {args['kv_heads']} kv heads, D={args['head_dim']} "
                   f"({env.get('gpu')}, triton {env['triton']}, commit {env['commit']})\n")
        if args["part"] == "select":
            out.append("| L | stage | config | ms | decisions differing from the default / TB/s |\n"
                       "|---|---|---|---|---|")
            out += [_select_row(r) for r in run["rows"]]
        else:
            out.append("| L | target | density | config | ms | TFLOP/s |\n|---|---|---|---|---|---|")
            out += [f"| {r['L']} | {r['target']} | {r['density']:.3f} | {r['config']} | "
                    + (f"{r['ms']:.3f} | {r['tflops']:.0f} |" if "ms" in r else
                       "failed (compile) | - |" if "failed" in r else f"wrong ({r.get('wrong')}) | - |")
                    for r in run["rows"]]
        out.append("")
    return "\n".join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summarize", metavar="JSONL", help="print Markdown tables of a results file and exit")
    parser.add_argument("--part", choices=("sparse", "select", "tiles"))
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--out", default=None, help="append the JSON lines here")
    parser.add_argument("--defaults-only", action="store_true",
                        help="only the default configs (e.g. an older fp_kernels on PYTHONPATH as the baseline)")
    args = parser.parse_args()
    if args.summarize:
        print(summarize(args.summarize))
        return
    if args.part is None:
        parser.error("--part is required")
    rows = []
    {"sparse": part_sparse, "tiles": part_sparse, "select": part_select}[args.part](args, rows)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(json.dumps({"environment": environment(), "args": vars(args), "rows": rows}) + "\n")


if __name__ == "__main__":
    main()
