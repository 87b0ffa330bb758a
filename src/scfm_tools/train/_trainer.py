"""The Lightning trainer and runner behind ``train``, and the choice of the DDP strategy."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from scvi.train import SaveCheckpoint
from scvi.train import Trainer as ScviTrainer
from scvi.train import TrainRunner as ScviTrainRunner

if TYPE_CHECKING:
    from lightning.pytorch.strategies import Strategy

__all__ = ["TrainRunner", "Trainer", "is_ddp", "resolve_strategy"]

# DDP by name, with unused parameters allowed (the heads a pretraining loss does not touch).
_FIND_UNUSED = {
    name: f"{name}_find_unused_parameters_true"
    for name in ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")
}


def _n_devices(devices: int | list[int] | str) -> int:
    if isinstance(devices, list | tuple):
        return len(devices)
    if isinstance(devices, str):
        if devices == "auto":
            return 1
        if "," in devices:
            return len([d for d in devices.split(",") if d.strip()])
        devices = int(devices)
    return 2 if devices == -1 else int(devices)  # -1: all devices, assumed several


def resolve_strategy(
    strategy: str | Strategy, devices: int | list[int] | str, num_nodes: int
) -> str | Strategy:
    """Pick DDP for multi-process runs and allow unused parameters in DDP named by string."""
    if not isinstance(strategy, str):
        return strategy
    if strategy == "auto" and (num_nodes > 1 or _n_devices(devices) > 1):
        strategy = "ddp"
    return _FIND_UNUSED.get(strategy, strategy)


def is_ddp(strategy: str | Strategy | None) -> bool:
    """Whether scvi-tools treats ``strategy`` as DDP (distributed sampler, log kept on disk).

    scvi-tools 1.4 decides by any strategy name containing ``"ddp"`` or a
    :class:`~lightning.pytorch.strategies.DDPStrategy` instance; the same rule is kept here
    rather than importing its private helper.
    """
    if isinstance(strategy, str):
        return "ddp" in strategy
    return isinstance(strategy, DDPStrategy)


class Trainer(ScviTrainer):
    """scvi-tools' Trainer that also accepts Lightning ``ModelCheckpoint`` callbacks.

    scvi-tools turns ``enable_checkpointing=True`` into its own ``SaveCheckpoint`` (model folders
    picked by validation loss), and Lightning refuses checkpoint callbacks without it; resumable
    Lightning checkpoints are therefore attached after construction.
    """

    def __init__(self, *args: Any, callbacks: list | None = None, **kwargs: Any) -> None:
        callbacks = list(callbacks or [])
        late = [
            c
            for c in callbacks
            if isinstance(c, ModelCheckpoint) and not isinstance(c, SaveCheckpoint)
        ]
        early = [c for c in callbacks if all(c is not x for x in late)]
        super().__init__(*args, callbacks=early, **kwargs)
        self.callbacks.extend(late)


class TrainRunner(ScviTrainRunner):
    """scvi-tools' TrainRunner building the :class:`Trainer` above."""

    _trainer_cls = Trainer
