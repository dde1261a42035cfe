"""Plots of recorded FlashPrefill density (matplotlib, headless).

Every function returns a :class:`matplotlib.figure.Figure` built without ``pyplot`` (no global
figure state, no display backend needed) and saves it as PNG when ``path`` is given. Inputs are a
:class:`fp_patch.recording.DensityRecorder` or the frames it produces.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

DENSITY_CMAP = "viridis"
SCORE_CMAP = "magma"
# block scores below this (log10 of the mass relative to the best block of the row) share one color
SCORE_FLOOR = -6.0
ALWAYS_KEPT = "always computed (sinks, local window, last query blocks)"


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig, path) -> None:
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=150)


def _percent_axis(axis) -> None:
    from matplotlib.ticker import PercentFormatter

    axis.set_major_formatter(PercentFormatter(1.0))


def _frames(data):
    """``(layer_frame, head_frame)`` of a recorder, or ``(None, frame)`` for a head frame."""
    if hasattr(data, "to_frame"):
        return data.layer_frame(), data.to_frame()
    return None, data


# ---------------------------------------------------------------------------- layers x heads


def plot_density_heatmap(data, *, run: int | None = None, path=None, title: str | None = None, annotate=None):
    """Layers x heads density heatmap.

    ``data``: a recorder or a :meth:`~fp_patch.recording.DensityRecorder.to_frame` frame. With
    several runs the cells pool them (blocks computed / causal blocks) unless ``run`` picks one.
    Layers that ran dense in those runs are drawn as grey rows labelled with the reason.
    ``annotate``: write the percentage in each cell (default: when cells are large enough).
    """
    layers, frame = _frames(data)
    if run is not None:
        frame = frame[frame["run"] == run]
        layers = None if layers is None else layers[layers["run"] == run]
    if not len(frame):
        raise ValueError("no sparse call recorded" + ("" if run is None else f" in run {run}"))
    grouped = frame.groupby(["layer", "head"]).agg(blocks=("blocks", "sum"), causal=("causal_blocks", "sum"))
    dense_reasons: dict[int, str] = {}
    if layers is not None:
        for layer, g in layers[layers["reason"] != ""].groupby("layer"):
            if layer not in set(frame["layer"]):
                dense_reasons[int(layer)] = ", ".join(sorted(set(g["reason"])))
    layer_ids = sorted(set(int(i) for i in frame["layer"]) | set(dense_reasons))
    heads = int(frame["head"].max()) + 1
    row_of = {layer: r for r, layer in enumerate(layer_ids)}
    grid = np.full((len(layer_ids), heads), np.nan)
    for (layer, head), g in grouped.iterrows():
        grid[row_of[int(layer)], int(head)] = g.blocks / g.causal if g.causal else 0.0

    width = min(16.0, max(5.5, 2.4 + 0.55 * heads))
    height = min(18.0, max(4.0, 1.6 + 0.3 * len(layer_ids)))
    fig = _figure(width, height)
    ax = fig.add_subplot()
    cmap = _cmap(DENSITY_CMAP, bad="#d9d9d9")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    cbar = fig.colorbar(image, ax=ax, shrink=0.8, pad=0.02)
    cbar.set_label("density: fraction of causal blocks computed")
    _percent_axis(cbar.ax.yaxis)
    floor = _floor(frame)
    if floor is not None:  # the density no selection can go below: the always-keep rules alone
        cbar.ax.axhspan(0.0, floor, facecolor="none", edgecolor="#d62728", hatch="///", linewidth=0.0)
        cbar.ax.axhline(floor, color="#d62728", linewidth=2.0)
        cbar.ax.text(-0.15, floor, f"floor {floor:.0%}", transform=cbar.ax.get_yaxis_transform(), ha="right",
                     va="center", fontsize=8, color="#d62728", fontweight="bold")
    ax.set_xticks(range(heads))
    ax.set_xticks(np.arange(-0.5, heads, 1), minor=True)
    ax.set_yticks(range(len(layer_ids)), [str(i) for i in layer_ids])
    ax.set_yticks(np.arange(-0.5, len(layer_ids), 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.6)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    if annotate is None:
        annotate = heads <= 16 and len(layer_ids) <= 48
    if annotate:
        fontsize = 7 if heads > 10 else 8
        for r in range(len(layer_ids)):
            for h in range(heads):
                value = grid[r, h]
                if not math.isnan(value):
                    color = "black" if value > 0.6 else "white"
                    ax.text(h, r, f"{value * 100:.0f}", ha="center", va="center", fontsize=fontsize, color=color)
    for layer, reason in dense_reasons.items():
        ax.text(
            (heads - 1) / 2, row_of[layer], f"dense: {reason}", ha="center", va="center", fontsize=8, color="#404040"
        )
    overall = frame["blocks"].sum() / max(1, frame["causal_blocks"].sum())
    if title is None:
        tokens = sorted({int(t) for t in frame["tokens"]})
        runs = frame["run"].nunique()
        tok = f"{tokens[0]} tokens" if len(tokens) == 1 else f"{runs} runs, {tokens[0]}-{tokens[-1]} tokens"
        title = f"FlashPrefill block density per layer and head\n{tok}, overall {overall:.1%} (cells in %)"
        if floor is not None:
            title += f"\nfloor {floor:.1%} (red): always computed, by rule"
    ax.set_title(title, fontsize=10)
    _save(fig, path)
    return fig


def _floor(frame) -> float | None:
    """The always-computed share of the frame's causal blocks (pooled like the density), if recorded."""
    if "floor" not in frame or frame["floor"].isna().all():
        return None
    causal = frame["causal_blocks"].clip(lower=0)
    return float((frame["floor"].fillna(1.0) * causal).sum() / max(1, causal.sum()))


def _cmap(name: str, bad: str):
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad=bad)


# ---------------------------------------------------------------------------- density vs length


def _run_points(data) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per distinct length: tokens, pooled density, min and max layer density."""
    _, frame = _frames(data)
    if not len(frame):
        raise ValueError("no sparse call recorded")
    per_layer = frame.groupby(["tokens", "run", "layer"]).agg(blocks=("blocks", "sum"), causal=("causal_blocks", "sum"))
    per_layer["density"] = per_layer["blocks"] / per_layer["causal"].clip(lower=1)
    tokens, density, low, high = [], [], [], []
    for t, g in per_layer.groupby(level="tokens"):
        tokens.append(int(t))
        density.append(g["blocks"].sum() / max(1, g["causal"].sum()))
        low.append(g["density"].min())
        high.append(g["density"].max())
    return np.array(tokens), np.array(density), np.array(low), np.array(high)


def plot_density_vs_length(data, *, path=None, title: str | None = None, band: bool = True):
    """Density against sequence length.

    ``data``: a recorder or frame holding runs of several lengths, or a mapping ``{label: recorder
    or frame}`` (e.g. one per alpha), or a list of them. Each series is one line (all layers and
    heads pooled per length); with ``band`` a shaded band spans the sparsest to the densest layer.
    """
    if isinstance(data, Mapping):
        series = list(data.items())
    elif isinstance(data, Sequence) and not hasattr(data, "to_frame") and not hasattr(data, "columns"):
        series = [(f"set {i}", d) for i, d in enumerate(data)]
    else:
        series = [(None, data)]
    fig = _figure(6.4, 4.2)
    ax = fig.add_subplot()
    all_tokens = set()
    for label, d in series:
        tokens, density, low, high = _run_points(d)
        all_tokens.update(tokens.tolist())
        (line,) = ax.plot(tokens, density, marker="o", label=label if label is not None else "all layers")
        if band:
            band_label = "sparsest .. densest layer" if len(series) == 1 else None
            ax.fill_between(tokens, low, high, color=line.get_color(), alpha=0.15, linewidth=0, label=band_label)
    _, first = _frames(series[0][1])
    if "floor" in first and first["floor"].notna().any():  # the same rules for every series: draw it once
        floors = first.groupby("tokens").apply(_floor, include_groups=False).dropna()
        ax.plot(floors.index, floors.values, color="#d62728", linestyle="--", marker=".",
                label="floor: always computed (sinks, window, last blocks)")
    ax.set_xscale("log", base=2)
    ticks = sorted(all_tokens)
    ax.set_xticks(ticks, [f"{t // 1024}K" if t % 1024 == 0 else str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_ylim(0, 1.02)
    _percent_axis(ax.yaxis)
    ax.grid(alpha=0.3)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("density (fraction of causal blocks)")
    ax.legend(fontsize=8)
    ax.set_title(title or "FlashPrefill density against sequence length", fontsize=10)
    _save(fig, path)
    return fig


# ---------------------------------------------------------------------------- block map


def _outline(ax, mask: np.ndarray, color: str) -> None:
    """Draw the boundary of the True cells of ``mask`` (cell (r, c) spans c +- 0.5, r +- 0.5)."""
    from matplotlib.collections import LineCollection

    m = np.pad(mask.astype(bool), 1)
    segments = []
    rows, cols = np.nonzero(m[1:-1, 1:] != m[1:-1, :-1])  # vertical edges
    segments += [((c - 0.5, r - 0.5), (c - 0.5, r + 0.5)) for r, c in zip(rows, cols, strict=True)]
    rows, cols = np.nonzero(m[1:, 1:-1] != m[:-1, 1:-1])  # horizontal edges
    segments += [((c - 0.5, r - 0.5), (c + 0.5, r - 0.5)) for r, c in zip(rows, cols, strict=True)]
    ax.add_collection(LineCollection(segments, colors=color, linewidths=0.9))


def _hatch(ax, mask: np.ndarray, color) -> None:
    """Hatch the True cells of ``mask`` (cell (r, c) spans c +- 0.5, r +- 0.5), leaving their colors visible."""
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    rows, cols = np.nonzero(mask)
    cells = [Rectangle((c - 0.5, r - 0.5), 1, 1) for r, c in zip(rows, cols, strict=True)]
    ax.add_collection(
        PatchCollection(cells, facecolor="none", edgecolor=color, hatch="////", linewidth=0, label=ALWAYS_KEPT)
    )


def plot_block_map(
    rec, layer: int, head: int, *, run: int | None = None, batch: int = 0, path=None, title: str | None = None
):
    """Selected block map of one (layer, head) over the block scores behind it.

    Left: the block scores as ``log10`` of each key block's pooled softmax mass relative to the best
    block of its query-block row (what the alpha threshold compares; vertical lines are tokens all
    queries attend to, diagonals are relative positions, the lower-left corner is the sinks), with
    the border between selected and skipped blocks outlined. Right: what was computed (score colors)
    and skipped (grey). On both, the
    blocks computed by rule whatever their score (sinks, local window, last query blocks) are
    hatched: the diagonal block is scored from the block's last query row only (a row never scores
    keys in its future), so it often looks weak although it is always computed. Needs
    ``record_density(model, block_maps=True)``; without recorded ``q``/``k`` only the map is drawn.
    """
    mask = rec.block_mask(layer, head, run=run, batch=batch).numpy()
    forced = rec.always_kept(layer, run=run, batch=batch).numpy() if hasattr(rec, "always_kept") else None
    scores = rec.block_scores(layer, head, run=run, batch=batch)
    run_id, tokens, block_size, density = rec.map_info(layer, run=run)
    n_slots, nkb = mask.shape
    if title is None:
        title = (
            f"layer {layer}, head {head}: {float(density[batch, head]):.1%} of causal blocks computed\n"
            f"{tokens} tokens, {block_size}-token blocks (run {run_id})"
        )
    side = min(6.5, max(3.2, 0.12 * nkb + 2.0))
    if scores is None:
        fig = _figure(side + 0.6, side)
        ax = fig.add_subplot()
        ax.imshow(mask, cmap=_cmap("Blues", bad="white"), vmin=0, vmax=1.4, interpolation="nearest")
        if forced is not None:
            _hatch(ax, forced, "#ff9f1c")
        _block_axes(ax, n_slots, nkb)
        note = "\nhatched: always computed (sinks, window, last)" if forced is not None else ""
        ax.set_title(title + f"\n(computed blocks; no block scores recorded){note}", fontsize=9)
        _save(fig, path)
        return fig
    s = scores.float().numpy()
    visible = np.isfinite(s)
    row_max = np.where(visible, s, -np.inf).max(axis=1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    rel = np.where(visible, (s - row_max) / math.log(10), np.nan)
    rel = np.maximum(rel, SCORE_FLOOR)
    # color range: down to the weakest visible block (at most SCORE_FLOOR), for contrast
    low = float(np.nanmin(rel)) if np.isfinite(rel).any() else SCORE_FLOOR
    vmin = min(-1.0, math.floor(low))
    cmap = _cmap(SCORE_CMAP, bad="white")
    fig = _figure(2 * side + 1.2, side)
    left, right = fig.subplots(1, 2, sharex=True, sharey=True)
    image = left.imshow(np.ma.masked_invalid(rel), cmap=cmap, vmin=vmin, vmax=0, interpolation="nearest")
    _outline(left, mask & visible, "#00e5ff")
    left.set_title("block scores; the selection's border outlined", fontsize=9)
    shown = np.where(mask & visible, rel, np.nan)
    skipped = np.where(visible & ~mask, 1.0, np.nan)
    right.imshow(
        np.ma.masked_invalid(skipped), cmap=_cmap("Greys", bad="white"), vmin=0, vmax=4, interpolation="nearest"
    )
    right.imshow(
        np.ma.masked_invalid(shown),
        cmap=_cmap(SCORE_CMAP, bad=(0, 0, 0, 0)),
        vmin=vmin,
        vmax=0,
        interpolation="nearest",
    )
    right.set_title("computed (color) and skipped (grey) blocks", fontsize=9)
    for ax in (left, right):
        if forced is not None:
            _hatch(ax, forced & visible, (1.0, 1.0, 1.0, 0.7))
        _block_axes(ax, n_slots, nkb)
    cbar = fig.colorbar(image, ax=[left, right], shrink=0.8, pad=0.02)
    cbar.set_label("log10 block mass / best block of the row")
    if forced is not None:
        title += f"\nhatched: {ALWAYS_KEPT}; the diagonal's score uses its last row only"
    fig.suptitle(title, fontsize=10)
    _save(fig, path)
    return fig


def _block_axes(ax, n_slots: int, nkb: int) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("key block")
    ax.set_ylabel("query block")
    ax.set_xlim(-0.5, nkb - 0.5)
    ax.set_ylim(n_slots - 0.5, -0.5)


# ---------------------------------------------------------------------------- error


def plot_layer_error(rec, *, run: int | None = None, path=None, title: str | None = None):
    """Per-layer relative L2 error of the sparse attention output against dense, next to its density.

    Needs ``record_density(model, error=True)``.
    """
    layers = rec.layer_frame()
    if run is not None:
        layers = layers[layers["run"] == run]
    sparse = layers[layers["reason"] == ""]
    if not len(sparse) or sparse["rel_error"].isna().all():
        raise ValueError("no error recorded; use fp_patch.record_density(model, error=True)")
    per_layer = sparse.groupby("layer").agg(error=("rel_error", "mean"), density=("density", "mean"))
    fig = _figure(max(6.0, 0.22 * len(per_layer) + 2.5), 3.8)
    ax = fig.add_subplot()
    ax.bar(per_layer.index, per_layer["error"], color="#c44e52", label="relative L2 error vs dense")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(0, 1.3 * max(float(per_layer["error"].max()), 1e-12))  # room for the legend
    ax.set_xlabel("layer")
    ax.set_ylabel("||sparse - dense|| / ||dense||")
    ax.grid(axis="y", alpha=0.3)
    twin = ax.twinx()
    twin.plot(per_layer.index, per_layer["density"], color="#4c72b0", marker=".", label="density")
    twin.set_ylim(0, 1.02)
    _percent_axis(twin.yaxis)
    twin.set_ylabel("density")
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=8, loc="upper center", ncols=2)
    ax.set_title(title or "Attention output error of the sparse layers", fontsize=10)
    _save(fig, path)
    return fig
