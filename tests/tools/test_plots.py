"""The density plots render headless, return figures and write PNGs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fp_kernels import BlockRules, flash_prefill
from matplotlib.figure import Figure

from fp_patch import plots
from fp_patch.recording import DensityRecorder

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def qkv(length: int, seed: int = 0, hq: int = 4, hkv: int = 2, dim: int = 64):
    """Inputs with a vertical line (keys every query likes) and a diagonal bias: a sparse selection."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(dim, generator=gen)
    q = torch.randn(1, length, hq, dim, generator=gen) + u
    k = torch.randn(1, length, hkv, dim, generator=gen) * 0.5
    k[:, length // 3 : length // 3 + 16] += 3.0 * u
    v = torch.randn(1, length, hkv, dim, generator=gen)
    return q, k, v


def record(rec: DensityRecorder, length: int, layers=(0, 1, 2), alpha: float = 0.3, scores: bool = True):
    rec.new_run()
    for layer in layers:
        q, k, v = qkv(length, seed=layer)
        out, info = flash_prefill(q, k, v, alpha=alpha, block_size=32, return_info=True, backend="reference")
        extra = {"q": q, "k": k} if scores else {}
        rec.add_sparse(
            None, layer, info, q_len=length, k_len=length, out=out, dense_fn=lambda out=out: out * 0.99, **extra
        )
    rec.add_fallback(None, len(layers), "dense_layer", q_len=length, k_len=length)


@pytest.fixture(scope="module")
def rec():
    rec = DensityRecorder(None, block_maps=True, error=True)
    for length in (256, 512):
        record(rec, length)
    return rec


def assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000, f"{path} is not a real PNG"


def test_heatmap(rec, tmp_path):
    fig = rec.plot("heatmap", path=tmp_path / "heat.png")
    assert isinstance(fig, Figure)
    assert_png(tmp_path / "heat.png")
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "dense: dense_layer" in texts, "the dense layer is labelled"
    assert len([t for t in texts if t.isdigit()]) == 3 * 4, "one percentage per sparse (layer, head) cell"
    one_run = plots.plot_density_heatmap(rec.to_frame(), run=1)
    assert "512 tokens" in one_run.axes[0].get_title()


def test_heatmap_marks_the_always_computed_floor(rec):
    """The colorbar carries the floor: the share of causal blocks the sink/window/last-block rules compute
    whatever the scores (at 2K tokens with the default rules, 100 of 136 blocks: 73.5 %)."""
    from fp_patch.recording import always_computed_fraction

    assert always_computed_fraction(2048, 2048, BlockRules()) == pytest.approx(100 / 136)
    assert always_computed_fraction(4096, 4096, BlockRules()) == pytest.approx(0.4318, abs=1e-4)
    frame = rec.to_frame()
    run1 = frame[frame["run"] == 1]
    assert (run1["floor"] == always_computed_fraction(512, 512, BlockRules(block_size=32))).all()
    assert (frame["density"] >= frame["floor"] - 1e-6).all(), "no head computes less than the rules force"
    fig = plots.plot_density_heatmap(frame, run=1)
    colorbar = fig.axes[1]
    floor = always_computed_fraction(512, 512, BlockRules(block_size=32))
    assert [t.get_text() for t in colorbar.texts] == [f"floor {floor:.0%}"]
    assert f"floor {floor:.1%} (red): always computed, by rule" in fig.axes[0].get_title()


def test_density_vs_length(rec, tmp_path):
    fig = rec.plot("length", path=tmp_path / "length.png")
    assert_png(tmp_path / "length.png")
    line = fig.axes[0].lines[0]
    assert list(line.get_xdata()) == [256, 512]
    other = DensityRecorder(None)
    for length in (256, 512):
        record(other, length, alpha=0.6, scores=False)
    fig = plots.plot_density_vs_length({"alpha 0.3": rec, "alpha 0.6": other.to_frame()}, path=tmp_path / "two.png")
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["alpha 0.3", "alpha 0.6", "floor: always computed (sinks, window, last blocks)"]
    floor = fig.axes[0].lines[-1]
    assert list(floor.get_xdata()) == [256, 512] and all(0 < y <= 1 for y in floor.get_ydata())


def test_block_map_with_scores(rec, tmp_path):
    fig = rec.plot("block_map", layer=1, head=2, path=tmp_path / "map.png")
    assert_png(tmp_path / "map.png")
    assert len(fig.axes) == 3, "scores, selection, colorbar"
    left = fig.axes[0]
    assert left.collections, "the selection is outlined"
    assert left.images[0].get_array().shape == (16, 16)


def test_block_map_hatches_the_always_computed_blocks(rec):
    fig = rec.plot("block_map", layer=1, head=2)
    forced = rec.always_kept(1)
    assert forced.sum() > 0 and (forced & ~rec.block_mask(1, 2)).sum() == 0, "always computed means computed"
    for ax in fig.axes[:2]:
        hatched = [c for c in ax.collections if c.get_label() == plots.ALWAYS_KEPT]
        assert len(hatched) == 1 and hatched[0].get_hatch() == "////"
        assert len(hatched[0].get_paths()) == int(forced.sum())
    assert "hatched: always computed" in fig.get_suptitle()


@pytest.mark.parametrize("rules", [(2, 4, 2), (1, 2, 1), (0, 1, 0)], ids=str)
def test_always_kept_follows_the_rules(rules):
    """Every block the rules force is selected, and at alpha 1 (keep only the best-scoring block) the
    selection is the forced blocks plus at most the best one per query block."""
    sink, window, last = rules
    rules = BlockRules(alpha=1.0, block_size=32, sink_blocks=sink, window_blocks=window, last_dense_blocks=last)
    q, k, v = qkv(512)
    rec = DensityRecorder(None, block_maps=True)
    _, info = flash_prefill(q, k, v, rules=rules, return_info=True, backend="reference")
    rec.add_sparse(None, 0, info, q_len=512, k_len=512, rules=rules)
    forced = rec.always_kept(0)
    for head in range(4):
        mask = rec.block_mask(0, head)
        assert (forced & ~mask).sum() == 0
        assert ((mask & ~forced).sum(-1) <= 1).all()
    assert forced[:, :sink].sum() == sum(min(s + 1, sink) for s in range(16)), "sinks"
    assert forced.diagonal().all(), "the diagonal is in the window"
    if last:
        assert forced[-last:].sum() == sum(16 - i for i in range(last)), "last query blocks dense"


def test_block_map_without_scores(tmp_path):
    rec = DensityRecorder(None, block_maps=True)
    record(rec, 256, scores=False)
    fig = plots.plot_block_map(rec, 0, 0, path=tmp_path / "map.png")
    assert_png(tmp_path / "map.png")
    assert "no block scores" in fig.axes[0].get_title()


def test_error_plot(rec, tmp_path):
    rec.plot("error", path=tmp_path / "err.png")
    assert_png(tmp_path / "err.png")
    no_error = DensityRecorder(None)
    record(no_error, 256, scores=False)
    with pytest.raises(ValueError, match="error=True"):
        no_error.plot("error")


def test_unknown_kind_and_empty(rec):
    with pytest.raises(ValueError, match="kind"):
        rec.plot("pie")
    with pytest.raises(ValueError, match="no sparse call"):
        DensityRecorder(None).plot("heatmap")


def test_headless_without_pyplot(tmp_path):
    """No display, no pyplot: the plots work in a bare process (CI, servers)."""
    here = Path(__file__).parent
    code = f"""
import os, sys
os.environ.pop("DISPLAY", None)
sys.path.insert(0, {str(here)!r})
from test_plots import record
from fp_patch.recording import DensityRecorder
rec = DensityRecorder(None, block_maps=True)
record(rec, 256)
rec.plot("heatmap", path={str(tmp_path / "a.png")!r})
rec.plot("block_map", layer=0, head=0, path={str(tmp_path / "b.png")!r})
assert "matplotlib.pyplot" not in sys.modules
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    assert_png(tmp_path / "a.png")
    assert_png(tmp_path / "b.png")
