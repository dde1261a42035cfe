"""The notebooks run top to bottom (CI: on the CPU, short prompts) and are committed without outputs.

Each notebook has one cell tagged ``parameters``; the run inserts a cell after it with the CI
values below (papermill's convention, without the dependency). The executed copies are written
under pytest's temporary folder, never over the committed files.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
# short enough for a 2-core CPU; 64-token blocks keep the prompts multi-block (and so sparse)
CI_PARAMETERS = {
    "01_quickstart.ipynb": "LENGTH = 1024\nBLOCK_SIZE = 64\nMAX_NEW_TOKENS = 16",
    "02_density_inspection.ipynb": "LENGTHS = [512, 1024]\nALPHAS = [0.18, 0.5]\nBLOCK_SIZE = 64",
    "03_operator.ipynb": "LENGTH = 1024\nBLOCK_SIZE = 64\nALPHAS = [0.0, 0.05, 0.18, 0.5]",
}


def notebook_names() -> list[str]:
    return sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))


def test_every_notebook_has_ci_parameters():
    assert notebook_names() == sorted(CI_PARAMETERS)


@pytest.mark.parametrize("name", notebook_names())
def test_committed_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{name}: clear the outputs before committing"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: exactly one cell must be tagged 'parameters'"


def with_parameters(nb, source: str):
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    cell = nbformat.v4.new_code_cell(f"# injected by tests/tools/test_notebooks.py\n{source}")
    cell["id"] = "ci-parameters"
    nb.cells.insert(index + 1, cell)
    return nb


@pytest.mark.slow
@pytest.mark.parametrize("name", notebook_names())
def test_notebook_runs(name, tmp_path, request):
    from nbclient import NotebookClient

    pytest.importorskip("ipykernel")
    # the embedded model, converted once outside the kernel's cell timeout (a failure under FLASHPREFILL_REQUIRE_REAL=1)
    request.getfixturevalue("smollm2_dir")
    nb = with_parameters(nbformat.read(NOTEBOOKS / name, as_version=4), CI_PARAMETERS[name])
    client = NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
    finally:
        nbformat.write(nb, tmp_path / name)
    images = sum("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))
    assert images >= 1, f"{name} showed no figure"
