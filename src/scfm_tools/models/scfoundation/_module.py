"""scFoundation (xTrimoGene, ``MaeAutobin``) as a pure-torch scvi-tools module (no AnnData here).

Weight-compatible with the official ``MaeAutobin`` of biomap-research/scFoundation: attribute
names are the official ones (``token_emb.{mlp,mlp2,emb,emb_mask,emb_pad}``, ``pos_emb``,
``encoder.transformer_encoder.N.*``, ``encoder.norm``, ``decoder.performer.*``, ``decoder.norm``,
``decoder_embed``, ``norm``, ``to_final``), so the state dicts of ``models.ckpt`` load strictly
once their ``model.`` prefix is removed.

A cell is a sequence of ``n_genes + 2`` values: its (log-normalised) expression of the model's
genes in gene-list order, then the two total-count tokens, ``T`` (target depth, position
``n_genes``) and ``S`` (source depth, position ``n_genes + 1``). Every value is embedded by the
auto-discretisation embedding (a soft assignment to ``bin_num`` learned bins) plus the
embedding of its position. The transformer encoder sees only the positive, unmasked values (the
expressed genes and ``T``, ``S``), gathered in position order; several cells of different lengths
are padded and masked, so a cell's encodings do not depend on the other cells of the batch.
The Performer decoder then reads the whole sequence: the encoder's outputs at the gathered
positions, the embeddings of the other values (zeros, masked values) elsewhere, and the
regression head ``to_final`` predicts one expression value per position.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import Tensor, nn

from ...nn import Performer, TransformerEncoderLayer
from ._classifier import HEAD_HIDDEN, SCFoundationClassifierHead, max_over_genes

__all__ = [
    "AutoDiscretizationEmbedding",
    "SCFoundationDecoder",
    "SCFoundationEncoder",
    "SCFoundationModule",
    "gather_tokens",
    "pool_cells",
]

Pool = Literal["all", "max"]

# Keys of the minibatch dict this module reads.
VALUES = "values"
MASK = "mask"
TARGET = "target"
LABELS = "labels"
# Positions hidden from the encoder (mask embedding in the decoder); without it, ``MASK``.
HIDDEN = "hidden"


class AutoDiscretizationEmbedding(nn.Module):
    """Soft-binned embedding of scalar values (official ``AutoDiscretizationEmbedding2``).

    Each value ``v`` is mapped to bin weights ``w = softmax(alpha * h + mlp2(h))`` with
    ``h = LeakyReLU_0.1(mlp(v))``, and embedded as ``w @ emb.weight``. Values equal to
    ``mask_token_id`` or ``pad_token_id`` get the learned ``emb_mask`` / ``emb_pad`` vectors
    instead (the official code recognises them by value).

    Parameters
    ----------
    dim
        Embedding width.
    bin_num
        Number of learned bins.
    bin_alpha
        Weight of the direct path in the bin logits.
    mask_token_id
        Value that marks a masked position.
    pad_token_id
        Value that marks padding.
    """

    def __init__(
        self,
        dim: int,
        *,
        bin_num: int = 100,
        bin_alpha: float = 1.0,
        mask_token_id: float = 102,
        pad_token_id: float = 103,
    ) -> None:
        super().__init__()
        self.bin_num = bin_num
        self.bin_alpha = bin_alpha
        self.mask_token_id = mask_token_id
        self.pad_token_id = pad_token_id
        self.mlp = nn.Linear(1, bin_num)
        self.mlp2 = nn.Linear(bin_num, bin_num)
        self.emb = nn.Embedding(bin_num, dim)
        self.emb_mask = nn.Embedding(1, dim)
        self.emb_pad = nn.Embedding(1, dim)

    def forward(self, values: Tensor) -> Tensor:
        """Embed ``values`` ``(batch, n)`` into ``(batch, n, dim)``."""
        h = F.leaky_relu(self.mlp(values.unsqueeze(-1)), 0.1)
        weight = torch.softmax(self.bin_alpha * h + self.mlp2(h), dim=-1)
        x = weight @ self.emb.weight
        special = [(self.mask_token_id, self.emb_mask), (self.pad_token_id, self.emb_pad)]
        for token, table in special:
            hit = values.eq(token).unsqueeze(-1)
            x = torch.where(hit, table.weight[0].to(x.dtype), x)
        return x


class SCFoundationEncoder(nn.Module):
    """Post-norm transformer layers and a final LayerNorm (official ``pytorchTransformerModule``).

    Layers are the shared SDPA :class:`~scfm_tools.nn.TransformerEncoderLayer` (torch's key
    names) under ``transformer_encoder.N``; the final norm is ``norm``.

    Parameters
    ----------
    dim
        Model width.
    depth
        Number of layers.
    heads
        Attention heads (head dimension ``dim / heads``).
    ff_mult
        Feed-forward width as a multiple of ``dim``.
    dropout
        Dropout of the layers (torch's default 0.1, active in training only).
    norm_first
        Pre-norm layers (the published model: post-norm).
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        *,
        ff_mult: int = 4,
        dropout: float = 0.1,
        norm_first: bool = False,
    ) -> None:
        super().__init__()
        self.transformer_encoder = nn.ModuleList(
            TransformerEncoderLayer(
                dim, heads, dim * ff_mult, dropout, "relu", norm_first=norm_first
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Encode ``x`` ``(batch, n, dim)``; ``padding_mask`` is ``True`` at padded positions."""
        for layer in self.transformer_encoder:
            x, _ = layer(x, padding_mask)
        return self.norm(x)


class SCFoundationDecoder(nn.Module):
    """The shared FAVOR+ :class:`~scfm_tools.nn.Performer` and a final LayerNorm.

    Official ``PerformerModule`` (keys ``performer.*`` and ``norm.*``), with biases on the
    query/key/value projections. The official decoder is given a padding mask but never uses
    it; here the decoder always reads the whole, unpadded sequence.

    Parameters
    ----------
    dim
        Decoder width.
    depth
        Performer blocks.
    heads
        Attention heads.
    dim_head
        Head dimension.
    nb_features
        FAVOR+ random features per head (``None``: ``int(dim_head ln dim_head)``).
    ff_mult
        Feed-forward width multiple.
    ff_dropout, attn_dropout
        Dropout rates (0 in the published model).
    feature_redraw_interval
        Redraw the random features every this many training steps (``None``: never).
    key_max
        FAVOR+ key stabiliser extent (see :class:`~scfm_tools.nn.Performer`); ``"sample"``
        makes each cell's output independent of the batch.
    chunk_size
        Tokens per attention/feed-forward chunk (``None``: memory-bounded automatically).
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        dim_head: int,
        *,
        nb_features: int | None = None,
        ff_mult: int = 4,
        ff_dropout: float = 0.0,
        attn_dropout: float = 0.0,
        feature_redraw_interval: int | None = None,
        key_max: Literal["sample", "batch"] = "sample",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.performer = Performer(
            dim,
            depth,
            heads,
            dim_head,
            nb_features=nb_features,
            ff_mult=ff_mult,
            qkv_bias=True,
            ff_dropout=ff_dropout,
            attn_dropout=attn_dropout,
            feature_redraw_interval=feature_redraw_interval,
            key_max=key_max,
            chunk_size=chunk_size,
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        """Decode ``x`` ``(batch, seq_len, dim)``."""
        return self.norm(self.performer(x))


def gather_tokens(
    values: Tensor, keep: Tensor, *, pad_value: float, pad_position: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Gather the kept values of each row, in position order, right-padded to a common length.

    The batched form of the official ``gatherData``: row ``i`` becomes its kept values in
    increasing position, then ``pad_value`` up to the longest row.

    Parameters
    ----------
    values
        ``(batch, n)`` values.
    keep
        ``(batch, n)`` boolean, the positions to gather.
    pad_value
        Value at padded slots (the model's pad token id).
    pad_position
        Position id at padded slots (the model's spare position-embedding row).

    Returns
    -------
    ``(gathered, positions, padding)``, each ``(batch, longest)``: the gathered values, their
    positions (long) and ``True`` at padded slots.
    """
    counts = keep.sum(dim=1)
    longest = int(counts.max()) if counts.numel() else 0
    # A stable sort puts the kept positions first, in their original order.
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :longest]
    padding = torch.arange(longest, device=values.device).unsqueeze(0) >= counts.unsqueeze(1)
    gathered = values.gather(1, order).masked_fill(padding, pad_value)
    positions = order.masked_fill(padding, pad_position)
    return gathered, positions, padding


def pool_cells(hidden: Tensor, padding: Tensor, pool: Pool = "all") -> Tensor:
    """Cell embeddings from encoder outputs, as the official ``get_embedding.py``.

    The last two gathered tokens of a cell are its ``S`` and ``T`` tokens (its last and
    second-to-last positive values, as in the official one-cell-at-a-time code), the others its
    genes.

    Parameters
    ----------
    hidden
        ``(batch, n, dim)`` encoder outputs.
    padding
        ``(batch, n)``, ``True`` at padded slots.
    pool
        ``"all"``: ``[S, T, max over genes, mean over genes]`` (``4 * dim``); ``"max"``: the
        maximum over all tokens, ``T`` and ``S`` included (``dim``).

    Returns
    -------
    ``(batch, 4 * dim)`` or ``(batch, dim)``.
    """
    # float32 pooling: under bf16 autocast a gene count such as 15,000 is not exact.
    hidden = hidden.float()
    valid = ~padding
    if pool == "max":
        return hidden.masked_fill(~valid.unsqueeze(-1), float("-inf")).amax(dim=1)
    if pool != "all":
        raise ValueError(f"pool must be 'all' or 'max', got {pool!r}.")
    lengths = valid.sum(dim=1)
    if bool((lengths < 3).any()):
        raise ValueError(
            "a cell has no expressed gene among its encoder tokens (only its T and S tokens), "
            "so its genes cannot be pooled."
        )
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    s_token = hidden[rows, lengths - 1]
    t_token = hidden[rows, lengths - 2]
    genes = valid.clone()
    genes[rows, lengths - 1] = False
    genes[rows, lengths - 2] = False
    g = genes.unsqueeze(-1)
    gene_max = hidden.masked_fill(~g, float("-inf")).amax(dim=1)
    gene_mean = (hidden * g).sum(dim=1) / (lengths - 2).unsqueeze(-1).to(hidden.dtype)
    return torch.cat([s_token, t_token, gene_max, gene_mean], dim=1)


def _hidden(tensors: dict[str, Tensor]) -> Tensor | None:
    hidden = tensors.get(HIDDEN)
    return tensors.get(MASK) if hidden is None else hidden


class SCFoundationModule(BaseModuleClass):
    """The scFoundation model (official ``MaeAutobin``) as a scvi-tools module.

    A minibatch is a dict of tensors: ``values`` ``(batch, n_genes + 2)`` (log-normalised
    expression of the model's genes, then ``T`` and ``S``); for training also ``mask``
    (boolean ``(batch, n_genes + 2)``, the positions the loss scores), ``target``
    (``(batch, n_genes + 2)`` or ``(batch, n_genes)``, the values to predict there) and
    optionally ``hidden`` (boolean, the positions hidden from the encoder and given the mask
    embedding in the decoder; without it every scored position is hidden). The published
    pretraining hides only part of the scored positions (see
    :func:`~scfm_tools.models.scfoundation.corrupt_selected`).

    With ``n_classes`` the module also holds the cell-type head of the official fine-tuning
    example (:class:`~scfm_tools.models.scfoundation.SCFoundationClassifierHead` on the encoder
    outputs max-pooled over the genes); a minibatch with ``labels`` (class codes) is then
    scored by the cross-entropy of the head's logits, weighted by ``class_weights`` when set.
    The decoder stays, unused by the head, so a fine-tuned model still imputes.

    Parameters
    ----------
    n_genes
        Genes of the model (19,264 published); sequences have ``n_genes + 2`` values.
    enc_dim, enc_depth, enc_heads, enc_ff_mult
        Encoder width, layers, heads and feed-forward multiple (published 768, 12, 12, 4).
    dec_dim, dec_depth, dec_heads, dec_dim_head, dec_ff_mult
        Decoder width, blocks, heads, head dimension and feed-forward multiple (published
        512, 6, 8, 64, 4).
    dec_nb_features
        FAVOR+ random features per decoder head (``None``: ``int(dim_head ln dim_head)``).
    bin_num, bin_alpha
        Auto-discretisation bins and direct-path weight (published 100, 1.0).
    mask_token_id, pad_token_id
        Values that mark masked and padded positions (published 102, 103).
    dropout
        Encoder dropout (torch's default 0.1 in the published model; training only).
    dec_ff_dropout, dec_attn_dropout
        Decoder dropout rates (0 published).
    norm_first
        Pre-norm encoder layers (the published model: post-norm).
    feature_redraw_interval
        Redraw the decoder's random features every this many training steps (``None``: never;
        the official pretraining redrew every 1000).
    key_max
        FAVOR+ key stabiliser extent of the decoder: ``"sample"`` (each cell as if alone, as
        the official scripts run them) or ``"batch"``.
    chunk_size
        Tokens per decoder chunk (``None``: automatic, memory-bounded).
    n_classes
        Cell types of the classifier head; ``None``: no head.
    head_hidden
        Width of the head's hidden layer (official 256).
    classifier_max_genes
        The head reads at most this many genes of a cell, its most expressed (ties: the first
        in gene order); ``None``: every expressed gene, as the official example. Encoder
        attention grows with the square of a cell's expressed genes, so on deep cells
        (thousands of genes) this cap is what makes fine-tuning on a CPU feasible.
    classifier_genes
        The model genes (positions in its gene list) the head reads; the others are left out
        of a cell before it is normalised, as if the data lacked them (see
        :meth:`classifier_index`). ``None``: every gene, as the official example.
    """

    def __init__(
        self,
        n_genes: int = 19264,
        *,
        enc_dim: int = 768,
        enc_depth: int = 12,
        enc_heads: int = 12,
        enc_ff_mult: int = 4,
        dec_dim: int = 512,
        dec_depth: int = 6,
        dec_heads: int = 8,
        dec_dim_head: int = 64,
        dec_nb_features: int | None = None,
        dec_ff_mult: int = 4,
        bin_num: int = 100,
        bin_alpha: float = 1.0,
        mask_token_id: int = 102,
        pad_token_id: int = 103,
        dropout: float = 0.1,
        dec_ff_dropout: float = 0.0,
        dec_attn_dropout: float = 0.0,
        norm_first: bool = False,
        feature_redraw_interval: int | None = None,
        key_max: Literal["sample", "batch"] = "sample",
        chunk_size: int | None = None,
        n_classes: int | None = None,
        head_hidden: int = HEAD_HIDDEN,
        classifier_max_genes: int | None = None,
        classifier_genes: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if n_genes < 1:
            raise ValueError(f"n_genes must be positive, got {n_genes}.")
        if classifier_max_genes is not None and (
            isinstance(classifier_max_genes, bool)
            or not isinstance(classifier_max_genes, int)
            or classifier_max_genes < 1
        ):
            raise ValueError(
                f"classifier_max_genes must be a positive integer or None, got "
                f"{classifier_max_genes!r}."
            )
        if classifier_genes is not None:
            classifier_genes = sorted({int(g) for g in classifier_genes})
            if not classifier_genes or classifier_genes[0] < 0 or classifier_genes[-1] >= n_genes:
                raise ValueError(
                    f"classifier_genes must be a non-empty list of gene positions in [0, "
                    f"{n_genes}), or None."
                )
        if enc_dim % enc_heads:
            raise ValueError(f"enc_dim ({enc_dim}) must be divisible by enc_heads ({enc_heads}).")
        self.config: dict[str, Any] = {
            "n_genes": n_genes,
            "enc_dim": enc_dim,
            "enc_depth": enc_depth,
            "enc_heads": enc_heads,
            "enc_ff_mult": enc_ff_mult,
            "dec_dim": dec_dim,
            "dec_depth": dec_depth,
            "dec_heads": dec_heads,
            "dec_dim_head": dec_dim_head,
            "dec_nb_features": dec_nb_features,
            "dec_ff_mult": dec_ff_mult,
            "bin_num": bin_num,
            "bin_alpha": bin_alpha,
            "mask_token_id": mask_token_id,
            "pad_token_id": pad_token_id,
            "dropout": dropout,
            "dec_ff_dropout": dec_ff_dropout,
            "dec_attn_dropout": dec_attn_dropout,
            "norm_first": norm_first,
            "feature_redraw_interval": feature_redraw_interval,
            "n_classes": n_classes,
            "head_hidden": head_hidden,
            "classifier_max_genes": classifier_max_genes,
            "classifier_genes": classifier_genes,
        }
        self.n_genes = n_genes
        self.seq_len = n_genes + 2
        self.enc_dim = enc_dim
        self.dec_dim = dec_dim
        self.mask_token_id = mask_token_id
        self.pad_token_id = pad_token_id

        self.token_emb = AutoDiscretizationEmbedding(
            enc_dim,
            bin_num=bin_num,
            bin_alpha=bin_alpha,
            mask_token_id=mask_token_id,
            pad_token_id=pad_token_id,
        )
        # One spare row (index seq_len) for padded slots, as the official max_seq_len + 1.
        self.pos_emb = nn.Embedding(self.seq_len + 1, enc_dim)
        self.encoder = SCFoundationEncoder(
            enc_dim,
            enc_depth,
            enc_heads,
            ff_mult=enc_ff_mult,
            dropout=dropout,
            norm_first=norm_first,
        )
        self.decoder_embed = nn.Linear(enc_dim, dec_dim)
        self.decoder = SCFoundationDecoder(
            dec_dim,
            dec_depth,
            dec_heads,
            dec_dim_head,
            nb_features=dec_nb_features,
            ff_mult=dec_ff_mult,
            ff_dropout=dec_ff_dropout,
            attn_dropout=dec_attn_dropout,
            feature_redraw_interval=feature_redraw_interval,
            key_max=key_max,
            chunk_size=chunk_size,
        )
        self.norm = nn.LayerNorm(dec_dim)
        self.to_final = nn.Linear(dec_dim, 1)
        self.classifier = (
            None
            if n_classes is None
            else SCFoundationClassifierHead(enc_dim, n_classes, hidden=head_hidden)
        )
        #: Loss weight of each class (set by the model before training); ``None``: equal.
        self.class_weights: Tensor | None = None

    @property
    def is_classifier(self) -> bool:
        """Whether the module has a cell-type head."""
        return self.classifier is not None

    @property
    def n_classes(self) -> int | None:
        """Number of cell types of the head (``None`` without one)."""
        return None if self.classifier is None else self.classifier.n_classes

    # encoder -------------------------------------------------------------------------------------
    def _check_values(self, values: Tensor) -> None:
        if values.ndim != 2 or values.shape[1] != self.seq_len:
            raise ValueError(
                f"values must be (batch, {self.seq_len}): the model's {self.n_genes} genes then "
                f"the T and S tokens; got shape {tuple(values.shape)}."
            )

    def classifier_index(self, index: np.ndarray) -> np.ndarray:
        """``index`` (query gene -> model gene, ``-1``: unmatched) limited to the head's genes.

        Genes outside ``classifier_genes`` become unmatched, so a cell is read, normalised
        included, as if the data lacked them.
        """
        genes = self.config["classifier_genes"]
        index = np.asarray(index, dtype=np.int64)
        if genes is None:
            return index
        return np.where(np.isin(index, genes), index, -1)

    def _most_expressed(self, values: Tensor, keep: Tensor, k: int) -> Tensor:
        """``keep`` limited to each cell's ``k`` highest gene values (``T`` and ``S`` kept)."""
        genes = keep[:, : self.n_genes]
        if int(genes.sum(dim=1).max()) <= k:
            return keep
        ranked = values[:, : self.n_genes].float().masked_fill(~genes, float("-inf"))
        # A stable sort breaks ties by gene order, the same on every device.
        top = torch.sort(ranked, dim=1, descending=True, stable=True).indices[:, :k]
        capped = torch.zeros_like(genes).scatter_(1, top, True) & genes
        return torch.cat([capped, keep[:, self.n_genes :]], dim=1)

    def encode(
        self,
        values: Tensor,
        mask: Tensor | None = None,
        *,
        max_genes: int | None = None,
        genes_only: bool = False,
    ) -> dict[str, Tensor]:
        """Run the encoder on the positive, unmasked values of each cell.

        Parameters
        ----------
        values
            ``(batch, n_genes + 2)`` values.
        mask
            ``(batch, n_genes + 2)`` boolean, positions hidden from the encoder.
        max_genes
            Read at most this many genes of a cell, its most expressed (``None``: all).
        genes_only
            Leave the ``T`` and ``S`` tokens out: the encoder reads the cell's genes only.

        Returns
        -------
        Dict with ``hidden`` ``(batch, n, enc_dim)`` (encoder outputs of the gathered tokens),
        ``positions`` ``(batch, n)`` and ``padding`` ``(batch, n)``.
        """
        self._check_values(values)
        keep = values > 0
        if mask is not None:
            keep = keep & ~mask
        if genes_only:
            keep[:, self.n_genes :] = False
        if max_genes is not None:
            keep = self._most_expressed(values, keep, max_genes)
        gathered, positions, padding = gather_tokens(
            values, keep, pad_value=self.pad_token_id, pad_position=self.seq_len
        )
        x = self.token_emb(gathered) + self.pos_emb(positions)
        hidden = self.encoder(x, padding if bool(padding.any()) else None)
        return {"hidden": hidden, "positions": positions, "padding": padding}

    def class_logits(self, hidden: Tensor, positions: Tensor) -> Tensor:
        """Cell-type logits ``(batch, n_classes)`` of encoder outputs (see :meth:`encode`)."""
        if self.classifier is None:
            raise ValueError("this module has no classifier head (n_classes=None).")
        return self.classifier(max_over_genes(hidden, positions, self.n_genes))

    @torch.no_grad()
    def class_probabilities(self, values: Tensor) -> Tensor:
        """Cell-type probabilities ``(batch, n_classes)`` (float32) of ``values``."""
        enc = self._classifier_encode(values)
        return torch.softmax(self.class_logits(enc["hidden"], enc["positions"]), dim=-1)

    @torch.no_grad()
    def cell_embedding(self, values: Tensor, pool: Pool = "all") -> Tensor:
        """Cell embeddings ``(batch, 4 * enc_dim)`` (``pool="all"``) or ``(batch, enc_dim)``.

        See :func:`pool_cells`.
        """
        enc = self.encode(values)
        return pool_cells(enc["hidden"], enc["padding"], pool).float()

    # decoder -------------------------------------------------------------------------------------
    def decode(
        self,
        values: Tensor,
        hidden: Tensor,
        positions: Tensor,
        padding: Tensor,
        mask: Tensor | None = None,
    ) -> Tensor:
        """Run the decoder over the whole sequence; return its outputs after the final norms.

        Positions the encoder saw take its outputs; the others take the embedding of their
        value (``mask_token_id`` where ``mask`` is set). Position embeddings are added to all.

        Parameters
        ----------
        values
            ``(batch, n_genes + 2)`` values.
        hidden, positions, padding
            The output of :meth:`encode`.
        mask
            ``(batch, n_genes + 2)`` boolean, masked positions.

        Returns
        -------
        ``(batch, n_genes + 2, dec_dim)``.
        """
        self._check_values(values)
        if mask is not None:
            values = values.masked_fill(mask, self.mask_token_id)
        x = self.token_emb(values)
        valid = ~padding
        rows = torch.arange(values.shape[0], device=values.device).unsqueeze(1).expand_as(positions)
        x = x.index_put((rows[valid], positions[valid]), hidden[valid].to(x.dtype))
        x = x + self.pos_emb.weight[: self.seq_len]
        x = self.decoder(self.decoder_embed(x))
        return self.norm(x)

    # scvi-tools module interface -----------------------------------------------------------------
    def _get_inference_input(self, tensors: dict[str, Tensor], **kwargs) -> dict[str, Any]:
        return {"values": tensors[VALUES], "mask": _hidden(tensors)}

    @auto_move_data
    def inference(self, values: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
        """Encode a minibatch (see :meth:`encode`; a classifier reads its capped genes)."""
        if self.is_classifier:
            return self._classifier_encode(values, mask)
        return self.encode(values, mask)

    def _classifier_encode(self, values: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
        # As the official fine-tuning example (finetune_model.py): the encoder reads the cell's
        # expressed genes without the T and S depth tokens; here at most classifier_max_genes.
        return self.encode(
            values, mask, max_genes=self.config["classifier_max_genes"], genes_only=True
        )

    def _get_generative_input(
        self, tensors: dict[str, Tensor], inference_outputs: dict[str, Any], **kwargs
    ) -> dict[str, Any]:
        return {
            "values": tensors[VALUES],
            "hidden": inference_outputs["hidden"],
            "positions": inference_outputs["positions"],
            "padding": inference_outputs["padding"],
            "mask": _hidden(tensors),
        }

    @auto_move_data
    def generative(
        self,
        values: Tensor,
        hidden: Tensor,
        positions: Tensor,
        padding: Tensor,
        mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Decode a minibatch, or classify it (a module with a classifier head).

        Returns
        -------
        Dict with ``decoder_hidden`` ``(batch, n_genes + 2, dec_dim)`` (the official
        ``output_type="gene"`` embeddings, before ``to_final``) and ``expression``
        ``(batch, n_genes + 2)`` (the regression head's predictions); with a classifier head,
        ``logits`` ``(batch, n_classes)`` only (the decoder does not run).
        """
        if self.classifier is not None:
            return {"logits": self.class_logits(hidden, positions)}
        dec = self.decode(values, hidden, positions, padding, mask)
        return {"decoder_hidden": dec, "expression": self.to_final(dec).squeeze(-1)}

    def loss(
        self,
        tensors: dict[str, Tensor],
        inference_outputs: dict[str, Any],
        generative_outputs: dict[str, Tensor],
    ) -> LossOutput:
        """Mean squared error of the predictions at the scored (``mask``) positions.

        With a classifier head: the cross-entropy of the logits against ``labels`` (weighted
        by :attr:`class_weights`), per cell as ``reconstruction_loss``.

        The scored positions include those left visible or given a random value by
        :func:`~scfm_tools.models.scfoundation.corrupt_selected`, so the model also learns to
        predict at positions whose value it reads, as it does for every gene at inference.

        Parameters
        ----------
        tensors
            The minibatch, with ``mask`` and ``target``.
        inference_outputs
            Output of :meth:`inference`.
        generative_outputs
            Output of :meth:`generative`.

        Returns
        -------
        :class:`scvi.module.base.LossOutput` with the loss and the per-cell mean squared error
        as ``reconstruction_loss``.
        """
        if self.classifier is not None:
            return self._classification_loss(tensors, generative_outputs["logits"])
        for key in (MASK, TARGET):
            if tensors.get(key) is None:
                raise KeyError(
                    f"the minibatch has no {key!r}: the RDA loss compares predictions at masked "
                    "positions with the target values."
                )
        pred = generative_outputs["expression"]
        mask = tensors[MASK].to(pred.device)
        target = tensors[TARGET].to(pred.device, pred.dtype)
        if target.shape[1] == self.n_genes:
            target = F.pad(target, (0, 2))
            mask = mask.clone()
            mask[:, self.n_genes :] = False
        if not bool(mask.any()):
            raise ValueError("no position is masked in this minibatch: nothing to predict.")
        sq = (pred - target).square() * mask
        n = mask.sum(dim=1)
        loss = sq.sum() / n.sum()
        per_cell = sq.sum(dim=1) / n.clamp_min(1)
        return LossOutput(loss=loss, reconstruction_loss=per_cell, n_obs_minibatch=pred.shape[0])

    def _classification_loss(self, tensors: dict[str, Tensor], logits: Tensor) -> LossOutput:
        if tensors.get(LABELS) is None:
            raise KeyError(
                f"the minibatch has no {LABELS!r}: the classifier head is trained on cell-type "
                "codes."
            )
        labels = tensors[LABELS].to(logits.device).reshape(-1).long()
        weight = None if self.class_weights is None else self.class_weights.to(logits.device)
        per_cell = F.cross_entropy(logits.float(), labels, weight=weight, reduction="none")
        # As F.cross_entropy's mean: weighted cells count by their weight.
        norm = labels.numel() if weight is None else weight[labels].sum()
        return LossOutput(
            loss=per_cell.sum() / norm, reconstruction_loss=per_cell, n_obs_minibatch=labels.numel()
        )

    def sample(self, *args, **kwargs):
        """Not available: the regression head predicts values, it has no likelihood to sample."""
        raise NotImplementedError(
            "SCFoundationModule.sample is not available: scFoundation regresses expression "
            "values; it has no count likelihood to sample from. Use `generative`."
        )

    # helpers -------------------------------------------------------------------------------------
    @torch.no_grad()
    def gene_outputs(self, values: Tensor, *, head: bool) -> Tensor:
        """Return the decoder outputs of the model's genes (``T`` and ``S`` dropped).

        Parameters
        ----------
        values
            ``(batch, n_genes + 2)`` values.
        head
            Apply the regression head: predicted expression ``(batch, n_genes)`` (official
            ``output_type="gene_expression"``); else the decoder's gene embeddings
            ``(batch, n_genes, dec_dim)`` (``output_type="gene"``).
        """
        enc = self.encode(values)
        dec = self.decode(values, enc["hidden"], enc["positions"], enc["padding"])
        dec = dec[:, : self.n_genes]
        if head:
            return self.to_final(dec).squeeze(-1).float()
        return dec.float()
