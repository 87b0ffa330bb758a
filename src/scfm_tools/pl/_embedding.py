"""``sft.pl.embedding``: cells on a 2-D view (e.g. a UMAP) of an embedding, drawn by scanpy."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .._anndata import resolve_adata
from .._docs import doc_params
from ._utils import DOC_PLOT, finish_figure

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes

__all__ = ["embedding", "resolve_basis"]


def _how_to_umap(rep: str) -> str:
    return (
        f"sft.pl only draws: compute the 2-D view first, e.g. "
        f"`sc.pp.neighbors(adata, use_rep={rep!r}); sc.tl.umap(adata)`, then plot "
        f"basis='X_umap'"
    )


def resolve_basis(adata: AnnData, basis: str) -> str:
    """Return the ``obsm`` key of ``basis`` (``"umap"`` finds ``"X_umap"``), checked to be 2-D.

    Raises
    ------
    KeyError
        No such key; the message says how to compute a UMAP (nothing is computed here).
    ValueError
        The key holds more than two dimensions (an embedding, not a view of one).
    """
    key = basis if basis in adata.obsm or basis.startswith("X_") else f"X_{basis}"
    if key not in adata.obsm:
        reps = [k for k in adata.obsm if np.ndim(adata.obsm[k]) == 2 and adata.obsm[k].shape[1] > 2]
        rep = reps[0] if reps else "X_scgpt"
        raise KeyError(
            f"adata.obsm has no {basis!r} (it has {list(adata.obsm)}); {_how_to_umap(rep)}."
        )
    shape = np.shape(adata.obsm[key])
    if len(shape) != 2 or shape[1] < 2:
        raise ValueError(f"adata.obsm[{key!r}] has shape {shape}; at least 2 columns are needed.")
    if shape[1] > 2:
        raise ValueError(
            f"adata.obsm[{key!r}] has {shape[1]} dimensions, too many to draw; {_how_to_umap(key)}."
        )
    return key


@doc_params(plot=DOC_PLOT)
def embedding(
    adata: AnnData,
    basis: str = "X_umap",
    color: str | Sequence[str] | None = None,
    *,
    mod: str | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | bool | None = None,
    **kwargs: Any,
) -> Axes | list[Axes] | None:
    """Plot cells on a 2-D view of an embedding (e.g. a UMAP of ``sft.tl.embed_cells``' output).

    Only draws (with :func:`scanpy.pl.embedding`): ``adata`` is not changed. Compute the view
    first, e.g. ``sc.pp.neighbors(adata, use_rep="X_scgpt"); sc.tl.umap(adata)``.

    Parameters
    ----------
    adata
        The AnnData with the 2-D view in ``obsm`` (a MuData with ``mod=``).
    basis
        ``obsm`` key of the 2-D view (``"umap"`` and ``"X_umap"`` are the same).
    color
        ``obs`` columns or genes to colour by (as in scanpy).
    mod
        Modality of a MuData (default ``"rna"``).
    {plot}
    **kwargs
        Passed to :func:`scanpy.pl.embedding` (``size``, ``palette``, ``legend_loc``, ...).

    Returns
    -------
    The Axes (a list of them for several ``color``), unless the figure was shown.

    Raises
    ------
    KeyError
        ``obsm`` has no ``basis``; the message says how to compute a UMAP.
    ValueError
        ``obsm[basis]`` has more than two dimensions.
    """
    import scanpy as sc

    _, ad = resolve_adata(adata, mod=mod)
    key = resolve_basis(ad, basis)
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
