"""Input checks shared by every function.

Each check reads the data in chunks (so a backed or million-cell AnnData is checked in bounded
memory; each loop drops its block before the next is read, so one block is held at a time; an
in-memory CSR matrix is read through read-only views, not copies), raises :class:`InputError`
with what it found and what to do, and never writes to the AnnData it looks at.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import sparse

from ._anndata import DEFAULT_CHUNK_SIZE, as_block, describe_source, get_matrix, iter_chunks
from ._errors import InputError

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = [
    "InputError",
    "check_counts",
    "check_lognorm",
    "check_nonempty",
    "check_nonnegative",
    "check_numeric",
    "check_unique_names",
    "first_non_integer",
]


def _values(block) -> np.ndarray:
    return block.data if sparse.issparse(block) else np.asarray(block).ravel()


def _rows_with_nonzero(block) -> np.ndarray:
    """Whether each row of ``block`` holds a non-zero value, without a copy of the block."""
    if not sparse.issparse(block):
        return np.asarray(block).any(axis=1)
    block = as_block(block)  # CSR, without copying a view
    stored = np.diff(block.indptr) > 0
    has = np.zeros(block.shape[0], dtype=bool)
    if stored.any():
        # One segment per row that stores values (rows storing none lie between them, empty).
        has[stored] = np.logical_or.reduceat(block.data != 0, block.indptr[:-1][stored])
    return has


def check_numeric(adata: AnnData, layer: str | None = None) -> None:
    """Check that the matrix holds real numbers (not strings, objects or booleans)."""
    X = get_matrix(adata, layer)
    if X is None:
        raise InputError(
            f"{describe_source(layer)} is empty (None); put the expression matrix there or "
            "pass `layer=` naming the layer that holds it."
        )
    dtype = np.dtype(X.dtype)
    if dtype.kind not in "iuf":
        raise InputError(
            f"{describe_source(layer)} has dtype {dtype}, but a numeric matrix (integers or "
            "floats) is needed; convert it, e.g. `adata.X = adata.X.astype(np.float32)`."
        )


def _first_offender(adata: AnnData, layer, start: int, block, mask_fn) -> str:
    """Name the cell and gene of the first value in ``block`` flagged by ``mask_fn``."""
    if sparse.issparse(block):
        coo = sparse.coo_matrix(block)
        hit = np.flatnonzero(mask_fn(coo.data))[0]
        row, col, val = coo.row[hit], coo.col[hit], coo.data[hit]
    else:
        arr = np.asarray(block)
        row, col = np.argwhere(mask_fn(arr))[0]
        val = arr[row, col]
    return f"{val!r} at cell {adata.obs_names[start + row]!r}, gene {adata.var_names[col]!r}"


def _non_integer(v: np.ndarray) -> np.ndarray:
    return v != np.round(v)


def first_non_integer(
    adata: AnnData, layer: str | None = None, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> str | None:
    """Describe the first non-integer value (cell, gene, value), or ``None`` if all are integers."""
    for start, block in iter_chunks(adata, layer, chunk_size=chunk_size, views=True):
        vals = _values(block)
        if vals.dtype.kind == "f" and _non_integer(vals).any():
            return _first_offender(adata, layer, start, block, _non_integer)
        del block, vals
    return None


def check_counts(
    adata: AnnData, layer: str | None = None, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> None:
    """Check that the matrix holds raw counts: finite, non-negative integers.

    Raises
    ------
    InputError
        On NaN/inf, negative or non-integer values, naming the first offending cell and gene.
    """
    check_nonnegative(adata, layer, chunk_size=chunk_size)
    bad = first_non_integer(adata, layer, chunk_size=chunk_size)
    if bad is not None:
        raise InputError(
            f"{describe_source(layer)} contains non-integer values ({bad}); this function needs "
            "raw integer counts, but these look normalised or log-transformed. Pass the layer "
            "that holds the counts with `layer=` (e.g. `layer='counts'`), or keep a copy of the "
            "counts before normalising (`adata.layers['counts'] = adata.X.copy()`)."
        )


def check_nonnegative(
    adata: AnnData, layer: str | None = None, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> None:
    """Check that the matrix holds finite, non-negative numbers (counts or normalised values).

    Raises
    ------
    InputError
        On NaN/inf or negative values, naming the first offending cell and gene.
    """
    check_numeric(adata, layer)
    where = describe_source(layer)
    for start, block in iter_chunks(adata, layer, chunk_size=chunk_size, views=True):
        vals = _values(block)
        if vals.dtype.kind == "f" and not np.isfinite(vals).all():
            bad = _first_offender(adata, layer, start, block, lambda v: ~np.isfinite(v))
            raise InputError(
                f"{where} contains NaN or infinite values ({bad}); fix or drop those cells first."
            )
        if (vals < 0).any():
            bad = _first_offender(adata, layer, start, block, lambda v: v < 0)
            raise InputError(
                f"{where} contains negative values ({bad}); non-negative expression (counts, or "
                "normalised/log1p values, not scaled or centred ones) is needed. Pass the layer "
                "that holds it with `layer=`."
            )
        del block, vals


def check_lognorm(
    adata: AnnData, layer: str | None = None, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> None:
    """Check that the matrix holds log-normalised values: finite, non-negative, not raw counts.

    Raises
    ------
    InputError
        On NaN/inf or negative values, or when every value is an integer (raw counts).
    """
    check_numeric(adata, layer)
    where = describe_source(layer)
    all_integer = True
    vmax = 0.0
    for start, block in iter_chunks(adata, layer, chunk_size=chunk_size, views=True):
        vals = _values(block)
        if vals.dtype.kind == "f" and not np.isfinite(vals).all():
            bad = _first_offender(adata, layer, start, block, lambda v: ~np.isfinite(v))
            raise InputError(f"{where} contains NaN or infinite values ({bad}).")
        if (vals < 0).any():
            bad = _first_offender(adata, layer, start, block, lambda v: v < 0)
            raise InputError(
                f"{where} contains negative values ({bad}); log-normalised expression "
                "(`sc.pp.normalize_total` then `sc.pp.log1p`, not scaled) is needed."
            )
        if vals.size:
            vmax = max(vmax, float(vals.max()))
            if all_integer and not np.array_equal(vals, np.round(vals)):
                all_integer = False
        del block, vals
    if all_integer and vmax > 0:
        raise InputError(
            f"{where} holds only integers (max {vmax:g}): these look like raw counts, but "
            "log-normalised values are needed. Run `sc.pp.normalize_total(adata)` and "
            "`sc.pp.log1p(adata)` first (keep the counts in a layer), or pass the layer that holds "
            "log-normalised values with `layer=`."
        )


def check_nonempty(
    adata: AnnData,
    layer: str | None = None,
    *,
    cells: bool = True,
    genes: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> None:
    """Check that the AnnData has cells and genes, and that no cell (or gene) is all zeros.

    Parameters
    ----------
    adata
        The data to check.
    layer
        Layer to read, or ``None`` for ``.X``.
    cells
        Refuse cells whose values are all zero.
    genes
        Refuse genes whose values are all zero.
    chunk_size
        Cells read at a time.
    """
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise InputError(
            f"the AnnData has shape {adata.shape}: at least one cell and one gene are needed."
        )
    where = describe_source(layer)
    gene_totals = np.zeros(adata.n_vars)
    for start, block in iter_chunks(adata, layer, chunk_size=chunk_size, views=True):
        if cells:
            empty = np.flatnonzero(~_rows_with_nonzero(block))
            if empty.size:
                names = list(adata.obs_names[start + empty[:3]])
                raise InputError(
                    f"{where} has empty cells (all values zero), e.g. {names}; remove them first, "
                    "e.g. `sc.pp.filter_cells(adata, min_counts=1)`."
                )
        if genes:
            gene_totals += np.asarray(abs(block).sum(axis=0)).ravel()
        del block
    if genes and (gene_totals == 0).any():
        names = list(adata.var_names[np.flatnonzero(gene_totals == 0)[:3]])
        raise InputError(
            f"{where} has genes that are zero in every cell, e.g. {names}; remove them first, "
            "e.g. `sc.pp.filter_genes(adata, min_cells=1)`."
        )


def check_unique_names(names: pd.Index | pd.Series, what: str = "var_names") -> None:
    """Refuse duplicated gene (or cell) names, listing a few of them."""
    index = pd.Index(names)
    if index.has_duplicates:
        dups = list(index[index.duplicated()].unique()[:5])
        raise InputError(
            f"{what} contains duplicated names, e.g. {dups}; make them unique first, "
            "e.g. with `adata.var_names_make_unique()`, or aggregate the duplicated genes."
        )
