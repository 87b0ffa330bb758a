"""Log-normalised counts, as scanpy's ``normalize_total(target_sum=1e4)`` then ``log1p``."""

from __future__ import annotations

import numpy as np
from scipy import sparse

__all__ = ["TARGET_SUM", "log1p_per_10k"]

#: Counts per cell after scaling.
TARGET_SUM = 1e4


def log1p_per_10k(block, columns: np.ndarray | None = None, *, dtype=np.float64):
    """``log1p`` of each row's counts scaled to :data:`TARGET_SUM`, as a CSR matrix.

    Parameters
    ----------
    block
        Cells x genes counts (dense or sparse rows); each cell's total is over all its columns.
    columns
        Columns to keep after scaling; ``None`` keeps all.
    dtype
        Float type the totals, the scaling and the result are computed in.

    Returns
    -------
    ``sparse.csr_matrix`` of ``dtype``; cells without counts stay all zero.
    """
    csr = sparse.csr_matrix(block, dtype=dtype)
    totals = np.asarray(csr.sum(axis=1)).ravel()
    scale = np.divide(dtype(TARGET_SUM), totals, out=np.zeros_like(totals), where=totals > 0)
    out = (sparse.diags(scale) @ (csr if columns is None else csr[:, columns])).tocsr()
    out.data = np.log1p(out.data)
    return out
