"""``flashprefill bench``: the operator benchmark (:mod:`fp_tools.benchmark`) or, with ``--ttft``, the
time to first token of ``generate()`` (:mod:`fp_tools.ttft`).

This module only defines and checks the flags (import-light: ``--help`` never imports torch); the
benchmarks are imported when they run. Both need a CUDA GPU, except ``--ttft --device cpu`` (a dry run
whose timings mean nothing).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fp_tools.args import HelpFormatter, UsageError, check_range, model_facts, parse_lengths

OPERATOR_LENGTHS = [4096, 8192, 16384, 32768, 65536, 131072]
TTFT_LENGTHS = [4096, 8192, 16384, 32768]
TTFT_MODELS = ("smollm2", "llama8b", "qwen2.5-7b", "qwen3moe")  # fp_tools.ttft.MODELS (tests/tools/test_cli.py checks)
# the random-weight shapes are built with this context (fp_tools.ttft.build_random)
RANDOM_MODEL_CONTEXT = 262144
# tokens generated after a needle prompt (the answer check of fp_tools.ttft.run_lengths)
ANSWER_TOKENS = 24
OPERATOR_ONLY = {"heads": 32, "kv_heads": 8, "head_dim": 128}


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = HelpFormatter
    parser.add_argument("--ttft", action="store_true", help="time generate() end to end instead of the operator")
    parser.add_argument("--lengths", nargs="*", default=None, metavar="N",
                        help="prompt lengths, e.g. 4K 32K or 4096,32768 (default: 4K .. 128K for the operator, "
                             "4K .. 32K with --ttft)")
    parser.add_argument("--alpha", type=float, default=None,
                        help="threshold in [0, 1] (default: 0.18 for the operator; the model's published alpha "
                             "with --ttft)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON results (default: bench_operator.json, or bench_ttft.json and .md beside it)")
    op = parser.add_argument_group("operator benchmark (without --ttft)")
    op.add_argument("--heads", type=int, default=None, help="query heads (default 32)")
    op.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default 8)")
    op.add_argument("--head-dim", type=int, default=None, help="head dimension: 64, 80, 96, 128 or 256 (default 128)")
    add_ttft_arguments(parser.add_argument_group("time to first token (with --ttft)"))


def add_ttft_arguments(group) -> None:
    """The flags of :func:`fp_tools.ttft.run` (besides ``--lengths``, ``--alpha`` and ``--out``)."""
    group.add_argument("--model", choices=TTFT_MODELS, default="smollm2",
                       help="smollm2: the embedded real model; the others: random weights of that shape")
    group.add_argument("--densities", type=float, nargs="*", default=[],
                       help="extra rows at these fixed densities (alpha=1.0 with the min_budget that gives them), "
                            "e.g. 0.05 0.2")
    group.add_argument("--layers", type=int, default=None, help="random models: keep the first N layers")
    group.add_argument("--repeats", type=_positive, default=3, help="timed calls per variant and length")
    group.add_argument("--warmup", type=_positive, default=1,
                       help="calls per variant reported apart before the timed ones (default: the first)")
    group.add_argument("--min-sparse-len", type=int, default=None,
                       help="shorter prompts run dense (default: the model's, fp_patch.MODEL_DEFAULTS)")
    group.add_argument("--ten-lengths", default=None, metavar="L",
                       help="also time ten prompts of ten lengths near L against ten of length L")
    group.add_argument("--profile", action="store_true", help="split one prefill's GPU time by kernel group")
    group.add_argument("--only", nargs="*", default=[], metavar="LABEL",
                       help="run only these rows besides sdpa, e.g. 'flashprefill @20%% fixed'")
    group.add_argument("--device", default="cuda", help="cuda, cuda:1 ..., or cpu for a dry run")


def check(args) -> None:
    """Fill the mode's defaults and check every flag (:class:`UsageError`); run before anything loads."""
    import torch

    mode = "--ttft" if args.ttft else "the operator benchmark"
    if args.lengths is None:
        args.lengths = list(TTFT_LENGTHS if args.ttft else OPERATOR_LENGTHS)
    else:  # an empty --lengths is allowed with --ttft --ten-lengths L (that run only)
        args.lengths = parse_lengths(args.lengths)
        if not args.lengths and not (args.ttft and args.ten_lengths):
            raise UsageError("--lengths: give at least one length, e.g. --lengths 4K 8K")
    check_range(args.alpha, "--alpha", 0.0, 1.0)
    if args.ttft:
        given = [f"--{k.replace('_', '-')}" for k in OPERATOR_ONLY if getattr(args, k) is not None]
        if given:
            raise UsageError(f"{', '.join(given)}: operator benchmark flags; --ttft takes a model (--model)")
        args.out = args.out or Path("bench_ttft.json")
        args.ten_lengths = parse_lengths(args.ten_lengths, "--ten-lengths")[0] if args.ten_lengths else None
        if args.model == "smollm2":
            facts = model_facts("smollm2")
            context, extra = facts.context, ANSWER_TOKENS
        else:
            context, extra = RANDOM_MODEL_CONTEXT, 1
        for flag, values in (("--lengths", args.lengths), ("--ten-lengths", [args.ten_lengths or 0])):
            too_long = [n for n in values if n + extra > context]
            if too_long:
                raise UsageError(f"{flag} {too_long}: {args.model}'s context is {context} tokens, {extra} of them "
                                 f"for generated tokens; use at most {context - extra}")
        for d in args.densities:
            check_range(d, "--densities", 0.0, 1.0, lo_open=True)
        check_range(args.layers, "--layers", 1)
        check_range(args.min_sparse_len, "--min-sparse-len", 1)
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError("--ttft measures on a CUDA GPU and this machine has none; --device cpu runs a dry run "
                             "(timings mean nothing there)")
    else:
        ttft_only = {"--model": args.model != "smollm2", "--densities": bool(args.densities),
                     "--layers": args.layers is not None, "--ten-lengths": args.ten_lengths is not None,
                     "--profile": args.profile, "--only": bool(args.only), "--device": args.device != "cuda"}
        given = [flag for flag, set_ in ttft_only.items() if set_]
        if given:
            raise UsageError(f"{', '.join(given)}: only with --ttft")
        for key, default in OPERATOR_ONLY.items():
            value = getattr(args, key)
            setattr(args, key, default if value is None else value)
            check_range(getattr(args, key), f"--{key.replace('_', '-')}", 1)
        if args.heads % args.kv_heads:
            raise UsageError(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads} (GQA)")
        from fp_kernels.validation import SUPPORTED_HEAD_DIMS

        if args.head_dim not in SUPPORTED_HEAD_DIMS:
            supported = ", ".join(map(str, SUPPORTED_HEAD_DIMS))
            raise UsageError(f"--head-dim {args.head_dim}: the kernels support {supported}")
        args.alpha = 0.18 if args.alpha is None else args.alpha
        args.out = args.out or Path("bench_operator.json")
        if not torch.cuda.is_available():
            raise UsageError(f"{mode} measures on a CUDA GPU and this machine has none")
    if not args.out.parent.is_dir():
        raise UsageError(f"--out: folder {args.out.parent} does not exist")


def run(args) -> int:
    check(args)
    if args.ttft:
        from fp_tools import ttft

        return ttft.run(args)
    from fp_tools import benchmark

    return benchmark.run(args)
