"""Leave-one-dataset-out: the default models' zero-shot embeddings against PCA and scVI.

For every labelled shared dataset D, in one run:

* **CellPLM recipe without D**: ``scripts/train_default_cellplm.py --exclude D`` trains the
  shipped default's recipe on the other files (a fresh process), then
  ``sft.tl.embed_cells`` embeds D with it: generalisation to data the model never saw;
* **shipped defaults** ``cellplm-default`` and ``scgpt-default``: both saw D's cells in
  pretraining (without labels), so their rows are marked "seen";
* **PCA**: 50 components of the log-normalised counts of D's 2,000 most variable genes (scanpy
  defaults), the embedding a user makes without us;
* **scVI**: scvi-tools' ``SCVI`` (10 latent dimensions, D's batch as covariate) on D's counts.

Scores: 5-NN accuracy of the cell type (leave-one-out: each cell's 5 nearest other cells vote)
and the silhouette of the cell types (Euclidean), on the same cells.

    python benchmarks/bench_default_embedding.py [--scvi-epochs N] [--max-epochs N]

Writes ``benchmarks/results/default_embedding.{json,md}``.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import numpy as np

from _baselines import cellplm_trained_without, pca_embedding, scvi_embedding
from _common import (
    load_average,
    log,
    machine_info,
    markdown_table,
    set_threads,
    shared_path,
    write_results,
)

NAME = "default_embedding"
# labelled datasets: file -> (label key, batch key)
DATASETS = {
    "cellbench_3celllines_celseq2_dropseq.h5ad": ("cell_type", "batch"),
    "pbmc8k_200genes_labeled.h5ad": ("cell_type", "batch"),
}
MAX_CELLS = 2000
MIN_CELLS_PER_LABEL = 10


def _load(data_dir: Path, name: str, label_key: str):
    import anndata as ad

    adata = ad.read_h5ad(data_dir / name)
    labels = adata.obs[label_key].astype(str)
    counts = labels.value_counts()
    keep = labels.isin(counts.index[counts >= MIN_CELLS_PER_LABEL]) & (labels != "NA")
    adata = adata[keep.to_numpy()]
    if adata.n_obs > MAX_CELLS:
        rows = np.sort(np.random.default_rng(0).choice(adata.n_obs, MAX_CELLS, replace=False))
        adata = adata[rows]
    return adata.copy()


def _knn5_accuracy(X: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.neighbors import NearestNeighbors

    neighbours = NearestNeighbors(n_neighbors=6).fit(X).kneighbors(X, return_distance=False)
    codes = np.unique(labels, return_inverse=True)[1]
    votes = codes[neighbours[:, 1:]]  # the cell itself (first) does not vote
    counts = np.apply_along_axis(np.bincount, 1, votes, minlength=codes.max() + 1)
    return float(np.mean(counts.argmax(axis=1) == codes))


def _scores(X: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import silhouette_score

    X = np.asarray(X, dtype=np.float64)
    return {
        "knn5_accuracy": _knn5_accuracy(X, labels),
        "silhouette": float(silhouette_score(X, labels)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scvi-epochs", type=int, default=200)
    parser.add_argument("--max-epochs", type=int, default=10, help="CellPLM recipe epochs")
    opts = parser.parse_args()
    import scfm_tools as sft

    set_threads(2)
    logging.getLogger("scfm_tools").setLevel(logging.WARNING)
    sft.settings.progress_bar = False
    data_dir = shared_path("SFT_DATA", "../shared/data")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, (label_key, batch_key) in DATASETS.items():
            adata = _load(data_dir, name, label_key)
            labels = adata.obs[label_key].astype(str).to_numpy()
            folder = Path(scratch) / f"without_{Path(name).stem}"
            train_seconds = cellplm_trained_without(name, folder, opts.max_epochs)
            log(f"{name}: CellPLM recipe trained without it in {train_seconds:.0f} s")
            embeddings = {}
            for method, model, options in (
                ("CellPLM recipe, trained without D", str(folder), {"batch_key": batch_key}),
                ("cellplm-default (seen)", "cellplm-default", {"batch_key": batch_key}),
                ("scgpt-default (seen)", "scgpt-default", {}),
            ):
                cells = adata.copy()
                sft.tl.embed_cells(cells, model, key_added="X_emb", **options)
                embeddings[method] = cells.obsm["X_emb"]
            embeddings["PCA (50 PCs, 2,000 HVG)"] = pca_embedding(adata)
            embeddings["scVI (10 latent)"] = scvi_embedding(adata, batch_key, opts.scvi_epochs)
            for method, X in embeddings.items():
                rows.append({"dataset": name, "cells": int(adata.n_obs), "method": method,
                             **_scores(X, labels)})  # fmt: skip
                log(f"{name} {method}: {rows[-1]}")
    for row in rows:
        pca = next(
            r for r in rows if r["dataset"] == row["dataset"] and r["method"].startswith("PCA")
        )
        row["knn5_vs_pca"] = row["knn5_accuracy"] - pca["knn5_accuracy"]
        row["silhouette_vs_pca"] = row["silhouette"] - pca["silhouette"]
    columns = [
        ("dataset", "dataset D"),
        ("cells", "cells"),
        ("method", "embedding"),
        ("knn5_accuracy", "5-NN accuracy"),
        ("silhouette", "silhouette"),
        ("knn5_vs_pca", "5-NN minus PCA"),
        ("silhouette_vs_pca", "silhouette minus PCA"),
    ]
    info = machine_info(2)
    markdown = "\n\n".join(
        [
            "# Leave-one-dataset-out: default embeddings vs PCA and scVI",
            f"Same run, 2 threads, load average {load_average()}, commit {info['git_commit']}. "
            f"At most {MAX_CELLS:,} random cells of D with cell types of at least "
            f"{MIN_CELLS_PER_LABEL} cells. The CellPLM recipe is trained without D "
            f"({opts.max_epochs} epochs); the shipped defaults saw D's cells (no labels).",
            markdown_table(rows, columns),
        ]
    )
    write_results(NAME, {"machine": info, "rows": rows}, markdown)


if __name__ == "__main__":
    main()
