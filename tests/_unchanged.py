"""One check, shared by the test files, that a call left its input AnnData exactly as it was.

The project promises that input AnnData is never corrupted, even when a call fails halfway;
``snapshot`` before the call and ``assert_unchanged`` after it check the whole object rather than
the fields one test happens to think of.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse


def snapshot(adata: ad.AnnData) -> ad.AnnData:
    """A deep copy to compare against later."""
    return adata.copy()


def _assert_same_matrix(now, before, where: str) -> None:
    assert sparse.issparse(now) == sparse.issparse(before), f"{where} changed storage"
    assert now.shape == before.shape, f"{where} changed shape"
    assert now.dtype == before.dtype, f"{where} changed dtype"
    if sparse.issparse(now):
        now, before = now.toarray(), before.toarray()
    np.testing.assert_array_equal(np.asarray(now), np.asarray(before), err_msg=where)


def _assert_same_mapping(now, before, where: str) -> None:
    assert set(now.keys()) == set(before.keys()), f"{where} keys changed"
    for key in before.keys():
        if isinstance(before[key], pd.DataFrame):
            pd.testing.assert_frame_equal(now[key], before[key])
        else:
            _assert_same_matrix(now[key], before[key], f"{where}[{key!r}]")


def assert_unchanged(adata: ad.AnnData, before: ad.AnnData) -> None:
    """Fail if anything in ``adata`` differs from its ``snapshot``."""
    if before.X is None:
        assert adata.X is None
    else:
        _assert_same_matrix(adata.X, before.X, "X")
    pd.testing.assert_frame_equal(adata.obs, before.obs)
    pd.testing.assert_frame_equal(adata.var, before.var)
    for name in ("layers", "obsm", "varm", "obsp", "varp"):
        _assert_same_mapping(getattr(adata, name), getattr(before, name), name)
    assert set(adata.uns.keys()) == set(before.uns.keys()), "uns keys changed"
    assert (adata.raw is None) == (before.raw is None), "raw added or removed"
