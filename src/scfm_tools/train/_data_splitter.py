"""A data splitter whose train/validation split and training order follow the seed."""

from __future__ import annotations

from typing import Any

import numpy as np
from scvi.dataloaders import DataSplitter

from ._seeding import derive_seed, seed_samplers, training_epoch

__all__ = ["SeededDataSplitter"]

# Stream key of the train/validation split (apart from the epochs' streams).
_SPLIT_KEY = 7_000_001


class SeededDataSplitter(DataSplitter):
    """scvi-tools' :class:`~scvi.dataloaders.DataSplitter` with a seeded split and training order.

    The cells are split into training, validation and test sets by ``random_state`` (scvi-tools
    draws the split from ``scvi.settings.seed``, unseeded by default, so a resumed run would
    train on other cells), and the training loader shuffles by ``(random_state, epoch)`` (see
    :func:`~scfm_tools.train._seeding.seed_samplers`), in one process as under DDP.

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
