"""Pretrain the small scGPT that ships inside the package as ``scgpt-default``.

Usage (from the repository root; the data folder defaults to ``../shared/data`` beside the
repository, or ``$SFT_DATA``)::

    python scripts/train_default_scgpt.py            # train, export, write card.json, evaluate
    python scripts/train_default_scgpt.py --evaluate-only

Pretraining is unsupervised (masked gene-expression prediction + MVC, the published objective)
on real cells: every cell-type label is dropped before training. The vocabulary is the union
of the genes of the training files. The model is exported with
:meth:`SCGPT.export_folder <scfm_tools.models.SCGPT.export_folder>` into
``src/scfm_tools/data/models/scgpt-default/`` with a ``card.json``
(:meth:`ModelCard.to_dict <scfm_tools.hub.ModelCard.to_dict>`).

The evaluation embeds the labelled sets (pbmc8k, CellBench) and compares the embedding with
PCA on log1p-normalised counts: 5-fold kNN accuracy (k=15) and silhouette of the labels.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import scanpy as sc
import torch
from _shared_data import REPO, read, unlabelled_union

OUT_DIR = REPO / "src" / "scfm_tools" / "data" / "models" / "scgpt-default"

TRAIN_FILES = (
    "pbmc_10x_3chemistries_unlabeled.h5ad",
    "cellbench_3celllines_celseq2_dropseq.h5ad",
    "pbmc8k_200genes_labeled.h5ad",
)
EVAL_FILES = ("pbmc8k_200genes_labeled.h5ad", "cellbench_3celllines_celseq2_dropseq.h5ad")
# Labels with too few cells for 5-fold stratified cross-validation are left out of the scores.
MIN_CELLS_PER_LABEL = 10

CONFIG = {
    "d_model": 64,
    "n_heads": 4,
    "d_hid": 128,
    "n_layers": 2,
    "n_bins": 51,
    "max_seq_len": 256,
    # Attention dropout makes CPU attention fall back to the unfused kernel (several times
    # slower here); the random masks and gene subsampling regularise enough at this size.
    "dropout": 0.0,
}
TRAINING = {
    "max_epochs": 7,
    "batch_size": 32,
    "lr": 1e-3,
    "mask_ratio": 0.4,
    "lr_schedule": "cosine",
    "warmup_ratio": 0.05,
    "random_state": 0,
}


def train(out: Path) -> dict:
    """Pretrain, export the folder and return what the card records about the run."""
    import scvi

    from scfm_tools.models import SCGPT

    # Seeds torch, numpy and random: the train/validation split and the minibatch order.
    scvi.settings.seed = TRAINING["random_state"]
    adata = unlabelled_union(TRAIN_FILES)
    print(f"training data: {adata.n_obs:,} cells x {adata.n_vars:,} genes", flush=True)
    SCGPT.setup_anndata(adata)
    model = SCGPT(adata, **CONFIG)
    print(model, flush=True)
    start = time.perf_counter()
    model.train(
        max_epochs=TRAINING["max_epochs"],
        batch_size=TRAINING["batch_size"],
        accelerator="cpu",
        devices=1,
        train_size=0.95,
        check_val_every_n_epoch=1,
        plan_kwargs={k: v for k, v in TRAINING.items() if k not in ("max_epochs", "batch_size")},
    )
    seconds = time.perf_counter() - start
    history = {k: [float(v) for v in model.history[k].values.ravel()] for k in model.history}
    print(f"trained in {seconds:.0f} s", flush=True)
    for key in ("train_loss", "validation_loss", "gep_loss_validation", "mvc_loss_validation"):
        if key in history:
            print(f"  {key}: {[round(v, 1) for v in history[key]]}", flush=True)
    model.export_folder(out, overwrite=True)
    return {
        "cells": adata.n_obs,
        "genes": adata.n_vars,
        "seconds": round(seconds),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "scvi_tools": scvi.__version__,
        "final_train_loss": history["train_loss"][-1],
        "final_validation_loss": history.get("validation_loss", [None])[-1],
    }


def write_card(out: Path, run: dict, evaluation: dict) -> None:
    """Write card.json (ModelCard.to_dict) with the sha256 and size of every file."""
    from scfm_tools.hub import CardFile, ModelCard, file_sha256
    from scfm_tools.hub._official import _CITE_SCGPT

    roles = {"model.safetensors": "weights", "args.json": "args", "vocab.json": "vocab"}
    descriptions = {
        "model.safetensors": "state dict (torch layer names), safetensors",
        "args.json": "model hyper-parameters (official scGPT keys)",
        "vocab.json": "gene symbol -> token id, <pad>/<cls>/<eoc> included",
    }
    files = tuple(
        CardFile(
            name,
            sha256=file_sha256(out / name),
            size=(out / name).stat().st_size,
            description=descriptions[name],
            role=role,
        )
        for name, role in roles.items()
    )
    args = json.loads((out / "args.json").read_text())
    card = ModelCard(
        name="scgpt-default",
        family="scgpt",
        description=(
            f"Small scGPT (d_model {CONFIG['d_model']}, {CONFIG['n_layers']} layers, "
            f"max_seq_len {CONFIG['max_seq_len']}) pretrained by scfm_tools on "
            f"{run['cells']:,} real human cells ({', '.join(TRAIN_FILES)}; cell-type labels "
            f"not used) over a {run['genes']:,}-gene vocabulary, {TRAINING['max_epochs']} "
            f"epochs of masked gene-expression prediction + MVC, {run['seconds']} s on one CPU "
            "thread. A small model that runs offline; an official scGPT checkpoint is the "
            f"choice for real analyses. {_summary(evaluation)}"
        ),
        files=files,
        config={
            "args": args,
            "training": TRAINING,
            "training_files": list(TRAIN_FILES),
            **run,
            "evaluation": evaluation,
            "evaluation_note": (
                "kNN accuracy (5-fold, k=15) and silhouette of obs['cell_type'] on the "
                "embedding vs PCA (50 comps, log1p-normalised). The evaluated cells were part of "
                "the (unlabelled) pretraining data."
            ),
        },
        license="BSD-3-Clause (weights trained by scfm_tools; scGPT architecture: MIT)",
        citation=_CITE_SCGPT,
        homepage="https://github.com/bowang-lab/scGPT",
        embedded=True,
    )
    (out / "card.json").write_text(json.dumps(card.to_dict(), indent=1) + "\n")


def _summary(evaluation: dict) -> str:
    """One sentence on the evaluation figures, for the card's description."""
    parts = [
        f"{name.split('_')[0]} {res['scgpt_default']['knn_accuracy']:.2f} "
        f"(PCA {res['pca50_log1p']['knn_accuracy']:.2f}, majority class "
        f"{res['majority_fraction']:.2f})"
        for name, res in evaluation.items()
    ]
    return (
        f"Cell-type kNN accuracy (5-fold, k=15): {'; '.join(parts)}. A cell is read through at "
        f"most {CONFIG['max_seq_len'] - 1} of its expressed genes (a random subset), too few "
        "to tell apart cell lines expressing ~6,000 genes each."
    )


def _scores(X: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict[str, float]:
    from sklearn.metrics import silhouette_score
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    knn = cross_val_score(KNeighborsClassifier(15), X, labels, cv=folds)
    return {"knn_accuracy": float(knn.mean()), "silhouette": float(silhouette_score(X, labels))}


def evaluate(folder: Path, max_length: int | None = None) -> dict:
    """Score the embedding against PCA: 5-fold kNN accuracy and silhouette of the labels."""
    from scfm_tools.models.scgpt import embed_matrix, load_scgpt_checkpoint

    module, vocab, args, report = load_scgpt_checkpoint(folder)
    print(report, flush=True)
    results = {}
    for name in EVAL_FILES:
        adata = read(name)
        counts = adata.obs["cell_type"].value_counts()
        keep = adata.obs["cell_type"].isin(counts.index[counts >= MIN_CELLS_PER_LABEL])
        adata = adata[keep.to_numpy() & (adata.obs["cell_type"] != "NA").to_numpy()].copy()
        labels = adata.obs["cell_type"].astype(str).to_numpy()
        start = time.perf_counter()
        emb = embed_matrix(
            module, vocab, args, adata.X, adata.var_names, batch_size=64, max_length=max_length
        )
        seconds = time.perf_counter() - start
        pca = adata.copy()
        sc.pp.normalize_total(pca)
        sc.pp.log1p(pca)
        sc.pp.pca(pca, n_comps=min(50, pca.n_vars - 1), random_state=0)
        chance = float(counts[counts.index.isin(labels)].max() / len(labels))
        results[name] = {
            "cells": int(adata.n_obs),
            "labels": len(set(labels)),
            "majority_fraction": chance,
            "scgpt_default": _scores(emb, labels),
            "pca50_log1p": _scores(pca.obsm["X_pca"], labels),
            "embed_seconds": round(seconds, 1),
        }
        print(name, json.dumps(results[name], indent=1), flush=True)
    return results


def main() -> None:
    """Parse the command line and run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="folder to export into")
    parser.add_argument("--evaluate-only", action="store_true", help="skip training")
    # One thread: with other processes on the two cores, two OpenMP threads ran ~10x slower
    # here (every parallel region waits for the thread that lost its core).
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--eval-max-length", type=int, default=None, help="embedding max_length")
    for key, kind in (("max_epochs", int), ("batch_size", int), ("lr", float)):
        parser.add_argument(f"--{key.replace('_', '-')}", type=kind, default=TRAINING[key])
    for key in ("d_model", "n_layers", "max_seq_len"):
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=CONFIG[key])
    opts = parser.parse_args()
    TRAINING.update({k: getattr(opts, k) for k in ("max_epochs", "batch_size", "lr")})
    CONFIG.update({k: getattr(opts, k) for k in ("d_model", "n_layers", "max_seq_len")})
    CONFIG["d_hid"] = 2 * CONFIG["d_model"]
    torch.set_num_threads(opts.threads)
    if opts.evaluate_only:
        evaluate(opts.out, opts.eval_max_length)
        return
    run = train(opts.out)
    write_card(opts.out, run, evaluate(opts.out))


if __name__ == "__main__":
    main()
