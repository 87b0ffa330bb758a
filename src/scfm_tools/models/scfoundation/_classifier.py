"""The cell-type head of scFoundation's fine-tuning example (pure torch).

The official ``finetune_model.py`` (``LinearProbingClassifier``) max-pools the encoder's
outputs over a cell's tokens, normalises the pooled vector with a ``BatchNorm1d`` without
learned scale and shift (``affine=False, eps=1e-6``) and classifies it with an MLP
``Linear(enc_dim, 256) -> ReLU -> Linear(256, n_classes)``. Attribute names follow it (``norm``,
``fc1.0``, ``fc1.2``). As in the example, the encoder reads a cell's expressed genes alone,
without the ``T`` and ``S`` depth tokens; the maximum runs over the gene tokens (padding left
out).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["SCFoundationClassifierHead", "max_over_genes"]

#: Width of the head's hidden layer in the official example.
HEAD_HIDDEN = 256


def max_over_genes(hidden: Tensor, positions: Tensor, n_genes: int) -> Tensor:
    """Maximum of each cell's encoder outputs over its gene tokens.

    Parameters
    ----------
    hidden
        ``(batch, n, dim)`` encoder outputs of the gathered tokens.
    positions
        ``(batch, n)`` their positions; genes are below ``n_genes`` (``T``, ``S`` and padded
        slots are not).
    n_genes
        Number of model genes.

    Returns
    -------
    ``(batch, dim)`` float32.
    """
    genes = (positions < n_genes).unsqueeze(-1)
    if not bool(genes.any(dim=1).all()):
        raise ValueError("a cell has no gene token: it expresses none of the model's genes.")
    return hidden.float().masked_fill(~genes, float("-inf")).amax(dim=1)


class SCFoundationClassifierHead(nn.Module):
    """``BatchNorm1d`` (no affine parameters) then a two-layer MLP, as the official example.

    Parameters
    ----------
    dim
        Width of the pooled encoder output (``enc_dim``).
    n_classes
        Number of cell types.
    hidden
        Width of the hidden layer (official 256).
    """

    def __init__(self, dim: int, n_classes: int, *, hidden: int = HEAD_HIDDEN) -> None:
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {n_classes}.")
        self.n_classes = int(n_classes)
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.fc1 = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))

    def forward(self, pooled: Tensor) -> Tensor:
        """Class logits ``(batch, n_classes)`` of pooled cells ``(batch, dim)``."""
        # The head runs in float32: batch statistics of a bf16 autocast pass are imprecise.
        with torch.autocast(pooled.device.type, enabled=False):
            return self.fc1(self.norm(pooled.float()))
