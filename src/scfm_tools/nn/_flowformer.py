"""Flow attention (Flowformer, Wu et al. 2022) and pre-norm encoder layers built on it.

Flow attention is linear in the sequence length: queries and keys go through a sigmoid kernel,
and the attention is normalised by "conservation of flow" (each sink receives, each source
emits, a unit of flow) instead of a softmax over all pairs, so a sequence of tens of thousands
of tokens (cells, when cells are the tokens) costs ``O(n d^2)``, not ``O(n^2 d)``.

Parameter names are those of the published single-cell ``FlowformerLayer``
(``self_attn.{query,key,value,out}_projection``, ``_ff_block.{0,3}``, ``norm1``, ``norm2``;
``layers.N.`` in the stack), so its official state dict loads unchanged.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["FlowAttention", "FlowformerEncoder", "FlowformerLayer", "make_norm"]

NormName = Literal["layernorm", "groupnorm", "batchnorm", "none"]


def make_norm(name: NormName, dim: int, *, groups: int = 4) -> nn.Module:
    """Build the normalisation layer named ``name`` over ``dim`` features.

    ``"groupnorm"`` uses ``groups`` groups (4, as the official ``create_norm``).

    Parameters
    ----------
    name
        ``"layernorm"``, ``"groupnorm"``, ``"batchnorm"`` or ``"none"`` (identity).
    dim
        Number of features.
    groups
        Groups of the group norm.

    Returns
    -------
    The layer, applied to inputs of shape ``(..., dim)`` (``(n, dim)`` for group and batch norm).
    """
    if name == "layernorm":
        return nn.LayerNorm(dim)
    if name == "groupnorm":
        return nn.GroupNorm(groups, dim)
    if name == "batchnorm":
        return nn.BatchNorm1d(dim)
    if name == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'layernorm', 'groupnorm', 'batchnorm' or 'none', got {name!r}.")


class FlowAttention(nn.Module):
    """Multi-head flow attention (non-causal), batch first.

    For each head, with ``phi = sigmoid`` applied to the projected queries ``Q`` (``L`` rows) and
    keys ``K`` (``S`` rows):

    - incoming flow of each sink ``I_i = 1 / (phi(q_i) + eps) . (sum_j phi(k_j) + eps)``, outgoing
      flow of each source ``O_j = 1 / (phi(k_j) + eps) . (sum_i phi(q_i) + eps)``;
    - conserved flows ``I'_i = (phi(q_i) + eps) . (sum_j O_j phi(k_j) + eps)`` and
      ``O'_j = (phi(k_j) + eps) . (sum_i I_i phi(q_i) + eps)``, the latter clipped to [-1, 1];
    - sources compete (``softmax_j(O'_j) * S`` weights the values), sinks are gated
      (``sigmoid(I'_i * L / S)``), and the output is
      ``sigmoid(I'_i L/S) * I_i phi(q_i) (sum_j phi(k_j)^T v_j softmax_j(O') S)``.

    Parameters
    ----------
    embed_dim
        Model width; must be divisible by ``num_heads``.
    num_heads
        Number of heads.
    dropout
        Dropout on the output (training only).
    eps
        Added to the kernel features and flow sums for numerical safety.
    """

    def __init__(
        self, embed_dim: int, num_heads: int, dropout: float = 0.0, *, eps: float = 1e-6
    ) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})."
            )
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.eps = eps
        self.query_projection = nn.Linear(embed_dim, embed_dim)
        self.key_projection = nn.Linear(embed_dim, embed_dim)
        self.value_projection = nn.Linear(embed_dim, embed_dim)
        self.out_projection = nn.Linear(embed_dim, embed_dim)
        self.dropout = nn.Dropout(dropout)

    def _heads(self, x: Tensor) -> Tensor:
        bsz, length, _ = x.shape
        return x.view(bsz, length, self.num_heads, -1).transpose(1, 2)  # (b, h, len, d_head)

    def forward(self, x: Tensor) -> Tensor:
        """Attend over ``x`` of shape ``(batch, seq_len, embed_dim)``; same shape out."""
        bsz, length, _ = x.shape
        eps = self.eps
        q = torch.sigmoid(self._heads(self.query_projection(x)))
        k = torch.sigmoid(self._heads(self.key_projection(x)))
        v = self._heads(self.value_projection(x))
        n_sink, n_source = float(q.shape[2]), float(k.shape[2])

        incoming = 1.0 / torch.einsum("bhld,bhd->bhl", q + eps, k.sum(dim=2) + eps)
        outgoing = 1.0 / torch.einsum("bhld,bhd->bhl", k + eps, q.sum(dim=2) + eps)
        conserved_sink = torch.einsum(
            "bhld,bhd->bhl", q + eps, (k * outgoing[..., None]).sum(dim=2) + eps
        )
        conserved_source = torch.einsum(
            "bhld,bhd->bhl", k + eps, (q * incoming[..., None]).sum(dim=2) + eps
        )
        # The clip keeps the competition softmax stable (as the reference implementation).
        conserved_source = conserved_source.clamp(-1.0, 1.0)
        allocation = torch.sigmoid(conserved_sink * (n_sink / n_source))
        competition = torch.softmax(conserved_source, dim=-1) * n_source

        kv = torch.einsum("bhld,bhlm->bhdm", k, v * competition[..., None])
        out = torch.einsum("bhld,bhdm->bhlm", q * incoming[..., None], kv) * allocation[..., None]
        out = out.transpose(1, 2).reshape(bsz, length, self.embed_dim)
        return self.dropout(self.out_projection(out))


class FlowformerLayer(nn.Module):
    """A Flowformer encoder layer: flow attention and a GELU feed-forward block.

    Pre-norm (``norm_first``): ``x = x + attn(norm1(x));
    x = x + ffn(norm2(x))``; post-norm otherwise: ``x = norm1(x + attn(x));
    x = norm2(x + ffn(x))``. The feed-forward block is
    ``Linear(d, d_ff) -> GELU -> Dropout -> Linear(d_ff, d) -> Dropout``.

    Parameters
    ----------
    embed_dim
        Model width.
    num_heads
        Number of attention heads.
    dim_feedforward
        Hidden width of the feed-forward block; ``None`` uses ``2 * embed_dim``.
    dropout
        Dropout after attention and inside/after the feed-forward block.
    norm
        Normalisation of ``norm1``/``norm2`` (see :func:`make_norm`).
    norm_first
        Pre-norm instead of post-norm.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dim_feedforward: int | None = None,
        dropout: float = 0.0,
        *,
        norm: NormName = "layernorm",
        norm_first: bool = True,
    ) -> None:
        super().__init__()
        d_ff = 2 * embed_dim if dim_feedforward is None else dim_feedforward
        self.self_attn = FlowAttention(embed_dim, num_heads)
        self._ff_block = nn.Sequential(
            nn.Linear(embed_dim, d_ff),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(d_ff, embed_dim),
            nn.Dropout(dropout),
        )
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = make_norm(norm, embed_dim)
        self.norm2 = make_norm(norm, embed_dim)
        self.norm_first = norm_first

    def _norm(self, norm: nn.Module, x: Tensor) -> Tensor:
        # Group and batch norm take (n, d): fold the batch and sequence axes together.
        if isinstance(norm, nn.GroupNorm | nn.BatchNorm1d):
            return norm(x.reshape(-1, x.shape[-1])).view_as(x)
        return norm(x)

    def _attend(self, x: Tensor) -> Tensor:
        return self.dropout1(self.self_attn(x))

    def forward(self, x: Tensor) -> Tensor:
        """Run the layer on ``x``: ``(batch, seq_len, d)`` or one sequence ``(seq_len, d)``."""
        squeeze = x.dim() == 2
        if squeeze:
            x = x.unsqueeze(0)
        if self.norm_first:
            x = x + self._attend(self._norm(self.norm1, x))
            x = x + self._ff_block(self._norm(self.norm2, x))
        else:
            x = self._norm(self.norm1, x + self._attend(x))
            x = self._norm(self.norm2, x + self._ff_block(x))
        return x.squeeze(0) if squeeze else x


class FlowformerEncoder(nn.Module):
    """A stack of :class:`FlowformerLayer` (state-dict keys ``layers.N.*``).

    Parameters
    ----------
    num_layers
        Number of layers.
    embed_dim
        Model width.
    num_heads
        Number of attention heads.
    dim_feedforward
        Hidden width of the feed-forward blocks (``None``: ``2 * embed_dim``).
    dropout
        Dropout rate (see :class:`FlowformerLayer`).
    norm
        Normalisation inside the layers.
    norm_first
        Pre-norm layers instead of post-norm.
    """

    def __init__(
        self,
        num_layers: int,
        embed_dim: int,
        num_heads: int,
        dim_feedforward: int | None = None,
        dropout: float = 0.0,
        *,
        norm: NormName = "layernorm",
        norm_first: bool = True,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            FlowformerLayer(
                embed_dim, num_heads, dim_feedforward, dropout, norm=norm, norm_first=norm_first
            )
            for _ in range(num_layers)
        )

    def forward(self, x: Tensor) -> Tensor:
        """Run all layers on ``(batch, seq_len, embed_dim)`` or ``(seq_len, embed_dim)``."""
        for layer in self.layers:
            x = layer(x)
        return x
