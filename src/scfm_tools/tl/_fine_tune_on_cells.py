"""Fine-tune a copy of a model on the data's own cells before a tl function reads them out.

``embed_cells`` and ``impute`` do this by default: the small shipped CellPLM, adapted with its
self-supervised pretraining objective to the cells at hand (no labels, no other data), embeds
and imputes them far better than it does zero-shot (``benchmarks/results/default_embedding.md``,
``imputation_default.md``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from .._anndata import resolve_seed
from ._model_arg import LocatedModel, lightning_accelerator, prepare_device

if TYPE_CHECKING:
    import torch
    from anndata import AnnData

    from ..models.base import PretrainedMixin

logger = logging.getLogger("scfm_tools")

#: Most cells of a backed AnnData read into memory to fine-tune on: the fine-tuning visits
#: 800 x 256 cells, so more cells would cost memory and add little.
BACKED_SAMPLE = 20_000

DOC_FINE_TUNE = """\
fine_tune
    Fine-tune a copy of the model on ``adata``'s own cells first, with its self-supervised
    pretraining objective (CellPLM only: :meth:`CellPLM.fine_tune_denoiser
    <scfm_tools.models.CellPLM.fine_tune_denoiser>`, 800 steps of 256 cells, one to four minutes
    on 2 CPU cores whatever the number of cells; ``batch_key``, ``layer``, ``gene_key`` and
    ``random_state`` apply). A backed AnnData is fine-tuned on a random sample of at most
    20,000 of its cells, read into memory. ``None``: only when ``model`` is ``None``. The
    model given is not changed, and the fine-tuned copy is not kept: to reuse it, call
    ``fine_tune_denoiser`` yourself and pass the model it returns."""


def resolve_fine_tune(fine_tune: bool | None, model: Any, located: LocatedModel, task: str) -> bool:
    """Return whether to fine-tune (default: when no model was given); refuse families that can't.

    Parameters
    ----------
    fine_tune
        The tl function's ``fine_tune`` argument.
    model
        Its ``model`` argument, before the default was put in.
    located
        The model located.
    task
        The tl function's name, for the message.
    """
    chosen = model is None if fine_tune is None else bool(fine_tune)
    if chosen and not hasattr(located.cls, "fine_tune_denoiser"):
        raise NotImplementedError(
            f"{task}(fine_tune=True) needs a CellPLM model; {located.family} models are used "
            "as they are: pass fine_tune=False."
        )
    return chosen


def fine_tuned_on_cells(
    model: PretrainedMixin,
    ad: AnnData,
    *,
    task: str,
    device: torch.device,
    layer: str | None,
    gene_key: str | None,
    batch_key: str | None,
    random_state: int | None,
    options: Mapping[str, Any] | None = None,
) -> PretrainedMixin:
    """Return a copy of ``model`` fine-tuned on ``ad``'s cells, on ``device``.

    Parameters
    ----------
    model
        A model with ``fine_tune_denoiser`` (CellPLM).
    ad
        The cells (in memory, or backed: then a random sample of at most
        :data:`BACKED_SAMPLE` cells is read).
    task
        The tl function's name, for the log.
    device
        Where the copy is trained and then kept.
    layer, gene_key, batch_key, random_state
        As the tl function was given them.
    options
        More arguments of ``fine_tune_denoiser``, the task's own settings.
    """
    cells = ad
    if ad.isbacked:
        n = min(ad.n_obs, BACKED_SAMPLE)
        rng = np.random.default_rng(resolve_seed(random_state))
        cells = ad[np.sort(rng.choice(ad.n_obs, n, replace=False))].to_memory()
    logger.info(
        "%s: fine-tuning a copy of %s on %d of the cells first (a few minutes on a CPU); pass "
        "fine_tune=False with a model to skip it.",
        task,
        model.model_name,
        cells.n_obs,
    )
    tuned = model.fine_tune_denoiser(
        cells,
        layer=layer,
        batch_key=batch_key,
        gene_key=gene_key,
        random_state=random_state,
        train_kwargs={"accelerator": lightning_accelerator(device)},
        **dict(options or {}),
    )
    prepare_device(tuned, device)
    return tuned
