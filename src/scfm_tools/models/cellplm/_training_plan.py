"""Lightning data and training plan for CellPLM pretraining: minibatches are sequences.

CellPLM attends across the cells of a sample, so a minibatch is not a random set of cells but
one *sequence*: cells of one ``batch_key`` category (at most ``max_cells``, in random chunks).
:class:`SequenceDataSplitter` splits the cells into training and validation sets as scvi-tools'
:class:`~scvi.dataloaders.DataSplitter` does (seeded), then serves each set as sequences, in an
order drawn from the seed and the epoch (with a :class:`~torch.utils.data.DistributedSampler`
over sequences under DDP).
:class:`CellPLMTrainingPlan` corrupts each training sequence on the CPU before it moves to the
device (:func:`~scfm_tools.models.cellplm.mask_sequence`: dropped cells, masked cells and
features) and optimises :meth:`CellPLMModule.loss <scfm_tools.models.cellplm.CellPLMModule.loss>`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scvi import REGISTRY_KEYS
from scvi.train import TrainingPlan
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..._anndata import get_matrix
from ...train import (
    EpochShuffleSampler,
    SeededDataSplitter,
    SeededStreamsMixin,
    training_epoch,
)
from ._masking import mask_sequence
from ._module import BATCH_KEY, GENE_MASK_KEY, X_KEY, CellPLMModule
from ._sequences import to_model_genes

if TYPE_CHECKING:
    from scvi.data import AnnDataManager

    from ...pp._match_genes import GeneMatch

__all__ = ["CellPLMTrainingPlan", "SequenceDataSplitter"]


class _Sequences(Dataset):
    """Sequences of cells of one sample each, read from the registered matrix."""

    def __init__(
        self,
        X,
        rows: list[np.ndarray],
        match: GeneMatch,
        n_genes: int,
        batch: np.ndarray | None,
    ) -> None:
        self.X, self.rows, self.match, self.n_genes, self.batch = X, rows, match, n_genes, batch
        measured = torch.zeros(n_genes, dtype=torch.bool)
        measured[torch.from_numpy(match.index[match.matched])] = True
        self.gene_mask = measured

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rows = self.rows[i]
        out = {
            X_KEY: to_model_genes(self.X[rows], self.match, self.n_genes),
            GENE_MASK_KEY: self.gene_mask,
        }
        if self.batch is not None:
            out[BATCH_KEY] = torch.from_numpy(self.batch[rows])
        return out


def _chunk(indices: np.ndarray, codes: np.ndarray, max_cells: int, rng) -> list[np.ndarray]:
    """Group ``indices`` by sample code; cut each sample, shuffled, into chunks of max_cells."""
    out = []
    for code in np.unique(codes[indices]):
        members = rng.permutation(indices[codes[indices] == code])
        out.extend(np.sort(members[i : i + max_cells]) for i in range(0, len(members), max_cells))
    return out


class SequenceDataSplitter(SeededDataSplitter):
    """Split cells into train/validation/test like scvi-tools, serve them as sequences.

    Parameters
    ----------
    adata_manager
        Manager of the registered AnnData (``X`` counts; ``batch`` categories = samples).
    match
        The registered genes' match to the model's gene list.
    n_genes
        Number of model genes.
    max_cells
        Most cells per sequence; larger samples are shuffled and cut into chunks.
    use_batch_covariate
        Give the registered batch codes to the decoder's batch table.
    random_state
        Seed of the split, the chunking and the order of the training sequences.
    **kwargs
        Passed to :class:`scvi.dataloaders.DataSplitter` (``train_size``, ``validation_size``,
        ``shuffle_set_split``, ``distributed_sampler`` ...); ``batch_size`` is ignored (a
        sequence is a minibatch).
    """

    def __init__(
        self,
        adata_manager: AnnDataManager,
        *,
        match: GeneMatch,
        n_genes: int,
        max_cells: int,
        use_batch_covariate: bool,
        random_state: int = 0,
        **kwargs: Any,
    ) -> None:
        self.distributed = bool(kwargs.pop("distributed_sampler", False))
        kwargs.pop("load_sparse_tensor", None)
        kwargs["batch_size"] = 1  # one sequence per minibatch: no tiny-last-batch concerns
        super().__init__(adata_manager, random_state=random_state, **kwargs)
        self.match, self.n_genes, self.max_cells = match, n_genes, int(max_cells)
        self.use_batch_covariate = use_batch_covariate
        codes = adata_manager.get_from_registry(REGISTRY_KEYS.BATCH_KEY)
        self.codes = np.asarray(codes).reshape(-1).astype(np.int64)

    def _loader(self, indices: np.ndarray, shuffle: bool, offset: int) -> DataLoader | None:
        if len(indices) == 0:
            return None
        rng = np.random.default_rng(self.random_state + offset)
        rows = _chunk(np.asarray(indices), self.codes, self.max_cells, rng)
        adata = self.adata_manager.adata
        layer = self.adata_manager.registry["setup_args"].get("layer")
        dataset = _Sequences(
            get_matrix(adata, layer),
            rows,
            self.match,
            self.n_genes,
            self.codes if self.use_batch_covariate else None,
        )
        # The order is a function of (seed, epoch), so that a resumed run sees the same one.
        epoch = training_epoch(self.trainer)
        if self.distributed:
            sampler = DistributedSampler(dataset, shuffle=shuffle, seed=self.random_state)
            sampler.set_epoch(epoch)
        elif shuffle:
            sampler = EpochShuffleSampler(len(dataset), self.random_state, epoch)
        else:
            sampler = None
        return DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=0)

    def train_dataloader(self):
        """Sequences of the training cells, in random order."""
        return self._loader(self.train_idx, True, 0)

    def val_dataloader(self):
        """Sequences of the validation cells."""
        return self._loader(self.val_idx, False, 1)

    def test_dataloader(self):
        """Sequences of the test cells."""
        return self._loader(self.test_idx, False, 2)


class CellPLMTrainingPlan(SeededStreamsMixin, TrainingPlan):
    """scvi-tools :class:`~scvi.train.TrainingPlan` that corrupts sequences as CellPLM pretraining.

    Training sequences go through :func:`~scfm_tools.models.cellplm.mask_sequence` (random,
    restarted each epoch from ``random_state``, the epoch and the process rank); validation
    sequences are not corrupted (as the official model in eval mode), so the validation loss is
    the NB reconstruction of the whole sequence from the most likely mixture component.

    Parameters
    ----------
    module
        The :class:`~scfm_tools.models.cellplm.CellPLMModule` to train.
    mask_node_rate
        Fraction of cells masked (official 0.75).
    mask_feature_rate
        Fraction of a masked cell's counts masked (official 0.25).
    drop_node_rate
        Fraction of cells dropped from a sequence (official 0.3).
    max_cells
        Most cells kept per sequence (official ``max_batch_size``).
    mask_beta
        Per-cell masking probabilities from a Beta distribution (official ``True``).
    random_state
        Seed of the corruption.
    lr
        Learning rate (official 2e-4).
    weight_decay
        Weight decay (official 1e-8).
    eps
        Adam epsilon.
    **kwargs
        Passed to :class:`scvi.train.TrainingPlan` (``optimizer``, ``reduce_lr_on_plateau`` ...).
    """

    def __init__(
        self,
        module: CellPLMModule,
        *,
        mask_node_rate: float = 0.75,
        mask_feature_rate: float = 0.25,
        drop_node_rate: float = 0.3,
        max_cells: int | None = 4000,
        mask_beta: bool = True,
        random_state: int = 0,
        lr: float = 2e-4,
        weight_decay: float = 1e-8,
        eps: float = 1e-8,
        **kwargs: Any,
    ) -> None:
        super().__init__(module, lr=lr, weight_decay=weight_decay, eps=eps, **kwargs)
        self.mask_kwargs = {
            "mask_node_rate": mask_node_rate,
            "mask_feature_rate": mask_feature_rate,
            "drop_node_rate": drop_node_rate,
            "max_cells": max_cells,
            "mask_beta": mask_beta,
        }
        self.random_state = int(random_state)

    def _new_streams(self, seed: int) -> np.random.Generator:
        return np.random.default_rng(seed)

    def _count_cells(self, batch: dict[str, torch.Tensor]) -> None:
        self._n_cells = int(batch[X_KEY].shape[0])

    def on_train_batch_start(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Note the cells of the sequence, the weight of its losses in epoch averages."""
        self._count_cells(batch)

    def on_validation_batch_start(
        self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Note the cells of the sequence, the weight of its losses in epoch averages."""
        self._count_cells(batch)

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        """Log as Lightning does, weighting by the sequence's cells unless told otherwise.

        A minibatch here is a dict of a (cells x genes) matrix and per-gene tensors, from which
        Lightning cannot tell the batch size; scvi-tools' plan logs its losses without one.
        """
        n_cells = getattr(self, "_n_cells", None)
        if n_cells is not None:
            kwargs.setdefault("batch_size", n_cells)
        super().log(name, value, *args, **kwargs)

    def on_before_batch_transfer(self, batch: dict[str, torch.Tensor], dataloader_idx: int):
        """Corrupt a training sequence on the CPU before it moves to the device."""
        if self.trainer is None or not self.trainer.training:
            return batch
        extra = {BATCH_KEY: batch[BATCH_KEY]} if BATCH_KEY in batch else None
        out = mask_sequence(batch[X_KEY], rng=self._stream(), extra=extra, **self.mask_kwargs)
        out[GENE_MASK_KEY] = batch[GENE_MASK_KEY]
        return out
