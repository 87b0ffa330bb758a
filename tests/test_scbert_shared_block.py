"""scBERT's first-block cache of the input shared by every cell (its zero-expression genes)."""

from __future__ import annotations

import math

import pytest
import torch

import scfm_tools.models.scbert._shared_block as shared_block
from scfm_tools.models.scbert._shared_block import SharedFirstBlock, shared_first_block
from scfm_tools.nn import Performer


def _with_shared_rows(b, n=45, dim=12, frac=0.85, seed=3):
    """Inputs equal to a shared ``(n, dim)`` input where ``is_shared``, random elsewhere."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(n, dim, generator=g) * torch.linspace(0.3, 4.0, n)[:, None]
    is_shared = torch.rand(b, n, generator=g) < frac
    x = torch.where(is_shared[..., None], shared, torch.randn(b, n, dim, generator=g))
    return x, shared, is_shared


def _assert_reuse_is_exact(performer, cache, x, is_shared):
    """The cached first block gives the plain path's output (inference mode)."""
    with torch.inference_mode():
        first = [cache.sample(row) for row in is_shared]
        torch.testing.assert_close(
            performer(x, first_block=first), performer(x), atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("key_max", ["batch", "sample"])
@pytest.mark.parametrize("frac", [0.0, 0.5, 0.85, 1.0])
@pytest.mark.parametrize("b", [1, 3])
def test_shared_first_block_is_exact(key_max, frac, b):
    torch.manual_seed(4)
    performer = Performer(12, 2, 3, 4, qkv_bias=True, key_max=key_max, chunk_size=7).eval()
    x, shared, is_shared = _with_shared_rows(b, frac=frac)
    with torch.inference_mode():
        cache = SharedFirstBlock(performer, shared)
    _assert_reuse_is_exact(performer, cache, x, is_shared)
    _assert_reuse_is_exact(performer, cache, x, is_shared)  # a cache is read many times


def test_fallback_when_cached_stabiliser_is_far(monkeypatch):
    # A negative limit sends every sample through the fallback (streaming the cached keys).
    monkeypatch.setattr(shared_block, "_MAX_SHARED_GAP", -math.inf)
    torch.manual_seed(5)
    performer = Performer(12, 2, 3, 4, chunk_size=6).eval()
    x, shared, is_shared = _with_shared_rows(2)
    with torch.inference_mode():
        cache = SharedFirstBlock(performer, shared)
    _assert_reuse_is_exact(performer, cache, x, is_shared)


def test_cache_follows_weights_and_input():
    torch.manual_seed(6)
    performer = Performer(12, 2, 3, 4).eval()
    x, shared, is_shared = _with_shared_rows(1)
    with torch.inference_mode():
        cache = shared_first_block(None, performer, shared)
        assert shared_first_block(cache, performer, shared) is cache
    with torch.no_grad():
        performer.net.layers[0][0].fn.to_k.weight.mul_(1.5)
        performer.net.layers[0][0].norm.bias.add_(0.3)
    with torch.inference_mode():
        assert not cache.matches(performer, shared)
        cache = shared_first_block(cache, performer, shared)
        assert cache.matches(performer, shared)
    _assert_reuse_is_exact(performer, cache, x, is_shared)
    shared2 = shared.flip(0)
    x2 = torch.where(is_shared[..., None], shared2, x)
    with torch.inference_mode():
        assert not cache.matches(performer, shared2)
        cache = shared_first_block(cache, performer, shared2)
    _assert_reuse_is_exact(performer, cache, x2, is_shared)


def test_stale_cache_gives_other_results():
    # The check above matters: a cache of other weights would silently change the encodings.
    torch.manual_seed(7)
    performer = Performer(12, 2, 3, 4).eval()
    x, shared, is_shared = _with_shared_rows(1, frac=0.5)
    with torch.inference_mode():
        stale = SharedFirstBlock(performer, shared)
    with torch.no_grad():
        performer.net.layers[0][0].fn.to_q.weight.mul_(2.0)
    with torch.inference_mode():
        first = [stale.sample(is_shared[0])]
        assert (performer(x, first_block=first) - performer(x)).abs().max() > 1e-3


def test_sample_mask_is_checked():
    performer = Performer(12, 1, 3, 4).eval()
    _, shared, is_shared = _with_shared_rows(1)
    with torch.inference_mode():
        cache = SharedFirstBlock(performer, shared)
    with pytest.raises(ValueError, match="seq_len"):
        cache.sample(is_shared[0][:-1])
