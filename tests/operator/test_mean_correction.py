"""Mean correction of skipped blocks (``mean_correction=True``) against a float64 token-level oracle.

The oracle builds, for every query row, the explicit softmax over the keys the row attends to (the
listed blocks of its slot, causal) plus one stand-in term per skipped key block ``j < qb`` of the
row's query block ``qb``: logit ``scale q . mean_key_j + log n_j``, value ``mean_value_j``. Block
lists come from the operator's own info. Each case also checks that it can tell the rule apart from
its two likely bugs (no correction at all; the diagonal block corrected too), so the comparisons
below cannot pass with either.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from fp_kernels import (
    BlockRules,
    flash_prefill,
    flash_prefill_reference,
    pool_keys_reference,
    sparse_attention_reference,
)
from fp_kernels.geometry import normalize_ranges
from fp_kernels.pool import pool_keys
from fp_kernels.sparse_attention import sparse_attention
from support.kernel_checks import (
    ON_GPU,
    assert_close_to_reference,
    case_id,
    kernel_dtypes,
    poison_allocator,
    short_failure,
)

from fp_tools.synthetic import random_block_lists, structured_qkv

# every flash_prefill call in this file must run the Triton pipeline (tests/operator/conftest.py)
pytestmark = pytest.mark.usefixtures("triton_calls")

DTYPES = kernel_dtypes()
DTYPE_IDS = [str(d).removeprefix("torch.") for d in DTYPES]
RULES = ("below", "none", "diagonal")  # the rule, and the two bugs the tests must catch


def oracle(q, k, v, index, count, block_size, scale=None, kv_start=None, kv_end=None, rule="below"):
    """float64, one query row at a time. ``index``/``count``: the operator's lists ``[B, Hsel, S, .]``.
    ``rule``: ``"below"`` corrects the skipped blocks ``j < qb``; ``"none"`` and ``"diagonal"``
    (``j <= qb``) are the wrong rules the tests must tell apart."""
    q, k, v = q.double(), k.double(), v.double()
    batch, q_len, hq, dim = q.shape
    k_len, hkv = k.shape[1], k.shape[2]
    scale = dim**-0.5 if scale is None else scale
    group, sel_per_q, off = hq // hkv, hq // index.shape[1], k_len - q_len
    out = torch.zeros(batch, q_len, hq, dim, dtype=torch.float64)
    for b in range(batch):
        st = 0 if kv_start is None else min(max(int(kv_start[b]), 0), k_len)
        en = k_len if kv_end is None else min(max(int(kv_end[b]), st), k_len)
        n = en - st
        n_blocks = math.ceil(n / block_size)
        first_qb = max(off - st, 0) // block_size
        for h in range(hq):
            keys, values = k[b, st:en, h // group].cpu(), v[b, st:en, h // group].cpu()
            hs = h // sel_per_q
            for i in range(q_len):
                t = i + off - st  # local position of the row
                if t < 0 or n == 0:
                    continue
                qb = t // block_size
                s = qb - first_qb
                listed = set(index[b, hs, s, : int(count[b, hs, s])].tolist())
                attended = [u for u in range(min(t + 1, n)) if u // block_size in listed]
                qi = q[b, i, h].cpu()
                logits = [keys[attended] @ qi * scale]
                vals = [values[attended]]
                top = {"below": qb, "none": 0, "diagonal": qb + 1}[rule]
                for j in range(min(top, n_blocks)):
                    if j in listed:
                        continue
                    lo, hi = j * block_size, min((j + 1) * block_size, n)
                    logits.append((keys[lo:hi].mean(0) @ qi * scale + math.log(hi - lo)).reshape(1))
                    vals.append(values[lo:hi].mean(0, keepdim=True))
                logits, vals = torch.cat(logits), torch.cat(vals)
                if logits.numel():
                    out[b, i, h] = torch.softmax(logits, 0) @ vals
    return out.to(q.device)


def assert_discriminates(want, wrong, budget, name):
    """The case must be able to fail: each wrong rule moves the output by far more than the budget."""
    for rule, other in wrong.items():
        gap = (other - want).abs().max().item()
        assert gap > 10 * budget, f"{name}: rule {rule!r} differs by only {gap:.3g}; the case cannot catch it"


# batch, q_len, k_len, hq, hkv, dim, block, alpha, (sink, window, last_dense), ranges, checks
#   ranges: None or (kv_start, kv_end) lists; checks: the wrong rules the case must tell apart
CASES = [
    (1, 1, 1, 2, 1, 64, 32, 0.5, (1, 1, 1), None, ()),
    (1, 63, 63, 4, 1, 64, 16, 0.6, (0, 1, 0), None, ("none",)),
    (1, 129, 129, 2, 2, 80, 16, 0.6, (1, 1, 1), None, ("none",)),
    (1, 300, 300, 4, 1, 64, 32, 0.6, (1, 1, 1), None, ("none",)),
    (1, 100, 300, 4, 1, 80, 32, 0.6, (1, 1, 1), None, ("none",)),
    # no window: diagonal blocks get skipped, so correcting them would show
    (1, 129, 129, 4, 4, 64, 16, 0.6, (0, 0, 0), None, ("none", "diagonal")),
    (3, 150, 150, 4, 1, 64, 16, 0.6, (1, 1, 1), ([0, 40, 7], [150, 150, 100]), ("none",)),
    (2, 70, 200, 2, 1, 64, 32, 0.6, (0, 0, 1), ([0, 150], [200, 200]), ("none", "diagonal")),
]
CASE_IDS = [case_id(*c[:6], bs=c[6], pad=int(c[9] is not None), win=c[8][1]) for c in CASES]


def make_case(case, dtype, device, seed=0):
    batch, q_len, k_len, hq, hkv, dim, bs, alpha, (sink, window, last), ranges, checks = case
    q, k, v = structured_qkv(batch, k_len, hq, hkv, dim, block_size=bs, topics=4, seed=seed, device=device)
    q, k, v = q[:, k_len - q_len :].to(dtype), k.to(dtype), v.to(dtype)
    kw = {"sink_blocks": sink, "window_blocks": window, "last_dense_blocks": last}
    if ranges is not None:
        kw["kv_start"] = torch.tensor(ranges[0], device=device)
        kw["kv_end"] = torch.tensor(ranges[1], device=device)
    return q, k, v, alpha, bs, kw, checks


def oracles(q, k, v, info, bs, kw, checks):
    args = (q, k, v, info.block_index, info.block_count, bs, None, kw.get("kv_start"), kw.get("kv_end"))
    return oracle(*args), {rule: oracle(*args, rule=rule) for rule in checks}


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_reference_matches_oracle(case):
    q, k, v, alpha, bs, kw, checks = make_case(case, torch.float32, "cpu", seed=1)
    out, info = flash_prefill_reference(q, k, v, alpha, bs, **kw, mean_correction=True, return_info=True)
    want, wrong = oracles(q, k, v, info, bs, kw, checks)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-4)
    assert_discriminates(want, wrong, 2e-5, "reference")
    # the correction changes nothing but the output: same selection as without it
    plain, plain_info = flash_prefill_reference(q, k, v, alpha, bs, **kw, return_info=True)
    assert torch.equal(plain_info.block_count, info.block_count)
    torch.testing.assert_close(plain.double(), oracle(q, k, v, info.block_index, info.block_count, bs, None,
                                                      kw.get("kv_start"), kw.get("kv_end"), "none"),
                               atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_flash_prefill_matches_oracle(case, dtype, device, monkeypatch, triton_calls):
    q, k, v, alpha, bs, kw, checks = make_case(case, dtype, device, seed=2)
    poisoned = poison_allocator(device, monkeypatch)
    out, info = flash_prefill(q, k, v, alpha, bs, **kw, mean_correction=True, return_info=True)
    assert triton_calls and poisoned, "the Triton pipeline did not run on poisoned buffers"
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    want, wrong = oracles(q, k, v, info, bs, kw, checks)
    ref_lowp = sparse_attention_reference(q, k, v, info.block_index, info.block_count, bs, None,
                                          kw.get("kv_start"), kw.get("kv_end"), round_probs=True,
                                          mean_correction=True)
    assert_close_to_reference(out, want, ref_lowp, "flash_prefill(mean_correction=True)")
    budget = 3 * (ref_lowp.double() - want).abs().max().item() + 2e-5
    assert_discriminates(want, wrong, budget, "flash_prefill")
    # same selection as the uncorrected operator (kbar pooled in float32 rounds to the same scores)
    _, plain_info = flash_prefill(q, k, v, alpha, bs, **kw, return_info=True)
    assert torch.equal(plain_info.block_count, info.block_count)
    assert torch.equal(plain_info.block_index, info.block_index)
    if kw.get("kv_start") is not None:  # rows before kv_start are 0
        for b, st in enumerate(kw["kv_start"].tolist()):
            assert (out[b, : max(st - (k.shape[1] - q.shape[1]), 0)] == 0).all()


# (batch, q_len, k_len, hq, hkv, dim, block): more key blocks than one stand-in chunk
LIST_SHAPES = [
    (1, 63, 63, 2, 1, 64, 16),
    (1, 300, 300, 4, 1, 80, 16),
    (1, 200, 600, 2, 2, 64, 16),
    (2, 129, 129, 4, 4, 64, 16),
]


@pytest.mark.parametrize("corr_flags", [True, False], ids=["flags", "walk"])
@pytest.mark.parametrize("corr_chunk", [16, 32])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", LIST_SHAPES, ids=[case_id(*s[:6], bs=s[6]) for s in LIST_SHAPES])
def test_sparse_attention_on_random_lists(shape, dtype, corr_chunk, corr_flags, device, monkeypatch):
    """Random lists without the diagonal and an empty list, junk past the counts, chunks of 16 and 32
    block ids (several chunks per row), listed ids from the flag map and from the list walk."""
    batch, q_len, k_len, hq, hkv, dim, bs = shape
    q, k, v, *_ = make_case((*shape, 0.0, (0, 0, 0), None, ()), dtype, device, seed=3)
    index, count = random_block_lists(batch, hq, q_len, k_len, bs, 0.3, device=device, keep_diagonal=False, seed=4)
    count[0, -1, count.shape[-1] // 2] = 0  # a slot with nothing listed still gets its stand-ins
    past = torch.arange(index.shape[-1], device=device) >= count[..., None]
    index = torch.where(past, torch.zeros_like(index), index)  # junk past the count must be ignored
    poisoned = poison_allocator(device, monkeypatch)
    out = torch.full_like(q, float("nan"))
    sparse_attention(q, k, v, index, count, bs, out=out, mean_correction=True,
                     config={"CORR_CHUNK": corr_chunk, "CORR_FLAGS": corr_flags})
    assert poisoned, "the stand-ins' block means were not pooled into poisoned buffers"
    want = oracle(q, k, v, index, count, bs)
    ref_lowp = sparse_attention_reference(q, k, v, index, count, bs, round_probs=True, mean_correction=True)
    assert_close_to_reference(out, want, ref_lowp, "sparse_attention(mean_correction=True)")
    budget = 3 * (ref_lowp.double() - want).abs().max().item() + 2e-5
    wrong = {rule: oracle(q, k, v, index, count, bs, rule=rule) for rule in ("none", "diagonal")}
    assert_discriminates(want, wrong, budget, "sparse_attention")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_nothing_skipped_changes_nothing(dtype, device, triton_calls):
    """alpha=0 (the pipeline skips the correction: every block is listed) and every block listed given
    to the kernel with the correction on (every chunk is computed, with nothing skipped): bit-equal
    outputs, with the flag map and with the list walk."""
    q, k, v, *_ = make_case((1, 300, 300, 4, 1, 64, 32, 0.0, (0, 0, 0), None, ()), dtype, device, seed=5)
    torch.testing.assert_close(flash_prefill(q, k, v, 0.0, 32, mean_correction=True),
                               flash_prefill(q, k, v, 0.0, 32), atol=0, rtol=0)
    index, count = random_block_lists(1, 4, 300, 300, 32, 1.0, device=device)
    plain = sparse_attention(q, k, v, index, count, 32)
    for flags in (True, False):
        corrected = sparse_attention(q, k, v, index, count, 32, mean_correction=True,
                                     config={"CORR_CHUNK": 16, "CORR_FLAGS": flags})
        torch.testing.assert_close(corrected, plain, atol=0, rtol=0, msg=f"CORR_FLAGS={flags}")
    ref = flash_prefill_reference(q.float(), k.float(), v.float(), 0.0, 32, mean_correction=True)
    torch.testing.assert_close(ref, flash_prefill_reference(q.float(), k.float(), v.float(), 0.0, 32), atol=0, rtol=0)


def chunked_lists(n_slots, heads, first_qb, n_blocks, device, seed):
    """Lists for slots ``first_qb + s``: sinks 0-1, ids 128-255 all listed (a chunk of 32, 64 or 128 ids
    with nothing skipped), about a fifth of the other ids, and the window ``qb - 1, qb``; junk past the
    counts."""
    gen = torch.Generator().manual_seed(seed)
    index = torch.full((1, heads, n_slots, n_blocks), 5, dtype=torch.int32)  # junk past the count
    count = torch.zeros(1, heads, n_slots, dtype=torch.int32)
    for h in range(heads):
        for s in range(n_slots):
            qb = first_qb + s
            some = (torch.rand(qb, generator=gen) < 0.2).nonzero().flatten().tolist()
            ids = sorted({0, 1, qb - 1, qb, *range(128, 256), *some})
            index[0, h, s, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
            count[0, h, s] = len(ids)
    return index.to(device), count.to(device)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_correction_knobs_give_the_reference(dtype, device):
    """CORR_CHUNK 32/64/128, CORR_FLAGS on/off, CORR_STAGES values: the same result as the oracle on
    rows that see ~300 key blocks (3 to 10 chunks), with ids skipped in several chunks and a chunk
    (ids 128-255) where nothing is skipped."""
    bs, q_len, k_len = 16, 40, 16 * 300
    q, k, v, *_ = make_case((1, q_len, k_len, 2, 1, 64, bs, 0.0, (0, 0, 0), None, ()), dtype, device, seed=8)
    first_qb = (k_len - q_len) // bs
    index, count = chunked_lists(3, 2, first_qb, k_len // bs, device, seed=9)
    want = oracle(q, k, v, index, count, bs)
    ref_lowp = sparse_attention_reference(q, k, v, index, count, bs, round_probs=True, mean_correction=True)
    budget = 3 * (ref_lowp.double() - want).abs().max().item() + 2e-5
    assert_discriminates(want, {"none": oracle(q, k, v, index, count, bs, rule="none")}, budget, "knobs")
    kbar, vbar = pool_keys(k, bs, v=v)
    for chunk, flags, stages in [(32, True, 2), (64, True, 3), (128, True, 1), (32, False, 2), (128, False, 2)]:
        cfg = {"CORR_CHUNK": chunk, "CORR_FLAGS": flags, "CORR_STAGES": stages}
        out = torch.full_like(q, float("nan"))
        sparse_attention(q, k, v, index, count, bs, out=out, mean_correction=True, kbar=kbar, vbar=vbar, config=cfg)
        assert_close_to_reference(out, want, ref_lowp, f"sparse_attention(mean_correction=True, config={cfg})")


@pytest.mark.parametrize("flags", [True, False], ids=["flags", "walk"])
def test_a_skipped_block_above_the_row_max(flags, device):
    """A skipped block whose keys align with every query: its stand-in sits ~10 (log2) above the listed
    keys' max, in the second of three chunks, so the pivot must move mid-loop: still the oracle's result."""
    dtype = DTYPES[0]
    bs, q_len, k_len = 16, 40, 16 * 96
    q, k, v, *_ = make_case((1, q_len, k_len, 2, 1, 64, bs, 0.0, (0, 0, 0), None, ()), dtype, device, seed=15)
    u = torch.nn.functional.normalize(torch.randn(64, generator=torch.Generator().manual_seed(16)), dim=0)
    q = q + (4 * u).to(device, dtype)
    k[:, 50 * bs : 51 * bs] = (20 * u).to(device, dtype)
    first_qb = (k_len - q_len) // bs
    index = torch.zeros(1, 2, 3, k_len // bs, dtype=torch.int32)
    for s in range(3):  # sinks and the window only: block 50 is skipped
        index[0, :, s, :4] = torch.tensor([0, 1, first_qb + s - 1, first_qb + s], dtype=torch.int32)
    index, count = index.to(device), torch.full((1, 2, 3), 4, dtype=torch.int32, device=device)
    want = oracle(q, k, v, index, count, bs)
    ref_lowp = sparse_attention_reference(q, k, v, index, count, bs, round_probs=True, mean_correction=True)
    budget = 3 * (ref_lowp.double() - want).abs().max().item() + 2e-5
    assert_discriminates(want, {"none": oracle(q, k, v, index, count, bs, rule="none")}, budget, "block 50")
    out = torch.full_like(q, float("nan"))
    sparse_attention(q, k, v, index, count, bs, out=out, mean_correction=True,
                     config={"CORR_CHUNK": 32, "CORR_FLAGS": flags, "CORR_STAGES": 2})
    assert_close_to_reference(out, want, ref_lowp, f"a dominant skipped block, CORR_FLAGS={flags}")


@pytest.mark.parametrize("corr_flags", [True, False], ids=["flags", "walk"])
def test_group_lists_in_a_batch(corr_flags, device):
    """One list per GQA group (``Hsel = Hkv``), two batch rows: each program finds its own list (and
    its row of the flag map)."""
    dtype = DTYPES[0]
    q, k, v, *_ = make_case((2, 200, 200, 4, 2, 64, 16, 0.0, (0, 0, 0), None, ()), dtype, device, seed=11)
    index, count = random_block_lists(2, 2, 200, 200, 16, 0.3, device=device, seed=12)
    out = sparse_attention(q, k, v, index, count, 16, mean_correction=True,
                           config={"CORR_CHUNK": 16, "CORR_FLAGS": corr_flags})
    want = oracle(q, k, v, index, count, 16)
    ref_lowp = sparse_attention_reference(q, k, v, index, count, 16, round_probs=True, mean_correction=True)
    assert_close_to_reference(out, want, ref_lowp, f"per-group lists, CORR_FLAGS={corr_flags}")
    swapped = oracle(q, k, v, index.flip(0), count.flip(0), 16)  # the other batch row's lists
    budget = 3 * (ref_lowp.double() - want).abs().max().item() + 2e-5
    assert_discriminates(want, {"swapped": swapped}, budget, "per-group lists")


@pytest.mark.parametrize("corr_flags", [True, False], ids=["flags", "walk"])
def test_partial_last_block_stand_in(corr_flags, device):
    """Rows past ``kv_end`` see every valid block as ``j < qb``, the keys' last, partial, block included:
    when their lists skip it, its stand-in counts its true length (``log n_j``, not ``log B``)."""
    dtype = DTYPES[0]
    q, k, v, *_ = make_case((2, 200, 200, 2, 1, 64, 16, 0.0, (0, 0, 0), None, ()), dtype, device, seed=13)
    start, end = torch.tensor([0, 10], device=device), torch.tensor([150, 183], device=device)  # 6 and 13 keys
    index, count = random_block_lists(2, 2, 200, 200, 16, 0.3, device=device, kv_start=start, kv_end=end,
                                      keep_diagonal=False, seed=14)
    last = (end - start - 1) // 16
    assert any(last[b] not in index[b, h, -1, : count[b, h, -1]] for b in range(2) for h in range(2))
    out = sparse_attention(q, k, v, index, count, 16, kv_start=start, kv_end=end, mean_correction=True,
                           config={"CORR_CHUNK": 16, "CORR_FLAGS": corr_flags})
    want = oracle(q, k, v, index, count, 16, kv_start=start, kv_end=end)
    ref_lowp = sparse_attention_reference(q, k, v, index, count, 16, None, start, end, round_probs=True,
                                          mean_correction=True)
    assert_close_to_reference(out, want, ref_lowp, f"right padding, CORR_FLAGS={corr_flags}")


def test_kept_flags_mark_exactly_the_listed_ids(device):
    """The flag map: 1 at every listed id, 0 elsewhere, whatever lies past the counts."""
    from fp_kernels.sparse_attention import kept_flags

    index, count = random_block_lists(2, 3, 200, 200, 16, 0.4, device=device, seed=10)
    count[1, 2, 4] = 0
    junk = torch.arange(index.shape[-1], device=device) >= count[..., None]
    index = torch.where(junk, torch.full_like(index, 3), index)
    want = torch.zeros(index.shape, dtype=torch.int8, device=device)
    for b, h, s in itertools.product(*map(range, count.shape)):
        want[b, h, s, index[b, h, s, : int(count[b, h, s])].long()] = 1
    assert torch.equal(kept_flags(index, count, index.shape[-1]), want)


@pytest.mark.parametrize("side", ["left", "both"])
def test_padded_rows_equal_rows_alone(side, device, monkeypatch, triton_calls):
    """Under kv_start/kv_end every row gets exactly what it gets alone (blocks from kv_start, n_j of
    valid keys only); a fully padded row is 0; nothing is NaN."""
    dtype = DTYPES[0]
    batch, length, bs = 4, 200, 16
    q, k, v, *_ = make_case((batch, length, length, 4, 2, 64, bs, 0.0, (0, 0, 0), None, ()), dtype, device, seed=6)
    lengths = torch.tensor([200, 131, 37, 0], device=device)
    start = {"left": length - lengths, "both": (length - lengths) // 2}[side]
    end = start + lengths if side == "both" else torch.full_like(lengths, length)
    rules = {"sink_blocks": 1, "window_blocks": 1, "last_dense_blocks": 1}
    poisoned = poison_allocator(device, monkeypatch)
    out = flash_prefill(q, k, v, 0.6, bs, **rules, kv_start=start, kv_end=end, mean_correction=True)
    assert poisoned and not torch.isnan(out).any()
    assert (out[3] == 0).all()
    for b in range(3):
        lo, hi = int(start[b]), int(end[b])
        alone = flash_prefill(q[b : b + 1, lo:hi], k[b : b + 1, lo:hi], v[b : b + 1, lo:hi], 0.6, bs, **rules,
                              mean_correction=True)
        torch.testing.assert_close(out[b, lo:hi], alone[0], atol=0, rtol=0)
        assert (out[b, :lo] == 0).all()


def test_pool_keys_pools_values_in_the_same_pass(device):
    q, k, v, *_ = make_case((2, 100, 100, 2, 2, 80, 32, 0.0, (0, 0, 0), None, ()), DTYPES[0], device)
    start, end = normalize_ranges(2, 100, torch.tensor([0, 30], device=device), None, device)
    kbar, vbar = pool_keys(k, 32, start, end, out_dtype=torch.float32, v=v)
    torch.testing.assert_close(kbar, pool_keys_reference(k, 32, start, end), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vbar, pool_keys_reference(v, 32, start, end), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pool_keys(k, 32, start, end, out_dtype=torch.float32), kbar, atol=0, rtol=0)


def test_mean_correction_must_be_a_bool():
    q = k = v = torch.randn(1, 32, 1, 64)
    for fn in (flash_prefill, flash_prefill_reference):
        with pytest.raises(TypeError, match="mean_correction"):
            fn(q, k, v, 0.3, 16, mean_correction=1)


def test_custom_op_fake_matches_real_with_mean_correction():
    device = "cuda" if ON_GPU else "cpu"
    q, k, v, *_ = make_case((1, 96, 96, 2, 1, 64, 32, 0.0, (0, 0, 0), None, ()), DTYPES[0], device)
    with short_failure():
        torch.library.opcheck(
            torch.ops.fp_kernels.flash_prefill.default, (q, k, v, None, None, 0.125, "auto", *BlockRules(
                alpha=0.3, block_size=32, sink_blocks=1, window_blocks=1, last_dense_blocks=1,
                mean_correction=True).as_scalars()),
            test_utils=("test_schema", "test_faketensor"),
        )


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="real sizes in bfloat16 need the GPU")
@pytest.mark.parametrize("group_select", [False, True], ids=["per-head", "per-group"])
def test_real_size_bf16_against_fp32_reference(group_select):
    """L=8192, 32/8 heads, D=128, bf16, alpha=0.18: the kernels against the fp32 reference on their own
    lists (tolerance: 3x the reference's own bf16 probability rounding), and the uncorrected operator
    selects the same blocks."""
    q, k, v = structured_qkv(1, 8192, 32, 8, 128, dtype=torch.bfloat16, device="cuda", topics=16, seed=7)
    out, info = flash_prefill(q, k, v, 0.18, group_select=group_select, mean_correction=True, return_info=True)
    plain, plain_info = flash_prefill(q, k, v, 0.18, group_select=group_select, return_info=True)
    assert torch.equal(plain_info.block_count, info.block_count)
    assert float(info.density.mean()) < 0.9
    ref32 = sparse_attention_reference(q.float(), k.float(), v.float(), info.block_index, info.block_count,
                                       mean_correction=True).cuda()
    ref_lowp = sparse_attention_reference(q, k, v, info.block_index, info.block_count, round_probs=True,
                                          mean_correction=True)
    assert_close_to_reference(out, ref32, ref_lowp, "bf16 8K")
    uncorrected = sparse_attention_reference(q.float(), k.float(), v.float(), info.block_index, info.block_count)
    assert (uncorrected.float() - ref32.float()).abs().max() > 10 * (out.float() - ref32.float()).abs().max()


# -- the Transformers layer ----------------------------------------------------------------------------


def test_config_field_round_trips_and_reaches_the_operator(monkeypatch):
    """``FlashPrefillConfig.mean_correction`` is validated, survives JSON and ``flashprefill eval``'s
    ``--impl flashprefill:mean_correction=true``, and the attention function passes it to the operator;
    on a tiny Llama with local attention the corrected logits are closer to the sdpa model's."""
    import fp_kernels
    from support.tiny_models import DTYPE, LOCAL, build_pair, forward, model_inputs

    import fp_patch
    from fp_patch.config import FlashPrefillConfig
    from fp_tools.evaluation.runner import Implementation, resolve_config

    cfg = FlashPrefillConfig(mean_correction=True)
    assert FlashPrefillConfig.from_json(cfg.to_json()) == cfg and not FlashPrefillConfig().mean_correction
    with pytest.raises(TypeError, match="mean_correction"):
        FlashPrefillConfig(mean_correction="yes")
    fp, ref = build_pair("llama", local=LOCAL)
    impl = Implementation.parse("flashprefill:mean_correction=true,label=corrected")
    assert resolve_config(fp, impl).mean_correction is True
    seen = []
    real = fp_kernels.flash_prefill

    def spy(*args, **kwargs):
        seen.append(kwargs["rules"].mean_correction)
        return real(*args, **kwargs)

    monkeypatch.setattr(fp_kernels, "flash_prefill", spy)
    inputs = model_inputs(fp, "llama", 384)
    plain = forward(fp, **inputs)
    fp_patch.configure(fp, mean_correction=True)
    corrected = forward(fp, **inputs)
    assert seen and not any(seen[: len(seen) // 2]) and all(seen[len(seen) // 2 :])
    dense = forward(ref, **inputs)
    err_plain, err_corrected = ((x - dense).norm() / dense.norm() for x in (plain, corrected))
    assert (corrected - plain).abs().max() > 1e-5
    if DTYPE == torch.float32:  # measured: 4.2e-4 -> 2.1e-4 (bfloat16 on the GPU rounds more than that)
        assert err_corrected < 0.75 * err_plain, (err_plain, err_corrected)
