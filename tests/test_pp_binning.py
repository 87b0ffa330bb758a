"""Tests for sft.pp.bin_values and the scGPT per-cell core quantile_bin."""

from __future__ import annotations

import json
import re

import anndata as ad
import numpy as np
import pytest
from scipy import sparse

import scfm_tools as sft
from _unchanged import assert_unchanged, snapshot
from scfm_tools._validation import InputError
from scfm_tools.pp import _binning
from scfm_tools.pp._binning import quantile_bin, scbert_log2_norm

PBMC = "pbmc8k_200genes_labeled.h5ad"
CELLBENCH = "cellbench_3celllines_celseq2_dropseq.h5ad"


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _reference_scgpt(X: np.ndarray, n_bins: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The documented scGPT algorithm, one cell at a time, as plainly as possible."""
    rng = np.random.RandomState(seed)
    out = np.zeros(X.shape, dtype=np.int64)
    edges_out = np.zeros((X.shape[0], n_bins))
    for i, row in enumerate(X):
        nz = np.flatnonzero(row)
        if nz.size == 0:
            continue
        edges = np.quantile(row[nz], np.linspace(0, 1, n_bins - 1))
        lo = np.digitize(row[nz], edges)
        hi = np.digitize(row[nz], edges, right=True)
        out[i, nz] = np.ceil(rng.rand(nz.size) * (hi - lo) + lo)
        edges_out[i, 1:] = edges
    return out, edges_out


def _row_ids(m: sparse.csr_matrix) -> np.ndarray:
    return np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))


@pytest.fixture
def pbmc(read_shared) -> ad.AnnData:
    return read_shared(PBMC)


@pytest.fixture
def cellbench(read_shared) -> ad.AnnData:
    return read_shared(CELLBENCH)


# --------------------------------------------------------------------------------------------
# official fixtures
# --------------------------------------------------------------------------------------------
def test_quantile_bin_reproduces_official_binning_cases(fixtures_dir):
    io = np.load(fixtures_dir / "scgpt" / "fixture_io.npz")
    outputs = json.loads((fixtures_dir / "scgpt" / "fixture_meta.json").read_text())["outputs"]
    cases = sorted(int(k.removeprefix("bin_row")) for k in io.files if k.startswith("bin_row"))
    assert cases, "the scGPT fixture holds no bin_row* cases"
    for n in cases:
        desc = outputs.get(f"bin_out{n}", outputs["bin_outN"])
        n_bins = int(re.search(r"n_bins=(\d+)", desc)[1])
        base = re.search(r"seed\((\d+)\s*\+\s*N\)", desc)
        seed = int(base[1]) + n if base else int(re.search(r"seed\((\d+)\)", desc)[1])
        row, expected = io[f"bin_row{n}"], io[f"bin_out{n}"]

        got = quantile_bin(row, n_bins, np.random.RandomState(seed))
        np.testing.assert_array_equal(got, expected, err_msg=f"bin_row{n}")

        # The AnnData path gives the same bins, and stores the quantiles of the non-zero values.
        one = ad.AnnData(row[None, :].astype(np.float32))
        sft.pp.bin_values(one, n_bins=n_bins, random_state=seed, random_stream="official")
        np.testing.assert_array_equal(one.layers["X_binned"][0], expected)
        nonzero = row[row != 0]
        np.testing.assert_array_equal(
            one.obsm["bin_edges"][0, 1:], np.quantile(nonzero, np.linspace(0, 1, n_bins - 1))
        )
        assert one.obsm["bin_edges"][0, 0] == 0


def test_bin_values_reproduces_scgpt_collated_values(fixtures_dir):
    """embed_data bins each cell's non-zero in-vocab counts, one global seed before all cells."""
    folder = fixtures_dir / "scgpt"
    io = np.load(folder / "fixture_io.npz")
    meta = json.loads((folder / "fixture_meta.json").read_text())
    vocab = json.loads((folder / "ckpt_folder" / "vocab.json").read_text())
    args = json.loads((folder / "ckpt_folder" / "args.json").read_text())
    seed = int(re.search(r"np\.random\.seed\((\d+)\)", meta["inputs"]["expr_binned"])[1])

    in_vocab = np.array([g in vocab for g in io["var_names"]])
    assert 0 < in_vocab.sum() < in_vocab.size  # the fixture drops some genes
    adata = ad.AnnData(io["counts"][:, in_vocab])
    adata.var_names = io["var_names"][in_vocab]
    sft.pp.bin_values(
        adata, n_bins=args["n_bins"], random_state=seed, random_stream="official", chunk_size=2
    )

    binned = adata.layers["X_binned"]
    for i in range(adata.n_obs):
        cols = np.flatnonzero(adata.X[i])
        k = cols.size
        # Same genes in the same order as the official collator ...
        np.testing.assert_array_equal(
            io["gene_ids"][i, 1 : 1 + k], [vocab[g] for g in adata.var_names[cols]]
        )
        # ... and the same bins, with the <cls> slot and the padding at pad_value.
        np.testing.assert_array_equal(io["expr_binned"][i, 1 : 1 + k], binned[i, cols])
        assert io["expr_binned"][i, 0] == args["pad_value"]
        assert (io["expr_binned"][i, 1 + k :] == args["pad_value"]).all()


def test_bin_values_reproduces_scbert_tokens(fixtures_dir):
    io = np.load(fixtures_dir / "scbert" / "fixture_io.npz")
    config = json.loads((fixtures_dir / "scbert" / "fixture_meta.json").read_text())
    config = config["fixture_config"]
    n_genes, bin_num = config["n_genes"], config["bin_num"]
    counts = io["counts"]
    assert counts.shape[1] == n_genes

    # scanpy's normalize_total + log1p(base=2) in float32. The float library's log1p may round
    # the last bit either way (numpy 2.4.6 differs from the fixture's in 14 of 384 values: 13
    # by one float32 step, one by two after the division by log 2), so the values are held to
    # two steps, few of them off at all; the tokens derived from them must be exact.
    csr = sparse.csr_matrix(counts)
    log2 = sparse.csr_matrix((scbert_log2_norm(csr), csr.indices, csr.indptr), shape=csr.shape)
    expected = io["log2_norm"]
    assert log2.dtype == expected.dtype == np.float32
    np.testing.assert_array_max_ulp(log2.toarray(), expected, maxulp=2)
    assert (np.abs(log2.toarray() - expected) > 0).sum() <= expected.size // 10

    adata = ad.AnnData(counts)
    sft.pp.bin_values(adata, flavor="scbert", n_bins=bin_num)
    tokens = adata.layers["X_scbert_bins"]
    assert isinstance(tokens, np.ndarray)
    assert tokens.dtype == np.int16
    # The official sequence appends one token 0 (gene2vec padding) after the genes.
    np.testing.assert_array_equal(tokens, io["tokens"][:, :n_genes])


def test_scbert_tokens_on_real_counts(pbmc):
    sft.pp.bin_values(pbmc, flavor="scbert")
    tokens = pbmc.layers["X_scbert_bins"].toarray()
    counts = pbmc.X.toarray().astype(np.float64)
    expected = np.floor(
        np.minimum(np.log2(1 + counts / counts.sum(1, keepdims=True) * 1e4), 5)
    ).astype(int)
    # float32 (as scBERT computes) vs float64 may differ right at a bin boundary only.
    assert (tokens != expected).mean() < 1e-4
    assert tokens.min() == 0 and tokens.max() == 5
    assert ((counts == 0) <= (tokens == 0)).all()


# --------------------------------------------------------------------------------------------
# scGPT flavor on real data
# --------------------------------------------------------------------------------------------
def test_scgpt_matches_per_cell_reference(cellbench, pbmc):
    for data, n in ((cellbench[:60], 60), (pbmc[:1500], 1500)):
        dense = data.X.toarray()
        result = sft.pp.bin_values(data, random_state=7, random_stream="official", copy=True)
        expected, edges = _reference_scgpt(dense, 51, seed=7)
        assert result.layers["X_binned"].shape == (n, data.n_vars)
        np.testing.assert_array_equal(result.layers["X_binned"].toarray(), expected)
        np.testing.assert_array_equal(result.obsm["bin_edges"], edges)


def test_scgpt_properties_on_real_cells(pbmc, cellbench):
    for data, min_nnz, max_ks in ((pbmc, 50, 0.15), (cellbench, 0, 0.05)):
        X = data.X
        sft.pp.bin_values(data)
        B = data.layers["X_binned"]
        assert sparse.isspmatrix_csr(B) and B.dtype == np.int16
        # Same sparsity pattern: zeros stay zero, every count gets a bin in 1..50.
        np.testing.assert_array_equal(B.indptr, X.indptr)
        np.testing.assert_array_equal(B.indices, X.indices)
        assert B.data.min() >= 1 and B.data.max() <= 50

        # Within a cell, a larger count never gets a lower bin: sorted by (count, bin), the bins
        # must not decrease within the cell.
        rows = _row_ids(X)
        order = np.lexsort((B.data, X.data, rows))
        step = np.diff(B.data[order].astype(int))
        same_cell = np.diff(rows[order]) == 0
        assert (step[same_cell] >= 0).all()

        # Roughly uniform over the non-zero values (ties are spread at random): the bins' CDF
        # stays close to the uniform one in each cell.
        hist = np.zeros((data.n_obs, 51))
        np.add.at(hist, (rows, B.data), 1)
        nnz = np.diff(X.indptr)
        sel = nnz >= max(min_nnz, 1)
        cdf = np.cumsum(hist[sel, 1:], axis=1) / nnz[sel, None]
        ks = np.abs(cdf - np.arange(1, 51) / 50).max(axis=1)
        assert ks.max() < max_ks
        # Without the random spreading all the 1s would share bin 1.
        assert hist[:, 1].sum() < 0.1 * nnz.sum()


def test_chunk_size_does_not_change_the_result(pbmc):
    data = pbmc[:2000].copy()
    small = sft.pp.bin_values(data, chunk_size=7, random_state=3, copy=True)
    whole = sft.pp.bin_values(data, chunk_size=10_000, random_state=3, copy=True)
    assert (small.layers["X_binned"] != whole.layers["X_binned"]).nnz == 0
    np.testing.assert_array_equal(small.obsm["bin_edges"], whole.obsm["bin_edges"])
    for flavor in ("scbert",):
        a = sft.pp.bin_values(data, flavor=flavor, chunk_size=7, copy=True)
        b = sft.pp.bin_values(data, flavor=flavor, copy=True)
        assert (a.layers["X_scbert_bins"] != b.layers["X_scbert_bins"]).nnz == 0


def test_sparse_dense_and_backed_agree(read_shared, monkeypatch):
    memory = read_shared(PBMC)
    dense = ad.AnnData(memory.X.toarray(), obs=memory.obs, var=memory.var)
    backed = read_shared(PBMC, backed="r")

    # The backed file must be read in chunks, never whole.
    seen: list[int] = []
    canonical = _binning._canonical_csr
    monkeypatch.setattr(
        _binning, "_canonical_csr", lambda block: seen.append(block.shape[0]) or canonical(block)
    )
    for flavor, key in (("scgpt", "X_binned"), ("scbert", "X_scbert_bins")):
        seen.clear()
        sft.pp.bin_values(backed, flavor=flavor, chunk_size=1000)
        assert max(seen) == 1000 and len(seen) == -(-memory.n_obs // 1000)
        sft.pp.bin_values(memory, flavor=flavor, chunk_size=1000)
        sft.pp.bin_values(dense, flavor=flavor, chunk_size=1000)
        ref = memory.layers[key]
        assert sparse.isspmatrix_csr(ref)
        assert isinstance(dense.layers[key], np.ndarray) and dense.layers[key].dtype == np.int16
        np.testing.assert_array_equal(dense.layers[key], ref.toarray())
        assert (backed.layers[key] != ref).nnz == 0
    np.testing.assert_array_equal(backed.obsm["bin_edges"], memory.obsm["bin_edges"])
    assert backed.isbacked


def test_lognormalised_values_bin_like_counts(pbmc):
    """Rank-based: normalise + log1p changes the bins only by float rounding at ties."""
    lognorm = pbmc.copy()
    totals = np.asarray(pbmc.X.sum(axis=1)).ravel()
    lognorm.X = sparse.diags(1e4 / totals) @ pbmc.X.astype(np.float32)
    lognorm.X.data = np.log1p(lognorm.X.data)
    sft.pp.bin_values(pbmc, random_state=1)
    sft.pp.bin_values(lognorm, random_state=1)
    differ = (pbmc.layers["X_binned"] != lognorm.layers["X_binned"]).nnz
    assert differ / pbmc.X.nnz < 1e-3


def test_quantile_bin_as_tokenizer_core(pbmc):
    """A tokenizer binning each cell's kept non-zero values with one rng matches bin_values."""
    data = pbmc[:300].copy()
    sft.pp.bin_values(data, random_state=11, random_stream="official")
    rng = np.random.RandomState(11)
    for i in range(data.n_obs):
        row = data.X[i]
        bins = quantile_bin(row.data, 51, rng)
        np.testing.assert_array_equal(bins, data.layers["X_binned"][i].data)


def test_quantile_bin_edge_cases():
    rng = np.random.RandomState(0)
    out = quantile_bin(np.zeros(5), 51, rng)
    assert out.dtype == np.int16 and not out.any()
    # An all-zero cell draws nothing from the stream.
    assert rng.rand() == np.random.RandomState(0).rand()

    # All values equal: every one spans all edges, so bins are spread over 1..n_bins-1.
    flat = quantile_bin(np.full(2000, 3.0), 11, np.random.RandomState(0))
    assert set(np.unique(flat)) == set(range(1, 11))
    # n_bins=2 is a presence flag.
    np.testing.assert_array_equal(quantile_bin(np.array([0, 4, 1, 0]), 2, rng), [0, 1, 1, 0])

    with pytest.raises(TypeError, match="RandomState"):
        quantile_bin(np.ones(3), 51, np.random.default_rng(0))
    with pytest.raises(ValueError, match="1-D"):
        quantile_bin(np.ones((2, 3)), 51, rng)
    with pytest.raises(ValueError, match="non-negative"):
        quantile_bin(np.array([1.0, -1.0]), 51, rng)
    with pytest.raises(ValueError, match="n_bins must be between 2"):
        quantile_bin(np.ones(3), 1, rng)


def test_empty_cells_stay_zero(pbmc, caplog):
    data = pbmc[:50].copy()
    X = data.X.tolil()
    X[[3, 17]] = 0
    data.X = X.tocsr()
    data.X.eliminate_zeros()
    caplog.set_level("WARNING", logger="scfm_tools")
    sft.pp.bin_values(data, random_stream="official")
    assert data.layers["X_binned"][[3, 17]].nnz == 0
    assert not data.obsm["bin_edges"][[3, 17]].any()
    assert "2 of 50 cells" in caplog.text
    ref, _ = _reference_scgpt(data.X.toarray(), 51, seed=sft.settings.seed)
    np.testing.assert_array_equal(data.layers["X_binned"].toarray(), ref)


# --------------------------------------------------------------------------------------------
# API: keys, params, copy, seeds, layers, MuData
# --------------------------------------------------------------------------------------------
def test_copy_semantics(pbmc):
    snap = snapshot(pbmc)
    out = sft.pp.bin_values(pbmc, copy=True)
    assert isinstance(out, ad.AnnData) and out is not pbmc
    assert "X_binned" in out.layers and "bin_edges" in out.obsm
    assert_unchanged(pbmc, snap)

    assert sft.pp.bin_values(pbmc) is None
    assert (pbmc.layers["X_binned"] != out.layers["X_binned"]).nnz == 0
    np.testing.assert_array_equal(pbmc.X.toarray(), snap.X.toarray())  # X itself is never touched


def test_uns_params_and_keys(pbmc):
    sft.pp.bin_values(pbmc, random_state=4, key_added="tokens")
    assert "tokens" in pbmc.layers and "tokens_bin_edges" in pbmc.obsm
    assert "X_binned" not in pbmc.layers
    params = pbmc.uns["bin_values"]["params"]
    assert params["flavor"] == "scgpt"
    assert params["n_bins"] == 51
    assert params["random_state"] == 4
    assert params["key_added"] == "tokens"
    assert params["edges_key"] == "tokens_bin_edges"
    assert params["sft_version"] == sft.__version__
    assert pbmc.obsm["tokens_bin_edges"].shape == (pbmc.n_obs, 51)

    pbmc.layers["counts"] = pbmc.X.copy()
    sft.pp.bin_values(pbmc, flavor="scbert", layer="counts", n_bins=7)
    params = pbmc.uns["bin_values"]["params"]
    assert params["flavor"] == "scbert" and params["n_bins"] == 7
    assert params["layer"] == "counts" and params["key_added"] == "X_scbert_bins"
    assert "random_state" not in params and "edges_key" not in params
    assert pbmc.layers["X_scbert_bins"].max() == 7


def test_layer_is_read_instead_of_x(pbmc):
    pbmc.layers["counts"] = pbmc.X.copy()
    pbmc.X = sparse.csr_matrix(pbmc.X.shape, dtype=np.float32)  # nothing useful left in X
    sft.pp.bin_values(pbmc, layer="counts", random_state=2)
    ref = sft.pp.bin_values(ad.AnnData(pbmc.layers["counts"]), random_state=2, copy=True)
    assert (pbmc.layers["X_binned"] != ref.layers["X_binned"]).nnz == 0
    assert pbmc.layers["X_binned"].nnz == pbmc.layers["counts"].nnz


def test_random_state(pbmc, monkeypatch):
    data = pbmc[:500].copy()
    a = sft.pp.bin_values(data, random_state=1, copy=True).layers["X_binned"]
    b = sft.pp.bin_values(data, random_state=1, copy=True).layers["X_binned"]
    c = sft.pp.bin_values(data, random_state=2, copy=True).layers["X_binned"]
    assert (a != b).nnz == 0
    assert (a != c).nnz > 0  # ties are frequent in counts, so the seed matters
    monkeypatch.setattr(sft.settings, "_seed", 2)
    d = sft.pp.bin_values(data, copy=True)
    assert (d.layers["X_binned"] != c).nnz == 0
    assert d.uns["bin_values"]["params"]["random_state"] == 2


def test_mudata_modality(data_dir):
    mudata = pytest.importorskip("mudata")
    mdata = mudata.read_h5mu(data_dir / "citeseq_pbmc_hao2021_tiny.h5mu")
    rna = mdata.mod["rna"].copy()
    sft.pp.bin_values(mdata, mod="rna", random_state=5)
    assert "X_binned" in mdata.mod["rna"].layers
    ref = sft.pp.bin_values(rna, random_state=5, copy=True)
    got, want = mdata.mod["rna"].layers["X_binned"], ref.layers["X_binned"]
    if sparse.issparse(got):
        got, want = got.toarray(), want.toarray()
    np.testing.assert_array_equal(got, want)

    out = sft.pp.bin_values(mdata, mod="rna", flavor="scbert", copy=True)
    assert "X_scbert_bins" in out.mod["rna"].layers
    assert "X_scbert_bins" not in mdata.mod["rna"].layers
    with pytest.raises(KeyError, match="modality 'protein'"):
        sft.pp.bin_values(mdata, mod="protein")


# --------------------------------------------------------------------------------------------
# bad input: clear message, AnnData unchanged
# --------------------------------------------------------------------------------------------
def _float_cells(pbmc: ad.AnnData, n: int = 40) -> ad.AnnData:
    data = pbmc[:n].copy()
    data.X = data.X.astype(np.float32)
    return data


@pytest.mark.parametrize("flavor", ["scgpt", "scbert"])
def test_nan_is_refused(pbmc, flavor):
    data = _float_cells(pbmc)
    data.X = data.X.toarray()
    data.X[5, 7] = np.nan
    snap = snapshot(data)
    with pytest.raises(InputError, match="NaN or infinite"):
        sft.pp.bin_values(data, flavor=flavor)
    assert_unchanged(data, snap)


@pytest.mark.parametrize("flavor", ["scgpt", "scbert"])
def test_negative_is_refused(pbmc, flavor):
    data = _float_cells(pbmc)
    data.X.data[3] = -2.0
    snap = snapshot(data)
    with pytest.raises(InputError, match="negative values"):
        sft.pp.bin_values(data, flavor=flavor)
    assert_unchanged(data, snap)


def test_non_integer_is_refused_for_scbert_only(pbmc):
    data = _float_cells(pbmc)
    data.X.data[0] = 0.5
    snap = snapshot(data)
    with pytest.raises(InputError, match="non-integer values"):
        sft.pp.bin_values(data, flavor="scbert")
    assert_unchanged(data, snap)
    sft.pp.bin_values(data, flavor="scgpt")  # normalised values are fine for quantile bins
    assert data.layers["X_binned"].nnz == data.X.nnz


def test_bad_arguments_are_refused(pbmc):
    data = pbmc[:30].copy()
    snap = snapshot(data)
    with pytest.raises(ValueError, match="flavor must be one of"):
        sft.pp.bin_values(data, flavor="scfoundation")
    with pytest.raises(KeyError, match="layer 'counts' is not in adata.layers"):
        sft.pp.bin_values(data, layer="counts")
    with pytest.raises(ValueError, match="n_bins must be between 2"):
        sft.pp.bin_values(data, n_bins=1)
    with pytest.raises(TypeError, match="n_bins must be an integer"):
        sft.pp.bin_values(data, n_bins=5.0)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        sft.pp.bin_values(data, chunk_size=0)
    with pytest.raises(TypeError, match="random_state must be an integer"):
        sft.pp.bin_values(data, random_state="seed")
    with pytest.raises(ValueError, match="`mod` applies to MuData"):
        sft.pp.bin_values(data, mod="rna")
    assert_unchanged(data, snap)


def test_string_matrix_is_refused():
    data = ad.AnnData(np.array([["1", "0"], ["2", "3"]], dtype=object))
    data.layers["counts"] = np.array([["1", "0"], ["2", "3"]], dtype=object)
    snap = {"layers": sorted(data.layers.keys()), "uns": sorted(data.uns.keys())}
    for flavor in ("scgpt", "scbert"):
        with pytest.raises(InputError, match="numeric matrix"):
            sft.pp.bin_values(data, flavor=flavor, layer="counts")
    assert sorted(data.layers.keys()) == snap["layers"]
    assert sorted(data.uns.keys()) == snap["uns"] and not data.obsm


def test_empty_anndata_is_refused(pbmc):
    data = pbmc[:0].copy()
    with pytest.raises(InputError, match="nothing to bin"):
        sft.pp.bin_values(data)
    assert "X_binned" not in data.layers
