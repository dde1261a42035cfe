"""The operator benchmark's parts that run without a GPU: the FlexAttention block mask built from our block
lists (it must compute exactly the listed blocks, causally), the limit model and the ratios derived from
measured numbers, and the Markdown tables (checked on a hand-made results dict)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fp_kernels import sparse_attention_reference

from fp_tools.benchmark import (
    add_ratios,
    compiled_flex_attention,
    flex_block_mask,
    format_row,
    limit_ms,
    markdown_report,
    sparse_key,
)
from fp_tools.synthetic import random_block_lists

BLOCK = 128
# (seq_len, q heads, kv heads, head dim): a whole number of blocks, and a short last block
SHAPES = [(512, 6, 2, 32), (300, 4, 2, 16)]


def case(seq_len, hq, hkv, dim, density=0.6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, seq_len, hq, dim, generator=gen)
    k = torch.randn(1, seq_len, hkv, dim, generator=gen)
    v = torch.randn(1, seq_len, hkv, dim, generator=gen)
    index, count = random_block_lists(1, hq, seq_len, seq_len, BLOCK, density, seed=seed + 1)
    n_vis = torch.arange(1, count.shape[-1] + 1)
    assert (count < n_vis).any() and (count > 1).any(), "the lists must skip some blocks and keep some off-diagonal"
    return q, k, v, index, count


def flex_element_mask(block_mask, seq_len: int) -> torch.Tensor:
    """``[B, H, L, L]`` bool: the scores FlexAttention computes for ``block_mask`` by its contract. Full blocks
    are computed whole, partial blocks where ``mask_mod`` holds, unlisted blocks not at all; only the first
    ``*num_blocks`` entries of each index row count."""
    q_block, kv_block = block_mask.BLOCK_SIZE
    n_kv = block_mask.kv_indices.shape[-1]

    def listed(num_blocks, indices):
        valid = torch.arange(n_kv) < num_blocks[..., None]
        blocks = torch.zeros(*indices.shape[:-1], n_kv + 1, dtype=torch.bool)
        blocks.scatter_(-1, torch.where(valid, indices.long(), n_kv), True)
        blocks = blocks[..., :n_kv].repeat_interleave(q_block, dim=-2).repeat_interleave(kv_block, dim=-1)
        return blocks[..., :seq_len, :seq_len]

    positions = torch.arange(seq_len)
    mask_mod = block_mask.mask_mod(torch.tensor(0), torch.tensor(0), positions[:, None], positions[None, :])
    full = listed(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    partial = listed(block_mask.kv_num_blocks, block_mask.kv_indices)
    return full | (partial & mask_mod)


@pytest.mark.parametrize(("seq_len", "hq", "hkv", "dim"), SHAPES, ids=[f"L{n}-H{a}/{b}-D{d}" for n, a, b, d in SHAPES])
def test_flex_block_mask_computes_exactly_the_listed_blocks(seq_len, hq, hkv, dim):
    """Attention under the BlockMask's semantics equals the reference on the same lists; every index tensor
    is ``[B, H, nq, nkv]`` int32 with in-range ids past its counts (out-of-range ones crash Flex's kernel)."""
    q, k, v, index, count = case(seq_len, hq, hkv, dim)
    block_mask = flex_block_mask(index, count, seq_len, BLOCK)
    n_blocks = -(-seq_len // BLOCK)
    for name in ("kv_indices", "full_kv_indices"):
        ids = getattr(block_mask, name)
        assert ids.shape == (1, hq, n_blocks, n_blocks) and ids.dtype == torch.int32, name
        assert ((ids >= 0) & (ids < n_blocks)).all(), name
    group = hq // hkv
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(group, 2).transpose(1, 2), v.repeat_interleave(group, 2).transpose(1, 2),
        attn_mask=flex_element_mask(block_mask, seq_len)).transpose(1, 2)
    ref = sparse_attention_reference(q, k, v, index, count, BLOCK)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.slow  # compiling for the CPU: ~8 s, ~40 s with a cold Inductor cache
def test_compiled_flex_attention_on_our_lists_equals_the_reference():
    """The real FlexAttention kernel (compiled for the CPU, GQA, a short last block) on the benchmark's block
    mask: the same output as the reference from the same lists (eager ``flex_attention`` would not do: it
    applies ``mask_mod`` to every score and ignores the block lists)."""
    seq_len, hq, hkv, dim = SHAPES[1]
    q, k, v, index, count = case(seq_len, hq, hkv, dim, seed=1)
    block_mask = flex_block_mask(index, count, seq_len, BLOCK)
    out = compiled_flex_attention()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                                    enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out, sparse_attention_reference(q, k, v, index, count, BLOCK), atol=2e-5, rtol=2e-5)


def test_flex_block_mask_wants_square_lists():
    index, count = random_block_lists(1, 2, 256, 384, BLOCK, 0.5)
    with pytest.raises(ValueError, match=r"block_index must be \[B, H, 3, 3\]"):
        flex_block_mask(index, count, 384, BLOCK)


def hand_made_results() -> dict:
    row = {
        "seq_len": 32768, "sdpa_flash_ms": 25.0, "sdpa_cudnn_ms": 15.0, "sdpa_cudnn_tflops": 600.0,
        "full_head_density": 0.15, "full_head_ms": 3.0, "full_head_speedup_vs_cudnn": 5.0,
        "sparse_100pct_density": 1.0, "sparse_100pct_tflops_computed": 540.0,
        "sparse_100pct_flex_error": "InductorError: no kernel",
        "sparse_6pct_density": 0.061, "sparse_6pct_tflops_computed": 400.0, "sparse_6pct_flex_tflops_computed": 320.0,
        "sparse_60pct_density": 0.6, "sparse_60pct_check_failed": 0.5, "sparse_60pct_flex_tflops_computed": 450.0,
    }
    return {
        "environment": {"gpu": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0", "date": "d"},
        "shape": {"batch": 1, "q_heads": 14, "kv_heads": 2, "head_dim": 64, "dtype": "torch.bfloat16",
                  "block_size": 128, "alpha": 0.18, "sparse_targets": [1.0, 0.06, 0.6]},
        "rows": [row],
    }


def test_limit_model_and_ratios():
    assert limit_ms(15.0, 0.15, 128) == pytest.approx(15.0 * (0.15 + 1 / 128))
    assert limit_ms(10.0, 1.0, 64) == pytest.approx(10.0 * 65 / 64)
    results = hand_made_results()
    row = results["rows"][0]
    add_ratios(row, 128, results["shape"]["sparse_targets"])
    assert row["limit_ms"] == pytest.approx(2.3671875)
    assert row["full_head_vs_limit"] == pytest.approx(3.0 / 2.3671875)  # 1.267
    assert row["sparse_6pct_vs_flex"] == pytest.approx(1.25)
    assert row["sparse_6pct_vs_cudnn"] == pytest.approx(400 / 600)
    assert row["sparse_100pct_vs_cudnn"] == pytest.approx(0.9)
    # no ratio where a side has no number: Flex failed at 100 %, ours failed its check at 60 %
    assert "sparse_100pct_vs_flex" not in row and "sparse_60pct_vs_flex" not in row
    assert "sparse_60pct_vs_cudnn" not in row
    assert sparse_key(0.06) == "sparse_6pct" and sparse_key(1.0) == "sparse_100pct"


def test_limit_needs_cudnn_itself():
    """Without a cuDNN time there is no limit (the flash backend's time is not cuDNN's rate)."""
    row = {"sdpa_flash_ms": 25.0, "full_head_density": 0.15, "full_head_ms": 3.0}
    add_ratios(row, 128, ())
    assert "limit_ms" not in row and "full_head_vs_limit" not in row


def test_tables():
    results = hand_made_results()
    add_ratios(results["rows"][0], 128, results["shape"]["sparse_targets"])
    md = markdown_report(results)
    main, sparse, mean_corr = md.split("\n\n")[1::2]  # title, table, title, table, title, table
    assert md.startswith("Operator, B=1, 14 q / 2 kv heads, D=64, bf16, alpha=0.18. GPU: NVIDIA H200")
    assert "| limit ms | ours / limit |" in main
    assert "| 32K | 25.00 | 15.00 (600) | 3.00 / - | 15.0% | 5.00 / - | 2.37 | 1.27 | - | - |" in main
    assert "Sparse forward alone, B=1, 14 q / 2 kv heads, D=64, bf16:" in md
    assert sparse.splitlines()[2:] == [  # target densities ascending
        "| 32K | 6% | 6.1% | 400 | 320 | 1.25 | 600 | 0.67 |",
        "| 32K | 60% | 60.0% | check failed | 450 | - | 600 | - |",
        "| 32K | 100% | 100.0% | 540 | error | - | 600 | 0.90 |",
    ]
    assert "Mean correction, B=1, 14 q / 2 kv heads, D=64, bf16" in md
    assert mean_corr.splitlines()[0].startswith("| L | density | ours ms, graph |")
    line = format_row(results["rows"][0])
    assert "(x5.00, 1.27 of limit)" in line
    assert "540/- @ 100.0% (x0.90 cuDNN), 400/320 @ 6.1% (x0.67 cuDNN)" in line
