"""Tables and heatmaps from eval records: accuracy per task and implementation, the difference to
the dense baseline, measured block density and prefill time per length."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

HEATMAP_TASK = "niah_single"


def records_frame(records):
    import pandas as pd

    frame = pd.DataFrame.from_records(records)
    if len(frame) == 0:
        raise ValueError("no eval records to report on; run the suite first")
    frame["accuracy"] = 100.0 * frame["score"]
    return frame


def _impl_order(frame) -> list[str]:
    return list(dict.fromkeys(frame["impl"]))


def summarize(records, baseline: str | None = None):
    """Per (implementation, task, length): accuracy (0-100), cases, difference to ``baseline``
    (default: ``sdpa`` if present, else the first implementation), mean density and prefill time.

    Rows with ``length == "all"`` aggregate over lengths.
    """
    import pandas as pd

    frame = records_frame(records)
    impls = _impl_order(frame)
    baseline = baseline or ("sdpa" if "sdpa" in impls else impls[0])
    agg = {"accuracy": ("accuracy", "mean"), "cases": ("id", "count"), "density": ("density", "mean"),
           "prefill_s": ("prefill_s", "mean")}
    per_len = frame.groupby(["impl", "task", "length"], sort=False).agg(**agg).reset_index()
    overall = frame.groupby(["impl", "task"], sort=False).agg(**agg).reset_index()
    overall["length"] = "all"
    per_len["length"] = per_len["length"].astype(object)
    table = pd.concat([per_len, overall], ignore_index=True)
    base = table[table["impl"] == baseline].set_index(["task", "length"])["accuracy"]
    table["delta_vs_" + baseline] = [
        acc - base.get((task, length), math.nan) for acc, task, length in zip(table["accuracy"], table["task"],
                                                                            table["length"], strict=True)
    ]
    return table


def density_by_length(records):
    """Mean block density and prefill time per (sparse implementation, length)."""
    frame = records_frame(records)
    return (
        frame.groupby(["impl", "length"], sort=False)
        .agg(density=("density", "mean"), prefill_s=("prefill_s", "mean"), cases=("id", "count"))
        .reset_index()
    )


def _fmt(value, digits=1) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def markdown_tables(records, baseline: str | None = None) -> str:
    """Accuracy (task × implementation, per length and overall), then density/prefill per length."""
    table = summarize(records, baseline)
    delta = next(c for c in table.columns if c.startswith("delta_vs_"))
    impls = list(dict.fromkeys(table["impl"]))
    lines = []
    for length in list(dict.fromkeys(table["length"])):
        part = table[table["length"] == length]
        title = "all lengths" if length == "all" else f"{length} tokens"
        lines += [f"**Accuracy (%), {title}** (Δ = vs {delta[len('delta_vs_'):]})", ""]
        lines.append("| task | " + " | ".join(impls) + " |")
        lines.append("|---|" + "---|" * len(impls))
        for task in dict.fromkeys(part["task"]):
            cells = []
            for impl in impls:
                row = part[(part["task"] == task) & (part["impl"] == impl)]
                if len(row) == 0:
                    cells.append("")
                    continue
                acc, d = row["accuracy"].iloc[0], row[delta].iloc[0]
                extra = "" if math.isnan(d) or d == 0 and impl == delta[len("delta_vs_"):] else f" ({d:+.1f})"
                cells.append(f"{acc:.1f}{extra}")
            lines.append(f"| {task} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["**Block density and prefill time per length** (density: fraction of causal key blocks computed, "
              "mean over sparse layers, heads and cases; – for dense)", ""]
    lines.append("| implementation | length | density | prefill s | cases |")
    lines.append("|---|---|---|---|---|")
    for _, row in density_by_length(records).iterrows():
        lines.append(f"| {row['impl']} | {row['length']} | {_fmt(row['density'], 3)} | {_fmt(row['prefill_s'], 2)} "
                     f"| {row['cases']} |")
    return "\n".join(lines) + "\n"


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_")


def plot_heatmaps(records, out_dir, task: str = HEATMAP_TASK) -> list[Path]:
    """One PNG per implementation: mean score of ``task`` over length (rows) × depth (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    frame = records_frame(records)
    frame = frame[frame["task"] == task]
    paths = []
    for impl in _impl_order(frame):
        grid = frame[frame["impl"] == impl].pivot_table(index="length", columns="depth", values="accuracy",
                                                         aggfunc="mean")
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * grid.shape[1], 1.0 + 0.6 * grid.shape[0]))
        image = ax.imshow(grid.values, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
        ax.set_xticks(range(grid.shape[1]), [f"{d:.0%}" for d in grid.columns])
        ax.set_yticks(range(grid.shape[0]), [str(n) for n in grid.index])
        for (i, j), value in np.ndenumerate(grid.values):
            ax.text(j, i, "" if math.isnan(value) else f"{value:.0f}", ha="center", va="center", fontsize=8)
        ax.set_xlabel("needle depth")
        ax.set_ylabel("length (tokens)")
        ax.set_title(f"{task}: {impl}", fontsize=9)
        fig.colorbar(image, ax=ax, label="accuracy (%)")
        fig.tight_layout()
        path = Path(out_dir) / f"needle_heatmap_{_safe(impl)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(records, out_dir, baseline: str | None = None, plots: bool = True, meta: dict | None = None):
    """Write ``summary.csv``, ``summary.json``, ``summary.md`` (and heatmaps) under ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = summarize(records, baseline)
    table.to_csv(out_dir / "summary.csv", index=False)
    density = density_by_length(records)
    payload = {
        "meta": meta or {},
        "summary": json.loads(table.to_json(orient="records")),
        "density_by_length": json.loads(density.to_json(orient="records")),
    }
    (out_dir / "summary.json").write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    (out_dir / "summary.md").write_text(markdown_tables(records, baseline), encoding="utf-8")
    written = [out_dir / "summary.csv", out_dir / "summary.json", out_dir / "summary.md"]
    if plots and any(r["task"] == HEATMAP_TASK for r in records):
        written += plot_heatmaps(records, out_dir)
    return written
