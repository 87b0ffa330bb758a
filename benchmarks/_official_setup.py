"""Snapshots of the official repositories and one virtual environment per repository.

Used by ``bench_vs_official.py``. Everything lands in a scratch folder outside the repository:

- ``<scratch>/src/<family>-<commit[:12]>/``: the official repository at its pinned commit,
  extracted with ``git archive`` from a bare clone (``<scratch>/git/<name>.git``, cloned from
  GitHub on first use, or an existing clone passed with ``--git-dir FAMILY=PATH``);
- ``<scratch>/venvs/<family>/``: a venv with CPU ``torch==2.13.0`` installed first (so that
  nothing pulls a CUDA build) and then the few packages the official entry point imports
  (:data:`OFFICIAL`). The official code itself is not installed: the worker puts the snapshot on
  ``sys.path``. A venv is reused while its ``.sft-ready`` marker lists the same packages.

Nothing of the official code enters this repository.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

__all__ = [
    "OFFICIAL",
    "TORCH",
    "default_scratch",
    "ensure_snapshot",
    "ensure_venv",
    "venv_versions",
]

TORCH = "torch==2.13.0"
# Per family: the official repository, its pinned commit (the one ../shared/reference/README.md
# read), the paths of it that the entry point needs (the repositories also hold large data and
# notebooks), and what the entry point imports beyond torch. Training-only dependencies of the
# packages (scvi-tools, scib, cell-gears, wandb, flash-attn, RAPIDS, apex) are left out: the
# embedding entry points never import them.
OFFICIAL: dict[str, dict[str, Any]] = {
    "cellplm": {
        "repo": "OmicsML/CellPLM",
        "commit": "b59ee7688b1bd2a745856a610248b46f15019a22",
        "paths": ["CellPLM", "LICENSE"],
        "pip": ["scanpy", "einops", "torchmetrics", "mygene", "hdf5plugin"],
    },
    "scgpt": {
        "repo": "bowang-lab/scGPT",
        "commit": "cebd6fae655b9c585a4807daa3ac31bb764f06b4",
        "paths": ["scgpt", "LICENSE"],
        "pip": [
            "scanpy",
            "seaborn",
            "datasets<3",
            "pyarrow",
            "typing-extensions",
            "einops",
            "ipython",
        ],
    },
    "scfoundation": {
        "repo": "biomap-research/scFoundation",
        "commit": "d09626a5c1bc30b9c6227378677b61e0b987fe8b",
        "paths": ["model", "LICENSE", "MODEL_LICENSE"],
        "pip": ["scanpy", "einops", "local-attention"],
    },
    "scbert": {
        "repo": "TencentAILabHealthcare/scBERT",
        "commit": "262fd4b91f3f1c21a6e595d03d4ef423e16ffc99",
        "paths": ["performer_pytorch", "preprocess.py", "predict.py", "utils.py", "LICENSE"],
        "pip": ["scanpy", "einops", "local-attention", "requests", "scikit-learn"],
    },
}


def default_scratch() -> Path:
    """``<system temp dir>/sft_vs_official``: outside the repository, reused between runs."""
    return Path(tempfile.gettempdir()) / "sft_vs_official"


def _run(cmd: list[str], **kwargs: Any) -> None:
    subprocess.run(cmd, check=True, **kwargs)


def ensure_snapshot(family: str, scratch: Path, git_dir: Path | None = None) -> Path:
    """The paths of ``family``'s official repository that its entry point needs, at the pinned
    commit, extracted under ``scratch``."""
    spec = OFFICIAL[family]
    dest = scratch / "src" / f"{family}-{spec['commit'][:12]}"
    if (dest / ".sft-complete").is_file():
        return dest
    if git_dir is None:
        git_dir = scratch / "git" / (spec["repo"].split("/")[1] + ".git")
        if not git_dir.is_dir():
            git_dir.parent.mkdir(parents=True, exist_ok=True)
            _run(["git", "clone", "--bare", f"https://github.com/{spec['repo']}.git", str(git_dir)])
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest.parent / f"{dest.name}.tar"
    _run(
        [
            "git",
            "--git-dir",
            str(git_dir),
            "archive",
            "-o",
            str(archive),
            spec["commit"],
            *spec["paths"],
        ]
    )
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    archive.unlink()
    (dest / ".sft-complete").write_text(spec["commit"] + "\n", encoding="utf-8")
    return dest


def ensure_venv(family: str, scratch: Path) -> Path:
    """The Python of ``family``'s venv, created and filled on first use."""
    venv = scratch / "venvs" / family
    python = venv / "bin" / "python"
    packages = [TORCH, *OFFICIAL[family]["pip"]]
    marker = venv / ".sft-ready"
    if python.is_file() and marker.is_file() and json.loads(marker.read_text()) == packages:
        return python
    if not python.is_file():
        _run([sys.executable, "-m", "venv", str(venv)])
    # torch first, alone: the other packages then find it satisfied instead of pulling CUDA.
    _run([str(python), "-m", "pip", "install", "-q", TORCH])
    _run([str(python), "-m", "pip", "install", "-q", *OFFICIAL[family]["pip"]])
    marker.write_text(json.dumps(packages), encoding="utf-8")
    return python


def venv_versions(python: Path) -> dict[str, str | None]:
    """Versions of the packages that matter for speed in a venv (for the results file)."""
    code = (
        "import importlib.metadata as m, json\n"
        "out = {}\n"
        "for p in ('torch', 'numpy', 'scipy', 'scanpy', 'anndata', 'pandas'):\n"
        "    try: out[p] = m.version(p)\n"
        "    except m.PackageNotFoundError: out[p] = None\n"
        "print(json.dumps(out))\n"
    )
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)
