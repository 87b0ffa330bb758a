"""Gene-regulatory-network recovery: model attention and gene embeddings vs co-expression.

On real full-transcriptome PBMCs (``pbmc_10x_3chemistries_unlabeled.h5ad``, a seeded subset of
``--cells`` cells), the ``--genes`` most variable genes (scanpy's Seurat v3 flavour on counts),
plus every DoRothEA regulator among the expressed genes so that the prior has sources to score:

* ``sft.tl.grn(method="attention")``: last-layer attention, heads and cells averaged;
* ``sft.tl.grn(method="embedding")``: cosine similarity of context-free gene embeddings;
* the baseline: |Pearson| co-expression of log-normalised values over the same gene pairs,
  computed by ``sft.tl.grn_score`` in the same run.

Each is scored with ``sft.tl.grn_score`` against DoRothEA (confidence levels ``--confidence``,
default A-C): AUROC and AUPRC over every regulator -> gene pair among the scored genes, with
the prevalence (the AUPRC of a random ranking).

    python benchmarks/bench_grn.py [--model NAME_OR_PATH] [--cells 500] [--genes 400]

Writes ``benchmarks/results/grn.{json,md}``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from _common import machine_info, markdown_table, set_threads, shared_path, write_results

NAME = "grn"
FILE = "pbmc_10x_3chemistries_unlabeled.h5ad"
PRIOR = "prior_knowledge/dorothea_hs.csv.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="model name or path (default: embedded)")
    parser.add_argument("--cells", type=int, default=500)
    parser.add_argument("--genes", type=int, default=400)
    parser.add_argument("--confidence", default="ABC")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)

    import anndata as ad
    import pandas as pd
    import scanpy as sc

    import scfm_tools as sft

    data_dir = shared_path("SFT_DATA", "../shared/data")
    adata = ad.read_h5ad(data_dir / FILE)
    rng = np.random.default_rng(0)
    adata = adata[np.sort(rng.choice(adata.n_obs, min(args.cells, adata.n_obs), replace=False))]
    adata = adata.copy()
    prior = pd.read_csv(data_dir / PRIOR)
    prior = prior[prior["confidence"].isin(list(args.confidence))]
    expressed = np.asarray((adata.X > 0).sum(0)).ravel() >= 10
    sc.pp.highly_variable_genes(adata, n_top_genes=args.genes, flavor="seurat_v3")
    regulators = adata.var_names.isin(prior["tf"].unique()) & expressed
    keep = (adata.var["highly_variable"].to_numpy() | regulators) & expressed
    genes = list(adata.var_names[keep])

    rows = []
    for method in ("attention", "embedding"):
        started = time.perf_counter()
        kwargs = {"genes": genes}
        sft.tl.grn(adata, args.model, method=method, **kwargs)
        seconds = time.perf_counter() - started
        key = next(k for k in adata.uns if k.endswith(f"_grn_{method}"))
        table = sft.tl.grn_score(adata, prior, key=key)
        for name, row in table.iterrows():
            if name == "correlation" and method == "embedding":
                continue  # the same baseline twice
            rows.append(
                {
                    "method": name if name == "correlation" else f"{key} ({method})",
                    "auroc": float(row["auroc"]),
                    "auprc": float(row["auprc"]),
                    "auprc_over_random": float(row["auprc"] / row["prevalence"]),
                    "prevalence": float(row["prevalence"]),
                    "n_edges": int(row["n_edges"]),
                    "n_positives": int(row["n_positives"]),
                    "n_regulators": int(row["n_regulators"]),
                    "seconds": seconds if name != "correlation" else None,
                }
            )
    rows.sort(key=lambda r: r["method"] != "correlation")
    for row in rows:
        if row["method"] == "correlation":
            row["method"] = "co-expression |r| (baseline)"
    columns = [
        ("method", "scores"),
        ("auroc", "AUROC"),
        ("auprc", "AUPRC"),
        ("auprc_over_random", "AUPRC / random"),
        ("prevalence", "random AUPRC"),
        ("n_edges", "candidate edges"),
        ("n_positives", "prior edges"),
        ("n_regulators", "regulators"),
        ("seconds", "s"),
    ]
    model = args.model or "scgpt-default (embedded)"
    markdown = (
        "# GRN recovery against DoRothEA\n\n"
        f"`python benchmarks/bench_grn.py` with {model} on {adata.n_obs} cells of {FILE}, "
        f"{len(genes)} genes ({args.genes} HVGs + expressed DoRothEA regulators), DoRothEA "
        f"confidence {args.confidence}; co-expression baseline over the same pairs in the same "
        "run.\n\n" + markdown_table(rows, columns)
    )
    write_results(
        NAME,
        {"machine": machine_info(args.threads), "settings": vars(args), "rows": rows},
        markdown,
    )
    print(markdown)


if __name__ == "__main__":
    main()
