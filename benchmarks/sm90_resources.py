"""Compile the kernels for sm_90 on a machine without a GPU and report their resources.

    PYTHONPATH=/path/to/triton-3.6:$PWD/kernels:$PWD python benchmarks/sm90_resources.py [--variants ...]

The real launchers (``sparse_attention``, ``select_blocks``, ``pool_keys``) run on small CPU tensors;
each ``kernel[grid](...)`` they make is caught, its arguments turned into a Triton signature and
compiled by ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` (the H100/H200). Printed per
variant: registers per thread, stack frame bytes (spills; cuobjdump), shared memory, whether the
compiler warp-specialised the kernel, its wgmma count, and whether it compiled at all.
A compile failure here is a compile failure on the GPU, at no device time; the numbers are those of
the installed Triton (pin the GPU machines' version, 3.6, to match them). No timing: speed is
measured on the GPU by ``routes_operator.py``.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import inspect
import json
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.experimental.gluon._runtime import GluonASTSource
from triton.runtime.jit import JITFunction

_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
           torch.int8: "i8", torch.int64: "i64"}


def _signature(fn, args, kwargs):
    """Triton signature, constexprs and divisibility attributes for a call ``fn[grid](*args, **kwargs)``."""
    names = fn.arg_names
    params = {p.name: p for p in fn.params}
    bound = dict(zip(names, args, strict=False))  # (constexprs may come as keywords)
    bound.update({k: v for k, v in kwargs.items() if k in params})
    options = {k: v for k, v in kwargs.items() if k not in params or k == "num_warps"}  # (Gluon takes it as both)
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        value = bound[name]
        if params[name].is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _DTYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if abs(value) < 2**31 else "i64"
            if value % 16 == 0 and value and not params[name].do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]  # as the launcher specialises it
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{name}: {type(value)}")
    return signature, constexprs, attrs, options


def _resource_usage(cubin: bytes) -> dict:
    """Registers per thread and stack frame bytes (spills land there) of a compiled kernel, read by the
    ``cuobjdump`` that Triton's wheel carries."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
    usage = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", text))
    return {"regs": int(usage["REG"]), "stack": int(usage.get("STACK", 0)), "local": int(usage.get("LOCAL", 0))}


class _Catch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` compiles for sm_90 instead of running."""

    def __init__(self, fn, results, tag, originals, dump_dir):
        self.fn, self.results, self.tag, self.originals, self.dump_dir = fn, results, tag, originals, dump_dir

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            signature, constexprs, attrs, options = _signature(self.fn, args, kwargs)
            row = {"kernel": self.fn.__name__, "variant": self.tag}
            module = inspect.getmodule(self.fn.fn)
            swapped = {name: getattr(module, name) for name in self.originals}
            vars(module).update(self.originals)  # the kernel's helpers resolve to the real jit functions
            try:
                src = (GluonASTSource if self.fn.is_gluon() else ASTSource)(self.fn, signature, constexprs, attrs)
                compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
                ttgir = compiled.asm["ttgir"]
                if self.dump_dir:
                    stem = os.path.join(self.dump_dir, f"{self.fn.__name__}-{len(self.results)}")
                    for ext in ("ttgir", "ptx"):
                        with open(f"{stem}.{ext}", "w") as fh:
                            fh.write(compiled.asm[ext])
                    row["dump"] = stem
                row.update(shared=compiled.metadata.shared, **_resource_usage(compiled.asm["cubin"]),
                           warp_specialized="ttg.warp_specialize" in ttgir, wgmma=ttgir.count("warp_group_dot"))
            except Exception as exc:  # the compile error is the result
                row["failed"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
            finally:
                vars(module).update(swapped)
            self.results.append(row)
            print(json.dumps(row), flush=True)

        return launch


@contextlib.contextmanager
def catching(module, results, tag, dump_dir=None):
    """Every ``@triton.jit`` function of ``module`` compiles for sm_90 when launched, instead of running
    (its TTGIR and PTX written into ``dump_dir`` when given)."""
    originals = {name: obj for name, obj in vars(module).items() if isinstance(obj, JITFunction)}
    vars(module).update({name: _Catch(fn, results, tag, originals, dump_dir) for name, fn in originals.items()})
    try:
        yield
    finally:
        vars(module).update(originals)


def main():
    from fp_kernels import BlockRules
    from fp_kernels import pool as pool_mod
    from fp_kernels import select as select_mod
    from fp_kernels import sparse_attention as sparse_mod
    from fp_kernels import sparse_attention_sm90 as sm90_mod

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--sparse", nargs="*", default=["{}"], help="sparse_attention config dicts (Python literals)")
    parser.add_argument("--select", nargs="*", default=["{}"],
                        help="select_blocks config dicts (each on top of its CUDA launch_config)")
    parser.add_argument("--pool", nargs="*", default=[], help="pool_keys config dicts (keys and values)")
    parser.add_argument("--mean-correction", action="store_true")
    parser.add_argument("--sm90", nargs="*", type=int, default=[], metavar="STAGES",
                        help="the Gluon kernel of fp_kernels.sparse_attention_sm90 at these ring depths")
    parser.add_argument("--ranges", action="store_true", help="the sm_90 kernel with padding ranges (kv_start/kv_end)")
    parser.add_argument("--dump", metavar="DIR", help="write each kernel's TTGIR and PTX into DIR")
    args = parser.parse_args()
    if args.dump:
        os.makedirs(args.dump, exist_ok=True)
    sparse_mod.compute_capability_major = lambda index: 9  # tiles of a Hopper GPU (before any is cached)

    dim, bs, seq = args.head_dim, 128, 1024
    q = torch.zeros(1, seq, 32, dim, dtype=torch.bfloat16)
    k = torch.zeros(1, seq, 8, dim, dtype=torch.bfloat16)
    nkb = seq // bs
    index = torch.zeros(1, 32, nkb, nkb, dtype=torch.int32)
    count = torch.ones(1, 32, nkb, dtype=torch.int32)
    kbar = torch.zeros(1, nkb, 8, dim, dtype=torch.bfloat16)
    results = []
    for text in args.sparse:
        cfg = ast.literal_eval(text)
        with catching(sparse_mod, results, text, args.dump):
            sparse_mod.sparse_attention(q, k, k, index, count, bs, config=cfg, mean_correction=args.mean_correction,
                                        kbar=kbar, vbar=kbar)
    ranges = (None, None)
    if args.ranges:
        ranges = (torch.zeros(1, dtype=torch.int32), torch.full((1,), seq, dtype=torch.int32))
    for stages in args.sm90:
        corr = args.mean_correction
        tag = f"sm90 STAGES={stages} mean_correction={corr}" + (" ranges" if args.ranges else "")
        with catching(sm90_mod, results, tag, args.dump):
            sm90_mod.launch(q, k, k, torch.empty_like(q), index, count, *ranges, kbar, kbar, count, 1.0, corr, stages)
    for text in args.select:
        cfg = {**select_mod.launch_config(dim, torch.device("cuda")), **ast.literal_eval(text)}
        with catching(select_mod, results, text, args.dump):
            select_mod.select_blocks(q, kbar, seq, BlockRules(alpha=0.18), config=cfg)
    for text in args.pool:
        cfg = ast.literal_eval(text)
        with catching(pool_mod, results, text, args.dump):
            pool_mod.pool_keys(k, bs, v=k, config=cfg)
    return results


if __name__ == "__main__":
    main()
