"""Zero-shot embedding quality of foundation models against HVG+PCA and scVI, in the same run.

For each labelled real dataset, embed the cells with ``sft.tl.embed_cells`` (the embedded default
model, plus every ``--model`` given), and on the same cells compute the two baselines the
literature finds hard to beat:

* **HVG+PCA**: 50 components of log1p-normalised expression of the 2,000 most variable genes
  (scanpy defaults);
* **scVI**: scvi-tools' ``SCVI`` (10 latent dimensions, the batch as covariate where the data has
  batches) trained on the counts for ``--scvi-epochs`` epochs.

Every embedding is scored with

* a 5-fold cross-validated kNN classifier (k=15, cosine) on the known labels (accuracy,
  macro-F1) and the cosine silhouette of the labels (``scfm_tools._metrics``);
* scib-metrics' ``Benchmarker``: bio conservation (isolated labels, k-means NMI/ARI, silhouette,
  cLISI) and, where the data has several batches, batch correction (BRAS, iLISI, kBET,
  graph connectivity, PCR comparison against the PCA of the same cells), with its aggregate
  scores (not min-max scaled, so they compare across datasets).

    python benchmarks/bench_embedding_quality.py [--model NAME_OR_PATH ...] [--scvi-epochs N]

Writes ``benchmarks/results/embedding_quality.{json,md}`` and ``embedding_quality.png``. Note:
the embedded default model was pretrained (without labels) on cells of these same files; its card
says so.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from _baselines import pca_embedding, scvi_embedding
from _common import (
    RESULTS_DIR,
    machine_info,
    markdown_table,
    set_threads,
    shared_path,
    write_results,
)

NAME = "embedding_quality"
# dataset -> (label key, batch key or None)
DATASETS = {
    "cellbench_3celllines_celseq2_dropseq.h5ad": ("cell_type", "batch"),
    "pbmc8k_200genes_labeled.h5ad": ("cell_type", None),
    "pbmc68k_reduced (scanpy, log-normalised .raw)": ("bulk_labels", None),
}
PCA_KEY, SCVI_KEY = "X_pca", "X_scvi"


def _load(name: str, data_dir):
    import anndata as ad
    import scanpy as sc

    if name.startswith("pbmc68k_reduced"):
        reduced = sc.datasets.pbmc68k_reduced()
        return sc.AnnData(reduced.raw.X.copy(), obs=reduced.obs.copy(), var=reduced.raw.var)
    adata = ad.read_h5ad(data_dir / name)
    keep = adata.obs["cell_type"].notna() & (adata.obs["cell_type"].astype(str) != "NA")
    adata = adata[keep].copy()
    counts = adata.obs["cell_type"].value_counts()
    return adata[adata.obs["cell_type"].isin(counts.index[counts >= 10])].copy()


def _scib(adata, keys: list[str], label_key: str, batch_key: str | None) -> dict[str, dict]:
    """scib-metrics scores per embedding key (raw, not min-max scaled)."""
    from scib_metrics.benchmark import BatchCorrection, Benchmarker, BioConservation

    data = adata.copy()
    batched = batch_key is not None and data.obs[batch_key].nunique() > 1
    if not batched:
        batch_key = "_one_batch"
        data.obs[batch_key] = "all"
    bench = Benchmarker(
        data,
        batch_key=batch_key,
        label_key=label_key,
        embedding_obsm_keys=keys,
        bio_conservation_metrics=BioConservation(),
        batch_correction_metrics=BatchCorrection() if batched else None,
        pre_integrated_embedding_obsm_key=PCA_KEY,
        progress_bar=False,
    )
    bench.benchmark()
    table = bench.get_results(min_max_scale=False)
    table = table.drop(index="Metric Type", errors="ignore")
    return {key: {k: float(v) for k, v in table.loc[key].items()} for key in keys}


def _figure(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 3.4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        sub = [r for r in rows if r["dataset"] == dataset]
        x = np.arange(len(sub))
        for offset, (key, label) in zip(
            (-0.2, 0.0, 0.2),
            (("knn_accuracy", "kNN acc."), ("Bio conservation", "scib bio"), ("Total", "total")),
            strict=True,
        ):
            values = [r.get(key) if r.get(key) is not None else np.nan for r in sub]
            ax.bar(x + offset, values, width=0.2, label=label)
        ax.set_xticks(x, [r["method"] for r in sub], rotation=30, ha="right")
        ax.set_ylim(0, 1)
        ax.set_title(dataset.split(" ")[0].removesuffix(".h5ad"), fontsize=9)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS_DIR / f"{NAME}.png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        help="model name or path, repeatable (default: the embedded scgpt-default)",
    )
    parser.add_argument("--scvi-epochs", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    models = args.model or [None]

    import scfm_tools as sft
    from scfm_tools._metrics import embedding_scores

    data_dir = shared_path("SFT_DATA", "../shared/data")
    rows = []
    for name, (label_key, batch_key) in DATASETS.items():
        adata = _load(name, data_dir)
        seconds: dict[str, float] = {}
        for i, model in enumerate(models):
            before = set(adata.obsm)
            started = time.perf_counter()
            # Two models of one family would share X_<family>: later ones get their own key.
            sft.tl.embed_cells(adata, model, key_added=None if i == 0 else f"X_model{i}")
            (key,) = set(adata.obsm) - before
            seconds[key] = time.perf_counter() - started
        started = time.perf_counter()
        adata.obsm[PCA_KEY] = pca_embedding(adata)
        seconds[PCA_KEY] = time.perf_counter() - started
        started = time.perf_counter()
        latent = scvi_embedding(adata, batch_key, args.scvi_epochs)
        if latent is not None:
            adata.obsm[SCVI_KEY] = latent
            seconds[SCVI_KEY] = time.perf_counter() - started
        keys = list(seconds)
        scib = _scib(adata, keys, label_key, batch_key)
        labels = adata.obs[label_key]
        for key in keys:
            rows.append(
                {
                    "dataset": name,
                    "n_cells": adata.n_obs,
                    "n_labels": labels.nunique(),
                    "n_batches": adata.obs[batch_key].nunique() if batch_key else 1,
                    "method": key + (" (baseline)" if key in (PCA_KEY, SCVI_KEY) else ""),
                    **embedding_scores(adata.obsm[key], labels),
                    **scib[key],
                    "seconds": seconds[key],
                }
            )
    columns = [
        ("dataset", "dataset"),
        ("n_cells", "cells"),
        ("n_batches", "batches"),
        ("method", "embedding"),
        ("knn_accuracy", "kNN accuracy"),
        ("knn_macro_f1", "kNN macro-F1"),
        ("silhouette", "silhouette"),
        ("chance_accuracy", "majority class"),
        ("Bio conservation", "scib bio"),
        ("Batch correction", "scib batch"),
        ("Total", "scib total"),
        ("seconds", "s"),
    ]
    detail = [
        ("dataset", "dataset"),
        ("method", "embedding"),
        *[
            (k, k)
            for k in (
                "Isolated labels",
                "KMeans NMI",
                "KMeans ARI",
                "Silhouette label",
                "cLISI",
                "BRAS",
                "iLISI",
                "KBET",
                "Graph connectivity",
                "PCR comparison",
            )
        ],
    ]
    names = ", ".join(m or "scgpt-default (embedded)" for m in models)
    markdown = (
        "# Zero-shot embedding quality against HVG+PCA and scVI\n\n"
        f"`python benchmarks/bench_embedding_quality.py` with {names}; scVI {args.scvi_epochs} "
        "epochs. kNN: 5-fold cross-validated (k=15, cosine) on the known labels; silhouette: "
        "cosine, of the labels. scib: scib-metrics `Benchmarker` (raw scores, not min-max "
        "scaled; batch correction only where the data has batches; total = 0.6 bio + 0.4 "
        "batch). Baselines measured in the same run on the same cells. The embedded default "
        "model saw these cells (without labels) in pretraining.\n\n"
        + markdown_table(rows, columns)
        + "\n\n## scib-metrics, each metric\n\n"
        + markdown_table(rows, detail)
        + f"\n\n![embedding quality]({NAME}.png)\n"
    )
    write_results(
        NAME,
        {"machine": machine_info(args.threads), "scvi_epochs": args.scvi_epochs, "rows": rows},
        markdown,
    )
    _figure(rows)
    print(markdown)


if __name__ == "__main__":
    main()
