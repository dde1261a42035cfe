"""benchmarks/sm90_resources.py compiles the kernels for sm_90 on a machine without a GPU (the installed
Triton's compiler and the cuobjdump its Linux wheel carries): a resource row for a valid config, the
compiler's error for an invalid one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_tool(*args: str) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "kernels"), str(ROOT)]))
    env.pop("TRITON_INTERPRET", None)  # it compiles, it does not interpret
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sm90_resources.py"), *args], env=env,
                         capture_output=True, text=True, timeout=600, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_pool_kernel_compiles_for_sm90_and_a_bad_config_fails():
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this Triton wheel carries no cuobjdump")
    good, bad = run_tool("--sparse", "--select", "--pool", "{}", "{'ROWS': 48}")
    assert good["kernel"] == "_pool_keys_kernel" and "failed" not in good, good
    assert good["regs"] > 0 and good["shared"] > 0 and good["wgmma"] == 0
    assert "failed" in bad and "regs" not in bad  # tl.arange needs a power of two


def test_the_sm90_gluon_kernel_compiles_warp_specialised():
    """The package's sm_90 kernel (fp_kernels.sparse_attention_sm90) compiles on the installed Triton (CI: the
    CPU machine's; the GPU machines run 3.6) into producer and consumer partitions, with and without the mean
    correction and padding ranges. Spills stay small: a few of a work item's scalars outside the hot loop (the
    correction's per-column vectors, if hoisted out of the loop, spill 100+ bytes)."""
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this Triton wheel carries no cuobjdump")
    for corr in ([], ["--mean-correction"]):
        (row,) = run_tool("--sparse", "--select", "--sm90", "3", *corr)
        assert row["kernel"] == "_sparse_attention_sm90_kernel" and "failed" not in row, row
        assert row["warp_specialized"] and row["wgmma"] > 0 and row["stack"] <= 64, row
    (row,) = run_tool("--sparse", "--select", "--sm90", "3", "--ranges", "--mean-correction")
    assert row["warp_specialized"] and "failed" not in row, row  # (the partial last block's length: a vector)
