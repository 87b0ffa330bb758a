"""``sft.tl.grn``: a gene regulatory network read from a foundation model.

Two readings of a model: ``"attention"`` averages the gene x gene attention of one transformer
layer over cells (scGPT), ``"embedding"`` takes the cosine similarity of gene embeddings. Either
way each gene keeps its ``top_k`` highest-scoring targets, stored as a sparse genes x genes
matrix in ``varp`` and as an edge table in ``uns``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from scipy import sparse

from .._anndata import DEFAULT_CHUNK_SIZE, params_record, resolve_adata
from .._docs import DOC_CHUNK_SIZE, DOC_COPY, DOC_LAYER, DOC_RANDOM_STATE, doc_params
from .._progress import progress_bar
from .._validation import InputError
from ._model_arg import (
    DOC_MODEL,
    check_model_values,
    load_for,
    locate_model,
    prepare_device,
    unavailable,
)

if TYPE_CHECKING:
    from anndata import AnnData

    from ..models.base import PretrainedMixin

__all__ = ["grn", "resolve_grn_key"]

logger = logging.getLogger("scfm_tools")

GRNMethod = Literal["attention", "embedding"]
_METHODS = ("attention", "embedding")
#: With more groups than this, per-group networks are kept as edge tables only (no varp).
MAX_GROUP_VARP = 20
#: Dense scores (all scored pairs) are kept in ``uns`` up to this many scored genes (16 MB).
MAX_DENSE_GENES = 2_000
# Rows of cosine similarities computed at a time (bounds memory for large gene sets).
_ROW_BLOCK = 1_024


def resolve_grn_key(adata: AnnData, key: str | None, caller: str) -> str:
    """Return ``key``, checked, or the only GRN in ``adata`` (written by :func:`grn`)."""
    found = [
        k
        for k, v in adata.uns.items()
        if isinstance(v, dict) and v.get("params", {}).get("tool") == "grn" and k in adata.varp
    ]
    if key is None:
        if len(found) == 1:
            return found[0]
        if not found:
            raise KeyError(f"{caller}: no GRN in this AnnData; run `sft.tl.grn(adata)` first.")
        raise KeyError(f"{caller}: several GRNs in this AnnData ({found}); pick one with `key=`.")
    if key not in found:
        raise KeyError(
            f"{caller}: {key!r} is not a GRN written by sft.tl.grn (found: {found}); run "
            "`sft.tl.grn(adata, key_added=...)` first or pass one of those."
        )
    return key


def _resolve_genes(adata: AnnData, genes: Sequence[str] | str | None) -> list[str] | None:
    if genes is None:
        return None
    if isinstance(genes, str):
        if genes not in adata.var.columns or adata.var[genes].dtype != bool:
            raise KeyError(
                f"genes={genes!r} is not a boolean column of adata.var; pass a list of gene "
                "names or such a column (e.g. 'highly_variable' from "
                "`sc.pp.highly_variable_genes`)."
            )
        names = list(adata.var_names[adata.var[genes].to_numpy()])
    else:
        names = [str(g) for g in genes]
        absent = pd.Index(names).difference(adata.var_names)
        if len(absent):
            raise KeyError(
                f"{len(absent)} of the given genes are not in adata.var_names, e.g. "
                f"{list(absent[:5])}."
            )
    if len(set(names)) < 2:
        raise InputError(f"a network needs at least two genes; `genes` gives {len(set(names))}.")
    return names


def _resolve_groups(adata: AnnData, groupby: str | None) -> tuple[np.ndarray | None, list[str]]:
    """Return each cell's group code (-1: no group) and the group names with cells."""
    if groupby is None:
        return None, []
    if groupby not in adata.obs.columns:
        raise KeyError(
            f"groupby={groupby!r} is not a column of adata.obs (columns: "
            f"{list(adata.obs.columns)}); pass one of those."
        )
    labels = adata.obs[groupby]
    cat = labels if isinstance(labels.dtype, pd.CategoricalDtype) else labels.astype("category")
    cat = cat.cat.remove_unused_categories()
    if len(cat.cat.categories) == 0:
        raise InputError(f"adata.obs[{groupby!r}] has no labels (all missing).")
    return cat.cat.codes.to_numpy().astype(np.int64), [str(c) for c in cat.cat.categories]


def _top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Column indices and values of the ``k`` largest entries of each row (NaN counts lowest)."""
    k = min(k, scores.shape[1])
    filled = np.where(np.isnan(scores), -np.inf, scores)
    if k < scores.shape[1]:
        cols = np.argpartition(-filled, k - 1, axis=1)[:, :k]
    else:
        cols = np.broadcast_to(np.arange(k), filled.shape).copy()
    order = np.argsort(-np.take_along_axis(filled, cols, axis=1), axis=1, kind="stable")
    cols = np.take_along_axis(cols, order, axis=1)
    return cols, np.take_along_axis(scores, cols, axis=1)


def _sparse_network(
    scores: np.ndarray, var_index: np.ndarray, n_vars: int, k: int, *, row_offset: int = 0
) -> sparse.coo_matrix:
    """Top-``k`` targets of each source row (scored genes -> positions in var), as COO."""
    cols, vals = _top_k(scores, k)
    ok = np.isfinite(vals)
    rows = np.broadcast_to(np.arange(scores.shape[0])[:, None] + row_offset, cols.shape)
    return sparse.coo_matrix(
        (vals[ok].astype(np.float32), (var_index[rows[ok]], var_index[cols[ok]])),
        shape=(n_vars, n_vars),
    )


def _edges(network: sparse.spmatrix, var_names: pd.Index) -> pd.DataFrame:
    coo = sparse.coo_matrix(network)
    table = pd.DataFrame(
        {
            "source": np.asarray(var_names[coo.row], dtype=object),
            "target": np.asarray(var_names[coo.col], dtype=object),
            "score": coo.data.astype(np.float32),
        }
    )
    return table.sort_values(
        ["score", "source", "target"], ascending=[False, True, True]
    ).reset_index(drop=True)


def _attention_scores(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Regulator x target scores from query x key attention sums: the average, transposed.

    Pairs never together in a cell, and the diagonal, get NaN (no score).
    """
    mean = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
    scores = mean.T.astype(np.float32)
    scores[counts.T == 0] = np.nan
    np.fill_diagonal(scores, np.nan)
    return scores


def _embedding_scores(emb: np.ndarray, rows: slice) -> np.ndarray:
    """Cosine similarities of the rows ``rows`` of unit-norm ``emb`` to all its rows."""
    block = emb[rows] @ emb.T
    block[np.arange(block.shape[0]), np.arange(rows.start, rows.start + block.shape[0])] = np.nan
    return block


@doc_params(
    model=DOC_MODEL,
    layer=DOC_LAYER,
    random_state=DOC_RANDOM_STATE,
    chunk_size=DOC_CHUNK_SIZE,
    copy=DOC_COPY,
)
def grn(
    adata: AnnData,
    model: str | os.PathLike | PretrainedMixin | None = None,
    *,
    method: GRNMethod = "attention",
    groupby: str | None = None,
    genes: Sequence[str] | str | None = None,
    top_k: int = 20,
    layer: str | None = None,
    attention_layer: int = -1,
    use_rep: str | None = None,
    batch_size: int = 16,
    max_length: int | None = None,
    random_state: int | None = 0,
    device: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    key_added: str | None = None,
    mod: str | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Infer a gene regulatory network (GRN) from a foundation model.

    ``method="attention"``: the cells are tokenized as for :func:`~scfm_tools.tl.embed_cells`
    (expressed vocabulary genes among ``genes``, per-cell binning, random subsampling above
    ``max_length``), and the attention weights of one transformer layer, averaged over the
    heads, are averaged over the cells in which both genes of a pair are tokens. The direction
    is kept (the matrix is not symmetrised): a layer's output at a query gene is a mix of the
    values at the key genes, so the key gene is read as the regulator (source) and the query
    gene as the target; the score of ``source -> target`` is the attention ``target`` pays to
    ``source``. Whether attention direction reflects regulatory direction at all is debated;
    symmetrise ``varp[key] + varp[key].T`` if you prefer not to assume it. Pairs never seen
    together in a cell get no score. With ``groupby``, one network per group of cells is
    computed in the same pass, beside the network of all cells.

    ``method="embedding"``: the cosine similarity of the genes' embeddings in
    ``adata.varm[use_rep]`` (default ``"X_<family>_genes"``, computed by
    :func:`~scfm_tools.tl.embed_genes` with ``mode="token"`` when absent, and written there
    too). Symmetric, so direction carries no information; genes without an embedding (NaN
    rows, e.g. outside the vocabulary) are left out.

    Each scored gene then keeps its ``top_k`` highest-scoring targets (itself excluded).

    Parameters
    ----------
    adata
        Cells x genes (raw counts preferred for ``"attention"``; ``"embedding"`` reads only
        ``varm``). A :class:`mudata.MuData` is accepted with ``mod=``.
    {model}
        With ``method="embedding"`` it names the family (default keys) and computes the
        gene embeddings when ``use_rep`` is absent.
    method
        ``"attention"`` (families with attention access: scGPT) or ``"embedding"``.
    groupby
        Column of ``adata.obs``: also infer one network per group of cells (attention only).
    genes
        The genes to score: a list of ``var_names`` or the name of a boolean ``var`` column
        (e.g. ``"highly_variable"``); ``None``: all genes in the model's vocabulary (attention:
        at most 5,000 tokens, so pass e.g. highly variable genes on full transcriptomes).
    top_k
        Targets kept per source gene.
    {layer}
        Attention only.
    attention_layer
        Transformer layer whose attention is read (negative counts from the last).
    use_rep
        ``adata.varm`` key of the gene embeddings (embedding only).
    batch_size
        Cells per forward pass (attention only).
    max_length
        Most genes per cell (plus ``<cls>``); ``None`` uses the checkpoint's ``max_seq_len``.
    {random_state}
        The binning tie-breaks and the subsampling, as in ``embed_cells``.
    device
        ``"cpu"``, ``"cuda"``, ``"auto"``...; ``None`` uses ``sft.settings.device``.
    {chunk_size} Attention only.
    key_added
        Key of the results; default ``"<family>_grn_<method>"`` (e.g.
        ``"scgpt_grn_attention"``), so that both methods can sit side by side.
    mod
        Modality of a MuData (default ``"rna"``).
    {copy}

    Returns
    -------
    ``None``, or the modified copy with ``copy=True``. Writes, with ``key`` the key above,

    - ``adata.varp[key]``: CSR float32 genes x genes over all ``var_names``, row = source,
      column = target, the ``top_k`` scores of each scored source gene, zeros elsewhere;
    - ``adata.varp[f"{{key}}_{{group}}"]``: the same per group, with ``groupby`` and at most
      20 groups (with more, only the edge table below holds the group networks; a ``/`` in a
      group name becomes ``_`` in the key);
    - ``adata.uns[key]["edges"]``: DataFrame ``source``, ``target``, ``score`` of the network
      of all cells, sorted by decreasing score;
    - ``adata.uns[key]["group_edges"]``: with ``groupby``, DataFrame ``source``, ``target``,
      ``score``, ``group``;
    - ``adata.uns[key]["genes"]``: the scored genes (attention: the chosen genes in the
      model's vocabulary; embedding: those with an embedding), the universe
      :func:`~scfm_tools.tl.grn_score` evaluates over;
    - ``adata.uns[key]["scores"]``: float32 scored x scored genes, all scores (source rows,
      NaN for unscored pairs and the diagonal), kept when at most 2,000 genes are scored;
    - ``adata.uns[key]["params"]``: model, weights sha256, method, ``top_k``, groups, layer and
      run parameters, package version;
    - with ``method="embedding"`` and the embedding computed here: what
      :func:`~scfm_tools.tl.embed_genes` writes.

    Raises
    ------
    InputError
        Bad values (NaN, negative, empty cells), too little vocabulary overlap, or fewer than
        two genes to score.
    NotImplementedError
        ``method="attention"`` for a family without attention access (the message names those
        that have it).
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {list(_METHODS)}, got {method!r}.")
    if isinstance(top_k, bool) or not isinstance(top_k, int | np.integer) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    obj, ad = resolve_adata(adata, copy=copy, mod=mod)
    if method == "embedding" and groupby is not None:
        raise ValueError(
            "groupby applies to method='attention' only: gene embeddings are not per group of "
            "cells. Subset the cells and embed them (`sft.tl.embed_genes(mode='context')`)."
        )
    gene_list = _resolve_genes(ad, genes)
    codes, group_names = _resolve_groups(ad, groupby)
    located = locate_model(model)
    key = key_added or f"{located.family}_grn_{method}"
    started = time.perf_counter()
    extra: dict[str, Any] = {}
    group_scores: list[np.ndarray] = []
    embedding_write = None

    if method == "attention":
        if not hasattr(located.cls, "get_attention_sums"):
            raise NotImplementedError(
                "method='attention' needs access to the model's attention weights: "
                f"{unavailable('get_attention_sums', located.family, 'attention')} Use "
                "method='embedding' for this model."
            )
        check_model_values(ad, layer, located, chunk_size=chunk_size, caller="grn")
        loaded, _ = load_for(located, "get_attention_sums", {})
        dev = prepare_device(loaded, device)
        n_groups = len(group_names)
        # Cells of no group still count for the network of all cells: an extra bucket.
        buckets = None if codes is None else np.where(codes < 0, n_groups, codes)
        sums, counts, columns, run_params = loaded.get_attention_sums(
            ad,
            layer=layer,
            genes=gene_list,
            groups=buckets,
            n_groups=n_groups + 1 if codes is not None else 1,
            attention_layer=attention_layer,
            batch_size=batch_size,
            max_length=max_length,
            random_state=random_state,
            chunk_size=chunk_size,
        )
        if columns.size < 2:
            raise InputError(
                f"only {columns.size} of the chosen genes is in the model's vocabulary: a "
                "network needs at least two."
            )
        scores = _attention_scores(sums.sum(0), counts.sum(0))
        group_scores = [_attention_scores(sums[g], counts[g]) for g in range(len(group_names))]
        extra.update(run_params, batch_size=batch_size, layer=layer, device=str(dev))
    else:
        from ._embed_genes import compute_gene_embeddings, default_gene_key

        rep = use_rep or default_gene_key(located.family)
        if rep in ad.varm:
            emb = np.asarray(ad.varm[rep], dtype=np.float64)
        elif use_rep is not None:
            raise KeyError(
                f"use_rep={use_rep!r} is not in adata.varm (present: {list(ad.varm.keys())}); "
                "run `sft.tl.embed_genes(adata)` or pass one of those."
            )
        else:
            logger.info("grn: varm[%r] is absent; computing it with embed_genes", rep)
            embedding_write, embedder = compute_gene_embeddings(
                ad, located, device=device, caller="grn"
            )
            emb = np.asarray(embedding_write.embeddings, dtype=np.float64)
        if emb.ndim != 2 or emb.shape[0] != ad.n_vars:
            raise InputError(f"adata.varm[{rep!r}] must be a genes x dimensions matrix.")
        norms = np.linalg.norm(emb, axis=1)
        usable = np.isfinite(emb).all(axis=1) & (norms > 0)
        if gene_list is not None:
            usable &= ad.var_names.isin(gene_list)
        columns = np.flatnonzero(usable)
        if columns.size < 2:
            raise InputError(
                f"only {columns.size} of the chosen genes has an embedding in "
                f"adata.varm[{rep!r}]: a network needs at least two."
            )
        unit = (emb[columns] / norms[columns, None]).astype(np.float32)
        scores = None
        extra["use_rep"] = rep

    n = columns.size
    var_names = ad.var_names
    if method == "attention" or n <= MAX_DENSE_GENES:
        if scores is None:
            scores = _embedding_scores(unit, slice(0, n))
        network = _sparse_network(scores, columns, ad.n_vars, top_k).tocsr()
    else:
        parts = []
        with progress_bar(n, desc="grn", unit="genes") as bar:
            for lo in range(0, n, _ROW_BLOCK):
                rows = slice(lo, min(lo + _ROW_BLOCK, n))
                block = _embedding_scores(unit, rows)
                parts.append(_sparse_network(block, columns, ad.n_vars, top_k, row_offset=lo))
                bar.update(len(block))
        network = sum(parts[1:], parts[0]).tocsr()
    if network.nnz == 0:
        logger.warning(
            "grn: no pair of the %d scored genes got a score (attention: no two of them are "
            "expressed in the same cell); the network is empty.",
            n,
        )
    result: dict[str, Any] = {
        "edges": _edges(network, var_names),
        "genes": np.asarray(var_names[columns], dtype=object),
    }
    if scores is not None and n <= MAX_DENSE_GENES:
        result["scores"] = scores
    group_networks = {
        name: _sparse_network(s, columns, ad.n_vars, top_k).tocsr()
        for name, s in zip(group_names, group_scores, strict=True)
    }
    if groupby is not None:
        tables = [_edges(net, var_names).assign(group=name) for name, net in group_networks.items()]
        result["group_edges"] = (
            pd.concat(tables, ignore_index=True)
            if tables
            else pd.DataFrame(columns=["source", "target", "score", "group"])
        )
    result["params"] = params_record(
        **located.params(),
        tool="grn",
        method=method,
        top_k=int(top_k),
        groupby=groupby,
        groups=group_names if groupby is not None else None,
        n_genes_scored=int(n),
        **extra,
    )

    # Everything is computed: write.
    if embedding_write is not None:
        from ._embed_genes import write_gene_embeddings

        write_gene_embeddings(ad, embedder, embedding_write, extra["use_rep"])
    ad.varp[key] = network
    if len(group_names) <= MAX_GROUP_VARP:
        for name, net in group_networks.items():
            # h5ad keys cannot hold "/"
            ad.varp[f"{key}_{name}".replace("/", "_")] = net
    ad.uns[key] = result
    logger.info(
        "grn: %d genes scored (%s), %d edges in %.1f s -> varp[%r], uns[%r]",
        n,
        method,
        network.nnz,
        time.perf_counter() - started,
        key,
        key,
    )
    return obj if copy else None
