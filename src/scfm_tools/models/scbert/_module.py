"""scBERT as a pure-torch scvi-tools module (no AnnData in this layer).

Weight-compatible with the official ``PerformerLM`` of TencentAILabHealthcare/scBERT: the
attribute names are the official ones (``token_emb``, ``pos_emb.emb``, ``performer``, ``norm``,
``to_out``), so ``panglao_pretrain.pth`` and the fine-tuned checkpoints load with
:meth:`~torch.nn.Module.load_state_dict`, strictly.

A cell is a sequence of ``n_genes + 1`` expression tokens (bins ``0..bin_num``, the model's
genes in checkpoint order, then one ``0`` at the gene2vec padding position). Each token's
embedding is added to its gene's frozen gene2vec vector, which the official model keeps in
float64: the sum is taken in float64 and stored in the float32 activations, as the official
in-place add does. Pre-LayerNorm Performer blocks (:class:`scfm_tools.nn.Performer`) and a
final LayerNorm give the per-gene encodings; ``to_out`` is either the pretraining head (logits
over the ``num_tokens`` token classes per gene) or the official fine-tuning classifier
(:class:`SCBERTClassifierHead`).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import Tensor, nn

from ...nn import Performer
from ._shared_block import SharedFirstBlock, shared_first_block

__all__ = ["Gene2VecEmbedding", "SCBERTClassifierHead", "SCBERTModule", "mask_tokens"]

# Keys of the minibatch dict this module reads.
TOKENS = "tokens"
MLM_LABELS = "mlm_labels"
LABELS = "labels"

# Official pretraining (pretrain.py): 15% of the non-zero bins are picked, 90% of those are
# replaced by [MASK]; bin 0 is never picked.
MASK_PROB = 0.15
REPLACE_PROB = 0.9


class Gene2VecEmbedding(nn.Module):
    """Frozen per-position gene vectors: gene2vec rows for the genes, a zero row for padding.

    Kept in float64 under ``emb.weight`` (the official key and dtype). Never trained.

    Parameters
    ----------
    n_positions
        Rows of the table (genes + 1).
    dim
        Embedding width.
    weight
        The ``(n_positions, dim)`` table; ``None`` starts from zeros (to be loaded).
    """

    def __init__(self, n_positions: int, dim: int, weight: Tensor | None = None) -> None:
        super().__init__()
        if weight is None:
            weight = torch.zeros(n_positions, dim, dtype=torch.float64)
        if tuple(weight.shape) != (n_positions, dim):
            raise ValueError(
                f"gene2vec table has shape {tuple(weight.shape)}, expected ({n_positions}, {dim})."
            )
        self.emb = nn.Embedding(n_positions, dim, _weight=weight.to(torch.float64).clone())
        self.emb.weight.requires_grad_(False)

    def forward(self, n: int) -> Tensor:
        """Return the first ``n`` rows ``(n, dim)``, float64."""
        return self.emb.weight[:n]


class SCBERTClassifierHead(nn.Module):
    """The official fine-tuning head (``Identity`` in finetune.py / predict.py).

    ``Conv2d(1, 1, (1, dim))`` collapses each gene's encoding to one number, then ReLU, and an
    MLP over the gene axis: ``Linear(seq_len, 512)``, ReLU, Dropout, ``Linear(512, hidden)``,
    ReLU, Dropout, ``Linear(hidden, n_classes)``.

    Parameters
    ----------
    seq_len
        Sequence length (genes + 1).
    dim
        Encoding width.
    n_classes
        Number of cell types.
    hidden
        Width of the second hidden layer (128 in the official scripts).
    dropout
        Dropout rate (0 in the official scripts).
    """

    def __init__(
        self, seq_len: int, dim: int, n_classes: int, *, hidden: int = 128, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 1, (1, dim))
        self.act = nn.ReLU()
        self.fc1 = nn.Linear(seq_len, 512)
        self.act1 = nn.ReLU()
        self.dropout1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(512, hidden)
        self.act2 = nn.ReLU()
        self.dropout2 = nn.Dropout(dropout)
        self.fc3 = nn.Linear(hidden, n_classes)

    def forward(self, encodings: Tensor) -> Tensor:
        """Class logits ``(batch, n_classes)`` from encodings ``(batch, seq_len, dim)``."""
        x = self.act(self.conv1(encodings.unsqueeze(1))).flatten(1)
        x = self.dropout1(self.act1(self.fc1(x)))
        x = self.dropout2(self.act2(self.fc2(x)))
        return self.fc3(x)


def mask_tokens(
    tokens: Tensor,
    *,
    mask_token_id: int,
    mask_prob: float = MASK_PROB,
    replace_prob: float = REPLACE_PROB,
    ignore_token_ids: tuple[int, ...] = (0,),
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Mask tokens for masked-bin pretraining, as the official ``data_mask``.

    Per cell, ``ceil(mask_prob * n)`` of its ``n`` maskable tokens (neither in
    ``ignore_token_ids`` nor equal to ``mask_token_id``, so never a zero bin) are picked
    uniformly (at most ``ceil(mask_prob * seq_len)``); each picked token becomes
    ``mask_token_id`` with probability ``replace_prob`` and is left as it is otherwise. The
    labels hold the original token at picked positions and ``mask_token_id`` (the ignore
    index of the loss) elsewhere.

    Parameters
    ----------
    tokens
        ``(batch, seq_len)`` long tokens.
    mask_token_id
        The ``[MASK]`` (and padding) id, ``num_tokens - 1``.
    mask_prob
        Fraction of maskable tokens picked.
    replace_prob
        Probability that a picked token is replaced by ``[MASK]``.
    ignore_token_ids
        Tokens never picked (the official code: bin 0).
    generator
        Random generator on the device of ``tokens``, for reproducible masks.

    Returns
    -------
    ``(masked_tokens, labels)``, both ``(batch, seq_len)`` long.
    """
    if not 0.0 <= mask_prob < 1.0:
        raise ValueError(f"mask_prob must be in [0, 1), got {mask_prob!r}.")
    if not 0.0 <= replace_prob <= 1.0:
        raise ValueError(f"replace_prob must be in [0, 1], got {replace_prob!r}.")
    maskable = tokens.ne(mask_token_id)
    for tid in ignore_token_ids:
        maskable &= tokens.ne(tid)
    seq_len = tokens.shape[1]
    n_pick = torch.ceil(maskable.sum(1, keepdim=True) * mask_prob).long()
    n_pick = n_pick.clamp(max=math.ceil(mask_prob * seq_len))
    rand = torch.rand(tokens.shape, generator=generator, device=tokens.device)
    rand = rand.masked_fill(~maskable, -1.0)
    # Rank of each position by its random draw, highest first; the n_pick best are picked.
    order = rand.argsort(dim=1, descending=True)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(seq_len, device=tokens.device).expand_as(order)
    )
    picked = (rank < n_pick) & maskable
    replace = torch.rand(tokens.shape, generator=generator, device=tokens.device) < replace_prob
    masked = tokens.masked_fill(picked & replace, mask_token_id)
    labels = tokens.masked_fill(~picked, mask_token_id)
    return masked, labels


class SCBERTModule(BaseModuleClass):
    """The scBERT model (official ``PerformerLM`` + heads) as a scvi-tools module.

    A minibatch is a dict of tensors: ``tokens`` (long, ``(batch, n_genes + 1)``), and for
    :meth:`loss` either ``mlm_labels`` (pretraining head: original tokens at masked positions,
    ``mask_token_id`` elsewhere; see :func:`mask_tokens`) or ``labels`` (classifier head: class
    indices ``(batch,)`` or ``(batch, 1)``).

    In CPU inference the first Performer block of the zero-expression genes (bin 0 plus
    gene2vec, the same in every cell) is computed once and cached with the module, about 145 MB
    at the published size (see :meth:`scfm_tools.nn.Performer.forward`); it is rebuilt whenever
    the weights change.

    Parameters
    ----------
    n_genes
        Genes of the model (16,906 for the published one); sequences have ``n_genes + 1``
        tokens.
    num_tokens
        Token classes: ``bin_num + 2`` (bins ``0..bin_num`` and ``[MASK]``); 7 when published.
    dim
        Embedding width.
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
    qkv_bias
        Biases on the query/key/value projections (``False`` in scBERT).
    gene2vec
        Add the frozen gene2vec table (official ``g2v_position_emb=True``).
    gene2vec_weight
        The ``(n_genes, dim)`` or ``(n_genes + 1, dim)`` gene2vec table (a zero padding row is
        appended to the first form); ``None`` leaves zeros, to be filled by a checkpoint.
    emb_dropout, ff_dropout, attn_dropout
        Dropout rates (all 0 in the published model).
    n_classes
        Build the fine-tuning classifier head with this many classes instead of the
        pretraining head.
    head_hidden
        Second hidden width of the classifier head.
    head_dropout
        Dropout of the classifier head.
    class_weights
        Per-class weights of the classification loss (imbalanced labels); not saved in the
        state dict.
    feature_redraw_interval
        Redraw the random features every this many training steps (``None``: never).
    key_max
        FAVOR+ key stabiliser extent (see :class:`scfm_tools.nn.Performer`): ``"sample"`` makes
        each cell's output independent of its batch (official one-cell-at-a-time prediction);
        ``"batch"`` is the official ``forward`` on a batch.
    chunk_size
        Tokens per attention/feed-forward chunk (``None``: automatic, memory-bounded).
    """

    def __init__(
        self,
        n_genes: int,
        *,
        num_tokens: int = 7,
        dim: int = 200,
        depth: int = 6,
        heads: int = 10,
        dim_head: int = 64,
        nb_features: int | None = None,
        ff_mult: int = 4,
        qkv_bias: bool = False,
        gene2vec: bool = True,
        gene2vec_weight: Tensor | None = None,
        emb_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        attn_dropout: float = 0.0,
        n_classes: int | None = None,
        head_hidden: int = 128,
        head_dropout: float = 0.0,
        class_weights: Tensor | None = None,
        feature_redraw_interval: int | None = None,
        key_max: Literal["sample", "batch"] = "sample",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if n_genes < 1:
            raise ValueError(f"n_genes must be positive, got {n_genes}.")
        if num_tokens < 3:
            raise ValueError(
                f"num_tokens must be at least 3 (two bins and [MASK]), got {num_tokens}."
            )
        if n_classes is not None and n_classes < 2:
            raise ValueError(f"n_classes must be at least 2, got {n_classes}.")
        self.config: dict[str, Any] = {
            "n_genes": n_genes,
            "num_tokens": num_tokens,
            "dim": dim,
            "depth": depth,
            "heads": heads,
            "dim_head": dim_head,
            "nb_features": nb_features,
            "ff_mult": ff_mult,
            "qkv_bias": qkv_bias,
            "gene2vec": gene2vec,
            "emb_dropout": emb_dropout,
            "ff_dropout": ff_dropout,
            "attn_dropout": attn_dropout,
            "n_classes": n_classes,
            "head_hidden": head_hidden,
            "head_dropout": head_dropout,
            "feature_redraw_interval": feature_redraw_interval,
        }
        self.n_genes = n_genes
        self.seq_len = n_genes + 1
        self.num_tokens = num_tokens
        self.mask_token_id = num_tokens - 1
        self.dim = dim
        self.n_classes = n_classes

        self.token_emb = nn.Embedding(num_tokens, dim)
        if gene2vec:
            weight = gene2vec_weight
            if weight is not None and weight.shape[0] == n_genes:
                weight = torch.cat([weight.to(torch.float64), weight.new_zeros(1, dim).double()])
            self.pos_emb = Gene2VecEmbedding(self.seq_len, dim, weight)
        else:
            self.pos_emb = None
        self.dropout = nn.Dropout(emb_dropout)
        self.performer = Performer(
            dim,
            depth,
            heads,
            dim_head,
            nb_features=nb_features,
            ff_mult=ff_mult,
            qkv_bias=qkv_bias,
            ff_dropout=ff_dropout,
            attn_dropout=attn_dropout,
            feature_redraw_interval=feature_redraw_interval,
            key_max=key_max,
            chunk_size=chunk_size,
        )
        self.norm = nn.LayerNorm(dim)
        # First-block cache of the zero-expression genes (see encode); not part of the state.
        self._shared_block: SharedFirstBlock | None = None
        if n_classes is None:
            self.to_out: nn.Module = nn.Linear(dim, num_tokens)
        else:
            self.to_out = SCBERTClassifierHead(
                self.seq_len, dim, n_classes, hidden=head_hidden, dropout=head_dropout
            )
        self.register_buffer(
            "class_weights",
            None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32),
            persistent=False,
        )

    # properties ----------------------------------------------------------------------------------
    @property
    def is_classifier(self) -> bool:
        """Whether ``to_out`` is the fine-tuning classifier head."""
        return self.n_classes is not None

    @property
    def gene2vec(self) -> Tensor | None:
        """The ``(n_genes, dim)`` float64 gene2vec table (without the padding row)."""
        return None if self.pos_emb is None else self.pos_emb.emb.weight[:-1].detach()

    # encoder -------------------------------------------------------------------------------------
    def embed(self, tokens: Tensor) -> Tensor:
        """Token embedding plus gene2vec: the Performer's input ``(batch, seq_len, dim)``."""
        if tokens.shape[1] > self.seq_len:
            raise ValueError(
                f"sequences have {tokens.shape[1]} tokens, but this model reads at most "
                f"{self.seq_len} (its {self.n_genes} genes + 1)."
            )
        return self.dropout(self._add_gene2vec(self.token_emb(tokens)))

    def _add_gene2vec(self, x: Tensor) -> Tensor:
        if self.pos_emb is not None:
            # In place on purpose: the official float32 += float64 rounds the float64 sum once.
            x += self.pos_emb(x.shape[-2])
        return x

    def encode(self, tokens: Tensor) -> Tensor:
        """Per-gene encodings after the final LayerNorm ``(batch, seq_len, dim)``."""
        x = self.embed(tokens)
        if not self.performer.uses_first_block(x):
            return self.norm(self.performer(x))
        # A zero-expression gene's input (bin 0 plus its gene2vec row) is the same in every
        # cell, so the Performer can reuse its first-block projections across cells.
        bin0 = self._add_gene2vec(self.token_emb.weight[0].expand(tokens.shape[1], -1).clone())
        self._shared_block = shared_first_block(self._shared_block, self.performer, bin0)
        first = [self._shared_block.sample(row == 0) for row in tokens]
        return self.norm(self.performer(x, first_block=first))

    # scvi-tools module interface -----------------------------------------------------------------
    def _get_inference_input(self, tensors: dict[str, Tensor], **kwargs) -> dict[str, Any]:
        return {"tokens": tensors[TOKENS]}

    @auto_move_data
    def inference(self, tokens: Tensor) -> dict[str, Tensor]:
        """Encode a minibatch.

        Parameters
        ----------
        tokens
            ``(batch, seq_len)`` long tokens.

        Returns
        -------
        Dict with ``encodings`` ``(batch, seq_len, dim)`` and ``cell_emb`` ``(batch, dim)``,
        the mean of the encodings over the genes (the padding position excluded).
        """
        encodings = self.encode(tokens)
        return {"encodings": encodings, "cell_emb": encodings[:, :-1].mean(dim=1)}

    def _get_generative_input(
        self, tensors: dict[str, Tensor], inference_outputs: dict[str, Any], **kwargs
    ) -> dict[str, Any]:
        return {"encodings": inference_outputs["encodings"]}

    @auto_move_data
    def generative(self, encodings: Tensor) -> dict[str, Tensor]:
        """Apply the head.

        Parameters
        ----------
        encodings
            ``(batch, seq_len, dim)`` encodings.

        Returns
        -------
        ``{"logits": (batch, seq_len, num_tokens)}`` with the pretraining head, or
        ``{"class_logits": (batch, n_classes)}`` with the classifier head.
        """
        if self.is_classifier:
            return {"class_logits": self.to_out(encodings)}
        return {"logits": self.to_out(encodings)}

    def loss(
        self,
        tensors: dict[str, Tensor],
        inference_outputs: dict[str, Any],
        generative_outputs: dict[str, Tensor],
    ) -> LossOutput:
        """Cross-entropy of the head: masked bins (pretraining) or cell types (classifier).

        Pretraining: mean cross-entropy over the masked positions, those where ``mlm_labels``
        is not ``mask_token_id`` (official ``CrossEntropyLoss(ignore_index=PAD_TOKEN_ID)``).
        Classifier: cross-entropy against ``labels``, weighted by ``class_weights`` when set.

        Parameters
        ----------
        tensors
            The minibatch (``mlm_labels`` or ``labels``).
        inference_outputs
            Output of :meth:`inference`.
        generative_outputs
            Output of :meth:`generative`.

        Returns
        -------
        :class:`scvi.module.base.LossOutput` with the loss, per-cell losses as
        ``reconstruction_loss`` and the accuracy in ``extra_metrics``.
        """
        if self.is_classifier:
            if LABELS not in tensors:
                raise KeyError(f"the minibatch has no {LABELS!r}: the classifier loss needs them.")
            logits = generative_outputs["class_logits"]
            target = tensors[LABELS].reshape(-1).long().to(logits.device)
            weight = None if self.class_weights is None else self.class_weights.to(logits)
            per_cell = F.cross_entropy(logits, target, weight=weight, reduction="none")
            if weight is None:
                loss = per_cell.mean()
            else:
                loss = per_cell.sum() / weight[target].sum()
            accuracy = (logits.argmax(-1) == target).float().mean()
        else:
            if MLM_LABELS not in tensors:
                raise KeyError(
                    f"the minibatch has no {MLM_LABELS!r}: the pretraining loss compares the "
                    "predictions at masked positions with the original tokens; make both with "
                    "`mask_tokens`."
                )
            logits = generative_outputs["logits"]
            target = tensors[MLM_LABELS].long().to(logits.device)
            picked = target.ne(self.mask_token_id)
            if not picked.any():
                raise ValueError("no position is masked in this minibatch: nothing to predict.")
            ce = F.cross_entropy(
                logits.transpose(1, 2), target, ignore_index=self.mask_token_id, reduction="none"
            )
            loss = ce.sum() / picked.sum()
            per_cell = ce.sum(1) / picked.sum(1).clamp_min(1)
            accuracy = ((logits.argmax(-1) == target) & picked).sum() / picked.sum()
        return LossOutput(
            loss=loss,
            reconstruction_loss=per_cell,
            n_obs_minibatch=logits.shape[0],
            extra_metrics={"accuracy": accuracy.detach()},
        )

    def sample(self, *args, **kwargs):
        """Not available: scBERT has no generative likelihood of counts to sample from."""
        raise NotImplementedError(
            "SCBERTModule.sample is not available: scBERT classifies expression bins; it has "
            "no count likelihood to sample from. Use `generative` for the logits."
        )

    # helpers -------------------------------------------------------------------------------------
    @torch.no_grad()
    def cell_embedding(self, tokens: Tensor) -> Tensor:
        """Mean of the encodings over the genes, ``(batch, dim)`` float32."""
        return self.encode(tokens)[:, :-1].mean(dim=1).float()

    @torch.no_grad()
    def predict_proba(self, tokens: Tensor) -> Tensor:
        """Class probabilities ``(batch, n_classes)`` (classifier head only)."""
        if not self.is_classifier:
            raise ValueError(
                "this scBERT model has the pretraining head; fine-tune it for annotation first "
                "(or load a fine-tuned checkpoint)."
            )
        return self.to_out(self.encode(tokens)).float().softmax(dim=-1)
