"""Evaluation frame for perturbation-response prediction, with the simple baselines to beat.

Data: the Papalexi et al. 2021 ECCITE-seq low-MOI CRISPR screen
(``papalexi2021_eccite_lowmoi_perturb.h5ad``: single-gene knockouts in THP-1 cells, 299 genes).
Cells without a confident guide are dropped; values are log1p-normalised (10^4 counts per cell).

Protocol: the targeted genes with at least ``--min-cells`` cells are split into ``--folds``
folds; a predictor sees the control cells and the cells of the other folds' perturbations and
predicts the mean expression profile of each held-out perturbation. For each held-out
perturbation, with ``delta = mean(perturbed) - mean(control)``:

* **Pearson delta (top DE)**: Pearson correlation of predicted and observed delta over the
  ``--top-de`` genes with the largest observed |t| (Welch t-test, perturbed vs control cells);
* **Pearson delta (all genes)** and the **MSE of delta on the top DE genes**.

Predictors (each gets the same data; a model-based predictor, e.g. a future
``sft.tl.perturb``, is one more entry in ``PREDICTORS`` with the same signature):

* ``no change``: the control mean (delta 0; its Pearson delta is undefined, its MSE is the
  yardstick for the others);
* ``mean``: control mean + the mean delta of the training perturbations (the "mean" baseline
  that deep models often fail to beat);
* ``additive``: ``mean`` + the knocked-out gene's own term: the target gene, when measured, moves
  by the average self-effect (log-fold change of a targeted gene in its own knockout) seen in
  training — perturbation effects added gene by gene;
* ``replicate ceiling`` (not a predictor): one random half of the perturbed cells predicting
  the other half, i.e. how well any predictor can do given the sampling noise.

    python benchmarks/bench_perturbation.py [--folds 5] [--top-de 20] [--min-cells 100]

Writes ``benchmarks/results/perturbation.{json,md,png}``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np

from _common import RESULTS_DIR, machine_info, markdown_table, shared_path, write_results

NAME = "perturbation"
FILE = "papalexi2021_eccite_lowmoi_perturb.h5ad"
CONTROL, UNASSIGNED = "control", "unassigned"
# (control mean, training perturbation means, training names, test names, genes) -> predictions
Predictor = Callable[
    [np.ndarray, dict[str, np.ndarray], list[str], list[str], list[str]], dict[str, np.ndarray]
]


def _load(data_dir):
    import anndata as ad
    import scanpy as sc

    adata = ad.read_h5ad(data_dir / FILE)
    adata = adata[adata.obs["perturbation"] != UNASSIGNED].copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    return adata


def _group_means(X, labels: np.ndarray) -> dict[str, np.ndarray]:
    return {g: np.asarray(X[labels == g].mean(axis=0)).ravel() for g in np.unique(labels)}


def _welch_t(X, in_group: np.ndarray, control: np.ndarray) -> np.ndarray:
    def moments(rows):
        sub = X[rows]
        mean = np.asarray(sub.mean(axis=0)).ravel()
        sq = np.asarray(sub.power(2).mean(axis=0)).ravel()
        n = int(rows.sum())
        return mean, np.maximum(sq - mean**2, 0) * n / max(n - 1, 1), n

    m1, v1, n1 = moments(in_group)
    m0, v0, n0 = moments(control)
    return (m1 - m0) / np.sqrt(v1 / n1 + v0 / n0 + 1e-12)


def predict_no_change(control, train_means, train, test, genes):
    return {p: control.copy() for p in test}


def predict_mean(control, train_means, train, test, genes):
    shift = np.mean([train_means[p] - control for p in train], axis=0)
    return {p: control + shift for p in test}


def predict_additive(control, train_means, train, test, genes):
    position = {g: i for i, g in enumerate(genes)}
    base = predict_mean(control, train_means, train, test, genes)
    self_effects = [
        train_means[p][position[p]] - control[position[p]] for p in train if p in position
    ]
    self_effect = float(np.mean(self_effects)) if self_effects else 0.0
    for p in test:
        if p in position:
            # The shared shift already moved the target gene: replace it by the self-effect.
            base[p][position[p]] = control[position[p]] + self_effect
    return base


PREDICTORS: dict[str, Predictor] = {
    "no change": predict_no_change,
    "mean": predict_mean,
    "additive": predict_additive,
}


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def _score(pred: np.ndarray, observed: np.ndarray, control: np.ndarray, top: np.ndarray) -> dict:
    d_pred, d_obs = pred - control, observed - control
    return {
        "pearson_delta_top_de": _pearson(d_pred[top], d_obs[top]),
        "pearson_delta_all": _pearson(d_pred, d_obs),
        "mse_delta_top_de": float(np.mean((d_pred[top] - d_obs[top]) ** 2)),
    }


def _figure(per_pert: list[dict], methods: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    data = [[r["pearson_delta_top_de"] for r in per_pert if r["method"] == m] for m in methods]
    data = [[v for v in d if np.isfinite(v)] for d in data]
    ax.boxplot(data, tick_labels=methods)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_ylabel("Pearson delta (top DE genes)")
    ax.set_title("Held-out perturbations, Papalexi 2021", fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS_DIR / f"{NAME}.png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--top-de", type=int, default=20)
    parser.add_argument("--min-cells", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    adata = _load(shared_path("SFT_DATA", "../shared/data"))
    labels = adata.obs["perturbation"].astype(str).to_numpy()
    genes = list(adata.var_names)
    counts = adata.obs["perturbation"].value_counts()
    perts = sorted(p for p in counts.index if p != CONTROL and counts[p] >= args.min_cells)
    means = _group_means(adata.X, labels)
    control = means[CONTROL]
    is_control = labels == CONTROL
    rng = np.random.default_rng(args.seed)
    fold_of = dict(zip(rng.permutation(perts), np.arange(len(perts)) % args.folds, strict=True))

    per_pert: list[dict] = []
    for fold in range(args.folds):
        test = [p for p in perts if fold_of[p] == fold]
        train = [p for p in perts if fold_of[p] != fold]
        predictions = {
            name: fn(control, {p: means[p] for p in train}, train, test, genes)
            for name, fn in PREDICTORS.items()
        }
        for p in test:
            rows = labels == p
            top = np.argsort(-np.abs(_welch_t(adata.X, rows, is_control)))[: args.top_de]
            for name in PREDICTORS:
                per_pert.append(
                    {"perturbation": p, "fold": fold, "method": name}
                    | _score(predictions[name][p], means[p], control, top)
                )
            # Noise ceiling: one random half of the cells predicting the other half.
            cells = np.flatnonzero(rows)
            half = rng.permutation(cells)
            a, b = half[: len(cells) // 2], half[len(cells) // 2 :]
            mean_a = np.asarray(adata.X[a].mean(axis=0)).ravel()
            mean_b = np.asarray(adata.X[b].mean(axis=0)).ravel()
            per_pert.append(
                {"perturbation": p, "fold": fold, "method": "replicate ceiling"}
                | _score(mean_a, mean_b, control, top)
            )
    methods = [*PREDICTORS, "replicate ceiling"]
    summary = []
    for m in methods:
        sub = [r for r in per_pert if r["method"] == m]
        top_de = np.array([r["pearson_delta_top_de"] for r in sub])
        summary.append(
            {
                "method": m,
                "n_perturbations": len(sub),
                "median_pearson_delta_top_de": float(np.nanmedian(top_de))
                if np.isfinite(top_de).any()
                else None,
                "mean_pearson_delta_top_de": float(np.nanmean(top_de))
                if np.isfinite(top_de).any()
                else None,
                "median_pearson_delta_all": float(
                    np.nanmedian([r["pearson_delta_all"] for r in sub])
                )
                if m != "no change"
                else None,
                "mean_mse_delta_top_de": float(np.mean([r["mse_delta_top_de"] for r in sub])),
            }
        )
    columns = [
        ("method", "predictor"),
        ("n_perturbations", "held-out perturbations"),
        ("median_pearson_delta_top_de", "median Pearson delta (top DE)"),
        ("mean_pearson_delta_top_de", "mean Pearson delta (top DE)"),
        ("median_pearson_delta_all", "median Pearson delta (all genes)"),
        ("mean_mse_delta_top_de", "MSE of delta (top DE)"),
    ]
    markdown = (
        "# Perturbation-response prediction: evaluation frame and baselines\n\n"
        f"`python benchmarks/bench_perturbation.py` on {FILE} ({adata.n_obs:,} cells with a "
        f"guide, {adata.n_vars} genes), {len(perts)} knockouts with >= {args.min_cells} cells, "
        f"{args.folds}-fold split by perturbation, top {args.top_de} DE genes (Welch t vs "
        "control). Model-based predictors have to beat `mean` and `additive`; `replicate "
        "ceiling` is the best reachable given sampling noise.\n\n"
        + markdown_table(summary, columns)
        + f"\n\n![Pearson delta per held-out perturbation]({NAME}.png)\n"
    )
    write_results(
        NAME,
        {
            "machine": machine_info(),
            "settings": vars(args),
            "summary": summary,
            "per_perturbation": per_pert,
        },
        markdown,
    )
    _figure(per_pert, methods)
    print(markdown)


if __name__ == "__main__":
    main()
