"""Shared test setup and fixtures of tests/operator, tests/integration and tests/tools.

On a machine without CUDA the Triton kernels run under the Triton interpreter: TRITON_INTERPRET
must be set before anything imports triton, hence here, first. Model-level tests force the PyTorch
reference backend so they do not crawl through the interpreter.

Helpers that are needed at collection time (parametrize lists, skip marks) live in ``tests/support``
(importable as ``support``: pytest puts this folder on ``sys.path``); test modules never import each other.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from support.kernel_checks import ON_GPU  # noqa: E402
from support.real_weights import unavailable  # noqa: E402


@pytest.fixture
def device() -> str:
    return "cuda" if ON_GPU else "cpu"


@pytest.fixture
def triton_pipeline_calls(monkeypatch) -> list:
    """The shapes of ``q`` of every call of the Triton pipeline (``fp_kernels.pipeline.flash_prefill_triton``;
    ``fp_kernels.api`` imports it at call time, so this spy sees every call), for tests that must know the
    kernels ran (or did not)."""
    import fp_kernels.pipeline

    calls: list = []
    real = fp_kernels.pipeline.flash_prefill_triton

    def counted(*args, **kwargs):
        calls.append(tuple(args[0].shape))
        return real(*args, **kwargs)

    monkeypatch.setattr(fp_kernels.pipeline, "flash_prefill_triton", counted)
    return calls


@pytest.fixture(scope="session")
def smollm2_dir():
    """The embedded SmolLM2 as a Transformers folder (``fp_patch.models.smollm2_path``, converted on first
    use); skips when it is unavailable, fails under ``FLASHPREFILL_REQUIRE_REAL=1``."""
    from fp_patch.models import smollm2_path

    try:
        return smollm2_path()
    except FileNotFoundError as err:
        unavailable(str(err))
