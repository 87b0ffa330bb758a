"""Pretrain the small scBERT that ships inside the package as ``scbert-default``.

Usage (from the repository root; the data folder defaults to ``../shared/data`` beside the
repository, or ``$SFT_DATA``)::

    python scripts/train_default_scbert.py           # train, export, evaluate, write card.json
    python scripts/train_default_scbert.py --exclude pbmc8k_200genes_labeled.h5ad --out DIR

Pretraining is the published scBERT objective (masked expression bins: 15% of each cell's
non-zero bins picked, 90% of those masked, cross-entropy of the original bins) on real cells of
the shared files the CellPLM default trains on; cell-type labels are dropped.

Two things differ from the published model, both for lack of what it was built from:

* **genes**: the published 16,906-gene list (``panglao_10000.h5ad``) is not available offline.
  The model reads the training cells' most variable genes (scanpy's highly variable genes,
  ranked across the files); scBERT reads every gene of its list in every cell, so the list's
  length sets the cost of each cell.
* **gene table**: the published gene2vec vectors are not available either. scBERT adds a frozen
  vector per gene to each token (without one, a cell's genes could not be told apart); here it
  is a gene2vec-like table made from the same cells: the leading eigenvectors of the genes'
  correlation matrix (log-normalised counts, standardised within each file), scaled by the
  square roots of their eigenvalues.

Each epoch reads a fresh random share of the cells (``batches_per_epoch`` minibatches), which
keeps the run within a few CPU minutes. The weights are written as ``scbert.safetensors`` with
``gene_list.txt`` into ``src/scfm_tools/data/models/scbert-default/``, with a ``card.json``
(:meth:`ModelCard.to_dict <scfm_tools.hub.ModelCard.to_dict>`) that records the run and the
5-NN accuracy of the embedding against PCA (``_knn_eval``).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
from _card import card_files
from _default_run import run_default_training, run_record
from _knn_eval import summary
from _shared_data import REPO, unlabelled_union

OUT_DIR = REPO / "src" / "scfm_tools" / "data" / "models" / "scbert-default"
NAME = "scbert-default"
PREFIX = "scbert"

# The published architecture (dim 200, 6 blocks, 10 heads of 64) scaled down to CPU minutes.
CONFIG = {"n_genes": 2048, "dim": 32, "depth": 2, "heads": 2, "dim_head": 16}
TRAINING = {
    "max_epochs": 8,
    "batches_per_epoch": 25,
    "batch_size": 16,
    "lr": 1e-3,
    "random_state": 0,
}

logger = logging.getLogger("train_default_scbert")


def _lognorm(adata):
    import scanpy as sc

    out = adata.copy()
    sc.pp.normalize_total(out, target_sum=1e4)
    sc.pp.log1p(out)
    return out


def gene_list(lognorm, n_genes: int) -> list[str]:
    """Return the ``n_genes`` most variable genes, ranked by the number of files they vary in."""
    import scanpy as sc

    hvg = sc.pp.highly_variable_genes(
        lognorm, n_top_genes=n_genes, batch_key="dataset", inplace=False
    )
    return [str(g) for g in lognorm.var_names[hvg["highly_variable"].to_numpy()]]


def gene_table(lognorm, genes: list[str], dim: int) -> np.ndarray:
    """Build a gene2vec-like table ``(len(genes), dim)`` from the genes' co-expression.

    The genes' values are standardised within each file (so that differences between files
    are not read as co-expression); the table's rows are the genes' coordinates on the leading
    eigenvectors of their correlation matrix, scaled by the square roots of the eigenvalues,
    then the whole table by one factor to unit standard deviation (the scale of the token
    embedding it is added to). Each eigenvector's sign is fixed (largest entry positive).
    """
    X = np.asarray(lognorm[:, genes].X.todense(), dtype=np.float64)
    for dataset in lognorm.obs["dataset"].unique():
        rows = (lognorm.obs["dataset"] == dataset).to_numpy()
        block = X[rows] - X[rows].mean(axis=0)
        std = block.std(axis=0)
        X[rows] = np.divide(block, std, out=np.zeros_like(block), where=std > 0)
    values, vectors = np.linalg.eigh(X.T @ X / X.shape[0])
    top = np.argsort(values)[::-1][:dim]
    table = vectors[:, top] * np.sqrt(np.clip(values[top], 0, None))
    signs = np.sign(table[np.abs(table).argmax(axis=0), np.arange(dim)])
    table *= np.where(signs == 0, 1.0, signs)
    return table / table.std()


def train(files: tuple[str, ...], out: Path, initial: Path) -> dict:
    """Pretrain and export into ``out`` (the untrained model into ``initial``); return the run."""
    import scvi

    from scfm_tools.models import SCBERT

    scvi.settings.seed = TRAINING["random_state"]
    adata = unlabelled_union(files)
    lognorm = _lognorm(adata)
    genes = gene_list(lognorm, CONFIG["n_genes"])
    table = gene_table(lognorm, genes, CONFIG["dim"])
    del lognorm
    logger.info("training data: %d cells x %d genes; model genes %d", *adata.shape, len(genes))
    n_union = adata.n_vars
    adata = adata[:, genes].copy()
    SCBERT.setup_anndata(adata)
    model = SCBERT(
        adata,
        genes=genes,
        gene2vec=table,
        **{k: v for k, v in CONFIG.items() if k != "n_genes"},
    )
    model.export_checkpoint(initial, name=PREFIX, weights="safetensors")
    start, cpu_start = time.perf_counter(), time.process_time()
    model.train(
        max_epochs=TRAINING["max_epochs"],
        accelerator="cpu",
        devices=1,
        batch_size=TRAINING["batch_size"],
        train_size=1.0,
        limit_train_batches=TRAINING["batches_per_epoch"],
        plan_kwargs={"lr": TRAINING["lr"], "random_state": TRAINING["random_state"]},
    )
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    history = {k: [float(v) for v in model.history[k].values.ravel()] for k in model.history}
    model.export_checkpoint(out, name=PREFIX, overwrite=True, weights="safetensors")
    logger.info("trained in %.0f s; train_loss %s", seconds, history["train_loss"])
    return {
        "cells": int(adata.n_obs),
        "genes": int(n_union),
        "model_genes": len(genes),
        **run_record(TRAINING, seconds, cpu_seconds, history),
    }


def write_card(
    out: Path, files: tuple[str, ...], run: dict, evaluation: dict, untrained: dict
) -> None:
    """Write card.json with the sha256 and size of every file."""
    from scfm_tools.hub import ModelCard
    from scfm_tools.hub._official import _CITE_SCBERT
    from scfm_tools.models.scbert import GENE_LIST_FILE

    described = {
        f"{PREFIX}.safetensors": (
            "weights",
            "state dict (official PerformerLM layer names, gene table as pos_emb.emb.weight), "
            "safetensors",
        ),
        GENE_LIST_FILE: ("gene_list", "the model's gene symbols, one per line, in model order"),
    }
    card = ModelCard(
        name=NAME,
        family="scbert",
        description=(
            f"Small scBERT (dim {CONFIG['dim']}, {CONFIG['depth']} Performer blocks, "
            f"{CONFIG['heads']} heads) pretrained by scfm_tools on real human cells "
            f"({', '.join(files)}: {run['cells']:,} cells; cell-type labels not used) with "
            f"the published masked-bin objective: {TRAINING['max_epochs']} epochs of "
            f"{TRAINING['batches_per_epoch']} minibatches of {TRAINING['batch_size']} random "
            f"cells ({run['cells_read']:,} cells read), {run['seconds']} s "
            f"({run['cpu_seconds']} s CPU) on {run['torch_threads']} CPU thread(s). Reads "
            f"{run['model_genes']:,} genes (the training cells' most variable; the published "
            "16,906-gene list is not available offline), with a frozen gene2vec-like table "
            "made from the training cells' gene co-expression in place of the published "
            "gene2vec. A small model that runs offline: an official scBERT checkpoint is the "
            "choice for real analyses. "
            f"{summary(evaluation, untrained)}"
        ),
        files=card_files(out, described),
        config={
            "architecture": CONFIG,
            "training": TRAINING,
            "training_files": list(files),
            "gene_table": (
                "leading eigenvectors of the model genes' correlation over the training cells "
                "(log1p counts per 10,000, standardised within each file), times the square "
                "roots of their eigenvalues, scaled to unit standard deviation"
            ),
            **run,
            "evaluation": evaluation,
            "evaluation_untrained": untrained,
        },
        license=(
            "BSD-3-Clause (weights trained by scfm_tools; scBERT architecture: see its "
            "repository's license)"
        ),
        citation=_CITE_SCBERT,
        homepage="https://github.com/TencentAILabHealthcare/scBERT",
        embedded=True,
    )
    (out / "card.json").write_text(json.dumps(card.to_dict(), indent=1) + "\n")


if __name__ == "__main__":
    run_default_training(__doc__, OUT_DIR, TRAINING, train, write_card)
