"""Execute every notebook in tutorials/ on the real data, as a user would run it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "tutorials").glob("*.ipynb"))
TIMEOUT_S = 300

pytestmark = pytest.mark.slow


def test_there_are_tutorials():
    assert NOTEBOOKS, "tutorials/ holds no notebook"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_tutorial_is_saved_with_its_figures(path):
    """The docs show the notebooks as saved: with every cell run, and at least one figure."""
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(path, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    counts = [cell.execution_count for cell in code]
    assert counts == list(range(1, len(code) + 1)), (
        f"{path.name} is not saved as one run from the top; run scripts/execute_tutorials.py on it"
    )
    outputs = [o for cell in code for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name} has no figure"
    # stderr (warnings, progress bars) names files of the machine that ran it
    assert not [o for o in outputs if o.output_type == "stream" and o.name == "stderr"]
    assert str(REPO) not in path.read_text(encoding="utf-8")
    assert path.stat().st_size < 600_000, f"{path.name} is large; make its figures smaller"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_tutorial_runs(path, data_dir, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")

    # The kernel inherits this environment: the real data as the mirror, no download URL, and
    # the isolated cache that conftest sets.
    monkeypatch.setenv("SCFM_TOOLS_DATA", str(data_dir))
    monkeypatch.delenv("SCFM_TOOLS_DATA_URL", raising=False)
    monkeypatch.setenv("MPLBACKEND", "Agg")

    nb = nbformat.read(path, as_version=4)
    nb.cells.append(
        nbformat.v4.new_code_cell("import os, sys\nprint(sys.executable)\nprint(os.getcwd())")
    )
    client = nbclient.NotebookClient(
        nb,
        timeout=TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()

    lines = nb.cells[-1].outputs[0]["text"].splitlines()
    # jupyter_client swaps a kernelspec's "python" for sys.executable; make sure the kernel is
    # this interpreter (the venv with the package), not some other python3 kernel on the machine
    assert os.path.realpath(lines[0]) == os.path.realpath(sys.executable)
    assert Path(lines[1]) == tmp_path
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
