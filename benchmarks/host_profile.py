"""Where the sparse operator's host time goes, one call at a time (public APIs only).

SmolLM2 shape (9 query / 3 key-value heads, D=64, bf16, random inputs) by default, CUDA only::

    python benchmarks/host_profile.py 16384            # prompt length
    python benchmarks/host_profile.py 16384 llama8b    # 32 / 8 heads, D=128

Each row is the median host time of one call (the GPU synchronised before each, so no queue builds
up): our attention function on a sparse route (what a forward pass pays per layer, eager; target
<= 60 µs on an H100/H200), ``fp_kernels.flash_prefill``, its parts (validation, the three stage
wrappers, each doing one ordinary ``kernel[grid](...)`` launch), a few PyTorch queries the wrappers
make, and Transformers' SDPA call as the reference point; then a ``cProfile`` of 300 operator calls.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import statistics
import sys
import time

import torch
from fp_kernels import BlockRules, flash_prefill
from fp_kernels.pool import launch_device, pool_keys
from fp_kernels.select import select_blocks
from fp_kernels.sparse_attention import sparse_attention
from fp_kernels.validation import validate_inputs, validate_inputs_once
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import fp_patch
from fp_patch.attention import flashprefill_attention_forward

SHAPES = {"smollm2": (9, 3, 64), "llama8b": (32, 8, 128)}
RULES = BlockRules(alpha=0.18, block_size=128, sink_blocks=2, window_blocks=4, last_dense_blocks=2, min_budget=0)


def host_us(fn, n: int = 300) -> float:
    """Median host time of ``fn()`` in µs, the GPU idle before each call."""
    for _ in range(10):
        fn()
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e6


def main() -> int:
    if not torch.cuda.is_available():
        raise SystemExit("host_profile.py needs a CUDA GPU")
    length = int(sys.argv[1]) if len(sys.argv) > 1 else 16384
    shape = sys.argv[2] if len(sys.argv) > 2 else "smollm2"
    hq, hkv, dim = SHAPES[shape]
    scale = dim**-0.5
    dev = torch.device("cuda")
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    # Transformers' [B, H, L, D] projections, and the [B, L, H, D] views the operator gets
    query = torch.randn(1, hq, length, dim, device=dev, dtype=torch.bfloat16)
    key = torch.randn(1, hkv, length, dim, device=dev, dtype=torch.bfloat16)
    value = torch.randn(1, hkv, length, dim, device=dev, dtype=torch.bfloat16)
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))

    import transformers

    config = transformers.LlamaConfig(hidden_size=hq * dim, num_attention_heads=hq, num_key_value_heads=hkv,
                                      head_dim=dim, num_hidden_layers=1, intermediate_size=64, vocab_size=128)
    layer = transformers.models.llama.modeling_llama.LlamaAttention(config, layer_idx=0)
    fp_patch.configure(layer, alpha=0.18, min_sparse_len=2)
    with fp_patch.record_density(layer) as rec:
        flashprefill_attention_forward(layer, query, key, value, None)
    print(f"{shape} L={length}: the attention function ran sparse: {len(rec.to_frame()) > 0} "
          f"(density {rec.density():.1%})")

    kbar = pool_keys(k, 128)
    index, count = select_blocks(q, kbar, length, RULES, scale, num_kv_heads=hkv)
    args = (q, k, v, scale, None, None)

    def switch_device():
        with launch_device(q):
            pass

    rows = [
        ("flashprefill_attention_forward, sparse route (eager)",
         host_us(lambda: flashprefill_attention_forward(layer, query, key, value, None))),
        ("fp_kernels.flash_prefill (3 launches)", host_us(lambda: flash_prefill(q, k, v, scale=scale, rules=RULES))),
        ("validate_inputs (full check)", host_us(lambda: validate_inputs(*args, for_kernel=True))),
        ("validate_inputs_once (seen signature)", host_us(lambda: validate_inputs_once(*args, for_kernel=True))),
        ("pool_keys (wrapper + launch)", host_us(lambda: pool_keys(k, 128))),
        ("select_blocks (wrapper + launch)",
         host_us(lambda: select_blocks(q, kbar, length, RULES, scale, num_kv_heads=hkv))),
        ("sparse_attention (wrapper + launch)", host_us(lambda: sparse_attention(q, k, v, index, count, 128, scale))),
        (f"torch.empty(1, {length}, {hq}, {dim})",
         host_us(lambda: torch.empty(1, length, hq, dim, dtype=torch.bfloat16, device=dev))),
        ("with launch_device(q): pass", host_us(switch_device)),
        ("torch.cuda.get_device_capability(dev) (cached in the kernels)",
         host_us(lambda: torch.cuda.get_device_capability(dev))),
        ("torch.cuda.current_device()", host_us(torch.cuda.current_device)),
        ("transformers sdpa_attention_forward (reference point)",
         host_us(lambda: sdpa_attention_forward(layer, query, key, value, None, is_causal=True))),
    ]
    for name, us in rows:
        print(f"{shape} L={length:6d} {name:62s} {us:8.1f} us", flush=True)

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(300):
        flashprefill_attention_forward(layer, query, key, value, None)
    prof.disable()
    torch.cuda.synchronize()
    report = io.StringIO()
    pstats.Stats(prof, stream=report).sort_stats("tottime").print_stats(25)
    print(report.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
