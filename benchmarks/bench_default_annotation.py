"""The default ``sft.tl.annotate(query, reference=ref, label_key=...)`` against logistic regression.

For each reference -> query task on real labelled cells, in one run:

* **default**: ``sft.tl.annotate(query, reference=ref, label_key="cell_type")`` with nothing else
  chosen (``method="auto"``: the ways to carry labels over are measured by cross-validation on
  the reference and the best is fitted), timed as a user calls it;
* **logistic regression**: the baseline as a user would fit it without the package: scanpy's
  ``normalize_total(target_sum=1e4)`` + ``log1p``, the genes both sides have, scikit-learn's
  ``LogisticRegression(max_iter=1000)``;
* **kNN on the default model** (``method="knn"``): the default before it was measured.

Scored by macro-F1 over the query's cell types with at least 10 cells, and accuracy.

    python benchmarks/bench_default_annotation.py

Writes ``benchmarks/results/default_annotation.{json,md}``. Note: the embedded default model was
pretrained (without labels) on cells of these files; the expression baseline needs no model.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from _common import (
    load_average,
    log,
    machine_info,
    markdown_table,
    set_threads,
    shared_path,
    write_results,
)

NAME = "default_annotation"
CELLBENCH = "cellbench_3celllines_celseq2_dropseq.h5ad"
PBMC = "pbmc8k_200genes_labeled.h5ad"
MIN_CELLS = 10


def _tasks(data_dir):
    """(name, reference, query) on real labelled cells."""
    import anndata as ad

    cells = ad.read_h5ad(data_dir / CELLBENCH)
    celseq = cells[cells.obs["batch"] == "sc_celseq2"].copy()
    dropseq = cells[cells.obs["batch"] == "sc_dropseq"].copy()
    yield "CellBench CEL-seq2 -> Drop-seq (11,533 genes)", celseq, dropseq
    yield "CellBench Drop-seq -> CEL-seq2 (11,533 genes)", dropseq, celseq
    pbmc = ad.read_h5ad(data_dir / PBMC)
    main = pbmc.obs["cell_type"].value_counts().index[:5]
    pbmc = pbmc[pbmc.obs["cell_type"].isin(main)]
    order = np.random.default_rng(0).permutation(pbmc.n_obs)[:2000]
    yield (
        "pbmc8k random 1,000 -> 1,000 (200 genes)",
        pbmc[order[:1000]].copy(),
        pbmc[order[1000:]].copy(),
    )


def _scores(truth: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import f1_score

    kinds, counts = np.unique(truth, return_counts=True)
    main = kinds[counts >= MIN_CELLS]
    return {
        "macro_f1": float(f1_score(truth, predicted, labels=main, average="macro")),
        "accuracy": float(np.mean(truth == predicted)),
    }


def _logistic_regression(ref, query) -> np.ndarray:
    import scanpy as sc
    from sklearn.linear_model import LogisticRegression

    genes = ref.var_names.intersection(query.var_names)
    sides = []
    for cells in (ref, query):
        cells = cells.copy()
        sc.pp.normalize_total(cells, target_sum=1e4)
        sc.pp.log1p(cells)
        sides.append(cells[:, genes].X)
    fit = LogisticRegression(max_iter=1000, random_state=0)
    fit.fit(sides[0], ref.obs["cell_type"].astype(str).to_numpy())
    return fit.predict(sides[1])


def main() -> None:
    import scfm_tools as sft

    set_threads(2)
    logging.getLogger("scfm_tools").setLevel(logging.WARNING)
    sft.settings.progress_bar = False
    data_dir = shared_path("SFT_DATA", "../shared/data")
    rows = []
    for task, ref, query in _tasks(data_dir):
        truth = query.obs["cell_type"].astype(str).to_numpy()
        started = time.perf_counter()
        out = sft.tl.annotate(query, reference=ref, label_key="cell_type", copy=True)
        seconds = time.perf_counter() - started
        selection = out.uns["annotate"]["params"]["selection"]
        default = _scores(truth, out.obs["annotate_label"].astype(str).to_numpy())
        started = time.perf_counter()
        baseline = _scores(truth, _logistic_regression(ref, query))
        baseline_seconds = time.perf_counter() - started
        knn = sft.tl.annotate(query, reference=ref, label_key="cell_type", method="knn", copy=True)
        knn_scores = _scores(truth, knn.obs["scgpt_label"].astype(str).to_numpy())
        cv = selection.get("cross_validated_macro_f1") or {}
        rows.append(
            {
                "task": task,
                "reference_cells": int(ref.n_obs),
                "query_cells": int(query.n_obs),
                "default_macro_f1": default["macro_f1"],
                "logreg_macro_f1": baseline["macro_f1"],
                "met": default["macro_f1"] >= baseline["macro_f1"],
                "knn_default_model_macro_f1": knn_scores["macro_f1"],
                "default_accuracy": default["accuracy"],
                "logreg_accuracy": baseline["accuracy"],
                "chosen": selection["chosen"],
                "cv_expression": cv.get("expression"),
                "cv_knn": cv.get("knn"),
                "cv_logreg": cv.get("logreg"),
                "default_seconds": seconds,
                "logreg_seconds": baseline_seconds,
            }
        )
        log(f"{task}: {rows[-1]}")
    columns = [
        ("task", "task (reference -> query)"),
        ("default_macro_f1", "default macro-F1"),
        ("logreg_macro_f1", "logistic regression macro-F1"),
        ("met", "default >= logreg"),
        ("knn_default_model_macro_f1", "kNN on default model (old default)"),
        ("chosen", "path chosen"),
        ("cv_expression", "CV expression"),
        ("cv_knn", "CV kNN"),
        ("cv_logreg", "CV logreg on embedding"),
        ("default_seconds", "default s"),
        ("logreg_seconds", "logreg s"),
    ]
    info = machine_info(2)
    markdown = "\n\n".join(
        [
            "# Default `sft.tl.annotate(query, reference=ref, label_key=...)` vs logistic "
            "regression",
            f"Same run, 2 threads, load average {load_average()}, commit {info['git_commit']}. "
            "Macro-F1 over the query's cell types with at least 10 cells. CV: the default's "
            "5-fold cross-validated macro-F1 of each candidate on the reference; a model path "
            "must beat expression by more than 0.02 to be chosen.",
            markdown_table(rows, columns),
        ]
    )
    write_results(NAME, {"machine": info, "rows": rows}, markdown)


if __name__ == "__main__":
    main()
