"""Run the tutorials and save them with their outputs, so that the docs show their figures.

Usage (from the repository root, with the staged datasets)::

    SCFM_TOOLS_DATA=path/to/data python scripts/execute_tutorials.py [tutorials/NAME.ipynb ...]

Each notebook runs in a fresh kernel from a temporary folder. Only what a reader needs is kept:
results, printed text and figures; stderr (warnings, progress bars, which name files of this
machine) and run metadata are dropped. A notebook whose output still names a local folder is
refused, so no path of the machine that ran it is committed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600


def _clean(nb: nbformat.NotebookNode) -> None:
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.outputs = [
                o for o in cell.outputs if not (o.output_type == "stream" and o.name == "stderr")
            ]
    nb.metadata.pop("widgets", None)


def _local_paths(nb: nbformat.NotebookNode, folders: list[str]) -> list[str]:
    text = nbformat.writes(nb)
    return [f for f in folders if f in text]


def run(path: Path) -> None:
    """Execute ``path`` in place (outputs saved), or raise if it fails or leaks a local path."""
    nb = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory() as work:
        NotebookClient(
            nb, timeout=TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": work}}
        ).execute()
        _clean(nb)
        folders = [str(REPO), str(Path.home()), work, sys.prefix, os.environ["SCFM_TOOLS_DATA"]]
        leaked = _local_paths(nb, folders)
    if leaked:
        raise RuntimeError(f"{path.name}: outputs name local folders {leaked}; not saved.")
    nbformat.write(nb, path)
    print(f"{path.name}: saved with outputs ({path.stat().st_size / 1e3:.0f} kB)")


def main(argv: list[str] | None = None) -> None:
    """Execute the given notebooks (default: all of tutorials/) and save them."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("notebooks", nargs="*", type=Path)
    args = parser.parse_args(argv)
    if not os.environ.get("SCFM_TOOLS_DATA"):
        parser.error("set SCFM_TOOLS_DATA to the folder of the staged datasets first")
    # Figures inline (as PNG outputs), whatever backend the calling shell chose.
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    for path in args.notebooks or sorted((REPO / "tutorials").glob("*.ipynb")):
        run(path)


if __name__ == "__main__":
    main()
