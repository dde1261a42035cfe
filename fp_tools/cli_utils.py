"""Pieces shared by ``flashprefill demo`` and ``flashprefill inspect`` once they run (this module imports
torch; flag definitions live in the light :mod:`fp_tools.args`): device choice, progress,
time-to-first-token, and writing a recording's tables and plots to a folder."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# a progress bar appears only once a step takes longer than this (fast GPU runs stay quiet)
PROGRESS_DELAY_S = 2.0


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; other names are checked (:class:`fp_tools.args.UsageError`)."""
    from fp_tools.args import check_device

    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``"auto"`` -> bfloat16 on CUDA (what the kernels run), float32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def backend_for(device: torch.device) -> str:
    """The FlashPrefill backend for a device: the Triton kernels on CUDA, the PyTorch reference elsewhere
    (also when ``TRITON_INTERPRET=1`` is set, whose interpreter would be far slower)."""
    return "auto" if device.type == "cuda" else "reference"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decoder_layers(model) -> list:
    """The decoder blocks of a Transformers causal LM (empty when the layout is unknown)."""
    for getter in (lambda m: m.get_decoder().layers, lambda m: m.model.layers, lambda m: m.transformer.h):
        try:
            layers = getter(model)
        except AttributeError:
            continue
        if isinstance(layers, torch.nn.ModuleList):
            return list(layers)
    return []


class GenerationProgress:
    """A tqdm bar over one ``generate``: the prefill advances it per decoder layer, every new token
    by one; shown only if the run takes more than :data:`PROGRESS_DELAY_S` seconds.

    Also a Transformers streamer: pass it as ``generate(..., streamer=progress)``; it records the
    time of the first generated token (:attr:`ttft`, measured from :meth:`start`).
    """

    def __init__(self, model, desc: str, max_new_tokens: int, device: torch.device, progress: bool = True):
        from tqdm.auto import tqdm

        self._layers = decoder_layers(model)
        self._device = device
        self._bar = tqdm(
            total=len(self._layers) + max_new_tokens,
            desc=desc,
            unit="step",
            delay=PROGRESS_DELAY_S,
            leave=False,
            disable=not progress,
        )
        self._handles = [layer.register_forward_hook(self._layer_done) for layer in self._layers]
        self._prefill_layers = 0
        self._prompt_seen = False
        self._t0 = None
        self.ttft: float | None = None

    def start(self) -> None:
        synchronize(self._device)
        self._t0 = time.perf_counter()

    def _layer_done(self, *_) -> None:  # returns None: a hook's return value would replace the output
        if self._prefill_layers < len(self._layers):
            self._prefill_layers += 1
            self._bar.update(1)

    # streamer interface (transformers.generation.streamers.BaseStreamer)
    def put(self, value) -> None:
        if not self._prompt_seen:  # generate first hands over the prompt
            self._prompt_seen = True
            return
        value.tolist()  # waits for the token, so the time below is when it exists
        if self.ttft is None:
            self.ttft = time.perf_counter() - self._t0
        self._bar.update(1)

    def end(self) -> None:
        self.close()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._bar.close()


def timed_generate(
    model, inputs: dict, *, desc: str, max_new_tokens: int, device: torch.device, progress: bool = True
):
    """Greedy ``generate``: ``(new token ids [n], time to first token in s, total time in s)``; ``progress``:
    a bar when it takes more than :data:`PROGRESS_DELAY_S`."""
    progress = GenerationProgress(model, desc, max_new_tokens, device, progress)
    try:
        with torch.inference_mode():
            progress.start()
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                streamer=progress,
                pad_token_id=getattr(model.generation_config, "eos_token_id", None),
            )
            synchronize(device)
            total = time.perf_counter() - progress._t0
    finally:
        progress.close()
    return out[0, inputs["input_ids"].shape[1] :], progress.ttft, total


@contextlib.contextmanager
def prefill_progress(model, desc: str, progress: bool = True):
    """A tqdm bar over the decoder layers of the forward passes inside the block (delayed like above;
    none when ``progress`` is false)."""
    from tqdm.auto import tqdm

    layers = decoder_layers(model)
    bar = tqdm(
        total=len(layers) or None, desc=desc, unit="layer", delay=PROGRESS_DELAY_S, leave=False, disable=not progress
    )

    def layer_done(*_) -> None:  # a forward hook's return value would replace the layer's output
        bar.update(1)

    handles = [layer.register_forward_hook(layer_done) for layer in layers]
    try:
        yield bar
    finally:
        for handle in handles:
            handle.remove()
        bar.close()


def heads_to_draw(rec, layer: int) -> list[tuple[int, str]]:
    """``[(head, "sparsest"), (head, "densest")]``: the sparsest query head of ``layer`` and the densest
    one still below 100 % (the one whose map shows the most blocks chosen by score rather than by the
    always-kept rules); one entry when they coincide or every other head is at 100 %."""
    frame = rec.to_frame()
    rows = frame[frame["layer"] == layer]
    if not len(rows):
        raise ValueError(f"layer {layer} recorded no sparse call")
    per_head = rows.groupby("head").agg(b=("blocks", "sum"), c=("causal_blocks", "sum"))
    density = per_head["b"] / per_head["c"].clip(lower=1)
    heads = [(int(density.idxmin()), "sparsest")]
    sparse = density[density < 1.0]
    if len(sparse) and int(sparse.idxmax()) != heads[0][0]:
        heads.append((int(sparse.idxmax()), "densest"))
    return heads


def save_recording(rec, out_dir: Path, *, map_layers=(), prefix: str = "") -> list[Path]:
    """Write the recording's CSVs and PNGs under ``out_dir``; returns the written paths.

    ``density.csv`` (per run, layer, head), ``layers.csv`` (per run and layer, with dense-fallback
    reasons), ``density_heatmap.png``, ``density_vs_length.png`` (when runs of several lengths were
    recorded), ``block_map_L{layer}_H{head}_sparsest.png`` and ``..._densest.png`` (the densest head
    below 100 %) for each layer in ``map_layers`` (when its map was recorded) and ``layer_error.png``
    (when errors were recorded).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    frame = rec.to_frame()
    path = out_dir / f"{prefix}density.csv"
    frame.to_csv(path, index=False)
    written.append(path)
    path = out_dir / f"{prefix}layers.csv"
    rec.layer_frame().to_csv(path, index=False)
    written.append(path)
    if not len(frame):
        return written
    path = out_dir / f"{prefix}density_heatmap.png"
    rec.plot("heatmap", path=path)
    written.append(path)
    if frame["tokens"].nunique() > 1:
        path = out_dir / f"{prefix}density_vs_length.png"
        rec.plot("length", path=path)
        written.append(path)
    for layer in map_layers:
        if layer not in set(frame["layer"]):
            continue
        for head, which in heads_to_draw(rec, layer):
            path = out_dir / f"{prefix}block_map_L{layer}_H{head}_{which}.png"
            rec.plot("block_map", layer=layer, head=head, path=path)
            written.append(path)
    if "rel_error" in frame:
        path = out_dir / f"{prefix}layer_error.png"
        rec.plot("error", path=path)
        written.append(path)
    return written
