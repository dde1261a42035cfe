"""The user-facing name on the oldest and the newest supported Transformers (pyproject: >=4.57,<5.24).

Each version runs the same check script in a fresh interpreter: the newest is the installed one;
the oldest (4.57.6) is a ``pip install --no-deps --target DIR`` put in front of ``sys.path``::

    pip install --no-deps --target ~/.cache/flashprefill/transformers-4.57.6 \\
        transformers==4.57.6 tokenizers==0.22.1 huggingface-hub==0.36.0

``FLASHPREFILL_OLD_TRANSFORMERS`` names another DIR; when it is set the test fails instead of
skipping if DIR does not hold transformers 4.57.x (CI sets it). ``FLASHPREFILL_REQUIRE_NEWEST=1`` (CI
sets it too) makes the "newest" test fail unless the installed Transformers is the newest minor
release that pyproject.toml admits (5.23.x for ``<5.24``), so the claim is really exercised.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OLDEST = "4.57.6"
OLD_DIR_ENV = "FLASHPREFILL_OLD_TRANSFORMERS"
DEFAULT_OLD_DIR = Path.home() / ".cache" / "flashprefill" / f"transformers-{OLDEST}"
NEWEST_ENV = "FLASHPREFILL_REQUIRE_NEWEST"


def claimed_range() -> tuple[tuple[int, int], tuple[int, int]]:
    """``((oldest major, minor), (newest major, minor))`` from pyproject's ``transformers>=A.B,<C.D``."""
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    match = re.search(r'"transformers>=(\d+)\.(\d+)[.\d]*,\s*<(\d+)\.(\d+)"', text)
    assert match, "pyproject.toml must pin transformers as >=A.B,<C.D"
    lo_major, lo_minor, hi_major, hi_minor = map(int, match.groups())
    assert hi_minor > 0, "write the upper bound as <C.D with D > 0"
    return (lo_major, lo_minor), (hi_major, hi_minor - 1)


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
    oldest, _ = claimed_range()
    assert major_minor(OLDEST) == oldest, f"pyproject's lower bound {oldest} is not the tested oldest {OLDEST}"


def test_newest_supported_transformers():
    import transformers

    _, newest = claimed_range()
    installed = major_minor(transformers.__version__)
    if os.environ.get(NEWEST_ENV) == "1":
        assert installed == newest, (
            f"{NEWEST_ENV}=1: transformers {transformers.__version__} is installed, but the newest claimed is "
            f"{newest[0]}.{newest[1]}.x; install it (pip install 'transformers=={newest[0]}.{newest[1]}.*')"
        )
    assert installed <= newest, f"transformers {transformers.__version__} is newer than pyproject admits"
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
    tests = [str(REPO / "tests" / name) for name in ("test_integration.py", "test_integration_routing.py")]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", *tests, "-q", "-x", "-m", "not slow", "-p", "no:cacheprovider"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, f"tiny-model suite failed on transformers {OLDEST}:\n{proc.stdout[-6000:]}"
