"""The operator alone: ``fp_kernels.flash_prefill`` on raw tensors, its selection, its error, its speed.

Shows: block-sparse causal attention on ``[B, L, H, D]`` tensors (FlashAttention layout, GQA),
``return_info=True`` (density per head, the kept key blocks of each query block), the error
against dense SDPA, and on a CUDA GPU a timing against SDPA with ``triton.testing.do_bench``. The
inputs come from ``fp_tools.synthetic.structured_qkv``: queries and keys with attention sinks,
local diagonals and topic-clustered blocks, as in real LMs (pure noise would give nothing to select).

Run (CPU default: L=1024, 64-token blocks, the pure-PyTorch reference)::

    python examples/operator_only.py
    python examples/operator_only.py --length 32768 --block-size 128    # on a GPU: Triton kernels, bf16
"""

import argparse

import torch
import torch.nn.functional as F
from fp_kernels import flash_prefill

from fp_tools.synthetic import structured_qkv

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--length", type=int, default=1024)
parser.add_argument("--block-size", type=int, default=64)
parser.add_argument("--alpha", type=float, default=0.12)
args = parser.parse_args()

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
q, k, v = structured_qkv(1, args.length, 32, 8, 128, dtype=dtype, device=device, block_size=args.block_size)


def dense_sdpa(q, k, v):
    # SDPA wants [B, H, L, D] and repeated K/V heads (or enable_gqa on torch >= 2.5)
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=True, enable_gqa=True).transpose(1, 2)


out, info = flash_prefill(q, k, v, alpha=args.alpha, block_size=args.block_size, return_info=True)
ref = dense_sdpa(q.float(), k.float(), v.float())
rel_err = ((out.float() - ref).norm() / ref.norm()).item()
density = info.density.float()  # [B, Hq]: computed / causally visible key blocks
print(f"L={args.length} Hq/Hkv=32/8 D=128 {dtype} alpha={args.alpha} block={args.block_size} on {device}")
print(f"density: mean {density.mean():.1%}, heads {density.min():.1%} .. {density.max():.1%}")
print(f"relative L2 error vs dense SDPA: {rel_err:.2e}")
mask = info.block_mask(0, 0)  # [query blocks, key blocks] bool: what head 0 computed
print("head 0, first 16 query blocks (# = computed, . = skipped):")
for i, row in enumerate(mask.tolist()[:16]):
    print("  " + "".join("#" if kept else "." for kept in row[: i + 1]))

if device == "cuda":
    from triton.testing import do_bench

    ms_dense = do_bench(lambda: dense_sdpa(q, k, v))
    ms_sparse = do_bench(lambda: flash_prefill(q, k, v, alpha=args.alpha, block_size=args.block_size))
    print(f"SDPA {ms_dense:.3f} ms, flash_prefill {ms_sparse:.3f} ms: {ms_dense / ms_sparse:.2f}x")

assert 0 < density.mean() < 1, "nothing was skipped: lengthen --length or raise --alpha"
assert rel_err < 0.1, f"sparse output too far from dense: {rel_err:.3g}"
