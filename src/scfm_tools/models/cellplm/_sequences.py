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

from ..._anndata import as_block, csr_row_view
from ..._validation import InputError
from ._module import DENSE_ROWS

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


def to_model_genes(
    block, match: GeneMatch, n_genes: int, *, dense_from: float | None = None
) -> torch.Tensor:
    """Put the counts of the matched genes in the model's gene order.

    Parameters
    ----------
    block
        Cells x query genes (dense or sparse).
    match
        The query genes' match to the model's gene list.
    n_genes
        Number of model genes.
    dense_from
        Return a dense tensor when the block's stored entries fill at least this share of the
        ``(n_cells, n_genes)`` output (an upper bound: unmatched genes count); ``None``: always
        sparse. Building a sparse tensor of tens of millions of entries (deep plate-based
        cells) costs more than the model's first layer; a dense one is no larger than the
        sparse one from a share of about 0.2 (4 bytes a value against 16 of index and 4 of value).

    Returns
    -------
    A float32 tensor ``(n_cells, n_genes)``: coalesced sparse COO, or dense (see
    ``dense_from``); unmatched genes are dropped.
    """
    cols = np.flatnonzero(match.matched)
    ids = np.asarray(match.index, dtype=np.int64)[cols]
    csr = as_block(block)
    if not sparse.issparse(csr):
        csr = sparse.csr_matrix(csr)
    shape = (csr.shape[0], n_genes)
    unique = np.unique(ids).size == ids.size  # else two query columns name one model gene
    if dense_from is not None and csr.nnz >= dense_from * shape[0] * shape[1]:
        return _dense_model_genes(csr, cols, ids, n_genes, unique=unique)
    index, values = _sorted_entries(csr, cols, ids)
    # scipy built the indices, so torch's (costly) invariant checks are not needed
    out = torch.sparse_coo_tensor(
        torch.from_numpy(index),
        torch.from_numpy(values),
        shape,
        check_invariants=False,
        is_coalesced=unique,
    )
    return out if unique else out.coalesce()


def _dense_model_genes(
    csr: sparse.csr_matrix, cols: np.ndarray, ids: np.ndarray, n_genes: int, *, unique: bool
) -> torch.Tensor:
    """Dense ``(n_cells, n_genes)`` float32 counts of the matched columns, summed per model gene.

    ``unique``: no two of ``ids`` are the same (the columns can then be assigned, not added).
    """
    out = np.zeros((csr.shape[0], n_genes), dtype=np.float32)
    for first in range(0, csr.shape[0], DENSE_ROWS):
        rows = csr[first : first + DENSE_ROWS].toarray()[:, cols].astype(np.float32, copy=False)
        if unique:
            out[first : first + DENSE_ROWS, ids] = rows
        else:  # two query columns naming one model gene add up, as in the sparse output
            np.add.at(out[first : first + DENSE_ROWS].T, ids, rows.T)
    return torch.from_numpy(out)


def _sorted_entries(
    csr: sparse.csr_matrix, cols: np.ndarray, ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """COO index and values of the matched columns, each row's entries in model gene order."""
    # columns in the model's gene order: the entries then come out row-major and sorted
    order = np.argsort(ids, kind="stable")
    # column selection on CSC and back to CSR leaves each row's indices sorted (about twice
    # as fast as sorting them); sort_indices() then only checks the flag
    sub = csr.tocsc()[:, cols[order]].tocsr()
    sub.sort_indices()
    return _coo_arrays(sub.indptr, ids[order][sub.indices], sub.data)


def _coo_arrays(
    indptr: np.ndarray, genes: np.ndarray, data: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(2, nnz)`` int64 index (row, model gene) and float32 values of CSR-ordered entries."""
    index = np.empty((2, genes.size), dtype=np.int64)
    index[0] = np.repeat(np.arange(len(indptr) - 1, dtype=np.int64), np.diff(indptr))
    index[1] = genes
    return index, np.asarray(data, dtype=np.float32)


def iter_sequences(
    X,
    rows_list: Sequence[np.ndarray],
    match: GeneMatch,
    n_genes: int,
    *,
    dense_from: float | None = None,
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Yield ``(rows, counts)`` per sequence, reading only that sequence's rows of ``X``.

    Consecutive rows of an in-memory CSR matrix are read through a view, not a copy.
    ``dense_from``: as in :func:`to_model_genes`.
    """
    for rows in rows_list:
        contiguous = rows.size > 0 and rows[-1] - rows[0] + 1 == rows.size
        block = csr_row_view(X, int(rows[0]), int(rows[-1]) + 1) if contiguous else None
        block = X[rows] if block is None else block
        yield rows, to_model_genes(block, match, n_genes, dense_from=dense_from)
