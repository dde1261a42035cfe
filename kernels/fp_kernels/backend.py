"""Which backend can run the kernels: the Triton version floor, the CPU interpreter, device and dtype."""

from __future__ import annotations

import functools
import os

import torch

# the kernels use tl.make_tensor_descriptor, tl.range(warp_specialize=) and triton.set_allocator;
# 3.6 is the oldest release they were run on (pyproject.toml states the same floor)
MIN_TRITON = (3, 6)


@functools.lru_cache(maxsize=1)
def triton_problem() -> str | None:
    """``None`` when a usable Triton is installed, otherwise why not (missing, or older than MIN_TRITON)."""
    try:
        import triton
    except ImportError:
        return "Triton is not installed"
    try:
        version = tuple(int(part) for part in triton.__version__.split(".")[:2])
    except ValueError:  # a development build: trust it
        return None
    if version < MIN_TRITON:
        return (
            f"Triton {triton.__version__} is older than {MIN_TRITON[0]}.{MIN_TRITON[1]}, which the kernels need "
            "(pip install -U triton, or a PyTorch build that ships a newer one)"
        )
    return None


def triton_available() -> bool:
    return triton_problem() is None


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_backend_reason(q: torch.Tensor) -> str | None:
    """``None`` when the Triton kernels can run on ``q``; otherwise why the reference is used."""
    problem = triton_problem()
    if problem is not None:
        return problem
    if q.is_cuda:
        if q.dtype == torch.float32:
            return "float32 inputs on the GPU (the kernels take float16/bfloat16)"
        return None
    if q.device.type == "cpu" and interpreter_enabled():
        if q.dtype == torch.bfloat16:
            return "bfloat16 under TRITON_INTERPRET (the interpreter computes bfloat16 wrongly)"
        return None
    return f"device {q.device.type!r} has no Triton backend (set TRITON_INTERPRET=1 to run the kernels on CPU)"
