"""``sft.tl.annotate``'s default path: measure the ways to carry labels over, take the best.

With a reference and neither a model nor a method, ``annotate`` does not trust any one path:
a zero-shot embedding can lose to the simplest baseline on cells the model never saw. It scores
each candidate by stratified 5-fold cross-validation on the labelled reference (macro-F1 of the
out-of-fold predictions; a single held-out fifth picked the wrong path on 750 PBMCs):

- ``"expression"``: logistic regression on the log-normalised expression of the genes the query
  and the reference share (what CellTypist fits; no foundation model);
- ``"knn"`` and ``"logreg"`` on the default model's embeddings (embedded once; the folds reuse
  the reference's embeddings),

and refits the winner on the whole reference. A model path must beat ``"expression"`` by more
than :data:`MODEL_MARGIN` to be taken: the folds come from the reference's own batch, and a
small edge there does not outweigh what a query from another batch may cost the embedding.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from scipy import sparse

from .._anndata import DEFAULT_CHUNK_SIZE, get_matrix, row_blocks
from .._errors import InputError
from .._lognorm import log1p_per_10k
from .._progress import progress_bar

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = [
    "MIN_CELLS_PER_CLASS",
    "MODEL_MARGIN",
    "N_FOLDS",
    "choose_by_validation",
    "shared_log_expression",
]

logger = logging.getLogger("scfm_tools")

#: Folds of the cross-validation that scores the candidates.
N_FOLDS = 5
#: Macro-F1 by which a foundation-model path must beat ``"expression"`` out of fold.
MODEL_MARGIN = 0.02
#: Fewest reference cells of every cell type for the folds (one per fold at least).
MIN_CELLS_PER_CLASS = N_FOLDS


def _gene_names(adata: AnnData, gene_key: str | None) -> np.ndarray:
    names = adata.var_names if gene_key is None else adata.var[gene_key]
    return np.asarray(names, dtype=str)


def _log_normalised(
    adata: AnnData, layer: str | None, columns: np.ndarray, chunk_size: int
) -> sparse.csr_matrix:
    """``log1p`` of counts per 10,000 (totals over all genes) in ``columns``, read in chunks."""
    blocks = [
        log1p_per_10k(block, columns, dtype=np.float32)
        for block in row_blocks(get_matrix(adata, layer), chunk_size=chunk_size)
    ]
    return sparse.vstack(blocks, format="csr")


def shared_log_expression(
    query: AnnData,
    reference: AnnData,
    *,
    layer: str | None = None,
    reference_layer: str | None = None,
    gene_key: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[sparse.csr_matrix, sparse.csr_matrix, np.ndarray]:
    """Log-normalised counts of the query and the reference over the genes both have.

    Each cell is scaled to 10,000 counts over all of its genes, then ``log1p``; the columns are
    the genes the two share (by name, or ``gene_key``), in the reference's order.

    Parameters
    ----------
    query
        Cells to annotate (raw counts).
    reference
        Labelled cells (raw counts).
    layer
        Layer of ``query`` with the counts; ``None``: ``X``.
    reference_layer
        Layer of ``reference`` with the counts; ``None``: ``X``.
    gene_key
        ``var`` column of both with gene names; ``None``: ``var_names``.
    chunk_size
        Cells read at a time.

    Returns
    -------
    ``(query_matrix, reference_matrix, genes)``: CSR float32 matrices and the shared genes.

    Raises
    ------
    InputError
        Fewer than 10 shared genes.
    """
    ref_names, query_names = _gene_names(reference, gene_key), _gene_names(query, gene_key)
    query_column = {name: i for i, name in enumerate(query_names)}
    pairs = [(j, query_column[name]) for j, name in enumerate(ref_names) if name in query_column]
    if len(pairs) < 10:
        raise InputError(
            f"the query and the reference share {len(pairs)} gene names: too few to compare "
            "their expression. Name genes the same way in both (gene_key= for a var column)."
        )
    ref_columns, query_columns = (
        np.array(side, dtype=np.intp) for side in zip(*pairs, strict=True)
    )
    return (
        _log_normalised(query, layer, query_columns, chunk_size),
        _log_normalised(reference, reference_layer, ref_columns, chunk_size),
        ref_names[ref_columns],
    )


def choose_by_validation(
    candidates: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]],
    labels: np.ndarray,
    *,
    baseline: str,
    random_state: int,
) -> tuple[str, dict[str, float] | None]:
    """Score each candidate by stratified cross-validation on the reference; return the winner.

    Parameters
    ----------
    candidates
        Name -> ``predict(train_rows, validation_rows)`` giving the labels of the validation
        rows from a fit on the training rows.
    labels
        Cell type of each reference cell.
    baseline
        The candidate the others must beat by more than :data:`MODEL_MARGIN`.
    random_state
        Seed of the folds.

    Returns
    -------
    ``(name, macro_f1_per_candidate)``; the scores are ``None`` when a cell type has fewer than
    :data:`MIN_CELLS_PER_CLASS` cells (no folds: the baseline is taken).
    """
    from sklearn.metrics import f1_score
    from sklearn.model_selection import StratifiedKFold

    _, counts = np.unique(labels, return_counts=True)
    if counts.min() < MIN_CELLS_PER_CLASS:
        logger.info(
            "annotate: a reference cell type has %d cells (fewer than %d), too few for the "
            "cross-validation that measures the candidates; using %r.",
            int(counts.min()),
            MIN_CELLS_PER_CLASS,
            baseline,
        )
        return baseline, None
    folds = StratifiedKFold(N_FOLDS, shuffle=True, random_state=random_state)
    splits = list(folds.split(np.zeros(labels.size), labels))
    scores = {}
    total = len(candidates) * len(splits)
    with progress_bar(total, desc="annotate: measuring the ways", unit="fits") as bar:
        for name, predict in candidates.items():
            predicted = labels.copy()
            for train, validation in splits:
                predicted[validation] = predict(train, validation)
                bar.update(1)
            scores[name] = float(f1_score(labels, predicted, average="macro"))
    best = max(scores, key=lambda name: (scores[name], name == baseline))
    if best != baseline and scores[best] <= scores[baseline] + MODEL_MARGIN:
        best = baseline
    return best, scores
