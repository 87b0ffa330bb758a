"""Training machinery shared by the model families (as ``scvi.train`` is for scvi-tools).

:class:`TrainingMixin` gives every model class its ``train``: DDP over devices and nodes, atomic
checkpoints and exact resuming. Randomness is derived from ``(seed, epoch, rank)``
(:mod:`scfm_tools.train._seeding`), so a resumed run trains as an uninterrupted one.
:class:`BindableDataModule` is what a data module offers for a model to put its genes on the
model's vocabulary. Nothing here knows a model family.
"""

from ._checkpoints import (
    AtomicModelCheckpoint,
    find_resume_checkpoint,
    is_complete_checkpoint,
    resolve_resume,
)
from ._data_splitter import SeededDataSplitter
from ._datamodule import BindableDataModule, Collate
from ._fine_tune import (
    ClassWeights,
    RestoreBestWeights,
    compute_class_weights,
    early_stopping_split,
    stratified_split,
)
from ._mixin import DOC_TRAIN_SCALE, TrainingMixin
from ._seeding import (
    EpochSeedCallback,
    EpochShuffleSampler,
    SeededStreamsMixin,
    derive_seed,
    forked_torch_streams,
    seeded_torch,
    training_epoch,
)
from ._trainer import resolve_strategy

__all__ = [
    "DOC_TRAIN_SCALE",
    "AtomicModelCheckpoint",
    "BindableDataModule",
    "ClassWeights",
    "Collate",
    "EpochSeedCallback",
    "EpochShuffleSampler",
    "RestoreBestWeights",
    "SeededDataSplitter",
    "SeededStreamsMixin",
    "TrainingMixin",
    "compute_class_weights",
    "derive_seed",
    "early_stopping_split",
    "find_resume_checkpoint",
    "forked_torch_streams",
    "is_complete_checkpoint",
    "resolve_resume",
    "resolve_strategy",
    "seeded_torch",
    "stratified_split",
    "training_epoch",
]
