"""``sft.tl.impute`` with scFoundation (read-depth enhancement) on real PBMCs.

A tiny random-weight checkpoint in the official layout stands in for the published one (its
predictions are meaningless, their shape, placement and bookkeeping are not); the equality with
the official ``gene_expression`` output is in test_scfoundation_conformance.py.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

import scfm_tools as sft
from _scfoundation_tiny import tiny_checkpoint
from scfm_tools.models.scfoundation import read_gene_index

PBMC = "pbmc_10x_3chemistries_unlabeled.h5ad"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("scfoundation_tiny"), seed=1)


@pytest.fixture(scope="module")
def cells(data_dir):
    """12 real PBMCs (4 per chemistry), raw counts, 11,221 gene symbols."""
    adata = ad.read_h5ad(data_dir / PBMC)
    rows = np.concatenate(
        [np.flatnonzero(adata.obs["batch"] == b)[:4] for b in adata.obs["batch"].unique()]
    )
    return adata[rows].copy()


def test_impute_writes_the_layer(ckpt, cells):
    adata = cells.copy()
    X_before = adata.X.copy()
    sft.tl.impute(adata, ckpt, target_depth="t4")
    out = adata.layers["scfoundation_imputed"]
    assert out.shape == adata.shape and out.dtype == np.float32
    # genes outside the model's list are NaN, the others predicted, never negative
    match = sft.pp.match_to_vocab(list(adata.var_names), read_gene_index())
    assert np.isnan(out[:, ~match.matched]).all()
    known = out[:, match.matched]
    assert np.isfinite(known).all() and (known >= 0).all()
    assert match.n_matched > 0.8 * adata.n_vars
    # a gene's prediction differs between cells (each cell is encoded from its own profile)
    assert (known.std(axis=0) > 0).mean() > 0.5
    params = adata.uns["scfoundation_imputed"]["params"]
    assert params["family"] == "scfoundation" and params["model"] == ckpt.name
    assert params["target_depth"] == "t4" and params["entry"] == "gene"
    assert params["n_genes_matched"] == match.n_matched and params["clip_negative"] is True
    assert len(params["weights_sha256"]) == 64
    assert (adata.X != X_before).nnz == 0


def test_target_depth_is_the_t_token(ckpt, cells):
    adata = cells[:2].copy()
    sft.tl.impute(adata, ckpt, target_depth="t4", key_added="t4", clip_negative=False)
    sft.tl.impute(adata, ckpt, target_depth=1e4, key_added="count", clip_negative=False)
    sft.tl.impute(adata, ckpt, target_depth="t6", key_added="t6", clip_negative=False)
    np.testing.assert_array_equal(adata.layers["count"], adata.layers["t4"])
    assert adata.uns["count"]["params"]["target_depth"] == "t4"
    known = ~np.isnan(adata.layers["t4"])
    assert not np.allclose(adata.layers["t6"][known], adata.layers["t4"][known])
    # "aX" adds X to each cell's own log10 depth: "a0" predicts at the observed depth
    totals = np.asarray(adata.X.sum(axis=1)).ravel()
    sft.tl.impute(adata, ckpt, target_depth="a0", key_added="a0", clip_negative=False)
    sft.tl.impute(adata, ckpt, target_depth="f1", key_added="f1", clip_negative=False)
    np.testing.assert_allclose(adata.layers["a0"], adata.layers["f1"], atol=1e-6)
    assert not np.allclose(adata.layers["a0"][known], adata.layers["t4"][known])
    assert totals.min() > 0


def test_impute_downsampled_cells(ckpt, cells):
    adata = cells.copy()
    sft.pp.downsample_rda(adata, rate=0.25, min_counts=0, random_state=0)
    # four times fewer counts: ask for the original depth back
    sft.tl.impute(adata, ckpt, layer="rda_counts", target_depth="f4")
    out = adata.layers["scfoundation_imputed"]
    assert out.shape == adata.shape
    assert (out[~np.isnan(out)] >= 0).all()
    assert adata.uns["scfoundation_imputed"]["params"]["layer"] == "rda_counts"


def test_impute_copy_and_options(ckpt, cells):
    adata = cells[:3].copy()
    result = sft.tl.impute(adata, ckpt, copy=True, batch_size=2, entry="rde")
    assert "scfoundation_imputed" not in adata.layers
    assert result.layers["scfoundation_imputed"].shape == adata.shape
    assert result.uns["scfoundation_imputed"]["params"]["entry"] == "rde"
    for bad, error in (
        ({"target_depth": "q4"}, ValueError),
        ({"entry": "cell"}, ValueError),
        ({"pool": "all"}, TypeError),
        ({"max_length": 10}, TypeError),
    ):
        with pytest.raises(error):
            sft.tl.impute(adata, ckpt, **bad)
    assert "scfoundation_imputed" not in adata.layers and "scfoundation_imputed" not in adata.uns
