"""The speed guard (fp_patch.speed): per layer and length class, run whichever path was measured faster.

The guard times calls with CUDA events on a GPU; here a fake timer stands in for them (same
contract: ``usable``, ``start(device, plan)``, ``stop(token)`` -> a reader returning the call's
:class:`~fp_patch.speed.Timing`, ``None`` while unknown), so the decisions are tested on the CPU with
times the test chooses, through the real attention function of a tiny Llama.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_integration import DEVICE, DTYPE, build_pair, forward, greedy, text_ids

import fp_patch
from fp_patch import speed


class FakeTimer:
    """GPU times per path in ms per million (pair x head) units (host times 0 unless set in ``host``);
    ``caught_up(layer_idx)`` says whether a call found the GPU caught up with the host (never, unless
    set); ``ready`` False holds results back."""

    def __init__(self, sparse: float, dense: float):
        self.cost = {"sparse": sparse, "dense": dense}
        self.host = {"sparse": 0.0, "dense": 0.0}
        self.caught_up = lambda layer_idx: False
        self.ready = True
        self.runs: list[str] = []
        self.measured: list[str] = []
        self.nan_next = 0

    def usable(self, t):
        return True

    def start(self, device, plan):
        self.measured.append(plan.path)
        return plan

    def stop(self, plan):
        gpu = float("nan") if self.nan_next > 0 else self.cost[plan.path] * plan.units
        self.nan_next = max(0, self.nan_next - 1)
        timing = speed.Timing(gpu, self.host[plan.path] * plan.units, self.caught_up(plan.layer.layer_idx))
        return lambda: timing if self.ready else None


class Layer(torch.nn.Module):
    pass


def run_pass(guard: speed.SpeedGuard, layers, timer: FakeTimer, q_len: int = 4096, alpha: float = 0.1):
    """One forward pass over ``layers``: each asks for a plan and 'runs' it."""
    query = torch.empty(1, 4, q_len, 8, device="meta")
    paths = []
    for idx, layer in enumerate(layers):
        plan = guard.plan(layer, idx, query, q_len, alpha, masked=False)
        guard.run(plan, query.device, lambda p=plan: timer.runs.append(p.path))
        paths.append(plan.path)
    return paths


@pytest.fixture
def layers():
    return [Layer() for _ in range(4)]


@pytest.mark.parametrize("faster", ["sparse", "dense"])
def test_first_pass_measures_then_the_faster_path_runs(layers, faster):
    timer = FakeTimer(sparse=1.0 if faster == "sparse" else 3.0, dense=2.0)
    guard = speed.SpeedGuard(timer)
    # first pass: two layers measure dense for the whole length class (each estimate is measured twice,
    # the first measurement of a new shape is often cold), the others measure sparse
    assert run_pass(guard, layers, timer) == ["dense", "dense", "sparse", "sparse"]
    assert run_pass(guard, layers, timer) == ["sparse"] * 4  # every layer's own sparse cost, twice
    assert run_pass(guard, layers, timer) == ["sparse", "sparse", faster, faster]
    for _ in range(3):
        assert run_pass(guard, layers, timer).count(faster) >= 3
    rows = guard.summary()
    assert [r["runs"] for r in rows] == [faster] * 4
    assert rows[0]["sparse_cost"] == pytest.approx(timer.cost["sparse"])
    assert rows[0]["dense_cost"] == pytest.approx(2.0)
    assert speed.dense_fraction(rows) == (1.0 if faster == "dense" else 0.0)


def test_recheck_measures_the_other_path_and_notices_a_change(layers):
    timer = FakeTimer(sparse=2.5, dense=2.0)  # close: within CLEAR_MARGIN
    guard = speed.SpeedGuard(timer)
    for _ in range(3):
        run_pass(guard, layers, timer)
    assert {r["runs"] for r in guard.summary()} == {"dense"}
    passes = [run_pass(guard, layers, timer) for _ in range(speed.RECHECK)]
    # each layer rechecks sparse once per RECHECK calls, staggered: never two layers in one pass
    assert sum(p.count("sparse") for p in passes) == len(layers)
    assert all(p.count("sparse") <= 1 for p in passes)
    timer.cost["sparse"] = 0.5  # e.g. sparser prompts: the rechecks see it (the first looks like an outlier)
    for _ in range(2 * speed.RECHECK):
        run_pass(guard, layers, timer)
    assert {r["runs"] for r in guard.summary()} == {"sparse"}


def test_steady_state_is_not_timed(layers):
    timer = FakeTimer(sparse=1.0, dense=2.0)
    guard = speed.SpeedGuard(timer)
    for _ in range(speed.MEASURED_CALLS + 3):
        run_pass(guard, layers, timer)
    timer.measured.clear()
    for _ in range(5):
        run_pass(guard, layers, timer)
    assert timer.measured == []


def test_results_not_yet_known_are_waited_for_without_blocking(layers):
    timer = FakeTimer(sparse=1.0, dense=2.0)
    timer.ready = False
    guard = speed.SpeedGuard(timer)
    run_pass(guard, layers, timer)
    # the dense measurement is still in flight: nobody else measures dense, nothing is decided
    assert run_pass(guard, layers, timer) == ["sparse"] * 4
    assert all(r["dense_cost"] is None for r in guard.summary())
    timer.ready = True
    run_pass(guard, layers, timer)
    assert guard.summary()[1]["dense_cost"] == pytest.approx(2.0)


def test_unusable_measurements_are_dropped(layers):
    """A call whose host side stalled (compilation) reads NaN: it is neither kept nor counted."""
    timer = FakeTimer(sparse=1.0, dense=2.0)
    timer.nan_next = 1
    guard = speed.SpeedGuard(timer)
    # layer 0's dense time is dropped (read back at once here), so it takes two more layers to have two
    assert run_pass(guard, layers, timer) == ["dense", "dense", "dense", "sparse"]
    assert guard.dense and all(e.count == 2 and e.value == pytest.approx(2.0) for e in guard.dense.values())


def test_one_outlier_is_kept_apart_two_are_believed():
    est = speed.Estimate()
    est.add(5.0)  # a cold first call: the second measurement replaces it
    assert est.value == 5.0
    for x in (1.0, 1.2, 10.0):
        est.add(x)
    assert est.value == pytest.approx(1.1)
    est.add(11.0)
    assert est.value == pytest.approx(11.0)


def test_length_classes_and_alphas_are_measured_apart(layers):
    timer = FakeTimer(sparse=1.0, dense=2.0)
    guard = speed.SpeedGuard(timer)
    run_pass(guard, layers, timer, q_len=4096)
    assert run_pass(guard, layers, timer, q_len=3000)[0] == "sparse"  # same class (2049..4096)
    assert run_pass(guard, layers, timer, q_len=5000)[0] == "dense"  # a new class: measured again
    assert run_pass(guard, layers, timer, q_len=4096, alpha=0.3)[1:] == ["sparse"] * 3
    classes = {(r["q_len_max"], r["alpha"]) for r in guard.summary()}
    assert classes == {(4096, 0.1), (8192, 0.1), (4096, 0.3)}
    assert speed.length_class(4096) == 12 and speed.length_class(4097) == 13
    assert speed.causal_pairs(4, 4) == 10 and speed.causal_pairs(2, 5) == 2 * 3 + 3


# -- through the attention function of a real (tiny) Transformers model ------------------------------


@pytest.fixture
def fake_guard(monkeypatch):
    timer = FakeTimer(sparse=1.0, dense=2.0)
    monkeypatch.setattr(speed.GUARD, "timer", timer)
    speed.reset()
    yield timer
    speed.reset()


def count_sparse_calls(monkeypatch):
    """Shapes of the calls that reach the sparse operator (the attention function imports it per call)."""
    import fp_kernels

    calls = []
    original = fp_kernels.flash_prefill

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(fp_kernels, "flash_prefill", counting)
    return calls


@pytest.mark.parametrize("faster", ["sparse", "dense"])
def test_model_runs_the_faster_path(fake_guard, monkeypatch, faster):
    fake_guard.cost = {"sparse": 1.0, "dense": 2.0} if faster == "sparse" else {"sparse": 3.0, "dense": 2.0}
    fp, ref = build_pair("llama", speed_guard=True)  # 2 layers
    calls = count_sparse_calls(monkeypatch)
    ids = text_ids(256)
    want = forward(ref, input_ids=ids)
    forward(fp, input_ids=ids)
    assert calls == []  # first pass: both layers measure dense (each estimate twice: the first is often cold)
    for _ in range(2):  # then each layer's own sparse cost, twice
        forward(fp, input_ids=ids)
        assert len(calls) == 2
        calls.clear()
    got = forward(fp, input_ids=ids)
    if faster == "dense":
        assert calls == []
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:
        assert len(calls) == 2
    assert {r["runs"] for r in speed.summary()} == {faster}


def test_guard_off_recording_and_cpu_timer_keep_every_call_sparse(fake_guard, monkeypatch):
    fake_guard.cost = {"sparse": 3.0, "dense": 2.0}  # dense faster: the guard would route dense
    fp, _ = build_pair("llama", speed_guard=False)
    calls = count_sparse_calls(monkeypatch)
    ids = text_ids(256)
    for _ in range(3):
        forward(fp, input_ids=ids)
    assert len(calls) == 6 and fake_guard.measured == []
    # recording density studies the sparsity: the guard stands aside
    fp_patch.configure(fp, speed_guard=True)
    calls.clear()
    with fp_patch.record_density(fp) as rec:
        for _ in range(3):
            forward(fp, input_ids=ids)
    assert len(calls) == 6 and not math.isnan(rec.density())
    # the real timer only works on CUDA tensors
    assert not speed.CudaTimer.usable(torch.zeros(1))


def test_harvest_stops_at_the_first_result_still_running():
    """Results come back in launch order: a GPU running behind costs one query per call, not one per
    pending measurement; what is ready after it is read on a later call."""
    guard = speed.SpeedGuard(FakeTimer(1.0, 2.0))
    queried = []

    def reader(name, value):
        def read():
            queried.append(name)
            return value
        return read

    a, b, klass = speed.Estimate(), speed.Estimate(), speed.Estimate()
    a.in_flight = b.in_flight = 1
    guard.pending = [(reader("a", None), a, 1.0, klass), (reader("b", speed.Timing(5.0, 0.0)), b, 1.0, klass)]
    guard._harvest()
    assert queried == ["a"] and len(guard.pending) == 2 and b.value is None
    guard.pending[0] = (reader("a", speed.Timing(3.0, 0.0)), a, 1.0, klass)
    guard._harvest()
    assert queried == ["a", "a", "b"] and guard.pending == [] and (a.value, b.value) == (3.0, 5.0)
    assert a.in_flight == b.in_flight == 0


def test_swap_keeps_measurement_sets_apart(layers):
    """A benchmark interleaving configurations swaps whole measurement sets in and out."""
    timer = FakeTimer(sparse=1.0, dense=2.0)
    guard = speed.SpeedGuard(timer)
    run_pass(guard, layers, timer)
    first = guard.swap()  # a fresh set
    assert guard.dense == {} and guard.summary() == []
    run_pass(guard, layers, timer, q_len=8192)
    second = guard.swap(first)
    assert {r["q_len_max"] for r in guard.summary()} == {4096}
    guard.swap(second)
    assert {r["q_len_max"] for r in guard.summary()} == {8192}


@pytest.mark.parametrize("sparse_cost, period", [(6.0, speed.RECHECK * speed.CLEAR_RECHECK),
                                                  (10.0, speed.RECHECK * speed.FAR_RECHECK)])
def test_a_clear_loser_is_retried_rarely_and_dense_is_timed_once_a_period(layers, sparse_cost, period):
    """Sparse 3x (5x) dense: running it to recheck costs the whole difference, so it is retried only
    once per long period; dense, whose cost does not follow the content, is timed once per period too."""
    assert speed.recheck_period(sparse_cost / 2.0) == period
    timer = FakeTimer(sparse=sparse_cost, dense=2.0)
    guard = speed.SpeedGuard(timer)
    for _ in range(speed.MEASURED_CALLS + 2):
        run_pass(guard, layers, timer)
    timer.runs.clear(), timer.measured.clear()
    for _ in range(period):
        run_pass(guard, layers, timer)
    assert timer.runs.count("sparse") == len(layers)  # one retry per layer in the long period
    assert timer.measured.count("sparse") == len(layers)
    assert timer.measured.count("dense") == len(layers)  # and one timed dense call, half a period later


def test_sparse_stays_timed_every_recheck_however_clear(layers):
    """Sparse 4x faster: dense is retried once per long period, but the sparse path is still timed every
    RECHECK calls (two events), so a rise of its density is noticed within a few RECHECK."""
    timer = FakeTimer(sparse=0.5, dense=4.0)
    guard = speed.SpeedGuard(timer)
    for _ in range(speed.MEASURED_CALLS + 2):
        run_pass(guard, layers, timer)
    assert {r["runs"] for r in guard.summary()} == {"sparse"}
    timer.measured.clear()
    for _ in range(speed.RECHECK):
        run_pass(guard, layers, timer)
    assert timer.measured == ["sparse"] * len(layers)
    timer.cost["sparse"] = 6.0  # its density rises: the timed sparse calls notice (the first is an outlier)
    for _ in range(3 * speed.RECHECK):
        run_pass(guard, layers, timer)
    assert {r["runs"] for r in guard.summary()} == {"dense"}


def test_a_call_costs_its_gpu_or_its_host_time_whichever_is_longer():
    """A small model is bound by the host: a call's launches can cost more than its GPU time, and that is
    what it adds to the forward pass. A compilation stall is dropped, not counted."""
    assert speed.call_cost(gpu_ms=3.0, host_ms=0.2) == 3.0  # the GPU is the bottleneck
    assert speed.call_cost(gpu_ms=0.05, host_ms=0.7) == 0.7  # three Triton launches on a busy host
    assert math.isnan(speed.call_cost(gpu_ms=1.0, host_ms=speed.HOST_STALL_MS + 1))
    assert speed.call_cost(gpu_ms=10 * speed.HOST_STALL_MS, host_ms=speed.HOST_STALL_MS + 1) == 10 * speed.HOST_STALL_MS


@pytest.mark.parametrize("caught_up, faster", [("never", "sparse"), ("first layer", "sparse"), ("always", "dense")])
def test_where_the_host_binds_host_times_decide(layers, caught_up, faster):
    """Sparse saves GPU time (1.0 vs 2.0) but costs more host time (1.5 vs 0.5). Where the GPU waits for
    the host at every layer (a small model: timed calls find it caught up) the GPU time saved is idle
    time and dense is faster; where the GPU runs behind, sparse. The first layer of a large model always
    finds an idle GPU: its vote does not make the class host-bound."""
    timer = FakeTimer(sparse=1.0, dense=2.0)
    timer.host = {"sparse": 1.5, "dense": 0.5}
    timer.caught_up = {"never": lambda i: False, "first layer": lambda i: i == 0, "always": lambda i: True}[caught_up]
    guard = speed.SpeedGuard(timer)
    for _ in range(speed.MEASURED_CALLS + 2):
        run_pass(guard, layers, timer, q_len=1024)  # host times below HOST_STALL_MS
    rows = guard.summary()
    assert {r["runs"] for r in rows} == {faster}
    assert {r["host_bound"] for r in rows} == {caught_up == "always"}
    assert {r["sparse_cost"] for r in rows} == {1.5}  # its host time, and the longer of its two
    assert {r["dense_cost"] for r in rows} == {0.5 if caught_up == "always" else 2.0}


# -- a layer's steady state: reusing a plan -------------------------------------------------------------


@pytest.mark.parametrize("sparse_cost", [0.5, 1.2, 3.0])
def test_reusing_a_plan_runs_what_asking_would(sparse_cost):
    """``Plan.repeat``: the calls a layer runs without asking the guard take the path that asking would
    have given, and none of them is one that asking would have timed."""

    def run(reuse: bool):
        timer = FakeTimer(sparse=sparse_cost, dense=1.0)
        guard = speed.SpeedGuard(timer)
        layers = [Layer() for _ in range(5)]
        query = torch.empty(1, 4, 4096, 8, device="meta")
        last, calls = [None] * len(layers), []
        for _ in range(3 * speed.RECHECK * speed.CLEAR_RECHECK):
            for idx, layer in enumerate(layers):
                if reuse and last[idx] is not None and last[idx].reuse():
                    calls.append((idx, last[idx].path, False))
                    continue
                plan = last[idx] = guard.plan(layer, idx, query, 4096, 0.1, masked=False)
                guard.run(plan, query.device, lambda: None)
                calls.append((idx, plan.path, plan.estimate is not None))
        return calls, timer.measured

    (asked, timed), (reused, timed_reusing) = run(reuse=False), run(reuse=True)
    assert reused == asked and timed_reusing == timed
    assert len({path for _, path, _ in asked}) == 2  # both paths ran (measurements, rechecks)
    assert sum(not measured for _, _, measured in asked) > 0.8 * len(asked)  # mostly untimed: reusable


def test_steady_state_reuses_the_plan_and_anything_new_asks_again(fake_guard, monkeypatch):
    """Through a tiny Llama: once a layer has settled, its calls skip routing and the guard (a few
    attribute reads on a small model's hot path) and still give SDPA's result exactly; a new length,
    new settings, a recording, a reset or other routing arguments make the next call ask again."""
    from fp_patch import attention

    fake_guard.cost = {"sparse": 3.0, "dense": 2.0}
    fp, ref = build_pair("llama", speed_guard=True)
    ids = text_ids(256)
    for _ in range(speed.MEASURED_CALLS + 2):
        forward(fp, input_ids=ids)
    asked = []
    real_plan = speed.GUARD.plan
    monkeypatch.setattr(speed.GUARD, "plan", lambda *a, **kw: asked.append(a[1]) or real_plan(*a, **kw))
    calls = count_sparse_calls(monkeypatch)
    want = forward(ref, input_ids=ids)
    for _ in range(10):
        torch.testing.assert_close(forward(fp, input_ids=ids), want, atol=1e-5, rtol=1e-5)
    assert len(asked) <= 4 and calls == []  # 2 layers x 10 calls; each asks at most every RECHECK // 2

    def leave_reuses():  # on every layer, whatever its last plan was
        for module in fp.modules():
            lean = module.__dict__.get(attention.LAST_ROUTE)
            if lean is not None:
                lean.plan.repeat = 5

    def asks_again(step) -> bool:
        leave_reuses()
        asked.clear()
        step()
        return sorted(asked) == [0, 1]

    assert not asks_again(lambda: forward(fp, input_ids=ids))
    assert asks_again(lambda: forward(fp, input_ids=text_ids(200)))
    assert asks_again(lambda: (fp_patch.configure(fp, alpha=0.2), forward(fp, input_ids=text_ids(200))))
    speed.GUARD.reset()
    assert asks_again(lambda: forward(fp, input_ids=text_ids(200)))
    leave_reuses()
    with fp_patch.record_density(fp) as rec:  # recording: the real sparse path in every layer
        calls.clear()
        forward(fp, input_ids=text_ids(200))
    assert len(calls) == 2 and rec.density() == rec.density()

    fake_guard.cost = {"sparse": 1.0, "dense": 2.0}  # settle on sparse: a wrong reuse would show
    layer = next(m for m in fp.modules() if m.__dict__.get(attention.LAST_ROUTE) is not None)
    heads, kv_heads = layer.config.num_attention_heads, layer.config.num_key_value_heads
    q = torch.randn(1, heads, 256, layer.head_dim, device=DEVICE, dtype=DTYPE)
    kv = torch.randn(1, kv_heads, 256, layer.head_dim, device=DEVICE, dtype=DTYPE)
    with torch.no_grad():
        for _ in range(speed.MEASURED_CALLS + 2):
            attention.flashprefill_attention_forward(layer, q, kv, kv, None, is_causal=True)
        assert layer.__dict__[attention.LAST_ROUTE].plan.path == "sparse"
        layer.__dict__[attention.LAST_ROUTE].plan.repeat = 5
        asked.clear()
        # same keyword names, another value that routes: not causal -> dense, without asking
        out, _ = attention.flashprefill_attention_forward(layer, q, kv, kv, None, is_causal=False)
    assert asked == [] and layer.__dict__[attention.LAST_ROUTE].plan is None  # routed: now a by-design dense route
    want, _ = attention._sdpa(layer, q, kv, kv, None, 0.0, None, {"is_causal": False})
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("faster", ["sparse", "dense"])
def test_a_plan_run_out_asks_the_guard_without_routing_again(fake_guard, monkeypatch, faster):
    """When a layer's plan has no repeat left, its next call with the same inputs asks the guard again
    (which may time it) on the route it already has: routing (settings, masks, arguments) is not redone."""
    from fp_patch import attention

    fake_guard.cost = {"sparse": 1.0, "dense": 2.0} if faster == "sparse" else {"sparse": 3.0, "dense": 2.0}
    fp, ref = build_pair("llama", speed_guard=True)
    ids = text_ids(256)
    for _ in range(speed.MEASURED_CALLS + 2):
        forward(fp, input_ids=ids)
    routed, asked = [], []
    real_route, real_plan = attention._route, speed.GUARD.plan
    monkeypatch.setattr(attention, "_route", lambda *a: routed.append(a[-1]) or real_route(*a))
    monkeypatch.setattr(speed.GUARD, "plan", lambda *a, **kw: asked.append(a[1]) or real_plan(*a, **kw))
    lasts = [m.__dict__[attention.LAST_ROUTE] for m in fp.modules() if attention.LAST_ROUTE in m.__dict__]
    assert len(lasts) == 2
    for last in lasts:
        last.plan.repeat = 0
    got = forward(fp, input_ids=ids)
    assert routed == [] and sorted(asked) == [0, 1]
    assert all(last.plan.path == faster for last in lasts)
    if faster == "dense":
        torch.testing.assert_close(got, forward(ref, input_ids=ids), atol=1e-5, rtol=1e-5)
    forward(fp, input_ids=text_ids(200))  # other inputs: routed again
    assert sorted(routed) == [0, 1]


def test_by_design_dense_routes_are_repeated_without_routing(monkeypatch):
    """Prompts below min_sparse_len and decode steps: a layer's next call with the same query shape and
    settings runs SDPA without routing again (keys, values and mask may change); recording, another
    query shape or new settings route again, and strict mode still refuses what it refuses."""
    from fp_patch import attention

    fp, ref = build_pair("llama", min_sparse_len=1024)
    routed = []
    real_route = attention._route
    monkeypatch.setattr(attention, "_route", lambda *a: routed.append(a[1].shape[2]) or real_route(*a))
    ids = text_ids(64)
    for _ in range(3):
        torch.testing.assert_close(forward(fp, input_ids=ids), forward(ref, input_ids=ids), atol=1e-5, rtol=1e-5)
    assert routed == [64, 64]  # the first call of each of the two layers
    assert torch.equal(greedy(fp, input_ids=ids), greedy(ref, input_ids=ids))  # prefill + 5 decode steps
    assert routed == [64, 64, 1, 1]  # decode: each layer routed once, k_len growing does not matter
    forward(fp, input_ids=text_ids(80))
    assert routed[-2:] == [80, 80]
    with fp_patch.record_density(fp) as rec:
        forward(fp, input_ids=text_ids(80))
    assert routed[-2:] == [80, 80] and len(routed) == 8
    assert set(rec.fallback_frame()["reason"]) == {"short_query"}
    fp_patch.configure(fp, strict=True)
    layer = next(m for m in fp.modules() if m.__dict__.get(attention.LAST_ROUTE) is not None)
    q = torch.randn(1, layer.config.num_attention_heads, 80, layer.head_dim, device=DEVICE, dtype=DTYPE)
    kv = torch.randn(1, layer.config.num_key_value_heads, 80, layer.head_dim, device=DEVICE, dtype=DTYPE)
    with torch.no_grad():
        attention.flashprefill_attention_forward(layer, q, kv, kv, None)  # short_query: by design
    with pytest.raises(attention.FlashPrefillFallbackError, match="training"):
        attention.flashprefill_attention_forward(layer, q.requires_grad_(), kv, kv, None)


def count_transformers_sdpa(monkeypatch):
    """Calls our attention function makes to Transformers' SDPA function."""
    from fp_patch import attention

    calls = []
    real = attention.sdpa_attention_forward
    monkeypatch.setattr(attention, "sdpa_attention_forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def test_repeated_dense_calls_run_torch_sdpa_as_transformers_would(fake_guard, monkeypatch):
    """A repeated dense route for unmasked causal prefill calls torch's SDPA itself (the host time of
    Transformers' wrapper shows on a small model): the same result, bit for bit, as the sdpa model, by
    design-dense and guard-dense alike; a mask or a keyword Transformers acts on goes through its function."""
    from fp_patch import attention

    fp, ref = build_pair("llama", min_sparse_len=1024)  # grouped heads: enable_gqa matters
    assert fp.config.num_attention_heads > fp.config.num_key_value_heads
    ids = text_ids(64)
    want = forward(ref, input_ids=ids)
    forward(fp, input_ids=ids)  # routed, through Transformers' function
    calls = count_transformers_sdpa(monkeypatch)
    assert torch.equal(forward(fp, input_ids=ids), want) and calls == []
    padded = torch.ones(1, 64, dtype=torch.long)
    padded[0, :3] = 0
    torch.testing.assert_close(forward(fp, input_ids=ids, attention_mask=padded),
                               forward(ref, input_ids=ids, attention_mask=padded), atol=1e-5, rtol=1e-5)
    assert len(calls) == 2  # a mask: Transformers' function (it is what gives masks their meaning)

    layer = next(m for m in fp.modules() if m.__dict__.get(attention.LAST_ROUTE) is not None)
    q = torch.randn(1, layer.config.num_attention_heads, 64, layer.head_dim, device=DEVICE, dtype=DTYPE)
    kv = torch.randn(1, layer.config.num_key_value_heads, 64, layer.head_dim, device=DEVICE, dtype=DTYPE)
    with torch.no_grad():
        for kwargs in ({"output_attentions": False}, {"is_causal": True}):
            calls.clear()
            outs = [attention.flashprefill_attention_forward(layer, q, kv, kv, None, **kwargs)[0] for _ in range(2)]
            assert len(calls) == 2 and torch.equal(outs[0], outs[1])
        layer.is_causal = False  # a non-causal module: never the causal shortcut
        try:
            calls.clear()
            outs = [attention.flashprefill_attention_forward(layer, q, kv, kv, None)[0] for _ in range(2)]
        finally:
            layer.is_causal = True
        assert len(calls) == 2

    fake_guard.cost = {"sparse": 3.0, "dense": 2.0}  # the guard settles on dense
    fp, ref = build_pair("llama", speed_guard=True)
    ids = text_ids(256)
    for _ in range(speed.MEASURED_CALLS + 2):
        forward(fp, input_ids=ids)
    for module in fp.modules():
        if attention.LAST_ROUTE in module.__dict__:
            module.__dict__[attention.LAST_ROUTE].plan.repeat = 5
    calls.clear()
    assert torch.equal(forward(fp, input_ids=ids), forward(ref, input_ids=ids)) and calls == []
