"""AnnData plumbing shared by pp/tl: matrix access in chunks, copy semantics, MuData, params."""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import sparse

from ._settings import settings

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "as_block",
    "csr_row_view",
    "describe_source",
    "get_matrix",
    "iter_chunks",
    "iter_row_blocks",
    "params_record",
    "report_rows",
    "resolve_adata",
    "resolve_seed",
    "row_blocks",
]

# Told (rows done, rows in all) after each block of every row pass; set by report_rows.
#: Cells read and processed at a time by default. Deep cells (~6,000 expressed genes) take about
#: 90 MiB of CSR per 2,000; at 10,000 a block and what is made of it reached ~2 GB of peak RSS
#: (benchmarks/results/out_of_core.md), and a smaller block costs no speed.
DEFAULT_CHUNK_SIZE = 2_000

_row_progress: ContextVar[Callable[[int, int], None] | None] = ContextVar(
    "sft_row_progress", default=None
)


def describe_source(layer: str | None) -> str:
    """Say in words which matrix a function reads (for error messages)."""
    return "adata.X" if layer is None else f"adata.layers[{layer!r}]"


def get_matrix(adata: AnnData, layer: str | None = None):
    """Return ``adata.X`` or ``adata.layers[layer]``, with a clear error for a missing layer."""
    if layer is None:
        return adata.X
    if layer not in adata.layers:
        raise KeyError(
            f"layer {layer!r} is not in adata.layers (present: {list(adata.layers.keys())}); "
            "pass one of those, or layer=None to use adata.X."
        )
    return adata.layers[layer]


def iter_chunks(
    adata: AnnData,
    layer: str | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    views: bool = False,
) -> Iterator[tuple[int, np.ndarray | sparse.csr_matrix]]:
    """Yield ``(start, block)`` over rows of the matrix, ``chunk_size`` cells at a time.

    Works on dense, sparse and backed (``backed="r"``) AnnData; a block is a dense array or a
    CSR matrix, never the whole matrix unless it fits in one chunk. ``views``: as in
    :func:`iter_row_blocks`.
    """
    yield from iter_row_blocks(get_matrix(adata, layer), chunk_size=chunk_size, views=views)


def as_block(rows) -> np.ndarray | sparse.csr_matrix:
    """Return a slice of rows as a dense array or a CSR matrix (what scipy and torch accept).

    float16 (dense only: scipy has no sparse float16) is widened to float32, one block at a
    time, so a half-precision matrix is never copied whole.
    """
    if isinstance(rows, sparse.csr_matrix):
        # as it is: re-wrapping copies a view's arrays (scipy's constructor prunes slices)
        return rows
    if sparse.issparse(rows):
        return sparse.csr_matrix(rows)
    rows = np.asarray(rows)
    return rows.astype(np.float32) if rows.dtype == np.float16 else rows


def csr_row_view(X, start: int, stop: int) -> sparse.csr_matrix | None:
    """Rows ``start:stop`` of an in-memory CSR matrix as a read-only CSR sharing its arrays.

    For passes that only read (input checks, building model inputs): a row slice of a scipy
    CSR matrix copies its values and indices, which on deep cells cost as much as the checks
    themselves. The view's arrays are flagged read-only, so a consumer that writes in place
    fails instead of changing the caller's matrix. Returns ``None`` where no view can be made
    (not a scipy CSR matrix, e.g. backed or dense; or index arrays of two integer types).
    """
    if not (sparse.issparse(X) and X.format == "csr") or X.indptr.dtype != X.indices.dtype:
        return None
    stop = min(stop, X.shape[0])
    lo, hi = int(X.indptr[start]), int(X.indptr[stop])
    data, indices = X.data[lo:hi], X.indices[lo:hi]
    data.flags.writeable = indices.flags.writeable = False
    view = sparse.csr_matrix((stop - start, X.shape[1]), dtype=X.dtype)
    # Set after construction: scipy's constructor copies a slice that is under half of its
    # base array (to let the base be freed), which is the copy a view is for.
    view.data, view.indices, view.indptr = data, indices, X.indptr[start : stop + 1] - lo
    return view


def iter_row_blocks(
    X, *, chunk_size: int = DEFAULT_CHUNK_SIZE, views: bool = False
) -> Iterator[tuple[int, np.ndarray | sparse.csr_matrix]]:
    """Yield ``(start, block)`` over the rows of a matrix, ``chunk_size`` rows at a time.

    ``X`` is anything whose row slices are dense arrays or sparse matrices (a numpy array, a
    scipy sparse matrix, a backed AnnData's ``X``); a block is :func:`as_block` of the slice.
    With ``views``, blocks of an in-memory CSR matrix are read-only views of it
    (:func:`csr_row_view`), for consumers that only read.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
    report = _row_progress.get()
    n_rows = X.shape[0]
    for start in range(0, n_rows, chunk_size):
        block = csr_row_view(X, start, start + chunk_size) if views else None
        if block is None:
            block = as_block(X[start : start + chunk_size])
        yield start, block
        # Dropped before the next read, so that two blocks are never held at once (consumers
        # drop theirs too: a loop variable holds the block until the next one has been read).
        del block
        if report is not None:  # the consumer is done with the block when it asks for the next
            report(min(start + chunk_size, n_rows), n_rows)


def row_blocks(
    X, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Iterator[np.ndarray | sparse.csr_matrix]:
    """Yield the blocks of :func:`iter_row_blocks` without their starts.

    Unlike a generator expression over it, holds no block while the next one is read.
    """
    return map(operator.itemgetter(1), iter_row_blocks(X, chunk_size=chunk_size))


@contextlib.contextmanager
def report_rows(callback: Callable[[int, int], None]) -> Iterator[None]:
    """Call ``callback(rows_done, n_rows)`` after each block of every row pass in this context.

    Each pass over a matrix (:func:`iter_row_blocks`: input checks, then the model) starts again
    from zero; a progress bar (the command line's) can follow them without the functions taking
    a callback argument.
    """
    token = _row_progress.set(callback)
    try:
        yield
    finally:
        _row_progress.reset(token)


def resolve_adata(data: Any, *, copy: bool = False, mod: str | None = None) -> tuple[Any, AnnData]:
    """Resolve the object a function was given into ``(returned_object, adata_to_work_on)``.

    ``data`` may be an AnnData or a MuData; for a MuData the modality ``mod`` (default ``"rna"``)
    is the AnnData worked on. With ``copy=True`` both are copies, so the caller's object is never
    touched.
    """
    from anndata import AnnData

    from ._errors import InputError

    if isinstance(data, AnnData):
        if mod is not None:
            raise ValueError("`mod` applies to MuData input only; drop it for an AnnData.")
        if data.isbacked and data.is_view:
            # anndata cannot add results to a view of a file; say so before any work is done
            raise InputError(
                "this is a view (a subset) of a backed AnnData, which cannot take results: "
                "load the subset with `adata = adata.to_memory()`, or pass the backed AnnData "
                "itself (results are added to it in memory, the file is not changed)."
            )
        if copy and data.isbacked:
            raise ValueError(
                "copy=True would load this backed AnnData into memory; drop copy= (results are "
                "added to the object in memory, the file on disk is not changed) or load it "
                "first with `adata.to_memory()`."
            )
        obj = data.copy() if copy else data
        return obj, obj
    if type(data).__name__ == "MuData" and hasattr(data, "mod"):
        mod = "rna" if mod is None else mod
        if mod not in data.mod:
            raise KeyError(
                f"modality {mod!r} is not in this MuData (present: {list(data.mod)}); "
                "pass the right one with `mod=`."
            )
        obj = data.copy() if copy else data
        return obj, obj.mod[mod]
    raise TypeError(
        f"expected an AnnData (or a MuData with `mod=`), got {type(data).__name__}. "
        "Read your data with `anndata.read_h5ad` or `scanpy.read_*`."
    )


def resolve_seed(random_state: int | None) -> int:
    """Return ``random_state``, or the global ``sft.settings.seed`` when it is ``None``."""
    if random_state is None:
        return settings.seed
    if isinstance(random_state, bool) or not isinstance(random_state, int | np.integer):
        raise TypeError(f"random_state must be an integer or None, got {random_state!r}.")
    return int(random_state)


def params_record(**params: Any) -> dict[str, Any]:
    """Build the ``uns[key]["params"]`` dict: the given params plus the package version.

    ``cpu_bf16: True`` is added while ``sft.settings.cpu_bf16`` is on, so that a result made
    with reduced precision says so.
    """
    from . import __version__

    record = {k: v for k, v in params.items() if v is not None}
    if settings.cpu_bf16:
        record["cpu_bf16"] = True
    record["sft_version"] = __version__
    return record
