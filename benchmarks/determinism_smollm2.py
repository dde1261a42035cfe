"""Same prompt, same bits: SmolLM2-135M (real weights, bf16, CUDA), N identical forward passes.

    python benchmarks/determinism_smollm2.py --length 16384 --passes 50

Counts the distinct last-token logit vectors over ``--passes`` forward passes of one prompt that runs
sparse (``min_sparse_len`` set to the prompt length), and checks that a prompt below
``min_sparse_len`` gives exactly the logits of ``attn_implementation="sdpa"``.
"""

from __future__ import annotations

import argparse

import torch

import fp_patch
from fp_patch.models import load_smollm2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--passes", type=int, default=50)
    args = parser.parse_args()
    model, _ = load_smollm2("flashprefill", device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (1, args.length), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(0))
    fp_patch.configure(model, min_sparse_len=args.length)
    with torch.no_grad(), fp_patch.record_density(model) as rec:
        model(ids, logits_to_keep=1)
    reasons = rec.layer_frame()["reason"]
    sparse_layers = int((reasons.isna() | (reasons == "")).sum())
    distinct = set()
    with torch.no_grad():
        for _ in range(args.passes):
            distinct.add(model(ids, logits_to_keep=1).logits.float().cpu().numpy().tobytes())
    print(f"L={args.length}: density {rec.density():.1%}, {sparse_layers}/{model.config.num_hidden_layers} layers "
          f"sparse; {args.passes} passes -> {len(distinct)} distinct logits")
    short = ids[:, : args.length // 2]
    with torch.no_grad():
        fp = model(short, logits_to_keep=1).logits
        model.set_attn_implementation("sdpa")
        ref = model(short, logits_to_keep=1).logits
    print(f"L={short.shape[1]} (below min_sparse_len): bit-identical to sdpa: {torch.equal(fp, ref)}")


if __name__ == "__main__":
    main()
