"""Pretrain the small CellPLM that ships inside the package as ``cellplm-default``.

Usage (from the repository root; the data folder defaults to ``../shared/data`` beside the
repository, or ``$SFT_DATA``)::

    python scripts/train_default_cellplm.py          # train, export, write card.json
    python scripts/train_default_cellplm.py --exclude pbmc8k_200genes_labeled.h5ad --out DIR

Pretraining is unsupervised (the published CellPLM objective: cells dropped and masked at
random, their counts reconstructed by the negative-binomial decoder, plus the mixture-VAE
terms) on real cells of every shared file with full or broad gene panels; cell-type labels
are dropped. Each file is one sample (its cells attend to each other, as one tissue section or
sample in the official pretraining) and the decoder's batch covariate. The model's genes are
the union of the files' genes.

The weights are written as ``cellplm.safetensors`` with ``cellplm.config.json`` (the official
config keys and the gene list) into ``src/scfm_tools/data/models/cellplm-default/``, with a
``card.json`` (:meth:`ModelCard.to_dict <scfm_tools.hub.ModelCard.to_dict>`). How the model
scores against PCA and scVI on datasets it was not trained on is measured by
``benchmarks/bench_default_embedding.py``, which calls this script with ``--exclude``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from _shared_data import PRETRAINING_FILES, REPO, unlabelled_union

OUT_DIR = REPO / "src" / "scfm_tools" / "data" / "models" / "cellplm-default"
NAME = "cellplm-default"
PREFIX = "cellplm"

TRAIN_FILES = PRETRAINING_FILES
# The architecture (CellPLM's published one scaled down to fit a CPU budget and ~15 MB).
CONFIG = {"enc_hid": 128, "enc_layers": 2, "post_latent_dim": 32, "dec_hid": 128}
TRAINING = {"max_epochs": 10, "max_cells": 1000, "lr": 1e-3, "random_state": 0}

logger = logging.getLogger("train_default_cellplm")


def train(files: tuple[str, ...], out: Path) -> dict:
    """Pretrain, write the weights and config into ``out``; return what the card records."""
    import scvi

    from scfm_tools.models import CellPLM

    scvi.settings.seed = TRAINING["random_state"]
    adata = unlabelled_union(files)
    logger.info("training data: %d cells x %d genes", adata.n_obs, adata.n_vars)
    CellPLM.setup_anndata(adata, batch_key="dataset")
    model = CellPLM(adata, **CONFIG)
    start = time.perf_counter()
    model.train(
        max_epochs=TRAINING["max_epochs"],
        accelerator="cpu",
        devices=1,
        max_cells=TRAINING["max_cells"],
        random_state=TRAINING["random_state"],
        plan_kwargs={"lr": TRAINING["lr"]},
    )
    seconds = time.perf_counter() - start
    history = {k: [float(v) for v in model.history[k].values.ravel()] for k in model.history}
    out.mkdir(parents=True, exist_ok=True)
    # The official config beside safetensors weights (no pickle in the package).
    model.export(out / PREFIX, overwrite=True, weights="safetensors")
    logger.info("trained in %.0f s; train_loss %s", seconds, history["train_loss"][-3:])
    return {
        "cells": int(adata.n_obs),
        "genes": int(adata.n_vars),
        "seconds": round(seconds),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "scvi_tools": scvi.__version__,
        "final_train_loss": history["train_loss"][-1],
    }


def write_card(out: Path, files: tuple[str, ...], run: dict) -> None:
    """Write card.json with the sha256 and size of every file."""
    from scfm_tools.hub import CardFile, ModelCard, file_sha256
    from scfm_tools.hub._official import _CITE_CELLPLM

    described = {
        f"{PREFIX}.safetensors": ("weights", "state dict (CellPLM layer names), safetensors"),
        f"{PREFIX}.config.json": ("config", "official CellPLM config keys and the gene list"),
    }
    card_files = tuple(
        CardFile(
            name,
            sha256=file_sha256(out / name),
            size=(out / name).stat().st_size,
            description=text,
            role=role,
        )
        for name, (role, text) in described.items()
    )
    card = ModelCard(
        name=NAME,
        family="cellplm",
        description=(
            f"Small CellPLM (encoder width {CONFIG['enc_hid']}, {CONFIG['enc_layers']} "
            f"Flowformer layers, latent {CONFIG['post_latent_dim']}) pretrained by scfm_tools "
            f"on {run['cells']:,} real human cells ({', '.join(files)}; cell-type labels not "
            f"used) over {run['genes']:,} genes, {TRAINING['max_epochs']} epochs of the "
            f"published masked-reconstruction objective, {run['seconds']} s on CPU. Reads every "
            "gene a cell expresses; cells attend to the other cells of their sample. A small "
            "model that runs offline: an official CellPLM checkpoint is the choice for real "
            "analyses. Scores against PCA and scVI on datasets left out of training: "
            "benchmarks/results/default_embedding.md."
        ),
        files=card_files,
        config={
            "architecture": CONFIG,
            "training": TRAINING,
            "training_files": list(files),
            **run,
        },
        license="BSD-3-Clause (weights trained by scfm_tools; CellPLM architecture: BSD-2-Clause)",
        citation=_CITE_CELLPLM,
        homepage="https://github.com/OmicsML/CellPLM",
        embedded=True,
    )
    (out / "card.json").write_text(json.dumps(card.to_dict(), indent=1) + "\n")


def main() -> None:
    """Parse the command line and run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="folder to write into")
    parser.add_argument("--exclude", nargs="*", default=[], help="training files to leave out")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--max-epochs", type=int, default=TRAINING["max_epochs"])
    opts = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    unknown = set(opts.exclude) - set(TRAIN_FILES)
    if unknown:
        parser.error(f"--exclude names files that are not trained on: {sorted(unknown)}")
    TRAINING["max_epochs"] = opts.max_epochs
    torch.set_num_threads(opts.threads)
    files = tuple(f for f in TRAIN_FILES if f not in opts.exclude)
    run = train(files, opts.out)
    write_card(opts.out, files, run)


if __name__ == "__main__":
    main()
