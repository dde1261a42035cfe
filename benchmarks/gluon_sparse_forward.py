"""The sparse forward on sm_90: the package's warp-specialised Gluon kernel against the Triton kernel.

    python benchmarks/gluon_sparse_forward.py [--lengths 8192 32768] [--stages 2 3] [--out results.json]

Times, on the same random lists and in one process: cuDNN dense causal SDPA, the Triton kernel
(``sparse_attention(..., config={"GLUON": False})``), ``fp_kernels.sparse_attention_sm90`` per ring depth
(``GLUON_STAGES``), and this file's single-partition Gluon prototype (one partition of 8 warps; the score
dot of block ``i`` and the value dot of block ``i - 1`` in flight together, K/V tiles in a copy-engine
ring): the route that led to the package's kernel (Triton 3.6 neither warp-specialises our loop nor
leaves a score dot in flight; benchmarks/sm90_resources.py shows both at no device time). The prototype
takes ``Lq == Lk``, no padding ranges, per-head lists, D=64/128, blocks of 128, bf16/fp16.

Every output is checked against an fp32 recomputation of sampled rows and against the Triton kernel
before it is timed (CUDA-graph medians); ``--out`` writes JSON and a Markdown table. Hopper only.
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import torch
from fp_kernels.sparse_attention import ensure_tma_allocator
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait


@gluon.jit
def _issue_block(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, index_base, j, count, STAGES: gl.constexpr,
                 BLOCK: gl.constexpr):
    """TMA loads of the K and V tiles of list entry ``j`` into ring slot ``j % STAGES`` (nothing past ``count``)."""
    ok = j < count
    kb = gl.load(index_base + gl.maximum(gl.minimum(j, count - 1), 0))
    slot = j % STAGES
    k_bar = k_bars.index(slot)
    v_bar = v_bars.index(slot)
    mbarrier.expect(k_bar, k_desc.block_type.nbytes, pred=ok)
    tma.async_copy_global_to_shared(k_desc, [kb * BLOCK, 0], k_bar, k_smem.index(slot), pred=ok)
    mbarrier.expect(v_bar, v_desc.block_type.nbytes, pred=ok)
    tma.async_copy_global_to_shared(v_desc, [kb * BLOCK, 0], v_bar, v_smem.index(slot), pred=ok)


@gluon.jit
def _mask_last(qk, index_base, i, count, t, cols, seq_len, BLOCK: gl.constexpr):
    """The last listed block alone may straddle the diagonal or the end of the keys: mask it there."""
    if i == count - 1:
        u = gl.load(index_base + i) * BLOCK + cols
        qk = gl.where((u[None, :] <= t[:, None]) & (u < seq_len)[None, :], qk, float("-inf"))
    return qk


@gluon.jit
def _online_softmax(qk, m_i, l_i, scale_log2):
    m_new = gl.maximum(m_i, gl.max(qk, axis=1) * scale_log2)
    m_new = gl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no valid key: 0, not NaN
    probs = gl.exp2(qk * scale_log2 - m_new[:, None])
    alpha = gl.exp2(m_i - m_new)
    return m_new, l_i * alpha + gl.sum(probs, axis=1), probs, alpha


@gluon.jit
def _gluon_sparse_kernel(
    Q, K, V, OUT, INDEX, COUNT,
    stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh, stride_vb, stride_vl, stride_vh,
    stride_ob, stride_ol, stride_oh, stride_ib, stride_ih, stride_is, stride_cb, stride_ch,
    seq_len, num_heads, group, n_slots, scale_log2,
    HEAD_DIM: gl.constexpr, BLOCK: gl.constexpr, STAGES: gl.constexpr, TILE_LAYOUT: gl.constexpr,
    num_warps: gl.constexpr,
):
    s = n_slots - 1 - gl.program_id(0)  # long rows first
    bh = gl.program_id(1)
    b = bh // num_heads
    h = bh % num_heads
    hkv = h // group
    dtype: gl.constexpr = Q.dtype.element_ty
    q_desc = tma.make_tensor_descriptor(Q + b.to(gl.int64) * stride_qb + h * stride_qh, [seq_len, HEAD_DIM],
                                        [stride_ql, 1], [BLOCK, HEAD_DIM], TILE_LAYOUT)
    k_desc = tma.make_tensor_descriptor(K + b.to(gl.int64) * stride_kb + hkv * stride_kh, [seq_len, HEAD_DIM],
                                        [stride_kl, 1], [BLOCK, HEAD_DIM], TILE_LAYOUT)
    v_desc = tma.make_tensor_descriptor(V + b.to(gl.int64) * stride_vb + hkv * stride_vh, [seq_len, HEAD_DIM],
                                        [stride_vl, 1], [BLOCK, HEAD_DIM], TILE_LAYOUT)
    index_base = INDEX + b.to(gl.int64) * stride_ib + h * stride_ih + s * stride_is
    count = gl.load(COUNT + b * stride_cb + h * stride_ch + s)

    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    col_o: gl.constexpr = gl.SliceLayout(0, o_layout)

    q_smem = gl.allocate_shared_memory(dtype, [BLOCK, HEAD_DIM], TILE_LAYOUT)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK, HEAD_DIM], TILE_LAYOUT)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK, HEAD_DIM], TILE_LAYOUT)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for st in gl.static_range(STAGES):
        mbarrier.init(k_bars.index(st), count=1)
        mbarrier.init(v_bars.index(st), count=1)

    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [s * BLOCK, 0], q_bar, q_smem)
    for st in gl.static_range(STAGES):
        _issue_block(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, index_base, st, count, STAGES, BLOCK)

    t = s * BLOCK + gl.arange(0, BLOCK, layout=row_s)
    cols = gl.arange(0, BLOCK, layout=col_s)
    m_i = gl.full([BLOCK], float("-inf"), gl.float32, layout=row_s)
    l_i = gl.zeros([BLOCK], gl.float32, layout=row_s)
    acc = gl.zeros([BLOCK, HEAD_DIM], gl.float32, layout=o_layout)
    qk = gl.zeros([BLOCK, BLOCK], gl.float32, layout=s_layout)
    p = gl.zeros([BLOCK, BLOCK], dtype, layout=p_layout)
    mbarrier.wait(q_bar, 0)
    if count > 0:
        mbarrier.wait(k_bars.index(0), 0)
        qk = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), qk, use_acc=False)
        qk = _mask_last(qk, index_base, 0, count, t, cols, seq_len, BLOCK)
        m_i, l_i, probs, alpha = _online_softmax(qk, m_i, l_i, scale_log2)
        p = gl.convert_layout(probs.to(dtype), p_layout)
        for i in range(1, count):
            slot = i % STAGES
            prev = (i - 1) % STAGES
            mbarrier.wait(k_bars.index(slot), (i // STAGES) & 1)
            qk_tok = warpgroup_mma(q_smem, k_smem.index(slot).permute((1, 0)), qk, use_acc=False, is_async=True)
            # the value dot of the previous block runs beside this block's score dot and softmax
            mbarrier.wait(v_bars.index(prev), ((i - 1) // STAGES) & 1)
            acc_tok = warpgroup_mma(p, v_smem.index(prev), acc, is_async=True)
            qk = warpgroup_mma_wait(num_outstanding=1, deps=(qk_tok,))
            qk = _mask_last(qk, index_base, i, count, t, cols, seq_len, BLOCK)
            m_i, l_i, probs, alpha = _online_softmax(qk, m_i, l_i, scale_log2)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc_tok,))
            # the previous block's ring slot is free: fetch the entry STAGES later into it
            _issue_block(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, index_base, i - 1 + STAGES, count,
                         STAGES, BLOCK)
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            p = gl.convert_layout(probs.to(dtype), p_layout)
        last = (count - 1) % STAGES
        mbarrier.wait(v_bars.index(last), ((count - 1) // STAGES) & 1)
        acc = warpgroup_mma(p, v_smem.index(last), acc)
    mbarrier.invalidate(q_bar)
    for st in gl.static_range(STAGES):
        mbarrier.invalidate(k_bars.index(st))
        mbarrier.invalidate(v_bars.index(st))
    l_o = gl.convert_layout(l_i, row_o)
    out = acc / gl.where(l_o > 0, l_o, 1.0)[:, None]
    rows = s * BLOCK + gl.arange(0, BLOCK, layout=row_o)
    d = gl.arange(0, HEAD_DIM, layout=col_o)
    ptrs = OUT + b.to(gl.int64) * stride_ob + h * stride_oh + rows.to(gl.int64)[:, None] * stride_ol + d[None, :]
    gl.store(ptrs, out.to(dtype), mask=(rows < seq_len)[:, None])


def gluon_sparse_attention(q, k, v, block_index, block_count, block_size=128, stages=2, num_warps=8):
    """``fp_kernels.sparse_attention`` for ``Lq == Lk``, unpadded, per-head lists, D in {64, 128}."""
    batch, seq_len, hq, dim = q.shape
    hkv = k.shape[2]
    if block_size != 128 or dim not in (64, 128) or k.shape[1] != seq_len or block_index.shape[1] != hq:
        raise ValueError("prototype: Lq == Lk, per-head lists, 128-token blocks, D 64 or 128")
    ensure_tma_allocator()  # the kernel builds its tensor descriptors on the device
    out = torch.empty_like(q)
    n_slots = block_count.shape[-1]
    layout = gl.NVMMASharedLayout.get_default_for([block_size, dim], gl.bfloat16 if q.dtype == torch.bfloat16
                                                  else gl.float16)
    _gluon_sparse_kernel[(n_slots, batch * hq)](
        q, k, v, out, block_index, block_count,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        block_index.stride(0), block_index.stride(1), block_index.stride(2),
        block_count.stride(0), block_count.stride(1),
        seq_len, hq, hq // hkv, n_slots, dim**-0.5 * 1.4426950408889634,
        HEAD_DIM=dim, BLOCK=block_size, STAGES=stages, TILE_LAYOUT=layout, num_warps=num_warps,
    )
    return out


def variants(stages_list):
    """(name, runner) of every variant timed beside the Triton kernel: the package's warp-specialised sm_90
    kernel (``fp_kernels.sparse_attention_sm90``) per ring depth, and this file's single-partition prototype."""
    out = []
    for stages in stages_list:
        out.append((f"sm90_s{stages}", partial(_package, config={"GLUON": True, "GLUON_STAGES": stages})))
    out.append(("prototype_s3", partial(gluon_sparse_attention, stages=3)))
    return out


def _package(q, k, v, index, count, config):
    from fp_kernels.sparse_attention import sparse_attention

    return sparse_attention(q, k, v, index, count, 128, config=config)


def main():
    from fp_kernels.sparse_attention import kernel_for, sparse_attention
    from triton.testing import do_bench_cudagraph

    from fp_tools.benchmark import causal_flops, dense_attention, environment, list_density, spot_check
    from fp_tools.synthetic import random_block_lists, structured_qkv

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.06, 0.6, 1.0])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3], help="ring depths of the sm_90 kernel")
    parser.add_argument("--only", nargs="*", default=None, help="variant names to run (default: all)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    env = environment()
    print(f"{env.get('gpu')} torch {env['torch']} triton {env['triton']} commit {env['commit']}", flush=True)
    runs = [(name, fn) for name, fn in variants(args.stages) if args.only is None or name in args.only]
    rows = []
    for seq_len in args.lengths:
        q, k, v = structured_qkv(1, seq_len, args.heads, args.kv_heads, args.head_dim, dtype=torch.bfloat16,
                                 device="cuda", seed=seq_len)
        flops = causal_flops(1, args.heads, seq_len, seq_len, args.head_dim)
        cudnn_ms = float(do_bench_cudagraph(dense_attention(q, k, v, "cudnn"), rep=60, return_mode="median"))
        for target in args.densities:
            index, count = random_block_lists(1, args.heads, seq_len, seq_len, 128, target, device="cuda",
                                              seed=seq_len)
            density = list_density(count, seq_len, seq_len, 128)
            triton_only = {"GLUON": False}
            ours = sparse_attention(q, k, v, index, count, 128, config=triton_only)
            assert kernel_for(q, k, v, 128, config=triton_only) == "triton"
            assert kernel_for(q, k, v, 128) == "gluon_sm90", "the package's default here is the sm_90 kernel"
            row = {"L": seq_len, "target": target, "density": density, "cudnn_dense_ms": cudnn_ms,
                   "cudnn_tflops": flops / cudnn_ms / 1e9,
                   "triton_ms": float(do_bench_cudagraph(partial(sparse_attention, q, k, v, index, count, 128,
                                                                 config=triton_only),
                                                         rep=60, return_mode="median"))}
            row["triton_tflops"] = density * flops / row["triton_ms"] / 1e9
            for key, fn in runs:
                try:
                    got = fn(q, k, v, index, count)
                    err = spot_check(q, k, v, got, index, count, 128, rows=24)
                    diff = float((got.float() - ours.float()).abs().max())
                    row[f"{key}_err"], row[f"{key}_max_diff_vs_triton"] = err, diff
                    if err > 2e-2 or not torch.isfinite(got).all():
                        row[f"{key}_wrong"] = True
                    else:
                        ms = float(do_bench_cudagraph(partial(fn, q, k, v, index, count), rep=60,
                                                      return_mode="median"))
                        row[f"{key}_ms"], row[f"{key}_tflops"] = ms, density * flops / ms / 1e9
                except Exception as exc:  # a compile or launch failure is the result
                    row[f"{key}_failed"] = f"{type(exc).__name__}: {str(exc)[-600:]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"environment": env, "args": vars(args), "rows": rows}, fh, indent=1)
        with open(args.out.removesuffix(".json") + ".md", "w") as fh:
            fh.write(markdown(env, args, rows))


def markdown(env, args, rows) -> str:
    """The run as a Markdown table: TFLOP/s of computed work per kernel beside the density, and ratios."""
    names = [name for name, _ in variants(args.stages) if args.only is None or name in args.only]
    head = (f"Sparse forward on the same random lists, B=1, {args.heads} q / {args.kv_heads} kv heads, "
            f"D={args.head_dim}, bf16; {env.get('gpu')}, torch {env['torch']}, triton {env['triton']}, commit "
            f"{env['commit']}, {env['date']}. `python benchmarks/gluon_sparse_forward.py --head-dim {args.head_dim} "
            f"--heads {args.heads} --kv-heads {args.kv_heads} --stages {' '.join(map(str, args.stages))}`. "
            "TFLOP/s of computed work (density x dense causal FLOPs); cuDNN: dense causal SDPA. Every output "
            "was checked (fp32 spot check) before it was timed.\n\n")
    from fp_kernels.sparse_attention_sm90 import STAGES

    main = f"sm90_s{STAGES}" if f"sm90_s{STAGES}" in names else names[0]  # the package's default first
    cols = ["L", "density", "cuDNN dense", "Triton kernel", *names, f"{main} / Triton", f"{main} / cuDNN"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        def tf(key, r=r):
            return f"{r[key]:.0f}" if key in r else r.get(key.replace("_tflops", "_failed"), "wrong")[:40]
        first = f"{main}_tflops"
        ratios = [f"{r[first] / r['triton_tflops']:.2f}" if first in r else "-",
                  f"{r[first] / r['cudnn_tflops']:.2f}" if first in r else "-"]
        cells = [f"{r['L'] // 1024}K", f"{r['density']:.1%}", tf("cudnn_tflops"), tf("triton_tflops"),
                 *[tf(f"{n}_tflops") for n in names], *ratios]
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
