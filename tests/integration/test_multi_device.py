"""attn_implementation="flashprefill" inside the engines that spread a model over devices.

* accelerate's dispatch (what ``from_pretrained(device_map=...)`` uses): every decoder layer gets an
  ``AlignDevicesHook`` that moves the layer's inputs to its execution device. On this CPU-only
  machine every module is mapped to ``"cpu"`` with ``force_hooks=True`` so that the hooks really
  wrap the layers; a second hook then copies every layer input, as the move to another GPU does
  (each layer on a second device receives its own copy of the attention mask).
* Transformers' tensor parallelism: two CPU processes (gloo) load the model with its own TP plan;
  each rank holds whole heads, so the per-head block selection runs per rank without communication
  and must equal the unsharded model's selection for the same heads.

With two CUDA devices, two more tests launch the kernels on tensors of the second GPU while the first
is current, and split a bf16 model over both GPUs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from support.tiny_models import make_attention_local, padded_batch, positions, text_ids
from transformers import AutoModelForCausalLM

import fp_patch
from fp_patch import masks as fp_masks

accelerate = pytest.importorskip("accelerate")
from accelerate.hooks import AlignDevicesHook, ModelHook, SequentialHook, add_hook_to_module  # noqa: E402

LAYERS, HEADS, KV_HEADS, HEAD_DIM = 4, 4, 2, 64
SETTINGS = {"block_size": 16, "min_sparse_len": 32, "backend": "reference"}
TOL = {"atol": 1e-4, "rtol": 1e-4}  # float32: equal up to rounding
LOCAL = 15.0  # sharpness of make_attention_local: the default alpha skips blocks, logits stay close
WORKER = Path(__file__).with_name("multi_device_worker.py")
TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


def tiny_llama(attn: str, local: bool = False, seed: int = 0):
    """A 4-layer Llama, 4/2 heads of 64 (a head dim the kernels take; 2 heads per rank under TP)."""
    config = transformers.LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, vocab_size=256, max_position_embeddings=4096,
        pad_token_id=0, bos_token_id=1, eos_token_id=None,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()
    if local:
        make_attention_local(model, sharpness=LOCAL)
    return model


def pair(local: bool = False, **settings):
    """``(flashprefill model, sdpa model)`` with the same weights."""
    fp = tiny_llama("flashprefill", local=local)
    ref = tiny_llama("sdpa", seed=1)
    ref.load_state_dict(fp.state_dict())
    fp_patch.configure(fp, **{**SETTINGS, **settings})
    return fp, ref


def module_device_map(model, device) -> dict:
    """One entry per top-level module and per decoder layer (what ``device_map="auto"`` produces);
    ``device`` is one device for all, or a callable ``layer index -> device`` for the layers."""
    per_layer = device if callable(device) else (lambda _i: device)
    first, last = per_layer(0), per_layer(LAYERS - 1)
    layers = {f"model.layers.{i}": per_layer(i) for i in range(LAYERS)}
    return {"model.embed_tokens": first, "model.rotary_emb": first, **layers, "model.norm": last, "lm_head": last}


def dispatch_on_cpu(model):
    accelerate.dispatch_model(model, device_map=module_device_map(model, "cpu"), force_hooks=True)
    # accelerate warns "Some parameters are on the meta device" whenever "cpu" is in the map; none is
    assert all(p.device.type == "cpu" for p in model.parameters())
    for layer in model.model.layers:
        assert isinstance(layer._hf_hook, AlignDevicesHook), "the layers are not wrapped by accelerate's hooks"
    return model


def logits(model, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits.float().cpu()


def layer_density(rec) -> torch.Tensor:
    """``[layers, heads]`` recorded densities."""
    frame = rec.to_frame()
    return torch.tensor(frame.pivot(index="layer", columns="head", values="density").values)


class CopyInputsHook(ModelHook):
    """A fresh copy of every tensor input of the layer at each call: what ``AlignDevicesHook`` hands a
    layer whose execution device is not where the model's forward made the tensors (each layer on
    the second GPU gets its own copy of the attention mask, of cos/sin...)."""

    def pre_forward(self, module, *args, **kwargs):
        def copy(x):
            if isinstance(x, torch.Tensor):
                return x.clone()
            if isinstance(x, tuple):
                return tuple(copy(y) for y in x)
            return x

        return copy(args), {name: copy(value) for name, value in kwargs.items()}


def count_mask_analyses(monkeypatch) -> list:
    calls = []
    analyse = fp_masks.analyse_mask

    def counting(*args, **kwargs):
        calls.append(1)
        return analyse(*args, **kwargs)

    monkeypatch.setattr(fp_masks, "analyse_mask", counting)
    fp_masks.clear_cache()
    return calls


# -- accelerate hooks (device_map) ------------------------------------------------------------------


def test_dispatched_alpha0_equals_sdpa_and_records():
    fp, ref = pair(alpha=0.0)
    dispatch_on_cpu(fp)
    ids = text_ids(160)
    with fp_patch.record_density(fp) as rec:
        torch.testing.assert_close(logits(fp, input_ids=ids), logits(ref, input_ids=ids), **TOL)
    density = layer_density(rec)
    assert density.shape == (LAYERS, HEADS) and bool((density == 1).all())
    assert rec.runs == [0] and not len(rec.fallback_frame())
    # left padding: the mask reaches the attention function through the hooks
    ids, mask, _ = padded_batch(160, 112, "left")
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask)}
    valid = mask.bool()
    torch.testing.assert_close(logits(fp, **inputs)[valid], logits(ref, **inputs)[valid], **TOL)


def test_dispatched_sparse_equals_undispatched():
    plain, _ = pair(local=True)
    hooked, _ = pair(local=True)
    dispatch_on_cpu(hooked)
    ids = text_ids(384)
    with fp_patch.record_density(plain) as rec_plain:
        want = logits(plain, input_ids=ids)
    with fp_patch.record_density(hooked) as rec:
        got = logits(hooked, input_ids=ids)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    density = layer_density(rec)
    assert density.shape == (LAYERS, HEADS) and float(density.mean()) < 0.95, f"nothing skipped: {density}"
    torch.testing.assert_close(density, layer_density(rec_plain), atol=0, rtol=0)


def test_per_layer_copies_of_the_mask(monkeypatch):
    """Layers on a second device get a new mask tensor each: every copy is analysed (at most once per
    layer, where a single device pays once per forward pass) and the results do not change."""
    ids, mask, _ = padded_batch(384, 300, "left")
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask)}
    valid = mask.bool()
    plain, _ = pair(local=True)
    analyses = count_mask_analyses(monkeypatch)
    want = logits(plain, **inputs)
    assert len(analyses) == 1, "one mask per forward pass: analysed once, reused by every layer"

    hooked, _ = pair(local=True)
    dispatch_on_cpu(hooked)
    for layer in hooked.model.layers:
        add_hook_to_module(layer, CopyInputsHook(), append=True)
        assert isinstance(layer._hf_hook, SequentialHook)
    analyses.clear()
    with fp_patch.record_density(hooked) as rec:
        got = logits(hooked, **inputs)
    assert 1 <= len(analyses) <= LAYERS
    torch.testing.assert_close(got[valid], want[valid], atol=1e-6, rtol=1e-6)
    assert not len(rec.fallback_frame()), rec.fallback_frame()
    assert float(layer_density(rec).mean()) < 0.95


# -- tensor parallelism (2 CPU processes) -----------------------------------------------------------


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_tensor_parallel_two_processes(tmp_path):
    model, _ = pair(local=True)
    model.save_pretrained(tmp_path / "model")
    ids = text_ids(384)
    torch.save(ids, tmp_path / "inputs.pt")
    defaults = fp_patch.defaults_for("llama")
    with torch.no_grad():
        fp_patch.configure(model, defaults, **SETTINGS)
        with fp_patch.record_density(model) as rec:
            want_sparse = logits(model, input_ids=ids)
        want_density = layer_density(rec)
        model.set_attn_implementation("sdpa")
        want_dense = logits(model, input_ids=ids)
    assert float(want_density.mean()) < 0.95, "the unsharded model skips nothing: the comparison would be empty"

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(WORKER), str(tmp_path / "model"), str(tmp_path)]
    # two CPU processes (gloo) as the worker is written for, also on a GPU machine, where Transformers
    # would otherwise put each rank's shard on a GPU while the worker's inputs stay on the CPU
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=env)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"

    local_heads = HEADS // 2
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["world"] == 2
        # the ranks hold their own heads: the recorder sees [B, 2, L, D] queries, not the 4 global heads
        assert got["alpha0_density"].shape == (LAYERS, local_heads), got["alpha0_density"]
        assert bool((got["alpha0_density"] == 1).all())
        assert got["alpha0_fallbacks"] == [] and got["default_fallbacks"] == []
        torch.testing.assert_close(got["sdpa"], want_dense, **TOL)
        torch.testing.assert_close(got["alpha0"], got["sdpa"], **TOL)
        # per-head selection on a rank = the unsharded selection of the same heads, no communication needed
        heads = slice(rank * local_heads, (rank + 1) * local_heads)
        torch.testing.assert_close(got["default_density"], want_density[:, heads].to(got["default_density"].dtype),
                                   atol=1e-6, rtol=0)
        torch.testing.assert_close(got["default"], want_sparse, **TOL)


# -- two GPUs ---------------------------------------------------------------------------------------


@TWO_GPUS
def test_kernels_follow_the_tensors_device():
    """Triton launches on the *current* CUDA device; tensors of cuda:1 with cuda:0 current must still
    be computed on cuda:1, on its current stream."""
    from fp_kernels import flash_prefill, flash_prefill_reference

    gen = torch.Generator(device="cuda:1").manual_seed(0)
    q, k, v = (torch.randn(1, 2048, h, 128, device="cuda:1", dtype=torch.bfloat16, generator=gen) for h in (8, 2, 2))
    with torch.cuda.device(0):
        out, info = flash_prefill(q, k, v, alpha=0.18, return_info=True, backend="triton")
    torch.cuda.synchronize(0)
    torch.cuda.synchronize(1)
    assert out.device == q.device and info.block_index.device == q.device
    with torch.cuda.device(1):
        same, same_info = flash_prefill(q, k, v, alpha=0.18, return_info=True, backend="triton")
    ref = flash_prefill_reference(q.float(), k.float(), v.float(), alpha=0.18)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(info.density, same_info.density)
    torch.testing.assert_close(out, same)
    assert (out.float() - ref).norm() / ref.norm() < 2e-2


@TWO_GPUS
def test_device_map_over_two_gpus():
    fp, ref = pair(alpha=0.0, backend="triton")
    ref.to("cuda:0", torch.bfloat16)
    fp.to(torch.bfloat16)
    device_map = module_device_map(fp, lambda i: 0 if i < LAYERS // 2 else 1)
    accelerate.dispatch_model(fp, device_map=device_map)
    ids = text_ids(384).to("cuda:0")
    with fp_patch.record_density(fp) as rec:
        got = logits(fp, input_ids=ids)
    want = logits(ref, input_ids=ids)
    assert (got - want).norm() / want.norm() < 2e-2
    assert set(rec.to_frame()["layer"]) == set(range(LAYERS)), "a layer on one of the GPUs did not run sparse"
