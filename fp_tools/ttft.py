"""Time to first token: ``generate(max_new_tokens=1)`` with "sdpa" and "flashprefill" in one run.

``flashprefill bench --ttft`` and ``benchmarks/bench_ttft.py`` run this::

    flashprefill bench --ttft --model smollm2 --lengths 4096 8192 16384 32768
    flashprefill bench --ttft --model llama8b --lengths 8192 32768 131072 --densities 0.05 0.2
    flashprefill bench --ttft --model qwen3moe --layers 24 --lengths 8192 32768
    flashprefill bench --ttft --model llama8b --ten-lengths 30000 --lengths
    flashprefill bench --ttft --model llama8b --profile --lengths 32768 131072

Models: ``smollm2`` is the embedded real model (needle prompts over real prose: each
implementation's answer is checked). ``llama8b`` (Llama-3.1-8B: 32 layers, 32/8 heads, D=128),
``qwen2.5-7b`` (28 layers, 28/4 heads, D=128) and ``qwen3moe`` (Qwen3-30B-A3B: 48 layers, 32/4 heads,
D=128, 128 experts, 8 active; ``--layers`` keeps the first N layers, stated in the results) have
random weights, built on the GPU: their attention is near uniform, so selection keeps almost every
block; that density is reported as measured.

Rows per length: ``sdpa``; ``flashprefill`` (the model's settings: real selection at its alpha);
``flashprefill @X% fixed`` for each ``--densities`` X: the real operator with ``alpha=1.0`` and
``min_budget`` solved for X (:func:`fp_patch.budget.budget_for_density`), so the real selection runs
with its real cost on every call and keeps about X of the blocks. Which calls run sparse depends on
the prompt length and the settings only (``min_sparse_len``, the model's default unless
``--min-sparse-len`` is given). Every flashprefill row runs one more, recorded, prefill with exactly
the same settings and reports the density it computed and its path (how many attention layers ran
sparse); a row whose prompt is at least ``min_sparse_len`` but where a layer ran dense is flagged.
The first call of each variant (kernel compilation) is reported apart from the steady state (median
of ``--repeats`` calls); ``--warmup N`` reports the first N apart. ``--ten-lengths L`` times ten
prompts of ten different lengths near ``L`` against ten of one length. ``--profile`` splits the GPU
time of one prefill into index building, sparse attention, dense attention and the rest.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import time

import torch

from .provenance import git_commit

logger = logging.getLogger(__name__)

MODELS = ("smollm2", "llama8b", "qwen2.5-7b", "qwen3moe")


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def ttft(model, inputs: dict, repeats: int) -> tuple[float, float, list[float]]:
    """(first call, median of the next ``repeats``, all of them) of generate(max_new_tokens=1), in s.

    Python's garbage collector is held off while a call is timed (as ``timeit`` does): a full
    collection lands on whichever call happens to trigger it and costs tens of milliseconds."""
    times = []
    for _ in range(repeats + 1):
        _sync()
        gc_was_on = gc.isenabled()
        gc.disable()
        try:
            start = time.perf_counter()
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
            _sync()
            times.append(time.perf_counter() - start)
        finally:
            if gc_was_on:
                gc.enable()
    return times[0], statistics.median(times[1:]) if repeats else times[0], times


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile) of ``values`` (all three the value itself for one)."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def build_random(name: str, layers: int | None, device: str):
    """A random-weight model of the named shape, built directly on ``device`` in bfloat16."""
    import transformers
    from transformers import AutoModelForCausalLM

    if name == "llama8b":
        config = transformers.LlamaConfig(
            hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers or 32, num_attention_heads=32,
            num_key_value_heads=8, vocab_size=128256, max_position_embeddings=262144, rope_theta=500000.0,
        )
    elif name == "qwen2.5-7b":
        config = transformers.Qwen2Config(
            hidden_size=3584, intermediate_size=18944, num_hidden_layers=layers or 28, num_attention_heads=28,
            num_key_value_heads=4, vocab_size=152064, max_position_embeddings=262144, rope_theta=1000000.0,
        )
    elif name == "qwen3moe":
        config = transformers.Qwen3MoeConfig(
            hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=layers or 48,
            num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
            vocab_size=151936, max_position_embeddings=262144, rope_theta=1000000.0, decoder_sparse_step=1,
        )
    else:
        raise ValueError(f"unknown random model {name!r}; choose from {MODELS[1:]}")
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model.eval()


KERNEL_GROUPS = (
    ("index: pool + select", ("_pool_keys_kernel", "_select_blocks_kernel")),
    ("sparse attention", ("_sparse_attention_kernel",)),
    ("dense attention (SDPA)", ("flash", "fmha", "cudnn", "attention", "sdpa")),
)


def profile_prefill(model, inputs: dict) -> dict:
    """GPU time of one prefill forward, split by kernel group (torch.profiler), in ms; beside it the
    wall time of an unprofiled forward (the gap to ``total`` is the GPU waiting for the host)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        model(**inputs, logits_to_keep=1)  # warm
        _sync()
        start = time.perf_counter()
        model(**inputs, logits_to_keep=1)  # unprofiled: wall time, GPU idle included
        _sync()
        wall_ms = (time.perf_counter() - start) * 1e3
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(**inputs, logits_to_keep=1)
            _sync()
    times = []
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None)
        if device_us is None:
            device_us = getattr(event, "cuda_time_total", 0.0)
        if device_us and not event.key.startswith(("aten::", "cuda")):
            times.append((event.key, device_us / 1e3))
    groups = group_kernel_times(times)
    groups["forward wall (unprofiled)"] = wall_ms
    return groups


def group_kernel_times(times: list[tuple[str, float]]) -> dict:
    """Sum ``(kernel name, ms)`` pairs into :data:`KERNEL_GROUPS` (first match wins) and the rest."""
    groups = {name: 0.0 for name, _ in KERNEL_GROUPS}
    groups["rest of the model"] = 0.0
    for key, ms in times:
        name = key.lower()
        group = next((g for g, needles in KERNEL_GROUPS if any(n in name for n in needles)), "rest of the model")
        groups[group] += ms
    groups["total"] = sum(groups.values())
    return groups


def prompt_inputs(model, tokenizer, length: int, device: str, seed: int = 0):
    """``(inputs, needle number)``: a needle prompt with a tokenizer, else random ids (seeded by length)."""
    if tokenizer is not None:
        from fp_tools.demo import needle_prompt

        prompt = needle_prompt(tokenizer, length)
        return {k: v.to(device) for k, v in prompt["inputs"].items()}, prompt["number"]
    vocab = model.config.vocab_size
    gen = torch.Generator(device=device).manual_seed(seed + length)
    return {"input_ids": torch.randint(0, vocab, (1, length), device=device, generator=gen)}, None


def checked_pass(model, inputs) -> dict:
    """One recorded prefill with the model's current settings (the same routes and kernels as an
    unrecorded one): ``density`` (blocks computed over causal blocks of the sparse layers, ``None``
    when none ran sparse), ``sparse_layers`` (attention layers that ran sparse), ``layers`` (decoder
    attention layers) and ``dense_reasons`` (why the others ran dense)."""
    import fp_patch
    from fp_patch.config import is_decoder_attention

    with torch.no_grad(), fp_patch.record_density(model) as rec:
        model(**inputs, logits_to_keep=1)
    frame = rec.to_frame()
    density = rec.density()
    fallbacks = rec.fallback_frame()
    return {
        "density": None if density != density else density,
        "sparse_layers": int(frame["layer"].nunique()) if len(frame) else 0,
        "layers": sum(is_decoder_attention(m) for m in model.modules()),
        "dense_reasons": sorted(set(fallbacks["reason"])) if len(fallbacks) else [],
    }


def path_text(row: dict) -> str:
    """``"sparse 32/32 layers"``, ``"dense (short_query)"`` or ``"-"`` (sdpa)."""
    if row.get("layers") is None:
        return "-"
    if not row["sparse_layers"]:
        return "dense (" + ", ".join(row["dense_reasons"]) + ")"
    return f"sparse {row['sparse_layers']}/{row['layers']} layers"


def _variants(densities: list[float]):
    """(impl, label, fixed density) of one length."""
    yield "sdpa", "sdpa", None
    yield "flashprefill", "flashprefill", None
    for d in densities:
        yield "flashprefill", f"flashprefill @{d:.0%} fixed", d


def variant_settings(defaults, alpha: float, min_sparse_len: int, density: float | None, length: int):
    """The settings of a flashprefill row: the model's at ``alpha``, or for a fixed ``density``
    ``alpha=1.0`` and the ``min_budget`` that gives it at ``length`` tokens."""
    from fp_patch.budget import budget_for_density

    cfg = defaults.replace(alpha=alpha, min_sparse_len=min_sparse_len)
    if density is None:
        return cfg
    budget = budget_for_density(length, density, cfg)
    return cfg.replace(alpha=1.0, min_budget=budget)


def run_lengths(model, tokenizer, args, log=print, rows: list | None = None, on_row=None) -> list[dict]:
    """One row per (length, variant), appended to ``rows``; ``on_row()`` after each (saves partial results).

    The variants of one length take turns call by call (first calls, then ``repeats`` rounds; each
    round starts one variant further on, so none always runs right after the same other). A drift of
    the GPU clock or of the host over the run touches all of them alike, and the speed-up is also
    given per round (``speedup_paired``: median and quartiles of ``sdpa / variant`` over the rounds),
    which cancels the drift between rounds that the ratio of medians still carries. After the timed
    calls each flashprefill row runs :func:`checked_pass` with the very same settings.
    """
    import fp_patch

    rows = [] if rows is None else rows
    defaults = fp_patch.model_defaults(model.config)
    alpha = args.alpha if args.alpha is not None else defaults.alpha
    min_sparse_len = args.min_sparse_len if args.min_sparse_len is not None else defaults.min_sparse_len
    variants = [v for v in _variants(args.densities) if v[1] == "sdpa" or not args.only or v[1] in args.only]
    commit = getattr(args, "commit", None) or git_commit()

    for length in args.lengths:
        inputs, number = prompt_inputs(model, tokenizer, length, args.device)
        tokens = int(inputs["input_ids"].shape[1])
        settings = {label: variant_settings(defaults, alpha, min_sparse_len, density, tokens)
                    for impl, label, density in variants if impl == "flashprefill"}

        times: dict[str, list[float]] = {v[1]: [] for v in variants}
        for round_ in range(args.warmup + args.repeats):
            turn = round_ % len(variants)
            for variant in variants[turn:] + variants[:turn]:
                _activate(model, variant, settings)
                times[variant[1]].append(ttft(model, inputs, 0)[0])
        base = None
        for variant in variants:
            impl, label, density = variant
            first, later = times[label][0], times[label][args.warmup:]
            steady = statistics.median(later) if later else first
            row = {"model": args.model, "tokens": tokens, "impl": label, "commit": commit,
                   "alpha": None, "min_budget": None, "min_sparse_len": None, "fixed_density": density,
                   "ttft_first_s": first, "ttft_warmup_s": times[label][: args.warmup], "ttft_s": steady,
                   "ttft_all_s": times[label]}
            _activate(model, variant, settings)
            if impl == "flashprefill":
                cfg = settings[label]
                row.update(alpha=cfg.alpha, min_budget=cfg.min_budget, min_sparse_len=cfg.min_sparse_len)
                row.update(checked_pass(model, inputs))
                expected_sparse = row["layers"] - len(cfg.dense_layers)
                row["path_ok"] = tokens < cfg.min_sparse_len or row["sparse_layers"] >= expected_sparse
                if not row["path_ok"]:
                    logger.warning("%s at %d tokens: only %d of %d layers ran sparse (%s)", label, tokens,
                                   row["sparse_layers"], row["layers"], ", ".join(row["dense_reasons"]))
            if args.profile:
                row["profile_ms"] = profile_prefill(model, inputs)
            if number is not None:
                with torch.no_grad():
                    out = model.generate(**inputs, max_new_tokens=24, do_sample=False)  # as the demo
                answer = tokenizer.decode(out[0, tokens:], skip_special_tokens=True).strip()
                row["answer"], row["found"] = answer, str(number) in answer
            if base is None:
                base = steady
            row["speedup_vs_sdpa"] = base / steady
            paired = [b / t for b, t in zip(times["sdpa"][args.warmup:], later, strict=True)] or [base / steady]
            row["speedup_paired"] = quartiles(paired)
            rows.append(row)
            log(format_row(row))
            if on_row is not None:
                on_row()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def _activate(model, variant, settings: dict) -> None:
    """Set ``model`` up as ``variant``: its attention implementation and, for flashprefill, its settings."""
    import fp_patch

    impl, label, _ = variant
    model.set_attn_implementation(impl)
    if impl == "flashprefill":
        fp_patch.configure(model, settings[label])


def run_ten_lengths(model, tokenizer, args, log=print) -> dict:
    """Ten prompts of ten lengths near ``L`` against ten prompts of length ``L``, taking turns (one of
    each, ten times, after one warm-up call each), with ``"flashprefill"`` and, as the control, with
    ``"sdpa"`` (new shapes cost Transformers and cuDNN something too)."""
    import fp_patch

    center = args.ten_lengths
    step = (center // 100) | 1  # odd: the lengths fall on different residues mod 16
    lengths = [center + (2 * i - 9) * step for i in range(10)]  # mean length: ``center``
    result = {"center": center, "lengths": lengths}
    for impl in ("sdpa", "flashprefill"):
        model.set_attn_implementation(impl)
        if impl == "flashprefill":
            defaults = fp_patch.model_defaults(model.config)
            min_sparse_len = args.min_sparse_len if args.min_sparse_len is not None else defaults.min_sparse_len
            fp_patch.configure(model, defaults.replace(min_sparse_len=min_sparse_len))
        totals = {"one_length": 0.0, "ten_lengths": 0.0}
        for first in (center, lengths[0]):
            warm, _ = prompt_inputs(model, tokenizer, first, args.device)
            ttft(model, warm, 1)
        for i, length in enumerate(lengths):
            for name, n in (("one_length", center), ("ten_lengths", length)):
                inputs, _ = prompt_inputs(model, tokenizer, n, args.device, seed=i)
                totals[name] += ttft(model, inputs, 0)[0]
        entry = {name: {"total_s": total} for name, total in totals.items()}
        entry["ratio"] = totals["ten_lengths"] / totals["one_length"]
        result[impl] = entry
        log(
            f"{impl}: ten lengths {lengths}: {totals['ten_lengths'] * 1e3:.0f} ms vs ten x {center}: "
            f"{totals['one_length'] * 1e3:.0f} ms (ratio {entry['ratio']:.3f})"
        )
    # the flashprefill series also at the top level
    result.update({k: result["flashprefill"][k] for k in ("one_length", "ten_lengths", "ratio")})
    return result


def format_row(row: dict) -> str:
    dens = row.get("density")
    dens = "" if dens is None else f" density {dens:6.1%}"
    path = "" if row.get("layers") is None else f" path {path_text(row)}" + ("" if row.get("path_ok", True)
                                                                            else " (NOT ALL SPARSE)")
    answer = f" {row['answer']!r}" if "answer" in row else ""
    prof = row.get("profile_ms")
    prof = "" if not prof else " | " + ", ".join(f"{k} {v:.1f}" for k, v in prof.items())
    return (f"{row['model']} L={row['tokens']:>6} {row['impl']:>26} ttft {row['ttft_s'] * 1e3:9.1f} ms "
            f"(first {_warmup_text(row)}) x{row['speedup_vs_sdpa']:.2f} per round "
            f"{_paired_text(row)}{dens}{path}{answer}{prof}")


def _warmup_text(row: dict) -> str:
    """The calls reported apart, in ms: ``first`` or ``first / second / ...`` with ``--warmup``."""
    return " / ".join(f"{t * 1e3:.1f}" for t in row.get("ttft_warmup_s") or [row["ttft_first_s"]])


def _paired_text(row: dict) -> str:
    """``median [q1-q3]`` of the per-round speed-ups (rows saved before they existed: ``-``)."""
    paired = row.get("speedup_paired")
    return "-" if paired is None else f"{paired[1]:.2f} [{paired[0]:.2f}-{paired[2]:.2f}]"


def markdown(results: dict) -> str:
    env = results["environment"]
    warmup = results.get("warmup", 1)
    apart = "a first call" if warmup == 1 else f"the first {warmup} calls"
    apart_column = "first call" if warmup == 1 else f"first {warmup} calls"
    lines = [
        f"{results['model_note']}. GPU: {env.get('gpu')}, torch {env['torch']}, triton {env['triton']}, "
        f"transformers {env.get('transformers')}, commit {results.get('commit', env.get('commit', '?'))}, "
        f"{env['date']}. TTFT = generate(max_new_tokens=1), median of "
        f"{results['repeats']} after {apart} (reported apart); the variants take turns call by call, "
        "each round starting one further on. x vs sdpa: ratio of the medians; per round: median "
        "[quartiles] of sdpa / variant over the rounds. density and path: measured on one more, recorded, "
        "prefill with the row's exact settings (fixed rows: alpha=1.0 and the min_budget solved for the "
        "target density).",
        "",
        f"| tokens | implementation | density | path | TTFT ms | x vs sdpa | per round | {apart_column} ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        dens = r.get("density")
        if dens is None:
            dens = "-"
        elif r.get("fixed_density"):
            dens = f"{dens:.1%} (target {r['fixed_density']:.0%}, min_budget {r.get('min_budget')})"
        else:
            dens = f"{dens:.1%}"
        path = path_text(r) + ("" if r.get("path_ok", True) else " **not all sparse**")
        lines.append(
            f"| {r['tokens']} | {r['impl']} | {dens} | {path} | {r['ttft_s'] * 1e3:.1f} | "
            f"{r['speedup_vs_sdpa']:.2f} | {_paired_text(r)} | {_warmup_text(r)} |"
        )
    profiled = [r for r in results["rows"] if r.get("profile_ms")]
    if profiled:
        columns = list(profiled[0]["profile_ms"])
        lines += ["", "GPU time of one prefill forward by kernel group, ms (`--profile`):", "",
                  "| tokens | implementation | " + " | ".join(columns) + " |",
                  "|---|---|" + "---|" * len(columns)]
        for r in profiled:
            cells = " | ".join(f"{r['profile_ms'].get(c, 0.0):.1f}" for c in columns)
            lines.append(f"| {r['tokens']} | {r['impl']} | {cells} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import fp_patch  # noqa: F401  (registers "flashprefill")
    from fp_tools.benchmark import environment

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("flashprefill bench --ttft needs a CUDA GPU (or --device cpu for a dry run)")
    if args.model == "smollm2":
        from fp_patch.models import load_smollm2

        dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        model, tokenizer = load_smollm2("sdpa", device=args.device, dtype=dtype)
        note = "SmolLM2-135M-Instruct (real weights, needle prompts)"
    else:
        model, tokenizer = build_random(args.model, args.layers, args.device), None
        n = model.config.num_hidden_layers
        note = f"{args.model} shape, random weights, {n} layers"
    args.commit = git_commit()
    results = {"environment": environment(), "commit": args.commit, "model": args.model, "model_note": note,
               "repeats": args.repeats, "warmup": args.warmup, "rows": []}

    def save():  # after every row: a run cut short keeps what it measured
        args.out.write_text(json.dumps(results, indent=1))

    run_lengths(model, tokenizer, args, rows=results["rows"], on_row=save)
    if args.ten_lengths:
        results["ten_lengths"] = run_ten_lengths(model, tokenizer, args)
    save()
    md = markdown(results)
    args.out.with_suffix(".md").write_text(md + "\n")
    print(md)
    print(f"saved {args.out} and {args.out.with_suffix('.md')}")
    return 0
