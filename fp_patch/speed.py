"""The speed guard: each layer runs whichever of sparse FlashPrefill and dense SDPA is faster.

Sparse prefill pays off only when building the block index plus computing the kept blocks costs
less than dense attention. That depends on the GPU, the shapes, the prompt length, how busy the
host is (a tiny model is bound by kernel launches, not by the GPU), and on the layer's density,
which is known only after selection. A crossover guessed once is wrong somewhere, which is how
sparse prefill ends up slower than dense; the guard measures instead.

How (CUDA only, eager only; off under ``torch.compile``, while :func:`fp_patch.record_density`
records, and with ``FlashPrefillConfig(speed_guard=False)``; during CUDA-graph capture it neither
measures nor decides, only a settled layer's plan is repeated, see the last point):

* The cost of an attention call is what it adds to the forward pass. A timed call reads its GPU time
  (two CUDA events on the call's stream, read back later, when ``Event.query()`` says both have
  passed: no host synchronisation is added), its host time (Python and kernel launches,
  ``perf_counter``), and whether the GPU had caught up with the host: whether it had reached the
  call's start by the time the host finished issuing the call (one more ``Event.query()``). A large
  model keeps the GPU busy, the host's time is hidden behind it and a call costs the longer of its
  two times. A small one (SmolLM2-135M below ~16K tokens) is bound by the host issuing kernels: the
  GPU waits for the host at every layer, the GPU time a call saves is idle time and what it costs is
  its host time. Which of the two a *length class* is in is voted on by every timed call of the class
  (the share of calls that found the GPU caught up, smoothed; over half: host-bound), so the first
  layer of a large model, which always finds an idle GPU, does not decide it. Both costs are kept for
  each path and the class's regime picks which one to compare; a model near the balance moves layers
  to the path that relieves whichever side binds. A call whose host side stalled (a Triton
  compilation, autotuning) for over :data:`HOST_STALL_MS` while the GPU waited is not used.
* Times are normalised per causal (query, key) pair of the call and kept per *length class*
  (``Lq`` and ``Lk`` rounded up to a power of two): the dense cost per shape class (device, dtype,
  batch, heads, head dim, mask or not), shared by all layers, since dense attention costs the same
  whatever the content; the sparse cost per layer and alpha, since density differs by layer.
* Per eligible call: until the class's dense estimate has two measurements, one layer at a time runs
  dense (measured); until a layer's sparse estimate has two, it runs sparse (measured). The second
  measurement replaces the first, which is often cold (a cuDNN plan, allocator growth, a first
  launch). Then each layer runs the cheaper one. Every :data:`RECHECK`-th call of a layer (staggered
  across layers) runs and times the other path, so a change is noticed; where one path costs over
  :data:`CLEAR_MARGIN` times the other, only every ``RECHECK * CLEAR_RECHECK``-th, and over
  :data:`FAR_MARGIN` times every ``RECHECK * FAR_RECHECK``-th (each try costs the whole difference).
  Half a period after each try the path the layer runs is timed (two events), and a sparse one every
  ``RECHECK`` calls whatever the margin, since its cost follows the prompt's density. So the first
  two forward passes of a new length class are sparse in all layers but two; the guard decides from
  the third.
* Between those timed calls a layer's plan stands (``Plan.repeat``): the attention function runs
  the next calls with the same inputs on it without routing or asking again, and then asks again
  without routing again (a small model's prefill is bound by the host, where every microsecond per
  layer shows in the time to first token). Such calls time nothing, so a CUDA graph captured then
  records the layer's current choice.

:func:`summary` lists the decisions; :func:`reset` forgets every estimate.
"""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

logger = logging.getLogger(__name__)

RECHECK = 32  # every RECHECK-th call of a layer and length class measures the path it is not using
CLEAR_MARGIN = 1.5  # ... unless one path costs this many times the other: then every RECHECK * CLEAR_RECHECK-th
CLEAR_RECHECK = 8
FAR_MARGIN = 4.0  # ... or this many times: every RECHECK * FAR_RECHECK-th
FAR_RECHECK = 32
OUTLIER = 3.0  # a time this far from the estimate is kept apart once (one noisy or cold call)
HOST_STALL_MS = 50.0  # a call whose host side took longer (a compilation) is not used unless its GPU time dwarfs that
HOST_BOUND_VOTE = 0.25  # weight of each timed call's vote in its length class's "host-bound" share
MEASURED_CALLS = 3  # each estimate is measured on this many calls before it is trusted without timing
_MAX_PENDING = 4096
_MODULE_CACHE = "_flashprefill_speed_guard"  # (guard estimates, call signature, (state, dense, units))


def length_class(n: int) -> int:
    """``ceil(log2(n))``: lengths of one class differ by less than 2x."""
    return max(int(n) - 1, 1).bit_length()


def causal_pairs(q_len: int, k_len: int) -> float:
    """(query, key) pairs of causal attention with the queries aligned bottom-right."""
    return q_len * (k_len - q_len) + q_len * (q_len + 1) / 2


class Estimate:
    """A smoothed cost (ms per million causal pairs and head) that shrugs off one outlier; for a path,
    ``host`` is the same for its host time alone (what it costs where the host binds), and for the
    dense path of a length class ``host_bound`` is the class's vote (see the module docstring)."""

    __slots__ = ("value", "suspect", "count", "in_flight", "host", "host_bound")

    def __init__(self, path: bool = True):
        self.value: float | None = None
        self.suspect: float | None = None
        self.count = 0
        self.in_flight = 0
        self.host: Estimate | None = Estimate(path=False) if path else None
        self.host_bound = 0.0

    @property
    def host_binds(self) -> bool:
        """The class's vote (kept on its dense estimate): over half its timed calls found the GPU caught up."""
        return self.host_bound > 0.5

    def compared(self, host_bound: bool) -> float | None:
        """The cost a decision compares: the host time's where the class is host-bound."""
        return self.host.value if host_bound else self.value

    def add(self, x: float) -> None:
        self.count += 1
        if self.value is None or self.count == 2:  # the second replaces the first, which is often cold
            self.value = x
        elif x > OUTLIER * self.value or x * OUTLIER < self.value:
            if self.suspect is None:  # once: keep it apart
                self.suspect = x
                return
            self.value = x  # twice in a row: the cost really changed
        else:
            self.value = 0.5 * (self.value + x)
        self.suspect = None


@dataclass
class LayerState:
    """One layer's sparse estimate for one length class and alpha."""

    layer_idx: int | None
    key: tuple
    sparse: Estimate = field(default_factory=Estimate)
    calls: int = 0
    choice: str = ""


@dataclass
class Plan:
    """What one call runs (``"sparse"`` or ``"dense"``), where its time goes when measured (and the
    length class's dense estimate, ``klass``, which keeps the class's host-bound vote), and how many
    following calls of the layer with the same inputs would get this same untimed plan (``repeat``: the
    attention function may run them without asking again)."""

    path: str
    estimate: Estimate | None
    units: float
    repeat: int = 0
    layer: LayerState | None = None
    klass: Estimate | None = None

    def reuse(self) -> bool:
        """Count one more call of the layer that runs this plan without asking the guard; ``False``
        when no repeat is left (then ask :meth:`SpeedGuard.plan`)."""
        if self.repeat <= 0:
            return False
        self.repeat -= 1
        self.layer.calls += 1
        return True


def recheck_period(margin: float) -> int:
    """Calls between two tries of the path a layer does not run, given how many times its cost is the
    other's (``margin >= 1``)."""
    if margin < CLEAR_MARGIN:
        return RECHECK
    return RECHECK * (CLEAR_RECHECK if margin < FAR_MARGIN else FAR_RECHECK)


def _calls_until(turn: int, period: int, residue: int) -> int:
    """The smallest ``d >= 1`` with ``(turn + d) % period == residue``."""
    return (residue - turn - 1) % period + 1


class CudaTimer:
    """CUDA events on the call's stream; read back without blocking."""

    @staticmethod
    def usable(t: torch.Tensor) -> bool:
        if not t.is_cuda:
            return False
        if t.get_device() == torch.cuda.current_device():
            return not torch.cuda.is_current_stream_capturing()
        with torch.cuda.device(t.device):  # the stream the call runs on (a model spread over GPUs)
            return not torch.cuda.is_current_stream_capturing()

    def start(self, device: torch.device, plan: Plan | None = None):
        stream = torch.cuda.current_stream(device)
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        return event, stream, time.perf_counter()

    def stop(self, token):
        """A callable: the call's :class:`Timing` once known, ``None`` before."""
        start, stream, t0 = token
        host_ms = (time.perf_counter() - t0) * 1e3
        caught_up = start.query()  # the GPU reached the call before the host had issued all of it
        end = torch.cuda.Event(enable_timing=True)
        end.record(stream)

        def read():
            if not end.query():
                return None
            return Timing(start.elapsed_time(end), host_ms, caught_up)

        return read


class Timing(NamedTuple):
    """One timed call: GPU and host milliseconds, and whether the GPU had caught up with the host."""

    gpu_ms: float
    host_ms: float
    caught_up: bool = False


def call_cost(gpu_ms: float, host_ms: float) -> float:
    """What a call adds to a forward pass that the host does not bind: its GPU or its host time,
    whichever is longer (``nan`` for a host stall, a compilation, that left the GPU waiting inside
    the window; such a call is not used at all). Where the host binds, its host time is compared
    instead (:meth:`Estimate.compared`)."""
    if host_ms > HOST_STALL_MS and gpu_ms < 3 * host_ms:
        return float("nan")
    return max(gpu_ms, host_ms)


class SpeedGuard:
    """Chooses sparse or dense per call from measured costs (see the module docstring)."""

    def __init__(self, timer=None):
        self.timer = timer or CudaTimer()
        self.dense: dict[tuple, Estimate] = {}
        self.layers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.pending: list[tuple] = []
        self._logged: set[tuple] = set()

    def usable(self, t: torch.Tensor) -> bool:
        return self.timer.usable(t)

    def _harvest(self) -> None:
        # results arrive in launch order: stop at the first one still running, so a GPU running far
        # behind costs one event query per call, not one per pending measurement
        done = 0
        for read, estimate, units, klass in self.pending:
            timing = read()
            if timing is None:
                break
            done += 1
            estimate.in_flight -= 1
            ms = call_cost(timing.gpu_ms, timing.host_ms)
            if ms == ms:  # not nan
                estimate.add(ms / units)
                estimate.host.add(timing.host_ms / units)
                klass.host_bound += HOST_BOUND_VOTE * (float(timing.caught_up) - klass.host_bound)
        if done:
            del self.pending[:done]
        if len(self.pending) > _MAX_PENDING:
            del self.pending[: len(self.pending) - _MAX_PENDING]

    def plan(self, module, layer_idx, query: torch.Tensor, k_len: int, alpha: float, masked: bool) -> Plan:
        """Which path this call takes. ``query`` is ``[B, Hq, Lq, D]``."""
        if self.pending:
            self._harvest()
        # every layer of a forward pass sees the shapes of its previous call: that lookup is kept on the
        # module, so a call the guard sends to SDPA costs a few microseconds more than SDPA itself
        signature = (query.shape, query.dtype, query.get_device(), k_len, alpha, masked)
        cached = module.__dict__.get(_MODULE_CACHE)
        if cached is not None and cached[0] is self.dense and cached[1] == signature:
            state, dense, units = cached[2]
        else:
            state, dense, units = self._lookup(module, layer_idx, query, k_len, alpha, masked)
            module.__dict__[_MODULE_CACHE] = (self.dense, signature, (state, dense, units))
        state.calls += 1
        sparse = state.sparse
        # every estimate is measured twice before it decides anything (the first call of a new shape pays
        # for cuDNN plans, allocator growth, first launches); the dense one by one layer at a time
        if dense.count < 2 and dense.in_flight == 0:
            return Plan("dense", dense, units, layer=state, klass=dense)
        if sparse.count < 2 or dense.value is None:
            return Plan("sparse", sparse, units, layer=state, klass=dense)
        host_bound = dense.host_binds
        sparse_cost, dense_cost = sparse.compared(host_bound), dense.compared(host_bound)
        best, other = ("sparse", "dense") if sparse_cost <= dense_cost else ("dense", "sparse")
        self._note_choice(state, best, sparse_cost * units, dense_cost * units, host_bound)
        turn = state.calls + (layer_idx or 0)  # staggered: layers recheck in different passes
        # running the other path costs its whole difference: rarely where the choice is clear
        period = recheck_period(max(sparse_cost, dense_cost) / max(min(sparse_cost, dense_cost), 1e-12))
        if turn % period == 0:
            return Plan(other, dense if other == "dense" else sparse, units, layer=state, klass=dense)
        chosen = dense if best == "dense" else sparse
        # timing the path that runs anyway costs two events: sparse every RECHECK calls (its cost follows the
        # prompt's density), dense, whose cost does not depend on the content, once a period
        timing = RECHECK if best == "sparse" else period
        if chosen.count < MEASURED_CALLS or turn % timing == timing // 2:
            return Plan(best, chosen, units, layer=state, klass=dense)
        # the calls before this layer next times a path would all get this plan (the estimates may move
        # meanwhile through other layers' measurements; the choice is revisited when it next times a path)
        repeat = min(_calls_until(turn, period, 0), _calls_until(turn, timing, timing // 2)) - 1
        return Plan(best, None, units, repeat, layer=state)

    def _lookup(self, module, layer_idx, query: torch.Tensor, k_len: int, alpha: float, masked: bool):
        batch, heads, q_len, dim = query.shape
        classes = (length_class(q_len), length_class(k_len))
        units = batch * heads * causal_pairs(q_len, k_len) / 1e6
        dense_key = (query.device, query.dtype, batch, heads, dim, masked, *classes)
        dense = self.dense.get(dense_key)
        if dense is None:
            dense = self.dense[dense_key] = Estimate()
        per_module = self.layers.get(module)
        if per_module is None:
            per_module = self.layers[module] = {}
        key = (dense_key, alpha)
        state = per_module.get(key)
        if state is None:
            state = per_module[key] = LayerState(layer_idx, key)
        return state, dense, units

    def _note_choice(self, state: LayerState, choice: str, sparse_ms: float, dense_ms: float,
                     host_bound: bool) -> None:
        if choice == state.choice:
            return
        state.choice = choice
        lq, lk = 1 << state.key[0][-2], 1 << state.key[0][-1]
        logger.info(
            "flashprefill speed guard: layer %s, Lq<=%d Lk<=%d: %s (sparse %.3f ms, dense %.3f ms measured%s)",
            state.layer_idx, lq, lk, "sparse" if choice == "sparse" else "dense SDPA", sparse_ms, dense_ms,
            ", host time: the host binds" if host_bound else "",
        )

    def run(self, plan: Plan, device: torch.device, fn):
        """``fn()``, timed when the plan asks for a measurement."""
        if plan.estimate is None:
            return fn()
        token = self.timer.start(device, plan)
        out = fn()
        plan.estimate.in_flight += 1
        self.pending.append((self.timer.stop(token), plan.estimate, plan.units, plan.klass))
        return out

    def summary(self) -> list[dict]:
        """One row per (layer, length class, alpha): the compared estimates (ms per million pairs and
        head; host time only where the class is host-bound), whether it is, and the path its next call
        runs (the faster one; ``"sparse"`` while still measuring)."""
        self._harvest()
        rows = []
        for per_module in list(self.layers.values()):
            for state in per_module.values():
                dense_key, alpha = state.key
                dense = self.dense.get(dense_key)
                host_bound = dense is not None and dense.host_binds
                sparse = state.sparse.compared(host_bound)
                dense_ms = None if dense is None else dense.compared(host_bound)
                if state.sparse.count < 2 or dense is None or dense.count < 2:
                    runs = "sparse"  # still measuring (plan decides from the second measurement on)
                else:
                    runs = "sparse" if sparse <= dense_ms else "dense"
                rows.append({
                    "layer": state.layer_idx,
                    "q_len_max": 1 << dense_key[-2],
                    "k_len_max": 1 << dense_key[-1],
                    "alpha": alpha,
                    "sparse_cost": sparse,
                    "dense_cost": dense_ms,
                    "host_bound": host_bound,
                    "calls": state.calls,
                    "runs": runs,
                })
        return sorted(rows, key=lambda r: (r["q_len_max"], r["k_len_max"], r["layer"] or 0))

    def swap(self, state: tuple | None = None) -> tuple:
        """Put in another set of measurements (``None``: a fresh one) and return the current set; lets a
        benchmark interleave configurations without mixing their estimates."""
        current = (self.dense, self.layers, self.pending, self._logged)
        if state is None:
            state = ({}, weakref.WeakKeyDictionary(), [], set())
        self.dense, self.layers, self.pending, self._logged = state
        return current

    def reset(self) -> None:
        self.dense = {}  # a new object: the per-module lookups of the old one no longer match
        self.layers = weakref.WeakKeyDictionary()
        self.pending.clear()


GUARD = SpeedGuard()


def summary() -> list[dict]:
    """The speed guard's estimates and choices so far (see :meth:`SpeedGuard.summary`)."""
    return GUARD.summary()


def reset() -> None:
    """Forget every measurement (the next calls measure again)."""
    GUARD.reset()


def dense_fraction(rows: list[dict] | None = None) -> float | None:
    """Fraction of (layer, length class) entries that run dense SDPA, or ``None`` when there are none."""
    rows = summary() if rows is None else rows
    return sum(r["runs"] == "dense" for r in rows) / len(rows) if rows else None
