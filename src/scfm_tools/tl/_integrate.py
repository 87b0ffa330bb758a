"""``sft.tl.integrate``: fine-tune a model on the data's own cells to integrate its batches."""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._anndata import DEFAULT_CHUNK_SIZE, params_record, resolve_adata, resolve_seed
from .._docs import DOC_COPY, DOC_LAYER, DOC_RANDOM_STATE, doc_params
from .._errors import InputError
from ._model_arg import (
    check_model_values,
    lightning_accelerator,
    load_for,
    locate_model,
    prepare_device,
)

if TYPE_CHECKING:
    from anndata import AnnData

    from ..models.base import PretrainedMixin

__all__ = ["integrate"]

logger = logging.getLogger("scfm_tools")

#: The model integrate fine-tunes when given none (the family that measured best).
DEFAULT_INTEGRATION_MODEL = "cellplm-default"

DOC_INTEGRATE_MODEL = """\
model
    The pretrained model to fine-tune: a registered name (see
    :func:`scfm_tools.hub.list_models`), a checkpoint path or a model object of a family that
    integrates (scGPT, CellPLM); ``None`` fine-tunes the shipped ``cellplm-default`` (works
    offline), the family that scored best against scVI (``benchmarks/results/
    integration.md``). The model given is not changed: a copy is fine-tuned."""


def _integration_class(family_cls: type) -> type:
    """Return the integration model class of a family's model class (matched by class)."""
    from ..models import SCGPT, CellPLM
    from ..models.cellplm._integration import CellPLMIntegration
    from ..models.scgpt._integration import SCGPTIntegration

    for base, integration in ((SCGPT, SCGPTIntegration), (CellPLM, CellPLMIntegration)):
        if issubclass(family_cls, base):
            return integration
    raise NotImplementedError(
        f"integrate is not available for {family_cls.family} models; families that can: "
        "scgpt, cellplm."
    )


def check_batches(adata: AnnData, batch_key: str) -> pd.Series:
    """Return ``adata.obs[batch_key]`` if it can be integrated; a clear error otherwise.

    Parameters
    ----------
    adata
        The cells.
    batch_key
        Column of ``adata.obs`` with each cell's batch.

    Returns
    -------
    The column, as strings.
    """
    if not isinstance(batch_key, str):
        raise TypeError(f"batch_key must be the name of an obs column, got {batch_key!r}.")
    if batch_key not in adata.obs.columns:
        raise KeyError(
            f"batch_key {batch_key!r} is not a column of adata.obs (columns: "
            f"{list(adata.obs.columns)}); pass the column that names each cell's batch (plate, "
            "protocol, donor ...)."
        )
    values = adata.obs[batch_key]
    missing = values.isna().to_numpy()
    if missing.any():
        examples = list(adata.obs_names[missing][:3])
        raise InputError(
            f"adata.obs[{batch_key!r}] is missing (NaN) for {int(missing.sum())} cells, e.g. "
            f"{examples}; give every cell a batch, or drop those cells before integrating."
        )
    values = values.astype(str)
    sizes = values.value_counts()
    if len(sizes) < 2:
        raise InputError(
            f"adata.obs[{batch_key!r}] has a single value ({sizes.index[0]!r}): there are no "
            "batches to integrate. Pass the column that tells the batches apart."
        )
    small = sizes[sizes < 2]
    if len(small):
        raise InputError(
            f"batches {list(small.index[:5])} of adata.obs[{batch_key!r}] hold a single cell; "
            "a batch's effect cannot be learned from one cell. Drop those cells or merge them "
            "into a batch."
        )
    return values


def _check_options(integration: type, options: dict[str, Any]) -> None:
    """Refuse options the family's ``fine_tune`` does not take, naming those it does."""
    import inspect

    params = inspect.signature(integration.fine_tune).parameters
    own = sorted(
        name
        for name, p in params.items()
        if p.kind == p.KEYWORD_ONLY
        and name not in ("method", "layer", "max_epochs", "random_state")
    )
    unknown = sorted(set(options) - set(own))
    if unknown:
        raise TypeError(
            f"integrate got option(s) {unknown} that {integration.family} models do not take; "
            f"they take {own}."
        )


@doc_params(
    model=DOC_INTEGRATE_MODEL, layer=DOC_LAYER, random_state=DOC_RANDOM_STATE, copy=DOC_COPY
)
def integrate(
    adata: AnnData,
    batch_key: str = "batch",
    model: str | os.PathLike | PretrainedMixin | None = None,
    method: str | None = None,
    key_added: str | None = None,
    *,
    layer: str | None = None,
    max_epochs: int | None = None,
    random_state: int | None = 0,
    device: str | None = None,
    mod: str | None = None,
    copy: bool = False,
    **model_kwargs: Any,
) -> PretrainedMixin | tuple[AnnData, PretrainedMixin]:
    """Integrate batches by fine-tuning a foundation model on the data's own cells.

    The model is fine-tuned with each cell's batch known, so that its cell embedding keeps
    the biology and loses the batch, and the integrated embedding of every cell is written.
    The recipes (``method``):

    - scGPT ``"official"``: the official integration fine-tuning (scGPT's integration example
      and tutorial): the 1,200 most variable vocabulary genes, every one read for every cell
      (zeros included), masked expression prediction (GEP, 40% masked, explicit zero
      probabilities), the cell-embedding-based prediction (GEPC/MVC), elastic cell similarity
      (ECS, threshold 0.8, weight 10), the adversarial batch classifier (DAR, weight 1),
      domain-specific batch norm (DSBN) and the batch embedding in the decoders; 15 epochs of
      Adam, learning rate decayed by 0.9 per epoch. ``"batch_decoder"``: GEP and MVC with the
      batch embedding in the decoders only (no DSBN, DAR or ECS).
    - CellPLM ``"adversarial"``: CellPLM's pretraining objective (cells dropped and masked,
      counts reconstructed by the negative-binomial decoder) with the batch in the decoder
      (CellPLM's batch-aware decoder, a fresh row per batch) and CellPLM's adversarial batch
      classifier on the latent (its ``dar`` option). ``"batch_decoder"``: the batch-aware
      decoder alone.

    The default ``method`` of each family is the one that scored best
    (``benchmarks/results/integration.md``; see the family's
    ``SCGPTIntegration.fine_tune`` / ``CellPLMIntegration.fine_tune`` for the figures).

    Parameters
    ----------
    adata
        Cells x genes raw counts, with a batch column. A :class:`mudata.MuData` is accepted
        with ``mod=``.
    batch_key
        Column of ``adata.obs`` naming each cell's batch (plate, protocol, donor ...): no
        missing values, at least two batches, none of a single cell.
    {model}
    method
        The fine-tuning recipe (see above); ``None``: the family's default.
    key_added
        ``adata.obsm`` key of the integrated embedding; default ``"X_<family>_integrated"``.
        The run's parameters go to ``adata.uns[key_added without "X_"]["params"]``.
    {layer}
    max_epochs
        Passes over the cells; ``None``: the recipe's.
    {random_state}
    device
        ``"cpu"``, ``"cuda"``, ``"auto"``...; ``None`` uses ``sft.settings.device``.
    mod
        Modality of a MuData (default ``"rna"``).
    {copy}
    **model_kwargs
        Options of the family's ``fine_tune`` (e.g. ``batch_size``, ``lr``, ``n_top_genes``
        for scGPT; ``max_cells``, ``lr`` for CellPLM; ``train_kwargs`` for Lightning).

    Returns
    -------
    The fine-tuned model (an :class:`~scfm_tools.models.scgpt.SCGPTIntegration` or
    :class:`~scfm_tools.models.cellplm.CellPLMIntegration`: ``get_latent_representation``
    embeds more cells of the same batches, ``save`` keeps it), or ``(copy, model)`` with
    ``copy=True``. Writes

    - ``adata.obsm["X_<family>_integrated" | key_added]``: ``(n_cells, d)`` float32;
    - ``adata.uns["<family>_integrated" | key_added without "X_"]["params"]``: model, family,
      weights sha256, method, batch key and batches, epochs, final training loss, package
      version.

    For a MuData the embedding is also written to ``mdata.obsm`` under the same key when the
    modality holds all of the MuData's cells.

    Raises
    ------
    InputError
        A batch column with missing values, a single batch or a batch of one cell; values
        that are not counts; too little overlap with the model's genes. Nothing is written.
    """
    obj, ad = resolve_adata(adata, copy=copy, mod=mod)
    batches = check_batches(ad, batch_key)
    located = locate_model(DEFAULT_INTEGRATION_MODEL if model is None else model)
    integration = _integration_class(located.cls)
    _check_options(integration, model_kwargs)
    check_model_values(ad, layer, located, chunk_size=DEFAULT_CHUNK_SIZE, caller="integrate")
    pretrained, _ = load_for(located, "get_latent_representation", {})
    dev = prepare_device(pretrained, device)
    seed = resolve_seed(random_state)
    train_kwargs = dict(model_kwargs.pop("train_kwargs", None) or {})
    train_kwargs.setdefault("accelerator", lightning_accelerator(dev))
    started = time.perf_counter()
    fitted, fit_params = integration.fine_tune(
        pretrained,
        ad,
        batch_key,
        method=method,
        layer=layer,
        max_epochs=max_epochs,
        random_state=seed,
        train_kwargs=train_kwargs,
        **model_kwargs,
    )
    emb, run_params = fitted.get_latent_representation(fitted.adata, return_info=True)
    history = getattr(fitted, "history", None) or {}
    if "train_loss" in history:
        fit_params["final_train_loss"] = float(np.asarray(history["train_loss"]).ravel()[-1])
    elapsed = time.perf_counter() - started

    key = key_added or f"X_{located.family}_integrated"
    uns_key = key[2:] if key.startswith("X_") else key
    ad.obsm[key] = np.asarray(emb, dtype=np.float32)
    # The embedding run's record first: integrate's own entries (batch_key ...) take precedence.
    record = {
        **run_params,
        **pretrained.params(),
        **fit_params,
        "batch_key": batch_key,
        "batches": sorted(batches.unique()),
        "layer": layer,
        "random_state": seed,
    }
    ad.uns[uns_key] = {"params": params_record(**record)}
    if ad is not obj and obj.n_obs == ad.n_obs and (obj.obs_names == ad.obs_names).all():
        obj.obsm[key] = ad.obsm[key]
    logger.info(
        "integrate: %d cells, %d batches, %s (%s) on %s in %.1f s -> obsm[%r]",
        ad.n_obs,
        batches.nunique(),
        pretrained.model_name,
        fit_params.get("method"),
        dev,
        elapsed,
        key,
    )
    return (obj, fitted) if copy else fitted
