"""``flashprefill calibrate``: choose alpha for a model from measurements instead of by hand.

Three searches, all on the model's real forward passes over prompts of plain prose:

1. **Target density** (the paper's recipe: ~70 % of causal blocks computed at 4K). Block density
   falls as alpha grows, so alpha is found by a bracketed search on ``log10(alpha)``: bisection
   whose next point is the log-linear interpolation of the bracket ends, kept inside the middle 80 %
   of the bracket (a safeguarded regula falsi: the bracket shrinks every step, as in bisection, but
   usually in 3-5 forward passes rather than 10).
2. **Per layer** (``per_layer=True``): the same search for every sparse layer at once, each layer
   keeping its own bracket and reading its own density from the same forward passes.
3. **Accuracy-constrained** (``accuracy_tolerance``): the largest alpha whose accuracy on an eval
   suite stays within the tolerance (in points) of dense attention, by bisection between a known
   good alpha and ``alpha_max``, assuming accuracy does not rise with alpha. Its result is one
   alpha for every layer: it replaces the per-layer alphas of search 2.

The result is a :class:`fp_patch.FlashPrefillConfig` (``config.to_json(path)``,
``FlashPrefillConfig.from_json(path)``, ``fp_patch.configure(model, config)``), plus a JSON report
of every measurement.
"""

from __future__ import annotations

import json
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

ALPHA_MIN = 1e-6  # smallest alpha searched (0 is dense; real models need 1e-3..1e-4 for ~70 % at 4K)


# ----------------------------------------------------------------------------- pure searches


def _next_point(lo: float, hi: float, d_lo: float | None, d_hi: float | None, target: float) -> float:
    """Next log10(alpha) inside (lo, hi): interpolated when both ends are measured, kept in the middle 80 %."""
    mid = 0.5 * (lo + hi)
    if d_lo is None or d_hi is None or d_lo == d_hi:
        return mid
    t = (d_lo - target) / (d_lo - d_hi)
    return lo + min(0.9, max(0.1, t)) * (hi - lo)


def bisect_alpha(
    density_fn: Callable[[float], float],
    target: float,
    *,
    start: float = 0.1,
    alpha_min: float = ALPHA_MIN,
    alpha_max: float = 1.0,
    tol: float = 0.01,
    max_steps: int = 12,
) -> tuple[float, float, list[dict]]:
    """Alpha whose ``density_fn(alpha)`` is within ``tol`` of ``target`` (density falls with alpha).

    Measures ``start`` first, then steps by factors of 10 towards the target until it is bracketed
    (or ``alpha_min``/``alpha_max`` is reached), then narrows the bracket. ``max_steps`` bounds the
    number of ``density_fn`` calls. Returns ``(alpha, density, history)``: the measured alpha
    closest to the target (ties: the denser one), its density, and every ``{"alpha", "density"}``
    measured. When the target is out of reach the nearest end is returned (logged): ``alpha_max``
    when even it computes more than the target (at short lengths the always-kept sink/window blocks
    alone can exceed it), ``alpha_min`` when even that computes less.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target density must be in (0, 1], got {target!r}")
    if not 0.0 < alpha_min <= start <= alpha_max <= 1.0:
        raise ValueError(f"need 0 < alpha_min <= start <= alpha_max <= 1, got {alpha_min!r}, {start!r}, {alpha_max!r}")
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps!r}")
    history: list[dict] = []

    def measure(x: float, alpha: float | None = None) -> float:
        alpha = 10.0**x if alpha is None else alpha
        density = float(density_fn(alpha))
        history.append({"alpha": alpha, "density": density})
        logger.info("calibrate: alpha=%.5g -> density %.4f (target %.3f)", alpha, density, target)
        return density

    def result():
        h = min(history, key=lambda r: (abs(r["density"] - target), -r["density"]))
        return h["alpha"], h["density"], history

    x_min, x_max = math.log10(alpha_min), math.log10(alpha_max)
    x = math.log10(start)
    d = measure(x, start)
    lo = hi = d_lo = d_hi = None  # log10 alphas with density above / below the target
    # bracket: step a decade at a time towards the target
    while abs(d - target) > tol and len(history) < max_steps:
        if d > target:
            lo, d_lo = x, d
            if hi is not None or x >= x_max:
                break
            x = min(x + 1.0, x_max)
        else:
            hi, d_hi = x, d
            if lo is not None or x <= x_min:
                break
            x = max(x - 1.0, x_min)
        d = measure(x)
    if abs(d - target) <= tol:
        return result()
    if lo is None or hi is None:  # not bracketed: the target is out of reach, or the steps ran out
        if lo is None and x <= x_min:
            logger.warning("calibrate: density %.3f at alpha_min=%g is below the target %.3f", d, alpha_min, target)
        elif hi is None and x >= x_max:
            logger.warning("calibrate: density %.3f at alpha_max=%g is above the target %.3f", d, alpha_max, target)
        else:
            logger.warning("calibrate: stopped after max_steps=%d before bracketing the target %.3f (nearest "
                           "density %.3f)", max_steps, target, result()[1])
        return result()
    while len(history) < max_steps:
        x = _next_point(lo, hi, d_lo, d_hi, target)
        d = measure(x)
        if abs(d - target) <= tol:
            break
        if d > target:
            lo, d_lo = x, d
        else:
            hi, d_hi = x, d
    return result()


def bisect_layer_alphas(
    layer_density_fn: Callable[[Mapping[int, float]], Mapping[int, float]],
    target: float,
    layers: Sequence[int],
    *,
    alpha_min: float = ALPHA_MIN,
    alpha_max: float = 1.0,
    tol: float = 0.01,
    max_steps: int = 12,
    start: Mapping[int, float] | None = None,
) -> tuple[dict[int, float], dict[int, float], list[dict]]:
    """One alpha per layer, all searched together: ``layer_density_fn({layer: alpha})`` runs the model
    once with those alphas and returns ``{layer: density}``. Each layer keeps its own bracket.

    A layer's density also depends (weakly) on the layers below it; the search treats each layer
    on its own and stops once every layer is within ``tol`` or after ``max_steps`` passes. Returns
    ``(alphas, densities, history)`` with, for each layer, the measured alpha nearest its target.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target density must be in (0, 1], got {target!r}")
    layers = list(layers)
    if not layers:
        raise ValueError("no layers to calibrate (every layer is dense?)")
    lo = {i: math.log10(alpha_min) for i in layers}
    hi = {i: math.log10(alpha_max) for i in layers}
    d_lo: dict[int, float | None] = dict.fromkeys(layers)
    d_hi: dict[int, float | None] = dict.fromkeys(layers)
    start = start or {}
    middle = 10 ** (0.5 * (math.log10(alpha_min) + math.log10(alpha_max)))
    current = {i: math.log10(min(alpha_max, max(alpha_min, start.get(i, middle)))) for i in layers}
    history: list[dict] = []
    best: dict[int, tuple[float, float]] = {}
    for _ in range(max_steps):
        alphas = {i: 10.0 ** current[i] for i in layers}
        measured = layer_density_fn(alphas)
        history.append({"alphas": alphas, "densities": {i: float(measured[i]) for i in layers}})
        for i in layers:
            d = float(measured[i])
            if i not in best or (abs(d - target), -d) < (abs(best[i][1] - target), -best[i][1]):
                best[i] = (alphas[i], d)
            if d > target:
                lo[i], d_lo[i] = current[i], d
            else:
                hi[i], d_hi[i] = current[i], d
        if all(abs(best[i][1] - target) <= tol for i in layers):
            break
        current = {i: _next_point(lo[i], hi[i], d_lo[i], d_hi[i], target) for i in layers}
    return {i: best[i][0] for i in layers}, {i: best[i][1] for i in layers}, history


def largest_alpha_within(
    accuracy_fn: Callable[[float], float],
    floor: float,
    *,
    alpha_good: float,
    alpha_max: float = 1.0,
    steps: int = 5,
) -> tuple[float, list[dict]]:
    """Largest alpha in ``[alpha_good, alpha_max]`` with ``accuracy_fn(alpha) >= floor``.

    ``alpha_good`` is assumed to pass (it is measured too; if it fails it is still returned, with a
    warning). Bisection on ``log10(alpha)``, ``steps`` evaluations after the two ends.
    """
    history: list[dict] = []

    def passes(alpha: float) -> bool:
        acc = float(accuracy_fn(alpha))
        history.append({"alpha": alpha, "accuracy": acc, "passes": acc >= floor})
        logger.info("calibrate: alpha=%.5g -> accuracy %.2f (floor %.2f)", alpha, acc, floor)
        return acc >= floor

    if passes(alpha_max):
        return alpha_max, history
    if not passes(alpha_good):
        logger.warning("calibrate: even alpha=%g misses the accuracy floor %.2f", alpha_good, floor)
        return alpha_good, history
    lo, hi = math.log10(max(alpha_good, ALPHA_MIN)), math.log10(alpha_max)
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        if passes(10.0**mid):
            lo = mid
        else:
            hi = mid
    return 10.0**lo, history


# ----------------------------------------------------------------------------- model side


def calibration_prompts(tokenizer, length: int, count: int, *, seed: int = 0, haystack: str = "essays"):
    """``count`` prompts of exactly ``length`` tokens of prose (different offsets of the haystack)."""
    from fp_tools.evaluation.haystack import load_haystack

    hay = load_haystack(tokenizer, haystack)
    rng = random.Random(seed)
    return [hay.context(length, rng)[0] for _ in range(count)]


class DensityMeter:
    """Runs ``model`` (switched to ``"flashprefill"``) on fixed prompts and reads the block density.

    ``meter(config)`` -> ``(overall, {layer: density})``: overall = computed / causal blocks over
    every sparse layer, head and prompt; per layer the same within the layer.
    """

    def __init__(self, model, prompts: Sequence[Sequence[int]], progress: bool = False):
        self.model = model
        self.prompts = [list(p) for p in prompts]
        self.progress = progress  # a bar over the layers of each forward pass (after 2 s)
        self.passes = 0
        self.seconds = 0.0
        self._measured: dict = {}  # config -> result: a config the search already measured is not run again

    def __call__(self, config) -> tuple[float, dict[int, float]]:
        if config not in self._measured:
            self._measured[config] = self._measure(config)
        overall, per_layer = self._measured[config]
        return overall, dict(per_layer)

    def _measure(self, config) -> tuple[float, dict[int, float]]:
        import torch

        import fp_patch
        from fp_tools.cli_utils import prefill_progress

        fp_patch.configure(self.model, config)
        self.model.set_attn_implementation("flashprefill")
        device = next(self.model.parameters()).device
        start = time.perf_counter()
        with torch.inference_mode(), fp_patch.record_density(self.model) as rec:
            for i, prompt in enumerate(self.prompts):
                desc = f"calibrate pass {self.passes + i + 1}: alpha={config.alpha:.3g}"
                with prefill_progress(self.model, desc, progress=self.progress):
                    self.model(input_ids=torch.tensor([prompt], device=device), use_cache=False, logits_to_keep=1)
        self.passes += len(self.prompts)
        self.seconds += time.perf_counter() - start
        frame = rec.to_frame()
        if not len(frame):
            raise ValueError(
                "no layer ran sparse during calibration: the prompts are shorter than min_sparse_len "
                f"({config.min_sparse_len}) or every layer is in dense_layers; use a longer --length"
            )
        sums = frame.groupby("layer")[["blocks", "causal_blocks"]].sum()
        per_layer = {int(i): float(r["blocks"] / max(1, r["causal_blocks"])) for i, r in sums.iterrows()}
        return float(sums["blocks"].sum() / max(1, sums["causal_blocks"].sum())), per_layer


@dataclass
class CalibrationResult:
    """What :func:`calibrate` found; ``config`` is what to save and pass to ``fp_patch.configure``."""

    config: object  # FlashPrefillConfig
    target_density: float
    length: int
    prompts: int
    density: float
    layer_density: dict[int, float] = field(default_factory=dict)
    density_alpha: float | None = None  # alpha of the target-density search
    accuracy: dict | None = None
    history: dict = field(default_factory=dict)
    seconds: float = 0.0
    forward_passes: int = 0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["config"] = self.config.to_dict()
        out["layer_density"] = {str(k): v for k, v in self.layer_density.items()}
        return out

    def save(self, config_path, report_path=None) -> None:
        """Write the config JSON (loadable by ``FlashPrefillConfig.from_json``) and the report JSON."""
        self.config.to_json(config_path)
        if report_path is not None:
            Path(report_path).write_text(json.dumps(self.to_dict(), indent=1, default=str) + "\n", encoding="utf-8")


def calibrate(
    model,
    tokenizer,
    *,
    target_density: float = 0.7,
    length: int = 4096,
    prompts: int = 2,
    per_layer: bool = False,
    base=None,
    tol: float = 0.01,
    max_steps: int = 12,
    seed: int = 0,
    haystack: str = "essays",
    accuracy_tolerance: float | None = None,
    accuracy_suite=None,
    accuracy_steps: int = 4,
    alpha_max: float = 1.0,
    progress: bool = True,
) -> CalibrationResult:
    """Calibrate FlashPrefill's alpha on ``model`` (see the module docstring for the searches).

    ``base`` (a ``FlashPrefillConfig``; default: the per-model defaults) supplies every other knob.
    With ``accuracy_tolerance`` (points), ``accuracy_suite`` (a dataset from
    :func:`fp_tools.evaluation.build_suite`) is run dense once and then at growing alphas, at most
    ``accuracy_steps`` bisection steps between the density search's alpha and ``alpha_max``; the
    result is then one global alpha, the largest within the tolerance: per-layer alphas from
    ``per_layer`` are dropped, since one alpha for every layer is what the suite validated.
    ``alpha_max`` (in (0, 1]) bounds every search. ``progress``: a bar (stderr) over the layers of
    every forward pass that takes more than 2 s; each step is also logged at INFO.
    """
    import fp_patch

    _check_search_bounds(alpha_max, accuracy_steps)
    if per_layer and accuracy_tolerance is not None:
        logger.warning("calibrate: the accuracy search replaces the per-layer alphas by one alpha for every layer")
    if base is None:
        base = fp_patch.model_defaults(model.config)
    original = getattr(model.config, "_attn_implementation", None)
    started = time.perf_counter()
    meter = DensityMeter(model, calibration_prompts(tokenizer, length, prompts, seed=seed, haystack=haystack),
                         progress=progress)
    history: dict = {}
    try:
        alpha, density, history["density"] = bisect_alpha(
            lambda a: meter(base.replace(alpha=a, layer_alpha={}))[0],
            target_density, start=min(base.alpha, alpha_max) or alpha_max, tol=tol, max_steps=max_steps,
            alpha_max=alpha_max,
        )
        config = base.replace(alpha=alpha, layer_alpha={})
        density, layer_density = meter(config)
        if per_layer:
            layer_alpha, _, history["per_layer"] = bisect_layer_alphas(
                lambda alphas: meter(config.replace(layer_alpha=alphas))[1],
                target_density, sorted(layer_density), tol=tol, max_steps=max_steps, alpha_max=alpha_max,
                start=dict.fromkeys(layer_density, alpha),
            )
            config = config.replace(layer_alpha=layer_alpha)
            density, layer_density = meter(config)
        accuracy = None
        if accuracy_tolerance is not None:
            if accuracy_suite is None:
                raise ValueError("accuracy_tolerance needs accuracy_suite (a dataset from build_suite)")
            accuracy = _accuracy_search(model, tokenizer, accuracy_suite, config, accuracy_tolerance,
                                        accuracy_steps, alpha_max)
            history["accuracy"] = accuracy.pop("history")
            config = config.replace(alpha=accuracy["alpha"], layer_alpha={})  # what the suite validated
            density, layer_density = meter(config)
    finally:
        if original is not None:
            model.set_attn_implementation(original)
    return CalibrationResult(
        config=config, target_density=target_density, length=length, prompts=prompts, density=density,
        layer_density=layer_density, density_alpha=alpha, accuracy=accuracy, history=history,
        seconds=time.perf_counter() - started, forward_passes=meter.passes,
    )


def _check_search_bounds(alpha_max: float, accuracy_steps: int) -> None:
    if not ALPHA_MIN < alpha_max <= 1.0:
        raise ValueError(f"alpha_max must be in ({ALPHA_MIN:g}, 1], got {alpha_max!r}")
    if isinstance(accuracy_steps, bool) or not isinstance(accuracy_steps, int) or accuracy_steps < 0:
        raise ValueError(f"accuracy_steps must be an integer >= 0, got {accuracy_steps!r}")


def _accuracy_search(model, tokenizer, suite, config, tolerance, steps, alpha_max) -> dict:
    import tempfile

    from fp_tools.evaluation.runner import Implementation, evaluate

    def accuracy(impl: Implementation) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            records = evaluate(model, tokenizer, suite, [impl], tmp, progress=False)
        return 100.0 * sum(r["score"] for r in records) / len(records)

    cfg_dir = tempfile.mkdtemp(prefix="fp-calibrate-")

    def sparse_accuracy(alpha: float) -> float:
        path = Path(cfg_dir) / f"alpha-{alpha:.6g}.json"
        config.replace(alpha=alpha, layer_alpha={}).to_json(path)
        return accuracy(Implementation("flashprefill", (("config", str(path)),), f"flashprefill@{alpha:.4g}"))

    dense = accuracy(Implementation("sdpa", (), "sdpa"))
    floor = dense - tolerance
    alpha, history = largest_alpha_within(sparse_accuracy, floor, alpha_good=config.alpha, alpha_max=alpha_max,
                                          steps=steps)
    return {"alpha": alpha, "dense_accuracy": dense, "tolerance": tolerance, "floor": floor, "history": history}


# ----------------------------------------------------------------------------- command line


def add_arguments(parser) -> None:
    from fp_tools.evaluation.cli import add_model_arguments

    add_model_arguments(parser)
    parser.add_argument("--target-density", type=float, default=0.7,
                        help="fraction of causal blocks to compute at --length (paper: ~0.7 at 4K)")
    parser.add_argument("--length", default="4K", help="reference prompt length in tokens (e.g. 4096 or 4K)")
    parser.add_argument("--prompts", type=int, default=2, help="prose prompts measured per step")
    parser.add_argument("--tol", type=float, default=0.01, help="stop when the density is within this of the target")
    parser.add_argument("--max-steps", type=int, default=12, help="most search steps")
    parser.add_argument("--per-layer", action="store_true", help="also search one alpha per layer")
    parser.add_argument("--base-config", default=None, help="JSON FlashPrefillConfig for every other knob")
    parser.add_argument("--backend", default=None, choices=["auto", "triton", "reference"],
                        help="FlashPrefill backend (default: the config's)")
    parser.add_argument("--haystack", default="essays", choices=["essays", "noise"], help="prompt text")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alpha-max", type=float, default=1.0,
                        help="largest alpha any search tries (default 1.0; alpha 0 is dense, larger is sparser)")
    parser.add_argument("--accuracy-tolerance", type=float, default=None,
                        help="also find the largest alpha whose eval accuracy is within this many points of dense; "
                             "the result is then ONE alpha for every layer (it replaces the --per-layer alphas)")
    parser.add_argument("--accuracy-steps", type=int, default=4,
                        help="bisection steps of the --accuracy-tolerance search, each one eval of the suite "
                             "(after the dense run and the two ends)")
    parser.add_argument("--accuracy-lengths", default="4K", help="eval lengths for --accuracy-tolerance")
    parser.add_argument("--accuracy-tasks", default="niah_single,niah_multivalue",
                        help="eval tasks for --accuracy-tolerance (comma separated)")
    parser.add_argument("--accuracy-depths", default="0.1,0.5,0.9", help="needle depths for --accuracy-tolerance")
    parser.add_argument("--accuracy-samples", type=int, default=1, help="samples per cell for --accuracy-tolerance")
    speed = parser.add_argument_group("speed calibration (--speed, on a CUDA GPU)")
    speed.add_argument("--speed", action="store_true",
                       help="instead of the density search: time the model on prose prompts of --lengths and save "
                            "the settings measured fastest (which lengths and layers run sparse)")
    speed.add_argument("--lengths", default=None,
                       help="--speed: prompt lengths, e.g. 2K,4K,8K (default: 1K, 2K, 4K, 8K, ... up to the "
                            "model's context)")
    speed.add_argument("--repeats", type=int, default=5, help="--speed: timed calls per setting and length")
    parser.add_argument("--out", default="flashprefill-calibrated.json", help="where to write the config JSON")
    parser.add_argument("--report", default=None,
                        help="report JSON (default: <out>.report.json; with --speed the measurement table, "
                             "<out>.speed.json)")


SPEED_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)


def check(args):
    """Every flag, before the model loads (:class:`fp_tools.args.UsageError`); returns the model's facts."""
    from fp_tools.args import (
        UsageError,
        check_device,
        check_file,
        check_lengths,
        check_range,
        model_facts,
        parse_floats,
        parse_length,
        parse_lengths,
    )
    from fp_tools.evaluation.cli import parse_tasks

    facts = model_facts(args.model)
    check_device(args.device)
    out = Path(args.out)
    if out.is_dir() or not out.parent.is_dir():
        raise UsageError(f"--out: expected a JSON file path in an existing folder, got {args.out}")
    if args.base_config is not None:
        check_file(args.base_config, "--base-config", "config file")
        from fp_patch.config import FlashPrefillConfig

        try:
            FlashPrefillConfig.from_json(args.base_config)
        except (OSError, ValueError, TypeError) as err:
            raise UsageError(f"--base-config {args.base_config}: {err}") from None
    if args.speed:
        import torch

        given = [flag for flag, on in (("--per-layer", args.per_layer),
                                       ("--accuracy-tolerance", args.accuracy_tolerance is not None)) if on]
        if given:
            raise UsageError(f"{', '.join(given)}: not with --speed (it measures speed, not density or accuracy)")
        if args.lengths is None:
            args.lengths = [n for n in SPEED_LENGTHS if facts.context is None or n < facts.context]
        else:
            args.lengths = parse_lengths(args.lengths)
        check_lengths(args.lengths, facts, "--lengths", extra=1, extra_what="generated token")
        check_range(args.repeats, "--repeats", 1)
        if not torch.cuda.is_available() or not str(args.device).startswith("cuda"):
            raise UsageError("--speed measures on a CUDA GPU" + (
                "; this machine has none" if not torch.cuda.is_available() else f", not --device {args.device}"))
        return facts
    if args.lengths is not None:
        raise UsageError("--lengths: only with --speed; the density search uses one --length")
    args.length = parse_length(args.length, "--length")
    check_lengths([args.length], facts, "--length")
    check_range(args.target_density, "--target-density", 0.0, 1.0, lo_open=True)
    check_range(args.prompts, "--prompts", 1)
    check_range(args.tol, "--tol", 0.0, lo_open=True)
    check_range(args.max_steps, "--max-steps", 1)
    try:
        _check_search_bounds(args.alpha_max, args.accuracy_steps)
    except ValueError as err:
        raise UsageError(str(err).replace("alpha_max", "--alpha-max").replace("accuracy_steps", "--accuracy-steps")
                         ) from None
    if args.accuracy_tolerance is not None:
        check_range(args.accuracy_tolerance, "--accuracy-tolerance", 0.0)
        args.accuracy_tasks = parse_tasks(args.accuracy_tasks, "--accuracy-tasks")
        args.accuracy_lengths = parse_lengths(args.accuracy_lengths, "--accuracy-lengths")
        check_lengths(args.accuracy_lengths, facts, "--accuracy-lengths", extra=48, extra_what="answer tokens")
        args.accuracy_depths = parse_floats(args.accuracy_depths, "--accuracy-depths", 0.0, 1.0)
        check_range(args.accuracy_samples, "--accuracy-samples", 1)
    return facts


def run(args) -> int:
    from fp_patch.config import FlashPrefillConfig, model_defaults
    from fp_tools.evaluation.cli import load_model
    from fp_tools.evaluation.tasks import build_suite

    check(args)  # before the model loads
    progress = getattr(args, "progress", True)
    model, tokenizer, model_name = load_model(args.model, args.device, args.dtype, progress)
    base = (FlashPrefillConfig.from_json(args.base_config) if args.base_config
            else model_defaults(model.config))
    if args.backend:
        base = base.replace(backend=args.backend)
    if args.speed:
        return run_speed(args, model, tokenizer, base, progress)
    suite = None
    if args.accuracy_tolerance is not None:
        suite = build_suite(
            tokenizer, tasks=args.accuracy_tasks, lengths=args.accuracy_lengths,
            depths=args.accuracy_depths, samples=args.accuracy_samples,
            seed=args.seed, haystack=args.haystack,
        )
    result = calibrate(
        model, tokenizer, target_density=args.target_density, length=args.length,
        prompts=args.prompts, per_layer=args.per_layer, base=base, tol=args.tol, max_steps=args.max_steps,
        seed=args.seed, haystack=args.haystack, accuracy_tolerance=args.accuracy_tolerance, accuracy_suite=suite,
        accuracy_steps=args.accuracy_steps, alpha_max=args.alpha_max, progress=progress,
    )
    report = args.report or str(Path(args.out).with_suffix("")) + ".report.json"
    result.history["model"] = model_name
    result.save(args.out, report)
    sys.stdout.write(
        f"calibrated alpha={result.config.alpha:.4g}: density {result.density:.3f} at {result.length} tokens "
        f"(target {result.target_density:.2f}), {result.forward_passes} forward passes in {result.seconds:.0f} s\n"
        f"config: {args.out}\nreport: {report}\n"
    )
    return 0


def run_speed(args, model, tokenizer, base, progress: bool) -> int:
    """``calibrate --speed``: :func:`fp_tools.speed_calibration.calibrate_speed` on one prose prompt per
    length (the density search's prompt builder); writes ``result.apply(base)`` and the measurements."""
    import torch

    from fp_tools.speed_calibration import calibrate_speed

    device = next(model.parameters()).device
    prompts = {
        n: torch.tensor([calibration_prompts(tokenizer, n, 1, seed=args.seed, haystack=args.haystack)[0]],
                        device=device)
        for n in args.lengths
    }
    result = calibrate_speed(model, prompts, repeats=args.repeats, progress=progress)
    config = result.apply(base)
    config.to_json(args.out)
    report = args.report or str(Path(args.out).with_suffix("")) + ".speed.json"
    Path(report).write_text(json.dumps(result.to_dict(), indent=1, default=str) + "\n", encoding="utf-8")
    sys.stdout.write(
        f"speed-calibrated on {', '.join(map(str, args.lengths))} tokens: min_sparse_len {config.min_sparse_len}, "
        f"dense layers {list(config.dense_layers)}\nconfig: {args.out}\nmeasurements: {report}\n"
    )
    return 0
