"""The shared Performer (FAVOR+ attention, pre-LayerNorm blocks) of scBERT and scFoundation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from scfm_tools.nn import FastAttention, Performer, favor_attention
from scfm_tools.nn._performer import (
    default_nb_features,
    gaussian_orthogonal_random_matrix,
    head_projections,
    linear_attention,
    softmax_kernel,
)


def _qkv(b=3, h=2, n=37, d=8, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return tuple(scale * torch.randn(b, h, n, d, generator=g) for _ in range(3))


def _reference(q, k, v, proj, key_max):
    """The official formulas, all at once (performer_pytorch softmax_kernel + linear_attention)."""
    return linear_attention(
        softmax_kernel(q, proj, is_query=True),
        softmax_kernel(k, proj, is_query=False, key_max=key_max),
        v,
    )


@pytest.mark.parametrize("key_max", ["batch", "sample"])
@pytest.mark.parametrize("chunk_size", [1, 5, 16, 37, 1000, None])
def test_chunked_equals_unchunked(key_max, chunk_size):
    # keys with a large spread, so that the running maximum grows across chunks
    q, k, v = _qkv()
    k = k * torch.linspace(0.2, 3.0, k.shape[2])[None, None, :, None]
    proj = gaussian_orthogonal_random_matrix(20, 8, generator=torch.Generator().manual_seed(1))
    expected = _reference(q, k, v, proj, key_max)
    with torch.inference_mode():
        got = favor_attention(q, k, v, proj, key_max=key_max, chunk_size=chunk_size)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("m", [3, 20])
def test_padded_features_keep_negative_maxima(m):
    # Every projection negative: the stabilisers are then negative too, and features added
    # only to round m up for speed must not raise them (a zero feature would, and the 1e-4
    # floor would then weigh more). m = 3 is smaller than the padding itself.
    q, k, v = _qkv(d=4, seed=7)
    q, k = q.abs() + 0.5, k.abs() + 0.5
    proj = -gaussian_orthogonal_random_matrix(
        m, 4, generator=torch.Generator().manual_seed(8)
    ).abs()
    for key_max in ("batch", "sample"):
        expected = _reference(q, k, v, proj, key_max)
        with torch.inference_mode():
            got = favor_attention(q, k, v, proj, key_max=key_max, chunk_size=6)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_chunked_gradients_equal_reference():
    q, k, v = (t.requires_grad_() for t in _qkv(n=23))
    proj = gaussian_orthogonal_random_matrix(16, 8, generator=torch.Generator().manual_seed(2))
    weights = torch.randn(3, 2, 23, 8, generator=torch.Generator().manual_seed(3))
    (_reference(q, k, v, proj, "sample") * weights).sum().backward()
    expected = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    (favor_attention(q, k, v, proj, key_max="sample", chunk_size=4) * weights).sum().backward()
    for got, exp in zip((q.grad, k.grad, v.grad), expected, strict=True):
        torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-4)


def test_sample_key_max_makes_samples_independent():
    q, k, v = _qkv(b=4)
    proj = gaussian_orthogonal_random_matrix(16, 8, generator=torch.Generator().manual_seed(4))
    together = favor_attention(q, k, v, proj, key_max="sample")
    alone = torch.cat(
        [favor_attention(q[i : i + 1], k[i : i + 1], v[i : i + 1], proj) for i in range(4)]
    )
    # one sample alone: "batch" and "sample" are the same computation
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=1e-6)
    # while the whole-batch maximum does couple the samples (through the 1e-4 floor)
    coupled = favor_attention(q, k, v, proj, key_max="batch")
    assert (coupled - together).abs().max() > 1e-7


def test_favor_approximates_softmax_attention():
    # A sanity property of the estimator: with many random features it is close to
    # softmax(QK^T / sqrt(d)) V; with few it is not as close.
    q, k, v = _qkv(b=1, h=2, n=24, d=8, seed=5, scale=0.5)
    exact = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), dim=-1) @ v
    errors = {}
    for m in (8, 8192):
        proj = gaussian_orthogonal_random_matrix(m, 8, generator=torch.Generator().manual_seed(6))
        approx = favor_attention(q, k, v, proj, key_max="sample")
        errors[m] = ((approx - exact).norm() / exact.norm()).item()
    assert errors[8192] < 0.05
    assert errors[8192] < errors[8]


def test_orthogonal_features():
    g = torch.Generator().manual_seed(0)
    w = gaussian_orthogonal_random_matrix(20, 8, generator=g)
    assert w.shape == (20, 8)
    unit = w / w.norm(dim=1, keepdim=True)
    # rows within each block of 8 are orthogonal
    for start in (0, 8):
        gram = unit[start : start + 8] @ unit[start : start + 8].T
        torch.testing.assert_close(gram, torch.eye(8), atol=1e-5, rtol=0)
    fixed = gaussian_orthogonal_random_matrix(20, 8, scaling=1, generator=g)
    torch.testing.assert_close(fixed.norm(dim=1), torch.full((20,), math.sqrt(8)))
    assert default_nb_features(64) == 266


def test_bad_arguments():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="key_max must be one of"):
        favor_attention(q, k, v, torch.randn(4, 8), key_max="all")
    with pytest.raises(ValueError, match="projection_matrix has 5 columns"):
        favor_attention(q, k, v, torch.randn(4, 5))
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        favor_attention(q, k, v, torch.randn(4, 8), chunk_size=0)
    with pytest.raises(ValueError, match="feature_redraw_interval"):
        Performer(8, 1, 2, 4, feature_redraw_interval=0)


def _published_keys(meta_path, prefix):
    meta = json.loads(meta_path.read_text())
    return {
        k[len(prefix) :]: tuple(v) for k, v in meta["state_dict"].items() if k.startswith(prefix)
    }


@pytest.mark.parametrize(
    ("family", "prefix", "kwargs"),
    [
        ("scbert", "performer.", {"dim": 200, "depth": 6, "heads": 10, "qkv_bias": False}),
        (
            "scfoundation",
            "decoder.performer.",
            {"dim": 512, "depth": 6, "heads": 8, "qkv_bias": True},
        ),
    ],
)
def test_official_key_names_and_shapes(fixtures_dir, family, prefix, kwargs):
    expected = _published_keys(fixtures_dir / family / "published_model_meta.json", prefix)
    with torch.device("meta"):
        performer = Performer(
            kwargs["dim"], kwargs["depth"], kwargs["heads"], 64, qkv_bias=kwargs["qkv_bias"]
        )
    got = {k: tuple(v.shape) for k, v in performer.state_dict().items()}
    assert got == expected


def test_official_state_dicts_load_strictly(fixtures_dir):
    # scBERT fixture: dim 16, 2 blocks, 2 heads of 8, no q/k/v bias
    sd = torch.load(fixtures_dir / "scbert" / "fixture_ckpt.pth", weights_only=True)
    sd = {k[10:]: v for k, v in sd["model_state_dict"].items() if k.startswith("performer.")}
    proj = sd["net.layers.0.0.fn.fast_attention.projection_matrix"]
    dim, heads = sd["net.layers.0.0.norm.weight"].shape[0], sd["net.layers.0.0.fn.to_q.weight"]
    performer = Performer(
        dim, 2, heads.shape[0] // proj.shape[1], proj.shape[1], nb_features=proj.shape[0]
    )
    performer.load_state_dict(sd, strict=True)
    torch.testing.assert_close(
        performer.net.layers[1][0].fn.fast_attention.projection_matrix,
        sd["net.layers.1.0.fn.fast_attention.projection_matrix"],
    )
    # scFoundation fixture decoder: q/k/v biases
    ck = torch.load(fixtures_dir / "scfoundation" / "fixture_models.ckpt", weights_only=True)
    pre = "model.decoder.performer."
    sd = {k[len(pre) :]: v for k, v in ck["gene"]["state_dict"].items() if k.startswith(pre)}
    proj = sd["net.layers.0.0.fn.fast_attention.projection_matrix"]
    dim = sd["net.layers.0.0.norm.weight"].shape[0]
    inner = sd["net.layers.0.0.fn.to_q.weight"].shape[0]
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("net.layers."))
    performer = Performer(
        dim, depth, inner // proj.shape[1], proj.shape[1], nb_features=proj.shape[0], qkv_bias=True
    )
    performer.load_state_dict(sd, strict=True)
    # the q/k/v biases are what tells the two configurations apart
    no_bias = Performer(
        dim, depth, inner // proj.shape[1], proj.shape[1], nb_features=proj.shape[0], qkv_bias=False
    )
    with pytest.raises(RuntimeError, match=r"Unexpected key.*to_q\.bias"):
        no_bias.load_state_dict(sd, strict=True)


@pytest.mark.conformance
def test_reproduces_scbert_fixture_encodings(fixtures_dir):
    folder = fixtures_dir / "scbert"
    meta = json.loads((folder / "fixture_meta.json").read_text())
    io = np.load(folder / "fixture_io.npz")
    sd = torch.load(folder / "fixture_ckpt.pth", weights_only=True)["model_state_dict"]
    psd = {k[10:]: v for k, v in sd.items() if k.startswith("performer.")}
    proj = psd["net.layers.0.0.fn.fast_attention.projection_matrix"]
    depth = 1 + max(int(k.split(".")[2]) for k in psd if k.startswith("net.layers."))
    dim = sd["token_emb.weight"].shape[1]
    heads = psd["net.layers.0.0.fn.to_q.weight"].shape[0] // proj.shape[1]
    performer = Performer(
        dim, depth, heads, proj.shape[1], nb_features=proj.shape[0], key_max="batch"
    ).eval()
    performer.load_state_dict(psd, strict=True)
    x = torch.from_numpy(io["embedding_input"]).float()
    tol = meta["tolerance"]
    for chunk_size in (None, 3):
        performer.chunk_size = chunk_size
        with torch.inference_mode():
            h = torch.nn.functional.layer_norm(
                performer(x), (dim,), sd["norm.weight"], sd["norm.bias"]
            )
        np.testing.assert_allclose(h.numpy(), io["encodings"], atol=tol["atol"], rtol=tol["rtol"])
        logits = h @ sd["to_out.weight"].T + sd["to_out.bias"]
        np.testing.assert_allclose(logits.numpy(), io["logits"], atol=tol["atol"], rtol=tol["rtol"])


def test_feature_redraw_only_when_training_and_asked():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    performer = Performer(8, 2, 2, 4, feature_redraw_interval=2)
    first = [a.projection_matrix.clone() for a in performer.fast_attentions()]
    performer.eval()
    for _ in range(5):
        performer(x)
    assert int(performer.calls_since_last_redraw) == 0
    assert all(
        torch.equal(a.projection_matrix, f)
        for a, f in zip(performer.fast_attentions(), first, strict=True)
    )
    performer.train()
    performer(x)
    performer(x)
    assert int(performer.calls_since_last_redraw) == 2
    performer(x)  # the third training step finds the count at the interval: redraw
    assert int(performer.calls_since_last_redraw) == 0
    assert not any(
        torch.equal(a.projection_matrix, f)
        for a, f in zip(performer.fast_attentions(), first, strict=True)
    )
    # without an interval, training never redraws
    fixed = Performer(8, 1, 2, 4).train()
    before = fixed.fast_attentions()[0].projection_matrix.clone()
    for _ in range(3):
        fixed(x)
    assert torch.equal(fixed.fast_attentions()[0].projection_matrix, before)
    # seeded redraws are reproducible
    a, b = FastAttention(4, 6), FastAttention(4, 6)
    a.redraw_projection_matrix(torch.Generator().manual_seed(9))
    b.redraw_projection_matrix(torch.Generator().manual_seed(9))
    assert torch.equal(a.projection_matrix, b.projection_matrix)


def test_feed_forward_chunks_do_not_change_results():
    torch.manual_seed(1)
    performer = Performer(8, 2, 2, 4).eval()
    x = torch.randn(2, 50, 8)
    with torch.inference_mode():
        whole = performer(x)
        performer.chunk_size = 7
        chunked = performer(x)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("key_max", ["batch", "sample"])
@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 7])
def test_streamed_inference_equals_blockwise_path(key_max, qkv_bias, chunk_size):
    # Inference streams each block over chunks; with autograd on, the same eval-mode model runs
    # block by block (attention over the whole sequence, then the feed-forward).
    torch.manual_seed(2)
    performer = Performer(
        12, 2, 3, 4, qkv_bias=qkv_bias, key_max=key_max, chunk_size=chunk_size
    ).eval()
    # growing token scales, so that the key stabiliser changes across chunks
    x = torch.randn(3, 40, 12) * torch.linspace(0.3, 4.0, 40)[None, :, None]
    with torch.enable_grad():
        blockwise = performer(x)
    with torch.inference_mode():
        streamed = performer(x)
    torch.testing.assert_close(streamed, blockwise.detach(), atol=1e-5, rtol=1e-5)
    # and it is not the identity or a no-op on the input
    assert (streamed - x).abs().max() > 0.1


class _FromInput:
    """:class:`PrecomputedTokens` of a sample, projected from the sample's own input.

    ``shift`` perturbs the keys handed over, to show that the block reads them.
    """

    def __init__(self, performer, x, own, shift=0.0):
        attn = performer.net.layers[0][0]
        sa = attn.fn
        xn = attn.norm(x.unsqueeze(0))
        self.k, self.v, self.q = (
            head_projections(proj, xn, sa.heads).float() for proj in (sa.to_k, sa.to_v, sa.to_q)
        )
        self.k = self.k + shift
        self.own = own
        self.calls = 0

    def add_keys(self, stream, step):
        self.calls += 1
        index = (~self.own).nonzero()[:, 0]
        for s in range(0, len(index), step):
            stream.keys(self.k[:, :, index[s : s + step]], self.v[:, :, index[s : s + step]])

    def queries(self, start, stop):
        return self.q[:, :, start:stop].clone()


def _inputs(b, n=45, dim=12, frac=0.85, seed=3):
    """Inputs with growing token scales, and which tokens each sample projects itself."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, dim, generator=g) * torch.linspace(0.3, 4.0, n)[:, None]
    return x, torch.rand(b, n, generator=g) >= frac


@pytest.mark.parametrize("key_max", ["batch", "sample"])
@pytest.mark.parametrize("frac", [0.0, 0.5, 0.85, 1.0])
@pytest.mark.parametrize("b", [1, 3])
def test_first_block_from_precomputed_tokens_equals_plain_path(key_max, frac, b):
    torch.manual_seed(4)
    performer = Performer(12, 2, 3, 4, qkv_bias=True, key_max=key_max, chunk_size=7).eval()
    x, own = _inputs(b, frac=frac)
    with torch.inference_mode():
        first = [_FromInput(performer, x[i], own[i]) for i in range(b)]
        plain = performer(x)
        torch.testing.assert_close(performer(x, first_block=first), plain, atol=1e-5, rtol=1e-5)
        used = performer.uses_first_block(x)
    assert used == (key_max == "sample" or b == 1)
    assert [f.calls for f in first] == [int(used)] * b


def test_first_block_is_read_where_used():
    # Keys handed over that differ from the block's own change the output: the hook is used.
    torch.manual_seed(5)
    performer = Performer(12, 2, 3, 4).eval()
    x, own = _inputs(2, frac=0.5)
    with torch.inference_mode():
        off = [_FromInput(performer, x[i], own[i], shift=1.0) for i in range(2)]
        assert (performer(x, first_block=off) - performer(x)).abs().max() > 1e-3


def test_uses_first_block_only_where_forward_does():
    performer = Performer(12, 1, 3, 4).eval()
    one, two = torch.randn(1, 9, 12), torch.randn(2, 9, 12)
    with torch.no_grad():
        assert performer.uses_first_block(one) and performer.uses_first_block(two)
        performer.key_max = "batch"  # a batch then runs as one pass
        assert performer.uses_first_block(one) and not performer.uses_first_block(two)
        performer.key_max = "sample"
        performer.train()
        assert not performer.uses_first_block(one)
        performer.eval()
    assert not performer.uses_first_block(one)  # autograd on: the plain path
    # where it is not used, a wrong hook changes nothing
    with torch.enable_grad():
        off = [_FromInput(performer, one[0], torch.zeros(9, dtype=torch.bool), shift=1.0)]
        torch.testing.assert_close(performer(one, first_block=off), performer(one))
        assert off[0].calls == 0


def test_first_block_arguments_are_checked():
    performer = Performer(12, 1, 3, 4).eval()
    x, own = _inputs(2)
    with torch.no_grad():
        first = [_FromInput(performer, x[i], own[i]) for i in range(2)]
        with pytest.raises(ValueError, match="one entry per sample"):
            performer(x, first_block=first[:1])
        first[1].own = own[1][:-1]
        with pytest.raises(ValueError, match="seq_len"):
            performer(x, first_block=first)
