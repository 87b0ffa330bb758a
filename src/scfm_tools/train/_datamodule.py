"""What a data module offers so that a model can put it on its own genes and tokenizer.

Models do not import :mod:`scfm_tools.dataloaders` (it sits above them): a model's ``train``
recognises a data module by this protocol, and
:class:`~scfm_tools.dataloaders.MultiFileDataModule` satisfies it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch
from scipy import sparse

__all__ = ["BindableDataModule", "Collate"]

#: ``collate(X, seed) -> minibatch``: turns a block of cells (CSR, on the model's genes) into
#: the tensors a training plan reads, in the data-loader workers, seeded per minibatch.
Collate = Callable[[sparse.csr_matrix, int], dict[str, torch.Tensor]]


@runtime_checkable
class BindableDataModule(Protocol):
    """A data module whose gene space and worker-side ``collate`` a model can set."""

    def bind(
        self, genes: Mapping[str, int] | Sequence[str], collate: Collate | None = None
    ) -> None:
        """Put the data on ``genes`` (``{gene: column}`` or a list) and run ``collate`` in workers.

        Parameters
        ----------
        genes
            The model's gene space: ``{gene: column}`` (e.g. a vocabulary) or a gene list.
        collate
            Run on each minibatch in the data-loader workers, or ``None``.
        """
