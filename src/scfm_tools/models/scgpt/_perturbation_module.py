"""scGPT's perturbation model (official ``TransformerGenerator``) as a pure-torch module.

As in bowang-lab/scGPT's ``scgpt/model/generation_model.py`` and its perturbation tutorial:
each gene token's input is its gene embedding plus its (continuous, log-normalised) control
value's embedding plus a perturbation-flag embedding (``pert_encoder``, 3 flags, flag 0 "not
perturbed" being the padding index, so a zero vector), and an affine decoder predicts each
gene's post-perturbation value as ``coeff * value + bias``. The gene, value and transformer
weights come from a pretrained scGPT (the tutorial's ``load_param_prefixs``); the flag embedding
and the decoder are new (randomly initialised as in the tutorial, or, with
``AffineExprDecoder.start_as_identity``, starting from "no change").
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ...nn import TransformerEncoder
from ._module import ContinuousValueEncoder, ExprDecoder, GeneEncoder, SCGPTModule

__all__ = ["NOT_PERTURBED", "PERTURBED", "SCGPTPerturbationModule"]

#: Perturbation flags of a gene token (official ``pert_flags``; 0 is the padding index).
NOT_PERTURBED, PERTURBED = 0, 1
#: The pretrained parts the official tutorial loads (``load_param_prefixs``).
PRETRAINED_PARTS = ("encoder", "value_encoder", "transformer_encoder")


class AffineExprDecoder(nn.Module):
    """Post-perturbation value as ``coeff * input value + bias``, both from an MLP per token."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.coeff_decoder = ExprDecoder(d_model, explicit_zero_prob=False, use_batch_labels=False)
        self.bias_decoder = ExprDecoder(d_model, explicit_zero_prob=False, use_batch_labels=False)

    def forward(self, x: Tensor, values: Tensor) -> Tensor:
        return self.coeff_decoder(x)["pred"] * values + self.bias_decoder(x)["pred"]

    @torch.no_grad()
    def start_as_identity(self) -> None:
        """Make the decoder return its input values (coefficient 1, bias 0) until trained.

        The last layer of each MLP gets zero weights, so the output starts as "no change" and
        training learns the perturbation's effect from there rather than first having to learn
        to copy the control values through two randomly initialised MLPs.
        """
        for mlp, start in ((self.coeff_decoder.fc, 1.0), (self.bias_decoder.fc, 0.0)):
            mlp[-1].weight.zero_()
            mlp[-1].bias.fill_(start)


class SCGPTPerturbationModule(nn.Module):
    """Predicts each gene's value after perturbing the flagged genes of a control cell.

    Parameters
    ----------
    encoder, value_encoder, transformer_encoder
        The pretrained scGPT parts (copied by :meth:`from_pretrained`).
    d_model
        Embedding width.
    """

    def __init__(
        self,
        encoder: GeneEncoder,
        value_encoder: ContinuousValueEncoder,
        transformer_encoder: TransformerEncoder,
        d_model: int,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.value_encoder = value_encoder
        self.transformer_encoder = transformer_encoder
        self.pert_encoder = nn.Embedding(3, d_model, padding_idx=NOT_PERTURBED)
        self.decoder = AffineExprDecoder(d_model)

    @classmethod
    def from_pretrained(
        cls, module: SCGPTModule, *, dropout: float = 0.0
    ) -> SCGPTPerturbationModule:
        """Copy the gene, value and transformer weights of a pretrained scGPT module.

        ``dropout`` replaces the pretrained rate (the tutorial fine-tunes with 0).
        """
        parts = {name: copy.deepcopy(getattr(module, name)) for name in PRETRAINED_PARTS}
        out = cls(**parts, d_model=module.d_model)
        for m in out.modules():
            if isinstance(m, nn.Dropout):
                m.p = dropout
        return out

    def forward(
        self, gene_ids: Tensor, values: Tensor, pert_flags: Tensor, padding_mask: Tensor
    ) -> Tensor:
        """Predict ``(batch, seq_len)`` post-perturbation values.

        Parameters
        ----------
        gene_ids
            Token ids ``(batch, seq_len)``.
        values
            The control cells' log-normalised values ``(batch, seq_len)``.
        pert_flags
            ``(batch, seq_len)``: :data:`PERTURBED` at the perturbed genes, else
            :data:`NOT_PERTURBED`.
        padding_mask
            Boolean ``(batch, seq_len)``, ``True`` at padding.
        """
        total = self.encoder(gene_ids) + self.value_encoder(values) + self.pert_encoder(pert_flags)
        out, _ = self.transformer_encoder(total, padding_mask.bool())
        return self.decoder(out, values)
