"""Kernel-test helpers: the dtypes under test, NaN poisoning, tolerances relative to the reference's own
low-precision error, block selections compared up to rounding, readable case ids."""

from __future__ import annotations

import contextlib
import importlib
import math
import traceback

import pytest
import torch
from fp_kernels import block_scores_reference, flash_prefill_reference

ON_GPU = torch.cuda.is_available()


def kernel_dtypes() -> list[torch.dtype]:
    """Dtypes the kernels are tested in: bf16 is broken in the interpreter, fp32 runs the reference on GPU."""
    return [torch.bfloat16, torch.float16] if ON_GPU else [torch.float16, torch.float32]


# the kernel launchers that allocate outputs with ``torch.empty``
_LAUNCHER_MODULES = ("fp_kernels.pool", "fp_kernels.select", "fp_kernels.sparse_attention")
POISON_INT = -7


class _PoisonedTorch:
    """``torch`` as the kernel launchers see it, except that ``empty`` returns poisoned memory: NaN
    for floating dtypes, ``POISON_INT`` for integers. Every allocation is appended to ``allocations``."""

    def __init__(self, real, allocations: list):
        self._real = real
        self.allocations = allocations

    def __getattr__(self, name):
        return getattr(self._real, name)

    def empty(self, *size, **kwargs):
        t = self._real.empty(*size, **kwargs)
        t.fill_(float("nan") if t.is_floating_point() else POISON_INT)
        self.allocations.append((tuple(t.shape), t.dtype))
        return t


def poison_allocator(device: str, monkeypatch: pytest.MonkeyPatch, nbytes: int = 1 << 26) -> list:
    """Make every output buffer the kernel launchers allocate start as junk, so a kernel that leaves
    an element unwritten fails the test (fla's ``poison_torch_memory`` idea).

    On every device, ``torch.empty`` as seen from :data:`_LAUNCHER_MODULES` returns NaN-filled floats
    and ``POISON_INT``-filled integers (undone by ``monkeypatch``). On the GPU, a block of the caching
    allocator is also filled with NaN and freed, so other allocations (``new_empty``, ``empty_like``)
    get NaN too. Returns the list of poisoned allocations ``(shape, dtype)``, filled as the launchers
    run: assert it is not empty, or the poisoning missed the buffers under test."""
    allocations: list = []
    for name in _LAUNCHER_MODULES:
        module = importlib.import_module(name)
        monkeypatch.setattr(module, "torch", _PoisonedTorch(torch, allocations))
    if device == "cuda":
        block = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
        block.fill_(float("nan"))
        del block
    return allocations


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


def assert_selection_matches(q, k, info, alpha, bs, rules, kv_start=None, kv_end=None, margin=None):
    """Kernel block lists equal the reference's, except for blocks whose fp32 score sits within
    ``margin`` (nats) of the threshold, where input-precision rounding may decide either way."""
    ref_out, ref_info = flash_prefill_reference(
        q.float(), k.float(), k.float(), alpha, bs, **rules, kv_start=kv_start, kv_end=kv_end,
        group_select=info.group_select, return_info=True,
    )
    if margin is None:
        margin = 1e-4 if q.dtype == torch.float32 else 0.05
    got = torch.stack([torch.stack([info.block_mask(b, h) for h in range(q.shape[2])])
                       for b in range(q.shape[0])])
    want = torch.stack([torch.stack([ref_info.block_mask(b, h) for h in range(q.shape[2])])
                        for b in range(q.shape[0])])
    if (got == want).all():
        return
    assert alpha > 0, "alpha=0 must select every visible block"
    scores = block_scores_reference(q.float(), k.float(), bs, None, kv_start, kv_end)
    row_max = scores.amax(-1, keepdim=True)
    ambiguous = (scores - (row_max + math.log(alpha))).abs() < margin
    if info.group_select:  # a group's union is ambiguous where any member head is
        group = q.shape[2] // k.shape[2]
        ambiguous = ambiguous.view(q.shape[0], -1, group, *ambiguous.shape[2:]).any(2).repeat_interleave(group, 1)
    bad = (got != want) & ~ambiguous
    assert not bad.any(), f"{int(bad.sum())} block decisions differ from the reference beyond rounding"
