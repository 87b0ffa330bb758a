"""``sft.tl.perturbation_metrics``: score predicted perturbation means against observed cells.

The metrics of cell-eval (Arc Institute's Virtual Cell Challenge evaluation), computed here on
mean profiles (a prediction here is a mean, not cells): Pearson delta on all genes and on the
top DE genes, DE-gene overlap and direction, MAE of the delta and the discrimination score.

Written here rather than calling the ``cell-eval`` package (PyPI; it installs on Python 3.11
with polars, pyarrow and pdex): cell-eval scores an AnnData of predicted *cells* with per-cell
DE tests, whereas ``sft.tl.predict_perturbation`` returns one mean profile per perturbation,
and scfm_tools keeps its dependencies small. The definitions follow cell-eval's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import sparse

from .._anndata import DEFAULT_CHUNK_SIZE
from .._docs import DOC_CHUNK_SIZE, DOC_LAYER, DOC_RANDOM_STATE, doc_params
from .._validation import InputError, check_counts

if TYPE_CHECKING:
    from anndata import AnnData

    from ..models.perturbation import PerturbationData

__all__ = ["perturbation_metrics"]

#: The columns of the table, in order.
METRICS = (
    "pearson_delta",
    "pearson_delta_top_de",
    "de_overlap",
    "de_direction",
    "mae_delta",
    "discrimination_l1",
)
CEILING = "replicate ceiling"


def _moments(X: sparse.csr_matrix, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    sub = X[rows]
    mean = np.asarray(sub.mean(axis=0)).ravel()
    square = np.asarray(sub.multiply(sub).mean(axis=0)).ravel()
    n = len(rows)
    return mean, np.maximum(square - mean**2, 0.0) * n / max(n - 1, 1), n


def welch_t(X: sparse.csr_matrix, rows: np.ndarray, control_rows: np.ndarray) -> np.ndarray:
    """Welch's t statistic of each gene, cells ``rows`` against ``control_rows``."""
    m1, v1, n1 = _moments(X, rows)
    m0, v0, n0 = _moments(X, control_rows)
    return (m1 - m0) / np.sqrt(v1 / n1 + v0 / n0 + 1e-12)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if np.std(a) == 0 or np.std(b) == 0:
        return float("nan")  # a constant prediction has no correlation
    return float(np.corrcoef(a, b)[0, 1])


def score_deltas(
    predicted: np.ndarray, observed: np.ndarray, top: np.ndarray, excluded: list[np.ndarray]
) -> dict[str, np.ndarray]:
    """Score predicted against observed effects, one row per perturbation.

    Parameters
    ----------
    predicted, observed
        ``(n_perturbations, n_genes)`` effects (mean minus control mean).
    top
        ``(n_perturbations, k)`` column indices of each perturbation's top DE genes.
    excluded
        Per perturbation, the columns of its own target genes: left out of its
        discrimination distances (as cell-eval does).

    Returns
    -------
    One array of ``n_perturbations`` values per metric of :data:`METRICS`.
    """
    n, k = top.shape
    out = {name: np.full(n, np.nan) for name in METRICS}
    for i in range(n):
        p, o, t = predicted[i], observed[i], top[i]
        out["pearson_delta"][i] = _pearson(p, o)
        out["pearson_delta_top_de"][i] = _pearson(p[t], o[t])
        largest = np.argsort(-np.abs(p), kind="stable")[:k] if np.any(p) else np.array([], int)
        out["de_overlap"][i] = len(np.intersect1d(largest, t)) / k
        out["de_direction"][i] = float(np.mean(np.sign(p[t]) == np.sign(o[t])))
        out["mae_delta"][i] = float(np.mean(np.abs(p - o)))
        keep = np.setdiff1d(np.arange(predicted.shape[1]), excluded[i])
        distance = np.abs(observed[:, keep] - p[keep]).sum(axis=1)
        # cell-eval's normalised rank: 1 when the true perturbation is the nearest observed one.
        rank = int(np.flatnonzero(np.argsort(distance, kind="stable") == i)[0])
        out["discrimination_l1"][i] = 1.0 - rank / n
    return out


def _targets(data: PerturbationData, names: list[str]) -> list[np.ndarray]:
    position = {g: i for i, g in enumerate(data.genes)}
    return [np.array([position[g] for g in data.parts[n] if g in position], int) for n in names]


def _top_de(data: PerturbationData, names: list[str], control_rows, rows, k: int) -> np.ndarray:
    return np.stack(
        [
            np.argsort(-np.abs(welch_t(data.X, rows[n], control_rows)), kind="stable")[:k]
            for n in names
        ]
    )


def _ceiling(data: PerturbationData, names: list[str], k: int, seed: int) -> dict[str, np.ndarray]:
    """Split-half ceiling: one random half of each group's cells predicting the other half."""
    rng = np.random.default_rng(seed)
    halves = {}
    for name in [data.control, *names]:
        cells = rng.permutation(data.rows[name])
        halves[name] = (cells[: len(cells) // 2], cells[len(cells) // 2 :])

    def effects(h: int) -> np.ndarray:
        control = np.asarray(data.X[halves[data.control][h]].mean(axis=0)).ravel()
        return np.stack(
            [np.asarray(data.X[halves[n][h]].mean(axis=0)).ravel() - control for n in names]
        )

    observed_rows = {n: halves[n][1] for n in names}
    top = _top_de(data, names, halves[data.control][1], observed_rows, k)
    return score_deltas(effects(0), effects(1), top, _targets(data, names))


def _prediction_rows(pred: AnnData, key: str, genes: np.ndarray, label: str) -> pd.DataFrame:
    if key not in pred.obs:
        raise KeyError(
            f"the predictions {label!r} have no obs[{key!r}]; pass the AnnData that "
            "sft.tl.predict_perturbation returned, with the same perturbation_key."
        )
    missing = np.setdiff1d(genes, np.asarray(pred.var_names))
    if missing.size:
        raise InputError(
            f"the predictions {label!r} lack {missing.size} of the observed genes (e.g. "
            f"{list(missing[:5])}); predict over the genes of the observed AnnData."
        )
    X = pred[:, list(genes)].X
    X = X.toarray() if sparse.issparse(X) else np.asarray(X)
    return pd.DataFrame(X, index=pred.obs[key].astype(str).to_numpy(), columns=genes)


@doc_params(layer=DOC_LAYER, random_state=DOC_RANDOM_STATE, chunk_size=DOC_CHUNK_SIZE)
def perturbation_metrics(
    adata: AnnData,
    predictions: AnnData | Mapping[str, AnnData],
    *,
    perturbation_key: str = "perturbation",
    control: str = "control",
    layer: str | None = None,
    top_de: int = 20,
    ceiling: bool = False,
    random_state: int = 0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> pd.DataFrame:
    """Score predicted perturbation responses against the observed cells (cell-eval's metrics).

    Each perturbation of the predictions that ``adata`` observes is scored on its effect
    (*delta*: mean log-normalised expression, ``log1p`` of counts per 10,000, minus the
    control's mean in ``adata``). The top DE genes of a perturbation are the ``top_de`` genes
    with the largest absolute Welch t of its cells against the control cells. The metrics follow
    cell-eval's definitions, computed here on means (the predictions are means, not cells):

    - ``pearson_delta``: Pearson correlation of predicted and observed delta, all genes;
    - ``pearson_delta_top_de``: the same over the top DE genes (NaN for a constant prediction,
      e.g. ``"control"``);
    - ``de_overlap``: the share of the top DE genes among the ``top_de`` genes of largest
      predicted absolute delta (cell-eval's ``overlap_at_k``, the predicted genes ranked by effect
      size as there is no predicted test statistic);
    - ``de_direction``: the share of the top DE genes whose predicted delta has the observed
      sign (cell-eval's ``de_direction_match``; a zero prediction matches nothing);
    - ``mae_delta``: mean absolute error of the delta over all genes;
    - ``discrimination_l1``: cell-eval's discrimination score: the L1 distances from the
      predicted delta to every scored perturbation's observed delta (the perturbation's own
      target genes left out) are ranked; 1 when its own is the nearest, ``1 - rank / n``
      otherwise (about 0.5 for a prediction that is the same for every perturbation).

    Parameters
    ----------
    adata
        Observed cells, raw counts, with the control and (some of) the predicted perturbations
        in ``obs[perturbation_key]``.
    predictions
        What :func:`~scfm_tools.tl.predict_perturbation` returned, or a mapping of names to
        such AnnData (e.g. several methods), scored side by side.
    perturbation_key
        Column of ``adata.obs`` (and of the predictions' ``obs``) with the perturbation names;
        combinations are written ``"A+B"``.
    control
        The control's name in ``obs[perturbation_key]``.
    {layer}
    top_de
        Number of top DE genes.
    ceiling
        Also score the split-half replicate ceiling (method ``"replicate ceiling"``): each
        perturbation's and the control's cells are split in two random halves, and one half's
        effect predicts the other's (top DE genes from the predicted-against half). It is
        measured at half the depth of the data, so it underestimates the full-depth ceiling.
    {random_state}
        Seeds the split of the ceiling.
    {chunk_size}

    Returns
    -------
    A DataFrame, one row per (method, perturbation): columns ``method`` (the mapping's key,
    else the prediction's ``uns["predict_perturbation"]["params"]["method"]``),
    ``perturbation``, ``n_cells`` (observed cells) and the metrics above.

    Raises
    ------
    InputError
        Values that are not counts, no control cells, predictions without the observed genes,
        or no predicted perturbation observed in ``adata``.
    """
    from ..models.perturbation import PerturbationData, join_perturbation, split_perturbation

    if isinstance(top_de, bool) or not isinstance(top_de, int) or top_de < 1:
        raise ValueError(f"top_de must be a positive integer, got {top_de!r}.")
    if perturbation_key not in adata.obs:
        raise KeyError(f"adata.obs has no column {perturbation_key!r} (perturbation_key).")
    if control not in set(adata.obs[perturbation_key].astype(str)):
        raise InputError(
            f"no cell of adata has {perturbation_key} == {control!r}: the effects are measured "
            "against the control cells, so they are needed. Pass control= naming them."
        )
    check_counts(adata, layer, chunk_size=chunk_size)
    data = PerturbationData.from_anndata(
        adata, perturbation_key, control, layer=layer, chunk_size=chunk_size
    )
    if not isinstance(predictions, Mapping):
        params = predictions.uns.get("predict_perturbation", {}).get("params", {})
        predictions = {str(params.get("method", "prediction")): predictions}
    k = min(top_de, len(data.genes))
    tables = []
    for label, pred in predictions.items():
        frame = _prediction_rows(pred, perturbation_key, data.genes, label)
        frame.index = [
            join_perturbation(split_perturbation(n, data.sep), data.sep) for n in frame.index
        ]
        names = [n for n in dict.fromkeys(frame.index) if n in data.rows and n != control]
        if not names:
            raise InputError(
                f"none of the perturbations predicted in {label!r} is observed in adata "
                f"(obs[{perturbation_key!r}]); score predictions of observed perturbations."
            )
        observed = np.stack([data.delta(n) for n in names])
        predicted = frame.loc[names].to_numpy(dtype=np.float64) - data.control_mean
        top = _top_de(data, names, data.rows[control], data.rows, k)
        tables.append((label, names, score_deltas(predicted, observed, top, _targets(data, names))))
    if ceiling:
        names = sorted({n for _, scored, _ in tables for n in scored})
        tables.append((CEILING, names, _ceiling(data, names, k, random_state)))
    return pd.concat(
        [
            pd.DataFrame(
                {
                    "method": label,
                    "perturbation": names,
                    "n_cells": [len(data.rows[n]) for n in names],
                }
                | scores
            )
            for label, names, scores in tables
        ],
        ignore_index=True,
    )
