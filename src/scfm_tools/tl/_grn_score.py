"""``sft.tl.grn_score``: how well an inferred GRN recovers known TF -> target interactions."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from scipy import sparse

from .._anndata import iter_chunks, params_record, resolve_adata
from .._docs import DOC_LAYER, doc_params
from .._lognorm import log1p_per_10k
from .._validation import InputError, check_nonnegative, first_non_integer
from ._grn import resolve_grn_key

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["grn_score"]

logger = logging.getLogger("scfm_tools")


def _read_prior(prior: pd.DataFrame | str | os.PathLike) -> pd.DataFrame:
    """Return the prior as ``source``, ``target`` string columns (``tf`` accepted as source)."""
    if isinstance(prior, str | os.PathLike):
        table = pd.read_csv(prior)
    elif isinstance(prior, pd.DataFrame):
        table = prior
    else:
        raise TypeError(
            f"prior must be a DataFrame or the path of a CSV file, got {type(prior).__name__}."
        )
    source = "source" if "source" in table.columns else "tf" if "tf" in table.columns else None
    if source is None or "target" not in table.columns:
        raise InputError(
            "the prior needs a 'source' (or 'tf') and a 'target' column, one row per "
            f"regulator -> target interaction; its columns are {list(table.columns)}. Rename "
            "them, e.g. `prior.rename(columns={'regulator': 'source'})`."
        )
    edges = table[[source, "target"]].dropna().astype(str)
    edges.columns = ["source", "target"]
    edges = edges[edges["source"] != edges["target"]]
    return edges.drop_duplicates().reset_index(drop=True)


def _model_scores(adata: AnnData, key: str, genes: pd.Index) -> np.ndarray:
    """Scored x scored matrix of the GRN's scores (source rows); NaN for unscored pairs."""
    stored = adata.uns[key]
    if "scores" in stored:
        return np.asarray(stored["scores"], dtype=np.float64)
    logger.warning(
        "grn_score: uns[%r] keeps no dense scores (more than 2,000 genes were scored); ranking "
        "only the top-k edges in varp[%r], the other pairs tie at the bottom.",
        key,
        key,
    )
    pos = adata.var_names.get_indexer(genes)
    sub = sparse.csr_matrix(adata.varp[key])[pos][:, pos].toarray().astype(np.float64)
    sub[sub == 0] = np.nan
    return sub


def _abs_correlation(
    adata: AnnData, layer: str | None, rows: np.ndarray, cols: np.ndarray
) -> np.ndarray:
    """|Pearson r| of log-normalised expression between genes ``rows`` and ``cols`` (var positions).

    Streams over cells; raw counts are normalised to 10,000 per cell and log1p-transformed on the
    fly, other (non-integer) values are taken as log-normalised already.
    """
    counts = first_non_integer(adata, layer) is None
    union = np.union1d(rows, cols)
    r_pos, c_pos = np.searchsorted(union, rows), np.searchsorted(union, cols)
    n = 0
    total = np.zeros(union.size)
    squares = np.zeros(union.size)
    cross = np.zeros((rows.size, cols.size))
    # Dense blocks of about 20M values whatever the number of genes.
    chunk_size = max(256, int(2e7 // max(union.size, 1)))
    for _, block in iter_chunks(adata, layer, chunk_size=chunk_size):
        if counts:
            x = log1p_per_10k(block, union).toarray()
        else:
            x = block[:, union]
            x = x.toarray() if sparse.issparse(x) else np.asarray(x, dtype=np.float64)
        n += x.shape[0]
        total += x.sum(0)
        squares += (x * x).sum(0)
        cross += x[:, r_pos].T @ x[:, c_pos]
    if n < 3:
        raise InputError(f"a correlation baseline needs at least 3 cells, got {n}.")
    mean = total / n
    var = squares / n - mean**2
    cov = cross / n - np.outer(mean[r_pos], mean[c_pos])
    denom = np.sqrt(np.outer(var[r_pos], var[c_pos]))
    r = np.divide(cov, denom, out=np.zeros_like(cov), where=denom > 1e-12)
    return np.abs(np.clip(r, -1.0, 1.0))


def _metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import average_precision_score, roc_auc_score

    # Unscored pairs rank below every scored one.
    finite = np.isfinite(scores)
    low = scores[finite].min() - 1.0 if finite.any() else 0.0
    filled = np.where(finite, scores, low)
    return {
        "auroc": float(roc_auc_score(labels, filled)),
        "auprc": float(average_precision_score(labels, filled)),
    }


@doc_params(layer=DOC_LAYER)
def grn_score(
    adata: AnnData,
    prior: pd.DataFrame | str | os.PathLike,
    *,
    key: str | None = None,
    baseline: Literal["correlation"] | None = "correlation",
    layer: str | None = None,
    min_targets: int = 1,
    mod: str | None = None,
    inplace: bool = True,
) -> pd.DataFrame:
    """Score an inferred GRN against known regulator -> target interactions (AUROC, AUPRC).

    The evaluation runs over the genes the GRN scored (``uns[key]["genes"]``): every ordered
    pair ``(s, t)``, ``s != t``, of a regulator ``s`` of the prior with at least
    ``min_targets`` targets among those genes and any scored gene ``t`` is a candidate edge; the
    prior's interactions among them are the positives. The GRN's scores rank the candidates
    (all scores where :func:`~scfm_tools.tl.grn` kept them dense, else the top-k edges of
    ``varp[key]``; pairs without a score rank last), and so does the baseline, over the same
    pairs in the same run: the absolute Pearson correlation of log-normalised expression.
    Direction and sign of the prior (e.g. DoRothEA's ``mor``) are not used; a symmetric
    score (embedding, correlation) ranks ``s -> t`` as ``t -> s``.

    Parameters
    ----------
    adata
        The AnnData :func:`~scfm_tools.tl.grn` wrote into. A :class:`mudata.MuData` is accepted
        with ``mod=``.
    prior
        Known interactions: a DataFrame with columns ``source`` (or ``tf``) and ``target``, or
        the path of such a CSV file (``.gz`` too), e.g. DoRothEA
        (:func:`sft.datasets.dorothea <scfm_tools.datasets.dorothea>`; filter its
        ``confidence`` levels first if wanted). Other columns are ignored.
    key
        The GRN's key (``key_added`` of :func:`~scfm_tools.tl.grn`); ``None`` picks the only
        one in ``adata``.
    baseline
        ``"correlation"`` adds the co-expression baseline; ``None`` leaves it out.
    {layer}
        Expression for the baseline: raw counts (normalised to 10,000 per cell and log1p-
        transformed here, ``adata`` untouched) or log-normalised values.
    min_targets
        Regulators with fewer targets among the scored genes are left out.
    mod
        Modality of a MuData (default ``"rna"``).
    inplace
        Also store the table in ``adata.uns[key]["score"]``.

    Returns
    -------
    DataFrame with one row per method (the GRN's method, then ``"correlation"``) and columns
    ``auroc``, ``auprc``, ``n_edges`` (candidate pairs), ``n_positives``, ``n_regulators`` and
    ``prevalence`` (``n_positives / n_edges``, the AUPRC of a random ranking). With
    ``inplace``, also written to ``adata.uns[key]["score"]``, and the parameters to
    ``adata.uns[key]["score_params"]``.

    Raises
    ------
    InputError
        A prior without the needed columns, no prior interaction among the scored genes, or
        bad expression values for the baseline.
    """
    if baseline not in ("correlation", None):
        raise ValueError(f"baseline must be 'correlation' or None, got {baseline!r}.")
    if isinstance(min_targets, bool) or not isinstance(min_targets, int) or min_targets < 1:
        raise ValueError(f"min_targets must be a positive integer, got {min_targets!r}.")
    _, ad = resolve_adata(adata, mod=mod)
    key = resolve_grn_key(ad, key, "grn_score")
    stored = ad.uns[key]
    genes = pd.Index(np.asarray(stored["genes"]).astype(str))
    edges = _read_prior(prior)
    edges = edges[edges["source"].isin(genes) & edges["target"].isin(genes)]
    n_targets = edges["source"].value_counts()
    regulators = pd.Index(sorted(n_targets.index[n_targets >= min_targets]))
    edges = edges[edges["source"].isin(regulators)]
    if edges.empty:
        raise InputError(
            f"no interaction of the prior links two of the {len(genes):,} genes the GRN scored "
            f"(with at least {min_targets} target(s) per regulator): nothing to evaluate. Score "
            "more genes (e.g. more highly variable genes, or include the prior's regulators) or "
            "use a larger prior."
        )
    if baseline is not None:
        check_nonnegative(ad, layer)

    src = genes.get_indexer(regulators)
    labels = np.zeros((src.size, genes.size), dtype=bool)
    labels[regulators.get_indexer(edges["source"]), genes.get_indexer(edges["target"])] = True
    candidate = np.ones_like(labels)
    candidate[np.arange(src.size), src] = False  # no self pairs
    y = labels[candidate]
    if y.all():
        raise InputError(
            "every candidate pair is a prior interaction: there are no negatives to rank against."
        )

    rows = {str(stored["params"].get("method", key)): _model_scores(ad, key, genes)[src]}
    if baseline == "correlation":
        var_pos = ad.var_names.get_indexer(genes)
        rows["correlation"] = _abs_correlation(ad, layer, var_pos[src], var_pos)
    n_edges, n_pos = int(y.size), int(y.sum())
    table = pd.DataFrame(
        [
            {
                "method": name,
                **_metrics(scores[candidate], y),
                "n_edges": n_edges,
                "n_positives": n_pos,
                "n_regulators": int(src.size),
                "prevalence": n_pos / n_edges,
            }
            for name, scores in rows.items()
        ]
    ).set_index("method")
    if inplace:
        stored["score"] = table
        stored["score_params"] = params_record(
            prior=str(prior) if isinstance(prior, str | os.PathLike) else "DataFrame",
            baseline=baseline,
            layer=layer,
            min_targets=min_targets,
        )
    logger.info(
        "grn_score: %d candidate pairs, %d positives (%d regulators); %s",
        n_edges,
        n_pos,
        src.size,
        ", ".join(f"{m} AUPRC {v:.3f}" for m, v in table["auprc"].items()),
    )
    return table
