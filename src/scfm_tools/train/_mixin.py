"""The ``train`` method shared by the four model families.

:class:`TrainingMixin` takes the place of scvi-tools' ``UnsupervisedTrainingMixin`` in each model
class. Its :meth:`~TrainingMixin.train` adds to scvi-tools' (which hands ``strategy``,
``num_nodes`` etc. on to Lightning) what pretraining at scale needs: a DDP strategy when several
devices or nodes are asked for, atomic checkpoints in ``checkpoint_dir``, ``resume=``, and
randomness derived from the seed and the epoch (:mod:`scfm_tools.train._seeding`), so that a
resumed run trains exactly as an uninterrupted one would. The family ``train`` methods fill in
their own plan and data settings and call it; their docstrings take the shared text
:data:`DOC_TRAIN_SCALE`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from scvi.model.base import UnsupervisedTrainingMixin

from .._anndata import resolve_seed
from .._settings import settings
from ._checkpoints import AtomicModelCheckpoint, resolve_resume
from ._data_splitter import SeededDataSplitter
from ._seeding import EpochSeedCallback
from ._trainer import TrainRunner, is_ddp, resolve_strategy

if TYPE_CHECKING:
    from lightning.pytorch.strategies import Strategy

__all__ = ["DOC_TRAIN_SCALE", "TrainingMixin"]

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

_CHECKPOINT_DEFAULTS = {
    "filename": "{epoch}-{step}",
    "save_top_k": 1,
    "every_n_epochs": 1,
    "save_on_train_epoch_end": True,
    "enable_version_counter": False,
}


class TrainingMixin(UnsupervisedTrainingMixin):
    """scvi-tools' unsupervised ``train`` with distributed runs, atomic checkpoints and resuming."""

    _data_splitter_cls = SeededDataSplitter
    _train_runner_cls = TrainRunner

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
            if is_ddp(strategy):
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
