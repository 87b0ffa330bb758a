"""Majority voting over clusters of the query, as CellTypist refines its per-cell predictions.

Cells are over-clustered (many small clusters: a given ``obs`` column, or Leiden on the
neighbour graph of the features the annotation read) and every cell of a cluster takes the
label most of the cluster's cells were given; a cluster whose top label holds less than
``min_prop`` of its cells is ``"Heterogeneous"``. Pure array code: ``sft.tl.annotate`` calls it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ._gene_graph import cosine_knn, knn_graph, leiden_labels

__all__ = ["HETEROGENEOUS", "majority_vote", "over_cluster", "over_clustering_resolution"]

#: Label of a cluster whose most common label is held by fewer than ``min_prop`` of its cells.
HETEROGENEOUS = "Heterogeneous"
# Neighbours per cell of the over-clustering graph (scanpy's default).
_N_NEIGHBORS = 15


def over_clustering_resolution(n_cells: int) -> float:
    """Leiden resolution for over-clustering ``n_cells`` cells: CellTypist's steps by size."""
    for limit, resolution in ((5_000, 5.0), (20_000, 10.0), (40_000, 15.0), (100_000, 20.0)):
        if n_cells < limit:
            return resolution
    return 25.0 if n_cells < 200_000 else 30.0


def over_cluster(features: np.ndarray, *, random_state: int = 0) -> np.ndarray:
    """Leiden over-clusters of cells on the cosine k-nearest-neighbour graph of ``features``.

    Parameters
    ----------
    features
        Cells x dimensions (an embedding, or principal components of the expression).
    random_state
        Seed of the neighbour search (large data) and of Leiden.

    Returns
    -------
    ``(n_cells,)`` cluster names (strings ``"0"``, ``"1"``, ...; ``"0"`` the largest).
    """
    features = np.asarray(features, dtype=np.float32)
    n = features.shape[0]
    if n < 3:
        return np.zeros(n, dtype=int).astype(str)
    indices, sims = cosine_knn(
        features, min(_N_NEIGHBORS, n - 1), random_state=random_state, rows="cells"
    )
    labels = leiden_labels(
        knn_graph(indices, sims),
        resolution=over_clustering_resolution(n),
        random_state=random_state,
    )
    return labels.astype(str)


def majority_vote(
    labels: np.ndarray, clusters: np.ndarray, *, min_prop: float = 0.0
) -> pd.Categorical:
    """Each cell's cluster's most common label (ties: the first in sorted order).

    Parameters
    ----------
    labels
        Per-cell labels.
    clusters
        Per-cell cluster (any hashable values; missing values are their own cluster).
    min_prop
        Share of its cluster's cells the top label must hold; below it the cluster is
        :data:`HETEROGENEOUS`.

    Returns
    -------
    Categorical labels, one per cell; the categories are those of ``labels`` that won somewhere,
    then :data:`HETEROGENEOUS` where used.
    """
    table = pd.DataFrame(
        {"label": np.asarray(labels, dtype=object), "cluster": np.asarray(clusters, dtype=object)}
    )
    table["cluster"] = table["cluster"].fillna("__missing__")
    counts = table.groupby(["cluster", "label"], sort=True).size().rename("n").reset_index()
    counts = counts.sort_values(["cluster", "n", "label"], ascending=[True, False, True])
    top = counts.drop_duplicates("cluster").set_index("cluster")
    share = top["n"] / table.groupby("cluster").size()
    winner = top["label"].where(share >= min_prop, HETEROGENEOUS)
    voted = table["cluster"].map(winner).to_numpy(dtype=object)
    categories = sorted(set(voted) - {HETEROGENEOUS}, key=str)
    if HETEROGENEOUS in set(voted):
        categories.append(HETEROGENEOUS)
    return pd.Categorical(voted, categories=categories)
