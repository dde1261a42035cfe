"""Operator benchmark: dense SDPA (flash and cuDNN backends) against FlashPrefill, in one run.

``flashprefill bench`` and ``benchmarks/bench_operator.py`` run this. Every sparse timing is
printed with its measured density; correctness is checked before anything is timed (a timing is
never reported for a configuration whose check failed); results are saved as JSON with the GPU
name, versions and date.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import platform

import torch
import torch.nn.functional as F
from fp_kernels import BlockRules, flash_prefill
from fp_kernels.geometry import block_totals, normalize_ranges, slot_geometry

from .provenance import git_commit
from .synthetic import random_block_lists, structured_qkv

KIB = 1024


def causal_flops(batch: int, heads: int, q_len: int, k_len: int, dim: int) -> float:
    """FLOPs of dense causal attention (QK^T and PV, bottom-right aligned)."""
    off = k_len - q_len
    pairs = q_len * off + q_len * (q_len + 1) / 2
    return 4.0 * batch * heads * dim * pairs


def list_density(count: torch.Tensor, q_len: int, k_len: int, block_size: int) -> float:
    """Share of the causally visible blocks that compact block lists ``count [B, H, S]`` (unpadded rows)
    compute, over all rows and heads: the operator's ``info.density`` rule (:mod:`fp_kernels.geometry`)."""
    start, end = normalize_ranges(count.shape[0], k_len, None, None, count.device)
    geo = slot_geometry(q_len, k_len, block_size, start, end, count.shape[-1], 0)
    computed, visible = block_totals(count, geo, count.shape[1])
    return float(computed.sum() / visible.sum())


def environment() -> dict:
    import triton

    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "commit": git_commit(),
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def dense_attention(q, k, v, backend: str):
    """Causal SDPA on ``[B, L, H, D]`` inputs with K/V expanded for GQA, on one SDPA backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    group = q.shape[2] // k.shape[2]
    qt = q.transpose(1, 2)
    kt = k.repeat_interleave(group, dim=2).transpose(1, 2)
    vt = v.repeat_interleave(group, dim=2).transpose(1, 2)
    which = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]

    def run():
        with sdpa_kernel(which):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)

    return run


def spot_check(q, k, v, out, block_index, block_count, block_size, rows=64, seed=0, mean_correction=False) -> float:
    """Max relative error of ``out`` on random query rows against an fp32 recomputation from the
    same block lists (any length: only the sampled rows are recomputed); with ``mean_correction``
    the row's softmax also holds one stand-in per skipped block before its query block
    (``Lq == Lk``, unpadded)."""
    batch, q_len, hq, dim = q.shape
    k_len, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    sel_group = block_index.shape[1] != hq
    gen = torch.Generator(device="cpu").manual_seed(seed)
    off = k_len - q_len
    worst = 0.0
    for _ in range(rows):
        b = int(torch.randint(batch, (1,), generator=gen))
        h = int(torch.randint(hq, (1,), generator=gen))
        i = int(torch.randint(q_len, (1,), generator=gen))
        t = i + off
        s = t // block_size - off // block_size
        hs = h // group if sel_group else h
        ids = block_index[b, hs, s, : int(block_count[b, hs, s])].long()
        keys = (ids[:, None] * block_size + torch.arange(block_size, device=q.device)).flatten()
        keys = keys[keys <= t]
        kk = k[b, keys, h // group].float()
        vv = v[b, keys, h // group].float()
        bias = torch.zeros(len(keys), device=q.device)
        if mean_correction:
            skipped = sorted(set(range(t // block_size)) - set(ids.tolist()))
            if skipped:
                blocks = torch.tensor(skipped, device=q.device)[:, None] * block_size + torch.arange(
                    block_size, device=q.device)
                kk = torch.cat([kk, k[b, blocks, h // group].float().mean(1)])
                vv = torch.cat([vv, v[b, blocks, h // group].float().mean(1)])
                bias = torch.cat([bias, torch.full((len(skipped),), math.log(block_size), device=q.device)])
        p = torch.softmax(kk @ q[b, i, h].float() * dim**-0.5 + bias, dim=0)
        ref = p @ vv
        err = (out[b, i, h].float() - ref).norm() / ref.norm().clamp(min=1e-6)
        worst = max(worst, float(err))
    return worst


def selection_check(q, k, info, rules, slots=16):
    """Fraction of block decisions on sampled (slot, head) pairs of batch row 0 that disagree with
    the fp32 scores of :func:`fp_kernels.block_scores_reference` by more than float rounding
    (|score - threshold| > 0.02 nats), for ``Lq == Lk`` unpadded inputs and per-head selection."""
    from fp_kernels.reference import block_scores_reference

    alpha, block_size, sink_blocks, window_blocks, last_dense_blocks = (
        rules.alpha, rules.block_size, rules.sink_blocks, rules.window_blocks, rules.last_dense_blocks)
    if info.group_select:
        return 0.0
    hq = q.shape[2]
    scores = block_scores_reference(q[:1], k[:1], block_size)[0]  # [Hq, S, nkb]
    n_slots = scores.shape[1]
    bad = total = 0
    gen = torch.Generator(device="cpu").manual_seed(1)
    for _ in range(slots):
        s = int(torch.randint(n_slots, (1,), generator=gen))
        h = int(torch.randint(hq, (1,), generator=gen))
        n_vis = s + 1
        if s >= n_slots - last_dense_blocks or n_vis <= sink_blocks + window_blocks:
            continue
        row = scores[h, s, :n_vis]
        thr = row.max() + math.log(alpha)
        j = torch.arange(n_vis, device=row.device)
        want = (row >= thr) | (j < sink_blocks) | (j >= n_vis - window_blocks)
        got = info.block_mask(0, h)[s, :n_vis].to(row.device)
        ambiguous = (row - thr).abs() < 0.02
        bad += int(((want != got) & ~ambiguous).sum())
        total += n_vis
    return bad / max(total, 1)


def median_ms(fn, *args, warmup=25, rep=100, **kwargs) -> float:
    """Median milliseconds of ``fn(*args, **kwargs)`` launched back to back (``triton.testing.do_bench``):
    includes host launch overhead wherever it exceeds the GPU time."""
    from functools import partial

    from triton.testing import do_bench

    return float(do_bench(partial(fn, *args, **kwargs), warmup=warmup, rep=rep, return_mode="median"))


def median_graph_ms(fn, *args, **kwargs) -> float:
    """Median milliseconds of ``fn`` replayed from a CUDA graph: GPU time, no host launch overhead."""
    from functools import partial

    from triton.testing import do_bench_cudagraph

    return float(do_bench_cudagraph(partial(fn, *args, **kwargs), rep=100, return_mode="median"))


def run_benchmark(
    lengths=(4096, 8192, 16384, 32768, 65536, 131072),
    heads: int = 32,
    kv_heads: int = 8,
    dim: int = 128,
    alpha: float = 0.18,
    densities=(0.06, 0.2, 0.6),
    block_size: int = 128,
    dtype=torch.bfloat16,
    group_modes=(False, True),
    log=print,
) -> dict:
    if not torch.cuda.is_available():
        raise RuntimeError("the operator benchmark needs a CUDA GPU")
    rules = BlockRules(alpha=alpha, block_size=block_size, sink_blocks=2, window_blocks=4, last_dense_blocks=2)
    results = {"environment": environment(), "shape": {
        "batch": 1, "q_heads": heads, "kv_heads": kv_heads, "head_dim": dim, "dtype": str(dtype),
        "block_size": block_size, "alpha": alpha, "sink_blocks": rules.sink_blocks,
        "window_blocks": rules.window_blocks, "last_dense_blocks": rules.last_dense_blocks,
        "inputs": "fp_tools.synthetic.structured_qkv (sinks, local topics, clustered blocks)",
    }, "rows": []}
    from fp_kernels.sparse_attention import sparse_attention

    for seq_len in lengths:
        q, k, v = structured_qkv(1, seq_len, heads, kv_heads, dim, dtype=dtype, device="cuda",
                                 block_size=block_size, seed=seq_len)
        flops = causal_flops(1, heads, seq_len, seq_len, dim)
        row = {"seq_len": seq_len, "dense_causal_tflop": flops / 1e12}
        dense = {}
        for backend in ("flash", "cudnn"):
            try:
                fn = dense_attention(q, k, v, backend)
                dense[backend] = fn()
                ms = median_ms(fn)
                row[f"sdpa_{backend}_ms"] = ms
                row[f"sdpa_{backend}_tflops"] = flops / ms / 1e9
            except RuntimeError as exc:  # a backend may not support this shape/GPU
                row[f"sdpa_{backend}_error"] = str(exc)[:200]
        ref_dense = dense.get("cudnn", dense.get("flash")).transpose(1, 2)
        cudnn_ms = row.get("sdpa_cudnn_ms", row.get("sdpa_flash_ms"))
        # the whole operator, per-head and per-group selection
        for group_select in group_modes:
            tag = "group" if group_select else "head"
            mode = rules.replace(group_select=group_select)
            out, info = flash_prefill(q, k, v, rules=mode, return_info=True)
            density = float(info.density.mean())
            err_exec = spot_check(q, k, v, out, info.block_index, info.block_count, block_size)
            err_dense = float((out.float() - ref_dense.float()).norm() / ref_dense.float().norm())
            sel_bad = selection_check(q, k, info, mode)
            ok = err_exec < 2e-2 and sel_bad < 1e-3 and not torch.isnan(out).any()
            row[f"full_{tag}_density"] = density
            row[f"full_{tag}_err_vs_dense"] = err_dense
            row[f"full_{tag}_check"] = {"spot_rel_err": err_exec, "selection_mismatch": sel_bad, "ok": ok}
            if ok:
                ms = median_ms(flash_prefill, q, k, v, rules=mode)
                row[f"full_{tag}_ms"] = ms
                row[f"full_{tag}_graph_ms"] = median_graph_ms(flash_prefill, q, k, v, rules=mode)
                row[f"full_{tag}_tflops_computed"] = density * flops / ms / 1e9
                row[f"full_{tag}_speedup_vs_cudnn"] = cudnn_ms / ms
        _mean_correction_row(row, q, k, v, rules, ref_dense, flops)
        # index building alone (pool + score/select/compact)
        row["index_ms"] = median_ms(_build_index, q, k, seq_len, rules)
        row["index_graph_ms"] = median_graph_ms(_build_index, q, k, seq_len, rules)
        row["index_graph_pct_of_cudnn"] = 100.0 * row["index_graph_ms"] / cudnn_ms
        row["full_head_graph_speedup_vs_cudnn"] = cudnn_ms / row.get("full_head_graph_ms", math.inf)
        row["index_pct_of_cudnn"] = 100.0 * row["index_ms"] / cudnn_ms
        # sparse forward alone on random lists at fixed densities (diagonal always listed)
        out_dense_lists = None
        for target in (1.0, *densities):
            index, count = random_block_lists(1, heads, seq_len, seq_len, block_size, target,
                                              device="cuda", seed=seq_len)
            density = list_density(count, seq_len, seq_len, block_size)
            out = sparse_attention(q, k, v, index, count, block_size)
            if target == 1.0:  # every block listed must equal dense attention
                out_dense_lists = float((out.float() - ref_dense.float()).norm() / ref_dense.float().norm())
                row["sparse_all_blocks_err_vs_dense"] = out_dense_lists
                continue
            err = spot_check(q, k, v, out, index, count, block_size)
            key = f"sparse_{round(target * 100)}pct"
            row[f"{key}_density"] = density
            if err < 2e-2 and not torch.isnan(out).any():
                ms = median_ms(sparse_attention, q, k, v, index, count, block_size)
                row[f"{key}_ms"] = ms
                row[f"{key}_tflops_computed"] = density * flops / ms / 1e9
            else:
                row[f"{key}_check_failed"] = err
        results["rows"].append(row)
        log(format_row(row))
        torch.cuda.empty_cache()
    return results


def _mean_correction_row(row, q, k, v, rules, ref_dense, flops) -> None:
    """``mean_corr_*``: the operator (per-head) with ``mean_correction=True`` on the same inputs, checked
    on sampled rows before timing, its time and overhead over the uncorrected operator, and both
    operators' relative L2 error against dense attention."""
    corrected = rules.replace(mean_correction=True)
    out, info = flash_prefill(q, k, v, rules=corrected, return_info=True)
    err = spot_check(q, k, v, out, info.block_index, info.block_count, rules.block_size, mean_correction=True)
    ok = err < 2e-2 and not torch.isnan(out).any()
    row["mean_corr_check"] = {"spot_rel_err": err, "ok": ok}
    row["mean_corr_err_vs_dense"] = float((out.float() - ref_dense.float()).norm() / ref_dense.float().norm())
    if not ok:
        return
    row["mean_corr_ms"] = median_ms(flash_prefill, q, k, v, rules=corrected)
    row["mean_corr_graph_ms"] = median_graph_ms(flash_prefill, q, k, v, rules=corrected)
    # the uncorrected operator again, interleaved, so that both see the same clocks
    plain_ms = median_graph_ms(flash_prefill, q, k, v, rules=rules)
    row["mean_corr_plain_graph_ms"] = plain_ms
    row["mean_corr_overhead_pct"] = 100.0 * (row["mean_corr_graph_ms"] / plain_ms - 1.0)


def mean_correction_table(results: dict) -> str:
    """Markdown: the mean-corrected operator against the uncorrected one (per-head selection)."""
    lines = [
        "| L | density | ours ms, graph | + mean correction ms, graph | overhead | rel. L2 err vs dense: "
        "plain / corrected |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        def g(key, fmt="{:.3f}", r=r):
            return cell(r, key, fmt)

        lines.append(
            f"| {r['seq_len'] // KIB}K | {g('full_head_density', '{:.1%}')} | {g('mean_corr_plain_graph_ms')} "
            f"| {g('mean_corr_graph_ms')} | {g('mean_corr_overhead_pct', '{:+.1f}%')} "
            f"| {g('full_head_err_vs_dense', '{:.4f}')} / {g('mean_corr_err_vs_dense', '{:.4f}')} |"
        )
    return "\n".join(lines)


def _build_index(q, k, seq_len, rules):
    from fp_kernels.pool import pool_keys
    from fp_kernels.select import select_blocks

    return select_blocks(q, pool_keys(k, rules.block_size), seq_len, rules)


def cell(row: dict, key: str, fmt: str = "{:.2f}") -> str:
    """``row[key]`` formatted with ``fmt``, or ``-`` where the row has no number for it."""
    value = row.get(key)
    return fmt.format(value) if isinstance(value, (int, float)) else "-"


def format_row(row: dict) -> str:
    def g(key, fmt="{:.2f}"):
        return cell(row, key, fmt)

    return (
        f"L={row['seq_len']:>6} | flash {g('sdpa_flash_ms')} ms | cudnn {g('sdpa_cudnn_ms')} ms "
        f"({g('sdpa_cudnn_tflops', '{:.0f}')} TF/s) | ours/head {g('full_head_ms')} ms @ "
        f"{g('full_head_density', '{:.1%}')} (x{g('full_head_speedup_vs_cudnn')}) | ours/group "
        f"{g('full_group_ms')} ms @ {g('full_group_density', '{:.1%}')} | index {g('index_ms', '{:.3f}')} ms "
        f"({g('index_pct_of_cudnn', '{:.1f}')}%) | sparse 6/20/60%: {g('sparse_6pct_tflops_computed', '{:.0f}')}"
        f"/{g('sparse_20pct_tflops_computed', '{:.0f}')}/{g('sparse_60pct_tflops_computed', '{:.0f}')} TF/s"
    )


def markdown_table(results: dict) -> str:
    env = results["environment"]
    lines = [
        f"GPU: {env.get('gpu')}, torch {env['torch']}, triton {env['triton']}, CUDA {env.get('cuda')}, "
        f"date {env['date']}. B=1, {results['shape']['q_heads']}/{results['shape']['kv_heads']} heads, "
        f"D={results['shape']['head_dim']}, bf16, alpha={results['shape']['alpha']}.",
        "",
        "| L | SDPA flash ms | SDPA cuDNN ms (TFLOP/s) | ours full ms, stream / graph (per-head) | density "
        "| x vs cuDNN (stream / graph) | ours full ms (per-group) | density | index ms, stream / graph "
        "(% cuDNN) | sparse fwd TFLOP/s @6/20/60% |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        def g(key, fmt="{:.2f}", r=r):
            return cell(r, key, fmt)

        lines.append(
            f"| {r['seq_len'] // KIB}K | {g('sdpa_flash_ms')} | {g('sdpa_cudnn_ms')} "
            f"({g('sdpa_cudnn_tflops', '{:.0f}')}) | {g('full_head_ms')} / {g('full_head_graph_ms')} "
            f"| {g('full_head_density', '{:.1%}')} "
            f"| {g('full_head_speedup_vs_cudnn')} / {g('full_head_graph_speedup_vs_cudnn')} "
            f"| {g('full_group_ms')} | {g('full_group_density', '{:.1%}')} "
            f"| {g('index_ms', '{:.3f}')} / {g('index_graph_ms', '{:.3f}')} ({g('index_pct_of_cudnn', '{:.1f}')}% / "
            f"{g('index_graph_pct_of_cudnn', '{:.1f}')}%) "
            f"| {g('sparse_6pct_tflops_computed', '{:.0f}')} / {g('sparse_20pct_tflops_computed', '{:.0f}')} / "
            f"{g('sparse_60pct_tflops_computed', '{:.0f}')} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    results = run_benchmark(args.lengths, args.heads, args.kv_heads, args.head_dim, args.alpha)
    args.out.write_text(json.dumps(results, indent=1))
    print(markdown_table(results))
    print()
    print(mean_correction_table(results))
    print(f"saved {args.out}")
    return 0
