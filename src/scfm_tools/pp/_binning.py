"""Expression-value binning as the models' tokenizers expect it (scGPT and scBERT flavors)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from scipy import sparse

from .._anndata import (
    DEFAULT_CHUNK_SIZE,
    describe_source,
    get_matrix,
    iter_chunks,
    params_record,
    resolve_adata,
    resolve_seed,
)
from .._cell_rng import (
    STREAM_TIES,
    RandomStream,
    check_random_stream,
    gene_hashes,
    gene_set_draws,
)
from .._docs import (
    DOC_ADATA,
    DOC_CHUNK_SIZE,
    DOC_COPY,
    DOC_LAYER,
    DOC_RANDOM_STREAM,
    doc_params,
)
from .._validation import InputError, check_counts, check_nonnegative

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["bin_values", "quantile_bin", "quantile_bin_csr", "scbert_bins", "scbert_log2_norm"]

logger = logging.getLogger("scfm_tools")

Flavor = Literal["scgpt", "scbert"]

_DEFAULT_N_BINS = {"scgpt": 51, "scbert": 5}
_DEFAULT_KEYS = {"scgpt": "X_binned", "scbert": "X_scbert_bins"}
_UNS_KEY = "bin_values"
# Bins are small non-negative integers; a signed type leaves room for the models' negative
# special values (scGPT pads with -2 and masks with -1) without a cast.
BIN_DTYPE = np.int16
_MAX_BINS = int(np.iinfo(BIN_DTYPE).max)
# scBERT's preprocess.py: sc.pp.normalize_total(target_sum=1e4), then sc.pp.log1p(base=2).
_SCBERT_TARGET_SUM = 1e4


# --------------------------------------------------------------------------------------------
# scGPT: per-cell quantile binning with random tie spreading
# --------------------------------------------------------------------------------------------
def _row_quantiles(data: np.ndarray, indptr: np.ndarray, n_edges: int) -> np.ndarray:
    """``np.quantile(row_values, linspace(0, 1, n_edges))`` for every CSR row, as rows.

    Rows with the same number of values are stacked and handed to :func:`numpy.quantile` in one
    call; along an axis it runs the same code as on one row, so the edges are bit-identical to
    the official per-row call. Rows without values get zeros.
    """
    q = np.linspace(0, 1, n_edges)
    lengths = np.diff(indptr)
    edges = np.zeros((lengths.size, n_edges), dtype=np.float64)
    for n in np.unique(lengths[lengths > 0]):
        rows = np.flatnonzero(lengths == n)
        values = data[indptr[rows][:, None] + np.arange(n)]
        edges[rows] = np.quantile(values, q, axis=1).T
    return edges


def quantile_bin_csr(
    data: np.ndarray,
    indptr: np.ndarray,
    n_bins: int,
    ties: np.ndarray | Callable[[np.ndarray], np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """Bin the non-zero values of CSR rows (``data`` in row order, no stored zeros).

    Returns the bins of ``data`` and the ``(n_rows, n_bins - 1)`` quantile edges. ``ties`` holds
    one uniform draw in ``[0, 1)`` per value, or gives the draws of the values at the positions
    it is called with (only values equal to several edges need one); a value equal to several
    edges takes the bin the draw picks among them, as ``scgpt.preprocess._digitize`` does with
    ``np.random.rand``.
    """
    edges = _row_quantiles(data, indptr, n_bins - 1)
    left = np.empty(data.size, dtype=np.int64)
    right = np.empty(data.size, dtype=np.int64)
    # Per-row digitize beats one vectorised search over (row, value) keys: 50 edges per row
    # make each search short, and the loop overhead is a few microseconds per cell.
    for row in np.flatnonzero(np.diff(indptr)):
        sl = slice(indptr[row], indptr[row + 1])
        left[sl] = np.digitize(data[sl], edges[row])
        right[sl] = np.digitize(data[sl], edges[row], right=True)
    # A value equal to several edges gets a uniform draw among the bins those edges span; the
    # others keep their one bin (the official formula gives it too: the span is 0).
    draws_at = ties if callable(ties) else np.asarray(ties).__getitem__
    digits = left.astype(BIN_DTYPE)
    tied = np.flatnonzero(right != left)
    digits[tied] = np.ceil(draws_at(tied) * (right[tied] - left[tied]) + left[tied])
    return digits, edges


def _tie_draws(draws: Any, n: int) -> np.ndarray:
    """``n`` tie-breaking draws: taken from a legacy random state, or checked when given."""
    if isinstance(draws, np.random.RandomState):
        # One np.random.rand(len(row)) per row, as the official code; drawing them all at once
        # gives the same numbers.
        return draws.random_sample(n)
    if isinstance(draws, np.ndarray):
        if draws.shape != (n,):
            raise ValueError(
                f"expected {n} tie-breaking draws (one per non-zero value), got "
                f"shape {draws.shape}."
            )
        return draws
    raise TypeError(
        "draws must be a legacy numpy.random.RandomState (its stream is what the official "
        "scGPT binning draws from under np.random.seed) or an array of the draws themselves, "
        f"got {type(draws).__name__}."
    )


def _check_n_bins(n_bins: Any, minimum: int) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int | np.integer):
        raise TypeError(f"n_bins must be an integer, got {n_bins!r}.")
    if not minimum <= n_bins <= _MAX_BINS:
        raise ValueError(f"n_bins must be between {minimum} and {_MAX_BINS}, got {n_bins}.")
    return int(n_bins)


def quantile_bin(
    values: np.ndarray, n_bins: int, draws: np.random.RandomState | np.ndarray
) -> np.ndarray:
    """Bin one cell's values into ``0..n_bins-1`` exactly as scGPT's ``preprocess.binning``.

    Zeros stay 0; the non-zero values are digitized against the ``n_bins - 1`` quantiles of the
    non-zero values (``np.quantile(nonzero, np.linspace(0, 1, n_bins - 1))``), so they land in
    ``1..n_bins-1``; a value equal to several edges gets a uniform random bin among them. With
    ``draws = np.random.RandomState(s)`` the result equals the official ``binning(values,
    n_bins)`` run right after ``np.random.seed(s)``; calling it on cell after cell with the same
    state reproduces the official loop over cells. An all-zero input draws nothing.

    Parameters
    ----------
    values
        One cell's non-negative expression values (1-D), e.g. the kept non-zero genes.
    n_bins
        Number of bins including the zero bin (scGPT uses 51).
    draws
        Legacy random state the tie-breaking draws come from (one draw per non-zero value, the
        official stream), or those draws themselves (one per non-zero value, in ``[0, 1)``, e.g.
        from the cell's own stream).

    Returns
    -------
    The bins, an ``int16`` array of the same length as ``values``.
    """
    n_bins = _check_n_bins(n_bins, 2)
    values = np.asarray(values)
    if values.ndim != 1:
        raise ValueError(f"values must be 1-D (one cell), got shape {values.shape}.")
    if values.size and values.min() < 0:
        raise ValueError("values must be non-negative for scGPT binning.")
    nonzero = np.flatnonzero(values)
    ties = _tie_draws(draws, nonzero.size)
    out = np.zeros(values.shape, dtype=BIN_DTYPE)
    digits, _ = quantile_bin_csr(values[nonzero], np.array([0, nonzero.size]), n_bins, ties)
    out[nonzero] = digits
    return out


def _canonical_csr(block) -> sparse.csr_matrix:
    """CSR with sorted indices and no stored zeros, without touching ``block``'s arrays.

    The official code draws its random numbers in the order of ``row.nonzero()``, i.e. by gene
    within a cell, so the column order of the stored values matters.
    """
    if not sparse.issparse(block):
        return sparse.csr_matrix(block)
    csr = sparse.csr_matrix(block)
    if not csr.has_canonical_format or (csr.data == 0).any():
        csr = csr.copy()
        csr.sum_duplicates()
        csr.eliminate_zeros()
    return csr


def _scgpt_chunk(
    csr: sparse.csr_matrix, n_bins: int, seed: int, rng: np.random.RandomState | None
) -> tuple[sparse.csr_matrix, np.ndarray]:
    """Bin a chunk: ties from the official stream ``rng``, or per cell (``rng=None``).

    Per cell, a value's draw is read at its column in the stream keyed by ``seed`` and the
    cell's non-zero columns (the bins depend on nothing else than these and the values' order).
    """
    if rng is None:
        draws = gene_set_draws(seed, csr.indptr, csr.indices, gene_hashes(csr.indices))
        ties = functools.partial(draws, STREAM_TIES)
    else:
        ties = _tie_draws(rng, csr.nnz)
    digits, edges = quantile_bin_csr(csr.data, csr.indptr, n_bins, ties)
    binned = sparse.csr_matrix((digits, csr.indices.copy(), csr.indptr.copy()), shape=csr.shape)
    # The official Preprocessor keeps [0, edges...] per cell, and n_bins zeros for empty cells.
    full_edges = np.zeros((csr.shape[0], n_bins), dtype=np.float64)
    full_edges[:, 1:] = edges
    return binned, full_edges


# --------------------------------------------------------------------------------------------
# scBERT: log2 of depth-normalised counts, capped and truncated
# --------------------------------------------------------------------------------------------
def scbert_log2_norm(csr: sparse.csr_matrix) -> np.ndarray:
    """``log2(1 + x / total * 1e4)`` of the stored values, with scanpy's float arithmetic.

    scBERT runs ``sc.pp.normalize_total(target_sum=1e4)`` and ``sc.pp.log1p(base=2)`` on a
    float32 matrix; the same operations in the same dtypes give bit-identical values, which
    matters because the tokens truncate them. Totals are over the columns of ``csr``.

    Parameters
    ----------
    csr
        Cells x genes raw counts, CSR without stored zeros (float64 input is kept in float64,
        anything else is computed in float32).

    Returns
    -------
    The log2-normalised values, aligned with ``csr.data``.
    """
    work = np.float64 if csr.dtype == np.float64 else np.float32
    lengths = np.diff(csr.indptr)
    rows = np.repeat(np.arange(csr.shape[0]), lengths)
    totals = np.bincount(rows, weights=csr.data, minlength=csr.shape[0]).astype(work)
    factor = totals / _SCBERT_TARGET_SUM
    factor[factor == 0] = 1  # scanpy leaves empty cells at zero instead of dividing by 0
    x = csr.data.astype(work) / np.repeat(factor, lengths)
    np.log1p(x, out=x)
    np.divide(x, np.log(2), out=x)
    return x


def scbert_bins(csr: sparse.csr_matrix, n_bins: int = 5) -> sparse.csr_matrix:
    """Turn counts into scBERT tokens: ``floor(min(log2(1 + x / total * 1e4), n_bins))``.

    The matrix-level core of ``bin_values(flavor="scbert")``, for tokenizers that have already
    put the cells on the model's genes.

    Parameters
    ----------
    csr
        Cells x genes raw counts, CSR without stored zeros.
    n_bins
        scBERT's ``bin_num`` (tokens ``0..n_bins``).

    Returns
    -------
    ``int16`` CSR tokens of the same shape (zeros not stored).
    """
    values = scbert_log2_norm(csr)
    # scBERT: x[x > bin_num] = bin_num, then .long(), which truncates toward zero.
    tokens = np.minimum(values, n_bins).astype(BIN_DTYPE)
    out = sparse.csr_matrix((tokens, csr.indices.copy(), csr.indptr.copy()), shape=csr.shape)
    out.eliminate_zeros()
    return out


# --------------------------------------------------------------------------------------------
# AnnData entry point
# --------------------------------------------------------------------------------------------
def _is_sparse_source(X) -> bool:
    from anndata.abc import CSCDataset, CSRDataset

    return sparse.issparse(X) or isinstance(X, CSRDataset | CSCDataset)


@doc_params(
    adata=DOC_ADATA,
    layer=DOC_LAYER,
    random_stream=DOC_RANDOM_STREAM,
    chunk_size=DOC_CHUNK_SIZE,
    copy=DOC_COPY,
)
def bin_values(
    adata: AnnData,
    *,
    flavor: Flavor = "scgpt",
    n_bins: int | None = None,
    layer: str | None = None,
    key_added: str | None = None,
    random_state: int | None = None,
    random_stream: RandomStream = "cell",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    mod: str | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Bin expression values per cell into the integer tokens a model reads.

    ``flavor="scgpt"`` is scGPT's per-cell quantile binning (``scgpt.preprocess.binning`` and the
    ``Preprocessor(binning=51)`` step): zeros stay 0, and each cell's non-zero values are
    digitized against the ``n_bins - 1`` quantiles of that cell's non-zero values, into
    ``1..n_bins-1``. A value equal to several edges (common with integer counts) gets a uniform
    random bin among them. By default (``random_stream="cell"``) that draw comes from the cell's
    own stream (keyed by ``random_state`` and the cell's non-zero columns), so a cell gets the
    same bins whatever other cells are binned with it. With ``random_stream="official"`` the
    draws come from one ``np.random.RandomState(random_state)`` stream that runs over the cells
    in order, one draw per non-zero value: the result equals the official code run after
    ``np.random.seed(random_state)``, but binning a subset of cells then gives other tie draws.
    Either way ``chunk_size`` does not change the result. Binning is rank based, so raw counts
    or normalised/log1p values both work (they give the same bins up to rounding); they must be
    finite and non-negative. All-zero cells stay all zero.

    ``flavor="scbert"`` is scBERT's tokenization: each cell is scaled to a total of 1e4,
    ``log2(1 + x)`` taken, capped at ``n_bins`` and truncated, giving tokens ``0..n_bins``
    (``floor(min(log2(1 + x_norm), n_bins))``). It needs raw counts. The totals are over the
    genes of ``adata``: scBERT first reindexes cells onto its 16,906 genes, which a model's
    tokenizer does before calling this. scBERT's extra trailing 0 token (the gene2vec padding
    position) is the tokenizer's job too. Empty cells get all-zero tokens.

    Both flavors read the matrix ``chunk_size`` cells at a time, so backed AnnData
    (``read_h5ad(..., backed="r")``) works with bounded working memory; only the result is held
    whole. Sparse input gives a CSR result with non-zero bins only where the input is non-zero;
    dense input gives a dense result. Bins are stored as ``int16``.

    Parameters
    ----------
    {adata}
    flavor
        ``"scgpt"`` (quantile bins) or ``"scbert"`` (log2 bins).
    n_bins
        Number of bins. ``None`` uses the official value: 51 for scGPT (bins ``0..50``, 0 for
        zeros), 5 for scBERT (scBERT's ``bin_num``; tokens ``0..5``).
    {layer}
    key_added
        Layer to write the bins to; ``None`` uses ``"X_binned"`` (scGPT's name) or
        ``"X_scbert_bins"``.
    random_state
        Seed of the tie-breaking draws (scGPT only; scBERT binning is deterministic and ignores
        it). ``None`` uses ``sft.settings.seed``.
    {random_stream}
        scGPT only.
    {chunk_size}
    mod
        Modality to bin when ``adata`` is a MuData (default ``"rna"``).
    {copy}

    Returns
    -------
    ``None``, or the modified copy when ``copy=True``. Writes

    ``adata.layers['X_binned' | 'X_scbert_bins' | key_added]``
        The bins (``int16``; CSR when the input is sparse).
    ``adata.obsm['bin_edges' | key_added + '_bin_edges']``
        scGPT only: per cell ``[0, edge_1, ..., edge_{{n_bins-1}}]`` (``float64``, cells x
        ``n_bins``; all zeros for an empty cell), as scGPT's ``Preprocessor`` stores them.
    ``adata.uns['bin_values']['params']``
        ``flavor``, ``n_bins``, ``layer``, ``random_state`` and ``random_stream`` (scGPT),
        ``key_added``, ``edges_key``.
    """
    if flavor not in _DEFAULT_N_BINS:
        raise ValueError(f"flavor must be one of {list(_DEFAULT_N_BINS)}, got {flavor!r}.")
    n_bins = _DEFAULT_N_BINS[flavor] if n_bins is None else n_bins
    n_bins = _check_n_bins(n_bins, 2 if flavor == "scgpt" else 1)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
    seed = resolve_seed(random_state) if flavor == "scgpt" else None
    stream = check_random_stream(random_stream) if flavor == "scgpt" else None
    key = _DEFAULT_KEYS[flavor] if key_added is None else key_added
    edges_key = None
    if flavor == "scgpt":
        edges_key = "bin_edges" if key_added is None else f"{key_added}_bin_edges"

    returned, source = resolve_adata(adata, copy=copy, mod=mod)
    X = get_matrix(source, layer)
    if source.n_obs == 0 or source.n_vars == 0:
        raise InputError(f"the AnnData has shape {source.shape}: nothing to bin.")
    if flavor == "scgpt":
        check_nonnegative(source, layer, chunk_size=chunk_size)
    else:
        check_counts(source, layer, chunk_size=chunk_size)

    rng = np.random.RandomState(seed) if stream == "official" else None
    binned_chunks: list[sparse.csr_matrix] = []
    edge_chunks: list[np.ndarray] = []
    n_empty = 0
    for _, block in iter_chunks(source, layer, chunk_size=chunk_size):
        csr = _canonical_csr(block)
        n_empty += int((np.diff(csr.indptr) == 0).sum())
        if flavor == "scgpt":
            binned, edges = _scgpt_chunk(csr, n_bins, seed, rng)
            edge_chunks.append(edges)
        else:
            binned = scbert_bins(csr, n_bins)
        binned_chunks.append(binned)

    result = sparse.vstack(binned_chunks, format="csr", dtype=BIN_DTYPE)
    if not _is_sparse_source(X):
        result = result.toarray()
    if n_empty:
        logger.warning(
            "%d of %d cells in %s have no non-zero value; their bins are all 0.",
            n_empty,
            source.n_obs,
            describe_source(layer),
        )

    # Everything is computed; only now is the AnnData written to.
    source.layers[key] = result
    if edges_key is not None:
        source.obsm[edges_key] = np.concatenate(edge_chunks)
    source.uns[_UNS_KEY] = {
        "params": params_record(
            flavor=flavor,
            n_bins=n_bins,
            layer=layer,
            random_state=seed,
            random_stream=stream,
            key_added=key,
            edges_key=edges_key,
        )
    }
    logger.info(
        "binned %s (%s, %d bins) into adata.layers[%r]", describe_source(layer), flavor, n_bins, key
    )
    return returned if copy else None
