"""Turn a cells x genes matrix into CellPLM sequences (the cells of one sample, in chunks).

As the official ``TranscriptomicDataset`` + ``CellEmbeddingPipeline``: one sequence per value of
the batch column, in :class:`sklearn.preprocessing.LabelEncoder` order (sorted values), cells in
data order within it; or all cells in one sequence without a batch column. A sequence longer
than ``max_cells`` is cut into consecutive chunks of ``max_cells`` cells (the official
``inference_config['batch_size']``); since cells attend to each other, chunking changes the
result.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from scipy import sparse

from ..._anndata import as_block
from ..._validation import InputError

if TYPE_CHECKING:
    from anndata import AnnData

    from ...pp._match_genes import GeneMatch

__all__ = ["batch_codes", "iter_sequences", "sequence_rows", "to_model_genes"]


def batch_codes(adata: AnnData, batch_key: str | None) -> tuple[np.ndarray, list]:
    """Code each cell by its batch, in LabelEncoder order (sorted distinct values).

    Parameters
    ----------
    adata
        The data.
    batch_key
        Column of ``adata.obs`` naming each cell's sample; ``None`` puts all cells in one.

    Returns
    -------
    ``(codes, values)``: int64 code per cell and the batch value of each code.
    """
    if batch_key is None:
        return np.zeros(adata.n_obs, dtype=np.int64), [None]
    if batch_key not in adata.obs.columns:
        raise KeyError(
            f"batch_key {batch_key!r} is not a column of adata.obs (columns: "
            f"{list(adata.obs.columns)}); pass the column that names each cell's sample, or "
            "batch_key=None to treat all cells as one sample."
        )
    values = adata.obs[batch_key]
    missing = pd.isna(values).to_numpy()
    if missing.any():
        names = list(adata.obs_names[missing][:3])
        raise InputError(
            f"adata.obs[{batch_key!r}] is missing for {int(missing.sum())} cells, e.g. {names}; "
            "give every cell a batch (or drop those cells)."
        )
    raw = np.asarray(
        values.astype(object) if isinstance(values.dtype, pd.CategoricalDtype) else values
    )
    try:
        uniques, codes = np.unique(raw, return_inverse=True)
    except TypeError:  # mixed types cannot be sorted: compare them as text
        uniques, codes = np.unique(raw.astype(str), return_inverse=True)
    return codes.astype(np.int64), list(uniques)


def sequence_rows(codes: np.ndarray, max_cells: int | None = None) -> list[np.ndarray]:
    """Rows of each sequence: per batch code in order, cells in data order, chunked.

    Parameters
    ----------
    codes
        Batch code per cell (from :func:`batch_codes`).
    max_cells
        Most cells per sequence; ``None`` keeps each batch whole.

    Returns
    -------
    A list of ascending row-index arrays, in the order the official pipeline runs them.
    """
    if max_cells is not None and (isinstance(max_cells, bool) or int(max_cells) < 1):
        raise ValueError(f"max_length (cells per sequence) must be positive, got {max_cells!r}.")
    out = []
    for code in np.unique(codes):
        rows = np.flatnonzero(codes == code)
        step = len(rows) if max_cells is None else int(max_cells)
        out.extend(rows[i : i + step] for i in range(0, len(rows), step))
    return out


def to_model_genes(block, match: GeneMatch, n_genes: int) -> torch.Tensor:
    """Put the counts of the matched genes in the model's gene order (torch sparse COO).

    Parameters
    ----------
    block
        Cells x query genes (dense or sparse).
    match
        The query genes' match to the model's gene list.
    n_genes
        Number of model genes.

    Returns
    -------
    A coalesced float32 sparse tensor ``(n_cells, n_genes)``; unmatched genes are dropped.
    """
    cols = np.flatnonzero(match.matched)
    ids = np.asarray(match.index, dtype=np.int64)[cols]
    # columns in the model's gene order: the COO indices then come out sorted (row-major), so
    # the tensor is coalesced as built unless two columns name the same model gene
    order = np.argsort(ids, kind="stable")
    cols, ids = cols[order], ids[order]
    # column selection on CSC and back to CSR leaves each row's indices sorted (about twice
    # as fast as sorting them); sort_indices() then only checks the flag
    sub = sparse.csr_matrix(as_block(block)).tocsc()[:, cols].tocsr()
    sub.sort_indices()
    sub = sub.tocoo()
    index = torch.from_numpy(np.vstack([sub.row.astype(np.int64), ids[sub.col]]))
    values = torch.from_numpy(np.asarray(sub.data, dtype=np.float32))
    unique = ids.size < 2 or bool((np.diff(ids) > 0).all())
    # scipy built the indices, so torch's (costly) invariant checks are not needed
    shape = (sub.shape[0], n_genes)
    out = torch.sparse_coo_tensor(index, values, shape, check_invariants=False, is_coalesced=unique)
    return out if unique else out.coalesce()


def iter_sequences(
    X, rows_list: Sequence[np.ndarray], match: GeneMatch, n_genes: int
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Yield ``(rows, counts)`` per sequence, reading only that sequence's rows of ``X``."""
    for rows in rows_list:
        yield rows, to_model_genes(X[rows], match, n_genes)
