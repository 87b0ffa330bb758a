"""Opt-in bf16 inference on CPU (``sft.settings.cpu_bf16``): off by default, close to exact, said.

Real CellBench cells and the shipped defaults. Off, the embedding is the exact float32 one; on,
it differs by bf16 rounding only (the cells' neighbours agree) and the result records it.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch

import scfm_tools as sft
from scfm_tools._settings import SftSettings
from scfm_tools.models.base._streaming import autocast


@pytest.fixture(scope="module")
def cells(data_dir):
    adata = ad.read_h5ad(data_dir / "cellbench_3celllines_celseq2_dropseq.h5ad")
    return adata[np.random.default_rng(0).permutation(adata.n_obs)[:60]].copy()


def _embed(cells, model, monkeypatch, bf16: bool):
    monkeypatch.setattr(sft.settings, "_cpu_bf16", bf16)
    out = cells.copy()
    sft.tl.embed_cells(out, model, key_added="e", device="cpu")
    return out.obsm["e"], out.uns["e"]["params"]


def _neighbours(x: np.ndarray, k: int = 5) -> np.ndarray:
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return np.argsort(d, axis=1)[:, :k]


def test_the_setting_is_off_by_default_and_checked():
    s = SftSettings()
    assert s.cpu_bf16 is False and "cpu_bf16=False" in repr(s)
    with pytest.raises(TypeError, match="True or False"):
        s.cpu_bf16 = "yes"
    s.cpu_bf16 = True
    assert s.cpu_bf16 is True


def test_autocast_on_cpu_only_when_asked(monkeypatch):
    cpu = torch.device("cpu")
    a = torch.randn(8, 8)
    with autocast(cpu):
        assert (a @ a).dtype == torch.float32
    monkeypatch.setattr(sft.settings, "_cpu_bf16", True)
    with autocast(cpu):
        assert (a @ a).dtype == torch.bfloat16


@pytest.mark.parametrize("model", ["scbert-default", "scgpt-default"])
def test_bf16_embeddings_are_close_to_exact_and_say_so(cells, model, monkeypatch):
    exact, params = _embed(cells, model, monkeypatch, False)
    low, low_params = _embed(cells, model, monkeypatch, True)
    assert "cpu_bf16" not in params and low_params["cpu_bf16"] is True
    assert low.dtype == exact.dtype == np.float32 and np.isfinite(low).all()
    diff = np.abs(low - exact).max()
    assert 0 < diff < 0.02 * np.abs(exact).max(), diff  # rounded, not another computation
    cosine = (low * exact).sum(1) / np.linalg.norm(low, axis=1) / np.linalg.norm(exact, axis=1)
    assert cosine.min() > 0.999
    same = [
        len(set(a) & set(b)) / 5 for a, b in zip(_neighbours(exact), _neighbours(low), strict=True)
    ]
    assert np.mean(same) > 0.9, np.mean(same)


def test_an_exact_call_after_a_bf16_one_is_still_exact(cells, monkeypatch):
    # scBERT caches float32 first-block projections of the zero genes across calls: building
    # that cache under bf16 must not leave rounded values for a later exact call.
    from scfm_tools.models import SCBERT

    used = SCBERT.from_pretrained("scbert-default")
    _embed(cells[:8], used, monkeypatch, True)
    after, _ = _embed(cells[:8], used, monkeypatch, False)
    fresh, _ = _embed(cells[:8], SCBERT.from_pretrained("scbert-default"), monkeypatch, False)
    np.testing.assert_allclose(after, fresh, rtol=1e-5, atol=1e-6)
