"""The embeddings a user makes without the package, for the benchmarks to compare against."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from _common import REPO_ROOT

__all__ = [
    "cellplm_trained_without",
    "cellplm_without",
    "harmony_embedding",
    "is_counts",
    "pca_embedding",
    "scvi_embedding",
]


def is_counts(adata) -> bool:
    """Whether ``adata.X`` holds whole numbers (raw counts rather than normalised values)."""
    data = adata.X.data if hasattr(adata.X, "data") else np.asarray(adata.X)
    return bool(np.array_equal(data, np.round(data)))


def pca_embedding(adata) -> np.ndarray:
    """50 principal components of the log-normalised 2,000 most variable genes (scanpy's way).

    Counts are normalised to 10,000 per cell and ``log1p``-ed first; other values are taken as
    log-normalised already.
    """
    import scanpy as sc

    pca = adata.copy()
    if is_counts(pca):
        sc.pp.normalize_total(pca, target_sum=1e4)
        sc.pp.log1p(pca)
    n_top = min(2000, pca.n_vars)
    sc.pp.highly_variable_genes(pca, n_top_genes=n_top)
    sc.pp.pca(pca, n_comps=min(50, n_top - 1), mask_var="highly_variable", random_state=0)
    return pca.obsm["X_pca"]


def harmony_embedding(pca: np.ndarray, batches) -> np.ndarray:
    """Harmony (harmonypy from PyPI, its default settings) on a PCA, one batch per cell."""
    import harmonypy
    import pandas as pd

    meta = pd.DataFrame({"batch": np.asarray(batches).astype(str)})
    result = harmonypy.run_harmony(np.asarray(pca), meta, ["batch"], verbose=False, random_state=0)
    corrected = np.asarray(result.Z_corr)
    # harmonypy returns components x cells
    return corrected.T if corrected.shape[0] != len(meta) else corrected


def scvi_embedding(adata, batch_key: str | None, epochs: int | None) -> np.ndarray | None:
    """scVI's 10-dimensional latent space; ``None`` when the data are not counts.

    The batch is a covariate only where ``batch_key`` names more than one batch; ``epochs``
    ``None`` trains as long as scvi-tools' own heuristic says.
    """
    if not is_counts(adata):
        return None
    import scvi

    scvi.settings.seed = 0
    data = adata.copy()
    batches = batch_key is not None and data.obs[batch_key].nunique() > 1
    scvi.model.SCVI.setup_anndata(data, batch_key=batch_key if batches else None)
    model = scvi.model.SCVI(data, n_latent=10)
    model.train(max_epochs=epochs, accelerator="cpu", enable_progress_bar=False)
    return model.get_latent_representation()


def cellplm_without(
    name: str, scratch: Path, max_epochs: int, trained_dir: Path | None
) -> tuple[Path, float | None]:
    """Return the folder of a CellPLM pretrained with the default's recipe without ``name``.

    Reused from ``trained_dir/without_<file stem>`` where an earlier run of
    ``scripts/train_default_cellplm.py --exclude name`` wrote it (seconds ``None``), else
    trained into ``scratch`` (:func:`cellplm_trained_without`, seconds returned).
    """
    folder = f"without_{Path(name).stem}"
    if trained_dir is not None and (trained_dir / folder / "card.json").is_file():
        return trained_dir / folder, None
    return scratch / folder, cellplm_trained_without(name, scratch / folder, max_epochs)


def cellplm_trained_without(name: str, out: Path, max_epochs: int) -> float:
    """Train the shipped CellPLM default's recipe on every shared file but ``name``.

    Runs ``scripts/train_default_cellplm.py --exclude name`` in a fresh process, writing the
    model into the folder ``out``; returns the seconds it took. A model that never saw a
    dataset shows how a default generalises to it.
    """
    started = time.perf_counter()
    script = REPO_ROOT / "scripts" / "train_default_cellplm.py"
    command = [sys.executable, str(script), "--exclude", name, "--out", str(out)]
    subprocess.run(
        [*command, "--max-epochs", str(max_epochs)],
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - started
