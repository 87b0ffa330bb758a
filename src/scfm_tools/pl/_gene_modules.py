"""``sft.pl.gene_modules``: module scores per cell group, as a heatmap or a dot plot."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from .._docs import doc_params
from ._utils import DOC_PLOT, as_list, finish_figure

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes

__all__ = ["gene_modules"]


def _group_stats(
    adata: AnnData, groupby: str, key: str, modules: Sequence[str] | None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Mean score and fraction of cells scoring above 0, groups x modules."""
    scores_key = f"{key}_scores"
    if scores_key not in adata.obsm:
        raise KeyError(
            f"adata.obsm has no {scores_key!r}: run `sft.tl.gene_modules(adata, "
            f"key_added={key!r})` first (with score_cells=True)."
        )
    if groupby not in adata.obs.columns:
        raise KeyError(
            f"groupby={groupby!r} is not a column of adata.obs (columns: "
            f"{list(adata.obs.columns)})."
        )
    scores = adata.obsm[scores_key]
    if not isinstance(scores, pd.DataFrame):
        names = adata.var[key].cat.categories if key in adata.var else range(scores.shape[1])
        scores = pd.DataFrame(np.asarray(scores), index=adata.obs_names, columns=list(names))
    scores = scores.copy()
    scores.columns = scores.columns.astype(str)
    if modules is not None:
        wanted = [str(m) for m in as_list(modules)]
        absent = [m for m in wanted if m not in scores.columns]
        if absent:
            raise KeyError(
                f"modules {absent} are not among the scored modules {list(scores.columns)}."
            )
        scores = scores[wanted]
    if scores.shape[1] == 0:
        raise ValueError(f"adata.obsm[{scores_key!r}] holds no module to plot.")
    groups = adata.obs[groupby]
    if not isinstance(groups.dtype, pd.CategoricalDtype):
        groups = groups.astype("category")
    groups = pd.Series(pd.Categorical(groups).remove_unused_categories(), index=scores.index)
    mean = scores.groupby(groups, observed=True).mean()
    frac = (scores > 0).groupby(groups, observed=True).mean()
    return mean, frac


@doc_params(plot=DOC_PLOT)
def gene_modules(
    adata: AnnData,
    groupby: str,
    *,
    key: str = "gene_module",
    kind: Literal["heatmap", "dotplot"] = "heatmap",
    modules: Sequence[str] | None = None,
    cmap: str = "RdBu_r",
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | bool | None = None,
) -> Axes | None:
    """Plot the mean gene-module score of each group of cells.

    Reads the scores :func:`sft.tl.gene_modules <scfm_tools.tl.gene_modules>` wrote to
    ``adata.obsm[key + "_scores"]``. ``kind="heatmap"``: one row per group, one column per
    module, coloured by the group's mean score (a diverging map centred at 0, since scores are
    means of z-scores). ``kind="dotplot"`` (scanpy style): the colour is the mean score and the
    dot area the fraction of the group's cells scoring above 0.

    Parameters
    ----------
    adata
        AnnData with ``obsm[key + "_scores"]`` and ``obs[groupby]``.
    groupby
        Column of ``adata.obs`` grouping the cells (e.g. ``"cell_type"``, ``"leiden"``).
    key
        The ``key_added`` of ``sft.tl.gene_modules``.
    kind
        ``"heatmap"`` or ``"dotplot"``.
    modules
        Modules to show, in this order; ``None``: all.
    cmap
        Colour map of the mean scores.
    {plot}

    Returns
    -------
    The Axes, or ``None`` when the figure was shown.
    """
    import matplotlib.pyplot as plt

    if kind not in ("heatmap", "dotplot"):
        raise ValueError(f"kind must be 'heatmap' or 'dotplot', got {kind!r}.")
    mean, frac = _group_stats(adata, groupby, key, modules)
    own_figure = ax is None
    if own_figure:
        width = 1.2 + 0.45 * mean.shape[1]
        height = 1.0 + 0.35 * mean.shape[0]
        _, ax = plt.subplots(figsize=(max(width, 3.0), max(height, 2.5)))
    values = mean.to_numpy(dtype=float)
    finite = values[np.isfinite(values)]
    vmax = float(np.abs(finite).max()) if finite.size else 1.0
    vmax = vmax if vmax > 0 else 1.0
    n_groups, n_modules = values.shape
    if kind == "heatmap":
        artist = ax.imshow(values, cmap=cmap, vmin=-vmax, vmax=vmax, aspect="auto")
    else:
        xs, ys = np.meshgrid(np.arange(n_modules), np.arange(n_groups))
        sizes = 20.0 + 280.0 * frac.to_numpy(dtype=float).ravel()
        artist = ax.scatter(
            xs.ravel(),
            ys.ravel(),
            s=sizes,
            c=values.ravel(),
            cmap=cmap,
            vmin=-vmax,
            vmax=vmax,
            edgecolors="0.3",
            linewidths=0.5,
        )
        ax.set_xlim(-0.5, n_modules - 0.5)
        ax.set_ylim(n_groups - 0.5, -0.5)
        ax.set_axisbelow(True)
        ax.grid(True, color="0.92")
    ax.set_xticks(np.arange(n_modules), labels=[str(m) for m in mean.columns])
    ax.set_yticks(np.arange(n_groups), labels=[str(g) for g in mean.index])
    ax.set_xlabel(f"{key}")
    ax.set_ylabel(groupby)
    label = "mean score" if kind == "heatmap" else "mean score (dot area: fraction > 0)"
    ax.figure.colorbar(artist, ax=ax, label=label, shrink=0.8)
    return finish_figure(
        ax, ax.figure, own_figure=own_figure, show=show, save=save, name=f"gene_modules_{kind}"
    )
