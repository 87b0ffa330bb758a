"""``sft.pl.annotation``: predicted against reference cell types, as a confusion matrix."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._anndata import resolve_adata
from .._docs import doc_params
from .._labels import UNASSIGNED
from ._utils import DOC_PLOT, finish_figure

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes

__all__ = ["annotation", "confusion_matrix"]


def _ordered_levels(column: pd.Series) -> list[str]:
    """Categories in their order (all of them for a categorical, so unused classes show)."""
    if isinstance(column.dtype, pd.CategoricalDtype):
        return [str(c) for c in column.cat.categories]
    return sorted(str(v) for v in column.dropna().unique())


def confusion_matrix(
    adata: AnnData, key: str, reference_key: str, *, normalize: bool = True
) -> pd.DataFrame:
    """Count cells per (reference label, predicted label): rows reference, columns predicted.

    Rows are the reference labels that occur (cells without one are left out); columns are all
    the predicted classes, ``"Unassigned"`` last. With ``normalize``, each row is divided by its
    total (the fraction of each reference type given each label).
    """
    for column, arg in ((key, "key"), (reference_key, "reference_key")):
        if column not in adata.obs.columns:
            raise KeyError(
                f"adata.obs has no column {column!r} ({arg}=); columns: "
                f"{list(adata.obs.columns)}. Run sft.tl.annotate first, or name the column."
            )
    truth, predicted = adata.obs[reference_key], adata.obs[key]
    keep = (truth.notna() & predicted.notna()).to_numpy()
    if not keep.any():
        raise ValueError(f"no cell has both obs[{reference_key!r}] and obs[{key!r}].")
    rows = [r for r in _ordered_levels(truth) if (truth[keep].astype(str) == r).any()]
    columns = [c for c in _ordered_levels(predicted) if c != UNASSIGNED]
    if UNASSIGNED in _ordered_levels(predicted):
        columns.append(UNASSIGNED)
    table = pd.crosstab(truth[keep].astype(str), predicted[keep].astype(str))
    table = table.reindex(index=rows, columns=columns, fill_value=0)
    table.index.name, table.columns.name = reference_key, key
    if normalize:
        return table.div(table.sum(axis=1), axis=0)
    return table


@doc_params(plot=DOC_PLOT)
def annotation(
    adata: AnnData,
    key: str = "scgpt_label",
    reference_key: str = "cell_type",
    *,
    normalize: bool = True,
    cmap: str = "Blues",
    mod: str | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | bool | None = None,
) -> Axes | None:
    """Confusion matrix of predicted against known cell types, numbers written in each cell.

    Rows are the known (reference) labels of ``obs[reference_key]``, columns the labels
    :func:`sft.tl.annotate <scfm_tools.tl.annotate>` predicted in ``obs[key]``, every predicted
    class included and ``"Unassigned"`` as the last column. Cells lacking either label are left
    out.

    Parameters
    ----------
    adata
        The annotated AnnData (a MuData with ``mod=``).
    key
        Column of ``obs`` with the predicted labels.
    reference_key
        Column of ``obs`` with the known labels.
    normalize
        Divide each row by its number of cells (fractions summing to 1 per known type);
        ``False`` shows cell counts.
    cmap
        Colormap of the matrix.
    mod
        Modality of a MuData (default ``"rna"``).
    {plot}

    Returns
    -------
    The Axes, unless the figure was shown.
    """
    import matplotlib.pyplot as plt

    _, ad = resolve_adata(adata, mod=mod)
    table = confusion_matrix(ad, key, reference_key, normalize=normalize)
    values = table.to_numpy(dtype=float)
    own_figure = ax is None
    if own_figure:
        n_rows, n_cols = values.shape
        _, ax = plt.subplots(figsize=(1.5 + 0.6 * n_cols, 1.0 + 0.5 * n_rows))
    vmax = 1.0 if normalize else max(float(values.max()), 1.0)
    image = ax.imshow(values, cmap=cmap, vmin=0.0, vmax=vmax, aspect="auto")
    for (i, j), value in np.ndenumerate(values):
        # White text on dark cells keeps every number readable.
        ax.text(
            j,
            i,
            f"{value:.2f}" if normalize else f"{int(value)}",
            ha="center",
            va="center",
            fontsize=8,
            color="white" if value > 0.6 * vmax else "black",
        )
    ax.set_xticks(range(values.shape[1]), labels=list(table.columns), rotation=45, ha="right")
    ax.set_yticks(range(values.shape[0]), labels=list(table.index))
    ax.set_xlabel(f"predicted ({key})")
    ax.set_ylabel(f"reference ({reference_key})")
    ax.figure.colorbar(image, ax=ax, label="fraction of row" if normalize else "cells")
    return finish_figure(
        ax, ax.figure, own_figure=own_figure, show=show, save=save, name=f"annotation_{key}"
    )
