import anndata as ad
import numpy as np
import pytest
from scipy import sparse

from _unchanged import assert_unchanged, snapshot
from scfm_tools._anndata import as_block, iter_chunks, resolve_adata
from scfm_tools._validation import (
    InputError,
    _rows_with_nonzero,
    check_counts,
    check_lognorm,
    check_nonempty,
    check_unique_names,
)


@pytest.fixture
def pbmc(read_shared):
    return read_shared("pbmc8k_200genes_labeled.h5ad")


def test_real_counts_pass(pbmc):
    check_counts(pbmc)
    check_nonempty(pbmc)


def test_lognorm_data_is_not_counts(pbmc):
    import scanpy as sc

    sc.pp.normalize_total(pbmc)
    sc.pp.log1p(pbmc)
    snap = snapshot(pbmc)
    with pytest.raises(InputError, match="non-integer values") as err:
        check_counts(pbmc)
    assert "layer=" in str(err.value) and "at cell" in str(err.value)
    check_lognorm(pbmc)
    assert_unchanged(pbmc, snap)


def test_counts_are_not_lognorm(pbmc):
    with pytest.raises(InputError, match="look like raw counts"):
        check_lognorm(pbmc)


@pytest.mark.parametrize("dense", [True, False])
def test_nan_and_negative_named_with_cell_and_gene(pbmc, dense):
    X = pbmc.X.toarray().astype(np.float32)
    X[5, 3] = np.nan
    bad = ad.AnnData(X if dense else sparse.csr_matrix(X), obs=pbmc.obs, var=pbmc.var)
    with pytest.raises(InputError, match="NaN") as err:
        check_counts(bad, chunk_size=4)
    assert repr(pbmc.obs_names[5]) in str(err.value)
    assert repr(pbmc.var_names[3]) in str(err.value)
    X[5, 3] = -2
    bad = ad.AnnData(X if dense else sparse.csr_matrix(X), obs=pbmc.obs, var=pbmc.var)
    with pytest.raises(InputError, match="negative"):
        check_counts(bad)
    with pytest.raises(InputError, match="negative"):
        check_lognorm(bad)


def test_non_numeric_dtype_refused():
    bad = ad.AnnData(np.array([["a", "b"], ["c", "d"]], dtype=object))
    with pytest.raises(InputError, match="dtype"):
        check_counts(bad)


def test_empty_cells_and_genes(pbmc):
    sub = pbmc[:50].copy()
    X = sub.X.toarray()
    X[7] = 0
    sub.X = sparse.csr_matrix(X)
    with pytest.raises(InputError, match="empty cells") as err:
        check_nonempty(sub)
    assert sub.obs_names[7] in str(err.value)
    zero_gene = np.flatnonzero(np.asarray(pbmc[:50].X.sum(0)).ravel() == 0)
    ok = pbmc[:50].copy()
    if zero_gene.size == 0:
        X = ok.X.toarray()
        X[:, 0] = 0
        ok.X = sparse.csr_matrix(X)
    with pytest.raises(InputError, match="zero in every cell"):
        check_nonempty(ok, cells=False, genes=True)
    with pytest.raises(InputError, match="at least one cell"):
        check_nonempty(pbmc[:0].copy())


def test_rows_with_nonzero_reads_stored_values():
    """Empty rows found without abs(block) copies: stored zeros, runs of rows storing nothing."""
    data = np.array([0, 3, -1, 0, 0, 0, 2.5])
    indices = np.array([4, 0, 2, 3, 1, 2, 0])
    indptr = np.array([0, 0, 1, 1, 3, 4, 4, 6, 7, 7])  # rows 0, 2, 5, 8 store nothing
    block = sparse.csr_matrix((data, indices, indptr), shape=(9, 5))
    assert block.nnz == 7  # the explicit zeros are kept
    # rows 1, 4 and 6 store only zeros; row 3 holds a negative value
    want = [False, False, False, True, False, False, False, True, False]
    np.testing.assert_array_equal(_rows_with_nonzero(block), want)
    np.testing.assert_array_equal(_rows_with_nonzero(block.toarray()), want)
    empty = sparse.csr_matrix((4, 5))
    np.testing.assert_array_equal(_rows_with_nonzero(empty), [False] * 4)


def test_duplicated_gene_names(pbmc):
    names = list(pbmc.var_names)
    names[1] = names[0]
    with pytest.raises(InputError, match="duplicated") as err:
        check_unique_names(names)
    assert names[0] in str(err.value)


def test_iter_chunks_dense_sparse_backed_agree(pbmc, data_dir):
    full = pbmc.X.toarray()
    backed = ad.read_h5ad(data_dir / "pbmc8k_200genes_labeled.h5ad", backed="r")
    for obj in (pbmc, ad.AnnData(full), backed):
        parts = [
            b.toarray() if sparse.issparse(b) else b for _, b in iter_chunks(obj, chunk_size=999)
        ]
        np.testing.assert_array_equal(np.vstack(parts), full)
    check_counts(backed, chunk_size=1000)
    backed.file.close()


def test_missing_layer_is_clear(pbmc):
    with pytest.raises(KeyError, match="not in adata.layers"):
        check_counts(pbmc, layer="counts")


def test_resolve_adata_copy_and_mudata(pbmc, data_dir):
    obj, target = resolve_adata(pbmc, copy=True)
    assert obj is target and obj is not pbmc
    mudata = pytest.importorskip("mudata")
    mdata = mudata.read_h5mu(data_dir / "citeseq_pbmc_hao2021_tiny.h5mu")
    obj, target = resolve_adata(mdata)
    assert obj is mdata and target is mdata.mod["rna"]
    with pytest.raises(KeyError, match="modality 'atac'"):
        resolve_adata(mdata, mod="atac")
    with pytest.raises(TypeError, match="expected an AnnData"):
        resolve_adata(np.zeros((2, 2)))


def test_float16_blocks_are_widened_one_block_at_a_time(pbmc):
    from scfm_tools.models.cellplm._sequences import to_model_genes
    from scfm_tools.pp import match_to_vocab

    half = pbmc.X.toarray().astype(np.float16)
    blocks = [b for _, b in iter_chunks(ad.AnnData(half), chunk_size=999)]
    assert {b.dtype for b in blocks} == {np.dtype(np.float32)}
    np.testing.assert_array_equal(np.vstack(blocks), half.astype(np.float32))
    assert as_block(half[:3]).dtype == np.float32 and half.dtype == np.float16
    assert as_block(half[:3].astype(np.int32)).dtype == np.int32  # other types as they are
    # CellPLM reads its rows itself: the same widening
    match = match_to_vocab(pbmc.var_names.to_numpy(), {g: i for i, g in enumerate(pbmc.var_names)})
    got = to_model_genes(half[:5], match, pbmc.n_vars).to_dense().numpy()
    np.testing.assert_array_equal(got, half[:5].astype(np.float32))


def test_view_of_backed_adata_is_refused(data_dir):
    backed = ad.read_h5ad(data_dir / "pbmc8k_200genes_labeled.h5ad", backed="r")
    with pytest.raises(InputError, match=r"to_memory\(\)"):
        resolve_adata(backed[:10])
    obj, target = resolve_adata(backed)  # the backed AnnData itself takes results in memory
    assert obj is target is backed
    backed.file.close()


def test_csr_row_views_share_the_matrix_and_cannot_write_to_it(pbmc):
    from scfm_tools._anndata import csr_row_view

    X = sparse.csr_matrix(pbmc.X)
    view = csr_row_view(X, 10, 50)
    assert np.shares_memory(view.data, X.data) and np.shares_memory(view.indices, X.indices)
    assert (view != X[10:50]).nnz == 0 and view.shape == (40, X.shape[1])
    with pytest.raises(ValueError, match="read-only"):
        view.data[:] = 0
    assert csr_row_view(X, X.shape[0] - 3, X.shape[0] + 10).shape[0] == 3  # clipped at the end
    assert as_block(view) is view  # passed on as it is, not re-wrapped (which would copy)
    for other in (X.toarray(), X.tocsc()):
        assert csr_row_view(other, 0, 5) is None
    # the checks read views: the same blocks as copies would give, and the matrix untouched
    adata = ad.AnnData(X.copy())
    snap = snapshot(adata)
    blocks = [b for _, b in iter_chunks(adata, chunk_size=97, views=True)]
    assert all(np.shares_memory(b.data, adata.X.data) for b in blocks if b.nnz)
    assert (sparse.vstack(blocks) != X).nnz == 0
    check_counts(adata, chunk_size=97)
    check_nonempty(adata, chunk_size=97)
    assert_unchanged(adata, snap)
    adata.X.data[0] = -1.0  # an offender is still found and named through a view
    with pytest.raises(InputError, match="negative values"):
        check_counts(adata, chunk_size=97)
