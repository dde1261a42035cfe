"""Tensor-parallel worker of tests/integration/test_multi_device.py: two CPU processes (gloo), started by torchrun.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/integration/multi_device_worker.py \\
        MODEL_DIR WORK_DIR

Each rank loads MODEL_DIR with Transformers' tensor parallelism (the model's own ``base_model_tp_plan``:
q/k/v column-sharded, so each rank holds whole attention heads), runs ``WORK_DIR/inputs.pt`` with
"sdpa", then with "flashprefill" at alpha 0 and at the model's default alpha under
``fp_patch.record_density``, and writes ``WORK_DIR/rank{r}.pt``: the logits, the recorded density of
each (layer, local head), the dense-fallback reasons, and which loading API sharded the model.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import fp_patch

# what the model tests use on the CPU: small blocks, the pure-PyTorch operator
SETTINGS = {"block_size": 16, "min_sparse_len": 32, "backend": "reference"}


def local_rows(weight: torch.Tensor) -> int:
    return (weight.to_local() if hasattr(weight, "to_local") else weight).shape[0]


def load_sharded(path: str):
    """``(model, api)``: MODEL_DIR sharded over the process group, through whichever spelling this
    Transformers takes (``distributed_config=DistributedConfig(tp_size=N)`` in 5.x, ``tp_plan="auto"``
    before); a spelling that loads without sharding is not accepted."""
    world = dist.get_world_size()
    attempts = []
    try:
        from transformers.distributed import DistributedConfig

        config = DistributedConfig(tp_size=world)
        attempts.append(("DistributedConfig(tp_size)", lambda: {"distributed_config": config}))
    except (ImportError, TypeError, ValueError):  # no such API, or not this signature
        pass
    attempts.append(('tp_plan="auto"', lambda: {"tp_plan": "auto"}))
    errors = []
    for api, kwargs in attempts:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # tp_plan= is deprecated in 5.x
                model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa",
                                                             **kwargs())
        except (TypeError, ValueError, RuntimeError) as err:
            errors.append(f"{api}: {type(err).__name__}: {err}")
            continue
        attn = model.model.layers[0].self_attn
        if local_rows(attn.q_proj.weight) * world == model.config.num_attention_heads * attn.head_dim:
            return model.eval(), api
        errors.append(f"{api}: loaded, but q_proj is not sharded")
    raise RuntimeError("no tensor-parallel loading worked: " + "; ".join(errors))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids).logits
    return (out.full_tensor() if hasattr(out, "full_tensor") else out).float()


def main(model_dir: str, work_dir: str) -> None:
    dist.init_process_group("gloo")
    work = Path(work_dir)
    ids = torch.load(work / "inputs.pt")
    model, api = load_sharded(model_dir)
    result = {"api": api, "world": dist.get_world_size()}
    defaults = fp_patch.model_defaults(model.config)
    with torch.no_grad():
        result["sdpa"] = logits(model, ids)
        model.set_attn_implementation("flashprefill")
        for name, alpha in (("alpha0", 0.0), ("default", defaults.alpha)):
            fp_patch.configure(model, defaults, **SETTINGS, alpha=alpha)
            with fp_patch.record_density(model) as rec:
                result[name] = logits(model, ids)
            frame = rec.to_frame().pivot(index="layer", columns="head", values="density")
            result[f"{name}_density"] = torch.tensor(frame.values)
            result[f"{name}_fallbacks"] = sorted(set(rec.fallback_frame()["reason"]))
    torch.save(result, work / f"rank{dist.get_rank()}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
