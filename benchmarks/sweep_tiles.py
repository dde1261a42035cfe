"""Tile sweep for the sparse attention kernel: which (BLOCK_M, BLOCK_N, warps, stages) per head dim.

    python benchmarks/sweep_tiles.py --seq-len 32768 --density 0.6

Prints TFLOP/s of computed work per configuration (correctness checked first); the winners are
the defaults in ``kernels/sparse_attention.py::_tile_config`` (keyed by head dim, never by length).
"""

import argparse
import itertools

import torch
from fp_kernels.benchmark import _bench, causal_flops, spot_check
from fp_kernels.sparse_attention import sparse_attention
from fp_kernels.synthetic import random_block_lists, structured_qkv


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--density", type=float, default=0.6)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[128, 64])
    args = parser.parse_args()
    for dim in args.head_dims:
        heads, kv_heads = 32, 8
        q, k, v = structured_qkv(1, args.seq_len, heads, kv_heads, dim, dtype=torch.bfloat16, device="cuda")
        index, count = random_block_lists(1, heads, args.seq_len, args.seq_len, 128, args.density, device="cuda")
        n_slots = count.shape[-1]
        density = float(count.float().sum() / (heads * n_slots * (n_slots + 1) / 2))
        flops = causal_flops(1, heads, args.seq_len, args.seq_len, dim) * density
        for bm, bn, warps, stages in itertools.product((64, 128), (64, 128), (4, 8), (2, 3)):
            cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}
            try:
                out = sparse_attention(q, k, v, index, count, 128, config=cfg)
                err = spot_check(q, k, v, out, index, count, 128, rows=16)
                if err > 2e-2 or torch.isnan(out).any():
                    print(f"D={dim} {cfg} WRONG err={err:.3g}")
                    continue
                ms = _bench(sparse_attention, q, k, v, index, count, 128, config=cfg, rep=50)
                print(f"D={dim} density={density:.3f} {cfg} {ms:.3f} ms {flops / ms / 1e9:.0f} TFLOP/s", flush=True)
            except Exception as exc:  # out of shared memory / registers for this tile
                print(f"D={dim} {cfg} failed: {type(exc).__name__}: {str(exc)[:120]}")


if __name__ == "__main__":
    main()
