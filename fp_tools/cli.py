"""``flashprefill`` command line: ``demo | bench | eval | calibrate | inspect``.

Each subcommand lives in a module exposing ``add_arguments(parser)`` and ``run(args) -> int``; those
modules are import-light (torch, Transformers and ``fp_patch`` are imported inside ``run``), so
parsing and ``--help`` never import torch. Every subcommand checks its flags before it loads a model:
a mistake ends with exit status 2 and one line that says what to do (:class:`fp_tools.args.UsageError`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys

from fp_tools.args import UsageError

SUBCOMMANDS = {
    "demo": ("fp_tools.demo", "answer a hidden-fact question on the embedded real model, sdpa vs flashprefill"),
    "bench": ("fp_tools.bench", "operator benchmark (dense SDPA flash/cuDNN vs FlashPrefill); "
              "with --ttft: time to first token of generate(), sdpa vs flashprefill"),
    "eval": ("fp_tools.evaluation.cli", "long-context accuracy suite, dense vs flashprefill"),
    "calibrate": ("fp_tools.calibration", "find the alpha that gives a target density (--speed: the settings "
                  "measured fastest on a GPU)"),
    "inspect": ("fp_tools.inspect_cli", "record and plot layer/head density for a model and prompt"),
}
EPILOG = ("Progress and status lines go to stderr (-q: only warnings and errors; -v: every log message). "
          "Troubleshooting: docs/troubleshooting.md")


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage block) with a pointer to ``--help``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Formatter(logging.Formatter):
    """Plain INFO lines (status messages); level and logger for the rest."""

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno == logging.INFO:
            return record.getMessage()
        return f"{record.levelname} {record.name}: {record.getMessage()}"


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser; only the chosen subcommand's arguments are added (its module is light anyway)."""
    parser = Parser(prog="flashprefill", description=__doc__.splitlines()[0], epilog=EPILOG)
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("-v", "--verbose", action="store_true", help="log every INFO message")
    noise.add_argument("-q", "--quiet", action="store_true", help="no progress bars or status lines")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text, epilog=EPILOG)
        if name in argv:
            importlib.import_module(module).add_arguments(sub_parser)
    return parser


def _setup_logging(verbose: bool, quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    # status lines of the tools and the one-time model conversion are shown unless -q
    for name in ("fp_tools", "fp_patch.models"):
        logging.getLogger(name).setLevel(logging.WARNING if quiet else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    args.progress = not args.quiet
    _setup_logging(args.verbose, args.quiet)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    from tqdm.contrib.logging import logging_redirect_tqdm

    redirect = logging_redirect_tqdm() if args.progress else contextlib.nullcontext()
    try:
        with redirect:
            return int(module.run(args) or 0)
    except UsageError as err:
        print(f"flashprefill {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
