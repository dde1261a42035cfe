"""Operator benchmark: dense SDPA (flash and cuDNN backends) and PyTorch FlexAttention against
FlashPrefill, in one run.

``flashprefill bench`` and ``benchmarks/bench_operator.py`` run this. Every sparse timing is
printed with its measured density; correctness is checked before anything is timed (a timing is
never reported for a configuration whose check failed); results are saved as JSON with the GPU
name, versions and date.

FlexAttention runs on the sparse forward's own random block lists (:func:`flex_block_mask`), so both
sparse engines compute the same blocks at the same density.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import math
import platform
import time

import torch
import torch.nn.functional as F
from fp_kernels import BlockRules, flash_prefill
from fp_kernels.geometry import block_totals, normalize_ranges, slot_geometry

from .provenance import git_commit
from .synthetic import random_block_lists, structured_qkv

KIB = 1024
# target density of the lists with every causal block: the sparse forward alone runs there too
ALL_BLOCKS = 1.0


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


def causal_mask_mod(b, h, q_idx, kv_idx):
    """FlexAttention ``mask_mod`` of causal attention with ``Lq == Lk``."""
    return q_idx >= kv_idx


def flex_block_mask(block_index: torch.Tensor, block_count: torch.Tensor, seq_len: int, block_size: int = 128):
    """A FlexAttention ``BlockMask`` that computes exactly the listed blocks, causally (``Lq == Lk``).

    ``block_index [B, H, S, nkb]`` int32 with ascending ids, the first ``block_count [B, H, S]`` valid,
    ``S == nkb == ceil(seq_len / block_size)`` (slot ``s`` is query block ``s``). Listed blocks before
    the query block are *full* (computed without a mask); the diagonal block, when listed, is the only
    *partial* one (:func:`causal_mask_mod`); blocks after it are never visible. Every index tensor is
    ``[B, H, S, nkb]`` int32 and holds valid block ids past its counts too (FlexAttention's kernel
    asserts on out-of-range ones). For GQA pass per-query-head lists (``H = Hq``) and call
    ``flex_attention(..., enable_gqa=True)``.
    """
    from torch.nn.attention.flex_attention import BlockMask

    n_blocks = -(-seq_len // block_size)
    if block_index.dim() != 4 or tuple(block_index.shape[-2:]) != (n_blocks, n_blocks):
        raise ValueError(f"block_index must be [B, H, {n_blocks}, {n_blocks}] for seq_len {seq_len} and block_size "
                         f"{block_size} (Lq == Lk), got {tuple(block_index.shape)}")
    if tuple(block_count.shape) != tuple(block_index.shape[:-1]):
        raise ValueError(f"block_count must be {tuple(block_index.shape[:-1])}, got {tuple(block_count.shape)}")
    diagonal = torch.arange(n_blocks, device=block_index.device)[:, None]  # [S, 1]: query block of each slot
    listed = torch.arange(n_blocks, device=block_index.device) < block_count[..., None]
    ids = block_index.long()
    full = listed & (ids < diagonal)  # a prefix of the ascending list
    full_idx = torch.where(full, ids, 0).to(torch.int32)
    partial_counts = (listed & (ids == diagonal)).any(-1).to(torch.int32)
    partial_idx = diagonal.to(torch.int32).expand(block_index.shape).contiguous()
    return BlockMask.from_kv_blocks(
        kv_num_blocks=partial_counts, kv_indices=partial_idx,
        full_kv_num_blocks=full.sum(-1, dtype=torch.int32), full_kv_indices=full_idx,
        BLOCK_SIZE=block_size, mask_mod=causal_mask_mod, seq_lengths=(seq_len, seq_len))


@functools.cache
def compiled_flex_attention():
    """``torch.compile(flex_attention)``, built once per process. ``dynamic=False``: one kernel specialised to
    each length, as a caller with fixed shapes gets. ``fullgraph=True``: past dynamo's recompile limit (8
    shapes by default) a call raises instead of falling back to eager ``flex_attention``, which evaluates
    ``mask_mod`` over the whole ``L x L`` score matrix and ignores the block lists."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False, fullgraph=True)


def flex_attention_runner(q, k, v, block_mask):
    """Compiled FlexAttention on ``[B, L, H, D]`` inputs (passed as ``[B, H, L, D]`` views, GQA native): a
    function of no arguments returning ``[B, Hq, L, D]``."""
    flex = compiled_flex_attention()
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

    def run():
        return flex(qt, kt, vt, block_mask=block_mask, enable_gqa=True)

    return run


def limit_ms(cudnn_ms: float, density: float, block_size: int) -> float:
    """The limit model's time of the whole operator: all its work at cuDNN's dense rate. The work is the
    computed blocks (``density`` of dense causal attention) plus the scoring, one pooled key per block
    (``1 / block_size`` of it)."""
    return cudnn_ms * (density + 1.0 / block_size)


def sparse_key(target: float) -> str:
    """Row key prefix of the sparse forward alone at a target density: ``sparse_6pct`` .. ``sparse_100pct``."""
    return f"sparse_{round(target * 100)}pct"


def add_ratios(row: dict, block_size: int, targets) -> None:
    """Ratios of a row's measured numbers (nothing new is measured): ``limit_ms`` and ``full_head_vs_limit``
    for the per-head operator (:func:`limit_ms`, with cuDNN's own time only), and at every target
    density ours against FlexAttention and against cuDNN in TFLOP/s (``*_vs_flex``, ``*_vs_cudnn``)."""
    if "sdpa_cudnn_ms" in row and "full_head_density" in row:
        row["limit_ms"] = limit_ms(row["sdpa_cudnn_ms"], row["full_head_density"], block_size)
        if "full_head_ms" in row:
            row["full_head_vs_limit"] = row["full_head_ms"] / row["limit_ms"]
    for target in targets:
        key = sparse_key(target)
        ours = row.get(f"{key}_tflops_computed")
        if ours is None:
            continue
        if f"{key}_flex_tflops_computed" in row:
            row[f"{key}_vs_flex"] = ours / row[f"{key}_flex_tflops_computed"]
        if "sdpa_cudnn_tflops" in row:
            row[f"{key}_vs_cudnn"] = ours / row["sdpa_cudnn_tflops"]


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
    on_row=None,
) -> dict:
    if not torch.cuda.is_available():
        raise RuntimeError("the operator benchmark needs a CUDA GPU")
    rules = BlockRules(alpha=alpha, block_size=block_size, sink_blocks=2, window_blocks=4, last_dense_blocks=2)
    targets = (ALL_BLOCKS, *densities)
    results = {"environment": environment(), "shape": {
        "batch": 1, "q_heads": heads, "kv_heads": kv_heads, "head_dim": dim, "dtype": str(dtype),
        "block_size": block_size, "alpha": alpha, "sink_blocks": rules.sink_blocks,
        "window_blocks": rules.window_blocks, "last_dense_blocks": rules.last_dense_blocks,
        "inputs": "fp_tools.synthetic.structured_qkv (sinks, local topics, clustered blocks)",
        "sparse_targets": list(targets),
        "sparse_lists": "fp_tools.synthetic.random_block_lists (diagonal always listed), shared by ours and Flex",
    }, "rows": []}
    from fp_kernels.sparse_attention import kernel_for, sparse_attention

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
        try:
            _mean_correction_row(row, q, k, v, rules, ref_dense, flops)
        except Exception as exc:  # e.g. out of shared memory on some GPU: a result, not the end of the run
            row["mean_corr_error"] = f"{type(exc).__name__}: {exc}"[:300]
        # index building alone (pool + score/select/compact)
        row["index_ms"] = median_ms(_build_index, q, k, seq_len, rules)
        row["index_graph_ms"] = median_graph_ms(_build_index, q, k, seq_len, rules)
        row["index_graph_pct_of_cudnn"] = 100.0 * row["index_graph_ms"] / cudnn_ms
        row["full_head_graph_speedup_vs_cudnn"] = cudnn_ms / row.get("full_head_graph_ms", math.inf)
        row["index_pct_of_cudnn"] = 100.0 * row["index_ms"] / cudnn_ms
        # sparse forward alone on random lists (diagonal always listed), ours and FlexAttention on the
        # same lists; 100 %: every causal block listed, which must also equal dense attention
        for target in targets:
            index, count = random_block_lists(1, heads, seq_len, seq_len, block_size, target,
                                              device="cuda", seed=seq_len)
            key = sparse_key(target)
            density = list_density(count, seq_len, seq_len, block_size)
            row[f"{key}_density"] = density
            out = sparse_attention(q, k, v, index, count, block_size)
            row["sparse_kernel"] = kernel_for(q, k, v, block_size)  # the kernel these rows timed
            if target == ALL_BLOCKS:
                row["sparse_all_blocks_err_vs_dense"] = float(
                    (out.float() - ref_dense.float()).norm() / ref_dense.float().norm())
            err = spot_check(q, k, v, out, index, count, block_size)
            if err < 2e-2 and not torch.isnan(out).any():
                ms = median_ms(sparse_attention, q, k, v, index, count, block_size)
                row[f"{key}_ms"] = ms
                row[f"{key}_tflops_computed"] = density * flops / ms / 1e9
            else:
                row[f"{key}_check_failed"] = err
            del out
            _flex_row(row, key, q, k, v, index, count, block_size, density * flops)
        add_ratios(row, block_size, targets)
        results["rows"].append(row)
        log(format_row(row))
        if on_row is not None:  # e.g. save after every length: a long run cut short keeps what it measured
            on_row(results)
        torch.cuda.empty_cache()
    return results


def _flex_row(row, key, q, k, v, index, count, block_size, flop) -> None:
    """``{key}_flex_*``: compiled FlexAttention on the same block lists as ours (``flop``: their work),
    checked on sampled rows as ours is before it is timed. ``flex_first_call_s`` is the first call at
    this length, compilation included. Where FlexAttention is unavailable or fails (no
    ``torch.nn.attention.flex_attention``, a compile error, out of memory) the error is recorded instead."""
    try:
        run = flex_attention_runner(q, k, v, flex_block_mask(index, count, q.shape[1], block_size))
        start = time.perf_counter()
        out = run().transpose(1, 2)
        torch.cuda.synchronize()
        row.setdefault("flex_first_call_s", time.perf_counter() - start)
        err = spot_check(q, k, v, out, index, count, block_size)
        if err < 2e-2 and not torch.isnan(out).any():
            ms = median_ms(run)
            row[f"{key}_flex_ms"] = ms
            row[f"{key}_flex_tflops_computed"] = flop / ms / 1e9
        else:
            row[f"{key}_flex_check_failed"] = err
    except Exception as exc:  # FlexAttention is a competitor: its failure is a result, not the end of the run
        row[f"{key}_flex_error"] = f"{type(exc).__name__}: {exc}"[:200]


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
        f"Mean correction, {geometry(results)}, alpha={results['shape']['alpha']}: CUDA-graph timing.",
        "",
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


def row_sparse_keys(row: dict) -> list[str]:
    """The :func:`sparse_key` prefixes a row holds, in the order they ran."""
    return [key[: -len("_density")] for key in row if key.startswith("sparse_") and key.endswith("pct_density")]


def format_row(row: dict) -> str:
    def g(key, fmt="{:.2f}"):
        return cell(row, key, fmt)

    sparse = ", ".join(
        f"{g(f'{key}_tflops_computed', '{:.0f}')}/{g(f'{key}_flex_tflops_computed', '{:.0f}')} @ "
        f"{g(f'{key}_density', '{:.1%}')} (x{g(f'{key}_vs_cudnn')} cuDNN)" for key in row_sparse_keys(row))
    return (
        f"L={row['seq_len']:>6} | flash {g('sdpa_flash_ms')} ms | cudnn {g('sdpa_cudnn_ms')} ms "
        f"({g('sdpa_cudnn_tflops', '{:.0f}')} TF/s) | ours/head {g('full_head_ms')} ms @ "
        f"{g('full_head_density', '{:.1%}')} (x{g('full_head_speedup_vs_cudnn')}, {g('full_head_vs_limit')} of "
        f"limit) | ours/group {g('full_group_ms')} ms @ {g('full_group_density', '{:.1%}')} | index "
        f"{g('index_ms', '{:.3f}')} ms ({g('index_pct_of_cudnn', '{:.1f}')}%) | sparse fwd ours/Flex TF/s: {sparse}"
    )


def geometry(results: dict) -> str:
    """``B=1, 32 q / 8 kv heads, D=128, bf16``: the shape every table of a run was measured at."""
    shape = results["shape"]
    dtype = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}.get(shape["dtype"],
                                                                                            shape["dtype"])
    return (f"B={shape['batch']}, {shape['q_heads']} q / {shape['kv_heads']} kv heads, D={shape['head_dim']}, "
            f"{dtype}")


def markdown_table(results: dict) -> str:
    """Markdown: the whole operator against dense SDPA and the limit model, one row per length."""
    env, shape = results["environment"], results["shape"]
    lines = [
        f"Operator, {geometry(results)}, alpha={shape['alpha']}. GPU: {env.get('gpu')}, torch {env['torch']}, "
        f"triton {env['triton']}, CUDA {env.get('cuda')}, date {env['date']}. Limit: cuDNN ms x (density + "
        f"1/{shape['block_size']}).",
        "",
        "| L | SDPA flash ms | SDPA cuDNN ms (TFLOP/s) | ours full ms, stream / graph (per-head) | density "
        "| x vs cuDNN (stream / graph) | limit ms | ours / limit | ours full ms (per-group) | density "
        "| index ms, stream / graph (% cuDNN) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        def g(key, fmt="{:.2f}", r=r):
            return cell(r, key, fmt)

        lines.append(
            f"| {r['seq_len'] // KIB}K | {g('sdpa_flash_ms')} | {g('sdpa_cudnn_ms')} "
            f"({g('sdpa_cudnn_tflops', '{:.0f}')}) | {g('full_head_ms')} / {g('full_head_graph_ms')} "
            f"| {g('full_head_density', '{:.1%}')} "
            f"| {g('full_head_speedup_vs_cudnn')} / {g('full_head_graph_speedup_vs_cudnn')} "
            f"| {g('limit_ms')} | {g('full_head_vs_limit')} "
            f"| {g('full_group_ms')} | {g('full_group_density', '{:.1%}')} "
            f"| {g('index_ms', '{:.3f}')} / {g('index_graph_ms', '{:.3f}')} ({g('index_pct_of_cudnn', '{:.1f}')}% / "
            f"{g('index_graph_pct_of_cudnn', '{:.1f}')}%) |"
        )
    return "\n".join(lines)


def sparse_forward_table(results: dict) -> str:
    """Markdown: the sparse forward alone, ours and FlexAttention on the same random block lists, one row per
    (length, target density), TFLOP/s of computed work beside dense cuDNN's."""
    targets = sorted(results["shape"].get("sparse_targets", (ALL_BLOCKS, 0.06, 0.2, 0.6)))
    lines = [
        f"Sparse forward alone, {geometry(results)}: random block lists (diagonal always listed), the same lists "
        "for ours and FlexAttention (torch.compile); TFLOP/s of computed work (density x dense causal FLOPs).",
        "",
        "| L | target | density | ours TFLOP/s | FlexAttention TFLOP/s | ours / Flex | cuDNN TFLOP/s (dense) "
        "| ours / cuDNN |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        for target in targets:
            key = sparse_key(target)
            ours = "check failed" if f"{key}_check_failed" in r else cell(r, f"{key}_tflops_computed", "{:.0f}")
            flex = ("error" if f"{key}_flex_error" in r else "check failed" if f"{key}_flex_check_failed" in r
                    else cell(r, f"{key}_flex_tflops_computed", "{:.0f}"))
            lines.append(
                f"| {r['seq_len'] // KIB}K | {target:.0%} | {cell(r, f'{key}_density', '{:.1%}')} | {ours} | {flex} "
                f"| {cell(r, f'{key}_vs_flex')} | {cell(r, 'sdpa_cudnn_tflops', '{:.0f}')} "
                f"| {cell(r, f'{key}_vs_cudnn')} |"
            )
    return "\n".join(lines)


def markdown_report(results: dict) -> str:
    """The three tables of a run: the operator, the sparse forward alone, the mean correction."""
    return "\n\n".join((markdown_table(results), sparse_forward_table(results), mean_correction_table(results)))


def run(args: argparse.Namespace) -> int:
    def save(results):
        args.out.write_text(json.dumps(results, indent=1))

    results = run_benchmark(args.lengths, args.heads, args.kv_heads, args.head_dim, args.alpha, on_row=save)
    save(results)
    print(markdown_report(results))
    print(f"saved {args.out}")
    return 0
