"""Data loading for pretraining at scale: many ``.h5ad`` files, read lazily, sharded over processes.

:class:`MultiFileDataModule` streams cells from a list of ``.h5ad`` files (kept on disk) for
``model.train(datamodule=...)``, shuffling ``(file, row block)`` pairs and then the rows within
each block every epoch, and giving each DDP process and data-loader worker its own share; see
:mod:`scfm_tools.dataloaders._multifile` for the order and the padding rule.
"""

from ._multifile import (
    CELL_ID,
    X_KEY,
    MultiFileCellDataset,
    MultiFileDataModule,
    h5ad_summary,
)

__all__ = ["CELL_ID", "X_KEY", "MultiFileCellDataset", "MultiFileDataModule", "h5ad_summary"]
