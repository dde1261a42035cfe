"""Host time of the attention call inside a real forward pass, against the rest of the forward.

A 135M model's prefill below ~16K tokens is bound by the host issuing kernels, so what decides its
time to first token is the host time per layer. ``host_overhead.py`` times calls back to back (caches
warm); this times them where they run, inside the forward pass of a SmolLM2-shaped model (30 layers,
9/3 heads, D=64, random weights), by wrapping each registered attention function in a
``perf_counter`` pair:

* ``sdpa``: Transformers' ``sdpa_attention_forward``;
* ``F.sdpa direct``: ``F.scaled_dot_product_attention`` with ``is_causal``/``enable_gqa`` and the
  transpose, no Transformers wrapper (what a dense call cannot cost less than);
* ``fp``: our attention function with ``min_sparse_len=2048`` (every call at these lengths is sparse:
  routing, then the operator);
* ``fp sparse``: the sparse operator alone (``fp_kernels.flash_prefill``, ``alpha=0.18``) on the
  transposed tensors, without our routing (what routing adds is the difference to ``fp``).

The variants take turns forward by forward (each round starting one further on), 60 rounds::

    python benchmarks/host_in_forward.py            # on a CUDA GPU

Printed per variant (medians): wall time of the forward, host time until the forward returned,
host time per attention call, host time outside the attention calls.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

ACCUMULATED = [0.0, 0]  # host seconds inside attention calls, calls


def timed(fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        ACCUMULATED[0] += time.perf_counter() - start
        ACCUMULATED[1] += 1
        return out

    return wrapper


def direct_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, dropout_p=dropout, scale=scaling, is_causal=query.shape[2] > 1, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


def sparse_op(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    from fp_kernels import flash_prefill

    return flash_prefill(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), 0.18, scale=scaling), None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="*", default=[2048, 8192])
    parser.add_argument("--rounds", type=int, default=60)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("host_in_forward.py needs a CUDA GPU")
    import transformers
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    import fp_patch
    from fp_patch.attention import flashprefill_attention_forward

    for name, fn in (("sdpa_t", sdpa_attention_forward), ("direct_t", direct_sdpa),
                     ("fp_t", flashprefill_attention_forward), ("sparse_t", sparse_op)):
        AttentionInterface.register(name, timed(fn))
        AttentionMaskInterface.register(name, sdpa_mask)
    config = transformers.LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        vocab_size=49152, max_position_embeddings=32768, tie_word_embeddings=True,
    )
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    fp_patch.configure(model, min_sparse_len=2048)
    torch.set_grad_enabled(False)
    variants = {"sdpa": "sdpa_t", "F.sdpa direct": "direct_t", "fp": "fp_t", "fp sparse": "sparse_t"}
    names = list(variants)
    for length in args.lengths:
        ids = torch.randint(0, config.vocab_size, (1, length), device="cuda")
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        for name in names:  # warm up (kernel compilation)
            model.set_attn_implementation(variants[name])
            for _ in range(3):
                model(**inputs, logits_to_keep=1)
        results = {name: [] for name in names}
        for r in range(args.rounds):
            turn = r % len(names)
            for name in names[turn:] + names[:turn]:
                model.set_attn_implementation(variants[name])
                torch.cuda.synchronize()
                gc.disable()
                ACCUMULATED[:] = [0.0, 0]
                t0 = time.perf_counter()
                model(**inputs, logits_to_keep=1)
                t1 = time.perf_counter()
                torch.cuda.synchronize()
                t2 = time.perf_counter()
                gc.enable()
                inside, calls = ACCUMULATED
                results[name].append(((t2 - t0) * 1e3, (t1 - t0) * 1e3, inside / calls * 1e6, (t1 - t0 - inside) * 1e3))
        for name in names:
            wall, host, call, outside = (statistics.median(c) for c in zip(*results[name], strict=True))
            print(f"L={length} {name:14} wall {wall:6.2f} ms | host issue {host:6.2f} ms | attention call "
                  f"{call:6.1f} us | host outside attention {outside:6.2f} ms", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
