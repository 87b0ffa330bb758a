"""A cell's result depends only on that cell (``random_stream="cell"``, the default).

Embedding a dataset, its reversed order or a subset gives each cell the same vector, for every
family, on real cells; so does a dataset split in two files. The official single stream stays
available as ``random_stream="official"``: the conformance tests use it to reproduce the
official fixtures, and here it shows that the dependence on the other cells is real.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch

import scfm_tools as sft
from _scfoundation_tiny import tiny_module
from scfm_tools._cell_rng import (
    cell_keys,
    cell_normal,
    cell_uniform,
    check_random_stream,
    gene_hashes,
    gene_set_keys,
)
from scfm_tools.models.cellplm import CellPLMModule, cell_noise, module_config
from scfm_tools.models.cellplm import embed_matrix as cellplm_embed
from scfm_tools.models.cellplm._sequences import to_model_genes
from scfm_tools.models.scbert import SCBERTModule
from scfm_tools.models.scbert import embed_matrix as scbert_embed
from scfm_tools.models.scfoundation import embed_matrix as scfoundation_embed
from scfm_tools.models.scfoundation import read_gene_index
from scfm_tools.models.scgpt import embed_matrix as scgpt_embed
from scfm_tools.models.scgpt import load_scgpt_checkpoint
from scfm_tools.models.scgpt._attention import attention_sums
from scfm_tools.pp._match_genes import match_to_vocab

PBMC = "pbmc8k_200genes_labeled.h5ad"
CELLBENCH = "cellbench_3celllines_celseq2_dropseq.h5ad"
ATOL = 1e-5


@pytest.fixture(scope="module")
def pbmc(data_dir):
    return ad.read_h5ad(data_dir / PBMC)[:300].copy()


@pytest.fixture(scope="module")
def cellbench(data_dir):
    """40 cells of both protocols: thousands of genes each, so scGPT subsamples them."""
    adata = ad.read_h5ad(data_dir / CELLBENCH)
    rows = np.concatenate([np.arange(20), np.arange(adata.n_obs - 20, adata.n_obs)])
    return adata[rows].copy()


@pytest.fixture(scope="module")
def scgpt_default():
    module, vocab, args, _ = load_scgpt_checkpoint(sft.hub.load("scgpt-default").path)
    return module, vocab, args


def _orders(n: int) -> dict[str, np.ndarray]:
    """Rows of each re-embedding: reversed, and a third of the cells in a shuffled order."""
    return {
        "reversed": np.arange(n)[::-1].copy(),
        "subset": np.random.default_rng(0).permutation(n)[: n // 3],
    }


# --- the streams ------------------------------------------------------------------------------
def test_cell_keys_follow_the_cell_not_its_storage(pbmc):
    X = pbmc.X[:50]
    rows = np.repeat(np.arange(50), np.diff(X.indptr))
    keys = cell_keys(7, rows, X.indices, X.data, 50)
    assert np.unique(keys).size == 50  # different cells, different streams
    # entry order, int32 / float32 / float64 storage: the same keys
    perm = np.random.default_rng(0).permutation(rows.size)
    for data in (X.data.astype(np.int32), X.data.astype(np.float32), X.data.astype(np.float64)):
        np.testing.assert_array_equal(
            cell_keys(7, rows[perm], X.indices[perm], data[perm], 50), keys
        )
    # the seed, a value or a gene changes the key of that cell only
    assert not (cell_keys(8, rows, X.indices, X.data, 50) == keys).any()
    data = X.data.copy()
    data[0] += 1
    changed = cell_keys(7, rows, X.indices, data, 50) != keys
    np.testing.assert_array_equal(np.flatnonzero(changed), [0])


def test_gene_set_keys_follow_the_genes_of_each_row(pbmc):
    X = pbmc.X[:50]
    keys = gene_set_keys(7, X.indptr, gene_hashes(X.indices))
    assert np.unique(keys).size == 50
    # the entries of a row in another order: the same keys
    indices = X.indices.copy()
    for row in range(50):
        lo, hi = X.indptr[row], X.indptr[row + 1]
        indices[lo:hi] = indices[lo:hi][::-1]
    np.testing.assert_array_equal(gene_set_keys(7, X.indptr, gene_hashes(indices)), keys)
    # one gene more in row 3 changes that row's key only; the seed changes every key
    genes = [X.indices[X.indptr[r] : X.indptr[r + 1]] for r in range(50)]
    genes[3] = np.append(genes[3], 10_000)
    indptr = np.concatenate([[0], np.cumsum([g.size for g in genes])])
    changed = gene_set_keys(7, indptr, gene_hashes(np.concatenate(genes))) != keys
    np.testing.assert_array_equal(np.flatnonzero(changed), [3])
    assert not (gene_set_keys(8, X.indptr, gene_hashes(X.indices)) == keys).any()
    # rows without genes, first, between and last, get the seed's own key
    empty = gene_set_keys(7, np.array([0, 0, 2, 2, 3, 3]), gene_hashes(np.array([5, 9, 5])))
    assert empty[0] == empty[2] == empty[4] != empty[1]
    assert empty[3] == gene_set_keys(7, np.array([0, 1]), gene_hashes(np.array([5])))[0]


def test_draws_are_uniform_and_normal():
    keys = cell_keys(0, np.arange(1000), np.arange(1000), np.ones(1000), 1000)
    u = cell_uniform(keys, 200, stream=3)
    assert u.shape == (1000, 200) and u.min() >= 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 2e-3 and abs(u.var() - 1 / 12) < 1e-3
    # different streams of a cell are not the same numbers
    assert np.abs(np.corrcoef(u.ravel(), cell_uniform(keys, 200, stream=4).ravel())[0, 1]) < 0.01
    f = cell_uniform(keys, 200, stream=3, dtype=np.float32)
    assert f.dtype == np.float32 and f.max() < 1
    z = cell_normal(keys, 200, stream=4)
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert abs((np.abs(z) < 1).mean() - 0.6827) < 0.01
    with pytest.raises(ValueError, match="random_stream must be 'cell'"):
        check_random_stream("global")


# --- sft.pp.bin_values(flavor="scgpt") --------------------------------------------------------
def test_bin_values_per_cell_on_a_subset(pbmc):
    whole = sft.pp.bin_values(pbmc, random_state=3, copy=True).layers["X_binned"]
    for name, rows in _orders(pbmc.n_obs).items():
        part = sft.pp.bin_values(pbmc[rows].copy(), random_state=3, copy=True)
        assert (part.layers["X_binned"] != whole[rows]).nnz == 0, name
    # dense int32 storage of the same counts: the same bins
    dense = ad.AnnData(pbmc.X.toarray().astype(np.int32))
    sft.pp.bin_values(dense, random_state=3)
    np.testing.assert_array_equal(dense.layers["X_binned"], whole.toarray())
    assert pbmc.uns.get("bin_values") is None
    # the official stream runs over the cells in order, so a subset gets other ties
    official = sft.pp.bin_values(pbmc, random_state=3, random_stream="official", copy=True)
    rows = _orders(pbmc.n_obs)["subset"]
    part = sft.pp.bin_values(pbmc[rows].copy(), random_state=3, random_stream="official", copy=True)
    assert (part.layers["X_binned"] != official.layers["X_binned"][rows]).nnz > 0
    assert official.uns["bin_values"]["params"]["random_stream"] == "official"
    with pytest.raises(ValueError, match="random_stream"):
        sft.pp.bin_values(pbmc, random_stream="global", copy=True)


# --- scGPT (the shipped default model) -------------------------------------------------------
def test_scgpt_each_cell_alone(cellbench, scgpt_default):
    module, vocab, args = scgpt_default
    X, genes = cellbench.X, list(cellbench.var_names)
    assert np.diff(X.indptr).min() > args["max_seq_len"]  # every cell is subsampled
    whole = scgpt_embed(module, vocab, args, X, genes)
    for name, rows in _orders(cellbench.n_obs).items():
        np.testing.assert_allclose(
            scgpt_embed(module, vocab, args, X[rows], genes), whole[rows], atol=ATOL, err_msg=name
        )
    # dense float32 storage and another gene order: the same vectors
    perm = np.random.default_rng(0).permutation(len(genes))
    dense = X.toarray().astype(np.float32)[:, perm]
    got = scgpt_embed(module, vocab, args, dense, [genes[i] for i in perm], chunk_size=7)
    np.testing.assert_allclose(got, whole, atol=ATOL)
    # the official stream: the cells before a cell move it
    rows = _orders(cellbench.n_obs)["reversed"]
    official = scgpt_embed(module, vocab, args, X, genes, random_stream="official")
    moved = scgpt_embed(module, vocab, args, X[rows], genes, random_stream="official")
    assert np.abs(moved - official[rows]).max() > 1e-2


def test_scgpt_two_files_equal_one_file(cellbench, tmp_path):
    whole = cellbench.copy()
    whole.write_h5ad(tmp_path / "whole.h5ad")
    first, second = cellbench[:17].copy(), cellbench[17:].copy()
    second.X = second.X.toarray().astype(np.float32)  # stored otherwise, the same counts
    first.write_h5ad(tmp_path / "first.h5ad")
    second.write_h5ad(tmp_path / "second.h5ad")
    out = []
    for name in ("whole", "first", "second"):
        adata = ad.read_h5ad(tmp_path / f"{name}.h5ad", backed="r")
        sft.tl.embed_cells(adata, "scgpt-default", chunk_size=9, batch_size=5)
        out.append(adata.obsm["X_scgpt"])
        assert adata.uns["scgpt"]["params"]["random_stream"] == "cell"
        adata.file.close()
    np.testing.assert_allclose(np.vstack(out[1:]), out[0], atol=ATOL)


def test_scgpt_gene_outputs_do_not_depend_on_cell_order(cellbench, scgpt_default):
    module, vocab, _ = scgpt_default
    forward, backward = cellbench.copy(), cellbench[::-1].copy()
    for adata in (forward, backward):
        sft.tl.embed_genes(adata, mode="context", batch_size=8)
    emb_f, emb_b = forward.varm["X_scgpt_genes"], backward.varm["X_scgpt_genes"]
    seen = np.isfinite(emb_f).all(1)
    assert seen.sum() > 1000
    np.testing.assert_array_equal(seen, np.isfinite(emb_b).all(1))
    np.testing.assert_allclose(emb_b[seen], emb_f[seen], atol=ATOL)
    # attention, summed over the cells, on 60 well-expressed genes
    match = match_to_vocab(list(cellbench.var_names), vocab)
    index = np.full(cellbench.n_vars, -1)
    top = np.argsort(-np.asarray((cellbench.X > 0).sum(0)).ravel())[:60]
    index[top] = match.index[top]
    runs = [
        attention_sums(module, [X], index, cls_id=vocab["<cls>"], max_length=32, batch_size=8)
        for X in (cellbench.X, cellbench.X[::-1])
    ]
    np.testing.assert_array_equal(runs[0][1], runs[1][1])  # each pair in as many cells
    np.testing.assert_allclose(runs[1][0], runs[0][0], atol=1e-6)


# --- scBERT and scFoundation: no random draws, and no dependence on the batch ---------------
def test_scbert_each_cell_alone(pbmc):
    torch.manual_seed(0)
    g2v = torch.randn(pbmc.n_vars, 8, dtype=torch.float64)
    module = SCBERTModule(pbmc.n_vars, gene2vec_weight=g2v, dim=8, depth=2, heads=2, dim_head=4)
    genes = list(pbmc.var_names)
    cells = pbmc.X[:30]
    whole = scbert_embed(module, cells, genes, genes, batch_size=16)
    for name, rows in _orders(30).items():
        got = scbert_embed(module, cells[rows], genes, genes, batch_size=7)
        np.testing.assert_allclose(got, whole[rows], atol=ATOL, err_msg=name)


def test_scfoundation_each_cell_alone(pbmc):
    module = tiny_module(seed=4)
    cells, genes = pbmc.X[:24], list(pbmc.var_names)
    model_genes = read_gene_index()
    whole = scfoundation_embed(module, cells, genes, model_genes, batch_size=8)
    for name, rows in _orders(24).items():
        got = scfoundation_embed(module, cells[rows], genes, model_genes, batch_size=3)
        np.testing.assert_allclose(got, whole[rows], atol=ATOL, err_msg=name)


# --- CellPLM: sampled draws follow the cell; the sequence is its context ---------------------
@pytest.fixture(scope="module")
def cellplm(cellbench):
    """A tiny random CellPLM on 400 of the real cells' genes (Ensembl IDs)."""
    genes = list(cellbench.var["gene_ids"].astype(str))
    top = np.argsort(-np.asarray(cellbench.X.sum(0)).ravel())[:400]
    gene_list = [genes[i] for i in sorted(top)]
    config = {
        "enc_hid": 16,
        "enc_layers": 2,
        "enc_head": 2,
        "post_latent_dim": 8,
        "num_clusters": 6,
        "dec_hid": 16,
        "dec_layers": 2,
        "norm": "groupnorm",
        "enc_mod": "flowformer",
        "latent_mod": "gmvae",
        "dec_mod": "nbmlp",
        "gene_list": gene_list,
        "out_dim": len(gene_list),
    }
    torch.manual_seed(0)
    return CellPLMModule(**module_config(config)).eval(), gene_list, genes


def test_cellplm_draws_follow_the_cell(cellbench, cellplm):
    module, gene_list, genes = cellplm
    match = match_to_vocab(genes, gene_list)
    counts = to_model_genes(cellbench.X, match, len(gene_list))
    whole = cell_noise(counts, 5, 6, 8)
    for name, rows in _orders(cellbench.n_obs).items():
        part = cell_noise(to_model_genes(cellbench.X[rows], match, len(gene_list)), 5, 6, 8)
        torch.testing.assert_close(part.uniform, whole.uniform[rows], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(part.normal, whole.normal[rows], rtol=0, atol=0, msg=name)
    # the component each cell draws, with the sequence in reverse: the same per cell
    rows = _orders(cellbench.n_obs)["reversed"]
    back = to_model_genes(cellbench.X[rows], match, len(gene_list))
    with torch.inference_mode():
        ahead = module.inference(counts, sample=True, noise=whole)["categorical"]
        behind = module.inference(back, sample=True, noise=cell_noise(back, 5, 6, 8))
    torch.testing.assert_close(behind["categorical"], ahead[rows])
    assert ahead.argmax(1).unique().numel() > 1  # the draws do pick different components


def test_cellplm_sampled_embeddings_do_not_depend_on_order(cellbench, cellplm):
    module, gene_list, genes = cellplm
    batch = cellbench.obs["batch"].to_numpy()
    X = cellbench.X
    orders = _orders(cellbench.n_obs)
    # the same sequences (one per batch), their cells reversed
    whole = cellplm_embed(module, gene_list, X, genes, batch=batch, sample=True)
    rows = orders["reversed"]
    got = cellplm_embed(module, gene_list, X[rows], genes, batch=batch[rows], sample=True)
    np.testing.assert_allclose(got, whole[rows], atol=ATOL)
    # each cell its own sequence: a subset gives each cell the same context and draw
    alone = cellplm_embed(module, gene_list, X, genes, max_cells=1, sample=True)
    rows = orders["subset"]
    got = cellplm_embed(module, gene_list, X[rows], genes, max_cells=1, sample=True)
    np.testing.assert_allclose(got, alone[rows], atol=ATOL)
    # sampling is on: another seed draws other components
    other = cellplm_embed(module, gene_list, X, genes, batch=batch, sample=True, random_state=1)
    assert np.abs(other - whole).max() > 1e-3
    # the official stream runs over the cells in sequence order
    rows = orders["reversed"]
    kw = {"sample": True, "random_stream": "official"}
    official = cellplm_embed(module, gene_list, X, genes, batch=batch, **kw)
    moved = cellplm_embed(module, gene_list, X[rows], genes, batch=batch[rows], **kw)
    assert np.abs(moved - official[rows]).max() > 1e-3
