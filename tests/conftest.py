"""Shared test fixtures: where the real data, official fixtures and references are.

Tests read real data from ``../shared`` beside the repository (override with ``SFT_DATA``,
``SFT_FIXTURES``, ``SFT_REFERENCE``). Where it is absent, those tests skip with the reason;
with ``SFT_REQUIRE_SHARED=1`` (as in ``.ci/run``) its absence fails them instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _split_threads() -> None:
    """Give each pytest-xdist worker its share of the cores, before torch starts its pools.

    Two workers that each run torch on every core make OpenMP threads wait on each other: on
    2 cores the scBERT training tests took 25 s with one thread per worker and 130-650 s with
    two. Subprocesses (the DDP tests) inherit the limit through the environment.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers < 2:
        return
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(name, threads)
    # numpy's BLAS is loaded before this file runs, so its pool is resized directly.
    import threadpoolctl
    import torch

    threadpoolctl.threadpool_limits(int(os.environ["OPENBLAS_NUM_THREADS"]))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


_split_threads()

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA_DIR = Path(os.environ.get("SFT_DATA", SHARED / "data"))
FIXTURES_DIR = Path(os.environ.get("SFT_FIXTURES", SHARED / "fixtures"))
REFERENCE_DIR = Path(os.environ.get("SFT_REFERENCE", SHARED / "reference"))


def require_path(path: Path, what: str) -> Path:
    """Return ``path``, or skip (fail under SFT_REQUIRE_SHARED=1) when it does not exist."""
    if path.exists():
        return path
    msg = (
        f"{what} not found at {path}: these tests need the shared data folder beside the "
        "repository (set SFT_DATA / SFT_FIXTURES / SFT_REFERENCE to point elsewhere)."
    )
    if os.environ.get("SFT_REQUIRE_SHARED") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return require_path(DATA_DIR, "shared real datasets")


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return require_path(FIXTURES_DIR, "official-implementation fixtures")


@pytest.fixture(scope="session")
def scfoundation_ckpt(fixtures_dir) -> Path:
    """The scFoundation fixture's ``models.ckpt``-layout checkpoint (exactly one ``*.ckpt``)."""
    found = sorted((fixtures_dir / "scfoundation").glob("*.ckpt"))
    assert len(found) == 1, found
    return found[0]


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return require_path(REFERENCE_DIR, "official reference files")


@pytest.fixture
def read_shared(data_dir):
    """Read a real dataset from the shared data folder (a fresh object each call)."""
    import anndata as ad

    def _read(name: str, **kwargs):
        return ad.read_h5ad(require_path(data_dir / name, f"dataset {name}"), **kwargs)

    return _read


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never let a test write into the user's real cache folder."""
    monkeypatch.setenv("SCFM_TOOLS_CACHE", str(tmp_path_factory.getbasetemp() / "sft_cache"))
