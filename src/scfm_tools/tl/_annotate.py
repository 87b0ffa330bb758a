"""``sft.tl.annotate``: cell types from a fine-tuned model, or fine-tuned on a reference."""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from .._anndata import params_record, resolve_adata
from .._docs import DOC_COPY, DOC_LAYER, DOC_RANDOM_STATE, doc_params
from .._validation import check_counts, check_nonempty
from ._model_arg import resolve_model

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["annotate"]

logger = logging.getLogger("scfm_tools")

# What annotate passes to every family's annotate function itself.
_STANDARD = (
    "layer",
    "gene_key",
    "reference",
    "label_key",
    "reference_layer",
    "threshold",
    "batch_size",
    "max_epochs",
    "random_state",
    "device",
)

DOC_ANNOTATE_MODEL = """\
model
    A fine-tuned model: an in-memory model with a classifier head (e.g. a fine-tuned
    :class:`~scfm_tools.models.SCBERT`), or a path to a fine-tuned checkpoint (scBERT: the
    ``.pth`` with ``gene_list.txt`` and ``classes.txt`` beside it). With ``reference=``, the
    checkpoint to fine-tune: a registered name (e.g. ``"scbert"``) or a path to a pretrained or
    fine-tuned checkpoint."""


def _family_of(model: Any) -> str | None:
    """Return the family of an in-memory model (its class name); None for names and paths."""
    if isinstance(model, str | os.PathLike) or model is None:
        return None
    return type(model).__name__.lower()


@doc_params(model=DOC_ANNOTATE_MODEL, layer=DOC_LAYER, random_state=DOC_RANDOM_STATE, copy=DOC_COPY)
def annotate(
    adata: AnnData,
    model: Any = None,
    *,
    reference: AnnData | None = None,
    label_key: str | None = None,
    layer: str | None = None,
    reference_layer: str | None = None,
    gene_key: str | None = None,
    key_added: str | None = None,
    threshold: float | None = None,
    batch_size: int = 8,
    max_epochs: int = 10,
    random_state: int | None = 0,
    device: str | None = None,
    mod: str | None = None,
    copy: bool = False,
    **model_kwargs: Any,
) -> AnnData | None:
    """Annotate cell types with a fine-tuned foundation model.

    With a fine-tuned model, each cell gets the most probable of the model's cell types and
    that probability as its score. With a labelled ``reference`` (raw counts plus a cell-type
    column ``label_key``), the model is first fine-tuned on it in the same call (scBERT: a
    new classifier head over the pretrained encoder, trained as the official ``finetune.py``),
    then applied to ``adata``. Cells whose score is below ``threshold`` are labelled
    ``"Unassigned"`` (scBERT's novel-cell-type option; its published threshold is 0.5).

    Genes are matched to the model's by symbol (or ``gene_key``); counts are needed, as the
    models normalise them their own way. Fine-tuning runs through Lightning on ``device``
    (a GPU when there is one with ``"auto"``); on CPU it is only practical for small models.

    Parameters
    ----------
    adata
        Cells x genes raw counts to annotate. A :class:`mudata.MuData` is accepted with ``mod=``.
    {model}
    reference
        Labelled cells (raw counts) to fine-tune on; the reference is not modified.
    label_key
        Column of ``reference.obs`` with the cell types (needed with ``reference``); cells
        without a label are left out of training.
    {layer}
    reference_layer
        Layer of ``reference`` with its counts; ``None`` reads ``reference.X``.
    gene_key
        Column of ``var`` (of ``adata`` and ``reference``) with gene symbols; ``None`` uses
        ``var_names``.
    key_added
        Prefix of the keys written; default the model family (``"scbert"``).
    threshold
        Probability below which a cell is ``"Unassigned"``; ``None`` labels every cell.
    batch_size
        Cells per forward pass (and per training minibatch).
    max_epochs
        Fine-tuning epochs over the reference.
    {random_state}
    device
        ``"cpu"``, ``"cuda"``, ``"auto"``...; ``None`` uses ``sft.settings.device``.
    mod
        Modality of a MuData (default ``"rna"``).
    {copy}
    **model_kwargs
        Options of the model family; an option the family does not take is refused. scBERT
        takes ``class_weights`` (``"official"``, the default: ``(1 - n_c / N)^2`` per cell
        type, against imbalanced references; ``"balanced"``; explicit weights; or ``None``),
        ``train_kwargs`` (passed to :meth:`SCBERT.train <scfm_tools.models.SCBERT.train>`, e.g.
        ``{{"plan_kwargs": {{"lr": 1e-4}}, "accumulate_grad_batches": 60}}``) and
        ``chunk_size``.

    Returns
    -------
    ``None``, or the modified copy with ``copy=True``. Writes

    - ``adata.obs["<key>_label"]``: the cell type (categorical; ``"Unassigned"`` below
      ``threshold``);
    - ``adata.obs["<key>_score"]``: the probability of that cell type (float32);
    - ``adata.obsm["<key>_proba"]``: all class probabilities (DataFrame, cells x types);
    - ``adata.uns["<key>"]["params"]``: model, family, weights sha256, threshold, classes,
      reference size and training settings, package version.

    Raises
    ------
    InputError
        Non-count values, empty cells, duplicated gene names, too little gene overlap, or a
        reference without the ``label_key`` column or with fewer than two cell types.
    """
    from .._settings import settings
    from ..models._families import check_family_options, family_task

    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if threshold is not None and not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1] or be None, got {threshold!r}.")
    if reference is not None and label_key is None:
        raise ValueError("reference= needs label_key=, the reference's obs column of cell types.")
    obj, ad = resolve_adata(adata, copy=copy, mod=mod)
    check_counts(ad, layer)
    check_nonempty(ad, layer)

    family = _family_of(model)
    if family is None:
        resolved = resolve_model(model)
        family, target, described = resolved.family, resolved, resolved.params()
    else:
        target = model
        source = getattr(model, "pretrained_", None) or {}
        described = {
            "model": source.get("source", type(model).__name__),
            "family": family,
            "weights_sha256": source.get("weights_sha256"),
        }
    run = family_task(family, "annotate")
    check_family_options(run, family, "annotate", model_kwargs, _STANDARD)
    dev = settings.resolve_device(device)
    settings.apply_threads()
    started = time.perf_counter()
    prediction, proba, run_params = run(
        target,
        ad,
        layer=layer,
        gene_key=gene_key,
        reference=reference,
        label_key=label_key,
        reference_layer=reference_layer,
        threshold=threshold,
        batch_size=batch_size,
        max_epochs=max_epochs,
        random_state=random_state,
        device=dev,
        **model_kwargs,
    )
    elapsed = time.perf_counter() - started

    key = key_added or family
    # Positional (not index-aligned) assignment keeps the categories, "Unassigned" included.
    ad.obs[f"{key}_label"] = prediction["label"].array
    ad.obs[f"{key}_score"] = prediction["score"].to_numpy(dtype=np.float32)
    ad.obsm[f"{key}_proba"] = proba.set_axis(ad.obs_names, axis=0)
    ad.uns[key] = {
        "params": params_record(
            **described,
            layer=layer,
            gene_key=gene_key,
            threshold=threshold,
            batch_size=batch_size,
            **run_params,
        )
    }
    n_unassigned = int((prediction["label"] == "Unassigned").sum())
    logger.info(
        "annotate: %d cells with %s on %s in %.1f s -> obs[%r], obs[%r]%s",
        ad.n_obs,
        described["model"],
        dev,
        elapsed,
        f"{key}_label",
        f"{key}_score",
        f" ({n_unassigned} Unassigned)" if threshold is not None else "",
    )
    return obj if copy else None
