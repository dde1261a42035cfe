"""Speed calibration: from which prompt length sparse prefill beats dense SDPA, per model and GPU.

:func:`calibrate_speed` measures, on a CUDA GPU, for each prompt length it is given:

* the whole prefill (``model(input_ids, logits_to_keep=1)`` under ``torch.no_grad``) with
  ``attn_implementation="sdpa"`` and with ``"flashprefill"`` where every eligible layer runs sparse
  (``min_sparse_len=2``, no ``dense_layers``): medians of ``repeats`` calls after a warm-up call;
* one more, recorded, flashprefill prefill with the same settings, which checks that every eligible
  layer really ran sparse and gives the realised block density (routing depends on the call and the
  settings only, so the timed calls ran the same routes);
* each layer's attention alone, dense (Transformers' SDPA call) against sparse (the flashprefill
  attention function on the same tensors), GPU time from CUDA events, median of ``repeats``:
  measured inside one forward pass, on each layer's own query/key/value, which are then dropped.

From the rows it derives :attr:`SpeedCalibration.min_sparse_len` (the crossover) and
:attr:`SpeedCalibration.dense_layers`; :meth:`SpeedCalibration.apply` puts both into a
:class:`fp_patch.FlashPrefillConfig`::

    cal = calibrate_speed(model, {n: ids[:, :n] for n in (2048, 4096, 8192, 16384)})
    fp_patch.configure(model, cal.apply(fp_patch.get_config(model)))

This module imports nothing heavy at import time (torch, transformers and fp_patch are imported
inside the functions).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from fp_patch import FlashPrefillConfig

logger = logging.getLogger(__name__)

PROBE_NAME = "fp_speed_probe"  # the attention implementation that times each layer (registered on first use)


def crossover(rows: Sequence[Mapping]) -> int:
    """The smallest measured length from which sparse beats dense (``sparse_ms < dense_ms``) at that
    and every longer measured length; one more than the largest measured length if there is none."""
    ordered = sorted(rows, key=lambda r: r["length"])
    if not ordered:
        raise ValueError("no measured lengths: give calibrate_speed at least one prompt")
    best = ordered[-1]["length"] + 1
    for row in reversed(ordered):
        if not row["sparse_ms"] < row["dense_ms"]:
            break
        best = row["length"]
    return best


def slow_layers(rows: Sequence[Mapping], min_sparse_len: int) -> tuple[int, ...]:
    """Layers whose sparse attention never beats dense (``layer_sparse_us < layer_dense_us``) at any
    measured length ``>= min_sparse_len``. Layers never measured sparse (``None``: dense by design,
    e.g. sliding-window layers) are not listed; with no measured length at or above
    ``min_sparse_len`` nothing runs sparse anyway and the result is ``()``."""
    above = [r for r in rows if r["length"] >= min_sparse_len]
    if not above:
        return ()
    n_layers = len(above[0]["layer_dense_us"])
    slow = []
    for layer in range(n_layers):
        pairs = [(r["layer_sparse_us"][layer], r["layer_dense_us"][layer]) for r in above]
        if any(sparse is None for sparse, _ in pairs):
            continue
        if not any(sparse < dense for sparse, dense in pairs):
            slow.append(layer)
    return tuple(slow)


@dataclass
class SpeedCalibration:
    """What :func:`calibrate_speed` measured and what follows from it.

    ``rows``: one per length, ``length``, ``dense_ms``, ``sparse_ms``, ``speedup`` (dense / sparse),
    ``density`` (realised, from a recorded pass), ``sparse_layers`` / ``layers`` (the recorded
    pass's path), ``layer_dense_us`` / ``layer_sparse_us`` (per layer, ``None`` where a layer cannot
    run sparse). ``min_sparse_len``: :func:`crossover` of the rows. ``dense_layers``:
    :func:`slow_layers` at that crossover.
    """

    rows: list[dict]
    min_sparse_len: int
    dense_layers: tuple[int, ...] = field(default_factory=tuple)

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping]) -> SpeedCalibration:
        """The calibration the decision rules give for measured ``rows``."""
        rows = sorted((dict(r) for r in rows), key=lambda r: r["length"])
        min_sparse_len = crossover(rows)
        return cls(rows=rows, min_sparse_len=min_sparse_len, dense_layers=slow_layers(rows, min_sparse_len))

    def apply(self, config) -> FlashPrefillConfig:
        """``config`` with this calibration's ``min_sparse_len`` and ``dense_layers``."""
        return config.replace(min_sparse_len=self.min_sparse_len, dense_layers=self.dense_layers)

    def to_dict(self) -> dict:
        """JSON-ready: ``{"min_sparse_len", "dense_layers", "rows"}``."""
        return {"min_sparse_len": self.min_sparse_len, "dense_layers": list(self.dense_layers),
                "rows": [dict(r) for r in self.rows]}


def calibrate_speed(model, prompts: Mapping[int, torch.Tensor], *, repeats: int = 5,
                    progress: bool = True) -> SpeedCalibration:
    """Measure dense against sparse prefill for each ``prompts`` entry (length -> ``input_ids
    [1, length]`` on the model's CUDA device) and derive the crossover (see the module docstring).

    The model's attention implementation and FlashPrefill settings are restored afterwards. Raises
    ``ValueError`` on a CPU (speed is a property of the GPU), for prompts of the wrong shape or
    device, or when a timed sparse prefill did not run sparse in every eligible layer.
    """
    import torch

    import fp_patch

    if not torch.cuda.is_available():
        raise ValueError("calibrate_speed needs a CUDA GPU: speed is measured on the GPU the model will run on")
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise ValueError(f"calibrate_speed needs the model on a CUDA GPU (it is on {device}); move it with "
                         "model.to('cuda')")
    if not isinstance(prompts, Mapping) or not prompts:
        raise ValueError("prompts must be a non-empty mapping {length: input_ids [1, length]}")
    for length, ids in prompts.items():
        if not isinstance(ids, torch.Tensor) or tuple(ids.shape) != (1, length) or ids.device.type != "cuda":
            got = f"{getattr(ids, 'shape', type(ids).__name__)} on {getattr(ids, 'device', '-')}"
            raise ValueError(f"prompts[{length}] must be input_ids of shape [1, {length}] on the model's CUDA "
                             f"device, got {got}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")

    was_flashprefill = fp_patch.uses_flashprefill(model)
    settings = fp_patch.get_config(model)
    all_sparse = settings.replace(min_sparse_len=2, dense_layers=())
    from tqdm.auto import tqdm

    rows = []
    bar = tqdm(sorted(prompts), disable=not progress, desc="speed calibration", unit="length")
    try:
        fp_patch.configure(model, all_sparse)
        for length in bar:
            ids = prompts[length]
            bar.set_postfix_str(f"{length} tokens: prefill sdpa")
            model.set_attn_implementation("sdpa")
            dense_ms = _prefill_ms(model, ids, repeats)
            bar.set_postfix_str(f"{length} tokens: prefill sparse")
            model.set_attn_implementation("flashprefill")
            sparse_ms = _prefill_ms(model, ids, repeats)
            path = _recorded_pass(model, ids)
            if path["sparse_layers"] < path["eligible_layers"]:
                raise ValueError(
                    f"at {length} tokens only {path['sparse_layers']} of {path['eligible_layers']} eligible layers "
                    f"ran sparse ({', '.join(path['dense_reasons'])}); check the model's dtype/device and settings"
                )
            bar.set_postfix_str(f"{length} tokens: layers")
            layer_dense, layer_sparse = _layer_times(model, ids, repeats)
            rows.append({"length": length, "dense_ms": dense_ms, "sparse_ms": sparse_ms,
                         "speedup": dense_ms / sparse_ms, "density": path["density"],
                         "sparse_layers": path["sparse_layers"], "layers": path["layers"],
                         "layer_dense_us": layer_dense, "layer_sparse_us": layer_sparse})
            logger.info("speed calibration: %d tokens: sdpa %.2f ms, sparse %.2f ms (x%.2f), density %.1f%%",
                        length, dense_ms, sparse_ms, dense_ms / sparse_ms, 100 * (path["density"] or 0.0))
    finally:
        bar.close()
        model.set_attn_implementation("flashprefill" if was_flashprefill else "sdpa")
        fp_patch.configure(model, settings)
    return SpeedCalibration.from_rows(rows)


def _prefill_ms(model, ids, repeats: int) -> float:
    """Median wall time (ms) of one prefill forward, after one warm-up call."""
    import torch

    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            torch.cuda.synchronize()
            start = time.perf_counter()
            model(input_ids=ids, logits_to_keep=1)
            torch.cuda.synchronize()
            if i:
                times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _recorded_pass(model, ids) -> dict:
    """The realised density and path of one recorded flashprefill prefill (the timed calls' routes)."""
    import torch

    import fp_patch
    from fp_patch.config import is_decoder_attention

    with torch.no_grad(), fp_patch.record_density(model) as rec:
        model(input_ids=ids, logits_to_keep=1)
    frame, fallbacks = rec.to_frame(), rec.fallback_frame()
    layers = sum(is_decoder_attention(m) for m in model.modules())
    by_design = {"sliding_window", "non_causal"}  # layers that are never sparse, whatever the length
    never = set(fallbacks[fallbacks["reason"].isin(by_design)]["layer"]) if len(fallbacks) else set()
    density = rec.density()
    return {"density": None if density != density else density,
            "sparse_layers": int(frame["layer"].nunique()) if len(frame) else 0,
            "eligible_layers": layers - len(never), "layers": layers,
            "dense_reasons": sorted(set(fallbacks["reason"])) if len(fallbacks) else []}


def _gpu_us(fn, repeats: int) -> float:
    """Median GPU time (µs, CUDA events) of ``fn()`` over ``repeats`` calls after one warm-up call."""
    import torch

    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def _register_probe(repeats: int, dense_us: dict, sparse_us: dict) -> None:
    """Register :data:`PROBE_NAME`: an attention function that times its layer's attention dense and
    sparse on the layer's own tensors (into ``dense_us`` / ``sparse_us``, by layer) and returns the
    dense output."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from fp_patch.attention import Sparse, flashprefill_attention_forward, route
    from fp_patch.config import config_for_module

    def probe(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        def dense():
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)

        def sparse():
            return flashprefill_attention_forward(module, query, key, value, attention_mask, dropout, scaling,
                                                  **kwargs)

        layer = getattr(module, "layer_idx", None)
        dense_us[layer] = _gpu_us(dense, repeats)
        if isinstance(route(module, query, key, value, attention_mask, dropout, kwargs, config_for_module(module)),
                      Sparse):
            sparse_us[layer] = _gpu_us(sparse, repeats)
        return dense()

    AttentionInterface.register(PROBE_NAME, probe)
    AttentionMaskInterface.register(PROBE_NAME, sdpa_mask)


def _layer_times(model, ids, repeats: int) -> tuple[list, list]:
    """``(dense µs, sparse µs)`` per decoder layer from one probed forward pass (``None``: not sparse)."""
    import torch

    from fp_patch.config import is_decoder_attention

    layers = sorted(m.layer_idx for m in model.modules() if is_decoder_attention(m))
    dense_us, sparse_us = {}, {}
    _register_probe(repeats, dense_us, sparse_us)
    model.set_attn_implementation(PROBE_NAME)
    with torch.no_grad():
        model(input_ids=ids, logits_to_keep=1)
    return [dense_us.get(i) for i in layers], [sparse_us.get(i) for i in layers]
