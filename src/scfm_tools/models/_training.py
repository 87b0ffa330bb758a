"""Training shared by the four model families: distributed runs, checkpoints, resuming, seeding.

:class:`TrainingMixin` takes the place of scvi-tools' ``UnsupervisedTrainingMixin`` in each model
class. Its :meth:`~TrainingMixin.train` adds to scvi-tools' (which hands ``strategy``,
``num_nodes`` etc. on to Lightning) what pretraining at scale needs: a DDP strategy when several
devices or nodes are asked for, atomic checkpoints in ``checkpoint_dir``, ``resume=``, and
randomness derived from the seed and the epoch (:mod:`._seeding`), so that a resumed run trains
exactly as an uninterrupted one would. The family ``train`` methods fill in their own plan and
data settings and call it; their docstrings take the shared text :data:`DOC_TRAIN_SCALE`.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import numpy as np
from lightning.pytorch.callbacks import ModelCheckpoint
from scvi.dataloaders import DataSplitter
from scvi.model._utils import use_distributed_sampler
from scvi.model.base import UnsupervisedTrainingMixin
from scvi.train import SaveCheckpoint, Trainer, TrainRunner

from .._anndata import resolve_seed
from .._settings import settings
from ._seeding import EpochSeedCallback, derive_seed, seed_samplers, training_epoch
from ._train_checkpoints import AtomicModelCheckpoint, resolve_resume

if TYPE_CHECKING:
    from lightning.pytorch.strategies import Strategy

__all__ = [
    "DOC_TRAIN_SCALE",
    "SeededDataSplitter",
    "TrainingMixin",
    "resolve_strategy",
]

logger = logging.getLogger("scfm_tools")

DOC_TRAIN_SCALE = """\
strategy
    Lightning strategy: ``"auto"`` (one process, or ``"ddp"`` when ``devices`` or ``num_nodes``
    ask for several), ``"ddp"``, ``"ddp_spawn"`` ... or a
    :class:`~lightning.pytorch.strategies.Strategy`. DDP strategies given by name run with
    ``find_unused_parameters=True``, because the pretraining loss leaves some heads without
    gradients; on CPU the processes talk through gloo. Each process reads its own share of the
    cells each epoch, so ``batch_size`` is per process.
num_nodes
    Machines taking part; each runs ``devices`` processes (started by Lightning, or by the
    cluster's launcher such as SLURM or ``torchrun``).
checkpoint_dir
    Folder for Lightning checkpoints (weights, optimizer and scheduler states, loop counters),
    written atomically (to a ``.partial`` file, then renamed) at the end of every epoch by the
    first process; the most recent one is kept. With several nodes it must be a folder all of
    them see. ``None`` writes none.
checkpoint_kwargs
    Passed to :class:`~lightning.pytorch.callbacks.ModelCheckpoint`, overriding the defaults
    above (e.g. ``every_n_epochs=5``, ``save_top_k=-1`` to keep every checkpoint,
    ``every_n_train_steps=1000``).
resume
    ``True``: continue from the latest complete checkpoint in ``checkpoint_dir``, or start afresh
    when there is none (so one command both starts and resumes a job); a path: continue from that
    checkpoint file; ``False``: start from the current weights. Truncated or partial files are
    never resumed from. ``max_epochs`` counts the epochs already done. Shuffling, masks and
    dropout are derived from the seed, the epoch and the process rank, so a run resumed from an
    end-of-epoch checkpoint sees the same batches and reaches the same weights as an
    uninterrupted one (up to floating-point nondeterminism of the device)."""

# DDP by name, with unused parameters allowed (the heads a pretraining loss does not touch).
_FIND_UNUSED = {
    name: f"{name}_find_unused_parameters_true"
    for name in ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")
}
# Stream key of the train/validation split (apart from the epochs' streams).
_SPLIT_KEY = 7_000_001
_CHECKPOINT_DEFAULTS = {
    "filename": "{epoch}-{step}",
    "save_top_k": 1,
    "every_n_epochs": 1,
    "save_on_train_epoch_end": True,
    "enable_version_counter": False,
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


class SeededDataSplitter(DataSplitter):
    """scvi-tools' :class:`~scvi.dataloaders.DataSplitter` with a seeded split and training order.

    The cells are split into training, validation and test sets by ``random_state`` (scvi-tools
    draws the split from ``scvi.settings.seed``, unseeded by default, so a resumed run would
    train on other cells), and the training loader shuffles by ``(random_state, epoch)`` (see
    :func:`~scfm_tools.models._seeding.seed_samplers`), in one process as under DDP.

    Parameters
    ----------
    adata_manager
        Manager of the registered AnnData.
    random_state
        Seed of the split and of the training order.
    **kwargs
        Passed to :class:`~scvi.dataloaders.DataSplitter`.
    """

    def __init__(self, adata_manager, *, random_state: int = 0, **kwargs: Any) -> None:
        super().__init__(adata_manager, **kwargs)
        self.random_state = int(random_state)

    def setup(self, stage: str | None = None) -> None:
        """Split the cells (seeded by ``random_state`` when ``shuffle_set_split``)."""
        super().setup(stage)
        if self.external_indexing is not None or not self.shuffle_set_split:
            return
        n_val, n_train = len(self.val_idx), len(self.train_idx)
        rng = np.random.default_rng(derive_seed(self.random_state, _SPLIT_KEY))
        indices = rng.permutation(self.adata_manager.adata.n_obs)
        self.val_idx = indices[:n_val]
        self.train_idx = indices[n_val : n_val + n_train]
        self.test_idx = indices[n_val + n_train :]

    def train_dataloader(self):
        """Build the training loader, its shuffling set to the seed and the current epoch."""
        loader = super().train_dataloader()
        seed_samplers(loader, self.random_state, training_epoch(self.trainer))
        return loader


class _Trainer(Trainer):
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


class _TrainRunner(TrainRunner):
    _trainer_cls = _Trainer


class TrainingMixin(UnsupervisedTrainingMixin):
    """scvi-tools' unsupervised ``train`` with distributed runs, atomic checkpoints and resuming."""

    _data_splitter_cls = SeededDataSplitter
    _train_runner_cls = _TrainRunner

    def train(
        self,
        max_epochs: int | None = None,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        *,
        strategy: str | Strategy = "auto",
        num_nodes: int = 1,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_kwargs: dict[str, Any] | None = None,
        resume: bool | str | os.PathLike = False,
        plan_kwargs: dict[str, Any] | None = None,
        datasplitter_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        """Train through Lightning (see the model's own ``train`` for the parameters).

        The seed of the data order, the masks and the dropout is
        ``plan_kwargs["random_state"]`` (``sft.settings.seed`` when absent). Lightning's progress
        bar follows ``sft.settings.progress_bar`` unless ``enable_progress_bar`` is given.
        """
        if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
            raise ValueError(f"num_nodes must be a positive integer, got {num_nodes!r}.")
        if "ckpt_path" in kwargs:
            raise ValueError("pass the checkpoint to continue from as resume=..., not ckpt_path.")
        if checkpoint_kwargs is not None and checkpoint_dir is None:
            raise ValueError("checkpoint_kwargs needs checkpoint_dir.")
        ckpt_path = resolve_resume(resume, checkpoint_dir)
        plan = dict(plan_kwargs or {})
        seed = int(plan.setdefault("random_state", resolve_seed(None)))
        strategy = resolve_strategy(strategy, devices, num_nodes)

        callbacks = [*list(kwargs.pop("callbacks", None) or []), EpochSeedCallback(seed)]
        if checkpoint_dir is not None:
            options = {**_CHECKPOINT_DEFAULTS, **(checkpoint_kwargs or {})}
            callbacks.append(AtomicModelCheckpoint(dirpath=os.fspath(checkpoint_dir), **options))
            if use_distributed_sampler(strategy):
                # scvi-tools keeps the loss history of DDP runs on disk, by default in the
                # working directory; keep it with the checkpoints instead.
                kwargs.setdefault("log_save_dir", os.fspath(checkpoint_dir))
        kwargs.setdefault("enable_progress_bar", settings.progress_bar)
        splitter = dict(datasplitter_kwargs or {})
        if issubclass(self._data_splitter_cls, SeededDataSplitter):
            splitter.setdefault("random_state", seed)
        return super().train(
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            strategy=strategy,
            num_nodes=num_nodes,
            callbacks=callbacks,
            ckpt_path=ckpt_path,
            plan_kwargs=plan,
            datasplitter_kwargs=splitter,
            **kwargs,
        )
