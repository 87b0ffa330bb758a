"""Gradient reversal (Ganin & Lempitsky 2015): identity forward, negated gradient backward.

Placed between an encoder and a classifier of a nuisance label (e.g. the batch), it trains the
classifier to predict the label while pushing the encoder to make the label unpredictable, in
one optimiser step: adversarial removal of batch information.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["grad_reverse"]


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: float) -> Tensor:
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad.neg() * ctx.weight, None


def grad_reverse(x: Tensor, weight: float = 1.0) -> Tensor:
    """Return ``x`` unchanged; its gradient comes back multiplied by ``-weight``.

    Parameters
    ----------
    x
        Any tensor.
    weight
        Scale of the reversed gradient.

    Returns
    -------
    A view of ``x``.
    """
    return _GradReverse.apply(x, float(weight))
