"""Cells -> scBERT token sequences (official ``preprocess.py`` + ``SCDataset``/``predict.py``)."""

from __future__ import annotations

import numpy as np
import torch
from scipy import sparse

from ...pp._binning import scbert_bins, scbert_log2_norm
from ...pp._match_genes import GeneMatch

__all__ = ["SCBERTTokenizer"]


class SCBERTTokenizer:
    """Put cells on the model's genes and turn them into expression-bin tokens.

    As the official pipeline: each cell is reindexed onto the model's genes in their order
    (genes the model lacks are dropped, model genes the data lacks are zero), scaled to a total
    of 1e4 over those genes, ``log2(1 + x)`` taken, capped at ``bin_num`` and truncated (bins
    ``0..bin_num``), and a ``0`` token appended at the gene2vec padding position. Stateless
    and deterministic: a cell's tokens never depend on the other cells.

    Parameters
    ----------
    gene_index
        Model gene position of each input column (``var`` order), -1 for genes not in the
        model (e.g. :attr:`scfm_tools.pp.GeneMatch.index`).
    n_genes
        Number of model genes (sequences get ``n_genes + 1`` tokens).
    bin_num
        Highest bin (official 5: ``num_tokens - 2``).
    """

    def __init__(self, gene_index: np.ndarray, n_genes: int, *, bin_num: int = 5) -> None:
        gene_index = np.asarray(gene_index, dtype=np.int64)
        if gene_index.ndim != 1:
            raise ValueError("gene_index must be 1-D (one model gene position per column).")
        if gene_index.size and gene_index.max() >= n_genes:
            raise ValueError(
                f"gene_index refers to gene {gene_index.max()}, but the model has {n_genes}."
            )
        kept = gene_index[gene_index >= 0]
        if np.unique(kept).size != kept.size:
            raise ValueError("gene_index maps several columns onto the same model gene.")
        self.n_columns = gene_index.size
        self.columns = np.flatnonzero(gene_index >= 0)
        self.positions = gene_index[self.columns]
        self.n_genes = int(n_genes)
        self.bin_num = int(bin_num)

    @classmethod
    def from_match(cls, match: GeneMatch, n_genes: int, **kwargs) -> SCBERTTokenizer:
        """Build from a :class:`~scfm_tools.pp.GeneMatch` against the model's gene list."""
        return cls(match.index, n_genes, **kwargs)

    def reindex(self, block) -> sparse.csr_matrix:
        """Put the counts of a block of cells on the model's genes, ``(cells, n_genes)`` CSR.

        Parameters
        ----------
        block
            Cells x input genes (dense array or sparse matrix, columns in ``var`` order).

        Returns
        -------
        CSR with sorted indices and no stored zeros.
        """
        if block.ndim != 2 or block.shape[1] != self.n_columns:
            raise ValueError(
                f"expected a cells x {self.n_columns} matrix (one column per gene), got shape "
                f"{block.shape}."
            )
        sub = sparse.csr_matrix(block)[:, self.columns]
        sub.eliminate_zeros()
        out = sparse.csr_matrix(
            (sub.data, self.positions[sub.indices], sub.indptr), shape=(sub.shape[0], self.n_genes)
        )
        out.sort_indices()
        return out

    def log2_norm(self, block) -> sparse.csr_matrix:
        """``log2(1 + x / total * 1e4)`` on the model's genes (official ``preprocess.py``)."""
        counts = self.reindex(block)
        return sparse.csr_matrix(
            (scbert_log2_norm(counts), counts.indices, counts.indptr), shape=counts.shape
        )

    def tokens_from_counts(self, counts: sparse.csr_matrix) -> torch.Tensor:
        """Tokens of counts already on the model's genes (the output of :meth:`reindex`)."""
        if counts.shape[1] != self.n_genes:
            raise ValueError(
                f"expected counts on the model's {self.n_genes} genes, got {counts.shape[1]} "
                "columns; put them there with `reindex` first."
            )
        bins = scbert_bins(counts, self.bin_num)
        tokens = torch.zeros((bins.shape[0], self.n_genes + 1), dtype=torch.long)
        tokens[:, : self.n_genes] = torch.from_numpy(bins.toarray().astype(np.int64))
        return tokens

    def __call__(self, block) -> torch.Tensor:
        """Tokens of a block of cells, ``(cells, n_genes + 1)`` long.

        Parameters
        ----------
        block
            Cells x input genes raw counts.

        Returns
        -------
        The bins of the model's genes in order, then a ``0`` at the padding position.
        """
        return self.tokens_from_counts(self.reindex(block))
