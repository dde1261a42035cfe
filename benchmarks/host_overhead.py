"""Host (CPU) cost per attention call: where a small model's prefill time goes.

A 135M model's prefill is bound by the host issuing kernels, not by the GPU, so the microseconds
each attention call spends in Python and in kernel launches decide its time to first token. This
times, per call at one shape, the host side (calls issued back to back without a sync, the GPU
running behind) and the GPU side (CUDA events around the same loop) of:

* ``F.scaled_dot_product_attention`` and Transformers' own ``sdpa_attention_forward``;
* our attention function routed dense (below ``min_sparse_len``) and routed sparse (eager: the host
  µs per sparse attention call that a forward pass pays, target <= 60 µs on an H100/H200);
* ``fp_kernels.flash_prefill`` and each of its three kernels alone.

    python benchmarks/host_overhead.py --out benchmarks/results/host_overhead_h100.json

Defaults: the SmolLM2-135M attention shape (9 query / 3 kv heads, D=64) at 4096 tokens, and the
Llama-8B shape (32 / 8, D=128) for comparison.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

SHAPES = {"smollm2": (9, 3, 64), "llama8b": (32, 8, 128)}


def per_call_us(fn, calls: int, cuda: bool = True) -> tuple[float, float | None]:
    """(host µs, GPU µs) per call of ``fn`` over ``calls`` calls issued back to back."""
    for _ in range(3):
        fn()
    if not cuda:  # a dry run on the CPU (TRITON_INTERPRET=1): host time only
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) / calls * 1e6, None
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls * 1e6
    end.record()
    torch.cuda.synchronize()
    return host, start.elapsed_time(end) / calls * 1e3


def attention_module(q_heads: int, kv_heads: int, dim: int, min_sparse_len: int):
    """A real Llama attention layer configured for flashprefill (random weights, never run)."""
    import transformers

    import fp_patch

    config = transformers.LlamaConfig(
        hidden_size=q_heads * dim,
        num_attention_heads=q_heads,
        num_key_value_heads=kv_heads,
        head_dim=dim,
        num_hidden_layers=1,
        intermediate_size=64,
        vocab_size=128,
    )
    config._attn_implementation = "flashprefill"
    layer = transformers.models.llama.modeling_llama.LlamaAttention(config, layer_idx=0)
    fp_patch.configure(layer, alpha=0.18, min_sparse_len=min_sparse_len)
    return layer


def measure(name: str, length: int, calls: int, device: str = "cuda") -> list[dict]:
    import fp_kernels
    import torch.nn.functional as F
    from fp_kernels.pool import pool_keys
    from fp_kernels.select import select_blocks
    from fp_kernels.sparse_attention import sparse_attention
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from fp_patch.attention import flashprefill_attention_forward

    hq, hkv, dim = SHAPES[name]
    torch.manual_seed(0)
    cuda = device == "cuda"
    dev, dt = device, torch.bfloat16 if cuda else torch.float32
    # Transformers' layout [B, H, L, D]; the operator's [B, L, H, D] is a transpose of it
    query = torch.randn(1, hq, length, dim, device=dev, dtype=dt)
    key = torch.randn(1, hkv, length, dim, device=dev, dtype=dt)
    value = torch.randn_like(key)
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    sparse_layer = attention_module(hq, hkv, dim, min_sparse_len=2)
    dense_layer = attention_module(hq, hkv, dim, min_sparse_len=1 << 30)
    kbar = pool_keys(k, 128)
    rules = fp_kernels.BlockRules(alpha=0.18)
    index, count = select_blocks(q, kbar, length, rules, num_kv_heads=hkv)
    density = fp_kernels.flash_prefill(q, k, v, 0.18, return_info=True)[1].density.mean().item()
    cases = {
        "F.scaled_dot_product_attention": lambda: F.scaled_dot_product_attention(
            query, key, value, is_causal=True, enable_gqa=True
        ),
        "transformers sdpa_attention_forward": lambda: sdpa_attention_forward(
            dense_layer, query, key, value, None, is_causal=True
        ),
        "flashprefill attention, routed dense": lambda: flashprefill_attention_forward(
            dense_layer, query, key, value, None
        ),
        "flashprefill attention, sparse": lambda: flashprefill_attention_forward(sparse_layer, query, key, value, None),
        "fp_kernels.flash_prefill": lambda: fp_kernels.flash_prefill(q, k, v, 0.18),
        "pool_keys": lambda: pool_keys(k, 128),
        "select_blocks": lambda: select_blocks(q, kbar, length, rules, num_kv_heads=hkv),
        "sparse_attention": lambda: sparse_attention(q, k, v, index, count, 128),
    }
    rows = []
    with torch.no_grad():
        for case, fn in cases.items():
            host, gpu = per_call_us(fn, calls, cuda)
            rows.append(
                {"shape": name, "tokens": length, "case": case, "host_us": host, "gpu_us": gpu, "density": density}
            )
            gpu_text = "" if gpu is None else f"   GPU {gpu:9.1f} us/call"
            print(f"{name:8} L={length:6} {case:40} host {host:8.1f} us/call{gpu_text}")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--lengths", type=int, nargs="*", default=[4096])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--device", default="cuda", help="cpu: a dry run under TRITON_INTERPRET=1 (host times only)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("host_overhead.py needs a CUDA GPU (or --device cpu with TRITON_INTERPRET=1 for a dry run)")
    import fp_patch  # noqa: F401  (registers "flashprefill")
    from fp_tools.benchmark import environment

    rows = [
        r for name in args.shapes for length in args.lengths for r in measure(name, length, args.calls, args.device)
    ]
    if args.out:
        args.out.write_text(json.dumps({"environment": environment(), "calls": args.calls, "rows": rows}, indent=1))
        print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
