"""FlashPrefill across two GPUs: accelerate ``device_map="auto"`` and Transformers tensor parallelism.

    python benchmarks/multi_gpu.py                  # 2 GPUs: every check and timing, ~2 minutes
    python benchmarks/multi_gpu.py --quick          # CPU smoke run of the same logic (tiny model, gloo)

Two Llama-shaped models with random weights (bf16), built on the GPU and saved once to ``--work``:
``tiny`` (4 layers, 8/2 heads, D=128) and ``mid`` (~1.1B: 16 layers, 32/8 heads, D=64, hidden 2048).
Stages, each a subprocess with a deadline (a crash or a hang of one does not take the others down):

1. ``probe``: the operator on tensors of ``cuda:1`` while ``cuda:0`` is the current device (Triton
   launches on the current device) against the same call with ``cuda:1`` current and the fp32 reference.
2. ``device_map``: ``from_pretrained(device_map="auto", max_memory=...)`` must put layers on both GPUs;
   logits of "flashprefill" at alpha 0 against "sdpa" on the same model (relative L2, with the
   distance between two dense SDPA backends as the bf16 noise floor), the layers of both GPUs must have
   recorded sparse calls; per-head density at the default alpha; a 32K-token prefill timed for "sdpa"
   and "flashprefill" (default alpha, every call above min_sparse_len sparse).
3. ``tensor_parallel``: ``torchrun --nproc-per-node 2`` of this file with ``--tp-worker``: each rank
   loads the saved model with the model's TP plan, same checks per rank (local heads recorded), the
   per-head densities of each rank against the device_map run's densities of the same global heads,
   and the same timing.

Results: ``--out`` (JSON: environment, every number, errors) and a log next to it (``.log``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path

import torch

TAG = "[mg]"
SEED = 1234
MODELS = {
    "tiny": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=128, vocab_size=32000),
    "mid": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, vocab_size=32000),
    # --quick (CPU): 2 heads per rank under TP, a head dim the operator takes
    "quick": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, vocab_size=256),
}
REL_L2_LIMIT = 2e-2  # bf16 logits of two attention kernels over 4-16 layers...
# ...or the distance between two dense SDPA backends on the same model, when that is larger: on the
# 16-layer random model it was 2.8e-2 (H200 run of 2026-11-22, which judged by 2e-2 alone)
FLOOR_FACTOR = 1.25


class Stage:
    """Progress lines, a result dict written to disk after every step, a deadline."""

    def __init__(self, name: str, path: Path, deadline: float):
        self.name, self.path, self.deadline, self.t0 = name, path, deadline, time.time()
        self.data: dict = {"errors": []}
        # the default SIGALRM action ends the process even inside a hung collective
        signal.alarm(max(1, int(deadline - time.time())))

    def log(self, msg: str) -> None:
        # one write per line: two ranks share torchrun's output
        sys.stdout.write(f"{TAG} {self.name} +{time.time() - self.t0:5.1f}s {msg}\n")
        sys.stdout.flush()

    def left(self) -> float:
        return self.deadline - time.time()

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=1, default=str))

    def step(self, label: str, fn, *args, need_s: float = 0.0, into: tuple | None = None, **kwargs):
        """``fn(*args)``, stored at ``into = (dict, key)`` before the result file is written; an exception
        is recorded (not raised); skipped when less than ``need_s`` seconds are left."""
        if self.left() < need_s:
            self.log(f"{label}: SKIPPED ({self.left():.0f}s left, needs ~{need_s:.0f}s)")
            self.data["errors"].append(f"{label}: skipped for time")
            self.save()
            return None
        t = time.time()
        try:
            out = fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - one failed step must not stop the run
            self.log(f"{label}: FAILED {type(err).__name__}: {str(err)[:300]}")
            self.data["errors"].append(f"{label}: {type(err).__name__}: {err}\n{traceback.format_exc()[-1500:]}")
            self.save()
            return None
        self.log(f"{label}: done in {time.time() - t:.1f}s")
        if into is not None:
            into[0][into[1]] = out
        self.save()
        return out


# -- models and measurements -----------------------------------------------------------------------


def llama_config(name: str):
    from transformers import LlamaConfig

    return LlamaConfig(**MODELS[name], max_position_embeddings=65536, rope_theta=500000.0, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def save_random_model(name: str, path: Path, device: str, dtype) -> dict:
    """Random weights initialised on ``device`` (fast), saved once for every stage and process."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(SEED)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(llama_config(name), dtype=dtype, attn_implementation="sdpa")
    model.save_pretrained(path)
    params = sum(p.numel() for p in model.parameters())
    del model
    free_memory()
    return {"params": params, "path": str(path)}


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def prompt(n: int, vocab: int, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(SEED)
    return torch.randint(3, vocab, (1, n), generator=gen).to(device)


def sync_all(devices=None) -> None:
    """Wait for every GPU of this process (``devices``: indices; all visible ones by default)."""
    for i in range(torch.cuda.device_count()) if devices is None else devices:
        torch.cuda.synchronize(i)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def forward_logits(model, ids, keep: int | None = None) -> torch.Tensor:
    with torch.no_grad():
        if keep is None:
            return full(model(input_ids=ids).logits)
        return full(model(input_ids=ids, logits_to_keep=keep).logits)


def rel_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.float(), want.float().to(got.device)
    return float((got - want).norm() / want.norm())


def settings(args) -> dict:
    """Operator settings on top of the model defaults: the paper's on the GPU, small blocks on the CPU."""
    if args.quick:
        return {"block_size": 16, "min_sparse_len": 32, "backend": "reference"}
    return {"min_sparse_len": 1024}


def configure(model, args, **overrides):
    import fp_patch

    defaults = fp_patch.model_defaults(model.config)
    return fp_patch.configure(model, defaults, **{**settings(args), **overrides})


def recorded(rec) -> tuple[dict, list]:
    """``({layer: [density of each head]}, [dense-fallback reasons])`` of a one-forward recording.
    ``to_frame`` needs pandas; without it (a bare GPU machine) the recorder's calls are read directly."""
    try:
        frame, fallbacks = rec.to_frame(), rec.fallback_frame()
    except ImportError:
        table = {call.layer: call.density.float().mean(0).tolist() for call in rec._sparse}  # [B, Hq] per call
        return table, sorted({f.reason for f in rec._fallbacks})
    table = {int(layer): g.sort_values("head")["density"].tolist() for layer, g in frame.groupby("layer")}
    return table, sorted(set(fallbacks["reason"]))


def mean_density(table: dict) -> float | None:
    """Over layers and heads (one prompt: every head has the same number of causal blocks)."""
    values = [d for row in table.values() for d in row]
    return sum(values) / len(values) if values else None


def layer_devices(model) -> dict:
    return {i: str(layer.self_attn.q_proj.weight.device) for i, layer in enumerate(model.model.layers)}


def check_alpha0(model, args, ids, barrier=lambda: None) -> tuple[dict, torch.Tensor]:
    """Logits of "flashprefill" at alpha 0 (sparse path, every block kept) against "sdpa", plus the
    distance between two dense SDPA backends as the noise floor, and who recorded sparse calls."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import fp_patch

    out: dict = {"tokens": int(ids.shape[1])}
    model.set_attn_implementation("sdpa")
    barrier()
    want = forward_logits(model, ids)
    for backend in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):  # another dense kernel
        try:
            with sdpa_kernel([backend]):
                out["noise_floor_rel_l2"] = rel_l2(forward_logits(model, ids), want)
            out["noise_floor_backend"] = backend.name
            break
        except RuntimeError as err:  # this backend cannot take these inputs (e.g. GQA): the next one
            out[f"noise_floor_{backend.name}"] = f"{type(err).__name__}: {err}"[:200]
    model.set_attn_implementation("flashprefill")
    configure(model, args, alpha=0.0)
    barrier()
    with fp_patch.record_density(model) as rec:
        got = forward_logits(model, ids)
    out["rel_l2"] = rel_l2(got, want)
    out["max_abs"] = float((got.float() - want.float().to(got.device)).abs().max())
    out["argmax_agree"] = float((got.argmax(-1) == want.argmax(-1).to(got.device)).float().mean())
    table, out["fallbacks"] = recorded(rec)
    out["heads_recorded"] = max((len(row) for row in table.values()), default=0)
    out["density_alpha0"] = mean_density(table)
    devices = layer_devices(model)
    sparse = sorted(table)
    out["sparse_layers_by_device"] = {d: [i for i in sparse if devices[i] == d] for d in sorted(set(devices.values()))}
    out["all_layers_sparse"] = sparse == sorted(devices)
    limit = max(REL_L2_LIMIT, FLOOR_FACTOR * out.get("noise_floor_rel_l2", 0.0))
    out["ok"] = out["rel_l2"] < limit and out["all_layers_sparse"]
    return out, want


def density_default(model, args, ids, barrier=lambda: None) -> dict:
    import fp_patch

    model.set_attn_implementation("flashprefill")
    cfg = configure(model, args)
    barrier()
    with fp_patch.record_density(model) as rec:
        forward_logits(model, ids, keep=1)
    table, fallbacks = recorded(rec)
    return {"alpha": cfg.alpha, "tokens": int(ids.shape[1]), "density": mean_density(table),
            "per_head": [table[layer] for layer in sorted(table)], "fallbacks": fallbacks}


def time_prefill(model, args, ids, barrier=lambda: None, devices=None) -> dict:
    """A ``--long``-token prefill (``logits_to_keep=1``): 1 warm-up, median of ``--repeats``, every GPU
    synchronised; "sdpa", then "flashprefill" at the default alpha."""
    variants = [("sdpa", None, {}), ("flashprefill", "sparse", {})]
    rows = []
    for impl, note, overrides in variants:
        model.set_attn_implementation(impl)
        if impl == "flashprefill":
            configure(model, args, **overrides)
        times = []
        for _ in range(args.repeats + 1):
            barrier()
            if ids.is_cuda:
                sync_all(devices)
            t = time.perf_counter()
            forward_logits(model, ids, keep=1)
            if ids.is_cuda:
                sync_all(devices)
            times.append(time.perf_counter() - t)
        rows.append({"impl": impl, "note": note, "first_s": times[0], "median_s": statistics.median(times[1:]),
                     "all_s": times})
    return {"tokens": int(ids.shape[1]), "rows": rows}


# -- stage 1: the device guard probe ---------------------------------------------------------------


def stage_probe(args, stage: Stage) -> None:
    import inspect

    from fp_kernels import flash_prefill, flash_prefill_reference, pool, select, sparse_attention

    launch_sites = (pool, select, sparse_attention)
    stage.data["guard_in_source"] = all("launch_device(" in inspect.getsource(m) for m in launch_sites)
    gen = torch.Generator(device="cuda:1").manual_seed(SEED)
    q, k, v = (torch.randn(1, 4096, h, 128, device="cuda:1", dtype=torch.bfloat16, generator=gen) for h in (8, 2, 2))
    kwargs = {"alpha": 0.18, "return_info": True, "backend": "triton"}

    def on_current(index):
        with torch.cuda.device(index):
            out, info = flash_prefill(q, k, v, **kwargs)
        sync_all([0, 1])
        return out, info

    right = stage.step("operator on cuda:1 with cuda:1 current", on_current, 1)
    ref = stage.step("fp32 reference", lambda: flash_prefill_reference(q.float(), k.float(), v.float(), alpha=0.18))
    wrong = stage.step("operator on cuda:1 with cuda:0 current", on_current, 0)
    res = {}
    if right is not None and ref is not None:
        res["rel_l2_vs_reference_cuda1_current"] = rel_l2(right[0], ref)
    if wrong is not None:
        res["output_device"] = str(wrong[0].device)
        res["nan"] = bool(torch.isnan(wrong[0]).any())
        if ref is not None:
            res["rel_l2_vs_reference_cuda0_current"] = rel_l2(wrong[0], ref)
        if right is not None:
            res["max_abs_diff_vs_cuda1_current"] = float((wrong[0].float() - right[0].float()).abs().max())
            res["density_equal"] = bool(torch.equal(wrong[1].density, right[1].density))
    res["ok"] = bool(res.get("density_equal") and res.get("max_abs_diff_vs_cuda1_current", 1) == 0
                     and res.get("rel_l2_vs_reference_cuda0_current", 1) < REL_L2_LIMIT)
    stage.data["probe"] = res
    stage.log(f"probe: {res}")


# -- stage 2: accelerate device_map ----------------------------------------------------------------


def load_device_map(path: str, args, n_layers: int):
    """``device_map="auto"`` with ``max_memory`` for both GPUs; if accelerate still puts every layer on
    one GPU, an explicit half/half map (recorded as such)."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch.float32 if args.quick else torch.bfloat16, "attn_implementation": "sdpa"}
    if args.quick:
        return AutoModelForCausalLM.from_pretrained(path, device_map="auto", **kwargs).eval(), "auto (cpu)"
    max_memory = {i: int(0.8 * torch.cuda.get_device_properties(i).total_memory) for i in range(2)}
    model = AutoModelForCausalLM.from_pretrained(path, device_map="auto", max_memory=max_memory, **kwargs).eval()
    if len(set(layer_devices(model).values())) > 1:
        return model, "auto"
    del model
    free_memory()
    half = n_layers // 2
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 1, "lm_head": 1}
    device_map.update({f"model.layers.{i}": int(i >= half) for i in range(n_layers)})
    return AutoModelForCausalLM.from_pretrained(path, device_map=device_map, **kwargs).eval(), "explicit half/half"


def compact_map(hf_device_map: dict) -> str:
    """``{"model.layers.0": 0, ...}`` as ``cuda0: embed_tokens, layers 0-7 | cuda1: ...``."""
    by_dev: dict = {}
    for name, dev in hf_device_map.items():
        by_dev.setdefault(str(dev), []).append(name.replace("model.", ""))
    parts = []
    for dev, names in by_dev.items():
        layers = sorted(int(n.split(".")[1]) for n in names if n.startswith("layers."))
        other = [n for n in names if not n.startswith("layers.")]
        span = [f"layers {layers[0]}-{layers[-1]}"] if layers else []
        parts.append(f"{dev}: {', '.join(other + span)}")
    return " | ".join(parts)


def stage_device_map(args, stage: Stage) -> None:
    device = "cpu" if args.quick else "cuda:0"
    dtype = torch.float32 if args.quick else torch.bfloat16
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if torch.cuda.is_available():
        stage.data["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    for name in args.models:
        stage.step(f"{name}: build + save random model", save_random_model, name, work / name, device, dtype,
                   need_s=5, into=(stage.data.setdefault("models", {}), name))
    for name in args.models:
        res = stage.data.setdefault("device_map", {}).setdefault(name, {})
        loaded = stage.step(f"{name}: from_pretrained(device_map=auto)", load_device_map, str(work / name), args,
                            MODELS[name]["num_hidden_layers"], need_s=5)
        if loaded is None:
            continue
        model, how = loaded
        hf_map = getattr(model, "hf_device_map", {}) or {}
        res["device_map_source"] = how
        res["hf_device_map"] = {k: str(v) for k, v in hf_map.items()}
        res["layer_devices"] = layer_devices(model)
        res["both_devices"] = len(set(res["layer_devices"].values())) > 1
        stage.log(f"{name}: {how}: {compact_map(hf_map)}")
        tail = measure(stage, name, model, args, model.get_input_embeddings().weight.device, res)
        if tail is not None:  # for the tensor-parallel stage: same model, same prompt, same dense logits?
            torch.save(tail, work / f"{name}_device_map_tail.pt")
        del model
        free_memory()


def measure(stage: Stage, name: str, model, args, device, res: dict, barrier=lambda: None, devices=None,
            report: bool = True):
    """The checks and the timing of both schemes, stored in ``res`` as they come; returns the last 64
    rows of the dense logits of the check prompt (CPU), or ``None``."""
    vocab = model.config.vocab_size
    ids = prompt(args.check_len, vocab, device)
    checked = stage.step(f"{name}: alpha 0 vs sdpa at {args.check_len}", check_alpha0, model, args, ids, barrier,
                         need_s=5)
    tail = None
    if checked is not None:
        res["alpha0"], want = checked
        tail = want[0, -64:].float().cpu()
        del want
        stage.save()
        a = res["alpha0"]
        stage.log(f"{name}: rel L2 {a['rel_l2']:.2e} (noise floor {a.get('noise_floor_rel_l2', float('nan')):.2e}), "
                  f"{a['heads_recorded']} heads recorded, sparse layers by device {a['sparse_layers_by_device']}, "
                  f"ok={a['ok']}")
    stage.step(f"{name}: density at default alpha", density_default, model, args, ids, barrier, need_s=5,
               into=(res, "density_default"))
    long_ids = prompt(args.long, vocab, device)
    stage.step(f"{name}: {args.long}-token prefill timing", time_prefill, model, args, long_ids, barrier, devices,
               need_s=20 if name == "mid" else 8, into=(res, "timing"))
    stage.step(f"{name}: density at {args.long}", density_default, model, args, long_ids, barrier, need_s=5,
               into=(res, "density_long"))
    if report:
        summarize_timing(stage, name, res)
    return tail


def summarize_timing(stage: Stage, name: str, res: dict) -> None:
    timing, dens = res.get("timing"), res.get("density_long")
    if not timing:
        return
    parts = [f"{r['impl']}{'(' + r['note'] + ')' if r['note'] else ''} {r['median_s'] * 1e3:.1f} ms"
             for r in timing["rows"]]
    extra = f", density {dens['density']:.1%}" if dens else ""
    stage.log(f"{name}: {timing['tokens']} tokens: " + ", ".join(parts) + extra)


# -- stage 3: tensor parallelism (one process per GPU, started by torchrun) ------------------------


def load_tensor_parallel(path: str, args, world: int):
    """``(model, api)``: the model's own TP plan through whichever spelling this Transformers takes
    (``tp_plan="auto"``, or ``distributed_config=DistributedConfig(tp_size=N)``, the 5.x spelling);
    a spelling that loads the model unsharded is not accepted."""
    from transformers import AutoModelForCausalLM

    spellings = [('tp_plan="auto"', lambda: {"tp_plan": "auto"})]
    try:
        from transformers.distributed import DistributedConfig

        config = {"distributed_config": DistributedConfig(tp_size=world)}
        spellings.insert(0, ("DistributedConfig(tp_size)", lambda: config))
    except (ImportError, TypeError, ValueError):  # no such API, or not this signature
        pass
    dtype = torch.float32 if args.quick else torch.bfloat16
    errors = []
    for api, kwargs in spellings:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa", **kwargs())
        except Exception as err:  # noqa: BLE001 - try the next spelling
            errors.append(f"{api}: {type(err).__name__}: {str(err)[:300]}")
            continue
        weight = model.model.layers[0].self_attn.q_proj.weight
        rows = (weight.to_local() if hasattr(weight, "to_local") else weight).shape[0]
        if rows * world == model.config.num_attention_heads * model.model.layers[0].self_attn.head_dim:
            return model.eval(), api, errors
        errors.append(f"{api}: loaded but q_proj is not sharded ({rows} rows)")
        del model
    raise RuntimeError("no tensor-parallel spelling worked: " + " | ".join(errors))


def tp_worker(args) -> None:
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    work = Path(args.work)
    stage = Stage(f"tp{rank}", work / f"tp_rank{rank}.json", args.deadline)
    if args.quick:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    else:
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    stage.data.update({"rank": rank, "world": world, "device": str(device)})
    if device.type == "cuda":
        stage.data["gpu"] = torch.cuda.get_device_name(device)
    for name in args.models:
        res = stage.data.setdefault("tensor_parallel", {}).setdefault(name, {})
        loaded = stage.step(f"{name}: from_pretrained with the TP plan", load_tensor_parallel, str(work / name), args,
                            world, need_s=5)
        if loaded is None:
            continue
        model, res["api"], res["api_errors"] = loaded
        stage.log(f"{name}: sharded through {res['api']}")
        own = [local] if device.type == "cuda" else None
        tail = measure(stage, name, model, args, device, res, dist.barrier, own, report=rank == 0)
        if "alpha0" in res:  # the rank's own heads reached the attention function, not the global ones
            res["local_heads_ok"] = res["alpha0"]["heads_recorded"] * world == model.config.num_attention_heads
        reference = work / f"{name}_device_map_tail.pt"
        if tail is not None and reference.exists():  # the same model and prompt under device_map
            res["sdpa_vs_device_map_rel_l2"] = rel_l2(tail, torch.load(reference))
            stage.save()
        del model
        free_memory()
    dist.barrier()
    dist.destroy_process_group()


# -- the driver ------------------------------------------------------------------------------------


def run_child(cmd: list, timeout: float, log, env: dict) -> dict:
    """Run ``cmd`` in its own session, stream its output to the log (progress lines also to stdout);
    past ``timeout`` SIGTERM, then SIGKILL, the whole session."""
    t0 = time.time()
    log.write(f"\n$ {' '.join(cmd)}\n")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True, env=env)
    tail: list = []

    def pump():
        for line in proc.stdout:
            log.write(line)
            tail.append(line.rstrip())
            del tail[:-40]
            if line.startswith(TAG):
                print(line.rstrip(), flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        rc = proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        timed_out = True
        for sig, grace in ((signal.SIGTERM, 8), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        rc = proc.poll()
    reader.join(timeout=5)
    log.flush()
    info = {"rc": rc, "timed_out": timed_out, "wall_s": round(time.time() - t0, 1)}
    if rc != 0:
        info["output_tail"] = [line for line in tail if not line.startswith(TAG)][-15:]
    return info


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def compare_selection(dm: dict, ranks: list) -> dict | None:
    """Per-head density of each TP rank against the device_map run's density of the same global heads."""
    table = (dm.get("density_default") or {}).get("per_head")
    if not table:
        return None
    diffs = []
    for r in ranks:
        local = (r.get("density_default") or {}).get("per_head")
        if not local:
            return None
        width = len(local[0])
        for layer, row in enumerate(local):
            ref = table[layer][r["rank"] * width:(r["rank"] + 1) * width]
            diffs += [abs(a - b) for a, b in zip(row, ref, strict=True)]
    return {"heads_compared": len(diffs), "max_abs_diff": max(diffs), "mean_abs_diff": sum(diffs) / len(diffs)}


def summary_lines(result: dict) -> list:
    lines = ["", "=== multi-GPU summary ==="]
    probe = result.get("device_guard_probe") or {}
    if probe:
        lines.append(f"device guard probe (cuda:1 tensors, cuda:0 current): ok={probe.get('ok')} "
                     f"max|diff| vs cuda:1 current {probe.get('max_abs_diff_vs_cuda1_current')}, "
                     f"guard in source={result.get('guard_in_source')}")
    for scheme in ("device_map", "tensor_parallel"):
        for name, res in (result.get(scheme) or {}).items():
            rank0 = res.get("rank0", res) if scheme == "tensor_parallel" else res
            a = rank0.get("alpha0") or {}
            head = f"{scheme:15} {name:5}"
            if scheme == "device_map" and "hf_device_map" in res:
                lines.append(f"{head} {res['device_map_source']}: {compact_map(res['hf_device_map'])}")
            if scheme == "tensor_parallel" and "api" in rank0:
                lines.append(f"{head} sharded through {rank0['api']}; dense logits vs device_map run: rel L2 "
                             f"{rank0.get('sdpa_vs_device_map_rel_l2', float('nan')):.2e}")
            if a:
                lines.append(f"{head} alpha0 vs sdpa rel L2 {a['rel_l2']:.2e} (floor "
                             f"{a.get('noise_floor_rel_l2', float('nan')):.1e}) ok={a['ok']} "
                             f"sparse layers {a['sparse_layers_by_device']}")
            else:
                lines.append(f"{head} no logits check (see errors)")
            if scheme == "tensor_parallel":
                ranks = {k: (v.get("alpha0") or {}).get("ok") for k, v in res.items() if k.startswith("rank")}
                heads = {k: v.get("local_heads_ok") for k, v in res.items() if k.startswith("rank")}
                lines.append(f"{head} alpha0 ok per rank {ranks}, local heads only {heads}")
            if scheme == "tensor_parallel" and res.get("selection_vs_device_map"):
                s = res["selection_vs_device_map"]
                lines.append(f"{head} per-head density vs device_map: max |diff| {s['max_abs_diff']:.4f} over "
                             f"{s['heads_compared']} (layer, head)")
            timing, dens = rank0.get("timing"), rank0.get("density_long")
            if timing:
                base = timing["rows"][0]["median_s"]
                cells = [f"{r['impl']}{'/' + r['note'] if r['note'] else ''} {r['median_s'] * 1e3:.1f} ms "
                         f"(x{base / r['median_s']:.2f})" for r in timing["rows"]]
                lines.append(f"{head} {timing['tokens']} tok: " + ", ".join(cells)
                             + (f", density {dens['density']:.1%}" if dens else ""))
    lines.append(f"errors: {len(result['errors'])}" + ("" if not result["errors"] else " (see JSON 'errors')"))
    return lines


def driver(args) -> int:
    t_start = time.time()
    deadline = t_start + args.budget
    args.out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    for old in work.glob("*.json"):
        old.unlink()
    log_path = args.out.with_suffix(".log")
    result: dict = {"errors": [], "stages": {}}
    try:
        from fp_tools.benchmark import environment

        result["environment"] = environment()
    except Exception as err:  # noqa: BLE001
        result["errors"].append(f"environment: {err}")
        result["environment"] = {"torch": torch.__version__}
    for package in ("accelerate", "pandas"):
        try:
            result["environment"][package] = __import__(package).__version__
        except ImportError:
            result["environment"][package] = None
    gpus = torch.cuda.device_count()
    result["environment"]["cuda_devices"] = gpus
    if not args.quick and gpus < 2:
        print(f"{TAG} needs 2 CUDA devices, found {gpus}; use --quick for the CPU smoke run", flush=True)
        return 2
    result["args"] = {k: str(v) for k, v in vars(args).items()}
    me = [sys.executable, str(Path(__file__).resolve())]
    common = ["--work", str(work), "--check-len", str(args.check_len), "--long", str(args.long),
              "--repeats", str(args.repeats), "--models", *args.models] + (["--quick"] if args.quick else [])
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    plan = [("probe", 35), ("device_map", 80), ("tensor_parallel", 90)]  # caps; the budget decides
    with open(log_path, "w") as log:
        log.write(f"{TAG} {json.dumps(result['environment'])}\n")
        for name, cap in plan:
            left = deadline - time.time()
            if name == "probe" and args.quick:
                print(f"{TAG} probe: SKIPPED (--quick: needs two CUDA devices)", flush=True)
                continue
            if left < 15:
                print(f"{TAG} {name}: SKIPPED ({left:.0f}s of the budget left)", flush=True)
                result["errors"].append(f"{name}: skipped, budget spent")
                continue
            limit = min(cap, left - 5)
            child_deadline = str(time.time() + limit - 3)
            if name == "tensor_parallel":
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                       me[1], "--tp-worker", "--deadline", child_deadline, *common]
            else:
                cmd = [*me, "--stage", name, "--deadline", child_deadline, *common]
            print(f"{TAG} {name}: start (limit {limit:.0f}s, {time.time() - t_start:.0f}s elapsed)", flush=True)
            info = run_child(cmd, limit + 12, log, env)
            result["stages"][name] = info
            print(f"{TAG} {name}: rc={info['rc']} timed_out={info['timed_out']} in {info['wall_s']}s", flush=True)
            if info["rc"] != 0:
                result["errors"].append(f"{name}: rc={info['rc']} timed_out={info['timed_out']}: "
                                        + " / ".join(info.get("output_tail", [])[-6:]))
            merge(result, name, work)
            args.out.write_text(json.dumps(result, indent=1, default=str))
        result["total_wall_s"] = round(time.time() - t_start, 1)
        lines = summary_lines(result)
        log.write("\n".join(lines) + "\n")
    args.out.write_text(json.dumps(result, indent=1, default=str))
    print("\n".join(lines), flush=True)
    print(f"{TAG} wrote {args.out} and {log_path} ({result['total_wall_s']}s)", flush=True)
    return 0


def merge(result: dict, name: str, work: Path) -> None:
    if name == "probe":
        part = read_json(work / "probe.json")
        result["device_guard_probe"] = part.get("probe")
        result["guard_in_source"] = part.get("guard_in_source")
    elif name == "device_map":
        part = read_json(work / "device_map.json")
        result["device_map"] = part.get("device_map", {})
        result["models"] = part.get("models")
        result["environment"]["gpus"] = part.get("gpus")
    else:
        ranks = [read_json(p) for p in sorted(work.glob("tp_rank*.json"))]
        tp: dict = {}
        for r in ranks:
            for model_name, res in (r.get("tensor_parallel") or {}).items():
                tp.setdefault(model_name, {})[f"rank{r['rank']}"] = res
        for model_name, per_rank in tp.items():
            dm = (result.get("device_map") or {}).get(model_name) or {}
            res_ranks = [{**v, "rank": int(k[4:])} for k, v in per_rank.items()]
            per_rank["selection_vs_device_map"] = compare_selection(dm, res_ranks)
        result["tensor_parallel"] = tp
        part = ranks
    for r in part if isinstance(part, list) else [part]:
        result["errors"] += [f"{name}: {e}" for e in r.get("errors", [])]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/multi_gpu_h200x2.json"))
    parser.add_argument("--work", default="/tmp/fp_multi_gpu", help="where the random models are saved")
    parser.add_argument("--models", nargs="+", default=None, choices=sorted(MODELS))
    parser.add_argument("--check-len", type=int, default=None, help="tokens of the logits check (default 4096)")
    parser.add_argument("--long", type=int, default=None, help="tokens of the timed prefill (default 32768)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats after one warm-up (default 3)")
    parser.add_argument("--budget", type=float, default=150.0, help="seconds for the whole run")
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: tiny model, float32, gloo")
    parser.add_argument("--stage", choices=["probe", "device_map"], help=argparse.SUPPRESS)
    parser.add_argument("--tp-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    quick_defaults = {"models": ["quick"], "check_len": 256, "long": 512, "repeats": 1}
    full_defaults = {"models": ["tiny", "mid"], "check_len": 4096, "long": 32768, "repeats": 3}
    for key, value in (quick_defaults if args.quick else full_defaults).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.deadline is None:
        args.deadline = time.time() + args.budget
    if args.tp_worker or args.stage:
        import fp_patch  # noqa: F401 - registers "flashprefill"

        if args.tp_worker:
            tp_worker(args)
            return 0
        stage = Stage(args.stage, Path(args.work) / f"{args.stage}.json", args.deadline)
        {"probe": stage_probe, "device_map": stage_device_map}[args.stage](args, stage)
        stage.save()
        return 0
    return driver(args)


if __name__ == "__main__":
    raise SystemExit(main())
