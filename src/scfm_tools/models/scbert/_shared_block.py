"""scBERT's zero-expression genes share their first Performer block across cells.

A gene with zero expression enters scBERT's Performer as bin 0's token embedding plus the gene's
gene2vec row: the same input in every cell, and most of a cell's ~16.9k genes are zeros. So the
first block's keys, values and queries of that shared input are computed once
(:class:`SharedFirstBlock`, rebuilt when the input or the block's weights change), and for each
cell the keys of its zero genes enter the FAVOR+ sums as the cached totals over all genes minus
the rows the cell replaces with its expressed genes. Deeper blocks see cell-specific inputs
everywhere. Results equal the plain path up to float rounding (about 1.09x faster on the
published-size model on CPU).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...nn import Performer
from ...nn._performer import (
    FavorStream,
    PreLayerNorm,
    chunk_length,
    head_projections,
    no_autocast,
)

__all__ = ["SharedFirstBlock", "shared_first_block"]

# In base-2 units of the key stabiliser: beyond this gap between the cached sums' stabiliser and
# a cell's, subtracting its own rows from the cached totals would lose more than ~4 bits.
_MAX_SHARED_GAP = 4.0


class SharedFirstBlock:
    """A Performer's first-block keys, values and queries of an input shared by every sample.

    Built once per input and weights; :meth:`sample` hands
    :meth:`Performer.forward <scfm_tools.nn.Performer.forward>` the part of one sample whose
    tokens equal the shared input.

    Parameters
    ----------
    performer
        The Performer (its first block and ``chunk_size`` are read).
    shared_input
        ``(seq_len, dim)``: each token's input when it carries nothing of its own sample.
    """

    def __init__(self, performer: Performer, shared_input: Tensor) -> None:
        # Always float32, also under bf16 autocast: the cache outlives the call that built it,
        # and a later exact call must not read rounded projections.
        with no_autocast(shared_input.device.type):
            self._build(performer, shared_input)

    def _build(self, performer: Performer, shared_input: Tensor) -> None:
        attn = performer.net.layers[0][0]
        sa = attn.fn
        h = sa.heads
        self.shared_input = shared_input.detach().clone()
        self.weights = _weights_key(attn)
        self.proj = sa.fast_attention.projection_matrix
        n = shared_input.shape[0]
        step = chunk_length(performer.chunk_size, n, h * sa.fast_attention.nb_features)
        x = self.shared_input.unsqueeze(0)
        parts = [
            [
                head_projections(proj, attn.norm(x[:, s : s + step]), h).float()
                for proj in (sa.to_k, sa.to_v, sa.to_q)
            ]
            for s in range(0, n, step)
        ]
        self.k, self.v, self.q = (torch.cat([p[i] for p in parts], dim=2) for i in range(3))
        totals = self._stream(None)
        for s in range(0, n, step):
            totals.keys(self.k[:, :, s : s + step], self.v[:, :, s : s + step])
        self.totals = totals
        self.key_max = torch.cat(
            [totals.key_maxima(self.k[:, :, s : s + step])[0] for s in range(0, n, step)]
        )

    def _stream(self, running: Tensor | None) -> FavorStream:
        stream = FavorStream(self.proj, 1, self.k.shape[1], key_max="sample")
        stream.running = running
        return stream

    def matches(self, performer: Performer, shared_input: Tensor) -> bool:
        """Whether this cache holds ``shared_input`` under the first block's current weights."""
        return (
            self.weights == _weights_key(performer.net.layers[0][0])
            and self.shared_input.shape == shared_input.shape
            and torch.equal(self.shared_input, shared_input)
        )

    def sample(self, is_shared: Tensor) -> SharedTokens:
        """Return one sample's tokens equal to the shared input (``is_shared``: ``(seq_len,)``)."""
        if tuple(is_shared.shape) != tuple(self.shared_input.shape[:1]):
            raise ValueError(
                f"is_shared must be (seq_len,) = {tuple(self.shared_input.shape[:1])}, got "
                f"{tuple(is_shared.shape)}."
            )
        return SharedTokens(self, is_shared.bool())

    def add_keys(self, stream: FavorStream, is_shared: Tensor, step: int) -> None:
        """Add the keys of the shared tokens ``is_shared`` ``(seq_len,)`` to ``stream``."""
        if not bool(is_shared.any()):
            return
        top = self.key_max[is_shared].max().reshape(1)
        at = self.totals.running
        new = top if stream.running is None else torch.maximum(stream.running, top)
        if float(at - new) > _MAX_SHARED_GAP:
            self._add_rows(stream, is_shared, step)
            return
        # The sample's own rows, under the totals' stabiliser (no chunk exceeds it).
        replaced = self._stream(at)
        self._add_rows(replaced, ~is_shared, step)
        at = replaced.running
        scale = torch.exp2(self.totals.running - at)
        kv, k_sum, v_sum, count = self.totals.sums()
        kv_own, k_sum_own, v_sum_own, count_own = replaced.sums()
        sums = (
            kv * scale - kv_own,
            k_sum * scale - k_sum_own,
            v_sum - v_sum_own,
            count - count_own,
        )
        stream.add_sums(sums, at=at, top=top)

    def _add_rows(self, stream: FavorStream, rows: Tensor, step: int) -> None:
        """Stream the cached keys and values of the positions ``rows`` (bool) in chunks."""
        index = rows.nonzero()[:, 0]
        for s in range(0, len(index), step):
            chunk = index[s : s + step]
            stream.keys(self.k[:, :, chunk], self.v[:, :, chunk])


class SharedTokens:
    """One sample's shared tokens, as :class:`~scfm_tools.nn.PrecomputedTokens`.

    Parameters
    ----------
    cache
        The shared input's first block.
    is_shared
        ``(seq_len,)`` bool: where the sample's input equals the shared input.
    """

    def __init__(self, cache: SharedFirstBlock, is_shared: Tensor) -> None:
        self.cache = cache
        self.is_shared = is_shared
        self.own = ~is_shared

    def add_keys(self, stream: FavorStream, step: int) -> None:
        """Add the shared tokens' keys and values to ``stream``."""
        self.cache.add_keys(stream, self.is_shared, step)

    def queries(self, start: int, stop: int) -> Tensor:
        """Return the cached queries of tokens ``start:stop`` (a copy)."""
        return self.cache.q[:, :, start:stop].clone()


def shared_first_block(
    cache: SharedFirstBlock | None, performer: Performer, shared_input: Tensor
) -> SharedFirstBlock:
    """Return ``cache`` when it holds ``shared_input`` under the current weights, else a new one."""
    if cache is not None and cache.matches(performer, shared_input):
        return cache
    return SharedFirstBlock(performer, shared_input)


def _weights_key(attn: PreLayerNorm) -> tuple:
    """Identity and version of every tensor the first block's projections read."""
    sa = attn.fn
    tensors = [
        *attn.norm.parameters(),
        *sa.to_q.parameters(),
        *sa.to_k.parameters(),
        *sa.to_v.parameters(),
        sa.fast_attention.projection_matrix,
    ]
    return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
