"""``sft.tl.embed_genes`` with scFoundation, on real PBMCs and the official-code fixture weights.

Token mode is the ``gene`` weights' position-embedding table; context mode is the mean over
cells of the decoder's gene embeddings (official ``output_type="gene"``), checked against
:func:`embed_matrix` run directly, and the same whatever the batch and chunk sizes.
"""

from __future__ import annotations

import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from scipy import sparse

import scfm_tools as sft
from _scfoundation_tiny import add_lognorm_and_totals
from _unchanged import assert_unchanged, snapshot
from scfm_tools._validation import InputError
from scfm_tools.models.scfoundation import embed_matrix, load_scfoundation_checkpoint

PBMC = "pbmc_10x_3chemistries_unlabeled.h5ad"
KEY = "X_scfoundation_genes"


@pytest.fixture(scope="module")
def gene_module(scfoundation_ckpt):
    return load_scfoundation_checkpoint(scfoundation_ckpt, "gene")


@pytest.fixture(scope="module")
def pbmc(data_dir):
    """6 real PBMCs (2 per chemistry), raw counts, gene symbols."""
    adata = ad.read_h5ad(data_dir / PBMC)
    rows = np.concatenate(
        [np.flatnonzero(adata.obs["batch"] == b)[:2] for b in adata.obs["batch"].unique()]
    )
    return adata[rows].copy()


@pytest.fixture(scope="module")
def context(scfoundation_ckpt, pbmc):
    """``pbmc`` with context-mode gene embeddings (default options)."""
    adata = pbmc.copy()
    sft.tl.embed_genes(adata, scfoundation_ckpt, mode="context")
    return adata


def test_token_mode_is_the_gene_weights_position_table(scfoundation_ckpt, gene_module, pbmc):
    module, genes, _, _ = gene_module
    adata = pbmc.copy()
    X_before = adata.X.copy()
    sft.tl.embed_genes(adata, scfoundation_ckpt, mode="token")
    match = sft.pp.match_to_vocab(list(adata.var_names), genes)
    emb = adata.varm[KEY]
    assert emb.shape == (adata.n_vars, module.enc_dim) and emb.dtype == np.float32
    table = module.pos_emb.weight.detach().numpy()
    np.testing.assert_array_equal(emb[match.matched], table[match.index[match.matched]])
    assert np.isnan(emb[~match.matched]).all() and (~match.matched).sum() > 0
    np.testing.assert_array_equal(adata.var["scfoundation_in_vocab"], match.matched)
    # the fixture's "cell" weights differ: token mode reads the "gene" entry
    cell_table = (
        load_scfoundation_checkpoint(scfoundation_ckpt, "cell")[0].pos_emb.weight.detach().numpy()
    )
    assert not np.allclose(emb[match.matched], cell_table[match.index[match.matched]])
    params = adata.uns["scfoundation_genes"]["params"]
    assert params["mode"] == "token" and params["entry"] == "gene"
    assert params["table"] == "pos_emb" and params.get("n_cells") is None
    assert params["n_genes_matched"] == params["n_genes_embedded"] == match.n_matched
    assert "scfoundation_genes_n_cells" not in adata.var
    assert (adata.X != X_before).nnz == 0


def test_token_mode_reads_no_values(scfoundation_ckpt, pbmc):
    adata = pbmc[:2].copy()
    sft.tl.embed_genes(adata, scfoundation_ckpt, mode="token")
    lognorm = adata.copy()
    sc.pp.normalize_total(lognorm)
    sc.pp.log1p(lognorm)  # not counts: context mode with pre_normalized="F" would refuse it
    sft.tl.embed_genes(lognorm, scfoundation_ckpt, mode="token")
    np.testing.assert_array_equal(lognorm.varm[KEY], adata.varm[KEY])


def test_context_mode_is_the_mean_decoder_output(context, gene_module, pbmc):
    module, genes, _, _ = gene_module
    match = sft.pp.match_to_vocab(list(pbmc.var_names), genes)
    per_cell = embed_matrix(module, pbmc.X, match, output="gene")  # (cells, n_genes, dec_dim)
    assert per_cell.shape == (pbmc.n_obs, module.n_genes, module.dec_dim)
    expected = per_cell.mean(axis=0)[match.index[match.matched]]
    emb = context.varm[KEY]
    assert emb.shape == (pbmc.n_vars, module.dec_dim)
    np.testing.assert_allclose(emb[match.matched], expected, atol=1e-5, rtol=1e-5)
    assert np.isnan(emb[~match.matched]).all()
    # n_cells: the cells expressing the gene; 0 outside the model's genes
    n_cells = context.var["scfoundation_genes_n_cells"].to_numpy()
    expressed = np.asarray((pbmc.X > 0).sum(axis=0)).ravel()
    np.testing.assert_array_equal(n_cells[match.matched], expressed[match.matched])
    assert (n_cells[~match.matched] == 0).all()
    # the decoder reads every gene of every cell: unexpressed genes are embedded too, and
    # differently from each other (their position embeddings differ)
    silent = match.matched & (n_cells == 0)
    assert silent.sum() > 100 and np.isfinite(emb[silent]).all()
    assert np.unique(emb[silent][:, 0]).size > 0.9 * silent.sum()
    params = context.uns["scfoundation_genes"]["params"]
    assert params["mode"] == "context" and params["entry"] == "gene"
    assert params["n_cells"] == pbmc.n_obs and params["target_depth"] == "t4"
    assert params["pre_normalized"] == "F" and params["input_type"] == "singlecell"
    assert params["n_genes_embedded"] == match.n_matched and params["batch_size"] == 64


def test_context_mode_does_not_depend_on_batches(context, scfoundation_ckpt, pbmc):
    adata = pbmc.copy()
    # 2 cells per pass and chunks of 4 and 2 cells, against 6 cells in one chunk and pass
    sft.tl.embed_genes(adata, scfoundation_ckpt, mode="context", batch_size=2, chunk_size=4)
    np.testing.assert_allclose(adata.varm[KEY], context.varm[KEY], atol=1e-6, rtol=1e-5)
    np.testing.assert_array_equal(
        adata.var["scfoundation_genes_n_cells"], context.var["scfoundation_genes_n_cells"]
    )


def test_context_mode_preprocessing_options(context, scfoundation_ckpt, pbmc):
    genes = load_scfoundation_checkpoint(scfoundation_ckpt, "gene")[1]
    match = sft.pp.match_to_vocab(list(pbmc.var_names), genes)
    # the model's genes only, so that the totals are those the "F" path normalises by
    adata = pbmc[:, match.matched].copy()
    sft.tl.embed_genes(adata, scfoundation_ckpt, mode="context")
    # log-normalised values with each cell's total count ("A") equal the counts ("F") path
    add_lognorm_and_totals(adata)
    sft.tl.embed_genes(
        adata,
        scfoundation_ckpt,
        mode="context",
        layer="lognorm",
        pre_normalized="A",
        total_counts_key="total_counts",
        key_added="a",
    )
    np.testing.assert_allclose(adata.varm["a"], adata.varm[KEY], atol=1e-5, rtol=1e-4)
    assert adata.uns["a"]["params"]["total_counts_key"] == "total_counts"
    # the target depth is the T token, which the decoder reads
    sft.tl.embed_genes(adata, scfoundation_ckpt, mode="context", target_depth="t6", key_added="t6")
    # (one token among ~19k moves the fixture's tiny decoder little: ~2e-4, against ~5e-7 of
    # float noise between the "A" and "F" paths above)
    assert np.abs(adata.varm["t6"] - adata.varm[KEY]).max() > 2e-5
    assert adata.uns["t6"]["params"]["target_depth"] == "t6"


def test_copy_returns_the_embedded_copy(context, scfoundation_ckpt, pbmc):
    adata = pbmc.copy()
    snap = snapshot(adata)
    out = sft.tl.embed_genes(adata, scfoundation_ckpt, mode="context", copy=True)
    assert_unchanged(adata, snap)
    np.testing.assert_array_equal(out.varm[KEY], context.varm[KEY])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"mode": "cell"}, ValueError, "mode must be 'token' or 'context'"),
        ({"mode": "context", "max_length": 100}, ValueError, "max_length does not apply"),
        ({"mode": "token", "target_depth": "x4"}, ValueError, "target_depth"),
        ({"mode": "context", "pre_normalized": "A"}, ValueError, "total_counts_key"),
        ({"mode": "context", "key_max": "batch"}, TypeError, "do not take"),
    ],
)
def test_bad_options(scfoundation_ckpt, pbmc, kwargs, error, match):
    adata = pbmc[:2].copy()
    snap = snapshot(adata)
    with pytest.raises(error, match=match):
        sft.tl.embed_genes(adata, scfoundation_ckpt, **kwargs)
    assert_unchanged(adata, snap)


def test_context_mode_refuses_non_counts(scfoundation_ckpt, pbmc):
    adata = pbmc[:2].copy()
    adata.X = adata.X.astype(np.float32)
    adata.X.data = np.log1p(adata.X.data * 1.37)
    snap = snapshot(adata)
    with pytest.raises(InputError, match="non-integer values"):
        sft.tl.embed_genes(adata, scfoundation_ckpt, mode="context")  # pre_normalized="F"
    assert_unchanged(adata, snap)


def test_context_mode_refuses_a_cell_without_model_genes(scfoundation_ckpt, pbmc):
    # cell 1 has counts only in a gene outside the model's list
    X = np.hstack([pbmc.X[:2].toarray(), np.array([[0], [5]])]).astype(np.float32)
    X[1, :-1] = 0
    adata = ad.AnnData(
        sparse.csr_matrix(X),
        obs=pbmc.obs.iloc[:2].copy(),
        var=pd.DataFrame(index=[*pbmc.var_names, "NOTAGENE"]),
    )
    snap = snapshot(adata)
    named = re.escape(f"['{adata.obs_names[1]}']) express none of the scFoundation model's genes")
    with pytest.raises(InputError, match=named):
        sft.tl.embed_genes(adata, scfoundation_ckpt, mode="context")
    assert_unchanged(adata, snap)
