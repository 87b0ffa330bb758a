"""Cluster vectors (gene or cell embeddings): Leiden on their cosine nearest-neighbour graph."""

from __future__ import annotations

import numpy as np
from scipy import sparse

from .._progress import progress_bar

__all__ = ["EXACT_MAX", "cosine_knn", "knn_graph", "leiden_labels"]

#: Up to this many items, neighbours are found exactly (blockwise cosine similarities, a few
#: seconds at most); above it, approximately with pynndescent.
EXACT_MAX = 10_000
_BLOCK = 1024


def _unit_rows(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.where(norms > 0, norms, 1.0)


def cosine_knn(
    X: np.ndarray, n_neighbors: int, *, random_state: int = 0, rows: str = "genes"
) -> tuple[np.ndarray, np.ndarray]:
    """Find the ``n_neighbors`` nearest rows of each row by cosine similarity (itself excluded).

    Exact below :data:`EXACT_MAX` rows, pynndescent (seeded) above.

    Parameters
    ----------
    X
        ``(n, d)`` vectors.
    n_neighbors
        Neighbours per row (less than ``n``).
    random_state
        Seed of pynndescent.
    rows
        What the rows are, for the progress bar (``"genes"``, ``"cells"``).

    Returns
    -------
    ``(indices, similarities)``, each ``(n, n_neighbors)``, most similar first.
    """
    unit = _unit_rows(X)
    n = unit.shape[0]
    if not 0 < n_neighbors < n:
        raise ValueError(f"n_neighbors must lie in [1, {n - 1}], got {n_neighbors}.")
    if n > EXACT_MAX:
        from pynndescent import NNDescent

        index = NNDescent(
            unit, metric="cosine", n_neighbors=n_neighbors + 1, random_state=random_state
        )
        idx, dist = index.neighbor_graph
        sims = 1.0 - dist
        # Drop each row's own entry (usually first; not guaranteed with duplicated vectors).
        not_self = idx != np.arange(n)[:, None]
        order = np.argsort(~not_self, axis=1, kind="stable")[:, :n_neighbors]
        take = np.take_along_axis
        return take(idx, order, axis=1), take(sims, order, axis=1).astype(np.float32)
    indices = np.empty((n, n_neighbors), dtype=np.int64)
    sims = np.empty((n, n_neighbors), dtype=np.float32)
    with progress_bar(n, desc=f"neighbours of the {rows}", unit=rows) as bar:
        for lo in range(0, n, _BLOCK):
            hi = min(lo + _BLOCK, n)
            block = unit[lo:hi] @ unit.T
            block[np.arange(hi - lo), np.arange(lo, hi)] = -np.inf
            part = np.argpartition(-block, n_neighbors - 1, axis=1)[:, :n_neighbors]
            vals = np.take_along_axis(block, part, axis=1)
            # Ties broken by index, so that the graph does not depend on argpartition internals.
            order = np.lexsort((part, -vals))
            indices[lo:hi] = np.take_along_axis(part, order, axis=1)
            sims[lo:hi] = np.take_along_axis(vals, order, axis=1)
            bar.update(hi - lo)
    return indices, sims


def knn_graph(indices: np.ndarray, similarities: np.ndarray) -> sparse.csr_matrix:
    """Symmetric weighted graph: an edge wherever one row lists the other as a neighbour.

    The weight is the cosine similarity clipped at 0 (Leiden needs non-negative weights).
    """
    n, k = indices.shape
    rows = np.repeat(np.arange(n), k)
    weights = np.clip(similarities.ravel(), 0.0, None)
    graph = sparse.csr_matrix((weights, (rows, indices.ravel())), shape=(n, n))
    return graph.maximum(graph.T).tocsr()


def leiden_labels(graph: sparse.csr_matrix, *, resolution: float, random_state: int) -> np.ndarray:
    """Leiden communities (modularity with a resolution, leidenalg) of a weighted graph.

    Parameters
    ----------
    graph
        Symmetric ``(n, n)`` weights.
    resolution
        Higher values give more, smaller communities.
    random_state
        Seed of leidenalg; the same seed gives the same partition.

    Returns
    -------
    ``(n,)`` int64 community of each node (``0`` for the largest).
    """
    import igraph as ig
    import leidenalg

    upper = sparse.triu(graph, k=1).tocoo()
    g = ig.Graph(n=graph.shape[0], edges=np.column_stack([upper.row, upper.col]).tolist())
    g.es["weight"] = upper.data.tolist()
    partition = leidenalg.find_partition(
        g,
        leidenalg.RBConfigurationVertexPartition,
        weights="weight",
        resolution_parameter=float(resolution),
        seed=int(random_state),
        n_iterations=-1,
    )
    return np.asarray(partition.membership, dtype=np.int64)
