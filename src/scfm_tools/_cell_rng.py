"""Per-cell random streams: a cell's random draws depend on the seed and on that cell alone.

The official scGPT and CellPLM code draw their random numbers (binning tie-breaks, subsampling
of long cells, Gaussian-mixture samples) from one global stream, cell after cell, so a cell's
result depends on the cells before it: re-embedding a subset, another order or a dataset split
in two files gives other vectors. With ``random_stream="cell"`` every cell instead reads its
own stream, keyed by the seed and a hash of the cell's expressed genes and their values.

The key of a cell is a sum over its non-zero entries of a 64-bit hash of (gene id, value as
float32), mixed with the seed (:func:`cell_keys`). Steps that read only which genes a cell
expresses and the order of their values (scGPT's quantile binning and gene subsampling) key on
the set of expressed genes alone (:func:`gene_set_keys`): the same draws then serve a cell's
counts and any order-preserving transform of them, and no per-cell sort of the values is paid
(ranking millions of entries cost more than the model on small checkpoints). A sum does not
depend on the order the entries are stored in, and float32 holds counts exactly, so the key is
the same whether the counts are stored as int32, float32 or float64, sparse or dense, and
whatever chunk or batch the cell lands in; two identical cells get the same draws.

The draws are the outputs of SplitMix64 (Steele, Lea & Flood 2014; Java's
``SplittableRandom``) started from the key and read at a counter: draw ``i`` of a cell is
``mix(state + (i + 1) * gamma)``. The counter is the gene id for per-gene draws, so those do
not depend on the column order either. Everything is integer arithmetic on ``uint64`` arrays:
the same on every platform, and vectorised over a whole block of cells.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np

__all__ = [
    "RANDOM_STREAMS",
    "STREAM_COMPONENT",
    "STREAM_GAUSSIAN",
    "STREAM_SUBSAMPLE",
    "STREAM_TIES",
    "RandomStream",
    "cell_bits",
    "cell_keys",
    "cell_normal",
    "cell_uniform",
    "check_random_stream",
    "entry_uniform",
    "gene_hashes",
    "gene_set_draws",
    "gene_set_keys",
]

RandomStream = Literal["cell", "official"]
RANDOM_STREAMS: tuple[str, ...] = ("cell", "official")

# The uses of a cell's key, one stream each; numbered in one place so that no two share one.
STREAM_TIES = 1  # scGPT binning: tie-breaks among equal quantile edges
STREAM_SUBSAMPLE = 2  # scGPT: which genes of a long cell are kept
STREAM_COMPONENT = 3  # CellPLM: Gumbel noise of the mixture component
STREAM_GAUSSIAN = 4  # CellPLM: Gaussian noise of the latent sample

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1


def check_random_stream(random_stream: str) -> RandomStream:
    """Return ``random_stream`` if it is ``"cell"`` or ``"official"``, else raise a clear error."""
    if random_stream not in RANDOM_STREAMS:
        raise ValueError(
            f"random_stream must be 'cell' (each cell draws from its own stream; the default) "
            f"or 'official' (one stream over the cells in order, as the official code), got "
            f"{random_stream!r}."
        )
    return random_stream  # type: ignore[return-value]


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on a ``uint64`` array (wrapping arithmetic).

    Works in place on ``x`` and returns it: every caller hands it a temporary, and a copy of
    millions of entries per call is a measurable part of a tokenizer's time.
    """
    x ^= x >> np.uint64(30)
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return x


def _salt(value: int) -> np.ndarray:
    """Mix a seed or stream number into a ``uint64`` (+gamma: 0 is a fixed point of mix)."""
    return _mix(np.array([int(value) & _MASK64], dtype=np.uint64) + _GAMMA)


def cell_keys(
    seed: int, rows: np.ndarray, genes: np.ndarray, values: np.ndarray, n_cells: int
) -> np.ndarray:
    """Key of each cell's random stream, from the seed and the cell's non-zero entries.

    Parameters
    ----------
    seed
        The run's seed (``random_state``).
    rows
        Cell (``0 .. n_cells - 1``) of each non-zero entry, in any order.
    genes
        Gene id of each entry (non-negative integers: vocabulary ids or model gene indices, so
        that the key does not depend on the column order of the input).
    values
        Value of each entry (read as float32; entries equal to 0 must be left out).
    n_cells
        Number of cells.

    Returns
    -------
    ``(n_cells,)`` ``uint64`` keys; a cell without entries gets the key of the seed alone.
    """
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    entry = _mix(_mix(np.asarray(genes, dtype=np.uint64) + _GAMMA) ^ bits)
    sums = np.zeros(n_cells, dtype=np.uint64)
    np.add.at(sums, np.asarray(rows, dtype=np.intp), entry)
    return _mix(sums ^ _salt(seed))


def gene_hashes(genes: np.ndarray) -> np.ndarray:
    """64-bit hash of each gene id (non-negative integers), for :func:`gene_set_keys`.

    A tokenizer hashes its genes once and gathers the hashes of each block's entries.
    """
    return _mix(np.asarray(genes, dtype=np.uint64) + _GAMMA)


def gene_set_keys(seed: int, indptr: np.ndarray, entry_hashes: np.ndarray) -> np.ndarray:
    """Key of each CSR row's stream, from the seed and the set of genes the row holds.

    Parameters
    ----------
    seed
        The run's seed (``random_state``).
    indptr
        CSR row pointer of the rows (``n_rows + 1`` entries).
    entry_hashes
        :func:`gene_hashes` of the gene of each stored entry (no entries for zeros), in CSR
        order.

    Returns
    -------
    ``(n_rows,)`` ``uint64`` keys; a row without entries gets the key of the seed alone.
    """
    # Row sums by differences of a wrapping cumulative sum: exact modulo 2**64, and unlike
    # np.add.reduceat right for empty rows.
    totals = np.zeros(entry_hashes.size + 1, dtype=np.uint64)
    np.cumsum(entry_hashes, dtype=np.uint64, out=totals[1:])
    indptr = np.asarray(indptr, dtype=np.intp)
    return _mix((totals[indptr[1:]] - totals[indptr[:-1]]) ^ _salt(seed))


def gene_set_draws(
    seed: int, indptr: np.ndarray, genes: np.ndarray, entry_hashes: np.ndarray
) -> Callable[[int, np.ndarray], np.ndarray]:
    """Uniform draws of the stored entries of CSR rows, each row keyed on its set of genes.

    Parameters
    ----------
    seed
        The run's seed (``random_state``).
    indptr
        CSR row pointer of the rows.
    genes
        Gene id of each stored entry: the counter of its draw, so that a draw does not depend
        on where the entry is stored.
    entry_hashes
        :func:`gene_hashes` of ``genes`` (a tokenizer gathers them from a table it keeps).

    Returns
    -------
    ``draws(stream, entries)``: one float64 draw in ``[0, 1)`` of stream ``stream`` for each of
    ``entries`` (positions or a mask over the stored entries).
    """
    keys = gene_set_keys(seed, indptr, entry_hashes)
    rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))

    def draws(stream: int, entries: np.ndarray) -> np.ndarray:
        return entry_uniform(keys, rows[entries], genes[entries], stream)

    return draws


def cell_bits(keys: np.ndarray, counters: np.ndarray, stream: int) -> np.ndarray:
    """64 random bits per (cell key, counter): draw ``counter`` of the cell's stream ``stream``.

    ``keys`` and ``counters`` broadcast against each other; ``stream`` (a small integer)
    separates the independent uses of one cell's key (e.g. tie-breaks and subsampling).
    """
    return _draw(_stream_states(keys, stream), counters)


def _stream_states(keys: np.ndarray, stream: int) -> np.ndarray:
    """Start state of stream ``stream`` of each cell key."""
    return _mix(np.asarray(keys, dtype=np.uint64) ^ _salt(stream))


def _draw(states: np.ndarray, counters: np.ndarray) -> np.ndarray:
    """SplitMix64 output ``counter`` of the streams started at ``states`` (broadcast)."""
    steps = (np.asarray(counters, dtype=np.uint64) + np.uint64(1)) * _GAMMA
    return _mix(states + steps)


def _unit(bits: np.ndarray, dtype) -> np.ndarray:
    """Uniform floats in ``[0, 1)`` from random bits, with the precision of ``dtype``."""
    if np.dtype(dtype) == np.float32:
        return ((bits >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24)).astype(dtype)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def entry_uniform(keys: np.ndarray, rows: np.ndarray, genes: np.ndarray, stream: int) -> np.ndarray:
    """One uniform draw in ``[0, 1)`` (float64) per non-zero entry, from its cell and gene.

    Parameters
    ----------
    keys
        Cell keys from :func:`cell_keys`.
    rows
        Cell of each entry.
    genes
        Gene id of each entry: the counter of the draw in the cell's stream, so an entry's draw
        does not depend on where it is stored.
    stream
        Which of the cell's streams.

    Returns
    -------
    The draws, aligned with ``rows``.
    """
    # cell_bits with the per-cell half of its mixing done once per cell, not once per entry.
    state = _stream_states(keys, stream)[np.asarray(rows, dtype=np.intp)]
    return _unit(_draw(state, genes), np.float64)


def cell_uniform(keys: np.ndarray, n: int, stream: int, dtype=np.float64) -> np.ndarray:
    """``(n_cells, n)`` uniform draws in ``[0, 1)``, row ``c`` from cell ``c``'s stream.

    Parameters
    ----------
    keys
        Cell keys from :func:`cell_keys`.
    n
        Draws per cell.
    stream
        Which of the cell's streams.
    dtype
        ``float64`` (53 random bits) or ``float32`` (24 bits, so never rounded up to 1).

    Returns
    -------
    The draws.
    """
    keys = np.asarray(keys, dtype=np.uint64)
    return _unit(cell_bits(keys[:, None], np.arange(n, dtype=np.uint64)[None, :], stream), dtype)


def cell_normal(keys: np.ndarray, n: int, stream: int) -> np.ndarray:
    """``(n_cells, n)`` standard normal draws (float64, Box-Muller), row ``c`` from cell ``c``."""
    u = cell_uniform(keys, 2 * n, stream)
    radius = np.sqrt(-2.0 * np.log1p(-u[:, 0::2]))
    return radius * np.cos(2.0 * np.pi * u[:, 1::2])
