"""Deterministic training randomness: what a run draws depends on (seed, epoch, rank), not history.

A resumed run must see the batches, masks and dropout of an uninterrupted one. Lightning restores
weights, optimizer, schedulers and loop counters from a checkpoint, but not random states, and
the global torch stream is consumed differently by a run that restarts (data-loader iterators are
created at other moments). So every random stream of training is re-derived from the seed at a
fixed point instead of carried over:

- the data order of each epoch from ``(seed, epoch)`` (:class:`EpochShuffleSampler`, the seed of
  a :class:`~torch.utils.data.DistributedSampler`, or a dataset's ``set_epoch``);
- the masking/tokenization streams of a training plan from ``(seed, epoch, rank)`` at the start
  of each epoch (:class:`SeededStreamsMixin`);
- the global torch stream (dropout) from ``(seed, epoch, batch, rank)`` before each training step
  (:class:`EpochSeedCallback`).

The epoch is read from Lightning's epoch progress (``processed`` epochs), which is restored from a
checkpoint before the first data loader of a resumed run is built.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DistributedSampler, Sampler

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = [
    "EVAL_OFFSET",
    "EpochSeedCallback",
    "EpochShuffleSampler",
    "SeededStreamsMixin",
    "derive_seed",
    "forked_torch_streams",
    "seeded_torch",
    "training_epoch",
]

#: Offset of the validation streams' seed (the same masks in every validation epoch).
EVAL_OFFSET = 1_000_003


@contextlib.contextmanager
def seeded_torch(seed: int) -> Iterator[None]:
    """Seed the global torch streams (CPU and every CUDA device) inside; restore the caller's.

    Weights made before training (a new head, new rows) are drawn from the global stream, whose
    state differs from process to process: without a seed the trained model would too.
    """
    with forked_torch_streams():
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def forked_torch_streams() -> Iterator[None]:
    """Draw from copies of the global torch streams (CPU and every CUDA device) inside.

    On leaving, the caller's streams are as they were, whatever was drawn inside.
    """
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        yield


def derive_seed(*keys: int) -> int:
    """Mix integers (seed, epoch, rank ...) into a 32-bit seed, well spread even for 0, 1, 2."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def training_epoch(trainer: pl.Trainer | None) -> int:
    """Return the epoch a trainer is in or about to start (processed epochs; 0 without one)."""
    if trainer is None:
        return 0
    # `current_epoch` lags by one while a checkpoint saved at an epoch's end is being resumed
    # (`completed` is caught up only when the loop starts); `processed` is the value Lightning
    # itself hands to `sampler.set_epoch`.
    return int(trainer.fit_loop.epoch_progress.current.processed)


class EpochShuffleSampler(Sampler[int]):
    """Indices ``0 .. n - 1`` in a random order that depends only on ``(seed, epoch)``.

    Parameters
    ----------
    n
        Number of items.
    seed
        Seed of the orders.
    epoch
        First epoch (Lightning and :class:`EpochSeedCallback` call :meth:`set_epoch` later).
    """

    def __init__(self, n: int, seed: int, epoch: int = 0) -> None:
        self.n, self.seed, self.epoch = int(n), int(seed), int(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order the next iteration gives."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        yield from torch.randperm(self.n, generator=generator).tolist()

    def __len__(self) -> int:
        return self.n


def seed_samplers(loader: Any, seed: int, epoch: int) -> None:
    """Make a data loader's shuffling a function of ``(seed, epoch)``.

    A shuffling :class:`~torch.utils.data.RandomSampler` inside a batch sampler (scvi-tools'
    :class:`~scvi.dataloaders.AnnDataLoader`) is swapped for an :class:`EpochShuffleSampler`;
    a :class:`~torch.utils.data.DistributedSampler` gets ``seed`` (it is 0 in scvi-tools'); every
    sampler or dataset with ``set_epoch`` is set to ``epoch``.
    """
    from torch.utils.data import RandomSampler

    outer = getattr(loader, "sampler", None)
    inner = getattr(outer, "sampler", None)
    if isinstance(inner, RandomSampler) and not inner.replacement:
        # The batch sampler is a plain object: its inner sampler can be replaced, while the
        # DataLoader itself refuses new samplers after construction.
        outer.sampler = EpochShuffleSampler(len(inner.data_source), seed, epoch)
    if isinstance(outer, DistributedSampler):
        outer.seed = int(seed)
    set_epochs(loader, epoch)


def set_epochs(loader: Any, epoch: int) -> None:
    """Call ``set_epoch(epoch)`` on a loader's samplers and dataset, where they have one."""
    objects = {}
    for owner in (loader, getattr(loader, "batch_sampler", None)):
        sampler = getattr(owner, "sampler", None)
        for obj in (sampler, getattr(sampler, "sampler", None)):
            if obj is not None:
                objects[id(obj)] = obj
    dataset = getattr(loader, "dataset", None)
    if dataset is not None:
        objects[id(dataset)] = dataset
    for obj in objects.values():
        if callable(getattr(obj, "set_epoch", None)):
            obj.set_epoch(epoch)


def _train_loaders(trainer: pl.Trainer) -> list[Any]:
    loaders = trainer.train_dataloader
    if loaders is None:
        return []
    if isinstance(loaders, dict):
        return list(loaders.values())
    return list(loaders) if isinstance(loaders, list | tuple) else [loaders]


class EpochSeedCallback(Callback):
    """Re-derive the data order and the global torch stream from the seed, epoch by epoch.

    At the start of each training epoch the training loaders' samplers and datasets are set to
    the epoch (:func:`set_epochs`); before each training step the global torch stream (dropout,
    any other draw of the module) is seeded from ``(seed, epoch, batch index, rank)``. A run
    resumed from a checkpoint therefore draws what the uninterrupted run drew.

    Parameters
    ----------
    seed
        Seed; ``None`` reads the training plan's ``random_state`` (0 when it has none).
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed

    def _seed(self, pl_module: pl.LightningModule) -> int:
        if self.seed is not None:
            return int(self.seed)
        return int(getattr(pl_module, "random_state", 0))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Set the epoch on the training loaders' samplers and datasets."""
        epoch = training_epoch(trainer)
        for loader in _train_loaders(trainer):
            set_epochs(loader, epoch)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Seed the global torch stream (CPU and CUDA) for this step."""
        seed = derive_seed(
            self._seed(pl_module), training_epoch(trainer), batch_idx, trainer.global_rank
        )
        torch.manual_seed(seed)


class SeededStreamsMixin:
    """Random streams of a training plan, per stage, derived from ``random_state``.

    Training streams restart at each epoch from ``(random_state, epoch, rank)`` (DDP ranks draw
    different masks; a resumed run draws what the uninterrupted one did); validation streams
    restart at each validation epoch from ``random_state`` alone, so every validation epoch is
    scored on the same masks. Subclasses define :meth:`_new_streams` and call :meth:`_stream`.
    """

    random_state: int

    def _new_streams(self, seed: int) -> Any:
        raise NotImplementedError

    def _stage(self) -> str:
        trainer = self._trainer
        return "train" if trainer is None or trainer.training else "eval"

    def _stream(self, stage: str | None = None) -> Any:
        """Return the streams of ``stage`` (default: the current one), made on first use."""
        stage = self._stage() if stage is None else stage
        streams = self.__dict__.setdefault("_streams", {})
        if stage not in streams:
            if stage == "train":
                trainer = self._trainer
                rank = self.global_rank if trainer is not None else 0
                seed = derive_seed(self.random_state, training_epoch(trainer), rank)
            else:
                seed = self.random_state + EVAL_OFFSET
            streams[stage] = self._new_streams(seed)
        return streams[stage]

    def _reset_streams(self, stage: str) -> None:
        self.__dict__.setdefault("_streams", {}).pop(stage, None)

    def on_train_start(self) -> None:
        """Restart the training streams (a run resumed mid-epoch gets no epoch-start hook)."""
        super().on_train_start()
        self._reset_streams("train")

    def on_train_epoch_start(self) -> None:
        """Restart the training streams for this epoch."""
        super().on_train_epoch_start()
        self._reset_streams("train")

    def on_validation_epoch_start(self) -> None:
        """Restart the validation streams, so every epoch is scored on the same masks."""
        super().on_validation_epoch_start()
        self._reset_streams("eval")
