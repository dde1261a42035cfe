"""Where the sparse operator's host time goes, one ``fp_kernels.flash_prefill`` call at a time.

SmolLM2 shape (9 query / 3 key-value heads, D=64, bf16, random inputs), CUDA only::

    python benchmarks/host_profile.py 16384

Each row is the median host time of one call (the GPU synchronised before each, so no queue builds
up): the whole operator replayed (``fp_kernels.launch``) and through the usual path, its parts
(validation, the three wrappers), each Triton launch through ``kernel[grid](...)``, its argument
binding alone and a direct call of the compiled binary, and the small PyTorch/Triton queries the
wrappers make; then a ``cProfile`` of 300 calls. Results: ``results/host_profile_h100.log``; before
the replay existed, ``results/dev/host_profile_h100_9e22cc6*.log`` (this script then lived outside
the repository as ``.carry/hostprof.py``, without the replay rows).
"""

from __future__ import annotations

import cProfile
import io
import pstats
import statistics
import sys
import time

import fp_kernels.pipeline
import torch
import triton
from fp_kernels import flash_prefill
from fp_kernels.api import validate_inputs
from fp_kernels.pool import _pool_keys_kernel, launch_device, pool_keys
from fp_kernels.select import _select_blocks_kernel, select_blocks
from fp_kernels.sparse_attention import _sparse_attention_kernel, _tile_config, _tma_ok, sparse_attention
from triton.runtime import driver

HQ, HKV, D = 9, 3, 64
SETTINGS = dict(alpha=0.18, block_size=128, sink_blocks=2, window_blocks=4, last_dense_blocks=2, min_budget=0,
                scale=0.125)
KERNELS = (_pool_keys_kernel, _select_blocks_kernel, _sparse_attention_kernel)


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


def capture_launches(q, k, v) -> dict:
    """The arguments of each kernel's launch in one usual-path call: ``{kernel: (args, kwargs, grid)}``."""
    captured = {}
    for kern in KERNELS:
        def spy(*args, grid, warmup, _run=kern.run, _kern=kern, **kwargs):
            captured[_kern] = (args, dict(kwargs), grid)
            return _run(*args, grid=grid, warmup=warmup, **kwargs)

        kern.run = spy
    try:
        usual_path(lambda: flash_prefill(q, k, v, **SETTINGS))
    finally:
        for kern in KERNELS:
            del kern.run  # back to the class's method
    return captured


def usual_path(fn):
    """``fn()`` with replays off (a launch hook stands for "someone wants every launch through Triton")."""
    real = fp_kernels.pipeline.hooked
    fp_kernels.pipeline.hooked = lambda: True
    try:
        return fn()
    finally:
        fp_kernels.pipeline.hooked = real


def launch_rows(kern, args, kwargs, grid, device) -> list[tuple[str, float]]:
    name = kern.fn.__name__
    compiled = kern[grid](*args, **kwargs)
    binder = kern.device_caches[device][4]  # Triton's argument binder (internal)
    bound, _, _ = binder(*args, **kwargs)
    values = list(bound.values())
    grid3 = (*grid, 1, 1)[:3]
    launcher, function, meta = compiled.run, compiled.function, compiled.packed_metadata
    stream = driver.active.get_current_stream(device)

    def direct():
        launcher(*grid3, driver.active.get_current_stream(device), function, meta, None, None, None, *values)

    def direct_stream_given():
        launcher(*grid3, stream, function, meta, None, None, None, *values)

    return [
        (f"{name}[grid](...) (Triton run)", host_us(lambda: kern[grid](*args, **kwargs))),
        (f"{name} binder only", host_us(lambda: binder(*args, **kwargs))),
        (f"{name} compiled.run direct (+stream query)", host_us(direct)),
        (f"{name} compiled.run direct (stream given)", host_us(direct_stream_given)),
    ]


def main() -> int:
    if not torch.cuda.is_available():
        raise SystemExit("host_profile.py needs a CUDA GPU")
    length = int(sys.argv[1]) if len(sys.argv) > 1 else 16384
    dev = torch.device("cuda")
    torch.manual_seed(0)
    # Transformers' [B, H, L, D] projections seen as [B, L, H, D], as the attention function passes them
    q = torch.randn(1, HQ, length, D, device=dev, dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(1, HKV, length, D, device=dev, dtype=torch.bfloat16).transpose(1, 2)
    v = torch.randn(1, HKV, length, D, device=dev, dtype=torch.bfloat16).transpose(1, 2)
    captured = capture_launches(q, k, v)
    replayed, usual = flash_prefill(q, k, v, **SETTINGS), usual_path(lambda: flash_prefill(q, k, v, **SETTINGS))
    print("replayed == usual path:", torch.equal(replayed, usual))

    kbar = pool_keys(k, 128)
    index, count = select_blocks(q, kbar, length, 0.18, 128, 2, 4, 2, 0, 0.125, num_kv_heads=HKV)
    device = driver.active.get_current_device()
    rows = [
        ("flash_prefill (api, 3 launches, replayed)", host_us(lambda: flash_prefill(q, k, v, **SETTINGS))),
        ("flash_prefill (api, 3 launches, usual path)",
         usual_path(lambda: host_us(lambda: flash_prefill(q, k, v, **SETTINGS)))),
        ("validate_inputs", host_us(lambda: validate_inputs(q, k, v, 0.18, 128, 2, 4, 2, 0, 0.125, None, None,
                                                            for_kernel=True))),
        ("pool_keys (wrapper)", host_us(lambda: pool_keys(k, 128))),
        ("select_blocks (wrapper)",
         host_us(lambda: select_blocks(q, kbar, length, 0.18, 128, 2, 4, 2, 0, 0.125, num_kv_heads=HKV))),
        ("sparse_attention (wrapper)", host_us(lambda: sparse_attention(q, k, v, index, count, 128, 0.125))),
    ]
    for kern, (args, kwargs, grid) in captured.items():
        rows += launch_rows(kern, args, kwargs, grid, device)

    def switch_device():
        with launch_device(q):
            pass

    rows += [
        (f"torch.empty(1, {length}, {HQ}, {D})",
         host_us(lambda: torch.empty(1, length, HQ, D, dtype=torch.bfloat16, device=dev))),
        ("with launch_device(q): pass", host_us(switch_device)),
        ("torch.cuda.get_device_capability(dev)", host_us(lambda: torch.cuda.get_device_capability(dev))),
        ("_tile_config", host_us(lambda: _tile_config(128, D, dev, False))),
        ("_tma_ok(k, v)", host_us(lambda: _tma_ok(k, v))),
        ("driver.active.get_current_stream(device)", host_us(lambda: driver.active.get_current_stream(device))),
        ("torch.cuda.current_device()", host_us(torch.cuda.current_device)),
        ("triton.next_power_of_2(64)", host_us(lambda: triton.next_power_of_2(64))),
        ("F.scaled_dot_product_attention (reference point)", host_us(
            lambda: torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True))),
    ]
    for name, us in rows:
        print(f"L={length:6d} {name:58s} {us:8.1f} us", flush=True)

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(300):
        flash_prefill(q, k, v, **SETTINGS)
    prof.disable()
    torch.cuda.synchronize()
    report = io.StringIO()
    pstats.Stats(prof, stream=report).sort_stats("tottime").print_stats(30)
    print(report.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
