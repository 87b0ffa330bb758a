"""Plotting: figures of what :mod:`scfm_tools.tl` wrote (matplotlib, scanpy conventions)."""

from ._annotation import annotation
from ._embedding import embedding
from ._gene_modules import gene_modules
from ._grn import grn
from ._imputation import imputation
from ._training_history import training_history

__all__ = [
    "annotation",
    "embedding",
    "gene_modules",
    "grn",
    "imputation",
    "training_history",
]
