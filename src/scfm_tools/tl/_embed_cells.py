"""``sft.tl.embed_cells``: cell embeddings from a foundation model."""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

from .._anndata import DEFAULT_CHUNK_SIZE, params_record, resolve_adata
from .._docs import DOC_CHUNK_SIZE, DOC_COPY, DOC_LAYER, DOC_RANDOM_STATE, doc_params
from ._fine_tune_on_cells import DOC_FINE_TUNE, fine_tuned_on_cells, resolve_fine_tune
from ._model_arg import (
    cell_embeddings,
    check_model_values,
    load_for,
    locate_model,
    prepare_device,
)

if TYPE_CHECKING:
    from anndata import AnnData

    from ..models.base import PretrainedMixin

__all__ = ["embed_cells"]

logger = logging.getLogger("scfm_tools")

#: The model embed_cells fine-tunes on the data's own cells when given none: of the shipped
#: defaults, the one that scored best against PCA (``benchmarks/results/default_embedding.md``).
DEFAULT_EMBED_MODEL = "cellplm-default"
#: ``fine_tune_denoiser`` settings of embed_cells' fine-tuning, where they differ from
#: imputation's: the data's genes the model does not know join it (on CellBench, from a model
#: pretrained without it, 5-NN accuracy 0.99 vs 0.88 without them, silhouette 0.47 vs 0.20).
FINE_TUNE_OPTIONS: dict[str, Any] = {"add_genes": True}

DOC_EMBED_MODEL = """\
model
    A registered model name (see :func:`scfm_tools.hub.list_models`), a path to a checkpoint
    (e.g. an official scGPT folder with ``best_model.pt``, ``args.json`` and ``vocab.json``),
    a model object (e.g. :meth:`sft.models.SCGPT.from_pretrained
    <scfm_tools.models.SCGPT.from_pretrained>` or one trained here), or ``None``: the shipped
    ``"cellplm-default"`` (offline), fine-tuned on the data's own cells first (``fine_tune``).
    Zero-shot, every shipped default loses to PCA on cells it never saw."""


@doc_params(
    model=DOC_EMBED_MODEL,
    fine_tune=DOC_FINE_TUNE,
    layer=DOC_LAYER,
    random_state=DOC_RANDOM_STATE,
    chunk_size=DOC_CHUNK_SIZE,
    copy=DOC_COPY,
)
def embed_cells(
    adata: AnnData,
    model: str | os.PathLike | PretrainedMixin | None = None,
    *,
    fine_tune: bool | None = None,
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
    """Embed cells with a single-cell foundation model.

    With no ``model``, a copy of the shipped ``cellplm-default`` is first fine-tuned on the
    cells themselves with its self-supervised pretraining objective (no labels, no other data;
    one to four minutes on 2 CPU cores whatever the number of cells), the data's genes it does
    not know added to the copy and learned there, then embeds them: CellPLM reads each cell in
    the context of the others. Adapted to the cells, its latent comes within 0.011 of PCA's
    5-NN accuracy of the cell types on three datasets (one no default saw), but is not above
    it everywhere; every shipped model zero-shot does clearly worse
    (``benchmarks/results/default_embedding.md``). Given a model, the embedding is zero-shot
    unless ``fine_tune=True``.

    Runs the model's published embedding path on the expression of each cell and writes one
    vector per cell. For scGPT models that is the official ``embed_data`` path: genes matched to
    the model vocabulary (symbols or Ensembl IDs, offline), per cell the expressed genes with
    ``<cls>`` first, per-cell quantile binning (51 bins), random subsampling above
    ``max_length`` genes, and the L2-normalised ``<cls>`` output. Cells are streamed
    ``chunk_size`` at a time (a backed AnnData works in bounded memory), sorted by length into
    minibatches to limit padding; a cell's embedding does not depend on ``batch_size`` or
    ``chunk_size``.

    Raw counts are expected (the official models are fed counts): scBERT and CellPLM refuse other
    values, scFoundation checks them against its ``pre_normalized`` option. Because scGPT bins
    each cell's values by rank, log-normalised values give it nearly the same bins: they are
    accepted with a logged warning.

    Parameters
    ----------
    adata
        Cells x genes expression (raw counts preferred). A :class:`mudata.MuData` is accepted
        with ``mod=``.
    {model}
    {fine_tune}
    {layer}
    gene_key
        Column of ``adata.var`` with gene symbols or Ensembl IDs; ``None`` uses ``var_names``.
    key_added
        ``adata.obsm`` key of the embedding; default ``"X_<family>"`` (e.g. ``"X_cellplm"``).
        The run's parameters go to ``adata.uns[key_added without "X_"]["params"]``.
    batch_size
        Cells per forward pass; ``None``: the family's default (scGPT 64, scBERT and
        scFoundation 8). Fewer cells go in a pass when it would hold too many tokens. CellPLM
        runs one sequence of cells per pass, so it refuses a ``batch_size``.
    max_length
        Most genes per cell (plus ``<cls>``) for scGPT; ``None`` uses the checkpoint's
        ``max_seq_len``. scBERT and scFoundation read every gene and refuse it, as does CellPLM
        (whose tokens are cells: its cells per sequence are the option ``max_cells``).
    {random_state}
        Each cell draws from its own stream (see ``random_stream`` below), so a cell's
        embedding does not depend on the other cells; with ``random_stream="official"``,
        ``0`` reproduces the official run after ``np.random.seed(0)``.
    device
        ``"cpu"``, ``"cuda"``, ``"auto"``...; ``None`` uses ``sft.settings.device``.
    {chunk_size}
    mod
        Modality of a MuData (default ``"rna"``).
    {copy}
    **model_kwargs
        Options of the model family, passed on to it; an option the family does not take is
        refused. CellPLM takes ``batch_key`` (the ``obs`` column naming each cell's sample: the
        cells of one sample form one sequence and attend to each other, as the official pipeline
        does with ``obs["batch"]``; default ``None``, all cells in one sequence), ``max_cells``
        (most cells per sequence, longer samples cut into chunks; ``None`` keeps each sample
        whole, the official default) and ``sample``
        (``True`` draws the Gaussian-mixture component as the official model does in eval mode,
        so the embedding is random, each cell's draw from its own stream; with
        ``random_stream="official"``, ``random_state=s`` reproduces the official run after
        ``torch.manual_seed(s)`` on CPU; default ``False`` takes the most likely component,
        deterministic). scGPT and CellPLM take ``random_stream``: ``"cell"`` (default), each
        cell draws from its own stream keyed by ``random_state`` and the cell's expressed genes
        and values, so a cell's embedding does not depend on the other cells, their order or
        how the data is split into files; ``"official"``, one stream over the cells in order,
        as the official code (reproduces it; a cell then depends on the cells before it).
        A CellPLM cell is read in the context of the other cells of its sequence, by design.
        scBERT takes ``key_max``: ``"sample"`` (default) embeds each cell as
        if alone, as the official ``predict.py``; ``"batch"`` shares the FAVOR+ key stabiliser
        across each forward pass, as the official ``PerformerLM.forward`` on a batch (the
        result then depends on the batch). scFoundation takes the options of the official
        ``get_embedding.py``: ``target_depth`` (``--tgthighres``: ``"tX"`` sets the target
        depth token ``T = X``, i.e. a total count of ``10**X``; ``"fX"``: ``X`` times the cell's
        own total count; ``"aX"``: ``log10`` of its total count plus ``X``; or a total count
        such as ``1e4``; default ``"t4"``), ``pool`` (``"all"``, default: the ``S`` and ``T``
        token outputs, max and mean over the genes, ``4 * d`` wide; ``"max"``: max over all
        tokens), ``pre_normalized`` (``"F"``, default: raw counts, normalised to ``log1p`` of
        counts per 10,000; ``"T"``: values already so normalised, the source depth then being
        the sum of the given values as officially; ``"A"``: normalised values with each cell's
        total count in ``adata.obs[total_counts_key]``), ``input_type`` (``"singlecell"``,
        default, or ``"bulk"``: samples normalised to the median total of all, ``T = S``) and
        ``version`` (``"ce"``, default: the ``cell`` weights of ``models.ckpt``; ``"rde"``: the
        read-depth-enhancement weights). Its gene-level outputs (the decoder's gene embeddings,
        predicted expression) are :func:`scfm_tools.models.scfoundation.embed_matrix` with
        ``output="gene"`` / ``"gene_expression"`` (arrays), and ``sft.tl.impute``. scGPT takes
        only ``random_stream``.

    Returns
    -------
    ``None``, or the modified copy with ``copy=True``. Writes

    - ``adata.obsm["X_<family>" | key_added]``: ``(n_cells, d)`` float32 embeddings;
    - ``adata.uns["<family>" | key_added without "X_"]["params"]``: model name, family,
      weights sha256, genes matched, ``max_length``, ``random_state`` and package version.

    For a MuData the embedding is also written to ``mdata.obsm`` under the same key when the
    modality holds all of the MuData's cells.

    Raises
    ------
    InputError
        NaN, infinite or negative values, empty cells, duplicated gene names, or too little
        overlap with the model's vocabulary; the message says what to do.
    """
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    obj, ad = resolve_adata(adata, copy=copy, mod=mod)
    located = locate_model(DEFAULT_EMBED_MODEL if model is None else model)
    fine_tune = resolve_fine_tune(fine_tune, model, located, "embed_cells")
    # Validate the data before any weights are loaded or anything is written.
    check_model_values(ad, layer, located, chunk_size=chunk_size, caller="embed_cells")
    loaded, options = load_for(located, "get_latent_representation", model_kwargs)
    dev = prepare_device(loaded, device)
    if fine_tune:
        loaded = fine_tuned_on_cells(
            loaded,
            ad,
            task="embed_cells",
            device=dev,
            layer=layer,
            gene_key=gene_key,
            batch_key=options.get("batch_key"),
            random_state=random_state,
            options=FINE_TUNE_OPTIONS,
        )
    started = time.perf_counter()
    emb, run_params = cell_embeddings(
        loaded,
        ad,
        task="embed_cells",
        batch_size=batch_size,
        max_length=max_length,
        layer=layer,
        gene_key=gene_key,
        random_state=random_state,
        chunk_size=chunk_size,
        options=options,
    )
    elapsed = time.perf_counter() - started

    key = key_added or f"X_{located.family}"
    uns_key = key[2:] if key.startswith("X_") else key
    ad.obsm[key] = emb
    ad.uns[uns_key] = {
        "params": params_record(
            **loaded.params(),
            layer=layer,
            gene_key=gene_key,
            **run_params,
        )
    }
    if ad is not obj and obj.n_obs == ad.n_obs and (obj.obs_names == ad.obs_names).all():
        obj.obsm[key] = emb
    logger.info(
        "embed_cells: %d cells with %s on %s in %.1f s (%.1f cells/s) -> obsm[%r]",
        ad.n_obs,
        loaded.model_name,
        dev,
        elapsed,
        ad.n_obs / max(elapsed, 1e-9),
        key,
    )
    return obj if copy else None
