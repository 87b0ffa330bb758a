"""CellPLM with an adversarial batch classifier on the latent (pure torch, no AnnData).

CellPLM's own batch-integration parts are the batch-aware decoder (a batch embedding added to
the decoder's hidden layer, :class:`~scfm_tools.models.cellplm._module.NBMLPDecoder`) and the
optional adversarial latent layer (official ``dar=True``, ``AdversarialLatentLayer``: a
discriminator of the batch on the latent, 64 hidden units, PReLU, dropout 0.1, layer norm).
:class:`CellPLMIntegrationModule` adds the second to the module: the discriminator reads the
latent through a gradient reversal and its cross-entropy, weighted by ``dar_weight``, joins the
loss, so one optimiser step trains the discriminator to tell the batches apart and the encoder
to make them indistinguishable. The official layer alternates two optimisers (SGD for the
discriminator, the negated cross-entropy for the model); gradient reversal is the one-step
form of the same game.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from scvi.module.base import LossOutput
from torch import Tensor, nn

from ...nn._grad_reverse import grad_reverse
from ._module import BATCH_KEY, CellPLMModule

__all__ = ["CellPLMIntegrationModule"]

# The official dar layer's discriminator (cellformer.py: discriminator_hidden=64; defaults of
# AdversarialLatentLayer: 2 layers, dropout 0.1).
DISCRIMINATOR_HIDDEN = 64
DISCRIMINATOR_DROPOUT = 0.1


class BatchDiscriminator(nn.Module):
    """The official ``Discriminator``: [Linear, PReLU, Dropout, LayerNorm] then Linear."""

    def __init__(self, latent_dim: int, n_batches: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Linear(latent_dim, DISCRIMINATOR_HIDDEN),
                    nn.PReLU(),
                    nn.Dropout(DISCRIMINATOR_DROPOUT),
                    nn.LayerNorm(DISCRIMINATOR_HIDDEN),
                ),
                nn.Linear(DISCRIMINATOR_HIDDEN, n_batches),
            ]
        )

    def forward(self, z: Tensor) -> Tensor:
        for layer in self.layers:
            z = layer(z)
        return z


class CellPLMIntegrationModule(CellPLMModule):
    """:class:`~scfm_tools.models.cellplm.CellPLMModule` plus the adversarial batch classifier.

    Parameters
    ----------
    n_genes
        Size of the gene vocabulary.
    dar_weight
        Weight of the adversarial term; 0 builds no discriminator (batch-aware decoder only).
    **kwargs
        Passed to :class:`~scfm_tools.models.cellplm.CellPLMModule`; ``batch_num`` (the
        decoder's batch table, one row per batch of the data) is required.
    """

    def __init__(self, n_genes: int, *, dar_weight: float = 1.0, **kwargs: Any) -> None:
        super().__init__(n_genes, **kwargs)
        n_batches = int(self.config["batch_num"])
        if n_batches < 1:
            raise ValueError("an integration module needs the decoder's batch table (batch_num).")
        if dar_weight < 0:
            raise ValueError(f"dar_weight must be non-negative, got {dar_weight!r}.")
        self.config["dar_weight"] = float(dar_weight)
        self.dar_weight = float(dar_weight)
        self.discriminator = (
            BatchDiscriminator(self.n_latent, n_batches) if dar_weight > 0 else None
        )

    def loss(
        self,
        tensors: dict[str, Tensor],
        inference_outputs: dict[str, Any],
        generative_outputs: dict[str, Tensor],
    ) -> LossOutput:
        """Compute the base loss plus ``dar_weight`` times the discriminator's cross-entropy.

        Parameters
        ----------
        tensors
            The sequence (with ``batch`` ids).
        inference_outputs
            Output of :meth:`inference`.
        generative_outputs
            Output of :meth:`generative`.

        Returns
        -------
        :class:`scvi.module.base.LossOutput`; ``dar_loss`` joins ``extra_metrics``.
        """
        base = super().loss(tensors, inference_outputs, generative_outputs)
        if self.discriminator is None or BATCH_KEY not in tensors:
            return base
        logits = self.discriminator(grad_reverse(inference_outputs["z"]))
        dar = F.cross_entropy(logits.float(), tensors[BATCH_KEY].reshape(-1).long())
        return LossOutput(
            loss=base.loss + self.dar_weight * dar,
            reconstruction_loss=base.reconstruction_loss,
            kl_local=base.kl_local,
            n_obs_minibatch=base.n_obs_minibatch,
            extra_metrics={**base.extra_metrics, "dar_loss": dar.detach()},
        )
