"""What every family's ``embed_genes`` task returns, and how vocabulary rows land on ``var``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from ..pp._match_genes import GeneMatch

__all__ = ["GeneEmbeddings", "rows_on_var", "token_table_rows"]


class GeneEmbeddings(NamedTuple):
    """Gene embeddings of an AnnData's genes, as a family's ``embed_genes`` task returns them."""

    embeddings: np.ndarray
    """``(n_vars, d)`` float32; NaN rows for genes without an embedding."""
    in_vocab: np.ndarray
    """``(n_vars,)`` bool: the gene matched the model's vocabulary."""
    n_cells: np.ndarray | None
    """Context mode: ``(n_vars,)`` int64, the cells in which each gene was a token."""
    params: dict[str, Any]
    """What to record about the run in ``uns[key]["params"]``."""


def rows_on_var(values: np.ndarray, match: GeneMatch) -> np.ndarray:
    """Spread rows given for the matched genes (in ``var`` order) over all genes, NaN elsewhere.

    Parameters
    ----------
    values
        ``(n_matched, d)`` rows, one per matched gene in ``var`` order.
    match
        The gene match of the AnnData against the model's vocabulary.

    Returns
    -------
    ``(n_genes, d)`` float32 array.
    """
    values = np.asarray(values, dtype=np.float32)
    if values.shape[0] != match.n_matched:
        raise ValueError(f"expected {match.n_matched} rows (matched genes), got {values.shape[0]}.")
    out = np.full((match.n_genes, values.shape[1]), np.nan, dtype=np.float32)
    out[match.matched] = values
    return out


def token_table_rows(table, match: GeneMatch) -> np.ndarray:
    """Rows of a model's gene table (vocabulary order) for the AnnData's genes, NaN if absent.

    Parameters
    ----------
    table
        ``(vocab_size, d)`` tensor or array, row ``i`` for vocabulary id ``i``.
    match
        The gene match of the AnnData against that vocabulary.

    Returns
    -------
    ``(n_genes, d)`` float32 array.
    """
    import torch

    if isinstance(table, torch.Tensor):
        table = table.detach().float().cpu().numpy()
    return rows_on_var(np.asarray(table)[match.index[match.matched]], match)
