"""Replaying a flash_prefill call's kernel launches without Triton's per-call dispatch.

``kernel[grid](*args)`` binds and specialises every argument, builds a cache key and looks the binary
up on each call. With our own Python around the three launches (tile choice, device queries,
allocations), one :func:`fp_kernels.flash_prefill` call cost ~310 µs of host time on an H100
machine, ~500 µs inside a forward pass (``benchmarks/results/dev/host_profile_h100_9e22cc6.log``,
``host_in_forward_h100_9e22cc6_sparse.log``): 15 ms of a 30-layer model's prefill, which on a small
model is bound by the host. Replayed: ~40 % of the usual path's host time
(``benchmarks/results/host_profile_h100.log``). A model calls the operator with the same shapes in
every layer, so the first call with a given signature (the ``key`` built in
:func:`fp_kernels.pipeline.flash_prefill_triton`) runs as usual while :func:`recording` notes each
launch (the binary Triton chose, the grid, the arguments), and later calls with that signature replay
the note (:class:`LaunchPlan`): fresh outputs, the same binaries called directly with the new tensors.

Why that is exact: the signature holds everything Triton's choice of binary and the arguments depend
on except the tensors' addresses (shapes, strides, dtype, device, the scalar settings), inputs whose
addresses are 16-byte aligned (the one property of an address Triton specialises on; the outputs come
from PyTorch's allocator, always aligned), and a plan is only made when every tensor a launch took is
an input or an output the kernels fill (:meth:`LaunchPlan.build`). Replays call the launcher Triton
itself calls (a kernel's global scratch is handled the same way) on the current stream, so they also
work inside CUDA-graph capture. Launches under a Triton launch hook (profilers) are never replayed.
"""

from __future__ import annotations

import threading

import torch
from triton import knobs
from triton.runtime import driver

_local = threading.local()  # .launches: the list the call being recorded appends to


def launch(kernel, grid: tuple, args: tuple, kwargs: dict) -> None:
    """``kernel[grid](*args, **kwargs)``; noted while a call is being recorded."""
    compiled = kernel[grid](*args, **kwargs)
    launches = getattr(_local, "launches", None)
    if launches is not None:
        launches.append((kernel, compiled, grid, args, kwargs))


class recording:  # noqa: N801 (used as a context manager, like torch.no_grad)
    """``with recording() as launches:`` collects the launches made inside (this thread only)."""

    def __enter__(self) -> list:
        self.outer = getattr(_local, "launches", None)
        _local.launches = []
        return _local.launches

    def __exit__(self, *exc) -> None:
        _local.launches = self.outer


def hooked() -> bool:
    """A Triton launch hook is set (a profiler wants to see every launch go through Triton). Triton
    keeps the hooks in a chain object, empty when there are none."""
    hook = knobs.runtime.launch_enter_hook
    return hook is not None and bool(getattr(hook, "calls", True))


class LaunchPlan:
    """A recorded call: ``allocs`` (shape, dtype) of the outputs to allocate, ``steps`` (launcher,
    function, metadata, grid, argument values with ``None`` where a tensor goes, (position, tensor slot)
    pairs), ``returns`` (slots of the tensors the call returns). Slots: the inputs, then the outputs."""

    __slots__ = ("allocs", "steps", "returns")

    def __init__(self, allocs, steps, returns):
        self.allocs, self.steps, self.returns = allocs, steps, returns

    @classmethod
    def build(cls, launches: list, inputs: tuple, outputs: tuple, returned: tuple) -> LaunchPlan | None:
        """The plan of a recorded call, or ``None`` when it cannot be replayed exactly: a launch went
        through the interpreter (no compiled binary), or took a tensor that is neither one of
        ``inputs`` nor one of ``outputs``. ``outputs`` must be fresh contiguous tensors that the
        launches fill before anything reads them (a replay allocates them empty)."""
        slot_of = {id(t): i for i, t in enumerate((*inputs, *outputs))}
        if len(slot_of) != len(inputs) + len(outputs) or not all(t.is_contiguous() for t in outputs):
            return None
        steps = []
        for kernel, compiled, grid, args, kwargs in launches:
            function = getattr(compiled, "function", None)
            if function is None or not hasattr(compiled, "packed_metadata"):
                return None
            names = kernel.arg_names
            if any(name not in kwargs for name in names[len(args):]):
                return None  # a parameter left to its default
            values = [*args, *(kwargs[name] for name in names[len(args):])]
            slots = []
            for pos, value in enumerate(values):
                if isinstance(value, torch.Tensor):
                    slot = slot_of.get(id(value))
                    if slot is None:
                        return None
                    slots.append((pos, slot))
                    values[pos] = None
            grid3 = (*grid, 1, 1)[:3]
            steps.append((compiled.run, function, compiled.packed_metadata, grid3, tuple(values), tuple(slots)))
        allocs = tuple((t.shape, t.dtype) for t in outputs)
        return cls(allocs, tuple(steps), tuple(slot_of[id(t)] for t in returned))

    def run(self, inputs: tuple, device: torch.device, stream=None) -> tuple:
        """Allocate the outputs and launch every step on ``stream`` (default: the current stream of
        ``device``, which the caller makes the current device); returns the ``returned`` tensors."""
        tensors = [*inputs, *(torch.empty(shape, dtype=dtype, device=device) for shape, dtype in self.allocs)]
        if stream is None:
            stream = driver.active.get_current_stream(device.index)
        for launcher, function, metadata, grid, values, slots in self.steps:
            args = list(values)
            for pos, slot in slots:
                args[pos] = tensors[slot]
            launcher(grid[0], grid[1], grid[2], stream, function, metadata, None, None, None, *args)
        return tuple(tensors[i] for i in self.returns)
