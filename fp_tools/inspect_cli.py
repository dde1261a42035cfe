"""``flashprefill inspect``: record FlashPrefill's layer/head density for any local model and prompt.

Loads a causal LM from a local folder with ``attn_implementation="flashprefill"``, runs the prefill
of a prompt file (or of its prefixes at several ``--lengths``) under
:func:`fp_patch.record_density`, prints the summary and writes to ``--out``:

* ``density.csv``: one row per (run, layer, head) — density, tokens, blocks, causal blocks
  (and ``rel_error`` with ``--error``);
* ``layers.csv``: one row per (run, layer), with the reason of every layer that ran dense;
* ``density_heatmap.png``, ``density_vs_length.png`` (with several lengths),
  ``block_map_L{layer}_H{head}.png`` for the sparsest head of each ``--block-maps`` layer and its
  densest head below 100 %,
  ``layer_error.png`` (with ``--error``).

Exit status 0, or 2 when the model, prompt or flags cannot be used.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fp_tools.cli_utils import HelpFormatter, add_device_arguments

    parser.formatter_class = HelpFormatter
    parser.add_argument("model", type=Path, help="local Hugging Face model folder (config.json + weights)")
    parser.add_argument("prompt", type=Path, help="UTF-8 text file with the prompt")
    parser.add_argument("--out", type=Path, default=Path("flashprefill-inspect"), help="folder for CSV and PNG")
    parser.add_argument(
        "--lengths",
        default=None,
        help="comma-separated prefix lengths in tokens, e.g. 2048,4096,8192 (default: whole prompt)",
    )
    parser.add_argument(
        "--max-tokens", type=int, default=None, help="cut the prompt to this many tokens (default: the model's context)"
    )
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    parser.add_argument("--alpha", type=float, default=None, help="threshold (default: per-model default)")
    parser.add_argument("--block-size", type=int, default=None, help="tokens per block (default 128)")
    parser.add_argument(
        "--min-sparse-len",
        type=int,
        default=None,
        help="shorter calls run dense (default 2048); lower it to inspect short prompts",
    )
    parser.add_argument("--dense-layers", default=None, help="comma-separated layers that stay dense")
    parser.add_argument(
        "--block-maps",
        default=None,
        help="comma-separated layers whose block maps are drawn (default: the middle layer); 'none' for no block maps",
    )
    parser.add_argument(
        "--error", action="store_true", help="also measure each sparse layer's relative L2 error against dense (slower)"
    )
    add_device_arguments(parser)
    parser.add_argument("--trust-remote-code", action="store_true", help="passed to from_pretrained")


def _say(text: str, err: bool = False) -> None:
    """Command-line output (this module is a CLI; library modules log instead)."""
    print(text, file=sys.stderr if err else sys.stdout)  # noqa: T201


def _int_list(text: str | None, flag: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers, got {text!r}") from None


def _load(args, device, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import fp_patch  # noqa: F401  (registers "flashprefill")

    if not (args.model / "config.json").exists():
        raise ValueError(f"{args.model} is not a Hugging Face model folder (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=dtype, attn_implementation="flashprefill", trust_remote_code=args.trust_remote_code
    )
    return model.to(device).eval(), tokenizer


def _prompt_ids(args, tokenizer, model):
    if not args.prompt.is_file():
        raise ValueError(f"prompt file {args.prompt} does not exist")
    text = args.prompt.read_text(encoding="utf-8")
    if args.chat:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
    else:
        ids = tokenizer(text).input_ids
    limit = args.max_tokens or getattr(model.config, "max_position_embeddings", None) or len(ids)
    return ids[:limit]


def run(args) -> int:
    import torch

    import fp_patch
    from fp_tools.cli_utils import backend_for, prefill_progress, resolve_device, resolve_dtype, save_recording

    try:
        lengths = _int_list(args.lengths, "--lengths")
        dense_layers = _int_list(args.dense_layers, "--dense-layers")
        maps = None if args.block_maps in (None, "none") else _int_list(args.block_maps, "--block-maps")
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        model, tokenizer = _load(args, device, dtype)
        ids = _prompt_ids(args, tokenizer, model)
        overrides = {"backend": backend_for(device)}
        for name, value in (
            ("alpha", args.alpha),
            ("block_size", args.block_size),
            ("min_sparse_len", args.min_sparse_len),
            ("dense_layers", dense_layers),
        ):
            if value is not None:
                overrides[name] = value
        cfg = fp_patch.configure(model, **overrides)
    except (ValueError, OSError, TypeError) as err:
        _say(f"error: {err}", err=True)
        return 2
    lengths = sorted(set(lengths)) if lengths else [len(ids)]
    too_long = [n for n in lengths if n > len(ids)]
    if too_long:
        _say(f"error: the prompt has {len(ids)} tokens, fewer than --lengths {too_long}", err=True)
        return 2
    n_layers = model.config.get_text_config().num_hidden_layers
    if args.block_maps is None:
        maps = [n_layers // 2]
    _say(
        f"{args.model.name}: {n_layers} layers on {device} ({str(dtype).replace('torch.', '')}); "
        f"alpha {cfg.alpha:g}, {cfg.block_size}-token blocks, min_sparse_len {cfg.min_sparse_len}; "
        f"prefill of {', '.join(map(str, lengths))} tokens"
    )
    with fp_patch.record_density(model, block_maps=maps or False, error=args.error) as rec:
        for n in lengths:
            batch = torch.tensor([ids[:n]], device=device)
            with torch.inference_mode(), prefill_progress(model, f"prefill {n} tokens"):
                model(input_ids=batch, logits_to_keep=1, use_cache=False)
    _say(rec.summary())
    written = save_recording(rec, args.out, map_layers=maps or [])
    _say("\nsaved: " + ", ".join(str(p) for p in written))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flashprefill inspect", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
