"""Tile sweep for the sparse attention kernel: which (BLOCK_M, BLOCK_N, warps, stages) per head dim.

    python benchmarks/sweep_tiles.py --seq-len 32768 --density 0.6

Prints TFLOP/s of computed work per configuration (correctness checked first); the winners are
the defaults in ``kernels/sparse_attention.py::_tile_config`` (keyed by head dim, never by length).
"""

import argparse
import itertools

import torch
from fp_kernels.sparse_attention import sparse_attention

from fp_tools.benchmark import causal_flops, list_density, median_ms, spot_check
from fp_tools.synthetic import random_block_lists, structured_qkv


def sweep_index(seq_len: int, dim: int, alpha: float = 0.18):
    """Pool and select timings (plain and CUDA-graph) for the index-building stage."""
    from fp_kernels import BlockRules
    from fp_kernels.pool import pool_keys
    from fp_kernels.select import select_blocks
    from triton.testing import do_bench_cudagraph

    q, k, v = structured_qkv(1, seq_len, 32, 8, dim, dtype=torch.bfloat16, device="cuda")
    kbar = pool_keys(k, 128)
    rules = BlockRules(alpha=alpha, block_size=128)
    pool_ms = median_ms(pool_keys, k, 128)
    print(f"index L={seq_len} D={dim} pool {pool_ms:.4f} ms "
          f"(graph {do_bench_cudagraph(lambda: pool_keys(k, 128)):.4f})", flush=True)
    for chunk, warps in itertools.product((32, 64, 128), (4, 8)):
        cfg = {"CHUNK": chunk, "num_warps": warps}
        try:
            ms = median_ms(select_blocks, q, kbar, seq_len, rules, config=cfg)
            graph = do_bench_cudagraph(lambda cfg=cfg: select_blocks(q, kbar, seq_len, rules, config=cfg))
            print(f"index L={seq_len} D={dim} select {cfg} {ms:.4f} ms (graph {graph:.4f})", flush=True)
        except Exception as exc:
            print(f"index L={seq_len} D={dim} select {cfg} failed: {type(exc).__name__}: {str(exc)[:120]}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--density", type=float, default=0.6)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=None, help="several lengths (overrides --seq-len)")
    parser.add_argument("--index", action="store_true", help="sweep the index-building stage instead")
    args = parser.parse_args()
    if args.index:
        for seq_len, dim in itertools.product(args.seq_lens or [args.seq_len], args.head_dims):
            sweep_index(seq_len, dim)
        return
    for seq_len, dim in itertools.product(args.seq_lens or [args.seq_len], args.head_dims):
        heads, kv_heads = 32, 8
        q, k, v = structured_qkv(1, seq_len, heads, kv_heads, dim, dtype=torch.bfloat16, device="cuda")
        index, count = random_block_lists(1, heads, seq_len, seq_len, 128, args.density, device="cuda")
        density = list_density(count, seq_len, seq_len, 128)
        flops = causal_flops(1, heads, seq_len, seq_len, dim) * density
        space = itertools.product((64, 128), (64, 128), (4, 8), (2, 3), (False, True), (False, True))
        for bm, bn, warps, stages, tma, ws in space:
            if (bm, warps) == (128, 4) or (bm, warps) == (64, 8):
                continue  # the first sweep showed these lose everywhere
            cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages,
                   "USE_TMA": tma, "WARP_SPECIALIZE": ws}
            tag = f"L={seq_len} D={dim} density={density:.3f} {cfg}"
            try:
                out = sparse_attention(q, k, v, index, count, 128, config=cfg)
                err = spot_check(q, k, v, out, index, count, 128, rows=16)
                if err > 2e-2 or torch.isnan(out).any():
                    print(f"{tag} WRONG err={err:.3g}")
                    continue
                ms = median_ms(sparse_attention, q, k, v, index, count, 128, config=cfg, rep=50)
                print(f"{tag} {ms:.3f} ms {flops / ms / 1e9:.0f} TFLOP/s", flush=True)
            except Exception as exc:  # out of shared memory / registers, or unsupported on this GPU
                print(f"{tag} failed: {type(exc).__name__}: {str(exc)[:120]}")

if __name__ == "__main__":
    main()
