"""One prompt, one answer: routing is a pure function of the call and the settings.

Repeated forward passes of the same prompt with the same settings give bit-identical logits (on the
CPU with the reference operator; on a GPU, 50 passes through the Triton kernels), a recorded pass
included (recording sees exactly what runs in production); nothing is left on the attention modules
between calls; below ``min_sparse_len`` a flashprefill model is bit for bit the sdpa model; and the
library uses no Triton internals (kernels launch with ``kernel[grid](...)``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import transformers
from support.tiny_models import DEVICE, LOCAL, build_pair, needs_cuda, text_ids
from transformers import AutoModelForCausalLM

import fp_patch
from fp_patch.config import is_decoder_attention

ROOT = Path(__file__).resolve().parents[2]


def distinct(tensors: list[torch.Tensor]) -> int:
    """How many bitwise-distinct tensors ``tensors`` holds."""
    firsts: list[torch.Tensor] = []
    for t in tensors:
        if not any(t.shape == f.shape and t.dtype == f.dtype and torch.equal(t, f) for f in firsts):
            firsts.append(t)
    return len(firsts)


def test_repeated_sparse_prefills_give_one_logits_tensor(monkeypatch):
    fp, _ = build_pair("llama", local=LOCAL)  # local attention: the selection skips blocks
    ids = text_ids(384).to(DEVICE)
    assert ids.shape[1] >= fp_patch.get_config(fp).min_sparse_len
    layers = [m for m in fp.modules() if is_decoder_attention(m)]
    outs = []
    with torch.no_grad():
        outs.append(fp(input_ids=ids).logits)
        state = [sorted(m.__dict__) for m in layers]
        for _ in range(3):
            outs.append(fp(input_ids=ids).logits)
        with fp_patch.record_density(fp) as rec:
            outs.append(fp(input_ids=ids).logits)
        outs.append(fp(input_ids=ids).logits)
    assert rec.density() < 1.0 and set(rec.to_frame()["layer"]) == {0, 1}, "the passes did not run sparse"
    assert distinct(outs) == 1
    assert [sorted(m.__dict__) for m in layers] == state, "a call left state on an attention module"


def test_distinct_counts_bitwise_differences():
    """The helper the determinism tests rely on tells one-ulp differences apart."""
    x = torch.randn(4, 4)
    y = x.clone()
    y[0, 0] = torch.nextafter(y[0, 0], torch.tensor(float("inf")))
    assert distinct([x, x.clone()]) == 1 and distinct([x, y, x]) == 2


def test_below_min_sparse_len_is_bit_identical_to_sdpa():
    fp, ref = build_pair("llama", min_sparse_len=4096)
    ids = text_ids(200).to(DEVICE)
    with torch.no_grad(), fp_patch.record_density(fp) as rec:
        got = fp(input_ids=ids).logits
    want = ref(input_ids=ids).logits
    assert set(rec.fallback_frame()["reason"]) == {"short_query"}
    assert torch.equal(got, want)


def test_no_triton_internals_in_the_library():
    """No CompiledKernel launchers, metadata, launch hooks, runtime knobs or per-device kernel caches
    anywhere in the library, the tools or the benchmarks."""
    banned = re.compile(r"device_caches|driver\.active|launch_enter_hook|packed_metadata|\bknobs\.|import knobs|"
                        r"CompiledKernel")
    hits = []
    for folder in ("fp_patch", "kernels", "benchmarks", "fp_tools"):
        for path in (ROOT / folder).rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if banned.search(line):
                    hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, "\n".join(hits)


# -- on the GPU: Triton kernels in bfloat16 --------------------------------------------------------

GEOMETRIES = {  # attention geometry of real models, two layers, small MLP and vocabulary
    "llama8b": {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8},
    "smollm2": {"hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3},
}


def tiny_llama_cuda(geometry: str, attn: str):
    config = transformers.LlamaConfig(num_hidden_layers=2, intermediate_size=1024, vocab_size=512,
                                      max_position_embeddings=8192, **GEOMETRIES[geometry])
    torch.manual_seed(0)
    with torch.device("cuda"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=attn).eval()


@pytest.mark.gpu
@needs_cuda
def test_fifty_sparse_prefills_on_the_gpu_give_one_logits_tensor(triton_pipeline_calls):
    model = tiny_llama_cuda("llama8b", "flashprefill")
    fp_patch.configure(model, min_sparse_len=1024, backend="triton")
    ids = torch.randint(0, 512, (1, 4096), generator=torch.Generator().manual_seed(0)).cuda()
    calls = triton_pipeline_calls
    with torch.no_grad():
        outs = [model(input_ids=ids).logits for _ in range(50)]
    assert len(calls) == 50 * 2, "not every layer of every pass ran the sparse Triton pipeline"
    assert not torch.isnan(outs[0]).any()
    assert distinct(outs) == 1


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_below_min_sparse_len_is_bit_identical_to_sdpa_on_the_gpu(geometry, triton_pipeline_calls):
    """The model's default min_sparse_len (fp_patch.MODEL_DEFAULTS["llama"]): a shorter prompt runs
    Transformers' own SDPA call in every layer, so the logits are those of the sdpa model, bit for bit."""
    fp = tiny_llama_cuda(geometry, "flashprefill")
    ref = tiny_llama_cuda(geometry, "sdpa")
    ref.load_state_dict(fp.state_dict())
    min_sparse_len = fp_patch.get_config(fp).min_sparse_len
    assert min_sparse_len == fp_patch.MODEL_DEFAULTS["llama"]["min_sparse_len"]
    ids = torch.randint(0, 512, (1, min_sparse_len - 1), generator=torch.Generator().manual_seed(1)).cuda()
    calls = triton_pipeline_calls
    with torch.no_grad():
        got = [fp(input_ids=ids).logits for _ in range(3)]
        want = ref(input_ids=ids).logits
    assert calls == [] and distinct([*got, want]) == 1
