"""``sft.pl.imputation``: observed against imputed expression, and per-gene agreement."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np

from .._anndata import get_matrix, resolve_adata
from .._docs import doc_params
from ._utils import DOC_PLOT, as_list, finish_figure

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes

__all__ = ["imputation"]

Scale = Literal["auto", "log1p", "counts"]
# Families whose imputed layer holds expected counts rather than log1p values.
_COUNT_FAMILIES = {"cellplm"}


def _log1p_cp10k(X: np.ndarray) -> np.ndarray:
    totals = np.nansum(X, axis=1, keepdims=True)
    return np.log1p(X / np.where(totals > 0, totals, 1) * 1e4)


def _imputed_scale(adata: AnnData, layer: str, scale: Scale) -> str:
    if scale != "auto":
        return scale
    params = adata.uns.get(layer, {}).get("params", {})
    return "counts" if params.get("family") in _COUNT_FAMILIES else "log1p"


def _per_gene_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    denom = np.sqrt((a**2).sum(axis=0) * (b**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (a * b).sum(axis=0) / denom, np.nan)


@doc_params(plot=DOC_PLOT)
def imputation(
    adata: AnnData,
    layer: str = "scfoundation_imputed",
    *,
    observed_layer: str | None = None,
    genes: str | Sequence[str] | None = None,
    scale: Scale = "auto",
    n_points: int = 5_000,
    random_state: int = 0,
    mod: str | None = None,
    ax: Sequence[Axes] | None = None,
    show: bool | None = None,
    save: str | os.PathLike | bool | None = None,
) -> list[Axes] | None:
    """Compare imputed with observed expression.

    Left: observed against imputed values of single cells (a random sample of ``n_points``
    cell-gene entries, of ``genes`` when given), both as ``log1p`` counts per 10,000. Right: the
    Pearson correlation of observed and imputed values across cells, one per gene, as a
    histogram (median marked). Genes the model does not know (NaN in the layer) are left out.

    Parameters
    ----------
    adata
        The AnnData :func:`sft.tl.impute <scfm_tools.tl.impute>` wrote into (a MuData with
        ``mod=``).
    layer
        The imputed layer.
    observed_layer
        Layer with the observed counts; ``None`` uses ``.X``. Counts are shown as ``log1p``
        counts per 10,000.
    genes
        Genes whose entries make the scatter; ``None``: all genes.
    scale
        What the imputed layer holds: ``"log1p"`` (``log1p`` counts per 10,000: scFoundation),
        ``"counts"`` (expected counts: CellPLM; normalised and ``log1p``-transformed here) or
        ``"auto"`` (from the family recorded in ``adata.uns[layer]["params"]``).
    n_points
        Most entries in the scatter.
    random_state
        Seed of the sampling of entries.
    mod
        Modality of a MuData (default ``"rna"``).
    {plot}
        With ``ax=``, give two Axes (scatter, histogram).

    Returns
    -------
    The two Axes ``[scatter, histogram]``, unless the figure was shown.
    """
    import matplotlib.pyplot as plt

    _, ad = resolve_adata(adata, mod=mod)
    if layer not in ad.layers:
        raise KeyError(
            f"adata.layers has no {layer!r} (it has {list(ad.layers)}); run sft.tl.impute first "
            "or pass layer=."
        )
    if n_points < 1:
        raise ValueError(f"n_points must be a positive integer, got {n_points!r}.")
    gene_list = [str(g) for g in as_list(genes)]
    absent = [g for g in gene_list if g not in ad.var_names]
    if absent:
        raise KeyError(f"genes not in adata.var_names: {absent[:5]}.")
    observed = get_matrix(ad, observed_layer)
    observed = _log1p_cp10k(
        observed.toarray() if hasattr(observed, "toarray") else np.asarray(observed, float)
    )
    imputed = np.asarray(ad.layers[layer], dtype=float)
    if _imputed_scale(ad, layer, scale) == "counts":
        imputed = _log1p_cp10k(imputed)
    known = ~np.isnan(imputed).all(axis=0)
    if not known.any():
        raise ValueError(f"layers[{layer!r}] holds no imputed value (all NaN).")

    columns = np.flatnonzero(known)
    if gene_list:
        columns = np.intersect1d(columns, ad.var_names.get_indexer(gene_list))
    rng = np.random.default_rng(random_state)
    n_entries = ad.n_obs * columns.size
    picks = rng.choice(n_entries, size=min(n_points, n_entries), replace=False)
    rows, cols = picks // columns.size, columns[picks % columns.size]
    r = _per_gene_pearson(observed[:, known], imputed[:, known])
    r = r[np.isfinite(r)]

    own_figure = ax is None
    if own_figure:
        fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    else:
        axes = list(ax)
        if len(axes) != 2:
            raise ValueError(f"ax must be two Axes (scatter, histogram), got {len(axes)}.")
        fig = axes[0].figure
    scatter, hist = axes
    scatter.scatter(observed[rows, cols], imputed[rows, cols], s=3, alpha=0.3, rasterized=True)
    top = float(max(observed[rows, cols].max(), imputed[rows, cols].max(), 1e-6))
    scatter.plot([0, top], [0, top], color="grey", lw=0.8)
    scatter.set_xlabel("observed (log1p CP10k)")
    scatter.set_ylabel(f"{layer} (log1p CP10k)")
    scatter.set_title(f"{rows.size:,} cell-gene entries")
    hist.hist(r, bins=30, color="tab:blue")
    if r.size:
        hist.axvline(np.median(r), color="black", ls="--", lw=1)
    hist.set_xlabel("Pearson r per gene (across cells)")
    hist.set_ylabel("genes")
    hist.set_title(f"{r.size:,} genes; median r = {np.median(r) if r.size else np.nan:.2f}")
    return finish_figure(
        [scatter, hist],
        fig,
        own_figure=own_figure,
        show=show,
        save=save,
        name=f"imputation_{layer}",
    )
