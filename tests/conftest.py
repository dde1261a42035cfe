"""Shared test setup.

On a machine without CUDA the Triton kernels run under the Triton interpreter: TRITON_INTERPRET
must be set before anything imports triton, hence here, first. Model-level tests force the PyTorch
reference backend so they do not crawl through the interpreter.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

ON_GPU = torch.cuda.is_available()


@pytest.fixture
def device() -> str:
    return "cuda" if ON_GPU else "cpu"


def kernel_dtypes() -> list[torch.dtype]:
    """Dtypes the kernels are tested in: bf16 is broken in the interpreter, fp32 runs the reference on GPU."""
    return [torch.bfloat16, torch.float16] if ON_GPU else [torch.float16, torch.float32]
