"""``sft.pl.grn``: the strongest edges of an inferred GRN around some genes, as a network."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._anndata import resolve_adata
from .._docs import doc_params
from ._utils import DOC_PLOT, as_list, finish_figure

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes

__all__ = ["grn"]

logger = logging.getLogger("scfm_tools")


def _edges_around(
    adata: AnnData, key: str, genes: list[str], n_edges: int, group: str | None
) -> pd.DataFrame:
    stored = adata.uns[key]
    if group is None:
        table = stored["edges"]
    else:
        if "group_edges" not in stored:
            raise KeyError(f"uns[{key!r}] holds no group networks; run sft.tl.grn with groupby=.")
        table = stored["group_edges"]
        groups = list(pd.unique(table["group"].astype(str)))
        if str(group) not in groups:
            raise KeyError(f"group {group!r} is not among the GRN's groups {groups}.")
        table = table[table["group"].astype(str) == str(group)]
    near = table[table["source"].isin(genes) | table["target"].isin(genes)]
    if near.empty:
        raise ValueError(
            f"no edge of the GRN {key!r} touches {genes}; pick genes the GRN scored "
            f"(adata.uns[{key!r}]['genes'])."
        )
    near = near.sort_values(["score", "source", "target"], ascending=[False, True, True])
    return near.head(n_edges).reset_index(drop=True)


@doc_params(plot=DOC_PLOT)
def grn(
    adata: AnnData,
    genes: str | Sequence[str],
    key: str | None = None,
    n_edges: int = 20,
    *,
    group: str | None = None,
    mod: str | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | bool | None = None,
) -> Axes | None:
    """Draw the top edges of an inferred GRN that start or end at the given genes.

    Reads the edge table :func:`sft.tl.grn <scfm_tools.tl.grn>` wrote, keeps the ``n_edges``
    highest-scoring edges with a source or target among ``genes``, and draws them as a directed
    network (spring layout, fixed seed): arrows point from regulator to target, edge width grows
    with the score, the given genes are filled in colour. Given genes left without an edge
    among those drawn are named in a logged warning. ``save=True`` writes ``grn_<key>.png``.

    Parameters
    ----------
    adata
        The AnnData :func:`~scfm_tools.tl.grn` wrote into (a MuData with ``mod=``).
    genes
        A gene name or a list of them.
    key
        The GRN's key; ``None`` picks the only one in ``adata``.
    n_edges
        Most edges drawn.
    group
        Draw the network of this group of cells (GRNs computed with ``groupby``); ``None``: all
        cells.
    mod
        Modality of a MuData (default ``"rna"``).
    {plot}

    Returns
    -------
    The Axes, unless the figure was shown.
    """
    import matplotlib.pyplot as plt
    import networkx as nx

    from ..tl._grn import resolve_grn_key

    if isinstance(n_edges, bool) or not isinstance(n_edges, int | np.integer) or n_edges < 1:
        raise ValueError(f"n_edges must be a positive integer, got {n_edges!r}.")
    _, ad = resolve_adata(adata, mod=mod)
    key = resolve_grn_key(ad, key, "pl.grn")
    genes = [str(g) for g in as_list(genes)]
    absent = [g for g in genes if g not in ad.var_names]
    if absent:
        raise KeyError(f"genes not in adata.var_names: {absent[:5]}.")
    edges = _edges_around(ad, key, genes, int(n_edges), group)

    graph = nx.DiGraph()
    graph.add_weighted_edges_from(edges[["source", "target", "score"]].itertuples(index=False))
    nodes = list(graph.nodes)
    undrawn = [g for g in genes if g not in graph]
    if undrawn:
        logger.warning(
            "pl.grn: %d of the genes are not drawn, having no edge among the top %d shown "
            "(none in the GRN %r at all, or only weaker ones): %s",
            len(undrawn),
            len(edges),
            key,
            ", ".join(undrawn[:20]) + (" ..." if len(undrawn) > 20 else ""),
        )
    pos = nx.spring_layout(graph, seed=0)
    scores = edges["score"].to_numpy(dtype=float)
    span = scores.max() - scores.min()
    widths = 0.8 + 3.2 * ((scores - scores.min()) / span if span > 0 else np.ones_like(scores))
    own_figure = ax is None
    if own_figure:
        _, ax = plt.subplots(figsize=(6, 6))
    colors = ["tab:red" if n in genes else "lightgrey" for n in nodes]
    nx.draw_networkx_nodes(graph, pos, nodelist=nodes, node_color=colors, node_size=500, ax=ax)
    nx.draw_networkx_labels(graph, pos, font_size=8, ax=ax)
    nx.draw_networkx_edges(
        graph,
        pos,
        edgelist=list(zip(edges["source"], edges["target"], strict=True)),
        width=widths,
        arrows=True,
        arrowsize=12,
        node_size=500,
        connectionstyle="arc3,rad=0.1",
        edge_color="dimgrey",
        ax=ax,
    )
    title = f"{key}" + (f" ({group})" if group is not None else "")
    ax.set_title(f"{title}: top {len(edges)} edges")
    ax.set_axis_off()

    return finish_figure(
        ax, ax.figure, own_figure=own_figure, show=show, save=save, name=f"grn_{key}"
    )
