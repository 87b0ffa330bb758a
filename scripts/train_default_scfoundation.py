"""Pretrain the small scFoundation that ships inside the package as ``scfoundation-default``.

Usage (from the repository root; the data folder defaults to ``../shared/data`` beside the
repository, or ``$SFT_DATA``)::

    python scripts/train_default_scfoundation.py     # train, export, evaluate, write card.json
    python scripts/train_default_scfoundation.py --exclude pbmc8k_200genes_labeled.h5ad --out DIR

Pretraining is the published read-depth-aware (RDA) objective as
:class:`~scfm_tools.models.SCFoundation` implements it: each cell's input is a downsampled copy
(``sft.pp.downsample_rda``: half the cells of at least 1,000 counts thinned at a Beta(2, 2)
rate) with its source depth ``S`` and target depth ``T`` as two tokens; 30% of the non-zero and
3% of the zero values are selected (80% of those masked, 10% randomised, 10% kept) and the
original cell's values predicted there (mean squared error). The cells are those of the shared
files the CellPLM default trains on, cell-type labels dropped; the genes are the published
19,264-gene index (``OS_scRNA_gene_index.19264.tsv``), so every published gene has a row.

The decoder reads all 19,266 positions of every cell, which costs about a second per cell on
one CPU thread at this size: each epoch reads a fresh random share of the cells
(``batches_per_epoch`` minibatches), which keeps the run within a few CPU minutes. The weights
are written in the package's own layout (``models.safetensors`` and ``config.json``) into
``src/scfm_tools/data/models/scfoundation-default/``, with a ``card.json``
(:meth:`ModelCard.to_dict <scfm_tools.hub.ModelCard.to_dict>`) that records the run and the
5-NN accuracy of the embedding against PCA (``_knn_eval``), for the trained model and for the
same architecture before training.
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

OUT_DIR = REPO / "src" / "scfm_tools" / "data" / "models" / "scfoundation-default"
NAME = "scfoundation-default"

# The published architecture (encoder 768 x 12, Performer decoder 512 x 6) scaled down to CPU
# minutes. Encoder dropout 0: with dropout, CPU attention falls back to the unfused kernel
# (several times slower); the masking regularises enough at this size.
CONFIG = {
    "enc_dim": 64,
    "enc_depth": 2,
    "enc_heads": 4,
    "dec_dim": 32,
    "dec_depth": 2,
    "dec_heads": 4,
    "dec_dim_head": 8,
    "dropout": 0.0,
}
TRAINING = {
    "max_epochs": 6,
    "batches_per_epoch": 8,
    "batch_size": 8,
    "lr": 1e-3,
    "random_state": 0,
}

logger = logging.getLogger("train_default_scfoundation")


def train(files: tuple[str, ...], out: Path, initial: Path) -> dict:
    """Pretrain and export into ``out`` (the untrained model into ``initial``); return the run."""
    import scvi

    import scfm_tools as sft
    from scfm_tools.models import SCFoundation
    from scfm_tools.models.scfoundation import read_gene_index

    scvi.settings.seed = TRAINING["random_state"]
    genes = read_gene_index()
    adata = unlabelled_union(files)
    n_union = adata.n_vars
    adata = adata[:, adata.var_names.isin(genes)].copy()
    adata = adata[np.asarray(adata.X.sum(axis=1)).ravel() > 0].copy()
    logger.info("training data: %d cells x %d of the model's genes", *adata.shape)
    sft.pp.downsample_rda(adata, random_state=TRAINING["random_state"])
    SCFoundation.setup_anndata(adata, rda_layer="rda_counts")
    model = SCFoundation(adata, gene_list=genes, **CONFIG)
    model.export(initial, weights="safetensors")
    start, cpu_start = time.perf_counter(), time.process_time()
    model.train(
        max_epochs=TRAINING["max_epochs"],
        accelerator="cpu",
        devices=1,
        train_size=1.0,
        batch_size=TRAINING["batch_size"],
        random_state=TRAINING["random_state"],
        limit_train_batches=TRAINING["batches_per_epoch"],
        plan_kwargs={"lr": TRAINING["lr"]},
    )
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    history = {k: [float(v) for v in model.history[k].values.ravel()] for k in model.history}
    model.export(out, weights="safetensors", overwrite=True)
    logger.info("trained in %.0f s; train_loss %s", seconds, history["train_loss"])
    return {
        "cells": int(adata.n_obs),
        "genes": int(n_union),
        "genes_in_model": int(adata.n_vars),
        **run_record(TRAINING, seconds, cpu_seconds, history),
    }


def write_card(
    out: Path, files: tuple[str, ...], run: dict, evaluation: dict, untrained: dict
) -> None:
    """Write card.json with the sha256 and size of every file."""
    from scfm_tools.hub import ModelCard
    from scfm_tools.hub._official import _CITE_SCFOUNDATION
    from scfm_tools.models.scfoundation import CONFIG_FILE, SAFETENSORS_FILE

    described = {
        SAFETENSORS_FILE: ("weights", "state dict (official MaeAutobin layer names), safetensors"),
        CONFIG_FILE: ("config", "the module's architecture (SCFoundationModule arguments)"),
    }
    card = ModelCard(
        name=NAME,
        family="scfoundation",
        description=(
            f"Small scFoundation (encoder {CONFIG['enc_dim']} x {CONFIG['enc_depth']} layers, "
            f"Performer decoder {CONFIG['dec_dim']} x {CONFIG['dec_depth']} blocks) on the "
            "published 19,264-gene index, pretrained by scfm_tools on real human cells "
            f"({', '.join(files)}: {run['cells']:,} cells; cell-type labels not used) with the "
            f"published read-depth-aware masked-regression objective: "
            f"{TRAINING['max_epochs']} epochs of {TRAINING['batches_per_epoch']} minibatches "
            f"of {TRAINING['batch_size']} random cells ({run['cells_read']:,} cells read, a "
            f"small share of the data), {run['seconds']} s ({run['cpu_seconds']} s CPU) on "
            f"{run['torch_threads']} CPU thread(s). A small model that runs offline: an "
            "official scFoundation checkpoint is the choice for real analyses. "
            f"{summary(evaluation, untrained)}"
        ),
        files=card_files(out, described),
        config={
            "architecture": CONFIG,
            "training": TRAINING,
            "training_files": list(files),
            **run,
            "evaluation": evaluation,
            "evaluation_untrained": untrained,
        },
        license=(
            "BSD-3-Clause (weights trained by scfm_tools; scFoundation code: Apache-2.0, gene "
            "index from its repository)"
        ),
        citation=_CITE_SCFOUNDATION,
        homepage="https://github.com/biomap-research/scFoundation",
        embedded=True,
    )
    (out / "card.json").write_text(json.dumps(card.to_dict(), indent=1) + "\n")


if __name__ == "__main__":
    run_default_training(__doc__, OUT_DIR, TRAINING, train, write_card)
