"""Performer: pre-LayerNorm transformer blocks with FAVOR+ (softmax-kernel) linear attention.

One implementation for every model built on the Performer of ``performer_pytorch`` (an encoder,
a decoder). Attribute names follow that code, so official state dicts load strictly:

- ``net.layers.N.0.norm.*`` and ``net.layers.N.0.fn.{to_q,to_k,to_v,to_out}.*`` (attention),
- ``net.layers.N.0.fn.fast_attention.projection_matrix`` (the random features, a buffer),
- ``net.layers.N.1.norm.*`` and ``net.layers.N.1.fn.fn.{w1,w2}.*`` (feed-forward),
- ``calls_since_last_redraw`` (a buffer counting training steps since the features were drawn).

The attention is the official non-causal FAVOR+ estimate of softmax attention, with its exact
numerics: per head, queries and keys are mapped through ``phi(x) = m^-1/2 (exp(x' W^T - |x'|^2/2
- c) + 1e-4)`` with ``x' = x d^-1/4``, ``W`` the stored projection matrix (``m`` features by ``d``
head dimensions), and ``c`` a stabiliser: for queries the maximum of ``x' W^T`` over features
(per token), for keys the maximum over everything the call sees. Then ``out = phi(Q) (phi(K)^T
V) / (phi(Q) phi(K)^T 1)``.

Unlike the official code, the attention never materialises ``phi`` for the whole sequence: keys
are streamed in chunks that accumulate ``phi(K)^T V`` and ``phi(K)^T 1`` (the key stabiliser is
kept as a running maximum and earlier sums rescaled when it grows, which is exact), then queries
are streamed against those sums. Memory is bounded by ``chunk_size`` tokens (by default about
1 M elements per intermediate, a size that stays in cache), and results equal the unchunked
formulas to float rounding. For inference on CPU (eval mode, no autograd) the whole block is
streamed the same way, its projections, output and feed-forward included, and the samples of
a batch run one at a time when they are independent (``key_max="sample"``): chunks then stay
long within the same memory budget.
A caller can hand the first block the keys, values and queries of some tokens of a sample,
computed elsewhere (:class:`PrecomputedTokens`, e.g. from a cache of tokens whose input is the
same in every sample); the block then projects only the others (see :meth:`Performer.forward`).
The feature maps are computed in float32 even under autocast: the ``+1e-4`` floor is below
bfloat16's resolution near 1.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Literal, Protocol

import torch
from torch import Tensor, nn

__all__ = [
    "FastAttention",
    "FavorStream",
    "FeedForward",
    "Performer",
    "PerformerSelfAttention",
    "PrecomputedTokens",
    "chunk_length",
    "favor_attention",
    "gaussian_orthogonal_random_matrix",
    "head_projections",
    "linear_attention",
    "softmax_kernel",
]

KeyMax = Literal["sample", "batch"]
_KEY_MAX = ("sample", "batch")
# Largest intermediate a chunk may create, in elements (4 MiB in float32). Chunks this small
# stay in cache between the matmul that makes them and the one that consumes them (FAVOR+
# features, the feed-forward's hidden layer): on CPU about 1.5x faster than 64 MiB chunks over
# 16,907 tokens.
_CHUNK_ELEMENTS = 1 << 20
_EPS = 1e-4


def default_nb_features(dim_head: int) -> int:
    """Return the official default number of random features, ``int(d * ln d)``."""
    return int(dim_head * math.log(dim_head))


def gaussian_orthogonal_random_matrix(
    nb_rows: int,
    nb_columns: int,
    *,
    scaling: Literal[0, 1] = 0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw FAVOR+ projection features: blocks of orthogonal rows with Gaussian-like norms.

    Rows come in blocks of ``nb_columns`` mutually orthogonal unit vectors (the Q factor of a
    Gaussian matrix); with ``scaling=0`` each row is then given the norm of an independent
    ``nb_columns``-dimensional standard Gaussian vector, with ``scaling=1`` the norm
    ``sqrt(nb_columns)``. This is the distribution of the official
    ``gaussian_orthogonal_random_matrix``; the draws themselves differ.

    Parameters
    ----------
    nb_rows
        Number of random features ``m``.
    nb_columns
        Head dimension ``d``.
    scaling
        ``0`` for random norms (official default), ``1`` for fixed norms.
    generator
        CPU random generator, for reproducible draws.
    device
        Where to put the result.

    Returns
    -------
    ``(nb_rows, nb_columns)`` float32 tensor.
    """
    if nb_rows < 1 or nb_columns < 1:
        raise ValueError(f"nb_rows and nb_columns must be positive, got {nb_rows}, {nb_columns}.")
    if scaling not in (0, 1):
        raise ValueError(f"scaling must be 0 or 1, got {scaling!r}.")
    n_blocks = math.ceil(nb_rows / nb_columns)
    gauss = torch.randn(n_blocks, nb_columns, nb_columns, generator=generator)
    q, _ = torch.linalg.qr(gauss, mode="reduced")
    rows = q.transpose(-2, -1).reshape(-1, nb_columns)[:nb_rows]
    if scaling == 0:
        norms = torch.randn(nb_rows, nb_columns, generator=generator).norm(dim=1)
    else:
        norms = torch.full((nb_rows,), math.sqrt(nb_columns))
    return (norms[:, None] * rows).to(device)


def _check_key_max(key_max: str) -> None:
    if key_max not in _KEY_MAX:
        raise ValueError(f"key_max must be one of {list(_KEY_MAX)}, got {key_max!r}.")


def softmax_kernel(
    data: Tensor,
    projection_matrix: Tensor,
    *,
    is_query: bool,
    key_max: KeyMax = "batch",
    eps: float = _EPS,
) -> Tensor:
    """FAVOR+ positive random features of queries or keys, all at once (the reference formula).

    ``m^-1/2 (exp(x' W^T - |x'|^2 / 2 - c) + eps)`` with ``x' = x d^-1/4``; ``c`` is the
    per-token maximum of ``x' W^T`` for queries, and for keys the maximum over the whole input
    (``key_max="batch"``, as the official code) or over each sample (``"sample"``).
    :func:`favor_attention` computes the same attention in bounded memory.

    Parameters
    ----------
    data
        Queries or keys ``(batch, heads, seq_len, d)``.
    projection_matrix
        ``(m, d)`` random features.
    is_query
        Queries (per-token stabiliser) or keys.
    key_max
        Extent of the key stabiliser.
    eps
        Floor added to every feature.

    Returns
    -------
    ``(batch, heads, seq_len, m)`` features.
    """
    _check_key_max(key_max)
    normalizer = data.shape[-1] ** -0.25
    ratio = projection_matrix.shape[0] ** -0.5
    dash = (normalizer * data) @ projection_matrix.type_as(data).T
    diag = ((data**2).sum(-1, keepdim=True) / 2.0) * normalizer**2
    if is_query:
        stab = dash.amax(dim=-1, keepdim=True)
    elif key_max == "batch":
        stab = dash.amax()
    else:
        stab = dash.amax(dim=(1, 2, 3), keepdim=True)
    return ratio * (torch.exp(dash - diag - stab) + eps)


def linear_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Non-causal linear attention ``q (k^T v) / (q k^T 1)`` on feature maps (reference formula).

    Parameters
    ----------
    q, k
        Query and key features ``(batch, heads, seq_len, m)``.
    v
        Values ``(batch, heads, seq_len, e)``.

    Returns
    -------
    ``(batch, heads, seq_len, e)``.
    """
    context = k.transpose(-2, -1) @ v
    denom = q @ k.sum(dim=-2).unsqueeze(-1)
    return (q @ context) / denom


def chunk_length(chunk_size: int | None, n: int, per_token: int) -> int:
    """Return the tokens per chunk: ``chunk_size`` (at most ``n``), or a bound on memory.

    For ``chunk_size=None``, as many tokens as keep an intermediate of ``per_token`` elements
    per token within about 1 M elements.
    """
    if chunk_size is None:
        return max(1, min(n, _CHUNK_ELEMENTS // max(per_token, 1)))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}.")
    return min(n, chunk_size)


def no_autocast(device_type: str):
    """Turn autocast off on ``device_type`` (float32 inside), a no-op where it does not exist."""
    if device_type in ("cuda", "cpu"):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


class FavorStream:
    """FAVOR+ attention fed chunk by chunk: all key chunks first, then query chunks.

    Chunks come head-major, ``(batch, heads, chunk, d)``. Keys accumulate ``phi(K)^T V`` and
    ``phi(K)^T 1`` under a running maximum (``running``, per sample, in base-2 units; earlier
    sums are rescaled when it grows, which is exact); :meth:`queries` then attends a chunk of
    queries against the sums. Everything is float32.

    Parameters
    ----------
    projection_matrix
        ``(m, d)`` random features.
    b, h
        Batch size and heads of the chunks.
    key_max
        Extent of the key stabiliser (see :func:`favor_attention`).
    eps
        Feature floor.
    """

    def __init__(
        self,
        projection_matrix: Tensor,
        b: int,
        h: int,
        *,
        key_max: KeyMax,
        eps: float = _EPS,
    ) -> None:
        m, d = projection_matrix.shape
        # Exponents are kept in base 2 (exp(x) = 2^(x log2 e)): exp2 costs half of exp on CPU.
        # d^-1/4 and log2 e are folded into the (small) projection instead of scaling q and k.
        normalizer = d**-0.25
        proj = math.log2(math.e) * normalizer * projection_matrix.float()
        # Products over a multiple of 8 features run 8-15% faster on CPU (AVX2 width). The
        # extra features repeat the first ones, so every maximum is unchanged, and their sums
        # are zeroed before any query reads them.
        self.m = m
        extra = torch.arange(-m % 8, device=proj.device) % m
        self.proj_t = torch.cat([proj, proj[extra]]).T.contiguous()
        self.half_norm2 = math.log2(math.e) * normalizer**2 / 2.0
        self.key_max = key_max
        self.eps = eps
        # Outside autograd the (batch, heads, chunk, m) intermediates and the sums are updated
        # in place: each avoided pass over a chunk's features is about 1% of a Performer.
        self.inplace = not torch.is_grad_enabled()
        mp = self.proj_t.shape[1]
        self.kv = self.proj_t.new_zeros(b * h, mp, d)
        self.k_sum = self.proj_t.new_zeros(b * h, mp)
        self.v_sum = self.proj_t.new_zeros(b, h, d)
        self.count = 0
        self.running: Tensor | None = None
        self.context: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

    def _features(self, xh: Tensor, dash: Tensor, stabiliser: Tensor) -> Tensor:
        """``exp2(dash - |x|^2 half_norm2 - stabiliser)``, in place outside autograd."""
        # The norm's single reduction is ~2x faster than squaring and summing.
        norm2 = torch.linalg.vector_norm(xh, dim=-1, keepdim=True).square()
        shift = norm2 * self.half_norm2 + stabiliser
        return dash.sub_(shift).exp2_() if self.inplace else torch.exp2(dash - shift)

    def keys(self, kh: Tensor, vh: Tensor) -> None:
        """Add a chunk of keys and values ``(batch, heads, chunk, d)``."""
        b, h, c, d = kh.shape
        dash = kh @ self.proj_t
        if self.key_max == "batch":
            chunk_max = dash.amax().expand(b)
        else:
            chunk_max = dash.amax(dim=(1, 2, 3))
        self._raise_to(chunk_max)
        feats = self._features(kh, dash, self.running[:, None, None, None]).view(b * h, c, -1)
        # V and the ones column as two products: a 65-wide product costs as much as an 80-wide.
        values = vh.reshape(b * h, c, d)
        if self.inplace:
            self.kv.baddbmm_(feats.transpose(1, 2), values)
            self.k_sum += feats.sum(dim=1)
        else:
            self.kv = torch.baddbmm(self.kv, feats.transpose(1, 2), values)
            self.k_sum = self.k_sum + feats.sum(dim=1)
        self.v_sum = self.v_sum + vh.sum(dim=2)
        self.count += c

    def _raise_to(self, top: Tensor) -> None:
        """Make the running maximum at least ``top`` ``(batch,)``, rescaling the sums so far."""
        if self.running is None:
            self.running = top
            return
        new = torch.maximum(self.running, top)
        scale = torch.exp2(self.running - new).repeat_interleave(self.v_sum.shape[1])
        self.kv = self.kv * scale[:, None, None]
        self.k_sum = self.k_sum * scale[:, None]
        self.running = new

    def key_maxima(self, kh: Tensor) -> Tensor:
        """Each key's largest projection ``(batch, chunk)``, in the units of the stabiliser."""
        return (kh @ self.proj_t).amax(dim=(1, 3))

    def sums(self) -> tuple[Tensor, Tensor, Tensor, int]:
        """Return the sums so far: ``kv``, ``k_sum`` (under ``running``), ``v_sum``, ``count``."""
        return self.kv, self.k_sum, self.v_sum, self.count

    def add_sums(
        self, sums: tuple[Tensor, Tensor, Tensor, int], *, at: Tensor, top: Tensor
    ) -> None:
        """Add key sums made elsewhere under stabiliser ``at``, over keys whose maximum is ``top``.

        ``sums`` are as :meth:`sums` returns them; ``at`` and ``top`` are ``(batch,)``.
        """
        kv, k_sum, v_sum, count = sums
        self._raise_to(top)
        scale = torch.exp2(at - self.running).repeat_interleave(self.v_sum.shape[1])
        self.kv = self.kv + kv * scale[:, None, None]
        self.k_sum = self.k_sum + k_sum * scale[:, None]
        self.v_sum = self.v_sum + v_sum
        self.count += count

    def _finish_keys(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        b, h, d = self.v_sum.shape
        m = self.m
        # Every key feature's eps floor adds eps * [sum(v), n]; m^-1/2 scales both.
        ctx_v = torch.zeros_like(self.kv)
        ctx_v[:, :m] = (m**-0.5) * (self.kv[:, :m] + self.eps * self.v_sum.view(b * h, 1, d))
        ctx_z = torch.zeros_like(self.k_sum)
        ctx_z[:, :m] = (m**-0.5) * (self.k_sum[:, :m] + self.eps * self.count)
        # The same floor on the query side, applied to the sums instead of each feature.
        floor_v = self.eps * ctx_v.sum(dim=1, keepdim=True)
        floor_z = self.eps * ctx_z.sum(dim=1).view(b, h, 1, 1)
        # (b h, m, 1) as a transposed row: MKL then takes the product as a matrix-vector
        # product, ~9x faster than on the same column stored contiguously.
        return ctx_v, ctx_z.unsqueeze(1).transpose(1, 2), floor_v, floor_z

    def queries(self, qh: Tensor) -> Tensor:
        """Attend a chunk of queries ``(batch, heads, chunk, d)``, after every key chunk.

        Returns the heads' outputs token-major and contiguous, ``(batch, chunk, heads, d)``.
        """
        if self.context is None:
            self.context = self._finish_keys()
        ctx_v, ctx_z, floor_v, floor_z = self.context
        b, h, c, d = qh.shape
        dash = qh @ self.proj_t
        # The query features' m^-1/2 cancels between numerator and denominator.
        feats = self._features(qh, dash, dash.amax(dim=-1, keepdim=True)).view(b * h, c, -1)
        num = torch.baddbmm(floor_v, feats, ctx_v).view(b, h, c, d).transpose(1, 2)
        den = (torch.bmm(feats, ctx_z).view(b, h, c, 1) + floor_z).transpose(1, 2)
        if not self.inplace:
            return (num / den).contiguous()
        # The division writes the token-major result directly, so no copy follows it.
        return torch.div(num, den, out=qh.new_empty(b, c, h, d))


def favor_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    projection_matrix: Tensor,
    *,
    key_max: KeyMax = "batch",
    eps: float = _EPS,
    chunk_size: int | None = None,
) -> Tensor:
    """FAVOR+ softmax-kernel attention, streamed over the sequence in chunks.

    Equals ``linear_attention(softmax_kernel(q, is_query=True), softmax_kernel(k,
    is_query=False), v)`` up to float rounding, without ever holding a ``(batch, heads,
    seq_len, m)`` tensor: keys are streamed first, accumulating ``phi(K)^T V`` and
    ``phi(K)^T 1`` under a running maximum (earlier sums are rescaled by ``exp(old - new)``
    when it grows), then queries are streamed against those sums.

    Parameters
    ----------
    q, k, v
        ``(batch, heads, seq_len, d)`` queries, keys and values.
    projection_matrix
        ``(m, d)`` random features.
    key_max
        ``"batch"``: one key stabiliser over the whole batch, as the official ``forward`` on a
        batch; ``"sample"``: one per sample, as the official scripts that run one cell at a
        time, and the only choice under which a sample's output does not depend on the other
        samples of the batch.
    eps
        Feature floor (official ``1e-4``).
    chunk_size
        Tokens per chunk; ``None`` sizes chunks so that no intermediate exceeds about 1 M
        elements.

    Returns
    -------
    ``(batch, heads, seq_len, d_v)``, in the dtype of ``v``.
    """
    _check_key_max(key_max)
    b, h, n, d = q.shape
    m = projection_matrix.shape[0]
    if projection_matrix.shape[1] != d:
        raise ValueError(
            f"projection_matrix has {projection_matrix.shape[1]} columns but the heads have "
            f"dimension {d}."
        )
    out_dtype = v.dtype
    with no_autocast(q.device.type):
        q, k, v = (t.float() for t in (q, k, v))
        step = chunk_length(chunk_size, n, b * h * m)
        stream = FavorStream(projection_matrix, b, h, key_max=key_max, eps=eps)
        for start in range(0, n, step):
            stream.keys(k[:, :, start : start + step], v[:, :, start : start + step])
        out = q.new_empty(b, n, h, d)
        for start in range(0, n, step):
            out[:, start : start + step] = stream.queries(q[:, :, start : start + step])
    return out.transpose(1, 2).to(out_dtype)


class FastAttention(nn.Module):
    """FAVOR+ attention with a stored projection matrix (official ``FastAttention``).

    Parameters
    ----------
    dim_head
        Head dimension ``d``.
    nb_features
        Random features ``m``; ``None`` uses ``int(d ln d)`` (266 for ``d = 64``).
    ortho_scaling
        Norms of newly drawn features (see :func:`gaussian_orthogonal_random_matrix`).
    """

    def __init__(
        self, dim_head: int, nb_features: int | None = None, *, ortho_scaling: Literal[0, 1] = 0
    ) -> None:
        super().__init__()
        self.dim_head = dim_head
        self.nb_features = default_nb_features(dim_head) if nb_features is None else nb_features
        self.ortho_scaling = ortho_scaling
        self.register_buffer(
            "projection_matrix",
            gaussian_orthogonal_random_matrix(self.nb_features, dim_head, scaling=ortho_scaling),
        )

    @torch.no_grad()
    def redraw_projection_matrix(self, generator: torch.Generator | None = None) -> None:
        """Replace the random features by a fresh draw (in place, same device and dtype)."""
        new = gaussian_orthogonal_random_matrix(
            self.nb_features, self.dim_head, scaling=self.ortho_scaling, generator=generator
        )
        self.projection_matrix.copy_(new)

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        key_max: KeyMax = "batch",
        chunk_size: int | None = None,
    ) -> Tensor:
        """Attend; see :func:`favor_attention` (inputs ``(batch, heads, seq_len, d)``)."""
        return favor_attention(
            q, k, v, self.projection_matrix, key_max=key_max, chunk_size=chunk_size
        )


class PerformerSelfAttention(nn.Module):
    """Multi-head FAVOR+ self-attention (official ``SelfAttention``, global heads only).

    Parameters
    ----------
    dim
        Model width.
    heads
        Number of heads.
    dim_head
        Head dimension; ``heads * dim_head`` need not equal ``dim``.
    nb_features
        Random features per head (``None``: ``int(dim_head ln dim_head)``).
    qkv_bias
        Biases on the query/key/value projections.
    dropout
        Dropout after the output projection.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        *,
        nb_features: int | None = None,
        qkv_bias: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.fast_attention = FastAttention(dim_head, nb_features)
        self.to_q = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_out = nn.Linear(inner, dim)
        self.dropout = nn.Dropout(dropout)

    def _split(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, -1).transpose(1, 2)

    def forward(
        self, x: Tensor, *, key_max: KeyMax = "batch", chunk_size: int | None = None
    ) -> Tensor:
        """Attend over ``x`` ``(batch, seq_len, dim)``."""
        q, k, v = (self._split(proj(x)) for proj in (self.to_q, self.to_k, self.to_v))
        out = self.fast_attention(q, k, v, key_max=key_max, chunk_size=chunk_size)
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        return self.dropout(self.to_out(out))


class FeedForward(nn.Module):
    """Position-wise ``w2(dropout(GELU(w1(x))))`` (official ``FeedForward``, no GLU)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, dim * mult)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.w2 = nn.Linear(dim * mult, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(self.dropout(self.act(self.w1(x))))


class SequenceChunks(nn.Module):
    """Apply a position-wise module to chunks of the sequence (official ``Chunk``'s place).

    Only memory changes: each chunk's hidden activations are freed before the next one.
    """

    def __init__(self, fn: FeedForward) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor, *, chunk_size: int | None = None) -> Tensor:
        b, n, _ = x.shape
        step = chunk_length(chunk_size, n, b * self.fn.w1.out_features)
        if step >= n:
            return self.fn(x)
        return torch.cat([self.fn(x[:, s : s + step]) for s in range(0, n, step)], dim=1)


class PreLayerNorm(nn.Module):
    """``fn(LayerNorm(x))``: the official ``PreLayerNorm`` wrapper (keys ``norm``, ``fn``)."""

    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        return self.fn(self.norm(x), **kwargs)


class _Layers(nn.Module):
    """Holds the blocks under ``layers`` (the official ``SequentialSequence``'s key)."""

    def __init__(self, layers: nn.ModuleList) -> None:
        super().__init__()
        self.layers = layers


class Performer(nn.Module):
    """A stack of pre-LayerNorm Performer blocks: ``x += attn(norm(x)); x += ffn(norm(x))``.

    No final norm (the models put their own after it). State-dict keys are those of the
    official ``Performer`` (see the module notes), so official weights load with
    ``strict=True``.

    Random features are drawn once at construction and are part of the state dict; loaded
    checkpoints bring their own. They are redrawn only while training and only when
    ``feature_redraw_interval`` is set (the official pretraining used 1000 steps): every
    training-mode forward then counts in ``calls_since_last_redraw``, and the forward that finds
    the count at the interval draws new features for every layer and resets it. In eval mode,
    or with ``feature_redraw_interval=None`` (the default), the features never change.

    Parameters
    ----------
    dim
        Model width.
    depth
        Number of blocks.
    heads
        Attention heads per block.
    dim_head
        Head dimension.
    nb_features
        Random features per head (``None``: ``int(dim_head ln dim_head)``).
    ff_mult
        Feed-forward hidden width as a multiple of ``dim``.
    qkv_bias
        Biases on the query/key/value projections.
    ff_dropout
        Dropout inside the feed-forward blocks.
    attn_dropout
        Dropout after each attention output projection.
    feature_redraw_interval
        Training steps between redraws of the random features; ``None`` never redraws.
    key_max
        Extent of the key stabiliser (see :func:`favor_attention`): ``"sample"`` (default)
        makes every sample's output independent of the rest of the batch, as the official
        one-cell-at-a-time inference scripts; ``"batch"`` is the official ``forward`` on a
        batch. They differ only through the ``1e-4`` feature floor. Can be changed any time.
    chunk_size
        Tokens per chunk in attention and feed-forward; ``None`` bounds each intermediate to
        about 1 M elements. Can be changed any time; results do not depend on it.
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
        qkv_bias: bool = False,
        ff_dropout: float = 0.0,
        attn_dropout: float = 0.0,
        feature_redraw_interval: int | None = None,
        key_max: KeyMax = "sample",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        _check_key_max(key_max)
        if feature_redraw_interval is not None and feature_redraw_interval < 1:
            raise ValueError(
                "feature_redraw_interval must be a positive integer or None, got "
                f"{feature_redraw_interval!r}."
            )
        blocks = nn.ModuleList(
            nn.ModuleList(
                [
                    PreLayerNorm(
                        dim,
                        PerformerSelfAttention(
                            dim,
                            heads,
                            dim_head,
                            nb_features=nb_features,
                            qkv_bias=qkv_bias,
                            dropout=attn_dropout,
                        ),
                    ),
                    PreLayerNorm(dim, SequenceChunks(FeedForward(dim, ff_mult, ff_dropout))),
                ]
            )
            for _ in range(depth)
        )
        self.net = _Layers(blocks)
        self.feature_redraw_interval = feature_redraw_interval
        self.key_max: KeyMax = key_max
        self.chunk_size = chunk_size
        self.register_buffer("calls_since_last_redraw", torch.tensor(0))

    def fast_attentions(self) -> list[FastAttention]:
        """Return the :class:`FastAttention` of every block, in order."""
        return [m for m in self.modules() if isinstance(m, FastAttention)]

    @torch.no_grad()
    def redraw_projections(self, generator: torch.Generator | None = None) -> None:
        """Draw new random features for every block and reset the step counter."""
        for attention in self.fast_attentions():
            attention.redraw_projection_matrix(generator)
        self.calls_since_last_redraw.zero_()

    def _maybe_redraw(self) -> None:
        if not self.training or self.feature_redraw_interval is None:
            return
        if int(self.calls_since_last_redraw) >= self.feature_redraw_interval:
            self.redraw_projections()
        else:
            self.calls_since_last_redraw += 1

    def forward(
        self, x: Tensor, *, first_block: Sequence[PrecomputedTokens] | None = None
    ) -> Tensor:
        """Run the blocks on ``x`` ``(batch, seq_len, dim)``.

        On CPU in eval mode without autograd each block runs in two passes over chunks of
        the sequence, keys then queries with the output projection and the feed-forward, so
        no intermediate spans the whole sequence (the same computation, with the chunks in
        cache). Elsewhere blocks run one after the other, attention then feed-forward.

        Parameters
        ----------
        x
            The blocks' input.
        first_block
            Optional, for speed: one :class:`PrecomputedTokens` per sample, giving the first
            block the keys, values and queries of the tokens it need not project itself. Used
            where the block streams one sample per pass (see :meth:`uses_first_block`);
            ignored elsewhere. Results are the same up to float rounding.
        """
        _check_key_max(self.key_max)
        if first_block is not None and len(first_block) != len(x):
            raise ValueError(
                f"first_block needs one entry per sample: {len(x)} samples, "
                f"{len(first_block)} entries."
            )
        self._maybe_redraw()
        streamed = self._streams(x)
        if streamed and self.key_max == "sample" and len(x) > 1:
            # Samples are independent here; one at a time, chunks stay long (fast matmuls)
            # within the same cache-sized budget.
            return torch.cat(
                [
                    self(
                        x[i : i + 1],
                        first_block=None if first_block is None else first_block[i : i + 1],
                    )
                    for i in range(len(x))
                ]
            )
        first = None
        if first_block is not None and self.uses_first_block(x):
            first = first_block[0]
            if tuple(first.own.shape) != (x.shape[1],):
                raise ValueError(
                    f"first_block[i].own must be (seq_len,) = ({x.shape[1]},), got "
                    f"{tuple(first.own.shape)}."
                )
        for i, (attn, ff) in enumerate(self.net.layers):
            if streamed:
                x = _streamed_block(
                    attn,
                    ff,
                    x,
                    key_max=self.key_max,
                    chunk_size=self.chunk_size,
                    first=first if i == 0 else None,
                )
            else:
                x = x + attn(x, key_max=self.key_max, chunk_size=self.chunk_size)
                x = x + ff(x, chunk_size=self.chunk_size)
        return x

    def _streams(self, x: Tensor) -> bool:
        # Measured on CPU only: on a GPU the per-chunk projections would only add launches.
        return x.device.type == "cpu" and not self.training and not torch.is_grad_enabled()

    def uses_first_block(self, x: Tensor) -> bool:
        """Whether :meth:`forward` on ``x`` would use a ``first_block``.

        True on the streamed CPU inference path with one sample per pass; callers can skip
        preparing one elsewhere.
        """
        return self._streams(x) and (self.key_max == "sample" or len(x) == 1)


class PrecomputedTokens(Protocol):
    """Tokens of one sample whose first-block keys, values and queries were computed elsewhere.

    Handed to :meth:`Performer.forward` (``first_block=``). The block projects the tokens marked
    ``own`` from its input as usual; the keys and values of the others come from
    :meth:`add_keys` and their queries from :meth:`queries`. Both must be what the block would
    compute from the sample's input (``LayerNorm``, then the head projections of
    :func:`head_projections`, in float32) up to float rounding.
    """

    #: ``(seq_len,)`` bool: the tokens the block projects itself.
    own: Tensor

    def add_keys(self, stream: FavorStream, step: int) -> None:
        """Add the keys and values of the tokens not ``own`` to ``stream``.

        ``stream`` holds the ``own`` tokens' keys already; ``step`` is the block's chunk length.
        """

    def queries(self, start: int, stop: int) -> Tensor:
        """Return the queries of tokens ``start:stop``, ``(1, heads, stop - start, d)`` float32.

        A new tensor: the block overwrites the rows of ``own`` tokens in it.
        """


def head_projections(proj: nn.Linear, x: Tensor, h: int) -> Tensor:
    """``proj(x)`` split into ``h`` heads, ``(batch, heads, tokens, d)``.

    One batched product writes the head-major layout the FAVOR+ stream reads, so no
    transposing copy of the projection follows it.
    """
    weight = proj.weight.view(h, -1, proj.in_features).transpose(1, 2)
    out = torch.matmul(x.unsqueeze(1), weight)
    return out if proj.bias is None else out + proj.bias.view(h, 1, -1)


def _streamed_block(
    attn: PreLayerNorm,
    ff: PreLayerNorm,
    x: Tensor,
    *,
    key_max: KeyMax,
    chunk_size: int | None,
    first: PrecomputedTokens | None = None,
) -> Tensor:
    """``x + attn(x)``, then ``+ ff(.)``, for inference, chunk by chunk (no dropout).

    With ``first`` (one sample), the tokens not ``first.own`` take their keys, values and
    queries from it instead of projecting ``x``.
    """
    sa: PerformerSelfAttention = attn.fn
    feed: FeedForward = ff.fn.fn
    b, n, _ = x.shape
    h = sa.heads
    fast = sa.fast_attention
    step = chunk_length(chunk_size, n, b * h * fast.nb_features)
    stream = FavorStream(fast.projection_matrix, b, h, key_max=key_max)
    own = x if first is None else x[:, first.own]
    for start in range(0, own.shape[1], step):
        xn = attn.norm(own[:, start : start + step])
        k, v = (head_projections(proj, xn, h) for proj in (sa.to_k, sa.to_v))
        with no_autocast(x.device.type):
            stream.keys(k.float(), v.float())
    if first is not None:
        with no_autocast(x.device.type):
            first.add_keys(stream, step)
    out = torch.empty_like(x)
    for start in range(0, n, step):
        xc = x[:, start : start + step]
        if first is None:
            # The LayerNorm is recomputed rather than kept from the key pass: about 1% of the
            # block's time, against a second whole-sequence tensor.
            q = head_projections(sa.to_q, attn.norm(xc), h)
        else:
            q = first.queries(start, start + xc.shape[1])
            mine = first.own[start : start + step]
            if bool(mine.any()):
                q[:, :, mine] = head_projections(sa.to_q, attn.norm(xc[:, mine]), h).float()
        with no_autocast(x.device.type):
            heads_out = stream.queries(q.float()).to(x.dtype)
        xc = xc + sa.to_out(heads_out.flatten(2))
        torch.add(xc, feed(ff.norm(xc)), out=out[:, start : start + step])
    return out
