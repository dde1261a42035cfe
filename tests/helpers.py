"""Test helpers: NaN poisoning, tolerances relative to the reference's own low-precision error."""

from __future__ import annotations

import contextlib
import traceback

import pytest
import torch


def poison_allocator(device: str, nbytes: int = 1 << 26) -> None:
    """Fill a block of the caching allocator with NaN and free it, so the next ``torch.empty`` on
    the GPU returns NaN-filled memory (fla's ``poison_torch_memory`` idea). No-op on the CPU, where
    tests poison explicit ``out=`` buffers instead."""
    if device == "cuda":
        block = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
        block.fill_(float("nan"))
        del block


def assert_close_to_reference(out: torch.Tensor, ref32: torch.Tensor, ref_lowp: torch.Tensor, name: str = "") -> None:
    """``out`` (kernel) against ``ref32`` (fp32 math): the error may be at most 3x the error the
    reference itself makes when its attention probabilities are rounded to the input dtype
    (``ref_lowp``), plus a floor for exact-ish dtypes. NaN never passes."""
    assert not torch.isnan(out).any(), f"{name}: NaN in output"
    assert out.shape == ref32.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref32.shape)}"
    err = (out.float() - ref32.float()).abs().max().item()
    budget = 3 * (ref_lowp.float() - ref32.float()).abs().max().item() + 2e-5
    assert err <= budget, (
        f"{name}: max error {err:.3g} exceeds {budget:.3g} (3x the reference's own low-precision error)"
    )


def case_id(batch, q_len, k_len, hq, hkv, dim, **extra) -> str:
    lens = f"L{q_len}" if q_len == k_len else f"Lq{q_len}-Lk{k_len}"
    more = "".join(f"-{k}{v}" for k, v in extra.items())
    return f"B{batch}-{lens}-H{hq}/{hkv}-D{dim}{more}"


@contextlib.contextmanager
def short_failure():
    """Report an exception as one short failure: its type, message and the last frames of our code.

    torch.compile tracebacks run to hundreds of lines of Dynamo internals before the message, and CI
    logs keep only their start (a CI run once failed two compile tests with no cause visible)."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - re-raised as a test failure with the cause up front
        ours = [f for f in traceback.extract_tb(err.__traceback__) if "site-packages" not in f.filename]
        where = "; ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in ours[-4:])
        pytest.fail(f"{type(err).__name__}: {str(err)[:3000]}\n(our frames: {where})", pytrace=False)
