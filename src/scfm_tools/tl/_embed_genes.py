"""``sft.tl.embed_genes``: gene embeddings from a foundation model, one vector per gene."""

from __future__ import annotations

import inspect
import logging
import os
import time
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .._anndata import DEFAULT_CHUNK_SIZE, params_record, resolve_adata
from .._docs import DOC_CHUNK_SIZE, DOC_COPY, DOC_LAYER, DOC_RANDOM_STATE, doc_params
from .._validation import InputError
from ._model_arg import (
    DOC_MODEL,
    LocatedModel,
    call_model,
    check_model_values,
    load_for,
    locate_model,
    prepare_device,
)

if TYPE_CHECKING:
    from anndata import AnnData

    from ..models._gene_embeddings import GeneEmbeddings
    from ..models.base import PretrainedMixin

__all__ = ["embed_genes"]

logger = logging.getLogger("scfm_tools")

GeneMode = Literal["token", "context"]


def default_gene_key(family: str) -> str:
    """Return the ``varm`` key ``embed_genes`` writes by default (read by gene_modules, grn)."""
    return f"X_{family}_genes"


def compute_gene_embeddings(
    adata: AnnData,
    located: LocatedModel,
    *,
    mode: GeneMode = "token",
    layer: str | None = None,
    gene_key: str | None = None,
    batch_size: int | None = None,
    max_length: int | None = None,
    random_state: int | None = 0,
    device: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    caller: str = "embed_genes",
    **model_kwargs: Any,
) -> tuple[GeneEmbeddings, PretrainedMixin]:
    """Check the input and embed ``adata``'s genes; writes nothing into ``adata``.

    Returns the embeddings and the model that made them.
    """
    if mode not in ("token", "context"):
        raise ValueError(f"mode must be 'token' or 'context', got {mode!r}.")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if adata.n_vars == 0:
        raise InputError("the AnnData has no genes: at least one gene is needed.")
    if mode == "context":
        if "mode" not in inspect.signature(located.cls.embed_var_genes).parameters:
            raise NotImplementedError(
                f"embed_genes(mode='context') is available for scGPT and scFoundation models "
                f"only; use mode='token' for {located.family} (its gene-embedding table)."
            )
        # The values are read only in context mode; check them before weights are loaded.
        check_model_values(adata, layer, located, chunk_size=chunk_size, caller=caller)
    loaded, options = load_for(located, "embed_var_genes", model_kwargs)
    dev = prepare_device(loaded, device)
    started = time.perf_counter()
    context = mode == "context"
    result, used = call_model(
        loaded.embed_var_genes,
        adata,
        task=caller,
        family=located.family,
        given={"batch_size": batch_size, "max_length": max_length} if context else {},
        quiet={"gene_key": gene_key}
        | (
            {"mode": mode, "layer": layer, "random_state": random_state, "chunk_size": chunk_size}
            if context
            else {}
        ),
        options=options,
    )
    n_embedded = int(np.isfinite(result.embeddings).all(axis=1).sum())
    logger.info(
        "%s: %d of %d genes embedded (%s mode) with %s on %s in %.1f s",
        caller,
        n_embedded,
        adata.n_vars,
        mode,
        loaded.model_name,
        dev,
        time.perf_counter() - started,
    )
    result.params.update(
        mode=mode,
        n_cells=int(adata.n_obs) if context else None,
        layer=layer if context else None,
        gene_key=gene_key,
        n_genes_embedded=n_embedded,
    )
    if context:
        result.params["batch_size"] = used.get("batch_size")
    return result, loaded


def write_gene_embeddings(
    adata: AnnData, model: PretrainedMixin, result: GeneEmbeddings, key: str
) -> str:
    """Write what :func:`compute_gene_embeddings` returned; returns the ``uns`` key used."""
    uns_key = key[2:] if key.startswith("X_") else key
    adata.varm[key] = result.embeddings
    adata.var[f"{model.family}_in_vocab"] = np.asarray(result.in_vocab, dtype=bool)
    if result.n_cells is not None:
        adata.var[f"{uns_key}_n_cells"] = result.n_cells
    adata.uns[uns_key] = {"params": params_record(**model.params(), **result.params)}
    return uns_key


@doc_params(
    model=DOC_MODEL,
    layer=DOC_LAYER,
    random_state=DOC_RANDOM_STATE,
    chunk_size=DOC_CHUNK_SIZE,
    copy=DOC_COPY,
)
def embed_genes(
    adata: AnnData,
    model: str | os.PathLike | PretrainedMixin | None = None,
    *,
    mode: GeneMode = "token",
    layer: str | None = None,
    gene_key: str | None = None,
    key_added: str | None = None,
    batch_size: int | None = None,
    max_length: int | None = None,
    random_state: int | None = 0,
    device: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    mod: str | None = None,
    copy: bool = False,
    **model_kwargs: Any,
) -> AnnData | None:
    """Embed genes with a single-cell foundation model: one vector per gene of ``adata``.

    Two kinds of gene embedding:

    - ``mode="token"`` (context-free): the model's own vector for each gene, read from its
      weights; no expression value is read. scGPT: the gene encoder's output (the gene's
      embedding-table row, then the encoder's layer norm), as the official GRN tutorial uses
      (:meth:`SCGPT.get_gene_embeddings <scfm_tools.models.SCGPT.get_gene_embeddings>`).
      scBERT: the gene's row of the frozen gene2vec table. CellPLM: the gene's row of the
      embedder's gene table (``log1p(counts) @ E`` embeds a cell). scFoundation: the gene's
      row of the position embedding ``pos_emb`` (a gene is identified by its position in the
      model's gene list; ``enc_dim`` wide), from the ``gene`` weights of ``models.ckpt``.
    - ``mode="context"`` (context-aware; scGPT and scFoundation): the cells are run through
      the model and each gene's output averaged over cells; the result depends on the cells
      given. scGPT: the cells are tokenized exactly as in :func:`~scfm_tools.tl.embed_cells`
      (expressed vocabulary genes, per-cell binning, random subsampling above
      ``max_length``), and each gene's vector is its last-layer output averaged over the
      cells in which it is a token; genes never expressed (or always subsampled away) get no
      embedding. scFoundation: the cells are prepared as in ``embed_cells`` (the
      ``model_kwargs`` below) and each gene's vector is the decoder's gene embedding (official
      ``get_embedding.py --output_type gene``, ``dec_dim`` wide, from the ``gene`` weights)
      averaged over **all** cells, since the decoder reads every gene of every cell, expressed
      or not; every matched gene is embedded. Cells are streamed one forward pass at a time:
      the per-cell ``cells x genes x d`` outputs are never held for all cells (for them, use
      :func:`scfm_tools.models.scfoundation.embed_matrix` with ``output="gene"`` on a subset).

    Genes are matched to the model's vocabulary by symbol or Ensembl ID (offline); genes not in
    it get NaN rows.

    Parameters
    ----------
    adata
        Cells x genes. Token mode reads only the gene names; context mode reads the values
        (raw counts preferred, as in :func:`~scfm_tools.tl.embed_cells`). A
        :class:`mudata.MuData` is accepted with ``mod=``.
    {model}
    mode
        ``"token"`` (context-free) or ``"context"`` (averaged transformer outputs).
    {layer}
        Context mode only.
    gene_key
        Column of ``adata.var`` with gene symbols or Ensembl IDs; ``None`` uses ``var_names``.
    key_added
        ``adata.varm`` key of the embeddings; default ``"X_<family>_genes"`` (e.g.
        ``"X_scgpt_genes"``, which :func:`~scfm_tools.tl.gene_modules` and
        :func:`~scfm_tools.tl.grn` read). The run's parameters go to
        ``adata.uns[key_added without "X_"]["params"]``.
    batch_size
        Cells per forward pass (context mode); ``None``: the family's default (scGPT 64,
        scFoundation 64).
    max_length
        Most genes per cell (plus ``<cls>``) in context mode; ``None`` uses the checkpoint's
        ``max_seq_len``. Above it a random subset of each cell's genes is read, so a gene's
        count of cells can be less than the cells that express it. scFoundation, whose encoder
        reads every expressed gene: must be ``None``.
    {random_state}
        Context mode: the binning tie-breaks and the subsampling, as in ``embed_cells``
        (scFoundation is deterministic: no role).
    device
        ``"cpu"``, ``"cuda"``, ``"auto"``...; ``None`` uses ``sft.settings.device``.
    {chunk_size}
    mod
        Modality of a MuData (default ``"rna"``); the results are written to that modality.
    {copy}
    **model_kwargs
        Options of the model family; an option the family does not take is refused.
        scFoundation takes those of :func:`~scfm_tools.tl.embed_cells` that prepare the cells
        (context mode; checked but unused in token mode): ``target_depth``,
        ``pre_normalized``, ``input_type`` and ``total_counts_key``. scGPT takes
        ``random_stream`` (context mode): ``"cell"`` (default), each cell draws from its own
        stream, so the result does not depend on the order of the cells; ``"official"``, one
        stream over the cells in order, as the official code. CellPLM takes none.

    Returns
    -------
    ``None``, or the modified copy with ``copy=True``. Writes

    - ``adata.varm["X_<family>_genes" | key_added]``: ``(n_genes, d)`` float32 embeddings, NaN
      rows for genes not in the vocabulary (scGPT context mode: also for genes never a token);
    - ``adata.var["<family>_in_vocab"]``: bool, the gene matched the vocabulary;
    - context mode: ``adata.var["<uns key>_n_cells"]`` (e.g. ``"scgpt_genes_n_cells"``): scGPT,
      the number of cells in which each gene was a token (its average's sample size);
      scFoundation, the number of cells that express the gene (a positive value: the cells
      whose encoder read it), while its average is over all cells;
    - ``adata.uns["<family>_genes" | key_added without "X_"]["params"]``: model name, family,
      weights sha256, ``mode``, genes matched and embedded, ``n_cells`` (context mode),
      ``max_length``, ``random_state`` and package version (scFoundation: ``entry`` and the
      preprocessing options instead of the last two).

    Raises
    ------
    InputError
        Duplicated gene names or too little overlap with the vocabulary; in context mode also
        NaN, infinite or negative values and empty cells.
    NotImplementedError
        The model's family has no gene embeddings of that ``mode`` (context mode for scBERT
        and CellPLM).
    """
    obj, ad = resolve_adata(adata, copy=copy, mod=mod)
    located = locate_model(model)
    result, loaded = compute_gene_embeddings(
        ad,
        located,
        mode=mode,
        layer=layer,
        gene_key=gene_key,
        batch_size=batch_size,
        max_length=max_length,
        random_state=random_state,
        device=device,
        chunk_size=chunk_size,
        **model_kwargs,
    )
    key = key_added or default_gene_key(located.family)
    write_gene_embeddings(ad, loaded, result, key)
    logger.info("embed_genes: wrote varm[%r] (%s mode)", key, mode)
    return obj if copy else None
