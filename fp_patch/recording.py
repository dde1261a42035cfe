"""Density recording: which key blocks every sparse layer and query head computed.

Usage::

    with fp_patch.record_density(model) as rec:           # block_maps=..., error=... are opt-in
        model(input_ids)
    rec.to_frame()        # pandas: run, layer, head, density, tokens, blocks, causal_blocks, ...
    print(rec.summary())
    rec.plot("heatmap", path="density.png")

What is recorded is exactly what runs in production: routing depends on the call and the settings
only, so a recorded forward pass takes the same routes and runs the same kernels as an unrecorded
one, with the same outputs bit for bit; recording only asks the operator for its block lists too.

Cost model. While recording, every call stores references to small device tensors (the operator's
``[B, Hq]`` density and block counts) and Python ints; nothing is copied to the host and no host
sync happens inside the forward. The first read (``to_frame``, ``summary``, plots) moves everything
to the host in one transfer. When no recorder is active the attention function pays one list
lookup (:func:`active_recorder` returns ``None``) and nothing else.

Opt-in extras: ``block_maps=True`` (or a list of layer indices) keeps the operator's compact block
lists of those layers, enough to redraw the selected block map of any head, plus device copies of
``q``/``k`` from which the block-score picture behind the map is computed when a plot asks for it
(memory: ``q`` and ``k`` of each recorded layer). ``error=True`` recomputes each sparse layer
densely and records the relative L2 error of the sparse output; it doubles attention work.

CONTRACT with the attention function (``fp_patch.attention``). For every call it handles while a
recorder is active::

    rec = active_recorder()          # None when not recording: the attention path must do nothing else
    if rec is not None:
        rec.add_sparse(module, layer_idx, info, q_len=..., k_len=..., out=out, dense_fn=fn,
                       q=q, k=k, scale=scale, kv_start=kv_start, kv_end=kv_end)
        # or, when the call went to dense SDPA:
        rec.add_fallback(module, layer_idx, reason, q_len=..., k_len=...)

``info`` is an ``fp_kernels.FlashPrefillInfo``. ``rec.wants_info`` tells the attention function
whether to ask the operator for ``return_info=True``. ``dense_fn()`` recomputes the dense SDPA output
``[B, Lq, Hq, D]`` for the same call; it is only called in ``error=True`` mode. ``q``, ``k``,
``scale``, ``kv_start``, ``kv_end`` (optional) are exactly what was passed to ``fp_kernels.flash_prefill``
(``q [B, Lq, Hq, D]``, ``k [B, Lk, Hkv, D]``); they are used only for layers whose block maps are
recorded (:meth:`DensityRecorder.wants_block_scores`), to draw the block scores behind the map.
``reason`` is a short human-readable string (``"decode (1 query token)"``, ``"dense_layers"``...).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from fp_kernels.rules import BlockRules

from .names import uses_flashprefill

logger = logging.getLogger(__name__)

_ACTIVE: list = []


def active_recorder():
    """The active recorder (``None`` when not recording); several active ones are served together."""
    if not _ACTIVE:
        return None
    if len(_ACTIVE) == 1:
        return _ACTIVE[0]
    return _RecorderGroup(tuple(_ACTIVE))


@dataclass
class _SparseCall:
    run: int
    layer: int
    q_len: int
    k_len: int
    density: torch.Tensor  # [B, Hq] float32, device
    kept: torch.Tensor  # [B, Hq] blocks computed for the prompt's query blocks, device
    visible: torch.Tensor | None  # [B, Hq] causally visible blocks of those query blocks (None: unknown)
    err_sq: torch.Tensor | None = None  # [B, Hq] sum of squared (sparse - dense), device
    ref_sq: torch.Tensor | None = None  # [B, Hq] sum of squared dense output, device
    info: object | None = None  # FlashPrefillInfo, kept only with block maps
    score_inputs: tuple | None = None  # (q, k, scale, kv_start, kv_end) device copies
    rules: BlockRules | None = None  # the block rules of the call
    ranges: tuple | None = None  # (kv_start, kv_end) device copies or None, with block maps
    block_size: int | None = None


def always_computed_fraction(q_len: int, k_len: int, rules: BlockRules) -> float:
    """The floor of the density of an unpadded call: the share of its causally visible key blocks that
    the always-keep rules (``rules``' ``block_size``, ``sink_blocks``, ``window_blocks``,
    ``last_dense_blocks``) compute whatever the scores. E.g. 73.5 % at 2K tokens with the default
    :class:`fp_kernels.BlockRules` (128-token blocks, 2 sinks, 4 window blocks, 2 dense last blocks)."""
    from fp_kernels.geometry import num_query_slots, slot_geometry

    block_size, sink, window, last_dense = (
        rules.block_size, rules.sink_blocks, rules.window_blocks, rules.last_dense_blocks)
    start = torch.zeros(1, dtype=torch.int32)
    end = torch.full((1,), k_len, dtype=torch.int32)
    n_slots = num_query_slots(q_len, k_len, block_size, False)
    geo = slot_geometry(q_len, k_len, block_size, start, end, n_slots, last_dense)
    n_vis = geo["n_vis"][0] * geo["in_prompt"][0]
    forced = torch.where(geo["dense"][0] | (n_vis <= sink + window), n_vis, torch.clamp(n_vis, max=sink + window))
    visible = int(n_vis.sum())
    return float(forced.sum()) / visible if visible else 1.0


@dataclass(frozen=True)
class _FallbackCall:
    run: int
    layer: int
    reason: str
    q_len: int
    k_len: int


class DensityRecorder:
    """Collects what FlashPrefill computed during the forward passes of one model.

    Build it with :func:`record_density`. A *run* is one forward pass of the model (one prefill or
    one decode step of ``generate``); every record carries its run index.

    Args:
        model: record only attention modules inside this model (``None``: any module).
        block_maps: ``True`` to keep the block maps of every sparse layer, or an iterable of layer
            indices to keep only those. Costs memory: the compact lists ``[B, Hq, L/B, L/B]`` int32
            plus a copy of ``q`` and ``k`` per recorded layer and run.
        error: also run each sparse layer densely and record the relative L2 error of its output.
    """

    wants_info = True

    def __init__(self, model=None, *, block_maps: bool | Iterable[int] = False, error: bool = False):
        if not isinstance(error, bool):
            raise TypeError(f"error must be True or False, got {error!r}")
        if isinstance(block_maps, bool):
            self._map_layers = None if block_maps else frozenset()
        elif isinstance(block_maps, Iterable) and not isinstance(block_maps, (str, bytes)):
            layers = list(block_maps)
            if any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
                raise TypeError(f"block_maps must be True/False or a list of layer indices, got {block_maps!r}")
            self._map_layers = frozenset(layers)
        else:
            raise TypeError(f"block_maps must be True/False or a list of layer indices, got {block_maps!r}")
        self.error = error
        self._module_ids = None if model is None else {id(m) for m in model.modules()}
        self._sparse: list[_SparseCall] = []
        self._fallbacks: list[_FallbackCall] = []
        self._runs = 0  # runs started so far
        self._depth = 0  # nesting of model forwards (a run starts at depth 0)
        self._host = None  # cached host copy of the sparse records
        self._scores_cache: dict[int, torch.Tensor] = {}
        self._warned_error = False
        self._compiled_run = False  # a forward of the model was traced by torch.compile

    # ------------------------------------------------------------------ recording (forward side)

    def wants_block_maps(self, layer_idx) -> bool:
        """Whether block maps (and hence ``q``/``k`` for the score picture) are kept for this layer."""
        return self._map_layers is None or layer_idx in self._map_layers

    wants_block_scores = wants_block_maps

    def new_run(self) -> int:
        """Start a new run explicitly (done automatically at every forward of the recorded model)."""
        self._runs += 1
        return self._runs - 1

    def _current_run(self) -> int:
        if self._runs == 0:
            self._runs = 1
        return self._runs - 1

    def _accepts(self, module) -> bool:
        return self._module_ids is None or id(module) in self._module_ids

    def _forward_pre_hook(self, _module, _args):
        if self._depth == 0:
            self.new_run()
            if torch.compiler.is_compiling():  # a constant at trace time; the assignment replays per call
                self._compiled_run = True
        self._depth += 1

    def _warn_if_compiled(self, model) -> None:
        """At the end of recording: say once when forward passes ran where the attention function does
        not record (torch.compile), instead of leaving an empty or partial recording unexplained."""
        if self._runs == 0:
            return
        silent = not self._sparse and not self._fallbacks and uses_flashprefill(model)
        if self._compiled_run or silent:
            logger.warning(
                "record_density: %s ran under torch.compile, where FlashPrefill records nothing (recording "
                "inside the graph would break it), so this recording is %s. Record an eager pass: the "
                "uncompiled model, or the call inside torch.compiler.disable()",
                "the model's forward passes" if silent else "some forward passes of the model",
                "empty" if silent else "incomplete",
            )

    def _forward_hook(self, _module, _args, _output):
        self._depth = max(0, self._depth - 1)

    def add_sparse(
        self,
        module,
        layer_idx,
        info,
        *,
        q_len,
        k_len,
        out=None,
        dense_fn=None,
        q=None,
        k=None,
        scale=None,
        kv_start=None,
        kv_end=None,
        rules=None,
    ) -> None:
        """Record one sparse call (device tensors only; no host sync).

        ``rules``: the :class:`fp_kernels.BlockRules` of the call, used to mark the always-computed
        blocks on block maps and for the density floor; default: the module's FlashPrefill settings
        for ``layer_idx``, or :class:`~fp_kernels.BlockRules`' defaults at the info's block size when
        ``module`` is ``None``."""
        if not self._accepts(module):
            return
        density = info.density.detach()
        kept = getattr(info, "computed_blocks", None)
        visible = getattr(info, "visible_blocks", None)
        if kept is None or visible is None:  # an info built without the counts (flash_prefill_reference)
            kept, visible = info.block_count.sum(-1), None  # every slot, right-padding queries included
            if kept.shape[1] != density.shape[1]:  # group selection: one list per kv head
                kept = kept.repeat_interleave(density.shape[1] // kept.shape[1], dim=1)
        layer = -1 if layer_idx is None else int(layer_idx)
        call = _SparseCall(self._current_run(), layer, int(q_len), int(k_len), density, kept, visible)
        call.block_size = getattr(info, "block_size", None)
        if rules is None:
            from .config import config_for_module

            if module is not None:
                rules = config_for_module(module).rules_for(layer_idx)
            else:
                rules = BlockRules() if call.block_size is None else BlockRules(block_size=call.block_size)
        elif not isinstance(rules, BlockRules):
            raise TypeError(f"rules must be a fp_kernels.BlockRules, got {type(rules).__name__} {rules!r}")
        call.rules = rules.block_rules()
        if self.error:
            if out is None or dense_fn is None:
                if not self._warned_error:
                    self._warned_error = True
                    logger.warning("record_density(error=True): the attention function passed no out=/dense_fn=")
            else:
                with torch.no_grad():
                    sparse = out.detach().float()
                    dense = dense_fn().detach().float()
                    call.err_sq = (sparse - dense).square().sum(dim=(1, 3))
                    call.ref_sq = dense.square().sum(dim=(1, 3))
        if self.wants_block_maps(layer):
            call.info = info
            call.ranges = tuple(None if t is None else t.detach().clone() for t in (kv_start, kv_end))
            if q is not None and k is not None:
                # copies: a static cache may later overwrite k in place; clone() is an async device op
                call.score_inputs = (
                    q.detach().clone(),
                    k.detach().clone(),
                    scale,
                    None if kv_start is None else kv_start.detach().clone(),
                    None if kv_end is None else kv_end.detach().clone(),
                )
        self._sparse.append(call)
        self._host = None

    def add_fallback(self, module, layer_idx, reason, *, q_len, k_len) -> None:
        """Record one call that ran dense SDPA, and why."""
        if not self._accepts(module):
            return
        layer = -1 if layer_idx is None else int(layer_idx)
        self._fallbacks.append(_FallbackCall(self._current_run(), layer, str(reason), int(q_len), int(k_len)))

    # ------------------------------------------------------------------ reading (host side)

    def _host_records(self) -> list[dict]:
        """Per sparse call: host numpy arrays, moved in one transfer per tensor kind."""
        if self._host is not None:
            return self._host
        calls = self._sparse
        if not calls:
            self._host = []
            return self._host

        def gather(get):
            parts = [get(c).detach().reshape(-1).to(torch.float64) for c in calls]
            # one concatenation per device, then one copy to the host
            by_device: dict = {}
            for i, p in enumerate(parts):
                by_device.setdefault(p.device, []).append(i)
            flat: list = [None] * len(parts)
            for idx in by_device.values():
                host = torch.cat([parts[i] for i in idx]).cpu().numpy()
                offset = 0
                for i in idx:
                    n = parts[i].numel()
                    flat[i] = host[offset : offset + n]
                    offset += n
            return flat

        density = gather(lambda c: c.density)
        kept = gather(lambda c: c.kept)
        has_visible = [c.visible is not None for c in calls]
        zero = torch.zeros(1)
        visible = gather(lambda c: c.visible if c.visible is not None else zero)
        has_err = [c.err_sq is not None for c in calls]
        err_sq = ref_sq = None
        if any(has_err):
            zero = torch.zeros(1)
            err_sq = gather(lambda c: c.err_sq if c.err_sq is not None else zero)
            ref_sq = gather(lambda c: c.ref_sq if c.ref_sq is not None else zero)
        records = []
        for i, c in enumerate(calls):
            shape = tuple(c.density.shape)
            rec = {"call": c, "density": density[i].reshape(shape), "kept": kept[i].reshape(shape)}
            if has_visible[i]:
                rec["visible"] = visible[i].reshape(shape)
            if has_err[i]:
                rec["err_sq"] = err_sq[i].reshape(shape)
                rec["ref_sq"] = ref_sq[i].reshape(shape)
            records.append(rec)
        self._host = records
        return records

    @property
    def runs(self) -> list[int]:
        """Run indices that recorded at least one call."""
        return sorted({c.run for c in self._sparse} | {f.run for f in self._fallbacks})

    def to_frame(self):
        """One row per (run, layer, head) of every sparse call, as a pandas DataFrame.

        Columns: ``run``, ``layer``, ``head``, ``tokens`` (query tokens of the call), ``kv_tokens``,
        ``batch``, ``density`` (fraction of the causally visible key blocks computed, pooled over the
        batch rows), ``blocks`` (blocks computed), ``causal_blocks`` (blocks a dense causal prefill
        computes), ``floor`` (the share of those blocks computed by the always-keep rules whatever the
        scores: :func:`always_computed_fraction`; the lowest density the call could have), and with
        ``error=True`` ``rel_error`` (``||sparse - dense|| / ||dense||`` of the
        head's output). Layers that ran dense are in :meth:`fallback_frame`, not here.
        """
        import numpy as np
        import pandas as pd

        columns = ("run", "layer", "head", "tokens", "kv_tokens", "batch", "density", "blocks", "causal_blocks",
                   "floor")
        rows: dict[str, list] = {k: [] for k in columns}
        errors: list = []
        floors: dict = {}
        any_error = False
        for rec in self._host_records():
            c = rec["call"]
            dens, kept = rec["density"], rec["kept"]
            if "visible" in rec:  # exact counts over the prompt's query blocks (fp_kernels.flash_prefill)
                computed, vis_sum = kept.sum(0), rec["visible"].sum(0)
                # float32 division of the exact sums: one batch row gives the operator's own density value
                pooled = np.where(vis_sum > 0, np.float32(computed) / np.float32(np.maximum(vis_sum, 1)), 0.0)
            else:  # an info without counts: rebuilt from density = kept / visible (exact without right padding)
                visible = np.where(dens > 0, np.round(kept / np.where(dens > 0, dens, 1.0)), 0.0)
                computed, vis_sum = (dens * visible).sum(0), visible.sum(0)
                pooled = np.where(vis_sum > 0, computed / np.where(vis_sum > 0, vis_sum, 1.0), 0.0)
            batch, heads = dens.shape
            if "err_sq" in rec:
                any_error = True
                ref = rec["ref_sq"].sum(0)
                err = np.sqrt(rec["err_sq"].sum(0) / np.where(ref > 0, ref, 1.0))
            else:
                err = np.full(heads, np.nan)
            key = (c.q_len, c.k_len, c.rules)
            if key not in floors:
                floors[key] = always_computed_fraction(*key) if c.rules else float("nan")
            floor = floors[key]
            for h in range(heads):
                rows["floor"].append(floor)
                rows["run"].append(c.run)
                rows["layer"].append(c.layer)
                rows["head"].append(h)
                rows["tokens"].append(c.q_len)
                rows["kv_tokens"].append(c.k_len)
                rows["batch"].append(batch)
                rows["density"].append(float(pooled[h]))
                rows["blocks"].append(int(round(computed[h])))
                rows["causal_blocks"].append(int(vis_sum[h]))
                errors.append(float(err[h]))
        frame = pd.DataFrame(rows)
        if any_error:
            frame["rel_error"] = errors
        return frame.sort_values(["run", "layer", "head"], kind="stable").reset_index(drop=True)

    def fallback_frame(self):
        """Calls that ran dense SDPA: one row per (run, layer, reason) with ``tokens``, ``kv_tokens``."""
        import pandas as pd

        frame = pd.DataFrame(
            [(f.run, f.layer, f.reason, f.q_len, f.k_len) for f in self._fallbacks],
            columns=["run", "layer", "reason", "tokens", "kv_tokens"],
        )
        return frame.sort_values(["run", "layer"], kind="stable").reset_index(drop=True)

    def layer_frame(self):
        """One row per (run, layer): pooled ``density`` over heads, head ``min``/``max``, and
        ``rel_error`` (whole layer output) when recorded; dense-fallback layers of prefill runs
        appear with ``density`` 1.0 and their ``reason``."""
        import numpy as np
        import pandas as pd

        frame = self.to_frame()
        out = []
        if len(frame):
            for (run, layer), g in frame.groupby(["run", "layer"], sort=True):
                row = {
                    "run": run,
                    "layer": layer,
                    "tokens": int(g["tokens"].iloc[0]),
                    "density": g["blocks"].sum() / max(1, g["causal_blocks"].sum()),
                    "head_min": g["density"].min(),
                    "head_max": g["density"].max(),
                    "reason": "",
                }
                out.append(row)
        err_by_layer = self._layer_errors()
        for row in out:
            row["rel_error"] = err_by_layer.get((row["run"], row["layer"]), np.nan)
        sparse_runs = {r["run"] for r in out}
        for f in self._fallbacks:
            # dense layers of a prefill run; decode steps (runs without any sparse call) are left out
            if f.run in sparse_runs and not any(r["run"] == f.run and r["layer"] == f.layer for r in out):
                out.append(
                    {
                        "run": f.run,
                        "layer": f.layer,
                        "tokens": f.q_len,
                        "density": 1.0,
                        "head_min": 1.0,
                        "head_max": 1.0,
                        "reason": f.reason,
                        "rel_error": 0.0,
                    }
                )
        columns = ["run", "layer", "tokens", "density", "head_min", "head_max", "rel_error", "reason"]
        layer = pd.DataFrame(out, columns=columns)
        return layer.sort_values(["run", "layer"], kind="stable").reset_index(drop=True)

    def _layer_errors(self) -> dict:
        totals: dict = {}
        for rec in self._host_records():
            if "err_sq" in rec:
                c = rec["call"]
                e, r = totals.get((c.run, c.layer), (0.0, 0.0))
                totals[(c.run, c.layer)] = (e + rec["err_sq"].sum(), r + rec["ref_sq"].sum())
        return {key: math.sqrt(e / r) if r > 0 else 0.0 for key, (e, r) in totals.items()}

    def density(self, run: int | None = None) -> float:
        """Fraction of causal blocks computed over all sparse layers and heads (of ``run``, or all runs).

        Dense-fallback layers are not included; :meth:`summary` also gives the figure with them.
        """
        frame = self.to_frame()
        if run is not None:
            frame = frame[frame["run"] == run]
        if not len(frame):
            return float("nan")
        return float(frame["blocks"].sum() / max(1, frame["causal_blocks"].sum()))

    def summary(self, max_layers: int = 64) -> str:
        """A short text table: overall density, then one line per layer (averaged over runs)."""
        layers = self.layer_frame()
        frame = self.to_frame()
        if not len(layers):
            reasons = sorted({f.reason for f in self._fallbacks})
            note = f"; dense fallbacks: {', '.join(reasons)}" if reasons else ""
            return f"FlashPrefill density: no sparse call recorded{note}"
        runs = sorted(layers["run"].unique())
        tokens = sorted({int(t) for t in frame["tokens"]})
        heads = int(frame["head"].max()) + 1
        n_layers = layers["layer"].nunique()
        dense_layers = sorted(set(layers.loc[layers["reason"] != "", "layer"]) - set(frame["layer"]))
        overall = frame["blocks"].sum() / max(1, frame["causal_blocks"].sum())
        with_dense = layers["density"].mean()
        tok = ", ".join(str(t) for t in tokens[:6]) + (" ..." if len(tokens) > 6 else "")
        lines = [
            f"FlashPrefill density: {len(runs)} prefill run(s) of {tok} tokens, {n_layers} layers "
            f"({n_layers - len(dense_layers)} sparse), {heads} query heads",
            f"overall {overall:.1%} of causal blocks computed in sparse layers"
            + (f" ({with_dense:.1%} counting dense layers as 100 %)" if dense_layers else ""),
        ]
        has_err = layers["rel_error"].notna().any() and "rel_error" in frame
        header = f"{'layer':>5}  {'density':>7}  {'head min':>8}  {'head max':>8}" + ("  rel.err" if has_err else "")
        lines += [header + "  note"]
        agg = layers.groupby("layer", sort=True).agg(
            density=("density", "mean"),
            head_min=("head_min", "min"),
            head_max=("head_max", "max"),
            rel_error=("rel_error", "mean"),
            reason=("reason", lambda r: ", ".join(sorted(set(r) - {""}))),
        )
        shown = agg if len(agg) <= max_layers else agg.iloc[:max_layers]
        for layer, row in shown.iterrows():
            line = f"{layer:>5}  {row.density:>7.1%}  {row.head_min:>8.1%}  {row.head_max:>8.1%}"
            if has_err:
                line += f"  {row.rel_error:>7.4f}" if not math.isnan(row.rel_error) else "        -"
            lines.append(line + (f"  dense: {row.reason}" if row.reason else ""))
        if len(agg) > max_layers:
            lines.append(f"... {len(agg) - max_layers} more layers")
        other = self._other_fallbacks(set(runs))
        if other:
            lines.append(
                "other dense calls (runs without sparse layers): "
                + "; ".join(f"{reason} x{calls} in {n_runs} run(s)" for reason, calls, n_runs in other)
            )
        return "\n".join(lines)

    def _other_fallbacks(self, sparse_runs: set) -> list[tuple[str, int, int]]:
        """``(reason, calls, runs)`` of the dense calls in runs that had no sparse call (decode steps...)."""
        calls: dict[str, int] = {}
        runs: dict[str, set] = {}
        for f in self._fallbacks:
            if f.run not in sparse_runs:
                calls[f.reason] = calls.get(f.reason, 0) + 1
                runs.setdefault(f.reason, set()).add(f.run)
        return [(reason, calls[reason], len(runs[reason])) for reason in sorted(calls)]

    # ------------------------------------------------------------------ block maps

    def _map_call(self, layer: int, run: int | None) -> tuple[int, _SparseCall]:
        candidates = [(i, c) for i, c in enumerate(self._sparse) if c.layer == layer and c.info is not None]
        if run is not None:
            candidates = [(i, c) for i, c in candidates if c.run == run]
        if not candidates:
            kept = sorted({c.layer for c in self._sparse if c.info is not None})
            where = "" if run is None else f" in run {run}"
            raise ValueError(
                f"no block map recorded for layer {layer}{where}; layers with block maps: {kept or 'none'}. "
                "Record with fp_patch.record_density(model, block_maps=True) (or block_maps=[layer, ...])"
            )
        return candidates[-1]

    def block_mask(self, layer: int, head: int, *, run: int | None = None, batch: int = 0) -> torch.Tensor:
        """Selected blocks of one (layer, query head): ``[S, nkb]`` bool on the CPU (``S`` query blocks).

        ``run`` defaults to the last run that recorded this layer's map.
        """
        _, call = self._map_call(layer, run)
        heads = call.density.shape[1]
        if not 0 <= head < heads:
            raise ValueError(f"head must be in [0, {heads}), got {head}")
        return call.info.block_mask(batch, head).cpu()

    def always_kept(self, layer: int, *, run: int | None = None, batch: int = 0) -> torch.Tensor:
        """Blocks computed by rule whatever their score: ``[S, nkb]`` bool on the CPU, like :meth:`block_mask`.

        The first ``sink_blocks`` key blocks, the last ``window_blocks`` visible ones (the diagonal
        included), every visible block of the last ``last_dense_blocks`` query blocks, and every block
        of a query block that sees no more than ``sink_blocks + window_blocks`` blocks.
        """
        from fp_kernels.geometry import normalize_ranges, slot_geometry

        _, call = self._map_call(layer, run)
        rules = call.rules or BlockRules()
        sink, window, last_dense = rules.sink_blocks, rules.window_blocks, rules.last_dense_blocks
        kv_start, kv_end = call.ranges or (None, None)
        n_slots, nkb = call.info.block_index.shape[-2:]
        start, end = normalize_ranges(call.density.shape[0], call.k_len, kv_start, kv_end, "cpu")
        geo = slot_geometry(call.q_len, call.k_len, call.info.block_size, start, end, n_slots, last_dense)
        n_vis = geo["n_vis"][batch][:, None]
        forced_slot = geo["dense"][batch][:, None] | (n_vis <= sink + window)
        j = torch.arange(nkb)[None, :]
        return (j < n_vis) & (forced_slot | (j < sink) | (j >= n_vis - window))

    def block_scores(self, layer: int, head: int, *, run: int | None = None, batch: int = 0):
        """Block-score table behind the map: ``[S, nkb]`` float32 natural-log scores (``-inf`` where
        not causally visible), or ``None`` when the attention function passed no ``q``/``k``."""
        from fp_kernels import block_scores_reference

        idx, call = self._map_call(layer, run)
        if call.score_inputs is None:
            return None
        if idx not in self._scores_cache:
            q, k, scale, kv_start, kv_end = call.score_inputs
            scores = block_scores_reference(q, k, call.info.block_size, scale, kv_start, kv_end)
            self._scores_cache[idx] = scores.cpu()
        return self._scores_cache[idx][batch, head]

    def map_info(self, layer: int, *, run: int | None = None):
        """``(run, tokens, block_size, density [B, Hq] on CPU)`` of the block map of ``layer``."""
        _, call = self._map_call(layer, run)
        return call.run, call.q_len, call.info.block_size, call.density.cpu()

    # ------------------------------------------------------------------ plots

    def plot(self, kind: str = "heatmap", path=None, **kwargs):
        """A matplotlib figure (also saved to ``path`` when given).

        ``kind``: ``"heatmap"`` (layers x heads density), ``"length"`` (density against sequence
        length over the runs), ``"block_map"`` (needs ``layer=``, ``head=``), ``"error"`` (per-layer
        relative error, needs ``error=True``). Keyword arguments go to the functions of
        :mod:`fp_patch.plots`.
        """
        from . import plots

        functions = {
            "heatmap": plots.plot_density_heatmap,
            "length": plots.plot_density_vs_length,
            "block_map": plots.plot_block_map,
            "error": plots.plot_layer_error,
        }
        if kind not in functions:
            raise ValueError(f"kind must be one of {sorted(functions)}, got {kind!r}")
        return functions[kind](self, path=path, **kwargs)


class _RecorderGroup:
    """Several recorders active at once (nested ``record_density`` on different models)."""

    def __init__(self, recorders: tuple):
        self._recorders = recorders

    @property
    def wants_info(self) -> bool:
        return any(r.wants_info for r in self._recorders)

    def wants_block_maps(self, layer_idx) -> bool:
        return any(r.wants_block_maps(layer_idx) for r in self._recorders)

    wants_block_scores = wants_block_maps

    def add_sparse(self, *args, **kwargs) -> None:
        for r in self._recorders:
            r.add_sparse(*args, **kwargs)

    def add_fallback(self, *args, **kwargs) -> None:
        for r in self._recorders:
            r.add_fallback(*args, **kwargs)


@contextlib.contextmanager
def record_density(model, *, block_maps: bool | Iterable[int] = False, error: bool = False):
    """Record FlashPrefill's block density for the forward passes of ``model`` inside the block.

    Yields a :class:`DensityRecorder`. ``block_maps`` (``True`` or layer indices) keeps what is
    needed to draw block maps; ``error=True`` measures each sparse layer's error against dense
    attention (slower). Recording adds no host synchronisation to the forward pass.
    """
    rec = DensityRecorder(model, block_maps=block_maps, error=error)
    handles = []
    if model is not None:
        # a run starts at the outermost forward of the model (or of its base model, called directly)
        targets = [model]
        base = getattr(model, "base_model", None)
        if isinstance(base, torch.nn.Module) and base is not model:
            targets.append(base)
        for target in targets:
            handles.append(target.register_forward_pre_hook(rec._forward_pre_hook))
            handles.append(target.register_forward_hook(rec._forward_hook, always_call=True))
    _ACTIVE.append(rec)
    try:
        yield rec
    finally:
        _ACTIVE.remove(rec)
        for handle in handles:
            handle.remove()
        if model is not None:
            rec._warn_if_compiled(model)
