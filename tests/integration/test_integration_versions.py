"""The user-facing name on the oldest and the newest supported Transformers (pyproject: >=4.57, no upper bound).

Each version runs the same check script in a fresh interpreter: the newest is the installed one;
the oldest (4.57.6) is a ``pip install --no-deps --target DIR`` put in front of ``sys.path``::

    pip install --no-deps --target ~/.cache/flashprefill/transformers-4.57.6 \\
        transformers==4.57.6 tokenizers==0.22.1 huggingface-hub==0.36.0

``FLASHPREFILL_OLD_TRANSFORMERS`` names another DIR; when it is set the test fails instead of
skipping if DIR does not hold transformers 4.57.x (CI sets it). ``FLASHPREFILL_REQUIRE_NEWEST=1`` (CI
sets it too, after ``pip install -U transformers``) makes the "newest" test fail unless the installed
Transformers is at least the newest release tested here (``NEWEST_TESTED``), so the claim is really
exercised.

Transformers >= 5.25 depends on Hugging Face's ``kernels`` package and imports it at start-up; this
repository's ``kernels/`` folder is a plain folder (no ``__init__.py``), so from the root of a checkout
it never shadows that package (``test_repository_root_does_not_shadow_hf_kernels``).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
OLDEST = "4.57.6"
OLD_DIR_ENV = "FLASHPREFILL_OLD_TRANSFORMERS"
DEFAULT_OLD_DIR = Path.home() / ".cache" / "flashprefill" / f"transformers-{OLDEST}"
NEWEST_ENV = "FLASHPREFILL_REQUIRE_NEWEST"
NEWEST_TESTED = (5, 25)  # the newest release this suite was run on (README states the same)


def oldest_claimed() -> tuple[int, int]:
    """``(major, minor)`` of pyproject's lower bound ``transformers>=A.B``."""
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    match = re.search(r'"transformers>=(\d+)\.(\d+)[.\d]*(,[^"]*)?"', text)
    assert match, "pyproject.toml must bound transformers as >=A.B"
    assert match.group(3) is None, "an upper bound only where a known break exists: document it here and in README"
    return int(match.group(1)), int(match.group(2))


def major_minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)

CHECK = r"""
import json, sys, tempfile
import torch
import fp_patch
import transformers
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, LlamaConfig, Qwen2_5_VLConfig
from transformers.utils import generic

calls = []
def counting(module, *args, **kwargs):
    calls.append(type(module).__name__)
    return fp_patch.flashprefill_attention_forward(module, *args, **kwargs)
transformers.AttentionInterface.register(fp_patch.INTERNAL_NAME, counting)

settings = dict(alpha=0.0, block_size=16, min_sparse_len=16, backend="reference")
small = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, vocab_size=256)
result = {"version": transformers.__version__}
naive = getattr(generic, "is_flash_attention_requested", None)
result["name_means_flash"] = bool(naive and naive(requested_attention_implementation="flashprefill"))
torch.manual_seed(0)
ids = torch.randint(0, 256, (1, 64))
with tempfile.TemporaryDirectory() as tmp:
    AutoModelForCausalLM.from_config(LlamaConfig(**small)).save_pretrained(tmp)
    fp = AutoModelForCausalLM.from_pretrained(tmp, attn_implementation="flashprefill").eval()
    ref = AutoModelForCausalLM.from_pretrained(tmp, attn_implementation="sdpa").eval()
fp_patch.configure(fp, **settings)
with torch.no_grad():
    result["from_pretrained_max_err"] = (fp(ids).logits - ref(ids).logits).abs().max().item()
result["from_pretrained_calls"] = len(calls)
result["stored_name"] = fp.config._attn_implementation

model = AutoModelForCausalLM.from_config(LlamaConfig(**small), attn_implementation="flashprefill")
result["from_config"] = fp_patch.uses_flashprefill(model)
model.set_attn_implementation("sdpa")
result["set_sdpa"] = model.config._attn_implementation
model.set_attn_implementation("flashprefill")
result["set_flashprefill"] = fp_patch.uses_flashprefill(model)

vl_config = Qwen2_5_VLConfig(
    text_config=dict(small, hidden_size=256, head_dim=128),
    vision_config=dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=256),
)
vl = AutoModelForImageTextToText.from_config(vl_config, attn_implementation="flashprefill")
result["vl_text"] = vl.config.text_config._attn_implementation
result["vl_vision"] = vl.config.vision_config._attn_implementation
vl.set_attn_implementation("sdpa")
vl.set_attn_implementation("flashprefill")
result["vl_vision_after_switch"] = vl.model.visual.config._attn_implementation
result["vl_text_after_switch"] = vl.model.language_model.config._attn_implementation
print("RESULT " + json.dumps(result))
"""


def old_transformers_dir() -> Path | None:
    """The --target folder holding transformers 4.57.x, or None (test skipped) when not installed."""
    env = os.environ.get(OLD_DIR_ENV)
    path = Path(env) if env else DEFAULT_OLD_DIR
    if (path / "transformers" / "__init__.py").exists():
        return path
    if env:
        pytest.fail(f"{OLD_DIR_ENV}={env} does not hold transformers {OLDEST}; install it as the module docstring says")
    return None


def run_check(extra_path: Path | None) -> dict:
    paths = [str(extra_path)] if extra_path else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"check script failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def assert_name_works(result: dict):
    import fp_patch

    assert result["stored_name"] == fp_patch.INTERNAL_NAME
    assert result["from_pretrained_max_err"] < 1e-4
    assert result["from_pretrained_calls"] == 2  # both decoder layers, one forward
    assert result["from_config"] and result["set_flashprefill"] and result["set_sdpa"] == "sdpa"
    assert result["vl_text"] == result["vl_text_after_switch"] == fp_patch.INTERNAL_NAME
    assert result["vl_vision"] == result["vl_vision_after_switch"] == "sdpa"


def test_claimed_range_matches_the_tested_versions():
    oldest = oldest_claimed()
    assert major_minor(OLDEST) == oldest, f"pyproject's lower bound {oldest} is not the tested oldest {OLDEST}"


def test_newest_supported_transformers():
    import transformers

    installed = major_minor(transformers.__version__)
    if os.environ.get(NEWEST_ENV) == "1":
        assert installed >= NEWEST_TESTED, (
            f"{NEWEST_ENV}=1: transformers {transformers.__version__} is installed, older than the newest tested "
            f"{NEWEST_TESTED[0]}.{NEWEST_TESTED[1]}; install the newest (pip install -U transformers)"
        )
    result = run_check(None)
    assert result["version"] == transformers.__version__
    assert result["name_means_flash"], "5.x reads any name with 'flash' as FlashAttention: the reason for the alias"
    assert_name_works(result)


def test_oldest_supported_transformers():
    path = old_transformers_dir()
    if path is None:
        pytest.skip(f"transformers {OLDEST} not installed in {DEFAULT_OLD_DIR} (see this module's docstring)")
    result = run_check(path)
    assert result["version"] == OLDEST
    assert_name_works(result)


@pytest.mark.slow
def test_tiny_model_suite_on_oldest_transformers():
    """The seven-family tiny-model suite and the routing tests, again on transformers 4.57."""
    path = old_transformers_dir()
    if path is None:
        pytest.skip(f"transformers {OLDEST} not installed in {DEFAULT_OLD_DIR} (see this module's docstring)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(path), str(REPO), os.environ.get("PYTHONPATH", "")])}
    version = subprocess.run([sys.executable, "-c", "import transformers; print(transformers.__version__)"],
                             env=env, capture_output=True, text=True, timeout=300).stdout.strip()
    assert version == OLDEST
    tests = [str(Path(__file__).with_name(name)) for name in ("test_integration.py", "test_integration_routing.py")]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", *tests, "-q", "-x", "-m", "not slow", "-p", "no:cacheprovider"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, f"tiny-model suite failed on transformers {OLDEST}:\n{proc.stdout[-6000:]}"


SHADOW_CHECK = r"""
import importlib.util, json, sys
hf = importlib.util.find_spec("kernels")
import transformers
import fp_patch
from transformers import AutoModelForCausalLM, LlamaConfig
model = AutoModelForCausalLM.from_config(
    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=64),
    attn_implementation="flashprefill",
)
import kernels
print("RESULT " + json.dumps({"kernels": kernels.__file__, "origin": hf.origin if hf else None,
                              "fp": fp_patch.uses_flashprefill(model), "path0": sys.path[0]}))
"""


def test_repository_root_does_not_shadow_hf_kernels():
    """Python started at the repository root (``python -m pytest``, ``python -c``, a notebook server)
    has the root on ``sys.path``; Hugging Face's ``kernels`` (a dependency of Transformers >= 5.25)
    must still be the ``kernels`` it imports, and Transformers and fp_patch must load."""
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        if os.environ.get(NEWEST_ENV) == "1":
            pytest.fail("Hugging Face's kernels package is not installed (Transformers >= 5.25 depends on it)")
        pytest.skip("Hugging Face's kernels package is not installed")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    proc = subprocess.run([sys.executable, "-c", SHADOW_CHECK], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"import at the repository root failed:\n{proc.stderr[-6000:]}"
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["path0"] == "", "python -c puts the current directory first on sys.path"
    # a path inside the repository, not one that merely starts with its name (/tmp/ci vs /tmp/civenv)
    shadowed = Path(result["kernels"]).resolve().is_relative_to(REPO)
    assert not shadowed, f"the repository shadows kernels: {result['kernels']}"
    assert result["fp"]
