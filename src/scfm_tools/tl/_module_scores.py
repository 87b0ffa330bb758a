"""Per-cell gene-module scores: the mean z-scored log-normalised expression of a module's genes."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import sparse

from .._anndata import DEFAULT_CHUNK_SIZE, describe_source, iter_chunks
from .._validation import check_nonnegative, first_non_integer

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["TARGET_SUM", "module_scores"]

logger = logging.getLogger("scfm_tools")

#: Counts are normalised to this total per cell before ``log1p`` (as ``sc.pp.normalize_total``
#: with ``target_sum=1e4``).
TARGET_SUM = 1e4


def _lognorm(block, from_counts: bool):
    if not from_counts:
        return block
    totals = np.asarray(block.sum(axis=1), dtype=np.float64).ravel()
    scale = np.divide(TARGET_SUM, totals, out=np.zeros_like(totals), where=totals > 0)
    if sparse.issparse(block):
        out = sparse.csr_matrix(block.multiply(scale[:, None]), dtype=np.float64)
        return out.log1p()
    return np.log1p(np.asarray(block, dtype=np.float64) * scale[:, None])


def module_scores(
    adata: AnnData,
    modules: Mapping[str, np.ndarray],
    *,
    layer: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[pd.DataFrame, str]:
    """Score each cell on each module: the mean over the module's genes of their z-scores.

    Values are read from ``layer`` (or ``.X``) ``chunk_size`` cells at a time. Raw counts
    (every value an integer) are normalised to :data:`TARGET_SUM` per cell and ``log1p``-ed on
    the fly (the AnnData is not modified); other values are taken as log-normalised already.
    Each gene is then centred and scaled across cells (sample standard deviation, as
    ``sc.pp.scale`` without clipping); a gene constant across cells contributes 0.

    Parameters
    ----------
    adata
        Cells x genes.
    modules
        ``{module name: column indices of its genes}``.
    layer
        Layer to read; ``None`` reads ``.X``.
    chunk_size
        Cells read at a time.

    Returns
    -------
    ``(scores, values)``: a cells x modules DataFrame (index ``obs_names``), and
    ``"counts"`` or ``"log-normalised"`` saying what was read.
    """
    check_nonnegative(adata, layer, chunk_size=chunk_size)
    from_counts = first_non_integer(adata, layer, chunk_size=chunk_size) is None
    if from_counts:
        logger.info(
            "gene_modules: %s holds counts; scoring on log1p(counts per %g) computed on the fly.",
            describe_source(layer),
            TARGET_SUM,
        )
    names = list(modules)
    columns = np.unique(np.concatenate([np.asarray(modules[m], dtype=np.int64) for m in names]))
    where = {c: i for i, c in enumerate(columns)}
    weights = np.zeros((columns.size, len(names)))
    for j, name in enumerate(names):
        rows = [where[c] for c in modules[name]]
        weights[rows, j] = 1.0 / len(rows)

    total = np.zeros(columns.size)
    total_sq = np.zeros(columns.size)
    for _, block in iter_chunks(adata, layer, chunk_size=chunk_size):
        sub = _lognorm(block, from_counts)[:, columns]
        total += np.asarray(sub.sum(axis=0)).ravel()
        sq = sub.multiply(sub) if sparse.issparse(sub) else np.square(sub)
        total_sq += np.asarray(sq.sum(axis=0)).ravel()
    n = adata.n_obs
    mean = total / max(n, 1)
    var = (total_sq - n * mean**2) / max(n - 1, 1)
    sd = np.sqrt(np.clip(var, 0.0, None))
    inv_sd = np.divide(1.0, sd, out=np.zeros_like(sd), where=sd > 1e-12)
    # z @ W = X @ (W / sd) - (mean / sd) @ W: keeps a sparse block sparse.
    scaled_w = weights * inv_sd[:, None]
    offset = (mean * inv_sd) @ weights

    out = np.empty((n, len(names)), dtype=np.float32)
    for start, block in iter_chunks(adata, layer, chunk_size=chunk_size):
        sub = _lognorm(block, from_counts)[:, columns]
        out[start : start + block.shape[0]] = np.asarray(sub @ scaled_w) - offset
    scores = pd.DataFrame(out, index=adata.obs_names.copy(), columns=pd.Index(names))
    return scores, "counts" if from_counts else "log-normalised"
