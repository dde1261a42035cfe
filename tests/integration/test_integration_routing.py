"""The attention function called directly: layouts, masks, routing and fallbacks, against SDPA.

A stand-in attention module carries what Transformers' modules carry (``is_causal``, ``layer_idx``,
``scaling``, ``num_key_value_groups``, ``config``). Inputs come in Transformers' layout: ``query``
``[B, Hq, L, D]`` as a transposed view of ``[B, L, Hq, D]`` memory, ``key``/``value`` ``[B, Hkv, L, D]``.
CPU: float32 and the reference operator; GPU (or ``FLASHPREFILL_TEST_DEVICE=cuda``): bfloat16, Triton.
"""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import fp_patch
from fp_patch import attention as fp_attention
from fp_patch import masks as fp_masks
from fp_patch.config import MODULE_ATTR

HQ, HKV, D = 4, 2, 64
DEVICE = torch.device(os.environ.get("FLASHPREFILL_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
DTYPE = torch.float32 if DEVICE.type == "cpu" else torch.bfloat16
TOL = {"atol": 1e-5, "rtol": 1e-5} if DTYPE == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
BACKEND = "triton" if DEVICE.type == "cuda" else "reference"
DENSE = {"alpha": 0.0, "block_size": 16, "min_sparse_len": 16, "backend": BACKEND}


class Attention(torch.nn.Module):
    def __init__(self, layer_idx=0, is_causal=True, head_dim=D, **settings):
        super().__init__()
        self.is_causal, self.layer_idx = is_causal, layer_idx
        self.scaling = head_dim**-0.5
        self.num_key_value_groups = HQ // HKV
        self.config = SimpleNamespace(model_type="llama")
        # what fp_patch.configure sets on decoder attention modules (it skips non-causal ones)
        setattr(self, MODULE_ATTR, fp_patch.FlashPrefillConfig(**{**DENSE, **settings}))


class Calls(list):
    """Recorder (the fp_patch.recording contract) that lists ("sparse", k_len) / ("dense", reason)."""

    wants_info = True

    def add_sparse(self, module, layer_idx, info, *, q_len, k_len, out=None, dense_fn=None, **_):
        assert out.is_contiguous() and torch.equal(out, out.nan_to_num(7.0))
        self.append(("sparse", k_len))

    def add_fallback(self, module, layer_idx, reason, *, q_len, k_len):
        self.append(("dense", reason))


@pytest.fixture
def calls(monkeypatch):
    rec = Calls()
    monkeypatch.setattr(fp_attention, "active_recorder", lambda: rec)
    return rec


def qkv(batch=2, q_len=96, k_len=None, head_dim=D, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k_len = k_len or q_len
    q = torch.randn(batch, q_len, HQ, head_dim, generator=gen).transpose(1, 2)  # HF layout: a view
    k = torch.randn(batch, HKV, k_len, head_dim, generator=gen)
    v = torch.randn(batch, HKV, k_len, head_dim, generator=gen)
    return tuple(t.to(DEVICE, DTYPE) for t in (q, k, v))


def run(module, q, k, v, mask=None, **kwargs):
    out, weights = fp_patch.flashprefill_attention_forward(module, q, k, v, mask, **kwargs)
    assert weights is None
    return out


def sdpa(module, q, k, v, mask=None, **kwargs):
    return sdpa_attention_forward(module, q, k, v, mask, **kwargs)[0]


def causal_mask(q_len, k_len, starts=(0, 0), ends=None, past=None):
    """Bool ``[B, 1, Lq, Lk]``: row b sees keys ``starts[b] <= j < ends[b]`` and ``j <= past + i``
    (``past`` defaults to bottom-right alignment ``Lk - Lq``)."""
    ends = ends or [k_len] * len(starts)
    past = k_len - q_len if past is None else past
    j = torch.arange(k_len)
    pos = torch.arange(q_len)[:, None] + past
    rows = [(j >= s) & (j < e) & (j <= pos) for s, e in zip(starts, ends, strict=True)]
    return torch.stack(rows)[:, None].to(DEVICE)


def test_layout_scaling_and_gqa_match_sdpa(calls):
    module = Attention()
    q, k, v = qkv()
    out = run(module, q, k, v, scaling=module.scaling)
    assert out.shape == (2, 96, HQ, D) and out.is_contiguous()
    torch.testing.assert_close(out, sdpa(module, q, k, v, scaling=module.scaling), **TOL)
    # scaling=None: module.scaling is honoured; an explicit scaling wins
    module.scaling = 0.05
    torch.testing.assert_close(run(module, q, k, v), sdpa(module, q, k, v, scaling=0.05), **TOL)
    torch.testing.assert_close(
        run(module, q, k, v, scaling=0.2), sdpa(module, q, k, v, scaling=0.2), **TOL
    )
    assert calls == [("sparse", 96)] * 3


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_mask_runs_sparse_with_row_ranges(side, calls, monkeypatch):
    monkeypatch.setattr(fp_masks, "CHECK_ELEMENTS", 2 * 96 * 40)  # check the mask 40 rows at a time
    module = Attention()
    q, k, v = qkv()
    starts, ends = ((0, 40), None) if side == "left" else ((0, 0), (96, 56))
    mask = causal_mask(96, 96, starts, ends)
    out = run(module, q, k, v, mask)
    assert calls[0] == ("sparse", 96)
    expected = sdpa(module, q, k, v, mask)
    real = mask[:, 0].any(-1)  # query rows with at least one key
    torch.testing.assert_close(out[real], expected[real], **TOL)
    assert torch.equal(out[~real], torch.zeros_like(out[~real]))  # fully masked rows: zeros, never NaN
    # the padded row equals the row alone
    rows = slice(40, 96) if side == "left" else slice(0, 56)
    alone = run(module, q[1:, :, rows], k[1:, :, rows], v[1:, :, rows])
    torch.testing.assert_close(out[1, rows], alone[0], **TOL)


def test_additive_float_masks_equal_bool(calls):
    module = Attention()
    q, k, v = qkv()
    mask = causal_mask(96, 96, (0, 30))
    expected = run(module, q, k, v, mask)
    for blocked in (float("-inf"), torch.finfo(DTYPE).min):
        additive = torch.zeros(mask.shape, device=DEVICE, dtype=DTYPE).masked_fill(~mask, blocked)
        torch.testing.assert_close(run(module, q, k, v, additive), expected, atol=0, rtol=0)
    assert calls == [("sparse", 96)] * 3


def test_masks_that_are_not_row_ranges_fall_back(calls, monkeypatch):
    monkeypatch.setattr(fp_masks, "CHECK_ELEMENTS", 2 * 96 * 40)  # check the mask 40 rows at a time
    module = Attention()
    q, k, v = qkv()
    # packed sequences expressed as a block-diagonal causal mask
    blocks = torch.arange(96, device=DEVICE) // 48
    packed = causal_mask(96, 96) & (blocks[:, None] == blocks[None, :])
    torch.testing.assert_close(run(module, q, k, v, packed), sdpa(module, q, k, v, packed), **TOL)
    # an additive mask carrying a bias
    bias = 0.5 * torch.rand(96, device=DEVICE, dtype=DTYPE)
    biased = torch.zeros(2, 1, 96, 96, device=DEVICE, dtype=DTYPE).masked_fill(~causal_mask(96, 96), -torch.inf) - bias
    torch.testing.assert_close(run(module, q, k, v, biased), sdpa(module, q, k, v, biased), **TOL)
    # one mask per head
    per_head = causal_mask(96, 96).expand(2, HQ, 96, 96)
    torch.testing.assert_close(run(module, q, k, v, per_head), sdpa(module, q, k, v, per_head), **TOL)
    assert calls == [("dense", "mask_not_range"), ("dense", "mask_not_range"), ("dense", "mask_layout")]


def test_chunked_and_static_cache_masks(calls):
    module = Attention()
    # continued prefill on a DynamicCache: 64 new queries after 80 cached keys, bottom-right
    q, k, v = qkv(q_len=64, k_len=144)
    mask = causal_mask(64, 144, (0, 20))
    torch.testing.assert_close(run(module, q, k, v, mask), sdpa(module, q, k, v, mask), **TOL)
    # second chunk on a StaticCache of 200 slots: keys past the 144 written ones are unfilled
    q, k, v = qkv(q_len=64, k_len=200)
    mask = causal_mask(64, 200, (0, 20), past=80)
    torch.testing.assert_close(run(module, q, k, v, mask), sdpa(module, q, k, v, mask), **TOL)
    # empty StaticCache without a mask: only the first Lq keys are real
    q, k, v = qkv(q_len=64, k_len=200)
    k[:, :, 64:], v[:, :, 64:] = 1e4, 1e4  # unfilled slots would dominate if they were read
    torch.testing.assert_close(run(module, q, k, v), sdpa(module, q, k, v), **TOL)
    assert calls == [("sparse", 144), ("sparse", 144), ("sparse", 64)]


def test_mask_is_checked_once_per_tensor(calls, monkeypatch):
    analysed = []
    original = fp_masks.analyse_mask
    monkeypatch.setattr(fp_masks, "analyse_mask", lambda *a: analysed.append(1) or original(*a))
    q, k, v = qkv()
    mask = causal_mask(96, 96, (0, 10))
    for layer in range(3):
        run(Attention(layer_idx=layer), q, k, v, mask)
    run(Attention(), q, k, v, mask.clone())
    assert len(analysed) == 2 and calls == [("sparse", 96)] * 4


@pytest.mark.parametrize(
    ("kwargs", "module_kwargs", "shape", "reason"),
    [
        ({}, {}, {"q_len": 1, "k_len": 96}, "decode"),
        ({"is_causal": False}, {}, {}, "non_causal"),
        ({}, {"is_causal": False}, {}, "non_causal"),
        ({"sliding_window": 32}, {}, {}, "sliding_window"),
        ({}, {"dense_layers": [0]}, {}, "dense_layer"),
        ({}, {"min_sparse_len": 128}, {}, "short_query"),
        ({}, {"head_dim": 32}, {"head_dim": 32}, "head_dim"),
        ({"s_aux": torch.zeros(HQ)}, {}, {}, "unsupported_argument"),
        ({"dropout": 0.1}, {}, {}, "training"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_dense_routes(kwargs, module_kwargs, shape, reason, calls):
    module = Attention(**module_kwargs)
    q, k, v = qkv(**shape)
    out = run(module, q, k, v, **kwargs)
    assert calls == [("dense", reason)]
    if "dropout" not in kwargs:
        torch.testing.assert_close(out, sdpa(module, q, k, v, **kwargs), **TOL)


def test_autograd_inputs_go_dense(calls):
    module = Attention()
    q, k, v = qkv()
    out = run(module, q.requires_grad_(), k, v)
    out.sum().backward()
    assert calls == [("dense", "training")] and q.grad is not None


def test_strict_mode_raises_only_for_degraded_calls(calls):
    module = Attention(head_dim=32, strict=True)
    q, k, v = qkv(head_dim=32)
    with pytest.raises(fp_patch.FlashPrefillFallbackError, match="head_dim"):
        run(module, q, k, v)
    run(module, q[:, :, -1:], k, v)  # decode is dense by design: no error
    assert calls == [("dense", "decode")]


def test_fallback_reasons_are_logged_once(caplog):
    module = Attention()
    q, k, v = qkv(q_len=1, k_len=50)
    fp_attention.log_once.cache_clear()
    with caplog.at_level(logging.INFO, logger="fp_patch.attention"):
        for _ in range(3):
            run(module, q, k, v)
        run(Attention(head_dim=32), *qkv(head_dim=32))
    records = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in records] == [logging.INFO, logging.WARNING]
    assert "decode" in records[0][1] and "head_dim" in records[1][1]


@pytest.mark.parametrize("causal", [False, True], ids=["vision", "causal"])
def test_packed_sequences_run_dense_per_sequence(causal, calls):
    """cu_seq_lens calls (the FlashAttention varlen convention: batch 1, causal bottom-right per
    sequence) are computed densely and correctly, never sparse."""
    module = Attention(is_causal=causal)
    q, k, v = qkv(batch=1, q_len=100)
    cu = torch.tensor([0, 30, 64, 100], dtype=torch.int32, device=DEVICE)
    out = run(module, q, k, v, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=36, max_length_k=36,
              is_causal=causal)
    for lo, hi in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        piece = sdpa(module, q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], is_causal=causal)
        torch.testing.assert_close(out[:, lo:hi], piece, **TOL)
    assert out.shape == (1, 100, HQ, D) and out.is_contiguous()
    assert calls == [("dense", "packed_sequences")]
