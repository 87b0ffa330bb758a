"""``sft.pl.embedding``: a UMAP of a foundation-model embedding, drawn by scanpy."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .._anndata import params_record, resolve_adata
from .._docs import doc_params
from ._utils import DOC_PLOT, finish_figure

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes

__all__ = ["embedding", "umap_of"]


def _fingerprint(X: np.ndarray) -> str:
    # Ties a stored UMAP to the exact embedding it was computed from (re-embedding invalidates it).
    return hashlib.sha1(np.ascontiguousarray(X)).hexdigest()


def umap_of(
    adata: AnnData,
    basis: str,
    *,
    n_neighbors: int = 15,
    min_dist: float = 0.5,
    random_state: int = 0,
) -> str:
    """Return the ``obsm`` key of a 2-D view of ``obsm[basis]``, computing a UMAP if needed.

    A 2-D ``basis`` is its own view. Otherwise the UMAP goes to ``obsm["X_umap_<name>"]``
    (``<name>``: ``basis`` without ``"X_"``), its parameters to ``uns["umap_<name>"]``; it is
    reused while the embedding and the parameters are the same. The neighbour graph is built on
    a scratch object, so the user's ``neighbors``, ``obsp`` and ``X_umap`` are left alone.
    """
    import anndata as ad
    import pandas as pd

    if basis not in adata.obsm:
        raise KeyError(
            f"adata.obsm has no {basis!r} (it has {list(adata.obsm)}); run "
            "sft.tl.embed_cells first, or pass basis= naming an embedding."
        )
    X = np.asarray(adata.obsm[basis])
    if X.ndim != 2 or X.shape[1] < 2:
        raise ValueError(f"obsm[{basis!r}] has shape {X.shape}; at least 2 columns are needed.")
    if X.shape[1] == 2:
        return basis
    name = basis[2:] if basis.startswith("X_") else basis
    key, uns_key = f"X_umap_{name}", f"umap_{name}"
    wanted = {
        "basis": basis,
        "n_neighbors": int(n_neighbors),
        "min_dist": float(min_dist),
        "random_state": int(random_state),
        "basis_sha1": _fingerprint(X),
    }
    stored = adata.uns.get(uns_key, {}).get("params", {})
    if key in adata.obsm and all(stored.get(k) == v for k, v in wanted.items()):
        return key
    import scanpy as sc

    scratch = ad.AnnData(obs=pd.DataFrame(index=adata.obs_names.copy()), obsm={basis: X})
    sc.pp.neighbors(scratch, n_neighbors=n_neighbors, use_rep=basis, random_state=random_state)
    sc.tl.umap(scratch, min_dist=min_dist, random_state=random_state)
    adata.obsm[key] = np.asarray(scratch.obsm["X_umap"], dtype=np.float32)
    adata.uns[uns_key] = {"params": params_record(**wanted)}
    return key


@doc_params(plot=DOC_PLOT)
def embedding(
    adata: AnnData,
    basis: str = "X_scgpt",
    color: str | Sequence[str] | None = None,
    *,
    n_neighbors: int = 15,
    min_dist: float = 0.5,
    random_state: int = 0,
    mod: str | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | bool | None = None,
    **kwargs: Any,
) -> Axes | list[Axes] | None:
    """Plot cells on a UMAP of a foundation-model embedding (e.g. from ``sft.tl.embed_cells``).

    When ``obsm[basis]`` has more than two columns, a UMAP of it (neighbours on ``basis``,
    Euclidean, as :func:`scanpy.pp.neighbors` with ``use_rep=basis``) is computed once and kept
    in ``obsm["X_umap_<name>"]`` (``<name>``: ``basis`` without ``"X_"``), so it never
    overwrites the user's ``X_umap`` or ``neighbors``; later calls with the same embedding and
    parameters reuse it. A 2-D ``basis`` is drawn as it is. Drawing is
    :func:`scanpy.pl.embedding`.

    Parameters
    ----------
    adata
        The AnnData with the embedding in ``obsm`` (a MuData with ``mod=``).
    basis
        ``obsm`` key of the embedding.
    color
        ``obs`` columns or genes to colour by (as in scanpy).
    n_neighbors
        Neighbours of the UMAP graph.
    min_dist
        UMAP's ``min_dist``.
    random_state
        Seed of the UMAP.
    mod
        Modality of a MuData (default ``"rna"``).
    {plot}
    **kwargs
        Passed to :func:`scanpy.pl.embedding` (``size``, ``palette``, ``legend_loc``, ...).

    Returns
    -------
    The Axes (a list of them for several ``color``), unless the figure was shown. Writes
    ``adata.obsm["X_umap_<name>"]`` and ``adata.uns["umap_<name>"]["params"]`` when it computes
    a UMAP.
    """
    import scanpy as sc

    _, ad = resolve_adata(adata, mod=mod)
    key = umap_of(ad, basis, n_neighbors=n_neighbors, min_dist=min_dist, random_state=random_state)
    result = sc.pl.embedding(ad, basis=key, color=color, ax=ax, show=False, **kwargs)
    first = result[0] if isinstance(result, list) else result
    return finish_figure(
        result,
        first.figure,
        own_figure=ax is None,
        show=show,
        save=save,
        name=f"embedding_{key.removeprefix('X_')}",
    )
