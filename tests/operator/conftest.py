"""Fixtures of the operator tests (fp_kernels)."""

import pytest


@pytest.fixture
def triton_calls(triton_pipeline_calls, monkeypatch) -> list:
    """Every ``flash_prefill`` call of a test using this must run the Triton pipeline: one that would go to
    the PyTorch reference (``backend="auto"`` with inputs the kernels cannot take, or a broken interpreter
    detection) fails instead of silently comparing the reference with itself. Returns the shapes of
    ``q`` of the pipeline's calls, for tests to assert on. test_kernels.py and test_mean_correction.py use
    it for every test (``pytestmark``)."""
    import fp_kernels.api

    real_reason = fp_kernels.api.kernel_backend_reason

    def no_silent_reference(q):
        reason = real_reason(q)
        if reason is not None:
            raise AssertionError(
                f"flash_prefill would run the PyTorch reference instead of the Triton kernels: {reason}"
            )
        return None

    # fp_kernels.api._run looks kernel_backend_reason up globally at call time
    monkeypatch.setattr(fp_kernels.api, "kernel_backend_reason", no_silent_reference)
    return triton_pipeline_calls
