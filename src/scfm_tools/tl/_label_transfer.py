"""Label transfer on cell embeddings: a labelled reference's cell types carried to query cells.

Pure array code (no model, no AnnData writes): ``sft.tl.annotate`` embeds the reference and the
query with the same model, then calls :func:`transfer_labels`; the labels are read off the
probabilities by :func:`scfm_tools._labels.labels_from_proba`, as for scBERT's classifier.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd

from .._progress import progress_bar

__all__ = ["knn_proba", "logreg_proba", "transfer_labels"]

Method = Literal["knn", "logreg"]
# Cosine distance below which two cells count as identical: caps the 1/d vote weight.
_MIN_DISTANCE = 1e-12
# Query cells searched at a time (bounds the distance blocks; steps of the progress bar).
_QUERY_BLOCK = 10_000


def _unit_rows(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.where(norms > 0, norms, 1.0)


def knn_proba(
    reference: np.ndarray,
    labels: np.ndarray,
    query: np.ndarray,
    *,
    n_neighbors: int = 15,
) -> pd.DataFrame:
    """Distance-weighted kNN vote shares of each class (cosine distance on the embeddings).

    Each query cell's ``n_neighbors`` nearest reference cells vote for their label with weight
    ``1 / d`` (``d``: cosine distance); a class's probability is its share of the votes.

    Parameters
    ----------
    reference
        Reference embeddings, cells x dimensions.
    labels
        Cell type of each reference cell.
    query
        Query embeddings, cells x the same dimensions.
    n_neighbors
        Neighbours voting (at most the number of reference cells).

    Returns
    -------
    Query cells x classes (sorted) vote shares; rows sum to 1.
    """
    from sklearn.neighbors import NearestNeighbors

    classes, codes = np.unique(labels, return_inverse=True)
    k = min(int(n_neighbors), len(labels))
    # On unit vectors the Euclidean distance orders neighbours as the cosine one does, and
    # sklearn's exact brute-force Euclidean search is chunked, BLAS-backed and parallel.
    index = NearestNeighbors(n_neighbors=k, algorithm="brute", metric="euclidean")
    index.fit(_unit_rows(reference))
    votes = np.zeros((len(query), len(classes)), dtype=np.float64)
    with progress_bar(len(query), desc="kNN label transfer") as bar:
        for lo in range(0, len(query), _QUERY_BLOCK):
            dist, idx = index.kneighbors(_unit_rows(query[lo : lo + _QUERY_BLOCK]))
            cosine = np.square(dist, dtype=np.float64) / 2.0
            weights = 1.0 / np.maximum(cosine, _MIN_DISTANCE)
            rows = lo + np.repeat(np.arange(len(idx)), k)
            np.add.at(votes, (rows, codes[idx].ravel()), weights.ravel())
            bar.update(len(idx))
    votes /= votes.sum(axis=1, keepdims=True)
    return pd.DataFrame(votes.astype(np.float32), columns=pd.Index(classes, dtype=object))


def logreg_proba(
    reference: np.ndarray,
    labels: np.ndarray,
    query: np.ndarray,
    *,
    class_weight: Literal["balanced"] | None = None,
    standardize: bool = True,
    random_state: int = 0,
) -> pd.DataFrame:
    """Class probabilities from a multinomial logistic regression fitted on the reference.

    Embedding dimensions are standardised on the reference first: L2-normalised embeddings
    have small per-dimension spread, against which the default L2 penalty would dominate.

    Parameters
    ----------
    reference
        Reference features (embeddings, or a sparse matrix of expression), cells x features.
    labels
        Cell type of each reference cell.
    query
        Query features, cells x the same features.
    class_weight
        ``"balanced"`` weighs each class by the inverse of its frequency; ``None``: equal.
    standardize
        Standardise each feature on the reference (dense features only); ``False`` fits the
        features as they are (log-normalised expression).
    random_state
        Seed of the solver.

    Returns
    -------
    Query cells x classes (sorted) probabilities.
    """
    from scipy import sparse
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def features(X):
        return X.astype(np.float64) if sparse.issparse(X) else np.asarray(X, dtype=np.float64)

    logreg = LogisticRegression(max_iter=1000, class_weight=class_weight, random_state=random_state)
    head = make_pipeline(StandardScaler(), logreg) if standardize else logreg
    head.fit(features(reference), labels)
    proba = head.predict_proba(features(query))
    classes = head.classes_
    return pd.DataFrame(proba.astype(np.float32), columns=pd.Index(classes, dtype=object))


def transfer_labels(
    method: Method,
    reference: np.ndarray,
    labels: np.ndarray,
    query: np.ndarray,
    *,
    n_neighbors: int = 15,
    class_weight: Literal["balanced"] | None = None,
    standardize: bool = True,
    random_state: int = 0,
) -> pd.DataFrame:
    """Class probabilities of the query cells by ``method`` (``"knn"`` or ``"logreg"``).

    ``standardize`` applies to ``"logreg"`` (see :func:`logreg_proba`).
    """
    if reference.shape[1] != query.shape[1]:
        raise ValueError(
            f"the reference embeddings have {reference.shape[1]} dimensions, the query's "
            f"{query.shape[1]}: both must come from the same model."
        )
    if method == "knn":
        return knn_proba(reference, labels, query, n_neighbors=n_neighbors)
    if method == "logreg":
        return logreg_proba(
            reference,
            labels,
            query,
            class_weight=class_weight,
            standardize=standardize,
            random_state=random_state,
        )
    raise ValueError(f"method must be 'knn' or 'logreg', got {method!r}.")
