"""``flashprefill demo`` and ``flashprefill inspect`` end to end.

The demo runs on the real embedded model (SmolLM2-135M-Instruct) at a short length with 64-token
blocks (so the prompt has 16 blocks and the selection is sparse); it is marked slow (~1 min on a
2-core CPU). ``inspect`` runs on a tiny random Llama saved to a folder.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pandas as pd
import pytest
import torch
import transformers

from fp_tools import cli

DEMO_LENGTH = 1024


def test_console_script_help():
    exe = shutil.which("flashprefill")
    if exe is None:
        pytest.skip("console script not installed (pip install -e .)")
    out = subprocess.run([exe, "demo", "--help"], capture_output=True, text=True, timeout=120, check=True).stdout
    for flag in ("--length", "--alpha", "--device", "--out"):
        assert flag in out


def test_inspect_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["inspect", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--lengths", "--alpha", "--device", "--out", "--block-maps", "--error"):
        assert flag in out


def test_demo_rejects_bad_length(capsys):
    assert cli.main(["demo", "--length", "10"]) == 2
    assert "--length" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags", [["--alpha", "1.5"], ["--alpha", "-0.1"], ["--block-size", "100"], ["--block-size", "8"]], ids=" ".join
)
def test_demo_rejects_bad_settings_before_loading(flags, capsys, monkeypatch):
    import fp_patch.models

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(fp_patch.models, "load_smollm2", no_loading)
    monkeypatch.setattr(fp_patch.models, "smollm2_path", no_loading)
    assert cli.main(["demo", *flags, "--device", "cpu"]) == 2
    assert flags[0] in capsys.readouterr().err


@pytest.mark.parametrize("layer", ["30", "-1"])
def test_demo_rejects_map_layer_out_of_range(smollm2_tokenizer, layer, capsys, monkeypatch):
    import fp_patch.models

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before --map-layer was checked")

    monkeypatch.setattr(fp_patch.models, "load_smollm2", no_loading)
    assert cli.main(["demo", "--map-layer", layer, "--device", "cpu"]) == 2
    assert f"--map-layer: the model has layers 0 .. 29, got [{layer}]" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["demo", "inspect"])
def test_help_states_each_default_once(command):
    import argparse

    from fp_tools import demo, inspect_cli

    parser = argparse.ArgumentParser()
    {"demo": demo, "inspect": inspect_cli}[command].add_arguments(parser)
    formatter = parser._get_formatter()
    for action in parser._actions:
        text = (formatter._get_help_string(action) or "").replace("%(default)s", str(action.default))
        assert text.count("(default") <= 1, f"{action.option_strings}: {text!r}"
        assert "(default: None)" not in text and "(default: False)" not in text, f"{action.option_strings}: {text!r}"


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.mark.slow
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_needle_prompt(smollm2_tokenizer, depth):
    from fp_tools.demo import needle_prompt

    prompt = needle_prompt(smollm2_tokenizer, 1000, depth=depth, number=4321)
    ids = prompt["inputs"]["input_ids"]
    assert ids.shape == (1, prompt["tokens"])
    assert abs(prompt["tokens"] - 1000) <= 8
    at = prompt["needle_token"]
    assert "special magic number" in smollm2_tokenizer.decode(ids[0, at : at + 12])
    assert abs(at / prompt["tokens"] - depth) < 0.1
    text = smollm2_tokenizer.decode(ids[0])
    assert text.count("4321") == 1 and text.rstrip().endswith("assistant")


@pytest.mark.slow
def test_demo_end_to_end(smollm2_tokenizer, tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--length", str(DEMO_LENGTH), "--block-size", "64", "--device", "cpu", "--max-new-tokens", "16"]
    code = cli.main([*argv, "--out", str(out)])
    printed = capsys.readouterr().out
    result = json.loads((out / "demo_result.json").read_text())
    sdpa, fp = result["answers"]
    assert (sdpa["implementation"], fp["implementation"]) == ("sdpa", "flashprefill")
    number = str(result["number"])
    assert number in sdpa["text"], f"dense attention should find the fact: {sdpa['text']!r}"
    assert number in fp["text"], f"FlashPrefill should find it too: {fp['text']!r}"
    assert code == 0
    assert sdpa["ttft_s"] > 0 and fp["ttft_s"] > 0
    assert 0 < result["density"] < 1, "the 16-block prompt should be sparse"
    assert result["config"]["block_size"] == 64 and result["config"]["backend"] == "reference"
    for line in ("sdpa ", "flashprefill ", "TTFT", "overall", "layer  density"):
        assert line in printed
    frame = pd.read_csv(out / "density.csv")
    assert len(frame) == 30 * 9 and frame["density"].between(0, 1).all()
    assert (out / "density_heatmap.png").stat().st_size > 10_000
    assert list(out.glob("block_map_L15_H*.png"))


# -- inspect on a tiny model -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer random Llama (D=64) with a word-level tokenizer, saved like any local model."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path_factory.mktemp("tiny-llama")
    words = ["[UNK]", "[BOS]"] + [f"w{i}" for i in range(126)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="[BOS]")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=128,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=None,
        pad_token_id=0,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    prompt = folder / "prompt.txt"
    gen = torch.Generator().manual_seed(0)
    prompt.write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, 126, (400,), generator=gen)))
    return folder


def inspect(model_dir, out, *flags: str) -> int:
    """``flashprefill inspect`` on the tiny model, with its small-block settings."""
    prompt = str(model_dir / "prompt.txt")
    small = ["--block-size", "16", "--min-sparse-len", "32", "--device", "cpu"]
    return cli.main(["inspect", str(model_dir), prompt, "--out", str(out), *small, *flags])


def test_inspect_writes_csv_and_pngs(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "inspect"
    assert inspect(tiny_model_dir, out, "--lengths", "128,256", "--alpha", "0.9", "--block-maps", "1", "--error") == 0
    frame = pd.read_csv(out / "density.csv")
    assert sorted(frame["tokens"].unique()) == [128, 256]
    assert len(frame) == 2 * 2 * 2  # runs x layers x heads
    assert frame["rel_error"].notna().all()
    layers = pd.read_csv(out / "layers.csv")
    assert len(layers) == 4
    for name in ("density_heatmap.png", "density_vs_length.png", "layer_error.png"):
        assert (out / name).stat().st_size > 5_000, name
    assert [p.name.split("_")[-1] for p in sorted(out.glob("block_map_L1_H*.png"))] in (
        ["densest.png", "sparsest.png"], ["sparsest.png"])
    assert "overall" in capsys.readouterr().out


def test_inspect_dense_layers_and_no_maps(tiny_model_dir, tmp_path):
    out = tmp_path / "inspect"
    assert inspect(tiny_model_dir, out, "--max-tokens", "200", "--dense-layers", "0", "--block-maps", "none") == 0
    layers = pd.read_csv(out / "layers.csv", keep_default_na=False)
    assert layers.set_index("layer").loc[0, "reason"] == "dense_layer"
    assert not list(out.glob("block_map_*.png"))


def test_inspect_reports_bad_inputs(tiny_model_dir, tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path), str(tiny_model_dir / "prompt.txt")]) == 2
    assert "config.json" in capsys.readouterr().err
    assert cli.main(["inspect", str(tiny_model_dir), str(tmp_path / "missing.txt"), "--device", "cpu"]) == 2
    assert "prompt file" in capsys.readouterr().err
    code = cli.main(["inspect", str(tiny_model_dir), str(tiny_model_dir / "prompt.txt"), "--lengths", "5000"])
    assert code == 2
    assert "--lengths 5000: longer than the model's context" in capsys.readouterr().err  # 1024 tokens
    code = cli.main(["inspect", str(tiny_model_dir), str(tiny_model_dir / "prompt.txt"), "--lengths", "1K"])
    assert code == 2
    assert "--lengths 1024: the prompt has only 400 tokens" in capsys.readouterr().err
