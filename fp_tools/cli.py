"""``flashprefill`` command line: ``demo | bench | eval | calibrate | inspect``.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported only when their subcommand runs (``flashprefill --help`` loads torch and Transformers,
which ``import fp_patch`` needs to register itself, but no subcommand dependencies).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

SUBCOMMANDS = {
    "demo": ("fp_tools.demo", "answer a hidden-fact question on the embedded real model, sdpa vs flashprefill"),
    "bench": ("fp_tools.benchmark", "operator benchmark (dense SDPA flash/cuDNN vs FlashPrefill); "
              "with --ttft: time to first token of generate(), sdpa vs flashprefill"),
    "eval": ("fp_tools.evaluation.cli", "long-context accuracy suite, dense vs flashprefill"),
    "calibrate": ("fp_tools.calibration", "find the alpha that gives a target density"),
    "inspect": ("fp_tools.inspect_cli", "record and plot layer/head density for a local model and prompt"),
}


def _add_lazy_parser(sub, name: str, module: str, help_text: str, argv: list[str]):
    parser = sub.add_parser(name, help=help_text, description=help_text)
    # only the chosen subcommand's module is imported
    if name in argv:
        importlib.import_module(module).add_arguments(parser)
    return parser


def _module(name: str, argv: list[str]) -> str:
    if name == "bench" and "--ttft" in argv:
        return "fp_tools.ttft"
    return SUBCOMMANDS[name][0]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="flashprefill", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in SUBCOMMANDS.items():
        _add_lazy_parser(sub, name, _module(name, argv), help_text, argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    module = importlib.import_module(_module(args.command, argv))
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
