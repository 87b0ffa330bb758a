"""What fine-tuning a classifier on labelled cells needs, whatever the family.

Loss weights against imbalanced cell types, a stratified validation split (every cell type
keeps its share in training and in validation, so early stopping watches all of them), and a
callback that keeps the weights of the best validation epoch in memory and puts them back when
training ends (scvi-tools' own ``SaveCheckpoint(load_best_on_end=True)`` writes a full model
folder to disk every time the score improves).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from ._seeding import derive_seed

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = [
    "ClassWeights",
    "RestoreBestWeights",
    "compute_class_weights",
    "early_stopping_split",
    "stratified_split",
]

logger = logging.getLogger("scfm_tools")

# Stream key of the stratified split (apart from the training streams).
_SPLIT_KEY = 7_000_003

#: How to weigh the classes' losses (see :func:`compute_class_weights`).
ClassWeights = Literal["official", "balanced"] | Sequence[float] | np.ndarray | None


def compute_class_weights(counts: np.ndarray, scheme: ClassWeights) -> torch.Tensor | None:
    """Per-class loss weights from the number of training cells of each class.

    Parameters
    ----------
    counts
        Cells per class.
    scheme
        ``"official"``: ``(1 - n_c / N)^2``, as computed in scBERT's finetune.py;
        ``"balanced"``: ``N / (K n_c)``; explicit weights; or ``None`` (no weighting).

    Returns
    -------
    A float32 tensor of ``len(counts)`` weights, or ``None``.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if scheme is None:
        return None
    if isinstance(scheme, str):
        if scheme == "official":
            weights = (1 - counts / counts.sum()) ** 2
        elif scheme == "balanced":
            weights = counts.sum() / (len(counts) * np.maximum(counts, 1))
        else:
            raise ValueError(
                f"class_weights must be 'official', 'balanced', a sequence of weights or None, "
                f"got {scheme!r}."
            )
    else:
        weights = np.asarray(scheme, dtype=np.float64)
        if weights.shape != counts.shape or (weights < 0).any():
            raise ValueError(
                f"class_weights needs {len(counts)} non-negative weights (one per class), got "
                f"shape {weights.shape}."
            )
    return torch.as_tensor(weights, dtype=torch.float32)


def stratified_split(
    codes: np.ndarray, validation_size: float, random_state: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split cells into training and validation sets, class by class.

    Each class gives ``round(validation_size * n)`` of its ``n`` cells to validation, but
    always keeps at least one in training (a class of one cell is in training only).

    Parameters
    ----------
    codes
        Class code of each cell.
    validation_size
        Share of each class held out, in ``[0, 1)``.
    random_state
        Seed of the draw.

    Returns
    -------
    ``(train, validation)``: sorted cell indices (int64); ``validation`` may be empty.
    """
    if not 0.0 <= float(validation_size) < 1.0:
        raise ValueError(f"validation_size must lie in [0, 1), got {validation_size!r}.")
    codes = np.asarray(codes).ravel()
    rng = np.random.default_rng(derive_seed(int(random_state), _SPLIT_KEY))
    held: list[np.ndarray] = []
    for code in np.unique(codes):
        members = rng.permutation(np.flatnonzero(codes == code))
        n_val = min(round(validation_size * members.size), members.size - 1)
        held.append(members[:n_val])
    validation = np.sort(np.concatenate(held)).astype(np.int64) if held else np.empty(0, np.int64)
    train = np.setdiff1d(np.arange(codes.size, dtype=np.int64), validation)
    return train, validation


class RestoreBestWeights(Callback):
    """Keep the module's weights of the best validation epoch; restore them at the end.

    Parameters
    ----------
    monitor
        The logged metric to watch.
    mode
        ``"min"``: lower is better (a loss); ``"max"``: higher is better (e.g. macro-F1).
    ties
        An epoch that equals the best counts as the best (its weights are kept, the later
        ones), as CellPLM's annotation pipeline does; ``False``: only a strictly better one.
    patience
        Stop training after this many validation epochs without a new best; ``None``: never.
    """

    def __init__(
        self,
        monitor: str = "validation_loss",
        mode: Literal["min", "max"] = "min",
        *,
        ties: bool = False,
        patience: int | None = None,
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}.")
        if patience is not None and (isinstance(patience, bool) or int(patience) < 1):
            raise ValueError(f"patience must be a positive integer or None, got {patience!r}.")
        self.monitor, self.mode, self.ties = monitor, mode, bool(ties)
        self.patience = None if patience is None else int(patience)
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.stale_epochs = 0
        self._best: dict[str, torch.Tensor] | None = None

    def _is_best(self, score: float) -> bool:
        if not np.isfinite(score):
            return False
        if self.best_score is None or (self.ties and score == self.best_score):
            return True
        return score < self.best_score if self.mode == "min" else score > self.best_score

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Copy the weights (to CPU) when the watched metric improved; stop when it stalls."""
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        score = float(trainer.callback_metrics[self.monitor])
        if not self._is_best(score):
            self.stale_epochs += 1
            if self.patience is not None and self.stale_epochs >= self.patience:
                trainer.should_stop = True
            return
        self.stale_epochs = 0
        self.best_score, self.best_epoch = score, int(trainer.current_epoch)
        state = pl_module.module.state_dict()
        self._best = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put the best weights back into the module."""
        if self._best is None:
            return
        pl_module.module.load_state_dict(self._best)
        logger.info(
            "restored the weights of epoch %d (%s %.4g)",
            self.best_epoch,
            self.monitor,
            self.best_score,
        )


def early_stopping_split(
    codes: np.ndarray,
    validation_size: float,
    random_state: int,
    patience: int,
    train_kwargs: dict,
) -> tuple[np.ndarray, np.ndarray]:
    """Hold out a stratified validation part of a reference and stop early on its loss.

    The fine-tuning recipes' shared step: :func:`stratified_split` of the cells by class and,
    when the validation part is not empty, a :class:`RestoreBestWeights` on
    ``"validation_loss"`` added to ``train_kwargs["callbacks"]`` (the caller's callbacks kept)
    with validation every epoch unless ``train_kwargs`` says otherwise.

    Parameters
    ----------
    codes
        Class code of each cell.
    validation_size
        Share of each class held out, in ``[0, 1)``.
    random_state
        Seed of the split.
    patience
        Epochs without a lower validation loss before training stops.
    train_kwargs
        Keyword arguments for the model's ``train``; updated in place.

    Returns
    -------
    ``(train, validation)`` cell indices, as :func:`stratified_split`.
    """
    train, validation = stratified_split(codes, validation_size, random_state)
    if validation.size:
        callbacks = list(train_kwargs.get("callbacks") or [])
        callbacks.append(RestoreBestWeights("validation_loss", patience=patience))
        train_kwargs["callbacks"] = callbacks
        train_kwargs.setdefault("check_val_every_n_epoch", 1)
    return train, validation
