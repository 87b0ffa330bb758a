"""Turn cells into scGPT token sequences, as the official zero-shot ``embed_data`` does.

Per cell (``get_batch_cell_embeddings`` + ``DataCollator(do_binning=True, sampling=True,
keep_first_n_tokens=1)``): the non-zero genes found in the vocabulary, in ``var`` order, with
their raw values; the values binned per cell (:func:`scfm_tools.pp._binning.quantile_bin`, 51
bins, ties spread at random); ``<cls>`` prepended with value ``pad_value``; if the sequence is
longer than ``max_length``, a random subset of ``max_length - 1`` genes kept after ``<cls>`` (in
a random order, as the official ``_sample``). Binning happens before subsampling, so the bins of
a long cell are ranks among all its expressed genes.

Where the random numbers come from is :class:`CellTokenizer`'s ``random_stream``:

- ``"cell"`` (default): each cell reads its own stream, keyed by ``random_state`` and a hash of
  the set of its expressed vocabulary genes (:mod:`scfm_tools._cell_rng`; counts and
  log-normalised values of a cell draw alike, and the bins read only the values' order). A tie
  draw is read at the gene's vocabulary id and the kept genes are those with the smallest draws
  of a second stream, so a cell's tokens depend on that cell alone: not on the cells before it,
  the order of the cells or of the genes, nor on how the data is split into files or chunks.
- ``"official"``: the official code draws tie-breaking numbers from the global numpy stream and
  subsampling permutations from the global torch stream, cell after cell in dataset order.
  Here both streams are explicit (a ``np.random.RandomState`` and a ``torch.Generator`` seeded
  with ``random_state``) and are consumed in dataset order whatever the later batching, so the
  tokens equal the official ones after ``np.random.seed(s)`` / ``torch.manual_seed(s)``
  (single-process data loading), but a cell's tokens depend on the cells before it.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy import sparse

from ..._cell_rng import (
    STREAM_SUBSAMPLE,
    STREAM_TIES,
    RandomStream,
    check_random_stream,
    gene_hashes,
    gene_set_draws,
)
from ...pp._binning import quantile_bin_csr

if TYPE_CHECKING:
    from ...pp._match_genes import GeneMatch

__all__ = ["OFFICIAL_N_BINS", "CellTokenizer", "pad_cells"]

# The official DataCollator hard-codes 51 bins whatever args.json says (n_bins there is unused).
OFFICIAL_N_BINS = 51

Cell = tuple[np.ndarray, np.ndarray]
# About this many stored values of a block are tokenized together: the dozen per-value arrays of
# a group then stay in the CPU caches and in reused memory. With 1,024 deep cells per group the
# first tokenization in a process ran at half speed (page faults on fresh ~20 MB arrays).
_VALUES_AT_A_TIME = 100_000


class CellTokenizer:
    """Tokenizer: cells in, ``(gene_ids, values)`` pairs out.

    With ``random_stream="official"`` it holds the official run's random streams and consumes
    them, so blocks must come in dataset order; with ``"cell"`` (default) it holds no state
    and a cell's tokens do not depend on the other cells.

    Parameters
    ----------
    gene_index
        Vocabulary id of each input column (``var`` order), -1 for genes not in the vocabulary.
    cls_id
        Id of ``<cls>``.
    pad_value
        Value given to ``<cls>`` (and to padding later).
    max_length
        Longest sequence, ``<cls>`` included; longer cells are subsampled.
    n_bins
        Number of bins (zero bin included).
    random_state
        Seed of the random draws (binning ties and subsampling).
    random_stream
        ``"cell"``: each cell draws from its own stream (keyed by ``random_state`` and the
        cell); ``"official"``: one numpy and one torch stream run over the cells in order, as
        the official code (see the module documentation).
    """

    def __init__(
        self,
        gene_index: np.ndarray,
        *,
        cls_id: int,
        pad_value: float,
        max_length: int,
        n_bins: int = OFFICIAL_N_BINS,
        random_state: int = 0,
        random_stream: RandomStream = "cell",
    ) -> None:
        gene_index = np.asarray(gene_index, dtype=np.int64)
        if gene_index.ndim != 1:
            raise ValueError("gene_index must be 1-D (one vocabulary id per column).")
        if max_length < 2:
            raise ValueError(
                f"max_length must be at least 2 (<cls> and one gene), got {max_length}."
            )
        self.n_columns = gene_index.size
        self.columns = np.flatnonzero(gene_index >= 0)
        self.column_ids = gene_index[self.columns]
        self.column_hashes = gene_hashes(self.column_ids)
        self.cls_id = int(cls_id)
        self.pad_value = float(pad_value)
        self.max_length = int(max_length)
        self.n_bins = n_bins
        self.random_state = int(random_state)
        self.random_stream = check_random_stream(random_stream)
        official = self.random_stream == "official"
        self.rng = np.random.RandomState(random_state) if official else None
        self.generator = torch.Generator().manual_seed(random_state) if official else None

    @classmethod
    def from_match(cls, match: GeneMatch | np.ndarray, **kwargs) -> CellTokenizer:
        """Build from a :class:`~scfm_tools.pp.GeneMatch` (or its ``index`` array)."""
        index = match if isinstance(match, np.ndarray) else match.index
        return cls(index, **kwargs)

    def _subsample(self, n_genes: int, draws: np.ndarray | None) -> np.ndarray | None:
        """Positions of the genes kept (in a random order), or ``None`` when all fit."""
        if n_genes + 1 <= self.max_length:
            return None
        if draws is None:
            return torch.randperm(n_genes, generator=self.generator)[: self.max_length - 1].numpy()
        # The genes with the smallest draws of the cell's own stream: a uniform random subset,
        # in the order of their draws. Only draws under a threshold that k of the n uniforms
        # pass with near certainty (mean k, ~6 sd above) are sorted: sorting or partitioning all
        # of a deep cell's draws cost more than the rest of its tokenization.
        k = self.max_length - 1
        below = np.flatnonzero(draws < (k + 6.0 * np.sqrt(k) + 10.0) / n_genes)
        if below.size < k:  # too few passed: take them all into account
            below = np.arange(n_genes)
        return below[np.argsort(draws[below], kind="stable")[:k]]

    def __call__(self, block) -> list[Cell]:
        """Tokenize a block of cells (rows; dense array or sparse matrix, columns in var order).

        With ``random_stream="official"`` it consumes the random streams, so call it on
        consecutive blocks in dataset order.

        Parameters
        ----------
        block
            Cells x genes values (raw counts for the official behaviour).

        Returns
        -------
        One ``(gene_ids int64, values float32)`` pair per cell, ``<cls>`` first.
        """
        if block.ndim != 2 or block.shape[1] != self.n_columns:
            raise ValueError(
                f"expected a cells x {self.n_columns} matrix (one column per gene), got shape "
                f"{block.shape}."
            )
        block = sparse.csr_matrix(block)
        cells: list[Cell] = []
        # A few rows at a time: the in-vocabulary columns of the whole block would be a second
        # copy of it (hundreds of MB for 10,000 deep cells). A row longer than a group is alone.
        ends = np.searchsorted(
            block.indptr, np.arange(1, block.nnz // _VALUES_AT_A_TIME + 1) * _VALUES_AT_A_TIME
        )
        bounds = np.unique(np.concatenate([[0], ends, [block.shape[0]]]))
        for start, stop in itertools.pairwise(bounds):
            self._tokenize_rows(block[start:stop], cells)
        return cells

    def _tokenize_rows(self, rows: sparse.csr_matrix, cells: list[Cell]) -> None:
        """Append the ``(gene_ids, values)`` of each row of ``rows`` to ``cells``."""
        sub = rows[:, self.columns]
        # Column slicing leaves canonical CSR (sorted, no duplicates); stored zeros are
        # dropped because the official code only tokenizes np.nonzero(row).
        sub.eliminate_zeros()
        sub.sort_indices()
        # Values reach the official binning as float32 (torch .float()).
        sub.data = sub.data.astype(np.float32)
        if sub.nnz and sub.data.min() < 0:
            raise ValueError("values must be non-negative for scGPT binning.")
        all_genes = self.column_ids[sub.indices]
        lengths = np.diff(sub.indptr)
        picks = None
        if self.random_stream == "cell":
            draws = gene_set_draws(
                self.random_state, sub.indptr, all_genes, self.column_hashes[sub.indices]
            )
            ties = functools.partial(draws, STREAM_TIES)
            # Subsampling draws only for the cells too long to keep whole (zeros elsewhere).
            picks = np.zeros(sub.nnz, dtype=np.float64)
            long = np.repeat(lengths + 1 > self.max_length, lengths)
            picks[long] = draws(STREAM_SUBSAMPLE, long)
        else:
            # The official loop draws np.random.rand(len(row)) cell after cell: the same numbers
            # as one draw for all the rows' values.
            ties = self.rng.random_sample(sub.nnz)
        # All rows binned at once (the per-row official binning, vectorised over rows).
        binned = quantile_bin_csr(sub.data, sub.indptr, self.n_bins, ties)[0].astype(np.float32)
        for row in range(sub.shape[0]):
            lo, hi = sub.indptr[row], sub.indptr[row + 1]
            genes = all_genes[lo:hi]
            ids = np.concatenate([[self.cls_id], genes]).astype(np.int64)
            vals = np.concatenate([[self.pad_value], binned[lo:hi]]).astype(np.float32)
            keep = self._subsample(genes.size, None if picks is None else picks[lo:hi])
            if keep is not None:
                keep = np.concatenate([[0], keep + 1])
                ids, vals = ids[keep], vals[keep]
            cells.append((ids, vals))


def pad_cells(cells: Sequence[Cell], *, pad_id: int, pad_value: float) -> dict[str, torch.Tensor]:
    """Right-pad token sequences into a minibatch dict for :class:`SCGPTModule`.

    Parameters
    ----------
    cells
        ``(gene_ids, values)`` pairs.
    pad_id
        Id of ``<pad>``.
    pad_value
        Value at padded positions.

    Returns
    -------
    ``{"gene_ids": long, "values": float32, "padding_mask": bool}``, each ``(n, max_len)``.
    """
    if not cells:
        raise ValueError("no cells to pad.")
    length = max(len(ids) for ids, _ in cells)
    gene_ids = torch.full((len(cells), length), pad_id, dtype=torch.long)
    values = torch.full((len(cells), length), pad_value, dtype=torch.float32)
    for i, (ids, vals) in enumerate(cells):
        gene_ids[i, : len(ids)] = torch.from_numpy(ids)
        values[i, : len(vals)] = torch.from_numpy(vals)
    return {"gene_ids": gene_ids, "values": values, "padding_mask": gene_ids.eq(pad_id)}
