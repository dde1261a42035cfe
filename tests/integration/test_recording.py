"""Density recording: the recorder reports what the operator computed, costs nothing when off, and
never changes the model's output.

Model-level tests use a tiny Llama (4 query / 2 kv heads, D=64) on the CPU with the PyTorch
reference operator and 16-token blocks, and sharpened query projections so that the block
selection is really sparse.
"""

from __future__ import annotations

import fp_kernels
import pytest
import torch
import transformers
from fp_kernels import block_scores_reference, flash_prefill
from transformers import AutoModelForCausalLM

import fp_patch
from fp_patch.recording import DensityRecorder, active_recorder, record_density

SETTINGS = {"block_size": 16, "min_sparse_len": 32, "backend": "reference", "alpha": 0.9}
N_LAYERS = 3


def tiny_model(attn: str = "flashprefill", **settings):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=256,
        intermediate_size=256,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=1024,
        pad_token_id=0,
        eos_token_id=None,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()
    with torch.no_grad():  # peaky attention: block scores differ, so selection is sparse
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
    if attn == "flashprefill":
        fp_patch.configure(model, **{**SETTINGS, **settings})
    return model


def ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 128, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def operator_calls(monkeypatch):
    """Every ``fp_kernels.flash_prefill`` call of the attention function: its inputs and its info."""
    calls = []
    original = fp_kernels.flash_prefill

    def spy(q, k, v, *args, return_info=False, **kwargs):
        out, info = original(q, k, v, *args, return_info=True, **kwargs)
        calls.append({"q": q.clone(), "k": k.clone(), "v": v.clone(), "args": args, "kwargs": kwargs, "info": info})
        return (out, info) if return_info else out

    monkeypatch.setattr(fp_kernels, "flash_prefill", spy)
    return calls


def test_recorded_density_equals_operator_info(operator_calls):
    model = tiny_model()
    with torch.no_grad(), record_density(model, block_maps=[2]) as rec:
        model(ids(300))
    frame = rec.to_frame()
    assert len(operator_calls) == N_LAYERS
    assert sorted(frame["layer"].unique()) == list(range(N_LAYERS))
    assert len(frame) == N_LAYERS * 4
    assert (frame["tokens"] == 300).all()
    assert frame["density"].between(0, 1).all() and frame["density"].min() < 0.9, "selection should be sparse"
    for layer, call in enumerate(operator_calls):
        # the same inputs through the public operator, independently of the model
        _, info = flash_prefill(call["q"], call["k"], call["v"], *call["args"], return_info=True, **call["kwargs"])
        rows = frame[frame["layer"] == layer].sort_values("head")
        assert rows["density"].tolist() == info.density[0].tolist()
        assert rows["blocks"].tolist() == info.block_count[0].sum(-1).tolist()
        visible = torch.isfinite(block_scores_reference(call["q"], call["k"], 16)).sum((-1, -2))
        assert rows["causal_blocks"].tolist() == visible[0].tolist()
    assert rec.density() == pytest.approx(frame["blocks"].sum() / frame["causal_blocks"].sum())
    # the block map of layer 2 and the scores behind it come from the same q/k
    last = operator_calls[2]
    _, info = flash_prefill(last["q"], last["k"], last["v"], *last["args"], return_info=True, **last["kwargs"])
    scores = block_scores_reference(last["q"], last["k"], 16, last["kwargs"]["scale"])
    for head in range(4):
        assert torch.equal(rec.block_mask(2, head), info.block_mask(0, head))
        assert torch.equal(rec.block_scores(2, head), scores[0, head])
        assert not (rec.always_kept(2) & ~rec.block_mask(2, head)).any(), "rule-forced blocks are computed"


@pytest.mark.parametrize("options", [{}, {"block_maps": True}, {"block_maps": True, "error": True}], ids=str)
def test_recording_leaves_outputs_bit_identical(options):
    model = tiny_model()
    x = ids(200, seed=3)
    with torch.no_grad():
        plain = model(x).logits
        with record_density(model, **options) as rec:
            recorded = model(x).logits
    assert torch.equal(plain, recorded)
    assert len(rec.to_frame()) == N_LAYERS * 4


def test_no_recorder_no_hooks_left():
    model = tiny_model()
    assert active_recorder() is None
    with record_density(model) as rec:
        assert active_recorder() is rec
        assert model._forward_pre_hooks and model._forward_hooks
    assert active_recorder() is None
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert not model.model._forward_pre_hooks and not model.model._forward_hooks


def test_generate_runs_and_fallback_reasons():
    model = tiny_model(dense_layers=[1])
    with torch.no_grad(), record_density(model) as rec:
        model.generate(ids(160), max_new_tokens=3, do_sample=False, pad_token_id=0)
    frame = rec.to_frame()
    assert set(frame["run"]) == {0}, "only the prefill is sparse"
    assert set(frame["layer"]) == {0, 2}
    fallbacks = rec.fallback_frame()
    assert set(fallbacks[fallbacks["run"] == 0]["reason"]) == {"dense_layer"}
    assert set(fallbacks[fallbacks["run"] > 0]["reason"]) == {"decode"}
    assert rec.runs == [0, 1, 2]
    layers = rec.layer_frame()
    assert list(layers["layer"]) == [0, 1, 2], "decode steps are not layers of the prefill table"
    assert layers.set_index("layer").loc[1, "reason"] == "dense_layer"
    assert layers.set_index("layer").loc[1, "density"] == 1.0
    text = rec.summary()
    assert "dense: dense_layer" in text and "decode x6 in 2 run(s)" in text
    assert f"{rec.density():.1%}" in text


def test_runs_of_several_lengths():
    model = tiny_model()
    with torch.no_grad(), record_density(model) as rec:
        for n in (128, 256):
            model(ids(n))
    frame = rec.to_frame()
    assert frame.groupby("run")["tokens"].first().tolist() == [128, 256]
    assert rec.density(run=0) != rec.density(run=1)


def test_records_only_its_model():
    model, other = tiny_model(), tiny_model()
    with torch.no_grad(), record_density(model) as rec, record_density(other) as rec_other:
        model(ids(100))
    assert len(rec.to_frame()) == N_LAYERS * 4
    assert len(rec_other.to_frame()) == 0
    assert "no sparse call recorded" in rec_other.summary()


# -- the recorder on its own (direct calls, as the attention function makes them) -------------------


def structured_qkv(batch=1, length=512, hq=4, hkv=2, dim=64, seed=0):
    """q/k where every query likes the keys 200..215 (a "vertical line"), so that selection is sparse."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(dim, generator=gen)
    q = torch.randn(batch, length, hq, dim, generator=gen) + u
    k = torch.randn(batch, length, hkv, dim, generator=gen) * 0.5
    v = torch.randn(batch, length, hkv, dim, generator=gen)
    k[:, 200:216] += 3.0 * u
    return q, k, v


def sparse_call(rec, layer, q, k, v, **kwargs):
    kwargs = {"alpha": 0.3, "block_size": 32, "backend": "reference", **kwargs}
    out, info = flash_prefill(q, k, v, return_info=True, **kwargs)

    def dense_fn():
        group = q.shape[2] // k.shape[2]
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2).repeat_interleave(group, 1),
            v.transpose(1, 2).repeat_interleave(group, 1),
            is_causal=True,
        )
        return ref.transpose(1, 2)

    rec.add_sparse(
        None,
        layer,
        info,
        q_len=q.shape[1],
        k_len=k.shape[1],
        out=out,
        dense_fn=dense_fn,
        q=q,
        k=k,
        kv_start=kwargs.get("kv_start"),
        kv_end=kwargs.get("kv_end"),
    )
    return out, info


def test_group_select_and_padded_batch_pooling():
    rec = DensityRecorder(None)
    q, k, v = structured_qkv(batch=2)
    kv_start = torch.tensor([0, 160])
    _, info = sparse_call(rec, 0, q, k, v, group_select=True, kv_start=kv_start)
    frame = rec.to_frame()
    visible = torch.isfinite(block_scores_reference(q, k, 32, kv_start=kv_start)).sum((-1, -2))  # [B, Hq]
    kept = info.block_count.sum(-1).repeat_interleave(2, dim=1)
    assert frame["causal_blocks"].tolist() == visible.sum(0).tolist()
    assert frame["blocks"].tolist() == kept.sum(0).tolist()
    expected = (info.density.double() * visible).sum(0) / visible.sum(0)
    assert frame["density"].tolist() == pytest.approx(expected.tolist(), abs=1e-6)
    assert frame["density"].tolist() == pytest.approx((frame["blocks"] / frame["causal_blocks"]).tolist(), abs=1e-7)
    assert frame["batch"].eq(2).all()
    # group selection: both heads of a kv group report the group's density
    assert frame["density"][0] == frame["density"][1] and frame["density"][2] == frame["density"][3]


@pytest.mark.parametrize("group_select", [False, True], ids=["per-head", "per-group"])
def test_right_padded_batch_counts_only_prompt_blocks(group_select):
    """Right padding: the slots of the padding queries are computed (and listed in block_count) but are
    not part of the prompt; blocks, causal_blocks and density count the prompt's query blocks only."""
    rec = DensityRecorder(None)
    q, k, v = structured_qkv(batch=2)
    kv_end = torch.tensor([512, 300])
    _, info = sparse_call(rec, 0, q, k, v, kv_end=kv_end, group_select=group_select)
    frame = rec.to_frame()
    prompt_blocks = [16, 10]  # ceil(kv_end / 32): query blocks 0..n-1 see key blocks 0..i
    visible = [n * (n + 1) // 2 for n in prompt_blocks]  # 136 + 55
    counts = info.block_count.long()
    if group_select:
        counts = counts.repeat_interleave(2, dim=1)
    computed = torch.stack([counts[b, :, :n].sum(-1) for b, n in enumerate(prompt_blocks)])  # [B, Hq]
    assert counts[1, :, 10:].sum() > 0, "padding query slots are computed: the case this test is about"
    assert info.visible_blocks.tolist() == [[visible[0]] * 4, [visible[1]] * 4]
    assert torch.equal(info.computed_blocks, computed)
    assert torch.equal(info.density, computed.float() / torch.tensor(visible, dtype=torch.float32)[:, None])
    assert frame["causal_blocks"].tolist() == [sum(visible)] * 4
    assert frame["blocks"].tolist() == computed.sum(0).tolist()
    assert frame["density"].tolist() == pytest.approx((computed.sum(0) / sum(visible)).tolist(), abs=1e-7)
    assert rec.density() == pytest.approx(computed.sum().item() / (4 * sum(visible)), abs=1e-12)


def test_error_mode_measures_relative_l2():
    rec = DensityRecorder(None, error=True)
    q, k, v = structured_qkv()
    out, _ = sparse_call(rec, 0, q, k, v)
    sparse_call(rec, 1, q, k, v, alpha=0.0)  # dense selection: error ~ float rounding
    frame = rec.to_frame()
    group = 2
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2).repeat_interleave(group, 1),
        v.transpose(1, 2).repeat_interleave(group, 1),
        is_causal=True,
    ).transpose(1, 2)
    expected = ((out - dense).norm(dim=(1, 3)) / dense.norm(dim=(1, 3)))[0]
    got = frame[frame["layer"] == 0]["rel_error"].tolist()
    assert got == pytest.approx(expected.tolist(), rel=1e-4)
    assert max(got) > 1e-3, "the sparse selection should change the output measurably"
    assert frame[frame["layer"] == 1]["rel_error"].max() < 1e-5
    layers = rec.layer_frame().set_index("layer")
    assert layers.loc[0, "rel_error"] == pytest.approx(((out - dense).norm() / dense.norm()).item(), rel=1e-4)
    assert "rel.err" in rec.summary()


def test_block_maps_and_scores():
    rec = DensityRecorder(None, block_maps=[1])
    q, k, v = structured_qkv()
    sparse_call(rec, 0, q, k, v)
    _, info = sparse_call(rec, 1, q, k, v)
    for head in range(4):
        assert torch.equal(rec.block_mask(1, head), info.block_mask(0, head))
        assert torch.equal(rec.block_scores(1, head), block_scores_reference(q, k, 32)[0, head])
    assert rec.wants_block_maps(1) and not rec.wants_block_maps(0)
    with pytest.raises(ValueError, match="block_maps"):
        rec.block_mask(0, 0)
    with pytest.raises(ValueError, match="head"):
        rec.block_mask(1, 9)


def test_block_scores_absent_without_q_k():
    rec = DensityRecorder(None, block_maps=True)
    q, k, v = structured_qkv()
    _, info = flash_prefill(q, k, v, alpha=0.3, block_size=32, return_info=True, backend="reference")
    rec.add_sparse(None, 0, info, q_len=512, k_len=512)
    assert rec.block_scores(0, 0) is None
    assert torch.equal(rec.block_mask(0, 2), info.block_mask(0, 2))


def test_recorder_stores_device_tensors_without_reading_them():
    """Nothing is moved to the host at record time; the first read does it once."""
    rec = DensityRecorder(None)
    q, k, v = structured_qkv()
    _, info = flash_prefill(q, k, v, alpha=0.3, block_size=32, return_info=True, backend="reference")
    rec.add_sparse(None, 0, info, q_len=512, k_len=512)
    assert rec._sparse[0].density.data_ptr() == info.density.data_ptr()  # a reference, not a copy
    assert rec._host is None
    rec.to_frame()
    assert rec._host is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_sync_while_recording_on_gpu():
    q, k, v = (t.cuda().half() for t in structured_qkv())
    _, info = flash_prefill(q, k, v, alpha=0.3, block_size=32, return_info=True)
    rec = DensityRecorder(None, block_maps=True, error=True)
    out = torch.zeros_like(q)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        rec.add_sparse(None, 0, info, q_len=512, k_len=512, out=out, dense_fn=lambda: out, q=q, k=k)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert rec.to_frame()["density"].tolist() == info.density[0].float().cpu().tolist()


def test_option_validation():
    with pytest.raises(TypeError, match="block_maps"):
        DensityRecorder(None, block_maps="all")
    with pytest.raises(TypeError, match="error"):
        DensityRecorder(None, error=1)


def test_nested_recorders_both_receive_calls():
    q, k, v = structured_qkv()
    _, info = flash_prefill(q, k, v, alpha=0.3, block_size=32, return_info=True, backend="reference")
    with record_density(None) as outer, record_density(None) as inner:
        active_recorder().add_sparse(None, 0, info, q_len=512, k_len=512)
        active_recorder().add_fallback(None, 1, "dense_layer", q_len=512, k_len=512)
    assert len(outer.to_frame()) == len(inner.to_frame()) == 4
    assert len(outer.fallback_frame()) == len(inner.fallback_frame()) == 1


@pytest.mark.parametrize("where", ["model", "forward"])
def test_compiled_forward_warns_that_nothing_was_recorded(where, caplog):
    """Under torch.compile the attention function records nothing: the recorder says so once, at exit,
    whether the hooks were traced (torch.compile(model)) or ran eagerly around a compiled forward."""
    import logging

    torch._dynamo.reset()
    model = tiny_model()
    if where == "model":
        run = torch.compile(model, backend="eager")
    else:
        model.forward = torch.compile(model.forward, backend="eager")
        run = model
    with caplog.at_level(logging.WARNING, logger="fp_patch.recording"):
        with torch.no_grad(), record_density(model) as rec:
            run(ids(100))
            run(ids(100))
    # the recorder's own lines (on a GPU the attention function also logs a compiled_mask fallback)
    ours = [r for r in caplog.records if r.name == "fp_patch.recording"]
    messages = [r.getMessage() for r in ours if "torch.compile" in r.getMessage()]
    assert len(messages) == 1 and "recording is empty" in messages[0]
    assert len(rec.to_frame()) == 0
    caplog.clear()
    eager = tiny_model()
    with caplog.at_level(logging.WARNING, logger="fp_patch.recording"):  # eager: recorded, no warning
        with torch.no_grad(), record_density(eager) as rec:
            eager(ids(100))
    assert len(rec.to_frame()) and not [r for r in caplog.records if "torch.compile" in r.getMessage()]
    torch._dynamo.reset()

