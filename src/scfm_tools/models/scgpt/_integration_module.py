"""scGPT's batch-integration objectives as a pure-torch module (no AnnData in this layer).

:class:`SCGPTIntegrationModule` is :class:`~scfm_tools.models.scgpt.SCGPTModule` plus the parts
the official integration fine-tuning turns on (``examples/finetune_integration.py`` and
``tutorials/Tutorial_Integration.ipynb`` of bowang-lab/scGPT):

- **DSBN**: domain-specific batch norm of the token embeddings (gene + value) before the
  transformer, one ``BatchNorm1d`` per batch, without affine parameters (official
  ``DomainSpecificBatchNorm1d(d_model, n_batches, eps=6.1e-5, affine=False)``);
- **DAR**: a batch classifier on the cell embedding behind a gradient-reversal layer (official
  ``AdversarialDiscriminator``, 3 layers, LeakyReLU), its cross-entropy weighted by
  ``dab_weight``;
- **ECS**: elastic cell similarity, ``mean(1 - (relu(cos) - threshold)^2)`` over the pairs of
  cells of a minibatch (diagonal set to 0), weighted by ``ecs_weight`` (official 10);
- the batch embedding concatenated to the GEP and MVC decoders' inputs (``use_batch_labels``)
  and ``explicit_zero_prob`` come from the base module.

Submodules keep the official names (``dsbn.bns.<i>``, ``grad_reverse_discriminator``), so an
official integration checkpoint's extra weights load too.

One difference: the official DSBN normalises a whole minibatch with the norm of its first
cell's batch, relying on a sampler that fills each minibatch from one batch; here each cell is
normalised by its own batch's norm, which is the same for such minibatches and stays right
for mixed ones.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from scvi.module.base import LossOutput
from torch import Tensor, nn

from ...nn._grad_reverse import grad_reverse
from ._module import SCGPTModule

__all__ = ["SCGPTIntegrationModule", "elastic_cell_similarity"]

# Official settings of the integration example.
DSBN_EPS = 6.1e-5
ECS_WEIGHT = 10.0


class DomainSpecificBatchNorm(nn.Module):
    """One ``BatchNorm1d`` per batch; each cell is normalised by its batch's norm.

    Parameters
    ----------
    n_features
        Embedding width.
    n_domains
        Number of batches.
    eps
        Batch-norm epsilon.
    affine
        Learn a scale and shift per batch (the official integration runs without).
    """

    def __init__(
        self, n_features: int, n_domains: int, *, eps: float = DSBN_EPS, affine: bool = False
    ) -> None:
        super().__init__()
        self.bns = nn.ModuleList(
            nn.BatchNorm1d(n_features, eps=eps, affine=affine) for _ in range(n_domains)
        )

    def forward(self, x: Tensor, domains: Tensor) -> Tensor:
        """Normalise ``x`` ``(batch, seq_len, d)`` per cell by the norm of its ``domains`` entry."""
        out = torch.empty_like(x)
        for domain in torch.unique(domains).tolist():
            rows = domains == domain
            # BatchNorm1d normalises dim 1 over dims 0 and 2: features over cells and tokens.
            out[rows] = self.bns[domain](x[rows].transpose(1, 2)).transpose(1, 2)
        return out


class AdversarialDiscriminator(nn.Module):
    """Batch classifier behind a gradient reversal: ``n_layers - 1`` x [Linear, LeakyReLU, LN]."""

    def __init__(self, d_model: int, n_cls: int, n_layers: int = 3) -> None:
        super().__init__()
        self._decoder = nn.ModuleList()
        for _ in range(n_layers - 1):
            self._decoder.extend(
                [nn.Linear(d_model, d_model), nn.LeakyReLU(), nn.LayerNorm(d_model)]
            )
        self.out_layer = nn.Linear(d_model, n_cls)

    def forward(self, x: Tensor) -> Tensor:
        x = grad_reverse(x)
        for layer in self._decoder:
            x = layer(x)
        return self.out_layer(x)


def elastic_cell_similarity(cell_emb: Tensor, threshold: float) -> Tensor:
    """ECS loss: ``mean(1 - (relu(cos) - threshold)^2)``, self-similarities set to 0.

    Minimising it pushes each pair's cosine similarity away from ``threshold``: pairs above it
    closer together, pairs below it apart.

    Parameters
    ----------
    cell_emb
        Cell embeddings ``(batch, d)``.
    threshold
        The similarity threshold (official 0.8).

    Returns
    -------
    Scalar loss.
    """
    unit = F.normalize(cell_emb.float(), p=2, dim=1)
    cos = unit @ unit.t()
    cos = cos.masked_fill(torch.eye(cos.shape[0], dtype=torch.bool, device=cos.device), 0.0)
    return torch.mean(1 - (F.relu(cos) - threshold) ** 2)


class SCGPTIntegrationModule(SCGPTModule):
    """scGPT with the official integration objectives (see the module documentation).

    Every minibatch must carry ``batch_labels`` (DSBN and DAR read them). The loss is the base
    module's (GEP, MVC and their zero-probability terms) plus ``ecs_weight * ECS`` and
    ``dab_weight * DAR``.

    Parameters
    ----------
    *args
        Passed to :class:`~scfm_tools.models.scgpt.SCGPTModule`.
    n_domains
        Number of batches (rows of the DSBN and of the discriminator's output).
    dsbn
        Domain-specific batch norm of the token embeddings.
    dab_weight
        Weight of the adversarial batch term; 0 builds no discriminator.
    ecs_threshold
        ECS similarity threshold; 0 turns ECS off.
    ecs_weight
        Weight of the ECS term.
    **kwargs
        Passed to :class:`~scfm_tools.models.scgpt.SCGPTModule` (``use_batch_labels``,
        ``n_batch_labels``, ``explicit_zero_prob``, ``do_mvc`` ...).
    """

    def __init__(
        self,
        *args: Any,
        n_domains: int,
        dsbn: bool = True,
        dab_weight: float = 1.0,
        ecs_threshold: float = 0.8,
        ecs_weight: float = ECS_WEIGHT,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if n_domains < 1:
            raise ValueError(f"n_domains must be a positive integer, got {n_domains!r}.")
        if not 0.0 <= ecs_threshold < 1.0:
            raise ValueError(f"ecs_threshold must lie in [0, 1), got {ecs_threshold!r}.")
        self.config.update(
            n_domains=n_domains,
            dsbn=dsbn,
            dab_weight=dab_weight,
            ecs_threshold=ecs_threshold,
            ecs_weight=ecs_weight,
        )
        self.n_domains = n_domains
        self.dab_weight = float(dab_weight)
        self.ecs_threshold = float(ecs_threshold)
        self.ecs_weight = float(ecs_weight)
        self.dsbn = DomainSpecificBatchNorm(self.d_model, n_domains) if dsbn else None
        self.grad_reverse_discriminator = (
            AdversarialDiscriminator(self.d_model, n_domains) if dab_weight > 0 else None
        )

    def _check_batch_labels(self, batch_labels: Tensor | None) -> None:
        # DSBN and the adversary read every cell's batch, with or without batch embeddings
        if batch_labels is None:
            raise ValueError("an integration module needs the batch_labels of every minibatch.")

    def _per_batch(self, tokens: Tensor, batch_labels: Tensor | None) -> Tensor:
        """Domain-specific batch norm of the token embeddings (each cell by its batch)."""
        if self.dsbn is None:
            return tokens
        if batch_labels is None:
            raise ValueError("this model normalises per batch (DSBN): pass batch_labels.")
        return self.dsbn(tokens, batch_labels.reshape(-1).long())

    def loss(
        self,
        tensors: dict[str, Tensor],
        inference_outputs: dict[str, Any],
        generative_outputs: dict[str, Tensor],
    ) -> LossOutput:
        """GEP + MVC (and zero-probability terms) + ``ecs_weight`` ECS + ``dab_weight`` DAR.

        Parameters
        ----------
        tensors
            The minibatch (``target_values`` and ``batch_labels``).
        inference_outputs
            Output of :meth:`inference`.
        generative_outputs
            Output of :meth:`generative`.

        Returns
        -------
        :class:`scvi.module.base.LossOutput`; ``ecs_loss`` and ``dab_loss`` (unweighted) join
        the base terms in ``extra_metrics``.
        """
        base = super().loss(tensors, inference_outputs, generative_outputs)
        cell_emb = inference_outputs["cell_emb"]
        total = base.loss
        extra = dict(base.extra_metrics)
        if self.ecs_threshold > 0 and cell_emb.shape[0] > 1:
            ecs = elastic_cell_similarity(cell_emb, self.ecs_threshold)
            total = total + self.ecs_weight * ecs
            extra["ecs_loss"] = ecs.detach()
        if self.grad_reverse_discriminator is not None:
            logits = self.grad_reverse_discriminator(cell_emb)
            dab = F.cross_entropy(logits.float(), inference_outputs["batch_labels"])
            total = total + self.dab_weight * dab
            extra["dab_loss"] = dab.detach()
        return LossOutput(
            loss=total,
            reconstruction_loss=base.reconstruction_loss,
            n_obs_minibatch=base.n_obs_minibatch,
            extra_metrics=extra,
        )

    @torch.no_grad()
    def integrated_embedding(
        self, gene_ids: Tensor, values: Tensor, padding_mask: Tensor, batch_labels: Tensor
    ) -> Tensor:
        """L2-normalised ``<cls>`` output with each cell's batch norm (the integrated embedding).

        Parameters
        ----------
        gene_ids
            Token ids ``(batch, seq_len)``, ``<cls>`` first.
        values
            Input values ``(batch, seq_len)``.
        padding_mask
            Boolean ``(batch, seq_len)``, ``True`` at padding.
        batch_labels
            Batch codes ``(batch,)``.

        Returns
        -------
        ``(batch, d_model)`` float tensor of unit rows.
        """
        out = self.encode(gene_ids, values, padding_mask, batch_labels=batch_labels, cls_only=True)
        return F.normalize(out["transformer_output"][:, 0, :].float(), dim=1)
