"""attn_implementation="flashprefill" on tiny models of the seven supported families, against "sdpa".

On a CPU-only machine the models run in float32 with ``backend="reference"`` (the pure-PyTorch
operator); with a GPU (or ``FLASHPREFILL_TEST_DEVICE=cuda``) the same tests run in bfloat16 through
the Triton kernels (``backend="triton"``: an error, not a silent fallback, if they cannot run). Blocks are
small (16 tokens), so a few hundred tokens make many blocks. A spy recorder (the contract of
``fp_patch.recording``) sees every call of the attention function: which module, sparse or dense,
the density, the fallback reason.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch
import transformers
from support.kernel_checks import short_failure
from support.tiny_models import (
    DEVICE,
    DTYPE,
    LOCAL,
    LOCAL_SHARP,
    TEST_SETTINGS,
    VL_FAMILIES,
    VOCAB,
    build,
    build_pair,
    forward,
    model_inputs,
    needs_cuda,
    on_device,
    padded_batch,
    positions,
    text_ids,
    tiny_config,
)
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, DynamicCache

import fp_patch
from fp_patch import attention as fp_attention
from fp_patch.config import is_decoder_attention

FAMILIES = ["llama", "qwen2", "qwen3", "qwen3_moe", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"]
# "equal to sdpa": float32 agrees to rounding; bfloat16 to its own precision
TOL = {"atol": 1e-4, "rtol": 1e-4} if DTYPE == torch.float32 else {"atol": 4e-2, "rtol": 4e-2}
MOE_FAMILIES = {"qwen3_moe", "qwen3_vl_moe"}


def assert_equal_to_sdpa(got: torch.Tensor, want: torch.Tensor, family: str) -> None:
    """Logits "equal to sdpa". In bfloat16 a mixture-of-experts router's top-k is discontinuous: a
    rounding difference can send a few tokens to other experts (seen on the H100 for qwen3_vl_moe:
    29 of 69632 logits off by <= 0.12), so there at most 1 % of the logits may leave the tolerance,
    none by more than 0.5. Everything else must be within the tolerance."""
    if DTYPE == torch.float32 or family not in MOE_FAMILIES:
        torch.testing.assert_close(got, want, **TOL)
        return
    off = (got.float() - want.float()).abs() > TOL["atol"] + TOL["rtol"] * want.float().abs()
    assert off.float().mean() < 0.01, f"{int(off.sum())} of {off.numel()} logits differ"
    assert (got.float() - want.float()).abs().max() < 0.5

class SpyRecorder:
    """Implements the recorder contract of fp_patch.recording and keeps every call."""

    wants_info = True

    def __init__(self):
        self.calls = []

    def add_sparse(self, module, layer_idx, info, *, q_len, k_len, out=None, dense_fn=None, **_):
        self.calls.append({"kind": "sparse", "module": module, "layer": layer_idx, "q_len": q_len,
                           "k_len": k_len, "density": info.density.clone(), "reason": None})

    def add_fallback(self, module, layer_idx, reason, *, q_len, k_len):
        self.calls.append({"kind": "dense", "module": module, "layer": layer_idx, "q_len": q_len,
                           "k_len": k_len, "density": None, "reason": reason})

    def sparse(self, **match):
        return [c for c in self.calls if c["kind"] == "sparse" and all(c[k] == v for k, v in match.items())]

    def reasons(self) -> set:
        return {c["reason"] for c in self.calls if c["kind"] == "dense"}

    def clear(self):
        self.calls.clear()


@pytest.fixture
def spy(monkeypatch):
    rec = SpyRecorder()
    monkeypatch.setattr(fp_attention, "active_recorder", lambda: rec)
    return rec


def decoder_layers(model) -> set:
    return {m.layer_idx for m in model.modules() if is_decoder_attention(m)}



def greedy(model, max_new_tokens: int = 6, **inputs):
    with torch.no_grad():
        out = model.generate(**on_device(inputs), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return out[:, inputs["input_ids"].shape[1]:].cpu()


# -- names and routing on the real models ----------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_runs_on_decoder_layers_never_on_vision(family, spy):
    model = build(family, "flashprefill")
    fp_patch.configure(model, **TEST_SETTINGS)
    assert fp_patch.uses_flashprefill(model)
    vision_calls = []
    if family in VL_FAMILIES:
        assert model.config.vision_config._attn_implementation == "sdpa"
        assert model.config.text_config._attn_implementation == fp_patch.INTERNAL_NAME
        for module in model.model.visual.modules():
            if type(module).__name__.endswith("VisionAttention"):
                module.register_forward_hook(lambda *_: vision_calls.append(1))
    forward(model, **model_inputs(model, family, 96))
    assert spy.calls, "the registered attention function never ran"
    assert all(is_decoder_attention(c["module"]) for c in spy.calls)
    assert {c["layer"] for c in spy.sparse(q_len=96)} == decoder_layers(model)
    if family in VL_FAMILIES:
        assert len(vision_calls) == 2, "the vision tower did not run"


@pytest.mark.parametrize("family", FAMILIES)
def test_alpha0_equals_sdpa(family, spy):
    fp, ref = build_pair(family, alpha=0.0)
    inputs = model_inputs(fp, family, 96)
    torch.testing.assert_close(forward(fp, **inputs), forward(ref, **inputs), **TOL)
    prefill = spy.sparse(q_len=96)
    assert {c["layer"] for c in prefill} == decoder_layers(fp)
    assert all(bool((c["density"] == 1).all()) for c in prefill)
    spy.clear()
    assert torch.equal(greedy(fp, **inputs), greedy(ref, **inputs))
    assert spy.sparse(q_len=96) and spy.reasons() == {"decode"}


@pytest.mark.parametrize("family", FAMILIES)
def test_default_alpha_is_sparse_and_close(family, spy):
    fp, ref = build_pair(family, local=LOCAL)
    assert fp_patch.get_config(fp).alpha == fp_patch.MODEL_DEFAULTS[family]["alpha"]
    inputs = model_inputs(fp, family, 384)
    out, expected = forward(fp, **inputs), forward(ref, **inputs)
    calls = spy.sparse(q_len=384)
    assert {c["layer"] for c in calls} == decoder_layers(fp)
    density = torch.stack([c["density"] for c in calls])
    assert bool((density < 1).any()) and density.mean() < 0.95, f"nothing skipped (density {density.mean():.2f})"
    # dropped blocks carry little mass in these models: logits move by a few % of their spread
    err = (out - expected).abs().max()
    assert err < 0.1 * expected.std(), f"max logit error {err:.4f} vs spread {expected.std():.4f}"
    assert (out.argmax(-1) == expected.argmax(-1)).float().mean() > 0.97


# -- padding, chunked prefill, caches --------------------------------------------------------------



@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch(family, side, spy):
    n_long, n_short = 160, 112
    ids, mask, short_ids = padded_batch(n_long, n_short, side)
    valid = mask.bool()
    extra = {} if family in VL_FAMILIES else {"position_ids": positions(mask)}
    # alpha = 0: the padded batch equals sdpa on every real token
    fp, ref = build_pair(family, alpha=0.0)
    assert_equal_to_sdpa(
        forward(fp, input_ids=ids, attention_mask=mask, **extra)[valid],
        forward(ref, input_ids=ids, attention_mask=mask, **extra)[valid],
        family,
    )
    # default alpha, really sparse: the padded row gets exactly what it gets alone (blocks are laid out
    # from its first real token), and the batch never falls back to dense
    fp, _ = build_pair(family, local=LOCAL_SHARP)
    spy.clear()
    batch = forward(fp, input_ids=ids, attention_mask=mask, **extra)
    assert not spy.reasons() and {c["layer"] for c in spy.sparse(q_len=n_long)} == decoder_layers(fp)
    assert bool((torch.stack([c["density"] for c in spy.calls]) < 1).any())
    alone = forward(fp, input_ids=short_ids)
    torch.testing.assert_close(batch[1][valid[1]], alone[0], **TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill(family, spy):
    """The prompt fed in two pieces on one DynamicCache: the second piece has Lq < Lk."""
    ids = text_ids(192)
    first, second = ids[:, :128], ids[:, 128:]

    def run(model):
        cache = DynamicCache()
        with torch.no_grad():
            model(input_ids=first.to(DEVICE), past_key_values=cache, use_cache=True)
            return model(input_ids=second.to(DEVICE), past_key_values=cache, use_cache=True).logits.float().cpu()

    fp, ref = build_pair(family, alpha=0.0)
    assert_equal_to_sdpa(run(fp), run(ref), family)
    assert {c["layer"] for c in spy.sparse(q_len=64, k_len=192)} == decoder_layers(fp)
    # really sparse: close to dense, with blocks skipped
    fp, ref = build_pair(family, local=LOCAL_SHARP)
    spy.clear()
    out, expected = run(fp), run(ref)
    calls = spy.sparse(q_len=64, k_len=192)
    assert calls and not spy.reasons()
    assert bool((torch.stack([c["density"] for c in calls]) < 1).any())
    assert (out - expected).abs().max() < 0.1 * expected.std()


@pytest.mark.parametrize("family", FAMILIES)
def test_static_cache_generate(family, spy):
    """StaticCache prefill (mask None, Lk = max_cache_len > Lq) is sparse on the real keys only."""
    fp, ref = build_pair(family, alpha=0.0)
    inputs = model_inputs(fp, family, 96)
    tokens = greedy(fp, cache_implementation="static", **inputs)
    assert torch.equal(tokens, greedy(ref, cache_implementation="static", **inputs))
    assert torch.equal(tokens, greedy(fp, **inputs))  # DynamicCache gives the same tokens
    assert {c["layer"] for c in spy.sparse(q_len=96, k_len=96)} == decoder_layers(fp)


@pytest.mark.parametrize("family", ["llama", "qwen2_5_vl"])
def test_static_cache_left_padded_generate(family, spy):
    """Left-padded batch on a StaticCache: the mask is [B, 1, Lq, max_cache_len]; keys past the
    prompt are cut off and each row keeps its own range."""
    ids, mask, _ = padded_batch(96, 64, "left")
    fp, ref = build_pair(family, alpha=0.0)
    tokens = greedy(fp, input_ids=ids, attention_mask=mask, cache_implementation="static")
    assert torch.equal(tokens, greedy(ref, input_ids=ids, attention_mask=mask, cache_implementation="static"))
    assert {c["layer"] for c in spy.sparse(q_len=96, k_len=96)} == decoder_layers(fp)
    assert "mask_not_range" not in spy.reasons()


def test_sliding_window_layers_run_dense(spy):
    """Qwen2 with a sliding window on layer 1: layer 0 sparse, layer 1 dense SDPA with its window mask."""
    configs = []
    for _ in range(2):
        config = tiny_config("qwen2")
        config.use_sliding_window, config.sliding_window, config.max_window_layers = True, 48, 1
        config.layer_types = ["full_attention", "sliding_attention"]
        configs.append(config)
    torch.manual_seed(0)
    fp = AutoModelForCausalLM.from_config(configs[0], attn_implementation="flashprefill").eval().to(DEVICE, DTYPE)
    ref = AutoModelForCausalLM.from_config(configs[1], attn_implementation="sdpa").eval().to(DEVICE, DTYPE)
    ref.load_state_dict(fp.state_dict())
    fp_patch.configure(fp, **TEST_SETTINGS, alpha=0.0)
    inputs = {"input_ids": text_ids(160)}
    torch.testing.assert_close(forward(fp, **inputs), forward(ref, **inputs), **TOL)
    assert [c["layer"] for c in spy.sparse(q_len=160)] == [0]
    assert [(c["layer"], c["reason"]) for c in spy.calls if c["kind"] == "dense"] == [(1, "sliding_window")]


# -- switching, configuration ----------------------------------------------------------------------


def test_set_attn_implementation_at_runtime(spy):
    model = build("qwen2_5_vl", "sdpa")
    model.set_attn_implementation("flashprefill")
    assert model.config.text_config._attn_implementation == fp_patch.INTERNAL_NAME
    assert model.config.vision_config._attn_implementation == "sdpa"
    assert model.model.visual.config._attn_implementation == "sdpa"
    fp_patch.configure(model, **TEST_SETTINGS)
    inputs = model_inputs(model, "qwen2_5_vl", 96)
    forward(model, **inputs)
    assert spy.sparse(q_len=96) and all(is_decoder_attention(c["module"]) for c in spy.calls)
    model.set_attn_implementation("sdpa")
    assert not fp_patch.uses_flashprefill(model)
    spy.clear()
    forward(model, **inputs)
    assert not spy.calls
    model.set_attn_implementation({"text_config": "flashprefill", "vision_config": "sdpa"})
    assert model.config.text_config._attn_implementation == fp_patch.INTERNAL_NAME
    forward(model, **inputs)
    assert spy.sparse(q_len=96)


def test_configured_at_load_time(tmp_path):
    build("llama", "sdpa").save_pretrained(tmp_path)
    with fp_patch.configured(alpha=0.3, dense_layers=[0]):
        model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="flashprefill")
    other = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="flashprefill")
    assert fp_patch.get_config(model).alpha == 0.3 and fp_patch.get_config(model).dense_layers == (0,)
    assert fp_patch.get_config(other) == fp_patch.model_defaults(other.config)
    cfg = fp_patch.FlashPrefillConfig(alpha=0.05, block_size=64)
    with fp_patch.configured(cfg):
        vl = AutoModelForImageTextToText.from_config(tiny_config("qwen3_vl"), attn_implementation="flashprefill")
    assert fp_patch.get_config(vl) == cfg
    # configure() afterwards applies on top of the current settings
    assert fp_patch.configure(model, block_size=32) == fp_patch.model_defaults(model.config).replace(
        alpha=0.3, dense_layers=(0,), block_size=32
    )
    # the same settings again keep their object (a layer's repeated calls key on it), new ones do not
    current = fp_patch.get_config(model)
    assert fp_patch.configure(model, block_size=32) is current and fp_patch.configure(model, current) is current
    assert fp_patch.configure(model, block_size=64) is not current


def test_configure_routes_dense_layers_and_layer_alpha(spy):
    fp, ref = build_pair("llama", local=LOCAL, dense_layers=[0], layer_alpha={1: 0.0})
    inputs = model_inputs(fp, "llama", 384)
    torch.testing.assert_close(forward(fp, **inputs), forward(ref, **inputs), **TOL)
    assert {c["layer"] for c in spy.calls if c["reason"] == "dense_layer"} == {0}
    (layer1,) = spy.sparse(layer=1)
    assert bool((layer1["density"] == 1).all())  # alpha 0 on layer 1
    with pytest.raises(TypeError):
        fp_patch.configure(fp, {"alpha": 0.1})
    with pytest.raises(ValueError, match="alpha"):
        fp_patch.configure(fp, alpha=2.0)


def test_unknown_model_type_uses_generic_defaults(caplog, spy):
    config = transformers.MistralConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=VOCAB,
                                        sliding_window=None)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="flashprefill").eval().to(DEVICE, DTYPE)
    with caplog.at_level("INFO", logger="fp_patch.config"):
        # the generic defaults (with the small-model min_sparse_len: this model's hidden size is 128)
        assert fp_patch.get_config(model) == fp_patch.FlashPrefillConfig().replace(
            min_sparse_len=fp_patch.model_defaults(model.config).min_sparse_len)
    assert any("mistral" in r.getMessage() for r in caplog.records)
    fp_patch.configure(model, **TEST_SETTINGS)
    forward(model, input_ids=text_ids(64))
    assert {c["layer"] for c in spy.sparse(q_len=64)} == {0, 1}


def test_register_is_idempotent_and_unregister_undoes_it():
    from transformers import PretrainedConfig

    setter = PretrainedConfig.__dict__["_attn_implementation"].fset
    fp_patch.register()
    assert PretrainedConfig.__dict__["_attn_implementation"].fset is setter
    try:
        fp_patch.unregister()
        with pytest.raises((ValueError, ImportError)):
            build("llama", "flashprefill")
        assert PretrainedConfig.__dict__["_attn_implementation"].fset is not setter
    finally:
        fp_patch.register()
    assert fp_patch.uses_flashprefill(build("llama", "flashprefill"))


# -- torch.compile ---------------------------------------------------------------------------------


def graph_spy(graphs: list):
    """A torch.compile backend that appends each graph's code to ``graphs`` and runs it with aot_eager
    (which traces with fake tensors, so the custom op's fake implementation is exercised, without C++
    codegen). A function, not an object: Transformers deep-copies the compile config."""

    def backend(gm, example_inputs, **_):
        graphs.append(gm.code)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    return backend


@pytest.mark.slow
def test_torch_compile_fullgraph(spy, caplog):
    """fullgraph=True compiles through the attention function: an unpadded prefill traces the sparse
    custom op; a call with a mask traces the dense route (checking a mask would need a host sync),
    and says so once in the log, at trace time."""
    torch._dynamo.reset()
    fp_attention.log_once.cache_clear()
    fp, ref = build_pair("llama", alpha=0.0)
    ids = text_ids(64)
    graphs = []
    compiled = torch.compile(fp, fullgraph=True, backend=graph_spy(graphs))
    mask = torch.ones_like(ids)
    mask[:, :8] = 0
    valid = mask[0].bool()
    with caplog.at_level(logging.WARNING, logger="fp_patch.attention"), short_failure():
        torch.testing.assert_close(forward(compiled, input_ids=ids), forward(ref, input_ids=ids), **TOL)
        torch.testing.assert_close(
            forward(compiled, input_ids=ids, attention_mask=mask)[:, valid],
            forward(ref, input_ids=ids, attention_mask=mask)[:, valid],
            **TOL,
        )
    assert len(graphs) == 2
    # transformers 4.57 (and 5.17, seen on the H100) materialise a mask for every compiled prefill, which
    # routes dense with the logged reason checked below; 5.23 passes None when unpadded: sparse op traced
    version = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    if version >= (5, 23):
        assert "fp_kernels.flash_prefill" in graphs[0]
    elif version < (5, 0):
        assert "fp_kernels.flash_prefill" not in graphs[0]
    assert "fp_kernels.flash_prefill" not in graphs[1]
    assert [r.getMessage() for r in caplog.records if "compiled_mask" in r.getMessage()]
    torch._dynamo.reset()


@pytest.mark.slow
def test_generate_static_cache_compiled(spy):
    """generate() with a StaticCache and its own torch.compile (fullgraph=True): the decode steps are
    compiled (dense route, no graph break), the prefill runs eagerly and sparse."""
    from transformers import CompileConfig

    torch._dynamo.reset()
    fp, ref = build_pair("llama", alpha=0.0)
    ids = text_ids(64)
    graphs = []
    compile_config = CompileConfig(fullgraph=True, backend=graph_spy(graphs), mode=None, dynamic=False)
    compile_config._compile_all_devices = True  # Transformers compiles on GPUs only unless told
    tokens = greedy(fp, input_ids=ids, cache_implementation="static", compile_config=compile_config)
    assert torch.equal(tokens, greedy(ref, input_ids=ids, cache_implementation="static"))
    assert graphs, "generate did not compile the decode step"
    assert {c["layer"] for c in spy.sparse(q_len=64, k_len=64)} == decoder_layers(fp)
    torch._dynamo.reset()


# -- GPU only: no host sync on the sparse path, inductor + CUDA graphs ---------------------------------

def syncs_in_our_code(caught) -> list[str]:
    """``file:line`` of the synchronizing-operation warnings (sync debug mode "warn") raised by
    fp_patch / fp_kernels code."""
    import fp_kernels

    roots = {os.path.dirname(os.path.realpath(p.__file__)) for p in (fp_patch, fp_kernels)}
    ours = []
    for w in caught:
        if "synchroniz" not in str(w.message):
            continue
        path = os.path.realpath(w.filename)
        if any(path.startswith(root + os.sep) for root in roots):
            ours.append(f"{os.path.basename(os.path.dirname(path))}/{os.path.basename(path)}:{w.lineno}")
    return ours


@pytest.mark.gpu
@needs_cuda
def test_sparse_prefill_has_no_host_sync(triton_pipeline_calls):
    """An unpadded prefill (B=1, mask None) runs the Triton pipeline on every layer with no host sync
    anywhere in the forward: under ``torch.cuda.set_sync_debug_mode("error")`` any ``.item()``,
    ``.tolist()``, ``.cpu()`` or stream synchronisation raises."""
    fp, ref = build_pair("llama", local=LOCAL)  # TEST_SETTINGS: backend="triton"
    n = 384
    assert n >= fp_patch.get_config(fp).min_sparse_len
    ids = text_ids(n).to(DEVICE)
    pipeline_calls = triton_pipeline_calls
    with torch.no_grad():
        fp(input_ids=ids)  # warm-up: Triton compilation and autotuning synchronise by design
        torch.cuda.synchronize()
        pipeline_calls.clear()
        # the mode really catches syncs (else this test could not fail)
        torch.cuda.set_sync_debug_mode("error")
        try:
            with pytest.raises(RuntimeError, match="synchroniz"):
                torch.ones(1, device=DEVICE).item()
            logits = fp(input_ids=ids).logits
        finally:
            torch.cuda.set_sync_debug_mode(0)
        expected = ref(input_ids=ids).logits
    assert len(pipeline_calls) == len(decoder_layers(fp)), "the sparse Triton pipeline did not run on every layer"
    assert (logits.float() - expected.float()).abs().max() < 0.1 * expected.float().std()


@pytest.mark.gpu
@needs_cuda
def test_padded_prefill_syncs_once_per_forward(triton_pipeline_calls):
    """A padded batch gets a bool mask, which is checked (it must be a causal key range per row) and
    read into per-row ``kv_start``/``kv_end``: exactly one host sync per forward pass in our code (the
    first layer; the other layers reuse the result for the same mask tensor), none in the kernels."""
    import warnings

    fp, _ = build_pair("llama", local=LOCAL_SHARP)
    ids, mask, _ = padded_batch(160, 112, "left")
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    pipeline_calls = triton_pipeline_calls
    with torch.no_grad():
        fp(input_ids=ids, attention_mask=mask)  # warm-up (compilation, autotuning)
        torch.cuda.synchronize()
        pipeline_calls.clear()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fp(input_ids=ids, attention_mask=mask)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert len(pipeline_calls) == len(decoder_layers(fp))
    ours = syncs_in_our_code(caught)
    assert len(ours) == 1 and ours[0].startswith("fp_patch/masks.py"), ours


@pytest.mark.slow
@pytest.mark.gpu
@needs_cuda
def test_generate_static_cache_inductor_reduce_overhead(spy):
    """generate() with a StaticCache and Transformers' own compilation on the inductor backend with
    ``mode="reduce-overhead"`` (CUDA graphs) for the decode steps: the prefill is sparse (Triton), the
    compiled decode steps route dense, and the tokens equal sdpa's under the same compilation."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    def run(model):
        torch._dynamo.reset()
        counters.clear()
        config = CompileConfig(fullgraph=True, backend="inductor", mode="reduce-overhead", dynamic=False)
        with short_failure():
            tokens = greedy(model, max_new_tokens=8, input_ids=ids, cache_implementation="static",
                            compile_config=config)
        assert counters["stats"]["unique_graphs"] >= 1, "generate did not compile the decode step"
        return tokens

    fp, ref = build_pair("llama", alpha=0.0)
    ids = text_ids(96)
    tokens = run(fp)
    assert {c["layer"] for c in spy.sparse(q_len=96, k_len=96)} == decoder_layers(fp)
    assert torch.equal(tokens, run(ref))
    torch._dynamo.reset()
