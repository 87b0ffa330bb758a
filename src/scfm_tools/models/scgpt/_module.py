"""scGPT as a pure-torch scvi-tools module (no AnnData in this layer).

Weight-compatible with the official ``scgpt.model.TransformerModel`` (bowang-lab/scGPT v0.2.5):
every submodule carries the official attribute name, so an official state dict (after the
flash-attn ``Wqkv`` -> ``in_proj_`` renaming done by :func:`load_scgpt_checkpoint`) loads with
:meth:`~torch.nn.Module.load_state_dict`.

Supported: continuous value encoding (``input_emb_style="continuous"``), ``<cls>`` cell
embedding, post-norm or pre-norm layers, the expression decoder, the classifier head (trained
with the annotation tutorial's cross-entropy when it has two or more classes), the
"inner product" MVC decoder, ``explicit_zero_prob`` and batch-label tokens
(``use_batch_labels``). Left out, because no published checkpoint needs them: the "category"
and "scaling" value encoders, avg/weighted pooling of the cell embedding, domain-specific batch
norm (DSBN), the adversarial batch discriminator (DAB) and the CCE/ECS objectives of some
fine-tuning scripts. Checkpoints that carry weights for those show them as unexpected keys in
the load report.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import Tensor, nn

from ...nn import TransformerEncoder

__all__ = ["SCGPTModule", "mask_values"]

# Keys of the minibatch dict this module reads.
GENE_IDS = "gene_ids"
VALUES = "values"
PADDING_MASK = "padding_mask"
TARGET_VALUES = "target_values"
BATCH_LABELS = "batch_labels"
LABELS = "labels"


class GeneEncoder(nn.Module):
    """Gene-token embedding followed by a layer norm (official ``GeneEncoder``)."""

    def __init__(self, n_tokens: int, d_model: int, padding_idx: int | None) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_tokens, d_model, padding_idx=padding_idx)
        self.enc_norm = nn.LayerNorm(d_model)

    def forward(self, ids: Tensor) -> Tensor:
        return self.enc_norm(self.embedding(ids))


class ContinuousValueEncoder(nn.Module):
    """Scalar value -> vector: clamp, Linear(1, d), ReLU, Linear(d, d), LayerNorm, Dropout."""

    def __init__(self, d_model: int, dropout: float, max_value: float = 512) -> None:
        super().__init__()
        self.linear1 = nn.Linear(1, d_model)
        self.activation = nn.ReLU()
        self.linear2 = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.max_value = max_value

    def forward(self, values: Tensor) -> Tensor:
        x = torch.clamp(values.unsqueeze(-1), max=self.max_value)
        x = self.linear2(self.activation(self.linear1(x)))
        return self.dropout(self.norm(x))


class BatchLabelEncoder(nn.Module):
    """Batch-label embedding followed by a layer norm (official ``BatchLabelEncoder``)."""

    def __init__(self, n_labels: int, d_model: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_labels, d_model)
        self.enc_norm = nn.LayerNorm(d_model)

    def forward(self, labels: Tensor) -> Tensor:
        return self.enc_norm(self.embedding(labels))


def _mlp_head(d_in: int, d_model: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, d_model),
        nn.LeakyReLU(),
        nn.Linear(d_model, d_model),
        nn.LeakyReLU(),
        nn.Linear(d_model, 1),
    )


class ExprDecoder(nn.Module):
    """Per-token expression prediction (GEP): MLP d -> d -> d -> 1 with LeakyReLU."""

    def __init__(self, d_model: int, *, explicit_zero_prob: bool, use_batch_labels: bool) -> None:
        super().__init__()
        d_in = 2 * d_model if use_batch_labels else d_model
        self.fc = _mlp_head(d_in, d_model)
        self.zero_logit = _mlp_head(d_in, d_model) if explicit_zero_prob else None

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out = {"pred": self.fc(x).squeeze(-1)}
        if self.zero_logit is not None:
            out["zero_probs"] = torch.sigmoid(self.zero_logit(x).squeeze(-1))
        return out


class ClsDecoder(nn.Module):
    """Classifier on the cell embedding: ``n_layers - 1`` x [Linear, ReLU, LayerNorm] + Linear."""

    def __init__(self, d_model: int, n_cls: int, n_layers: int = 3) -> None:
        super().__init__()
        self._decoder = nn.ModuleList()
        for _ in range(n_layers - 1):
            self._decoder.extend([nn.Linear(d_model, d_model), nn.ReLU(), nn.LayerNorm(d_model)])
        self.out_layer = nn.Linear(d_model, n_cls)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self._decoder:
            x = layer(x)
        return self.out_layer(x)


class MVCDecoder(nn.Module):
    """Masked value prediction from the cell embedding ("inner product" style).

    ``pred[b, i] = W(sigmoid(gene2query(gene_emb[b, i]))) . cell_emb[b]``.
    """

    def __init__(self, d_model: int, *, explicit_zero_prob: bool, use_batch_labels: bool) -> None:
        super().__init__()
        d_in = 2 * d_model if use_batch_labels else d_model
        self.gene2query = nn.Linear(d_model, d_model)
        self.query_activation = nn.Sigmoid()
        self.W = nn.Linear(d_model, d_in, bias=False)
        self.W_zero_logit = nn.Linear(d_model, d_in) if explicit_zero_prob else None

    def forward(self, cell_emb: Tensor, gene_embs: Tensor) -> dict[str, Tensor]:
        query = self.query_activation(self.gene2query(gene_embs))  # (batch, seq_len, d)
        cell = cell_emb.unsqueeze(2)  # (batch, d_in, 1)
        out = {"pred": torch.bmm(self.W(query), cell).squeeze(2)}
        if self.W_zero_logit is not None:
            out["zero_probs"] = torch.sigmoid(torch.bmm(self.W_zero_logit(query), cell).squeeze(2))
        return out


def _masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Mean squared error over masked positions: (batch scalar, per-cell values)."""
    m = mask.to(pred.dtype)
    sq = (pred - target) ** 2 * m
    per_cell = sq.sum(1) / m.sum(1).clamp_min(1.0)
    # The official loss divides by the number of masked positions in the whole minibatch.
    return sq.sum() / m.sum().clamp_min(1.0), per_cell


def _masked_bernoulli_nll(probs: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(probs.dtype)
    log_p = torch.distributions.Bernoulli(probs=probs).log_prob((target > 0).to(probs.dtype))
    return -(log_p * m).sum() / m.sum().clamp_min(1.0)


def mask_values(
    values: Tensor,
    *,
    mask_ratio: float,
    mask_value: float,
    pad_value: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Mask a fraction of each cell's values for the GEP/MVC objective.

    As the official ``random_mask_value``: per cell, ``int(n * mask_ratio)`` of the ``n``
    positions whose value is not ``pad_value`` (so neither padding nor ``<cls>``) are set to
    ``mask_value``, chosen uniformly without replacement.

    Parameters
    ----------
    values
        Binned values ``(batch, seq_len)``.
    mask_ratio
        Fraction of positions to mask, in ``[0, 1)``.
    mask_value
        Value written at masked positions.
    pad_value
        Value marking padding and ``<cls>``.
    generator
        Random generator (CPU) for reproducible masks.

    Returns
    -------
    A masked copy of ``values``.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio!r}.")
    out = values.clone()
    for row in range(values.shape[0]):
        candidates = torch.nonzero(values[row] != pad_value).flatten()
        n_mask = int(len(candidates) * mask_ratio)
        if n_mask:
            pick = torch.randperm(len(candidates), generator=generator)[:n_mask]
            out[row, candidates[pick.to(candidates.device)]] = mask_value
    return out


class SCGPTModule(BaseModuleClass):
    """The scGPT transformer (official ``TransformerModel``) as a scvi-tools module.

    A minibatch is a dict of tensors: ``gene_ids`` (long, ``(batch, seq_len)``, ``<cls>`` first),
    ``values`` (float, binned values, ``pad_value`` at ``<cls>`` and padding, ``mask_value`` at
    masked positions), ``padding_mask`` (bool, ``True`` at padding), and optionally
    ``target_values`` (the unmasked values; needed by the pretraining loss), ``labels`` (long,
    ``(batch,)`` class codes; needed by the classifier's loss) and ``batch_labels`` (long,
    ``(batch,)``; needed when ``use_batch_labels``).

    With ``n_cls >= 2`` the module is a cell-type classifier (:attr:`is_classifier`), trained as
    the official annotation tutorial does (``CLS=True``, no masking, no GEP or MVC): the
    forward pass computes the last layer at ``<cls>`` only and the classifier head on it, and
    :meth:`loss` is the cross-entropy against ``labels``. With ``n_cls=1`` (the published
    pretrained models) it trains with the pretraining objective.

    Parameters
    ----------
    n_tokens
        Vocabulary size (genes plus special tokens).
    d_model
        Embedding width (official ``embsize``).
    n_heads
        Attention heads (``nheads``).
    d_hid
        Feed-forward width (``d_hid``).
    n_layers
        Transformer layers (``nlayers``).
    pad_token_id
        Id of ``<pad>``; its embedding row is the padding index.
    n_layers_cls
        Layers of the classifier head (``n_layers_cls``; official 3): ``n_layers_cls - 1``
        blocks of Linear, ReLU and LayerNorm, then the output layer.
    n_cls
        Classifier outputs; 2 or more makes a cell-type classifier.
    dropout
        Dropout rate everywhere.
    pad_value
        Value at ``<cls>`` and padded positions (``pad_value``, -2 in published models).
    mask_value
        Value marking masked positions (``mask_value``, -1).
    do_mvc
        Build the MVC decoder.
    explicit_zero_prob
        Also predict the probability that a value is zero (Bernoulli heads).
    use_batch_labels
        Concatenate a batch-label embedding to the decoder inputs.
    n_batch_labels
        Number of batch labels (required with ``use_batch_labels``).
    norm_first
        Pre-norm layers (official ``pre_norm``); published models are post-norm.
    max_value
        Input values are clamped to this maximum before the value encoder.
    class_weights
        Classifier only: loss weight of each class (``None``: all equal).
    """

    def __init__(
        self,
        n_tokens: int,
        d_model: int,
        n_heads: int,
        d_hid: int,
        n_layers: int,
        pad_token_id: int,
        *,
        n_layers_cls: int = 3,
        n_cls: int = 1,
        dropout: float = 0.2,
        pad_value: float = -2.0,
        mask_value: float = -1.0,
        do_mvc: bool = True,
        explicit_zero_prob: bool = False,
        use_batch_labels: bool = False,
        n_batch_labels: int | None = None,
        norm_first: bool = False,
        max_value: float = 512.0,
        class_weights: Tensor | None = None,
    ) -> None:
        super().__init__()
        if use_batch_labels and not n_batch_labels:
            raise ValueError("use_batch_labels=True needs n_batch_labels (a positive integer).")
        if not 0 <= pad_token_id < n_tokens:
            raise ValueError(
                f"pad_token_id {pad_token_id} is outside the vocabulary [0, {n_tokens})."
            )
        self.config: dict[str, Any] = {
            "n_tokens": n_tokens,
            "d_model": d_model,
            "n_heads": n_heads,
            "d_hid": d_hid,
            "n_layers": n_layers,
            "pad_token_id": pad_token_id,
            "n_layers_cls": n_layers_cls,
            "n_cls": n_cls,
            "dropout": dropout,
            "pad_value": pad_value,
            "mask_value": mask_value,
            "do_mvc": do_mvc,
            "explicit_zero_prob": explicit_zero_prob,
            "use_batch_labels": use_batch_labels,
            "n_batch_labels": n_batch_labels,
            "norm_first": norm_first,
            "max_value": max_value,
        }
        self.d_model = d_model
        self.pad_token_id = pad_token_id
        self.pad_value = pad_value
        self.mask_value = mask_value
        self.use_batch_labels = use_batch_labels
        self.explicit_zero_prob = explicit_zero_prob

        self.encoder = GeneEncoder(n_tokens, d_model, padding_idx=pad_token_id)
        self.value_encoder = ContinuousValueEncoder(d_model, dropout, max_value)
        if use_batch_labels:
            self.batch_encoder = BatchLabelEncoder(n_batch_labels, d_model)
        self.transformer_encoder = TransformerEncoder(
            n_layers, d_model, n_heads, d_hid, dropout, "relu", norm_first=norm_first
        )
        self.decoder = ExprDecoder(
            d_model, explicit_zero_prob=explicit_zero_prob, use_batch_labels=use_batch_labels
        )
        self.cls_decoder = ClsDecoder(d_model, n_cls, n_layers_cls)
        self.mvc_decoder = (
            MVCDecoder(
                d_model, explicit_zero_prob=explicit_zero_prob, use_batch_labels=use_batch_labels
            )
            if do_mvc
            else None
        )
        # The official init_weights re-initialises only the gene embedding.
        nn.init.uniform_(self.encoder.embedding.weight, -0.1, 0.1)
        # Set per training run from the registered labels: not part of the weights.
        self.register_buffer(
            "class_weights",
            None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32),
            persistent=False,
        )

    @property
    def is_classifier(self) -> bool:
        """Whether the module is a cell-type classifier (``n_cls >= 2``)."""
        return self.config["n_cls"] >= 2

    # encoder -----------------------------------------------------------------------------------
    def _check_batch_labels(self, batch_labels: Tensor | None) -> None:
        if self.use_batch_labels and batch_labels is None:
            raise ValueError("this model was built with use_batch_labels=True: pass batch_labels.")
        if not self.use_batch_labels and batch_labels is not None:
            raise ValueError(
                "batch_labels were given, but this model was built without batch labels "
                "(use_batch_labels=False)."
            )

    def encode(
        self,
        gene_ids: Tensor,
        values: Tensor,
        padding_mask: Tensor,
        *,
        batch_labels: Tensor | None = None,
        return_attention: bool | list[int] = False,
        cls_only: bool = False,
    ) -> dict[str, Any]:
        """Run the embeddings and the transformer (official ``_encode``).

        Parameters
        ----------
        gene_ids
            Token ids ``(batch, seq_len)``, ``<cls>`` first.
        values
            Input values ``(batch, seq_len)``.
        padding_mask
            Boolean ``(batch, seq_len)``, ``True`` at padding.
        batch_labels
            Batch codes ``(batch,)``, for a module that normalises the token embeddings per
            batch (:meth:`_per_batch`); this one reads them only in the decoders.
        return_attention
            Layers whose attention weights to return (see
            :meth:`scfm_tools.nn.TransformerEncoder.forward`).
        cls_only
            Compute the last layer for ``<cls>`` only (``transformer_output`` then has one
            position): the same cell embedding for less work.

        Returns
        -------
        Dict with ``transformer_output`` ``(batch, seq_len, d_model)``, ``gene_embs`` (the gene
        encoder output, used by the MVC decoder) and ``attention`` (layer -> weights).
        """
        gene_embs = self.encoder(gene_ids)
        total = self._per_batch(gene_embs + self.value_encoder(values), batch_labels)
        out, attention = self.transformer_encoder(
            total,
            padding_mask.bool(),
            return_attention=return_attention,
            last_queries=1 if cls_only else None,
        )
        return {"transformer_output": out, "gene_embs": gene_embs, "attention": attention}

    def _per_batch(self, tokens: Tensor, batch_labels: Tensor | None) -> Tensor:
        """Return the token embeddings as the transformer reads them (unchanged here)."""
        return tokens

    # scvi-tools module interface ---------------------------------------------------------------
    def _get_inference_input(self, tensors: dict[str, Tensor], **kwargs) -> dict[str, Any]:
        return {
            "gene_ids": tensors[GENE_IDS],
            "values": tensors[VALUES],
            "padding_mask": tensors[PADDING_MASK],
            "batch_labels": tensors.get(BATCH_LABELS),
        }

    @auto_move_data
    def inference(
        self,
        gene_ids: Tensor,
        values: Tensor,
        padding_mask: Tensor,
        batch_labels: Tensor | None = None,
        *,
        return_attention: bool | list[int] = False,
    ) -> dict[str, Any]:
        """Encode a minibatch; ``cell_emb`` is the (un-normalised) output at ``<cls>``.

        Parameters
        ----------
        gene_ids
            Token ids ``(batch, seq_len)``, ``<cls>`` first.
        values
            Input values ``(batch, seq_len)``.
        padding_mask
            Boolean ``(batch, seq_len)``, ``True`` at padding.
        batch_labels
            Batch labels ``(batch,)``, only with ``use_batch_labels``.
        return_attention
            Layers whose attention weights to return.

        Returns
        -------
        :meth:`encode`'s dict plus ``cell_emb`` ``(batch, d_model)`` and ``batch_labels``. A
        classifier computes the last layer at ``<cls>`` only (``transformer_output`` then has
        one position): the cross-entropy reads nothing else.
        """
        self._check_batch_labels(batch_labels)
        if batch_labels is not None:
            # the loader gives a (batch, 1) column; the embeddings and losses take codes
            batch_labels = batch_labels.reshape(-1).long()
        out = self.encode(
            gene_ids,
            values,
            padding_mask,
            batch_labels=batch_labels,
            return_attention=return_attention,
            cls_only=self.is_classifier,
        )
        out["cell_emb"] = out["transformer_output"][:, 0, :]
        out["batch_labels"] = batch_labels
        return out

    def _get_generative_input(
        self, tensors: dict[str, Tensor], inference_outputs: dict[str, Any], **kwargs
    ) -> dict[str, Any]:
        return {
            "transformer_output": inference_outputs["transformer_output"],
            "cell_emb": inference_outputs["cell_emb"],
            "gene_embs": inference_outputs["gene_embs"],
            "batch_labels": inference_outputs.get("batch_labels"),
        }

    @auto_move_data
    def generative(
        self,
        transformer_output: Tensor,
        cell_emb: Tensor,
        gene_embs: Tensor,
        batch_labels: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Decode: expression (``mlm_output``), MVC (``mvc_output``) and classifier outputs.

        Parameters
        ----------
        transformer_output
            Encoder output ``(batch, seq_len, d_model)``.
        cell_emb
            Cell embedding ``(batch, d_model)``.
        gene_embs
            Gene-encoder output ``(batch, seq_len, d_model)``.
        batch_labels
            Batch labels ``(batch,)``, only with ``use_batch_labels``.

        Returns
        -------
        Dict with ``mlm_output`` ``(batch, seq_len)``, ``cls_output`` ``(batch, n_cls)``,
        ``mvc_output`` ``(batch, seq_len)`` when the MVC decoder exists, and
        ``mlm_zero_probs`` / ``mvc_zero_probs`` with ``explicit_zero_prob``. A classifier
        returns ``cls_output`` alone.
        """
        if self.is_classifier:
            return {"cls_output": self.cls_decoder(cell_emb)}
        dec_in, mvc_cell = transformer_output, cell_emb
        if self.use_batch_labels:
            batch_emb = self.batch_encoder(batch_labels)
            dec_in = torch.cat(
                [transformer_output, batch_emb.unsqueeze(1).expand(-1, dec_in.shape[1], -1)], 2
            )
            mvc_cell = torch.cat([cell_emb, batch_emb], 1)
        mlm = self.decoder(dec_in)
        out = {"mlm_output": mlm["pred"], "cls_output": self.cls_decoder(cell_emb)}
        if "zero_probs" in mlm:
            out["mlm_zero_probs"] = mlm["zero_probs"]
        if self.mvc_decoder is not None:
            mvc = self.mvc_decoder(mvc_cell, gene_embs)
            out["mvc_output"] = mvc["pred"]
            if "zero_probs" in mvc:
                out["mvc_zero_probs"] = mvc["zero_probs"]
        return out

    def loss(
        self,
        tensors: dict[str, Tensor],
        inference_outputs: dict[str, Any],
        generative_outputs: dict[str, Tensor],
    ) -> LossOutput:
        """Compute the training objective: GEP + MVC, or the classifier's cross-entropy.

        A classifier (:attr:`is_classifier`) is scored by the cross-entropy of ``cls_output``
        against ``labels``, weighted by ``class_weights`` when set (as
        :func:`torch.nn.functional.cross_entropy`: the weighted mean over the cells).
        Otherwise, the published pretraining objective: masked GEP MSE + masked MVC MSE.

        Masked positions are those whose input value equals ``mask_value``; both terms are mean
        squared errors against ``target_values`` over those positions (official
        ``masked_mse_loss``). With ``explicit_zero_prob`` the Bernoulli negative log-likelihood
        of "value > 0" on the same positions is added for each decoder.

        Parameters
        ----------
        tensors
            The minibatch (must hold ``target_values``).
        inference_outputs
            Output of :meth:`inference`.
        generative_outputs
            Output of :meth:`generative`.

        Returns
        -------
        :class:`scvi.module.base.LossOutput` with the total loss, per-cell masked MSEs as
        ``reconstruction_loss`` (``gep``, ``mvc``; the classifier: ``cls``, per-cell
        cross-entropies) and the batch-level terms in ``extra_metrics``.
        """
        if self.is_classifier:
            return self._classifier_loss(tensors, generative_outputs["cls_output"])
        if TARGET_VALUES not in tensors:
            raise KeyError(
                f"the minibatch has no {TARGET_VALUES!r}: the loss compares predictions at masked "
                "positions with the unmasked values; mask with `mask_values` and pass both."
            )
        target = tensors[TARGET_VALUES].to(generative_outputs["mlm_output"].dtype)
        masked = tensors[VALUES].eq(self.mask_value)
        if not masked.any():
            raise ValueError(
                f"no position of `values` equals mask_value={self.mask_value}: nothing to predict."
            )
        gep, gep_cell = _masked_mse(generative_outputs["mlm_output"], target, masked)
        terms = {"gep": gep}
        per_cell = {"gep": gep_cell}
        if "mvc_output" in generative_outputs:
            mvc, mvc_cell = _masked_mse(generative_outputs["mvc_output"], target, masked)
            terms["mvc"] = mvc
            per_cell["mvc"] = mvc_cell
        for key in ("mlm_zero_probs", "mvc_zero_probs"):
            if key in generative_outputs:
                terms[key.replace("_probs", "_nll")] = _masked_bernoulli_nll(
                    generative_outputs[key], target, masked
                )
        total = sum(terms.values())
        return LossOutput(
            loss=total,
            reconstruction_loss=per_cell,
            n_obs_minibatch=target.shape[0],
            extra_metrics={f"{k}_loss": v.detach() for k, v in terms.items()},
        )

    def _classifier_loss(self, tensors: dict[str, Tensor], logits: Tensor) -> LossOutput:
        if LABELS not in tensors:
            raise KeyError(
                f"the minibatch has no {LABELS!r}: the classifier's loss needs the cell types "
                "(register them with setup_anndata(labels_key=...))."
            )
        target = tensors[LABELS].reshape(-1).long().to(logits.device)
        logits = logits.float()
        weight = None if self.class_weights is None else self.class_weights.to(logits)
        per_cell = F.cross_entropy(logits, target, weight=weight, reduction="none")
        cell_weight = self.loss_weights(tensors).to(logits)
        loss = per_cell.sum() / cell_weight.sum().clamp_min(1e-12)
        return LossOutput(
            loss=loss,
            reconstruction_loss={"cls": per_cell},
            n_obs_minibatch=logits.shape[0],
            extra_metrics={"cls_loss": loss.detach()},
        )

    def loss_weights(self, tensors: dict[str, Tensor]) -> Tensor:
        """Each cell's share of the denominator of :meth:`loss`.

        A minibatch's loss is a sum over its cells divided by the sum of these, so a
        minibatch run in parts (length buckets) weighs each part's loss by its share.

        Parameters
        ----------
        tensors
            The minibatch.

        Returns
        -------
        ``(batch,)`` float: the classifier's class weight of the cell's label (1 without
        ``class_weights``), or the number of the cell's masked positions (pretraining).
        """
        if not self.is_classifier:
            return tensors[VALUES].eq(self.mask_value).sum(1).float()
        target = tensors[LABELS].reshape(-1).long()
        if self.class_weights is None:
            return torch.ones(target.shape, dtype=torch.float32, device=target.device)
        return self.class_weights.to(target.device)[target]

    def sample(self, *args, **kwargs):
        """Not available: scGPT has no generative likelihood to sample from.

        Its decoders predict binned expression values by regression (MSE), not the parameters
        of a count distribution, so there is nothing principled to draw samples from.
        """
        raise NotImplementedError(
            "SCGPTModule.sample is not available: scGPT predicts binned values by regression "
            "(no count likelihood to sample from); use `generative` for point predictions."
        )

    # helpers -----------------------------------------------------------------------------------
    @torch.no_grad()
    def class_logits(self, gene_ids: Tensor, values: Tensor, padding_mask: Tensor) -> Tensor:
        """Classifier outputs (logits) on the ``<cls>`` output, ``(batch, n_cls)``.

        Parameters
        ----------
        gene_ids
            Token ids ``(batch, seq_len)``, ``<cls>`` first.
        values
            Input values ``(batch, seq_len)``.
        padding_mask
            Boolean ``(batch, seq_len)``, ``True`` at padding.

        Returns
        -------
        ``(batch, n_cls)`` float tensor.
        """
        out = self.encode(gene_ids, values, padding_mask, cls_only=True)
        return self.cls_decoder(out["transformer_output"][:, 0, :]).float()

    @torch.no_grad()
    def cell_embedding(
        self,
        gene_ids: Tensor,
        values: Tensor,
        padding_mask: Tensor,
        *,
        normalize: bool = True,
    ) -> Tensor:
        """``<cls>`` output, L2-normalised per cell by default (the zero-shot embedding).

        Parameters
        ----------
        gene_ids
            Token ids ``(batch, seq_len)``, ``<cls>`` first.
        values
            Input values ``(batch, seq_len)``.
        padding_mask
            Boolean ``(batch, seq_len)``, ``True`` at padding.
        normalize
            L2-normalise each embedding.

        Returns
        -------
        ``(batch, d_model)`` float tensor.
        """
        out = self.encode(gene_ids, values, padding_mask, cls_only=True)
        emb = out["transformer_output"][:, 0, :]
        return F.normalize(emb.float(), dim=1) if normalize else emb
