"""Score a model's zero-shot embedding against PCA, as ``benchmarks/bench_default_embedding.py``.

The same cells (at most 2,000 random cells of each labelled shared dataset, cell types of at
least 10 cells), the same score (5-NN accuracy of the cell type, leave-one-out) and the same
PCA baseline (``benchmarks/_baselines.py``: 50 components of the log-normalised 2,000 most
variable genes), through that script's own functions.
"""

from __future__ import annotations

import sys
import time

import numpy as np
from _shared_data import DATA_DIR, REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from _baselines import pca_embedding
from bench_default_embedding import DATASETS, _knn5_accuracy, _load


def knn5_vs_pca(model: str, **options) -> dict[str, dict]:
    """5-NN accuracy of ``model``'s embedding and of PCA on each labelled dataset.

    ``model`` is passed to ``sft.tl.embed_cells`` (a registered name or a checkpoint path),
    with ``options``.
    """
    import scfm_tools as sft

    results = {}
    for name, (label_key, _) in DATASETS.items():
        adata = _load(DATA_DIR, name, label_key)
        labels = adata.obs[label_key].astype(str).to_numpy()
        cells = adata.copy()
        start = time.perf_counter()
        sft.tl.embed_cells(cells, model, key_added="X_emb", **options)
        seconds = time.perf_counter() - start
        results[name] = {
            "cells": int(adata.n_obs),
            "majority_fraction": float(np.unique(labels, return_counts=True)[1].max())
            / len(labels),
            "knn5_accuracy": _knn5_accuracy(cells.obsm["X_emb"], labels),
            "knn5_accuracy_pca": _knn5_accuracy(pca_embedding(adata), labels),
            "embed_seconds": round(seconds, 1),
        }
    return results


def summary(evaluation: dict[str, dict], untrained: dict[str, dict]) -> str:
    """Two sentences on the scores of a model and of its architecture before training."""
    parts = [
        f"{name.split('_')[0]} {res['knn5_accuracy']:.2f} (PCA {res['knn5_accuracy_pca']:.2f}, "
        f"majority class {res['majority_fraction']:.2f}; {res['cells']:,} cells)"
        for name, res in evaluation.items()
    ]
    before = [f"{name.split('_')[0]} {res['knn5_accuracy']:.2f}" for name, res in untrained.items()]
    return (
        "Cell-type 5-NN accuracy (leave-one-out) of the zero-shot embedding, with the protocol "
        f"of benchmarks/bench_default_embedding.py: {'; '.join(parts)}; the same model before "
        f"pretraining: {'; '.join(before)}. The evaluated cells were part of the (unlabelled) "
        "pretraining data."
    )
