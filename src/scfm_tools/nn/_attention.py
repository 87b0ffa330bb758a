"""Multi-head self-attention and transformer encoder layers on top of torch SDPA.

Parameter names follow :class:`torch.nn.MultiheadAttention` and
:class:`torch.nn.TransformerEncoderLayer` (``self_attn.in_proj_weight``, ``self_attn.in_proj_bias``,
``self_attn.out_proj.*``, ``linear1``, ``linear2``, ``norm1``, ``norm2``; ``layers.N.`` in the
stack), so state dicts written by official code that used the torch layers load unchanged.

Attention runs through :func:`torch.nn.functional.scaled_dot_product_attention`, which picks a
fused kernel (flash / memory-efficient on GPU) by itself; the flash-attn package is never needed.
Only when attention weights are asked for is ``softmax(QK^T / sqrt(d))`` formed explicitly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MultiheadSelfAttention", "TransformerEncoder", "TransformerEncoderLayer"]

Activation = Literal["relu", "gelu"]
_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


class MultiheadSelfAttention(nn.Module):
    """Multi-head self-attention with a key-padding mask, batch first.

    Parameters
    ----------
    embed_dim
        Model width ``d``; must be divisible by ``num_heads``.
    num_heads
        Number of attention heads.
    dropout
        Dropout on the attention probabilities (training only).
    bias
        Whether the input and output projections have biases.
    """

    def __init__(
        self, embed_dim: int, num_heads: int, dropout: float = 0.0, *, bias: bool = True
    ) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})."
            )
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim)) if bias else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Same initialisation as torch.nn.MultiheadAttention.
        nn.init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    def forward(
        self,
        x: Tensor,
        key_padding_mask: Tensor | None = None,
        *,
        need_weights: bool = False,
        n_queries: int | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Attend over ``x``.

        Parameters
        ----------
        x
            Input of shape ``(batch, seq_len, embed_dim)``.
        key_padding_mask
            Boolean ``(batch, seq_len)``, ``True`` at padded positions (never attended to).
        need_weights
            Also return the attention probabilities, shape ``(batch, heads, queries, seq_len)``.
        n_queries
            Compute the output of the first ``n_queries`` positions only (all positions remain
            keys); ``None`` computes every position.

        Returns
        -------
        The attention output ``(batch, queries, embed_dim)`` and the weights (or ``None``).
        """
        bsz, seq_len, _ = x.shape
        if n_queries is None:
            n_queries = seq_len
            qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
            qkv = qkv.view(bsz, seq_len, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)  # each (batch, heads, seq_len, head_dim)
        else:
            # Only a few outputs are wanted (e.g. <cls>): skip the other query projections.
            d = self.embed_dim
            bias = self.in_proj_bias
            q = F.linear(
                x[:, :n_queries], self.in_proj_weight[:d], None if bias is None else bias[:d]
            )
            kv = F.linear(x, self.in_proj_weight[d:], None if bias is None else bias[d:])
            q = q.view(bsz, n_queries, self.num_heads, self.head_dim).transpose(1, 2)
            kv = kv.view(bsz, seq_len, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            k, v = kv.unbind(0)
        keep = None
        if key_padding_mask is not None:
            if key_padding_mask.dtype != torch.bool:
                raise TypeError("key_padding_mask must be a boolean tensor (True = padding).")
            keep = ~key_padding_mask[:, None, None, :]
        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
            if keep is not None:
                scores = scores.masked_fill(~keep, float("-inf"))
            weights = scores.softmax(dim=-1)
            out = F.dropout(weights, p=dropout_p) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout_p)
        out = out.transpose(1, 2).reshape(bsz, n_queries, self.embed_dim)
        return self.out_proj(out), weights


class TransformerEncoderLayer(nn.Module):
    """A transformer encoder layer, post-norm (as torch's default) or pre-norm, batch first.

    Post-norm: ``x = norm1(x + attn(x)); x = norm2(x + ffn(x))``. Pre-norm (``norm_first``):
    ``x = x + attn(norm1(x)); x = x + ffn(norm2(x))``, as in
    :class:`torch.nn.TransformerEncoderLayer` with ``norm_first=True``.

    Parameters
    ----------
    d_model
        Model width.
    nhead
        Number of attention heads.
    dim_feedforward
        Hidden width of the feed-forward block.
    dropout
        Dropout on attention probabilities, after attention, inside and after the feed-forward.
    activation
        Feed-forward activation.
    layer_norm_eps
        Epsilon of both layer norms.
    norm_first
        Pre-norm instead of post-norm.
    bias
        Whether linear layers and layer norms have biases.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: Activation = "relu",
        *,
        layer_norm_eps: float = 1e-5,
        norm_first: bool = False,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {list(_ACTIVATIONS)}, got {activation!r}.")
        self.self_attn = MultiheadSelfAttention(d_model, nhead, dropout, bias=bias)
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation_name = activation
        self.activation = _ACTIVATIONS[activation]
        self.norm_first = norm_first

    def _attend(
        self, x: Tensor, key_padding_mask: Tensor | None, need_weights: bool, n_queries: int | None
    ) -> tuple[Tensor, Tensor | None]:
        out, weights = self.self_attn(
            x, key_padding_mask, need_weights=need_weights, n_queries=n_queries
        )
        return self.dropout1(out), weights

    def _feed_forward(self, x: Tensor) -> Tensor:
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(
        self,
        src: Tensor,
        key_padding_mask: Tensor | None = None,
        *,
        need_weights: bool = False,
        n_queries: int | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Run the layer on ``src`` ``(batch, seq_len, d_model)``.

        Parameters
        ----------
        src
            Input of shape ``(batch, seq_len, d_model)``.
        key_padding_mask
            Boolean ``(batch, seq_len)``, ``True`` at padded positions.
        need_weights
            Also return the attention probabilities ``(batch, heads, queries, seq_len)``.
        n_queries
            Compute the output of the first ``n_queries`` positions only; ``None``: all.

        Returns
        -------
        The layer output ``(batch, queries, d_model)`` and the attention weights (or ``None``).
        """
        x = src
        residual = x if n_queries is None else x[:, :n_queries]
        if self.norm_first:
            attn, weights = self._attend(self.norm1(x), key_padding_mask, need_weights, n_queries)
            x = residual + attn
            x = x + self._feed_forward(self.norm2(x))
        else:
            attn, weights = self._attend(x, key_padding_mask, need_weights, n_queries)
            x = self.norm1(residual + attn)
            x = self.norm2(x + self._feed_forward(x))
        return x, weights


class TransformerEncoder(nn.Module):
    """A stack of :class:`TransformerEncoderLayer` (state-dict keys ``layers.N.*``).

    Parameters
    ----------
    num_layers
        Number of layers.
    d_model
        Model width.
    nhead
        Number of attention heads.
    dim_feedforward
        Hidden width of the feed-forward blocks.
    dropout
        Dropout rate (see :class:`TransformerEncoderLayer`).
    activation
        Feed-forward activation.
    layer_norm_eps
        Epsilon of the layer norms.
    norm_first
        Pre-norm layers instead of post-norm.
    final_norm
        Add a final :class:`~torch.nn.LayerNorm` (key ``norm.*``), as ``nn.TransformerEncoder``
        does when given ``norm=``.
    """

    def __init__(
        self,
        num_layers: int,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: Activation = "relu",
        *,
        layer_norm_eps: float = 1e-5,
        norm_first: bool = False,
        final_norm: bool = False,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerEncoderLayer(
                d_model,
                nhead,
                dim_feedforward,
                dropout,
                activation,
                layer_norm_eps=layer_norm_eps,
                norm_first=norm_first,
            )
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model, eps=layer_norm_eps) if final_norm else None

    def forward(
        self,
        src: Tensor,
        key_padding_mask: Tensor | None = None,
        *,
        return_attention: bool | Sequence[int] = False,
        last_queries: int | None = None,
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """Run all layers.

        Parameters
        ----------
        src
            Input of shape ``(batch, seq_len, d_model)``.
        key_padding_mask
            Boolean ``(batch, seq_len)``, ``True`` at padded positions.
        return_attention
            ``True`` for the attention weights of every layer, or the indices of the layers
            whose weights are wanted (negative indices count from the end).
        last_queries
            Compute the last layer's output for the first ``last_queries`` positions only (a
            cell embedding read from ``<cls>`` needs one); ``None``: every position.

        Returns
        -------
        The output ``(batch, seq_len, d_model)`` (``last_queries`` positions when given) and a
        dict layer index -> attention weights ``(batch, heads, queries, seq_len)`` (empty unless
        asked for).
        """
        n = len(self.layers)
        if return_attention is True:
            wanted = set(range(n))
        elif return_attention is False:
            wanted = set()
        else:
            bad = [i for i in return_attention if not -n <= i < n]
            if bad:
                raise IndexError(f"return_attention names layers {bad}, but there are {n} layers.")
            wanted = {i % n for i in return_attention}
        attentions: dict[int, Tensor] = {}
        x = src
        for i, layer in enumerate(self.layers):
            queries = last_queries if i == n - 1 else None
            x, weights = layer(x, key_padding_mask, need_weights=i in wanted, n_queries=queries)
            if weights is not None:
                attentions[i] = weights
        if self.norm is not None:
            x = self.norm(x)
        return x, attentions
