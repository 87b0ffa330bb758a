"""``sft.tl.impute``: denoised (imputed) expression from a foundation model's decoder."""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

from .._anndata import params_record, resolve_adata
from .._docs import DOC_COPY, DOC_LAYER, DOC_RANDOM_STATE, doc_params
from .._validation import check_counts, check_nonempty
from ._model_arg import resolve_model

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["impute"]

logger = logging.getLogger("scfm_tools")

# What impute passes to every family's impute function itself.
_STANDARD = ("layer", "gene_key", "max_length", "random_state", "device")
# Default layer name per family, "<family>_<suffix>": CellPLM's decoder denoises the observed
# profile; scFoundation predicts it at another (read) depth.
_KEY_SUFFIX = {"scfoundation": "imputed"}

DOC_IMPUTE_MODEL = """\
model
    A registered model name (see :func:`scfm_tools.hub.list_models`) or a path to a checkpoint
    of a family that can reconstruct expression (CellPLM: ``<prefix>.best.ckpt`` beside
    ``<prefix>.config.json``, or their folder; scFoundation: ``models.ckpt``); ``None`` uses the
    package's default model, which must then be able to."""


@doc_params(model=DOC_IMPUTE_MODEL, layer=DOC_LAYER, random_state=DOC_RANDOM_STATE, copy=DOC_COPY)
def impute(
    adata: AnnData,
    model: str | os.PathLike | None = None,
    *,
    layer: str | None = None,
    gene_key: str | None = None,
    key_added: str | None = None,
    max_length: int | None = None,
    random_state: int | None = 0,
    device: str | None = None,
    mod: str | None = None,
    copy: bool = False,
    **model_kwargs: Any,
) -> AnnData | None:
    """Denoise expression, or predict it at a higher read depth, with a model's decoder.

    Each cell is encoded (with the other cells of its sample for CellPLM) and decoded into the
    expected counts of every gene the model knows: a denoised, imputed version of the cell's
    profile, zeros from dropout included. For CellPLM that is the negative-binomial decoder's
    mean, decoded without a batch effect by default (the decoder's batch covariate is replaced
    by the sum of its batch table, the official fallback), or with pretraining batch ids from
    ``decoder_batch_key``; with ``rescale`` (default) each cell's means are scaled to its
    observed total over the model's genes, as the official denoising output.

    For scFoundation it is read-depth enhancement: each cell is encoded with its observed depth
    (token ``S``, ``log10`` of its total count) and a target depth (token ``T``, from
    ``target_depth``), and the regression head predicts the expression of every model gene as
    if the cell had been sequenced at that depth, in ``log1p``-normalised units (natural log of
    1 + counts per 10,000), the official ``get_embedding.py --output_type gene_expression``.

    Parameters
    ----------
    adata
        Cells x genes raw counts. A :class:`mudata.MuData` is accepted with ``mod=``.
    {model}
    {layer}
    gene_key
        Column of ``adata.var`` with gene symbols or Ensembl IDs; ``None`` uses ``var_names``.
    key_added
        ``adata.layers`` key of the result; default ``"<family>_denoised"`` (CellPLM) or
        ``"scfoundation_imputed"``.
    max_length
        CellPLM: most cells per sequence (longer samples are cut into chunks); ``None`` keeps
        each sample whole.
    {random_state}
        Used with ``sample=True`` only.
    device
        ``"cpu"``, ``"cuda"``, ``"auto"``...; ``None`` uses ``sft.settings.device``.
    mod
        Modality of a MuData (default ``"rna"``).
    {copy}
    **model_kwargs
        Options of the model family; an option the family does not take is refused. CellPLM
        takes ``batch_key`` (``obs`` column naming each cell's sample; the cells of a sample
        form one sequence; default ``None``: one sequence), ``decoder_batch_key`` (``obs``
        column of integer ids into the decoder's pretraining batch table; default ``None``:
        decode without a batch effect), ``sample`` (draw the mixture component as the official
        model does, random; ``random_state=s`` then reproduces the official model's forward
        pass after ``torch.manual_seed(s)`` on CPU; default ``False``: the most likely
        component) and ``rescale`` (default ``True``; ``False`` keeps the decoder's raw means).
        scFoundation takes ``target_depth``: the read depth to predict at, as the official
        ``--tgthighres``: ``"tX"`` sets ``T = X``, the ``log10`` of the target total count
        (``"t4"``, default: 10,000 counts per cell); ``"fX"``: ``X`` times the cell's observed
        total count (``"f10"``: ten times deeper); ``"aX"``: ``log10`` of the observed total
        plus ``X`` (``"a1"``: ten times deeper); or a number, the target total count itself
        (``1e4`` = ``"t4"``). Also ``entry`` (``"gene"``, default, the weights the official
        script uses for expression; ``"rde"``: the read-depth-enhancement weights),
        ``clip_negative`` (default ``True``: predictions below 0, impossible for ``log1p``
        values, are set to 0), ``batch_size`` (cells per forward pass, default 8) and
        ``chunk_size``.

    Returns
    -------
    ``None``, or the modified copy with ``copy=True``. Writes

    - ``adata.layers["<family>_denoised" | "scfoundation_imputed" | key_added]``: dense
      float32 ``(n_cells, n_genes)`` denoised (CellPLM: expected counts) or depth-enhanced
      (scFoundation: ``log1p`` counts per 10,000 at the target depth) expression; NaN for genes
      the model does not know;
    - ``adata.var["<key>_dispersion"]`` (CellPLM): the decoder's negative-binomial dispersion of
      each gene (NaN where unknown);
    - ``adata.uns["<key>"]["params"]``: model name, family, weights sha256, genes matched and
      the run's options.

    Raises
    ------
    InputError
        Values that are not raw counts, empty cells, duplicated gene names, too little overlap
        with the model's genes, or bad decoder batch ids; the message says what to do.
    """
    from .._settings import settings
    from ..models._families import check_family_options, family_task

    obj, ad = resolve_adata(adata, copy=copy, mod=mod)
    # Validate the data before anything is loaded or written.
    check_counts(ad, layer)
    check_nonempty(ad, layer)

    resolved = resolve_model(model)
    run = family_task(resolved.family, "impute")
    check_family_options(run, resolved.family, "impute", model_kwargs, _STANDARD)
    dev = settings.resolve_device(device)
    settings.apply_threads()
    started = time.perf_counter()
    denoised, var_columns, run_params = run(
        resolved,
        ad,
        layer=layer,
        gene_key=gene_key,
        max_length=max_length,
        random_state=random_state,
        device=dev,
        **model_kwargs,
    )
    elapsed = time.perf_counter() - started

    key = key_added or f"{resolved.family}_{_KEY_SUFFIX.get(resolved.family, 'denoised')}"
    ad.layers[key] = denoised
    for name, values in var_columns.items():
        ad.var[f"{key}_{name}"] = values
    ad.uns[key] = {
        "params": params_record(**resolved.params(), layer=layer, gene_key=gene_key, **run_params)
    }
    logger.info(
        "impute: %d cells with %s on %s in %.1f s -> layers[%r]",
        ad.n_obs,
        resolved.name,
        dev,
        elapsed,
        key,
    )
    return obj if copy else None
