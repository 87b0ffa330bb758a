"""scFoundation module, preprocessing and input checks, on real cells.

Batch independence: a cell's outputs do not depend on the cells it is batched with (the encoder
pads and masks cells of different lengths, the decoder's FAVOR+ stabiliser is per cell). Bad
inputs give clear errors and leave the AnnData unchanged.
"""

from __future__ import annotations

import re
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse

import scfm_tools as sft
from _scfoundation_tiny import add_lognorm_and_totals, tiny_checkpoint, tiny_module
from _unchanged import assert_unchanged, snapshot
from scfm_tools._validation import InputError
from scfm_tools.models.scfoundation import (
    AutoDiscretizationEmbedding,
    embed_matrix,
    gather_tokens,
    load_scfoundation_checkpoint,
    model_values,
    parse_target_depth,
    read_gene_index,
    read_scfoundation_entry,
)

PBMC = "pbmc_10x_3chemistries_unlabeled.h5ad"


@pytest.fixture(scope="module")
def pbmc(data_dir):
    """24 real PBMCs (8 per chemistry), raw counts, gene symbols."""
    adata = ad.read_h5ad(data_dir / PBMC)
    rows = np.concatenate(
        [np.flatnonzero(adata.obs["batch"] == b)[:8] for b in adata.obs["batch"].unique()]
    )
    return adata[rows].copy()


# batch independence ------------------------------------------------------------------------------
def test_cell_embedding_does_not_depend_on_the_batch(scfoundation_ckpt, pbmc):
    module, genes, _, _ = load_scfoundation_checkpoint(scfoundation_ckpt, "cell")
    X = pbmc.X[np.r_[0:4, 8:12, 16:20]]  # four cells per chemistry
    match = sft.pp.match_to_vocab(list(pbmc.var_names), genes)
    lengths = np.diff(X.indptr)
    assert lengths.min() * 2 < lengths.max()  # the batches really mix cells of unlike lengths
    together = embed_matrix(module, X, match, batch_size=8)
    alone = np.concatenate([embed_matrix(module, X[i : i + 1], match) for i in range(X.shape[0])])
    assert together.shape == (X.shape[0], 4 * module.enc_dim)
    np.testing.assert_allclose(together, alone, atol=1e-5, rtol=1e-4)
    # reversed order, other batch and chunk sizes: the same rows
    rev = embed_matrix(module, X[::-1], match, batch_size=5, chunk_size=7)
    np.testing.assert_allclose(rev[::-1], together, atol=1e-5, rtol=1e-4)


def test_gene_expression_does_not_depend_on_the_batch(scfoundation_ckpt, pbmc):
    module, genes, _, _ = load_scfoundation_checkpoint(scfoundation_ckpt, "gene")
    X = pbmc.X[[0, 8, 16]]  # one cell per chemistry
    match = sft.pp.match_to_vocab(list(pbmc.var_names), genes)
    kw = {"output": "gene_expression"}
    together = embed_matrix(module, X, match, batch_size=3, **kw)
    alone = np.concatenate([embed_matrix(module, X[i : i + 1], match, **kw) for i in range(3)])
    assert together.shape == (3, module.n_genes)
    np.testing.assert_allclose(together, alone, atol=1e-5, rtol=1e-4)
    # with a batch-wide FAVOR+ stabiliser (official forward on a batch) cells would interact
    module.decoder.performer.key_max = "batch"
    shared = embed_matrix(module, X, match, batch_size=3, **kw)
    assert not np.array_equal(shared, together)


def test_gather_tokens_matches_a_loop():
    rng = np.random.default_rng(0)
    values = torch.from_numpy(rng.random((5, 30)).astype(np.float32))
    values[values < 0.6] = 0
    gathered, positions, padding = gather_tokens(values, values > 0, pad_value=103, pad_position=30)
    for i in range(5):
        idx = torch.nonzero(values[i] > 0).ravel()
        n = len(idx)
        assert padding[i].tolist() == [False] * n + [True] * (gathered.shape[1] - n)
        assert positions[i, :n].tolist() == idx.tolist()
        assert torch.equal(gathered[i, :n], values[i, idx])
        assert (gathered[i, n:] == 103).all() and (positions[i, n:] == 30).all()


def test_classifier_reads_each_cells_most_expressed_genes():
    module = tiny_module(n_classes=2, classifier_max_genes=3).eval()
    n = module.n_genes
    values = torch.zeros(2, n + 2)
    values[0, [5, 9, 40, 41, 700]] = torch.tensor([1.0, 4.0, 2.0, 2.0, 0.5])
    values[1, [3, 8]] = torch.tensor([1.0, 1.0])  # fewer genes than the cap: all read
    values[:, n:] = torch.tensor([3.0, 3.5])  # T and S are always read
    keep = module._most_expressed(values, values > 0, 3)
    # cell 0: 9, then the tie 40/41 (both kept, the cap is 3); cell 1: both genes
    assert torch.nonzero(keep[0]).ravel().tolist() == [9, 40, 41, n, n + 1]
    assert torch.nonzero(keep[1]).ravel().tolist() == [3, 8, n, n + 1]
    values[0, 41] = 3.0
    values[0, 40] = 2.0
    values[0, 5] = 2.0  # a tie at the cap: the first in gene order wins
    keep = module._most_expressed(values, values > 0, 3)
    assert torch.nonzero(keep[0]).ravel().tolist() == [5, 9, 41, n, n + 1]
    # the head's probabilities see only the capped genes: a dropped gene changes nothing
    values[0, 700] = 0.9
    before = module.class_probabilities(values)
    values[0, 700] = 0.1
    torch.testing.assert_close(module.class_probabilities(values), before)
    with pytest.raises(ValueError, match="classifier_max_genes"):
        tiny_module(classifier_max_genes=0)


def test_auto_discretization_special_values():
    torch.manual_seed(0)
    emb = AutoDiscretizationEmbedding(6, bin_num=10, mask_token_id=102, pad_token_id=103)
    values = torch.tensor([[0.0, 1.5, 102.0, 103.0]])
    out = emb(values)
    assert torch.equal(out[0, 2], emb.emb_mask.weight[0])
    assert torch.equal(out[0, 3], emb.emb_pad.weight[0])
    # a soft assignment: a convex combination of the bin vectors
    h = torch.nn.functional.leaky_relu(emb.mlp(values[0, :2, None]), 0.1)
    w = torch.softmax(h + emb.mlp2(h), -1)
    torch.testing.assert_close(out[0, :2], w @ emb.emb.weight)


# preprocessing options ---------------------------------------------------------------------
def test_target_depth_forms():
    assert parse_target_depth("t4").tokens(np.array([1000.0]))[0][0] == 4.0
    t, s = parse_target_depth("f10").tokens(np.array([1000.0]))
    assert t[0] == pytest.approx(4.0) and s[0] == pytest.approx(3.0)
    t, _ = parse_target_depth("a0.5").tokens(np.array([1000.0]))
    assert t[0] == pytest.approx(3.5)
    # a number is a total count
    assert parse_target_depth(1e4).value == pytest.approx(4.0)
    assert parse_target_depth(1e4).text == "t4"
    for bad in ("x4", "t", "f0", "tfoo", -5, 0, True):
        with pytest.raises((ValueError, TypeError), match="target_depth"):
            parse_target_depth(bad)


def test_pre_normalized_forms_agree(pbmc):
    """F on counts = T on the log-normalised values except S (official quirk) = A with totals."""
    genes = read_gene_index()
    from scfm_tools.models.scfoundation import GeneReindexer

    match = sft.pp.match_to_vocab(list(pbmc.var_names), genes)
    counts = GeneReindexer(match.index, len(genes))(pbmc.X)
    v_f, t_f, s_f = model_values(counts, target_depth="t4")
    v_t, t_t, s_t = model_values(v_f, pre_normalized="T", target_depth="t4")
    totals = np.asarray(counts.sum(axis=1)).ravel()
    v_a, t_a, s_a = model_values(v_f, pre_normalized="A", target_depth="t4", total_counts=totals)
    np.testing.assert_allclose(v_t.toarray(), v_f.toarray())
    np.testing.assert_allclose(v_a.toarray(), v_f.toarray())
    np.testing.assert_allclose(s_f, np.log10(totals))
    np.testing.assert_allclose(s_a, s_f)
    # T: the "total count" is the sum of the log-normalised values (official)
    np.testing.assert_allclose(s_t, np.log10(np.asarray(v_f.sum(axis=1), dtype=float).ravel()))
    assert (t_f == 4).all() and (t_t == 4).all() and (t_a == 4).all()
    # values: log1p of counts per 10,000 over the model's genes
    row = counts[0].toarray().ravel()
    np.testing.assert_allclose(v_f[0].toarray().ravel(), np.log1p(row / row.sum() * 1e4), rtol=1e-6)


def test_packaged_gene_list_is_the_official_one(reference_dir):
    official = pd.read_csv(
        reference_dir / "scfoundation" / "OS_scRNA_gene_index.19264.tsv", sep="\t"
    )
    assert read_gene_index() == official["gene_name"].tolist()


def test_embed_cells_pre_normalized_and_rde(scfoundation_ckpt, pbmc):
    match = sft.pp.match_to_vocab(list(pbmc.var_names), read_gene_index())
    adata = pbmc[:6, match.matched].copy()  # the model's genes only
    sft.tl.embed_cells(adata, scfoundation_ckpt, key_added="X_counts")
    # "A": the same cells log-normalised beforehand, with their total counts given
    add_lognorm_and_totals(adata)
    sft.tl.embed_cells(
        adata,
        scfoundation_ckpt,
        layer="lognorm",
        pre_normalized="A",
        total_counts_key="total_counts",
        key_added="X_a",
    )
    np.testing.assert_allclose(adata.obsm["X_a"], adata.obsm["X_counts"], atol=1e-5, rtol=1e-4)
    assert adata.uns["a"]["params"]["total_counts_key"] == "total_counts"
    # "T": S is the sum of the given values (official quirk), so the S token differs
    sft.tl.embed_cells(
        adata, scfoundation_ckpt, layer="lognorm", pre_normalized="T", key_added="X_t"
    )
    assert not np.allclose(adata.obsm["X_t"], adata.obsm["X_counts"], atol=1e-3)
    # the read-depth-enhancement weights (the fixture's equal the cell ones), max pooling
    sft.tl.embed_cells(adata, scfoundation_ckpt, version="rde", pool="max", key_added="X_rde")
    assert adata.obsm["X_rde"].shape == (6, adata.obsm["X_counts"].shape[1] // 4)
    params = adata.uns["rde"]["params"]
    assert params["entry"] == "rde" and params["pool"] == "max"
    assert params["family"] == "scfoundation" and len(params["weights_sha256"]) == 64


# bad inputs ------------------------------------------------------------------------------
def test_no_gene_overlap(scfoundation_ckpt, pbmc):
    adata = pbmc[:4].copy()
    adata.var_names = [f"NOTAGENE{i}" for i in range(adata.n_vars)]
    snap = snapshot(adata)
    with pytest.raises(InputError, match="too few genes match"):
        sft.tl.embed_cells(adata, scfoundation_ckpt)
    assert_unchanged(adata, snap)


def test_non_counts_with_pre_normalized_f(scfoundation_ckpt, pbmc):
    adata = pbmc[:4].copy()
    adata.X = adata.X.astype(np.float32)
    adata.X.data = np.log1p(adata.X.data * 1.37)
    snap = snapshot(adata)
    with pytest.raises(InputError, match="non-integer values"):
        sft.tl.embed_cells(adata, scfoundation_ckpt)  # pre_normalized="F" (the default)
    assert_unchanged(adata, snap)
    with pytest.raises(InputError, match="non-integer values"):
        sft.tl.impute(adata, scfoundation_ckpt)
    assert_unchanged(adata, snap)


def test_counts_with_pre_normalized_t(scfoundation_ckpt, pbmc):
    adata = pbmc[:4].copy()
    snap = snapshot(adata)
    with pytest.raises(InputError, match="raw counts"):
        sft.tl.embed_cells(adata, scfoundation_ckpt, pre_normalized="T")
    assert_unchanged(adata, snap)


@pytest.mark.parametrize(
    ("family", "source"),
    [("scBERT", ("scbert", "fixture_ckpt.pth")), ("CellPLM", ("cellplm", "fixture.best.ckpt"))],
)
def test_another_familys_checkpoint(fixtures_dir, tmp_path, pbmc, family, source):
    # named like an scFoundation checkpoint, so the hub takes it for one
    shutil.copyfile(fixtures_dir.joinpath(*source), tmp_path / "models.ckpt")
    adata = pbmc[:4].copy()
    snap = snapshot(adata)
    with pytest.raises(ValueError, match=f"not an scFoundation checkpoint.*{family}"):
        sft.tl.embed_cells(adata, tmp_path / "models.ckpt")
    assert_unchanged(adata, snap)
    with pytest.raises(ValueError, match=f"not an scFoundation checkpoint.*{family}"):
        read_scfoundation_entry(tmp_path / "models.ckpt")


def test_cell_without_model_genes(scfoundation_ckpt, pbmc):
    # cell 3 has counts only in a gene outside the model's list
    X = np.hstack([pbmc.X[:4].toarray(), np.array([[0], [0], [0], [5]])]).astype(np.float32)
    X[3, :-1] = 0
    adata = ad.AnnData(
        sparse.csr_matrix(X),
        obs=pbmc.obs.iloc[:4].copy(),
        var=pd.DataFrame(index=[*pbmc.var_names, "NOTAGENE"]),
    )
    snap = snapshot(adata)
    named = re.escape(f"['{adata.obs_names[3]}']) express none of the scFoundation model's")
    with pytest.raises(InputError, match=named):
        sft.tl.embed_cells(adata, scfoundation_ckpt)
    assert_unchanged(adata, snap)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"target_depth": "x4"}, ValueError, "target_depth"),
        ({"pool": "mean"}, ValueError, "pool"),
        ({"pre_normalized": "A"}, ValueError, "total_counts_key"),
        ({"input_type": "bulk", "pre_normalized": "A"}, ValueError, "single cells only"),
        ({"version": "v2"}, ValueError, "version"),
        ({"key_max": "batch"}, TypeError, "do not take"),
        ({"max_length": 100}, ValueError, "max_length"),
    ],
)
def test_bad_options(scfoundation_ckpt, pbmc, kwargs, error, match):
    adata = pbmc[:2].copy()
    snap = snapshot(adata)
    with pytest.raises(error, match=match):
        sft.tl.embed_cells(adata, scfoundation_ckpt, **kwargs)
    assert_unchanged(adata, snap)


def test_gene_list_length_must_match(tmp_path, pbmc):
    path = tiny_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="gene list has 3 genes"):
        load_scfoundation_checkpoint(path, genes=["A", "B", "C"])


def test_official_entry_round_trip(tmp_path):
    path = tiny_checkpoint(tmp_path, seed=3)
    module, genes, config, report = load_scfoundation_checkpoint(path, "gene")
    assert report.clean and len(genes) == module.n_genes
    reference = tiny_module(3)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(module.state_dict()[key], value, rtol=0, atol=0)
    assert config["model"] == "mae_autobin" and config["seq_len"] == module.seq_len
