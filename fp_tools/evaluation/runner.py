"""Run a causal LM over a suite, implementation by implementation, with resume.

One record per (case, implementation) is appended to ``results.jsonl`` as soon as it is done
(flushed and fsynced), so an interrupted run continues where it stopped: finished pairs are read
back and skipped. A half-written last line (the process was killed while writing) is ignored.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .scoring import score

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"


@dataclass(frozen=True)
class Implementation:
    """An attention implementation to evaluate, parsed from ``NAME[:key=value,...]``.

    ``name`` is the registered ``attn_implementation`` (``"sdpa"``, ``"flashprefill"``, ``"eager"``,
    any other registered one); ``options`` go to :func:`fp_patch.configure` for ``flashprefill``
    (``alpha=0.1``, ``backend=reference``, ``config=path.json`` for a saved config). ``label`` names
    it in the results (default: the spec string itself).
    """

    name: str
    options: tuple[tuple[str, object], ...] = ()
    label: str = ""

    @classmethod
    def parse(cls, spec: str) -> Implementation:
        name, _, rest = spec.partition(":")
        name = name.strip()
        if not name:
            raise ValueError(f"an implementation is NAME[:key=value,...], got {spec!r}")
        options: dict[str, object] = {}
        label = spec
        for item in filter(None, (x.strip() for x in rest.split(","))):
            key, eq, value = item.partition("=")
            if not eq:
                raise ValueError(f"option {item!r} of {spec!r} is not key=value")
            if key == "label":
                label = value
            else:
                options[key.strip()] = _parse_value(value.strip())
        return cls(name, tuple(options.items()), label or spec)

    def __post_init__(self):
        if self.options and not self.is_sparse:
            raise ValueError(
                f"implementation {self.name!r} takes no options: they configure flashprefill only, got "
                f"{dict(self.options)}; write {self.name!r} alone (or {self.name}:label=NAME to rename it)"
            )

    @property
    def is_sparse(self) -> bool:
        return self.name == "flashprefill"

    def spec(self, backend: str | None = None) -> dict:
        """What this implementation is, as stored in the results: ``{"name", "options"}`` (a run-wide
        ``backend`` is folded into a flashprefill implementation's options unless it sets its own)."""
        options = dict(self.options)
        if self.is_sparse and backend is not None:
            options.setdefault("backend", backend)
        return {"name": self.name, "options": options}


def _parse_value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def _sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def resolve_config(model, impl: Implementation, backend: str | None = None):
    """The :class:`fp_patch.FlashPrefillConfig` that ``impl`` runs ``model`` with (``None`` for a dense
    implementation): the per-model defaults (or ``config=path.json``) with the spec's options on top."""
    if not impl.is_sparse:
        return None
    from fp_patch.config import FlashPrefillConfig, model_defaults

    options = impl.spec(backend)["options"]
    path = options.pop("config", None)
    base = FlashPrefillConfig.from_json(path) if path else model_defaults(model.config)
    return base.replace(**options)


def cache_keyword(model) -> str:
    """The name under which ``model``'s forward takes and returns the KV cache: ``"cache"`` from
    Transformers 5.25 (``past_key_values`` still works there, with a FutureWarning, until 5.40),
    ``"past_key_values"`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def activate(model, impl: Implementation, backend: str | None = None) -> None:
    """Switch ``model`` to ``impl`` in place; FlashPrefill settings start from the per-model defaults
    (or ``config=path.json``), never from what a previous implementation left."""
    config = resolve_config(model, impl, backend)
    if config is not None:
        import fp_patch

        fp_patch.configure(model, config)
    model.set_attn_implementation(impl.name)


def implementation_record(model, impl: Implementation, backend: str | None = None) -> dict:
    """``{"impl_spec", "fp_config"}`` as written into every record and ``run.json``: the spec and the
    resolved config as a plain dict (``None`` for dense implementations)."""
    config = resolve_config(model, impl, backend)
    return {"impl_spec": impl.spec(backend), "fp_config": None if config is None else config.to_dict()}


def check_resumable(records: Iterable[dict], described: dict[str, dict]) -> None:
    """Refuse to resume when earlier records under a label came from another implementation.

    ``described`` maps each label to :func:`implementation_record`. A record's ``impl_spec`` must
    equal the current one, and its ``fp_config`` must agree on every field both have (a field added
    to ``FlashPrefillConfig`` since the record was written is not a difference). Records written
    before specs were recorded carry neither and are taken as they are (logged).
    """
    legacy: dict[str, int] = {}
    for r in records:
        now = described.get(r.get("impl"))
        if now is None:
            continue
        if "impl_spec" not in r:
            legacy[r["impl"]] = legacy.get(r["impl"], 0) + 1
            continue
        problem = None
        if r["impl_spec"] != now["impl_spec"]:
            problem = f"spec {r['impl_spec']} (now {now['impl_spec']})"
        else:
            old, new = r.get("fp_config") or {}, now["fp_config"] or {}
            changed = sorted(k for k in old.keys() & new.keys() if old[k] != new[k])
            if changed:
                problem = "FlashPrefill config " + ", ".join(f"{k}={old[k]!r} (now {new[k]!r})" for k in changed)
        if problem:
            raise ValueError(
                f"results labelled {r['impl']!r} (e.g. case {r.get('id')}) were run with {problem}; "
                "results of two configurations are never mixed under one label: give this one another "
                "label=..., write to another output folder, or discard the old results (--overwrite)"
            )
    for label, count in legacy.items():
        logger.warning("%d earlier record(s) labelled %r carry no implementation spec (written before specs "
                       "were recorded); resuming on the assumption that they used the same one", count, label)


@contextlib.contextmanager
def _recording(model, impl: Implementation):
    """Yield a getter of the prefill's block density: over the sparse layers, 1.0 when every layer ran
    dense (a prompt shorter than ``min_sparse_len``), NaN for dense implementations."""
    if not impl.is_sparse:
        yield lambda: float("nan")
        return
    import fp_patch

    with fp_patch.record_density(model) as rec:
        yield lambda: 1.0 if math.isnan(rec.density()) else rec.density()


def generate_case(
    model, tokenizer, input_ids: Sequence[int], max_new_tokens: int, impl: Implementation, done=None
) -> dict:
    """Greedy prefill + decode of one prompt; prefill timed and its block density recorded.

    Decoding stops at ``max_new_tokens``, an end-of-sequence token, or as soon as ``done(text)`` is
    true (the runner stops once every expected answer is found: more text cannot change the score).
    """
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([list(input_ids)], device=device)
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    with torch.inference_mode():
        with _recording(model, impl) as density:
            _sync(device)
            start = time.perf_counter()
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            _sync(device)
            prefill_s = time.perf_counter() - start
        measured = density()
        start = time.perf_counter()
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        generated = [int(token)]
        cache_name = cache_keyword(model)
        cache = getattr(out, cache_name)
        while len(generated) < max_new_tokens and generated[-1] not in eos:
            if done is not None and done(tokenizer.decode(generated, skip_special_tokens=True)):
                break
            out = model(input_ids=token, use_cache=True, **{cache_name: cache})
            cache = getattr(out, cache_name)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            generated.append(int(token))
        _sync(device)
        decode_s = time.perf_counter() - start
    return {
        "prediction": tokenizer.decode(generated, skip_special_tokens=True),
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "density": measured,
    }


def repair_results(path: str | os.PathLike) -> None:
    """Drop unreadable lines (a write cut short by an interruption) so that appending stays valid."""
    path = Path(path)
    if not path.exists():
        return
    text = path.read_text(encoding="utf-8")
    good = [line for line in text.splitlines() if _parses(line)]
    fixed = "".join(line + "\n" for line in good)
    if fixed != text:
        logger.warning("%s: dropping %d incomplete line(s) left by an interrupted run", path,
                       len(text.splitlines()) - len(good))
        tmp = path.with_suffix(".tmp")
        tmp.write_text(fixed, encoding="utf-8")
        os.replace(tmp, path)


def _parses(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True


def read_results(path: str | os.PathLike) -> list[dict]:
    """Records of a ``results.jsonl`` (a truncated last line from an interrupted write is skipped)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("skipping an incomplete line in %s (interrupted write)", path)
    return records


@dataclass
class EvalRun:
    """Runs ``dataset`` through ``model`` for each implementation into ``out_dir/results.jsonl``."""

    model: object
    tokenizer: object
    dataset: object  # datasets.Dataset from build_suite
    implementations: Sequence[Implementation]
    out_dir: Path
    backend: str | None = None
    progress: bool = True
    max_new_tokens: int | None = None  # cap on the tasks' own answer budgets
    extra: dict = field(default_factory=dict)  # copied into every record

    def pending(self) -> list[tuple[Implementation, int]]:
        """(implementation, row) pairs not in ``results.jsonl`` yet, shortest lengths first (so an
        interrupted run has every implementation at the lengths it finished), then implementation."""
        done = {(r["impl"], r["id"]) for r in read_results(self.out_dir / RESULTS_FILE)}
        ids, lengths = self.dataset["id"], self.dataset["length"]
        todo = [(lengths[i], k, i, impl) for k, impl in enumerate(self.implementations) for i, cid in enumerate(ids)
                if (impl.label, cid) not in done]
        return [(impl, i) for _, _, i, impl in sorted(todo, key=lambda t: t[:3])]

    def run(self) -> list[dict]:
        from tqdm.auto import tqdm

        self.out_dir.mkdir(parents=True, exist_ok=True)
        repair_results(self.out_dir / RESULTS_FILE)
        described = {impl.label: implementation_record(self.model, impl, self.backend) for impl in self.implementations}
        check_resumable(read_results(self.out_dir / RESULTS_FILE), described)
        todo = self.pending()
        skipped = len(self.implementations) * len(self.dataset) - len(todo)
        if skipped:
            logger.info("resuming: %d finished case(s) kept, %d to run", skipped, len(todo))
        active = None
        with open(self.out_dir / RESULTS_FILE, "a", encoding="utf-8") as sink:
            bar = tqdm(todo, disable=not self.progress, desc="eval", unit="case")
            for impl, index in bar:
                if impl is not active:  # a few switches per length: configure + set_attn_implementation
                    activate(self.model, impl, self.backend)
                    active = impl
                case = self.dataset[index]
                bar.set_postfix_str(f"{impl.label} {case['id']}")
                def complete(text, case=case):
                    return score(text, case["answers"], case["metric"]) == 1.0

                budget = min(case["max_new_tokens"], self.max_new_tokens or case["max_new_tokens"])
                result = generate_case(self.model, self.tokenizer, case["input_ids"], budget, impl, done=complete)
                record = {
                    "impl": impl.label,
                    "attn_implementation": impl.name,
                    **described[impl.label],
                    **{k: case[k] for k in ("id", "task", "length", "depth", "sample", "answers")},
                    **result,
                    "score": score(result["prediction"], case["answers"], case["metric"]),
                    **self.extra,
                }
                sink.write(json.dumps(record) + "\n")
                sink.flush()
                os.fsync(sink.fileno())
        return read_results(self.out_dir / RESULTS_FILE)


def evaluate(model, tokenizer, dataset, implementations: Iterable[str | Implementation], out_dir, **kwargs):
    """Convenience wrapper: run (or resume) and return the records of ``out_dir/results.jsonl``."""
    impls = [i if isinstance(i, Implementation) else Implementation.parse(i) for i in implementations]
    labels = [i.label for i in impls]
    if len(set(labels)) != len(labels):
        raise ValueError(f"implementation labels must be distinct, got {labels}; add label=... to tell them apart")
    return EvalRun(model, tokenizer, dataset, impls, Path(out_dir), **kwargs).run()
