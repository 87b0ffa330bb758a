"""``sft.tl.gene_modules``: gene programs from a foundation model's gene embeddings."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._anndata import DEFAULT_CHUNK_SIZE, params_record, resolve_adata, resolve_seed
from .._docs import DOC_COPY, DOC_RANDOM_STATE, doc_params
from .._validation import InputError
from ._model_arg import DOC_MODEL, locate_model

if TYPE_CHECKING:
    from anndata import AnnData

    from ..models.base import PretrainedMixin
    from ._enrichment import GeneSetsLike

__all__ = ["gene_modules"]

logger = logging.getLogger("scfm_tools")

# What gene_modules passes to compute_gene_embeddings itself (not through **embed_kwargs).
_OWN = ("layer", "random_state", "caller")


def _gene_mask(adata: AnnData, genes: Any) -> np.ndarray:
    """Which ``var`` rows the user restricts the modules to (all when ``genes`` is None)."""
    if genes is None:
        return np.ones(adata.n_vars, dtype=bool)
    if isinstance(genes, str):
        if genes not in adata.var.columns:
            raise InputError(
                f"genes={genes!r} is not a column of adata.var (columns: "
                f"{list(adata.var.columns)}); pass a boolean var column (e.g. "
                "'highly_variable'), a list of gene names, or a boolean mask."
            )
        column = adata.var[genes]
        if column.dtype != bool:
            raise InputError(
                f"adata.var[{genes!r}] has dtype {column.dtype}; a boolean column (True for "
                "the genes to keep) is needed."
            )
        return column.to_numpy(dtype=bool)
    values = np.asarray(genes)
    if values.dtype == bool:
        if values.shape != (adata.n_vars,):
            raise InputError(
                f"a boolean genes mask must have one entry per gene ({adata.n_vars}), got "
                f"shape {values.shape}."
            )
        return values.copy()
    wanted = pd.Index([str(g) for g in np.atleast_1d(values)])
    absent = wanted.difference(adata.var_names)
    if len(absent):
        raise InputError(
            f"{len(absent)} of the {len(wanted)} genes passed in `genes` are not in "
            f"adata.var_names, e.g. {list(absent[:5])}."
        )
    return adata.var_names.isin(wanted)


def _relabel(labels: np.ndarray, min_module_size: int) -> tuple[np.ndarray, list[str]]:
    """Name communities ``"0"``, ``"1"``... by decreasing size; small ones become -1."""
    ids, first, sizes = np.unique(labels, return_index=True, return_counts=True)
    keep = sizes >= min_module_size
    order = np.lexsort((first[keep], -sizes[keep]))
    new = np.full(ids.max() + 1, -1, dtype=np.int64)
    new[ids[keep][order]] = np.arange(order.size)
    return new[labels], [str(i) for i in range(order.size)]


@doc_params(model=DOC_MODEL, random_state=DOC_RANDOM_STATE, copy=DOC_COPY)
def gene_modules(
    adata: AnnData,
    model: str | os.PathLike | PretrainedMixin | None = None,
    *,
    use_rep: str | None = None,
    resolution: float = 1.0,
    n_neighbors: int = 15,
    genes: Sequence[str] | np.ndarray | str | None = None,
    min_module_size: int = 5,
    gene_sets: GeneSetsLike | None = None,
    score_cells: bool = True,
    layer: str | None = None,
    key_added: str = "gene_module",
    random_state: int | None = 0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    copy: bool = False,
    mod: str | None = None,
    **embed_kwargs: Any,
) -> AnnData | None:
    """Find gene modules (programs) by clustering gene embeddings; score and annotate them.

    1. **Embeddings**: ``adata.varm[use_rep]``; with ``use_rep=None``, the model's gene
       embeddings ``varm["X_<family>_genes"]`` when present (whatever their mode), else they
       are computed by :func:`~scfm_tools.tl.embed_genes` (token mode unless ``embed_kwargs``
       say otherwise) and written there. Giving ``embed_kwargs``, or naming a ``model`` other
       than the one that made the stored embeddings, computes them afresh and replaces them.
    2. **Graph**: the genes kept (``genes``, and only those with an embedding) are linked to
       their ``n_neighbors`` most cosine-similar genes; the edge weight is the cosine
       similarity. Neighbours are exact up to 10,000 genes (blockwise similarities) and
       approximate above (pynndescent, seeded).
    3. **Modules**: Leiden communities (leidenalg, modularity with ``resolution``, seeded, run
       to convergence); modules are named ``"0"``, ``"1"``... by decreasing size, and those
       smaller than ``min_module_size`` are dropped.
    4. **Scores** (``score_cells``): per cell, the mean over the module's genes of their
       z-scored log-normalised expression (each gene centred and scaled across cells, as
       ``sc.pp.scale`` without clipping; no control genes are subtracted, unlike
       ``sc.tl.score_genes``). Values come from ``layer`` or ``.X``; raw counts are
       normalised to 10,000 per cell and ``log1p``-ed on the fly, ``adata.X`` is not changed.
    5. **Enrichment** (``gene_sets``): each module against each gene set, a one-sided
       hypergeometric test with the genes in the graph as background, Benjamini-Hochberg
       adjusted over all (module, set) pairs whose set touches the background. Gene sets are
       matched to ``var_names``.

    Parameters
    ----------
    adata
        Cells x genes. A :class:`mudata.MuData` is accepted with ``mod=``.
    {model}
        Only used when the embeddings are computed here.
    use_rep
        ``adata.varm`` key of gene embeddings (genes x d, NaN rows for genes without one);
        ``None``: the model's, as above.
    resolution
        Leiden resolution: higher gives more, smaller modules.
    n_neighbors
        Neighbours per gene in the graph.
    genes
        Genes to cluster: a list of ``var_names``, a boolean mask over genes, or the name of a
        boolean ``var`` column (e.g. ``"highly_variable"``); ``None``: all genes with an
        embedding.
    min_module_size
        Modules with fewer genes are dropped (their genes get NaN).
    gene_sets
        Gene sets to test the modules against: a dict ``{{name: genes}}``, a long table with
        ``source`` (set) and ``target`` (gene) columns (decoupler's network format, e.g.
        :func:`sft.datasets.reactome_pathways() <scfm_tools.datasets.reactome_pathways>`), or
        the path of a ``.gmt`` / ``.gmt.gz`` file. ``None`` skips the test.
    score_cells
        Score each cell on each module.
    layer
        Layer with the expression to score (counts or log-normalised); ``None`` reads
        ``adata.X``. Also the values read by ``embed_genes(mode="context")``.
    key_added
        Name of the result: ``var[key_added]``, ``obsm[key_added + "_scores"]``,
        ``uns[key_added]``.
    {random_state}
        Seeds the neighbour search, Leiden and a context-mode embedding.
    chunk_size
        Cells read at a time when scoring (and embedding).
    {copy}
    mod
        Modality of a MuData (default ``"rna"``); results are written to that modality.
    **embed_kwargs
        Passed to :func:`~scfm_tools.tl.embed_genes` when the embeddings are computed here
        (``mode``, ``gene_key``, ``batch_size``, ``max_length``, ``device``...).

    Returns
    -------
    ``None``, or the modified copy with ``copy=True``. Writes

    - ``adata.var[key_added]``: categorical module of each gene (NaN for genes not clustered
      or in a dropped module);
    - ``adata.obsm[key_added + "_scores"]``: cells x modules DataFrame of scores
      (``score_cells=True``);
    - ``adata.uns[key_added]["params"]``: the parameters, embeddings used, numbers of genes
      and modules, package version; ``adata.uns[key_added]["enrichment"]`` (with
      ``gene_sets``): DataFrame with ``module``, ``gene_set``, ``overlap``, ``module_size``,
      ``set_size``, ``p_value``, ``p_adj`` (BH) and ``genes``, sorted by p-value, one row per
      pair with at least one shared gene;
    - when computed here, what :func:`~scfm_tools.tl.embed_genes` writes
      (``varm["X_<family>_genes"]``...).

    Raises
    ------
    KeyError
        ``use_rep`` is not in ``adata.varm``.
    InputError
        Genes not in ``var_names``, too few genes with an embedding for the graph, bad gene
        sets, or values that cannot be scored; nothing is written then.
    """
    from ._embed_genes import (
        compute_gene_embeddings,
        default_gene_key,
        write_gene_embeddings,
    )
    from ._enrichment import as_gene_sets, over_representation
    from ._gene_graph import EXACT_MAX, cosine_knn, knn_graph, leiden_labels
    from ._module_scores import module_scores

    if not resolution > 0:
        raise ValueError(f"resolution must be positive, got {resolution!r}.")
    for name, value in (("n_neighbors", n_neighbors), ("min_module_size", min_module_size)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    clash = sorted(set(embed_kwargs) & {*_OWN, "key_added", "copy", "mod"})
    if clash:
        raise TypeError(
            f"{clash} cannot be passed on to embed_genes here; gene_modules sets them itself."
        )
    seed = resolve_seed(random_state)
    obj, ad = resolve_adata(adata, copy=copy, mod=mod)
    started = time.perf_counter()
    # Everything is checked and computed first; nothing is written before the end.
    keep = _gene_mask(ad, genes)
    sets = as_gene_sets(gene_sets) if gene_sets is not None else None

    computed = None
    model_params: dict[str, Any] = {}
    embedding_mode = None
    if use_rep is not None:
        if use_rep not in ad.varm:
            raise KeyError(
                f"use_rep={use_rep!r} is not in adata.varm (present: {list(ad.varm.keys())}); "
                "run `sft.tl.embed_genes(adata)` first, or pass use_rep=None to compute the "
                "model's gene embeddings."
            )
        rep = use_rep
        emb = np.asarray(ad.varm[rep], dtype=np.float32)
    else:
        located = locate_model(model)
        rep = default_gene_key(located.family)
        recorded = ad.uns.get(rep[2:], {}).get("params", {}) if rep in ad.varm else {}
        reusable = (
            rep in ad.varm
            and not embed_kwargs
            and (model is None or recorded.get("model") in (None, located.params()["model"]))
        )
        if reusable:
            logger.info("gene_modules: using the gene embeddings in varm[%r]", rep)
            emb = np.asarray(ad.varm[rep], dtype=np.float32)
            model_params = {
                k: recorded[k] for k in ("model", "family", "weights_sha256") if k in recorded
            }
            embedding_mode = recorded.get("mode")
        else:
            if rep in ad.varm:
                logger.warning(
                    "gene_modules: varm[%r] will be replaced by gene embeddings of %s (%s).",
                    rep,
                    located.params()["model"],
                    embed_kwargs or "token mode",
                )
            computed, embedder = compute_gene_embeddings(
                ad,
                located,
                layer=layer,
                random_state=seed,
                chunk_size=chunk_size,
                caller="gene_modules",
                **embed_kwargs,
            )
            emb = computed.embeddings
            model_params = embedder.params()
            embedding_mode = computed.params["mode"]
    if emb.ndim != 2 or emb.shape[0] != ad.n_vars:
        raise InputError(
            f"adata.varm[{rep!r}] has shape {emb.shape}; gene embeddings must be a genes x "
            "dimensions matrix."
        )

    usable = keep & np.isfinite(emb).all(axis=1) & (np.abs(emb).sum(axis=1) > 0)
    columns = np.flatnonzero(usable)
    needed = max(n_neighbors + 1, min_module_size)
    if columns.size < needed:
        raise InputError(
            f"too few genes to build modules: {columns.size} of the {int(keep.sum())} genes "
            f"chosen have an embedding in varm[{rep!r}], but at least {needed} are needed "
            f"(n_neighbors + 1 = {n_neighbors + 1}, min_module_size = {min_module_size}). "
            "Pass more genes, lower n_neighbors, or check the vocabulary overlap."
        )
    indices, sims = cosine_knn(emb[columns], n_neighbors, random_state=seed)
    labels = leiden_labels(knn_graph(indices, sims), resolution=resolution, random_state=seed)
    labels, names = _relabel(labels, min_module_size)
    if not names:
        logger.warning(
            "gene_modules: no module has %d genes or more; lower min_module_size or resolution.",
            min_module_size,
        )
    module_cols = {name: columns[labels == i] for i, name in enumerate(names)}

    scores = values_read = None
    if score_cells and names:
        scores, values_read = module_scores(ad, module_cols, layer=layer, chunk_size=chunk_size)
    enrichment = None
    if sets is not None:
        gene_names = np.asarray(ad.var_names, dtype=object)
        enrichment = over_representation(
            {name: gene_names[cols] for name, cols in module_cols.items()},
            sets,
            gene_names[columns],
        )

    codes = np.full(ad.n_vars, -1, dtype=np.int64)
    codes[columns] = labels
    module = pd.Categorical.from_codes(codes, categories=names)
    params = params_record(
        **model_params,
        use_rep=rep,
        embedding_mode=embedding_mode,
        resolution=float(resolution),
        n_neighbors=int(n_neighbors),
        neighbors="exact" if columns.size <= EXACT_MAX else "pynndescent",
        min_module_size=int(min_module_size),
        n_genes=int(columns.size),
        n_modules=len(names),
        n_genes_in_modules=int((labels >= 0).sum()),
        random_state=seed,
        score="mean z-scored log-normalised expression" if scores is not None else None,
        score_values=values_read,
        layer=layer,
        n_gene_sets=len(sets) if sets is not None else None,
    )

    # Everything is computed: write.
    if computed is not None:
        write_gene_embeddings(ad, embedder, computed, rep)
    ad.var[key_added] = pd.Series(module, index=ad.var_names)
    if scores is not None:
        ad.obsm[f"{key_added}_scores"] = scores
    ad.uns[key_added] = {"params": params}
    if enrichment is not None:
        ad.uns[key_added]["enrichment"] = enrichment
    logger.info(
        "gene_modules: %d modules over %d genes in %.1f s -> var[%r]%s",
        len(names),
        columns.size,
        time.perf_counter() - started,
        key_added,
        f", obsm[{key_added + '_scores'!r}]" if scores is not None else "",
    )
    return obj if copy else None
