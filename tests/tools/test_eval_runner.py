"""The eval runner end to end on a tiny random Llama (with the real SmolLM2 tokenizer): records,
density, resume after an interruption, report files, the ``flashprefill eval`` command."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import fp_patch
from fp_tools.cli import main
from fp_tools.evaluation import build_suite, evaluate, read_results, summarize, write_report
from fp_tools.evaluation import runner as runner_mod
from fp_tools.evaluation.runner import Implementation

# many blocks from a few hundred tokens, and the PyTorch operator (conftest may set TRITON_INTERPRET=1)
FP = "flashprefill:block_size=16,min_sparse_len=32,alpha=0.5,backend=reference,label=fp"


@pytest.fixture(scope="module")
def tokenizer():
    from fp_patch.models import smollm2_path

    return transformers.AutoTokenizer.from_pretrained(smollm2_path())


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=len(tokenizer), max_position_embeddings=4096, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.eval()


@pytest.fixture(scope="module")
def suite(tokenizer):
    return build_suite(tokenizer, tasks=["niah_single", "variable_tracking"], lengths=[300], depths=[0.2, 0.8])


def test_implementation_spec_parsing():
    impl = Implementation.parse("flashprefill:alpha=0.05,backend=reference,dense_layers=none,label=cal")
    assert impl.name == "flashprefill" and impl.label == "cal" and impl.is_sparse
    assert dict(impl.options) == {"alpha": 0.05, "backend": "reference", "dense_layers": None}
    assert Implementation.parse("sdpa") == Implementation("sdpa", (), "sdpa")
    with pytest.raises(ValueError, match="key=value"):
        Implementation.parse("flashprefill:alpha")


def test_options_on_a_dense_implementation_are_refused():
    """Options configure flashprefill only: ``sdpa:alpha=0.5`` would silently run plain sdpa."""
    with pytest.raises(ValueError, match="'sdpa' takes no options"):
        Implementation.parse("sdpa:alpha=0.5")
    with pytest.raises(ValueError, match="takes no options"):
        Implementation.parse("eager:config=cal.json,label=x")
    assert Implementation.parse("sdpa:label=dense") == Implementation("sdpa", (), "dense")
    assert Implementation.parse("flashprefill:alpha=0.1").spec("reference") == {
        "name": "flashprefill", "options": {"alpha": 0.1, "backend": "reference"}}
    assert Implementation.parse("flashprefill:backend=triton").spec("reference")["options"] == {"backend": "triton"}
    assert Implementation.parse("sdpa").spec("reference") == {"name": "sdpa", "options": {}}


def test_records_carry_the_spec_and_a_changed_spec_is_refused(tiny_model, tokenizer, suite, tmp_path, caplog):
    out = tmp_path / "run"
    small = suite.select(range(1))
    records = evaluate(tiny_model, tokenizer, small, ["sdpa", FP], out, progress=False, max_new_tokens=2)
    by_impl = {r["impl"]: r for r in records}
    assert by_impl["sdpa"]["impl_spec"] == {"name": "sdpa", "options": {}} and by_impl["sdpa"]["fp_config"] is None
    fp = by_impl["fp"]
    assert fp["impl_spec"] == {"name": "flashprefill", "options": {
        "block_size": 16, "min_sparse_len": 32, "alpha": 0.5, "backend": "reference"}}
    assert fp["fp_config"] == fp_patch.FlashPrefillConfig(
        alpha=0.5, block_size=16, min_sparse_len=32, backend="reference").to_dict()
    # the same label with another alpha: refused before anything runs
    with pytest.raises(ValueError, match=r"never mixed.*label=\.\.\."):
        evaluate(tiny_model, tokenizer, small, ["sdpa", FP.replace("alpha=0.5", "alpha=0.3")], out, progress=False)
    # the same spec whose config file now holds another alpha: also refused (the resolved config differs)
    cfg = tmp_path / "cal.json"
    fp_patch.FlashPrefillConfig(alpha=0.2, block_size=16, min_sparse_len=32, backend="reference").to_json(cfg)
    spec = f"flashprefill:config={cfg},label=cal"
    evaluate(tiny_model, tokenizer, small, [spec], out, progress=False, max_new_tokens=2)
    fp_patch.FlashPrefillConfig(alpha=0.4, block_size=16, min_sparse_len=32, backend="reference").to_json(cfg)
    with pytest.raises(ValueError, match=r"alpha=0.2 \(now 0.4\)"):
        evaluate(tiny_model, tokenizer, small, [spec], out, progress=False)
    # records written before specs were kept resume as they are; a field they lack is not a difference
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    for r in lines:
        if r["impl"] == "sdpa":
            del r["impl_spec"], r["fp_config"]
        elif r["impl"] == "fp":
            del r["fp_config"]["group_select"]
            r["fp_config"]["speed_guard"] = True  # a retired field that older records carry
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    with caplog.at_level("WARNING"):
        again = evaluate(tiny_model, tokenizer, small, ["sdpa", FP], out, progress=False, max_new_tokens=2)
    assert len(again) == len(lines) and "carry no implementation spec" in caplog.text


def test_evaluate_records_density_and_resumes(tiny_model, tokenizer, suite, tmp_path, monkeypatch):
    out = tmp_path / "run"
    records = evaluate(tiny_model, tokenizer, suite, ["sdpa", FP], out, progress=False, max_new_tokens=4)
    assert len(records) == 2 * len(suite) == 8
    by_impl = {r["impl"] for r in records}
    assert by_impl == {"sdpa", "fp"}
    for r in records:
        assert 0.0 <= r["score"] <= 1.0 and r["prefill_s"] > 0
        if r["impl"] == "fp":
            assert 0.0 < r["density"] <= 1.0
        else:
            assert r["density"] != r["density"]  # NaN: dense has no block density
    # length-major order: both implementations of a length before the next length
    assert [r["impl"] for r in records] == ["sdpa"] * 4 + ["fp"] * 4

    # interrupted: three finished lines and one half-written line are left
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:25])
    calls = []
    real = runner_mod.generate_case
    monkeypatch.setattr(runner_mod, "generate_case", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    resumed = evaluate(tiny_model, tokenizer, suite, ["sdpa", FP], out, progress=False, max_new_tokens=4)
    assert len(calls) == 5
    assert sorted((r["impl"], r["id"]) for r in resumed) == sorted((r["impl"], r["id"]) for r in records)
    calls.clear()
    evaluate(tiny_model, tokenizer, suite, ["sdpa", FP], out, progress=False, max_new_tokens=4)
    assert calls == []
    # the model is left configured by the last implementation; its settings are the spec's
    assert fp_patch.get_config(tiny_model).block_size == 16


def test_duplicate_labels_are_refused(tiny_model, tokenizer, suite, tmp_path):
    with pytest.raises(ValueError, match="distinct"):
        evaluate(tiny_model, tokenizer, suite, ["flashprefill:alpha=0.1", "flashprefill:alpha=0.2,label=sdpa", "sdpa"],
                 tmp_path)


def test_summary_accuracy_and_difference():
    rec = [
        {"impl": "sdpa", "id": "a", "task": "t", "length": 1024, "depth": 0.5, "score": 1.0, "density": float("nan"),
         "prefill_s": 1.0},
        {"impl": "sdpa", "id": "b", "task": "t", "length": 1024, "depth": 0.9, "score": 0.5, "density": float("nan"),
         "prefill_s": 1.0},
        {"impl": "fp", "id": "a", "task": "t", "length": 1024, "depth": 0.5, "score": 1.0, "density": 0.5,
         "prefill_s": 0.5},
        {"impl": "fp", "id": "b", "task": "t", "length": 1024, "depth": 0.9, "score": 0.0, "density": 0.7,
         "prefill_s": 0.5},
    ]
    table = summarize(rec)
    fp = table[(table["impl"] == "fp") & (table["length"] == 1024)].iloc[0]
    assert fp["accuracy"] == 50.0 and fp["delta_vs_sdpa"] == -25.0 and fp["density"] == pytest.approx(0.6)
    assert fp["cases"] == 2
    overall = table[(table["impl"] == "sdpa") & (table["length"] == "all")].iloc[0]
    assert overall["accuracy"] == 75.0 and overall["delta_vs_sdpa"] == 0.0


def test_eval_command_end_to_end(tiny_model, tokenizer, tmp_path, capsys):
    folder = tmp_path / "tiny"
    tiny_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "eval"
    args = ["eval", "--model", str(folder), "--tasks", "niah_single,common_words", "--lengths", "300",
            "--depths", "0.0,1.0", "--impl", "sdpa", "--impl", FP, "--out", str(out), "--no-progress",
            "--max-new-tokens", "4"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| niah_single |" in printed and "Block density" in printed
    for name in ("summary.csv", "summary.json", "summary.md", "run.json", "results.jsonl",
                 "needle_heatmap_sdpa.png", "needle_heatmap_fp.png"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "run.json").read_text())
    assert meta["cases"] == 3 and meta["suite"]["lengths"] == [300]
    assert len(read_results(out / "results.jsonl")) == 6
    summary = json.loads((out / "summary.json").read_text())
    assert {row["impl"] for row in summary["summary"]} == {"sdpa", "fp"}
    assert meta["implementation_specs"]["fp"]["fp_config"]["alpha"] == 0.5
    assert meta["implementation_specs"]["sdpa"] == {"impl_spec": {"name": "sdpa", "options": {}}, "fp_config": None}
    # another spec under a label this folder holds is refused before the model loads
    other = [x.replace("alpha=0.5", "alpha=0.3") for x in args]
    capsys.readouterr()
    assert main(other) == 2
    err = capsys.readouterr().err
    assert "labelled 'fp'" in err and "never mixed" in err and err.count("\n") == 1
    # a resumed run keeps what the earlier invocation was
    assert main([*args, "--no-plots"]) == 0
    resumed = json.loads((out / "run.json").read_text())
    assert [r["date"] for r in resumed["earlier_runs"]] == [meta["date"]]
    assert resumed["implementation_specs"] == meta["implementation_specs"]
    # a different suite in the same folder is refused; --overwrite starts over
    assert main([*args[:6], "400", *args[7:]]) == 2
    assert "different suite" in capsys.readouterr().err
    assert main([*args[:6], "400", *args[7:], "--overwrite", "--no-plots"]) == 0
    assert {r["length"] for r in read_results(out / "results.jsonl")} == {400}


def test_write_report_without_needle_task(tmp_path):
    rec = [{"impl": "sdpa", "id": "x", "task": "common_words", "length": 300, "depth": None, "score": 0.1,
            "density": float("nan"), "prefill_s": 0.1}]
    written = write_report(rec, tmp_path)
    assert [p.name for p in written] == ["summary.csv", "summary.json", "summary.md"]
