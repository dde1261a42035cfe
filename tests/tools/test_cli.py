"""The command line before anything runs: ``--help`` never imports torch, one length syntax, and every
user mistake ends with exit status 2 and one line, before a model is loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from fp_tools import args as cli_args
from fp_tools import bench, cli

ROOT = Path(__file__).resolve().parents[2]
HELP_ARGVS = [["--help"], *([name, "--help"] for name in cli.SUBCOMMANDS), ["bench", "--ttft", "--help"]]

PROBE = """
import sys
from fp_tools.cli import build_parser
argv = sys.argv[1:]
try:
    build_parser(argv).parse_args(argv)
except SystemExit as exit_:
    assert exit_.code == 0, exit_.code
heavy = sorted(m for m in ("torch", "transformers", "fp_patch", "fp_kernels", "triton") if m in sys.modules)
print("HEAVY:", ",".join(heavy))
"""


@pytest.mark.parametrize("argv", HELP_ARGVS, ids=" ".join)
def test_help_never_imports_torch(argv):
    """A fresh interpreter builds the parser and prints the help without importing torch, Transformers or
    fp_patch (what made ``--help`` take ~8 s): a check on imports, not a flaky timing."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "kernels"), str(ROOT)])}
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, env=env,
                          timeout=120, check=True)
    assert "usage: flashprefill" in done.stdout
    assert done.stdout.strip().endswith("HEAVY:"), done.stdout.splitlines()[-1]


@pytest.mark.parametrize(("text", "tokens"), [("2048", 2048), ("2K", 2048), ("2k", 2048), ("32K", 32768),
                                               (" 1.5K ", 1536), (4096, 4096)])
def test_one_length_syntax(text, tokens):
    assert cli_args.parse_length(text) == tokens


@pytest.mark.parametrize("text", ["", "2x", "K", "0", "-1K", "1.3", "0.0001K"])
def test_bad_lengths_say_the_syntax(text):
    with pytest.raises(cli_args.UsageError, match="--lengths"):
        cli_args.parse_length(text, "--lengths")


def test_length_lists_take_commas_and_words():
    assert cli_args.parse_lengths(["2K,4K", "8192", "4k"]) == [2048, 4096, 8192]
    assert cli_args.parse_lengths("1K,2K") == [1024, 2048]


def test_bench_knows_the_ttft_models():
    from fp_tools import ttft

    assert bench.TTFT_MODELS == ttft.MODELS


@pytest.fixture
def no_model_loading(monkeypatch):
    """Every way a subcommand loads a model fails the test."""
    import fp_patch.models
    import fp_tools.evaluation.cli as eval_cli
    from fp_tools import inspect_cli

    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded before the flags were checked")

    monkeypatch.setattr(fp_patch.models, "load_smollm2", fail)
    monkeypatch.setattr(fp_patch.models, "smollm2_path", fail)
    monkeypatch.setattr(eval_cli, "load_model", fail)
    monkeypatch.setattr(inspect_cli, "load_model", fail)


MISTAKES = [
    (["demo", "--length", "999999"], "--length 999999: longer than the model's context (smollm2: 8192 (8K) tokens"),
    (["demo", "--length", "4Q"], "expected a token count like 2048, 2K"),
    (["demo", "--depth", "1.5"], "--depth: expected a value in [0.0, 1.0]"),
    (["eval", "--lengths", "999999"], "--lengths 999999: longer than the model's context"),
    (["eval", "--lengths", "2K,nope"], "--lengths: expected a token count"),
    (["eval", "--tasks", "niah_single,bogus"], "--tasks: unknown task(s) ['bogus']; choose from niah_single"),
    (["eval", "--model", "no/such/folder"], "--model: expected 'smollm2' (the embedded model) or a local"),
    (["eval", "--impl", "bogus"], "--impl 'bogus': unknown implementation 'bogus'"),
    (["eval", "--impl", "flashprefill:alpha=2"], "--impl 'flashprefill:alpha=2': alpha must be"),
    (["eval", "--impl", "flashprefill:nope=1"], "unknown FlashPrefillConfig field(s) ['nope']"),
    (["eval", "--impl", "flashprefill:config=missing.json"], "--impl 'flashprefill:config=missing.json'"),
    (["eval", "--samples", "0"], "--samples: expected a value >= 1, got 0"),
    (["calibrate", "--length", "999999"], "--length 999999: longer than the model's context"),
    (["calibrate", "--target-density", "1.5"], "--target-density: expected a value in (0.0, 1.0], got 1.5"),
    (["calibrate", "--model", "gpt2"], "--model: expected 'smollm2'"),
    (["calibrate", "--lengths", "2K"], "--lengths: only with --speed"),
    (["calibrate", "--base-config", "missing.json"], "--base-config: config file missing.json does not exist"),
    (["calibrate", "--accuracy-tolerance", "2", "--accuracy-lengths", "99K"], "--accuracy-lengths 101376: longer"),
    (["inspect", "smollm2", "--lengths", "999999"], "--lengths 999999: longer than the model's context"),
    (["inspect", "smollm2", "--block-maps", "30"], "--block-maps: the model has layers 0 .. 29, got [30]"),
    (["inspect", "smollm2", "missing-prompt.txt"], "prompt file missing-prompt.txt does not exist"),
    (["bench", "--ttft", "--device", "cpu", "--lengths", "999999"], "smollm2's context is 8192 tokens"),
    (["bench", "--ttft", "--device", "cpu", "--heads", "4"], "--heads: operator benchmark flags"),
    (["bench", "--lengths", "2K", "--model", "llama8b"], "--model: only with --ttft"),
    (["bench", "--head-dim", "100"], "--head-dim 100: the kernels support 64, 80, 96, 128, 256"),
]


@pytest.mark.parametrize(("argv", "message"), MISTAKES, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_mistakes_exit_2_with_one_line_before_loading(argv, message, no_model_loading, capsys, tmp_path,
                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and err.startswith(f"flashprefill {argv[0]}: error: "), err


def test_argparse_mistakes_are_one_line_too(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["eval", "--samples", "many"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--samples: invalid int value: 'many'" in err and "eval --help" in err


def test_machines_without_cuda_get_a_plain_answer(no_model_loading, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["calibrate", "--speed", "--out", "fast.json"]) == 2
    assert "--speed measures on a CUDA GPU; this machine has none" in capsys.readouterr().err
    assert cli.main(["bench"]) == 2
    assert "the operator benchmark measures on a CUDA GPU" in capsys.readouterr().err
    assert cli.main(["eval", "--device", "cuda"]) == 2
    assert "--device cuda: CUDA is not available on this machine; use --device cpu" in capsys.readouterr().err


@pytest.fixture(scope="module")
def real_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


# -- calibrate --speed: the flags and the wiring (the measurement itself runs on a GPU) ----------------


def speed_args(*extra: str):
    parser = cli.build_parser(["calibrate"])
    args = parser.parse_args(["calibrate", "--speed", "--device", "cuda", *extra])
    args.progress = False
    return args


def test_speed_flags_are_checked(monkeypatch):
    import torch

    from fp_tools import calibration

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = speed_args()
    calibration.check(args)
    assert args.lengths == [1024, 2048, 4096]  # 8K + a generated token does not fit SmolLM2's 8K context
    args = speed_args("--lengths", "2K,4k", "--repeats", "3")
    calibration.check(args)
    assert args.lengths == [2048, 4096]
    for extra, message in ((["--repeats", "0"], "--repeats: expected a value >= 1"),
                           (["--lengths", "8K"], "--lengths 8192: longer than the model's context"),
                           (["--per-layer"], "--per-layer: not with --speed")):
        with pytest.raises(cli_args.UsageError, match=message):
            calibration.check(speed_args(*extra))


def test_speed_wiring_measures_prose_prompts_and_writes_the_config(real_tokenizer, tmp_path, monkeypatch):
    """``run_speed`` builds one prose prompt per length with the density search's prompt builder, calls
    ``fp_tools.speed_calibration.calibrate_speed`` (replaced here: it measures on a GPU) and writes
    ``result.apply(base)`` and the measurements."""
    import torch

    from fp_patch import FlashPrefillConfig
    from fp_tools import calibration

    calls = []

    class Result:
        def apply(self, config):
            return config.replace(min_sparse_len=4096, dense_layers=(0,))

        def to_dict(self):
            return {"rows": [{"tokens": 2048, "ms": 1.0}], "min_sparse_len": 4096, "dense_layers": [0]}

    def calibrate_speed(model, prompts, *, repeats=5, progress=True):
        calls.append((model, prompts, repeats, progress))
        return Result()

    fake = types.ModuleType("fp_tools.speed_calibration")
    fake.calibrate_speed = calibrate_speed
    monkeypatch.setitem(sys.modules, "fp_tools.speed_calibration", fake)
    model = torch.nn.Linear(2, 2)  # stands for the model: only its device is read
    out = tmp_path / "fast.json"
    args = speed_args("--lengths", "1K,2K", "--repeats", "7", "--out", str(out))
    args.lengths = [1024, 2048]
    base = FlashPrefillConfig(alpha=0.1)
    assert calibration.run_speed(args, model, real_tokenizer, base, progress=False) == 0
    (called_model, prompts, repeats, progress), = calls
    assert called_model is model and repeats == 7 and progress is False
    assert sorted(prompts) == [1024, 2048]
    for n, ids in prompts.items():
        assert ids.shape == (1, n) and ids.device == torch.device("cpu")
        assert ids[0].tolist() == calibration.calibration_prompts(real_tokenizer, n, 1)[0]
    saved = FlashPrefillConfig.from_json(out)
    assert saved == base.replace(min_sparse_len=4096, dense_layers=(0,))
    assert json.loads((tmp_path / "fast.speed.json").read_text())["min_sparse_len"] == 4096

