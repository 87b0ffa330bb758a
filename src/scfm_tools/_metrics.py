"""Embedding-quality figures shared by the quickstart and the benchmarks."""

from __future__ import annotations

import numpy as np

__all__ = ["embedding_scores"]


def embedding_scores(
    X: np.ndarray, labels, *, n_neighbors: int = 15, n_splits: int = 5, random_state: int = 0
) -> dict[str, float]:
    """Score how well an embedding separates known labels.

    Parameters
    ----------
    X
        Cells x dimensions embedding.
    labels
        One label per cell.
    n_neighbors
        Neighbours of the kNN classifier.
    n_splits
        Folds of the stratified cross-validation.
    random_state
        Seed of the fold assignment.

    Returns
    -------
    ``knn_accuracy`` and ``knn_macro_f1`` (kNN classifier, cross-validated, cosine distance),
    ``silhouette`` (cosine; -1 to 1) and ``chance_accuracy`` (share of the largest label).
    """
    from sklearn.metrics import f1_score, silhouette_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier

    labels = np.asarray(labels).astype(str)
    _, counts = np.unique(labels, return_counts=True)
    folds = StratifiedKFold(
        n_splits=min(n_splits, int(counts.min())), shuffle=True, random_state=random_state
    )
    knn = KNeighborsClassifier(n_neighbors=n_neighbors, metric="cosine")
    pred = cross_val_predict(knn, X, labels, cv=folds)
    return {
        "knn_accuracy": float(np.mean(pred == labels)),
        "knn_macro_f1": float(f1_score(labels, pred, average="macro")),
        "silhouette": float(silhouette_score(X, labels, metric="cosine")),
        "chance_accuracy": float(counts.max() / counts.sum()),
    }
