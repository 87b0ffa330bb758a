"""``sft.pl.training_history``: the losses logged while a model trained."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .._docs import doc_params
from ._utils import DOC_PLOT, as_list, finish_figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["training_history"]


@doc_params(plot=DOC_PLOT)
def training_history(
    model: Any,
    keys: str | Sequence[str] | None = None,
    *,
    log_y: bool = False,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | bool | None = None,
) -> Axes | None:
    """Plot a trained model's logged metrics against the epoch.

    Reads ``model.history`` (scvi-tools' dict of one-column DataFrames, filled by
    ``model.train``), so it works for every model of :mod:`scfm_tools.models`.

    Parameters
    ----------
    model
        A trained model (e.g. :class:`~scfm_tools.models.SCGPT`).
    keys
        Metrics to draw (e.g. ``"train_loss"``, ``"validation_loss"``); ``None``: every
        logged loss (history keys containing ``"loss"``).
    log_y
        Logarithmic y axis.
    {plot}

    Returns
    -------
    The Axes, unless the figure was shown.
    """
    import matplotlib.pyplot as plt

    history = getattr(model, "history", None)
    if not history:
        raise ValueError(
            f"{type(model).__name__} has no training history: train it with model.train() first."
        )
    wanted = [str(k) for k in as_list(keys)] or [k for k in history if "loss" in k]
    absent = [k for k in wanted if k not in history]
    if absent or not wanted:
        raise KeyError(f"history has no {absent or 'loss'}; it has {list(history)}.")
    own_figure = ax is None
    if own_figure:
        _, ax = plt.subplots(figsize=(5, 3.5))
    for key in wanted:
        frame = history[key]
        ax.plot(frame.index.to_numpy(), frame.iloc[:, 0].to_numpy(dtype=float), label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("value")
    if log_y:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title(type(model).__name__)
    return finish_figure(
        ax, ax.figure, own_figure=own_figure, show=show, save=save, name="training_history"
    )
