"""Leave-one-dataset-out: the ``embed_cells`` default and zero-shot embeddings vs PCA and scVI.

For every labelled shared dataset D, and scanpy's packaged ``pbmc68k_reduced`` (counts
recovered as in the quickstart; no default model saw it), in one run:

* **the default**, ``sft.tl.embed_cells(D)``: the shipped ``cellplm-default`` fine-tuned on D's
  own cells (self-supervised, no labels), then embedding them;
* **CellPLM recipe without D**: ``scripts/train_default_cellplm.py --exclude D`` trains the
  shipped default's recipe on the other files (a fresh process; ``--trained-dir`` reuses
  models an earlier run of that script wrote), then ``sft.tl.embed_cells`` embeds D with it,
  zero-shot and with the default's fine-tuning on D (``fine_tune=True``): the default's path
  on data its model never saw;
* **shipped defaults zero-shot**, ``cellplm-default`` and ``scgpt-default``: both saw the
  shared files' cells in pretraining (without labels), so their rows are marked "seen";
* **PCA**: 50 components of the log-normalised counts of D's 2,000 most variable genes (scanpy
  defaults), the embedding a user makes without us;
* **scVI**: scvi-tools' ``SCVI`` (10 latent dimensions, D's batch as covariate) on D's counts.

Scores: 5-NN accuracy of the cell type (leave-one-out: each cell's 5 nearest other cells vote)
and the silhouette of the cell types (Euclidean), on the same cells.

    python benchmarks/bench_default_embedding.py [--scvi-epochs N] [--max-epochs N]
        [--trained-dir DIR]

Writes ``benchmarks/results/default_embedding.{json,md}``.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from _baselines import cellplm_without, pca_embedding, scvi_embedding
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
# scanpy's packaged PBMCs, which no default pretrained on: label key, no batch
SCANPY_PBMC = "pbmc68k_reduced (scanpy)"
MAX_CELLS = 2000
MIN_CELLS_PER_LABEL = 10


def _read(data_dir: Path, name: str):
    import anndata as ad

    if name != SCANPY_PBMC:
        return ad.read_h5ad(data_dir / name)
    import scanpy as sc

    from scfm_tools.quickstart import counts_from_log_normalised

    reduced = sc.datasets.pbmc68k_reduced()
    X = counts_from_log_normalised(reduced.raw.X)
    return ad.AnnData(X, obs=reduced.obs.copy(), var=reduced.raw.var.copy())


def _load(data_dir: Path, name: str, label_key: str):
    adata = _read(data_dir, name)
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
    parser.add_argument(
        "--trained-dir",
        type=Path,
        help="folder whose without_<file stem> subfolders hold models that "
        "scripts/train_default_cellplm.py --exclude <file> wrote; trained afresh where absent",
    )
    opts = parser.parse_args()
    import scfm_tools as sft

    set_threads(2)
    logging.getLogger("scfm_tools").setLevel(logging.WARNING)
    sft.settings.progress_bar = False
    data_dir = shared_path("SFT_DATA", "../shared/data")
    rows = []
    datasets = {**DATASETS, SCANPY_PBMC: ("bulk_labels", None)}
    with tempfile.TemporaryDirectory() as scratch:
        for name, (label_key, batch_key) in datasets.items():
            adata = _load(data_dir, name, label_key)
            labels = adata.obs[label_key].astype(str).to_numpy()
            options = {} if batch_key is None else {"batch_key": batch_key}
            seen = name in DATASETS  # the shipped defaults pretrained on the shared files
            tag = "seen" if seen else "never saw D"
            # CellPLM reads each sample (batch_key) as one sequence; scGPT takes no batch
            runs = [
                (f"default: cellplm-default fine-tuned on D ({tag})", None, options),
                (f"cellplm-default zero-shot ({tag})", "cellplm-default", options),
                (f"scgpt-default zero-shot ({tag})", "scgpt-default", {}),
            ]
            if seen:
                folder, trained = cellplm_without(
                    name, Path(scratch), opts.max_epochs, opts.trained_dir
                )
                log(f"{name}: CellPLM recipe without it, trained in {trained} s (None: reused)")
                runs[1:1] = [
                    (
                        "CellPLM recipe without D, fine-tuned on D",
                        str(folder),
                        {**options, "fine_tune": True},
                    ),
                    ("CellPLM recipe without D, zero-shot", str(folder), options),
                ]
            embeddings, seconds = {}, {}
            for method, model, kwargs in runs:
                cells = adata.copy()
                started = time.perf_counter()
                sft.tl.embed_cells(cells, model, key_added="X_emb", **kwargs)
                seconds[method] = time.perf_counter() - started
                embeddings[method] = cells.obsm["X_emb"]
            embeddings["PCA (50 PCs, 2,000 HVG)"] = pca_embedding(adata)
            embeddings["scVI (10 latent)"] = scvi_embedding(adata, batch_key, opts.scvi_epochs)
            for method, X in embeddings.items():
                rows.append({"dataset": name, "cells": int(adata.n_obs), "method": method,
                             **_scores(X, labels), "seconds": seconds.get(method)})  # fmt: skip
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
        ("seconds", "seconds (embed_cells)"),
    ]
    info = machine_info(2)
    markdown = "\n\n".join(
        [
            "# Leave-one-dataset-out: the embed_cells default vs PCA and scVI",
            f"Same run, 2 threads, load average {load_average()}, commit {info['git_commit']}. "
            f"At most {MAX_CELLS:,} random cells of D with cell types of at least "
            f"{MIN_CELLS_PER_LABEL} cells. The CellPLM recipe is trained without D "
            f"({opts.max_epochs} epochs); the shipped defaults saw the shared files' cells (no "
            f"labels), not {SCANPY_PBMC}'s. 5-NN accuracy: each cell's 5 nearest other cells "
            "vote (Euclidean); silhouette of the cell types (Euclidean).",
            markdown_table(rows, columns),
        ]
    )
    write_results(NAME, {"machine": info, "rows": rows}, markdown)


if __name__ == "__main__":
    main()
