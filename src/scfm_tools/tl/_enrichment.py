"""Gene sets in the shapes users have them, and an over-representation test of gene groups."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import sparse

from .._validation import InputError

if TYPE_CHECKING:
    from typing import TypeAlias

    GeneSetsLike: TypeAlias = Mapping[str, Iterable[str]] | pd.DataFrame | str | os.PathLike[str]

__all__ = ["ENRICHMENT_COLUMNS", "as_gene_sets", "over_representation"]

ENRICHMENT_COLUMNS = [
    "module",
    "gene_set",
    "overlap",
    "module_size",
    "set_size",
    "p_value",
    "p_adj",
    "genes",
]


def as_gene_sets(gene_sets: GeneSetsLike) -> dict[str, list[str]]:
    """Turn ``gene_sets`` into ``{set name: [genes]}``.

    Parameters
    ----------
    gene_sets
        A dict ``{name: genes}``; a long table in :mod:`decoupler`'s network format (columns
        ``source`` for the set name and ``target`` for the gene, other columns ignored); or the
        path of a ``.gmt`` / ``.gmt.gz`` file.

    Returns
    -------
    ``{set name: [genes]}``, each gene once.
    """
    if isinstance(gene_sets, str | os.PathLike):
        from ..datasets import read_gmt

        return read_gmt(gene_sets, as_dict=True)
    if isinstance(gene_sets, pd.DataFrame):
        missing = [c for c in ("source", "target") if c not in gene_sets.columns]
        if missing:
            raise InputError(
                f"a gene-set table needs the columns 'source' (set name) and 'target' (gene), "
                f"as decoupler networks have; it lacks {missing} (columns: "
                f"{list(gene_sets.columns)})."
            )
        table = gene_sets[["source", "target"]].dropna().astype(str)
        sets = {
            name: list(dict.fromkeys(group["target"]))
            for name, group in table.groupby("source", sort=False)
        }
    elif isinstance(gene_sets, Mapping):
        sets = {}
        for name, genes in gene_sets.items():
            if isinstance(genes, str) or not isinstance(genes, Iterable):
                raise InputError(
                    f"gene set {name!r} must be a list of gene names, got {type(genes).__name__}."
                )
            sets[str(name)] = list(dict.fromkeys(str(g) for g in genes))
    else:
        raise TypeError(
            "gene_sets must be a dict {name: genes}, a DataFrame with 'source' and 'target' "
            f"columns, or the path of a .gmt file; got {type(gene_sets).__name__}."
        )
    sets = {name: genes for name, genes in sets.items() if genes}
    if not sets:
        raise InputError("gene_sets holds no gene set with at least one gene.")
    return sets


def _membership(groups: Mapping[str, Iterable[str]], position: dict[str, int]) -> sparse.csc_matrix:
    """Genes x groups 0/1 matrix over the background genes (genes outside it are left out)."""
    rows, cols = [], []
    for j, genes in enumerate(groups.values()):
        hits = {position[g] for g in genes if g in position}
        rows.extend(hits)
        cols.extend([j] * len(hits))
    data = np.ones(len(rows), dtype=np.float64)
    return sparse.csc_matrix((data, (rows, cols)), shape=(len(position), len(groups)))


def over_representation(
    modules: Mapping[str, Iterable[str]],
    gene_sets: Mapping[str, Iterable[str]],
    background: Iterable[str],
) -> pd.DataFrame:
    """One-sided hypergeometric test of each module against each gene set, BH-adjusted.

    For a module of ``n`` genes and a set with ``K`` of the ``N`` background genes, the p-value
    is ``P(X >= overlap)`` for ``X ~ Hypergeometric(N, K, n)``. Modules and sets are restricted
    to the background; every (module, set) pair with ``K >= 1`` is a test, and the
    Benjamini-Hochberg adjustment runs over all of them. Pairs with no overlap (p = 1) are
    left out of the table.

    Parameters
    ----------
    modules
        ``{module name: genes}``.
    gene_sets
        ``{set name: genes}``.
    background
        The universe of genes (the genes that could have fallen in a module).

    Returns
    -------
    DataFrame with columns ``module``, ``gene_set``, ``overlap``, ``module_size``,
    ``set_size`` (genes of the set in the background), ``p_value``, ``p_adj`` and ``genes``
    (the overlapping genes, ``;``-separated), sorted by p-value.
    """
    from scipy.stats import false_discovery_control, hypergeom

    position = {g: i for i, g in enumerate(dict.fromkeys(background))}
    mod_names, set_names = list(modules), list(gene_sets)
    M = _membership(modules, position)
    S = _membership(gene_sets, position)
    set_size = np.asarray(S.sum(axis=0)).ravel().astype(np.int64)
    tested = np.flatnonzero(set_size > 0)
    if not mod_names or tested.size == 0:
        return pd.DataFrame({c: [] for c in ENRICHMENT_COLUMNS})
    S = S[:, tested]
    set_size = set_size[tested]
    module_size = np.asarray(M.sum(axis=0)).ravel().astype(np.int64)
    overlap = np.rint((M.T @ S).toarray()).astype(np.int64)
    n_background = len(position)
    pvals = hypergeom.sf(overlap - 1, n_background, set_size[None, :], module_size[:, None])
    pvals = np.clip(pvals, 0.0, 1.0)
    padj = false_discovery_control(pvals.ravel(), method="bh").reshape(pvals.shape)
    padj = np.maximum(padj, pvals)  # guards float rounding: an adjusted p is never smaller
    i, j = np.nonzero(overlap > 0)
    names = np.asarray(list(position), dtype=object)
    in_module = M.T.toarray().astype(bool)  # modules x background genes
    S = S.tocsc()
    genes = []
    for a, b in zip(i, j, strict=True):
        members = S.indices[S.indptr[b] : S.indptr[b + 1]]
        genes.append(";".join(names[np.sort(members[in_module[a, members]])]))
    table = pd.DataFrame(
        {
            "module": np.asarray(mod_names, dtype=object)[i],
            "gene_set": np.asarray(set_names, dtype=object)[tested[j]],
            "overlap": overlap[i, j],
            "module_size": module_size[i],
            "set_size": set_size[j],
            "p_value": pvals[i, j],
            "p_adj": padj[i, j],
            "genes": genes,
        }
    )
    table = table.sort_values(["p_value", "module", "gene_set"], kind="stable")
    return table.reset_index(drop=True)
