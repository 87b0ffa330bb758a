"""Zero-shot embedding quality of the embedded default model against PCA, in the same run.

For each labelled real dataset: embed the cells with ``sft.tl.embed_cells`` (the embedded
default model unless ``--model`` names another), and compute PCA (50 components on
log1p-normalised expression of the 2,000 most variable genes, scanpy defaults) on the same cells.
Both are scored with a 5-fold cross-validated kNN classifier (k=15, cosine) on the known labels
(accuracy, macro-F1) and the cosine silhouette of the labels.

    python benchmarks/bench_embedding_quality.py [--model NAME_OR_PATH]

Writes benchmarks/results/embedding_quality.{json,md}. Note: the default model was pretrained
(without labels) on cells of these same files; the card says so.
"""

from __future__ import annotations

import argparse
import time

from _common import machine_info, markdown_table, set_threads, shared_path, write_results

DATASETS = {
    "pbmc8k_200genes_labeled.h5ad": "cell_type",
    "cellbench_3celllines_celseq2_dropseq.h5ad": "cell_type",
    "pbmc68k_reduced (scanpy, log-normalised .raw)": "bulk_labels",
}


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


def _pca(adata):
    import numpy as np
    import scanpy as sc

    pca = adata.copy()
    if np.array_equal(pca.X.data, np.round(pca.X.data)):
        sc.pp.normalize_total(pca, target_sum=1e4)
        sc.pp.log1p(pca)
    n_top = min(2000, pca.n_vars)
    sc.pp.highly_variable_genes(pca, n_top_genes=n_top)
    sc.pp.pca(pca, n_comps=min(50, n_top - 1), mask_var="highly_variable", random_state=0)
    return pca.obsm["X_pca"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="model name or path (default: embedded)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)

    import scfm_tools as sft
    from scfm_tools._metrics import embedding_scores

    data_dir = shared_path("SFT_DATA", "../shared/data")
    rows = []
    for name, label_key in DATASETS.items():
        adata = _load(name, data_dir)
        started = time.perf_counter()
        sft.tl.embed_cells(adata, args.model)
        seconds = time.perf_counter() - started
        (key,) = adata.obsm.keys()
        labels = adata.obs[label_key]
        for method, X in ((key, adata.obsm[key]), ("PCA (baseline)", _pca(adata))):
            rows.append(
                {
                    "dataset": name,
                    "n_cells": adata.n_obs,
                    "n_labels": labels.nunique(),
                    "method": method,
                    **embedding_scores(X, labels),
                    "embed_seconds": seconds if method == key else None,
                }
            )
    columns = [
        ("dataset", "dataset"),
        ("n_cells", "cells"),
        ("n_labels", "labels"),
        ("method", "embedding"),
        ("knn_accuracy", "kNN accuracy"),
        ("knn_macro_f1", "kNN macro-F1"),
        ("silhouette", "silhouette"),
        ("chance_accuracy", "majority class"),
        ("embed_seconds", "embed s"),
    ]
    model = args.model or "scgpt-default (embedded)"
    markdown = (
        "# Zero-shot embedding quality against PCA\n\n"
        f"`python benchmarks/bench_embedding_quality.py` with model {model}; 5-fold kNN "
        "(k=15, cosine) and cosine silhouette on the known labels, PCA measured in the same run. "
        "The embedded default model saw these cells (without labels) in pretraining.\n\n"
        + markdown_table(rows, columns)
    )
    write_results(
        "embedding_quality", {"machine": machine_info(args.threads), "rows": rows}, markdown
    )
    print(markdown)


if __name__ == "__main__":
    main()
