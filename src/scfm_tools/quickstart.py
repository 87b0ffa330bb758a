"""The main job, offline: ``python -m scfm_tools.quickstart``.

Embeds scanpy's packaged ``pbmc68k_reduced`` PBMCs (700 cells, 765 genes) with
``sft.tl.embed_cells``'s default (the CellPLM that ships inside the package, fine-tuned on these
cells first), builds the neighbourhood graph and UMAP on the embedding,
scores how well the embedding separates the ``bulk_labels`` cell types against PCA of the
log-normalised values on the same cells, and saves a UMAP figure and the AnnData.

The package's ``.raw`` holds ``log1p`` of counts scaled per cell; the models are fed counts, so
the counts are recovered first: ``expm1`` of a cell's values divided by its smallest non-zero
one (one count) gives integers to float32 rounding.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def counts_from_log_normalised(values) -> np.ndarray:
    """Integer counts of cells whose values are ``log1p(counts * scale_of_the_cell)``.

    Each cell's smallest non-zero ``expm1`` value is taken as one count; rounding absorbs the
    float32 error. Cells must hold at least one gene with a single count (true of UMI data).
    """
    scaled = np.expm1(np.asarray(values.todense() if hasattr(values, "todense") else values))
    scaled = scaled.astype(np.float64)
    one_count = np.where(scaled > 0, scaled, np.inf).min(axis=1, keepdims=True)
    counts = np.rint(scaled / one_count)
    if not np.allclose(counts, scaled / one_count, atol=0.25):
        raise ValueError("these values are not log1p of per-cell scaled counts.")
    return counts.astype(np.float32)


def main(argv: list[str] | None = None) -> dict:
    """Run the quickstart; returns the scores it prints."""
    parser = argparse.ArgumentParser(prog="python -m scfm_tools.quickstart", description=__doc__)
    parser.add_argument("--out", default="sft_quickstart", help="folder for the figure and h5ad")
    parser.add_argument("--model", default=None, help="model name or path (default: embedded)")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import scanpy as sc

    import scfm_tools as sft
    from scfm_tools._metrics import embedding_scores

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reduced = sc.datasets.pbmc68k_reduced()
    # All 765 genes: counts for the model, the log-normalised values for PCA (the packaged
    # PCA/UMAP are not carried over).
    adata = sc.AnnData(
        counts_from_log_normalised(reduced.raw.X),
        obs=reduced.obs.copy(),
        var=reduced.raw.var.copy(),
    )
    adata.layers["log_normalised"] = reduced.raw.X.astype(np.float32)

    sft.tl.embed_cells(adata, args.model)
    (key,) = adata.obsm.keys()
    sc.pp.neighbors(adata, use_rep=key)
    sc.tl.umap(adata, random_state=0)
    ax = sc.pl.umap(adata, color="bulk_labels", show=False, title=f"pbmc68k_reduced, {key}")
    ax.figure.savefig(out / "umap.png", dpi=120, bbox_inches="tight")

    sc.pp.pca(adata, n_comps=50, layer="log_normalised", random_state=0)
    labels = adata.obs["bulk_labels"]
    scores = {
        key: embedding_scores(adata.obsm[key], labels),
        "X_pca (baseline)": embedding_scores(adata.obsm["X_pca"], labels),
    }
    adata.write_h5ad(out / "pbmc68k_embedded.h5ad")
    print(f"model: {adata.uns[key[2:]]['params']['model']}  cells: {adata.n_obs}")
    for name, s in scores.items():
        print(
            f"{name:>18}: kNN accuracy {s['knn_accuracy']:.3f}  macro-F1 {s['knn_macro_f1']:.3f}"
            f"  silhouette {s['silhouette']:+.3f}  (chance {s['chance_accuracy']:.3f})"
        )
    print(f"wrote {out / 'umap.png'} and {out / 'pbmc68k_embedded.h5ad'}")
    (out / "scores.json").write_text(json.dumps(scores, indent=2))
    return scores


if __name__ == "__main__":
    main()
