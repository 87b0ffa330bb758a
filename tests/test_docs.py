"""The Sphinx site builds offline, with an API page per public function."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

_DOC_DEPS = ("sphinx", "myst_nb", "sphinx_book_theme")
_MISSING = [name for name in _DOC_DEPS if importlib.util.find_spec(name) is None]


@pytest.mark.skipif(
    bool(_MISSING),
    reason=f"docs dependencies not installed ({', '.join(_MISSING)}); pip install -e '.[doc]'",
)
def test_docs_build(tmp_path):
    out = tmp_path / "html"
    # A subprocess keeps Sphinx's imports and global state out of the test session.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-b",
            "html",
            "-d",
            str(tmp_path / "doctrees"),
            "-q",
            "-W",
            "--keep-going",
            str(REPO / "docs"),
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert (out / "index.html").is_file()
    assert (out / "api.html").is_file()

    generated = out / "generated"
    for name in (
        "pp.match_genes",
        "pp.bin_values",
        "pp.downsample_rda",
        "tl.embed_cells",
        "tl.impute",
        "tl.annotate",
        "models.SCGPT",
        "hub.fetch",
        "hub.load",
        "datasets.cellbench",
        "datasets.dorothea",
        "datasets.list_datasets",
        "settings",
    ):
        assert (generated / f"scfm_tools.{name}.html").is_file(), f"no API page for sft.{name}"

    page = (generated / "scfm_tools.datasets.cellbench.html").read_text(encoding="utf-8")
    assert "LuyiTian/sc_mixology" in page and "Nat Methods" in page

    for notebook in sorted((REPO / "tutorials").glob("*.ipynb")):
        page = generated / "tutorials" / f"{notebook.stem}.html"
        assert page.is_file(), notebook.name
        # each tutorial page shows its figures (the notebooks are saved with their outputs)
        assert "<img" in page.read_text(encoding="utf-8"), f"{page.name} shows no figure"

    # Import failures of our own modules are warnings, not errors, to Sphinx: catch them here.
    failed = [line for line in proc.stderr.splitlines() if "failed to import" in line]
    assert not failed, "\n".join(failed)
