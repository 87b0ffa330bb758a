"""Backed (on-disk) AnnData: embeddings, input checks and imputation stream row chunks.

Peak memory is measured by ``benchmarks/bench_out_of_core.py``, not here; these tests check
that backed inputs give the in-memory results, that the checks read at most ``chunk_size``
rows at a time, and that ``impute(out=...)`` writes complete files or none.
"""

from __future__ import annotations

import weakref

import anndata as ad
import numpy as np
import pytest
from scipy import sparse

import scfm_tools as sft
from _scfoundation_tiny import tiny_checkpoint
from scfm_tools import _anndata
from scfm_tools._anndata import report_rows
from scfm_tools._h5ad import write_h5ad
from scfm_tools._validation import InputError, check_counts, check_nonempty

KEY = "scfoundation_imputed"


@pytest.fixture(scope="module")
def cells_file(data_dir, tmp_path_factory):
    """100 real CellBench cells (raw counts) written to disk."""
    adata = ad.read_h5ad(data_dir / "cellbench_3celllines_celseq2_dropseq.h5ad")
    rows = np.sort(np.random.default_rng(1).choice(adata.n_obs, 100, replace=False))
    path = tmp_path_factory.mktemp("ooc") / "cells.h5ad"
    adata[rows].copy().write_h5ad(path)
    return path


@pytest.fixture
def backed(cells_file):
    adata = ad.read_h5ad(cells_file, backed="r")
    yield adata
    adata.file.close()


def test_embed_cells_on_backed_equals_in_memory(cells_file, backed):
    memory = ad.read_h5ad(cells_file)
    sft.tl.embed_cells(memory, "scgpt-default")
    passes: list[tuple[int, int]] = []
    with report_rows(lambda done, total: passes.append((done, total))):
        sft.tl.embed_cells(backed, "scgpt-default", chunk_size=40, batch_size=16)
    np.testing.assert_allclose(backed.obsm["X_scgpt"], memory.obsm["X_scgpt"], atol=1e-5)
    assert backed.isbacked and backed.uns["scgpt"]["params"]["model"] == "scgpt-default"
    # every pass (the input checks, then the model) went over the rows 40 at a time
    assert passes[:3] == [(40, 100), (80, 100), (100, 100)]
    assert len(passes) % 3 == 0 and passes[-1] == (100, 100) and len(passes) >= 6


def test_gene_tasks_on_backed_equal_in_memory(cells_file, backed):
    """Context gene embeddings and the attention GRN read a backed file chunk by chunk."""
    memory = ad.read_h5ad(cells_file)
    counts = np.asarray((memory.X > 0).sum(axis=0)).ravel()
    genes = list(memory.var_names[np.argsort(-counts, kind="stable")[:40]])
    for adata, chunk_size in ((memory, 10_000), (backed, 30)):
        sft.tl.embed_genes(adata, mode="context", chunk_size=chunk_size)
        sft.tl.grn(adata, genes=genes, top_k=5, chunk_size=chunk_size)
    assert backed.isbacked
    got, want = backed.varm["X_scgpt_genes"], memory.varm["X_scgpt_genes"]
    assert np.isfinite(want).sum() > 0
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_array_equal(
        backed.var["scgpt_genes_n_cells"], memory.var["scgpt_genes_n_cells"]
    )
    got, want = backed.varp["scgpt_grn_attention"], memory.varp["scgpt_grn_attention"]
    assert want.nnz > 0
    np.testing.assert_allclose(got.toarray(), want.toarray(), atol=1e-6)


def test_copy_of_backed_is_refused_clearly(backed):
    with pytest.raises(ValueError, match=r"copy=True would load this backed AnnData"):
        sft.tl.embed_cells(backed, copy=True)
    assert len(backed.obsm) == 0


class _Spy:
    """A matrix that records how many rows each read asks for."""

    def __init__(self, X):
        self.X, self.reads = X, []
        self.shape, self.dtype = X.shape, X.dtype

    def __getitem__(self, index):
        block = self.X[index]
        self.reads.append(block.shape[0])
        return block


def test_checks_read_backed_data_in_chunks(backed, monkeypatch):
    spy = _Spy(backed.X)
    monkeypatch.setattr(_anndata, "get_matrix", lambda adata, layer=None: spy)
    check_counts(backed, chunk_size=32)
    check_nonempty(backed, chunk_size=32)
    assert max(spy.reads) == 32 and sum(spy.reads) == 3 * backed.n_obs
    # genes are summed over all chunks before any is refused (this subset has unseen genes)
    spy.reads.clear()
    with pytest.raises(InputError, match="genes that are zero in every cell"):
        check_nonempty(backed, chunk_size=32, genes=True)
    assert spy.reads == [32, 32, 32, 4]


class _Tracked:
    """A matrix that notes, at each read, whether earlier blocks' data are still alive."""

    def __init__(self, X):
        self.X, self.shape, self.dtype = X, X.shape, X.dtype
        self.refs: list[weakref.ref] = []
        self.alive_at_read: list[int] = []

    def __getitem__(self, index):
        self.alive_at_read.append(sum(ref() is not None for ref in self.refs))
        block = self.X[index]
        self.refs.append(weakref.ref(block.data))
        return block


def test_row_passes_hold_one_block_at_a_time(backed, monkeypatch):
    """No earlier block is alive when the next is read: two deep-cell blocks would be ~1 GB."""
    tracked = _Tracked(backed.X[:])
    for block in _anndata.row_blocks(tracked, chunk_size=30):
        assert block.shape[1] == backed.n_vars
        del block
    assert tracked.alive_at_read == [0, 0, 0, 0]
    monkeypatch.setattr(_anndata, "get_matrix", lambda adata, layer=None: tracked)
    tracked.refs.clear(), tracked.alive_at_read.clear()
    check_counts(backed, chunk_size=30)
    check_nonempty(backed, chunk_size=30, genes=False)
    assert tracked.alive_at_read == [0] * 12


def test_checks_on_backed_data_name_the_cell(cells_file, tmp_path):
    adata = ad.read_h5ad(cells_file)
    keep = np.ones(adata.n_obs)
    keep[57] = 0
    adata.X = sparse.csr_matrix(sparse.diags(keep) @ adata.X)
    adata.X.eliminate_zeros()
    path = tmp_path / "empty_cell.h5ad"
    adata.write_h5ad(path)
    on_disk = ad.read_h5ad(path, backed="r")
    with pytest.raises(InputError, match=rf"empty cells .*{adata.obs_names[57]}"):
        sft.tl.embed_cells(on_disk, chunk_size=20)
    assert len(on_disk.obsm) == 0
    on_disk.file.close()


# impute -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pbmc(data_dir, tmp_path_factory):
    """6 real full-transcriptome PBMCs (2 per chemistry) on disk, and a tiny scFoundation."""
    adata = ad.read_h5ad(data_dir / "pbmc_10x_3chemistries_unlabeled.h5ad")
    rows = np.concatenate(
        [np.flatnonzero(adata.obs["batch"] == b)[:2] for b in adata.obs["batch"].unique()]
    )
    folder = tmp_path_factory.mktemp("ooc_pbmc")
    adata[rows].copy().write_h5ad(folder / "pbmc.h5ad")
    expected = adata[rows].copy()
    ckpt = tiny_checkpoint(folder, seed=2)
    sft.tl.impute(expected, ckpt)
    return folder / "pbmc.h5ad", ckpt, expected


def test_impute_backed_needs_out(pbmc):
    path, ckpt, _ = pbmc
    adata = ad.read_h5ad(path, backed="r")
    with pytest.raises(ValueError, match=r"adata is backed .* Pass out="):
        sft.tl.impute(adata, ckpt)
    assert not adata.layers and KEY not in adata.uns
    adata.file.close()


def test_impute_backed_writes_the_result_file_in_chunks(pbmc, tmp_path):
    path, ckpt, expected = pbmc
    adata = ad.read_h5ad(path, backed="r")
    out = tmp_path / "imputed.h5ad"
    assert sft.tl.impute(adata, ckpt, out=out, chunk_size=4) is None
    assert not adata.layers and KEY not in adata.uns  # the input is left as it was
    result = ad.read_h5ad(out)
    np.testing.assert_allclose(result.layers[KEY], expected.layers[KEY], atol=1e-5)
    assert np.isnan(result.layers[KEY]).sum() == np.isnan(expected.layers[KEY]).sum() > 0
    assert result.uns[KEY]["params"] == expected.uns[KEY]["params"]
    assert (result.X != expected.X).nnz == 0 and list(result.obs_names) == list(adata.obs_names)
    adata.file.close()


def test_impute_out_from_memory_leaves_adata_unchanged(pbmc, tmp_path):
    path, ckpt, expected = pbmc
    adata = ad.read_h5ad(path)
    out = tmp_path / "imputed.h5ad"
    sft.tl.impute(adata, ckpt, out=out)
    assert not adata.layers and KEY not in adata.uns
    np.testing.assert_allclose(ad.read_h5ad(out).layers[KEY], expected.layers[KEY], atol=1e-5)


def test_impute_out_refusals_and_failures_leave_no_file(pbmc, tmp_path):
    path, ckpt, _ = pbmc
    adata = ad.read_h5ad(path, backed="r")
    out = tmp_path / "imputed.h5ad"
    out.write_bytes(b"old")
    with pytest.raises(FileExistsError, match="exists already"):
        sft.tl.impute(adata, ckpt, out=out)
    assert out.read_bytes() == b"old"
    with pytest.raises(ValueError, match="either out= .* or copy=True"):
        sft.tl.impute(adata, ckpt, out=tmp_path / "x.h5ad", copy=True)
    # the model fails after the output file was started: nothing is left behind
    fresh = tmp_path / "fresh.h5ad"
    with pytest.raises(ValueError):
        sft.tl.impute(adata, ckpt, out=fresh, target_depth="z9")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imputed.h5ad"]
    adata.file.close()


def test_impute_out_with_cells_that_attend_to_each_other(data_dir, fixtures_dir, tmp_path):
    """CellPLM runs on all cells at once; its result and var column still reach the file."""
    import json

    ckpt = fixtures_dir / "cellplm" / "fixture.best.ckpt"
    genes = json.loads((fixtures_dir / "cellplm" / "fixture.config.json").read_text())
    adata = ad.read_h5ad(data_dir / "pbmc_10x_3chemistries_unlabeled.h5ad")
    matched = sft.pp.match_to_vocab(adata.var_names, genes["gene_list"]).matched
    rows = np.concatenate(
        [
            np.flatnonzero(adata.obs["batch"] == b)[:30]
            for b in ("1k_PBMC_v2_filt", "1k_PBMC_v3_filt", "5prime_PBMC_filt_1kcells")
        ]
    )
    adata = adata[rows, matched].copy()
    adata = adata[np.asarray(adata.X.sum(1)).ravel() > 0].copy()
    adata.write_h5ad(tmp_path / "in.h5ad")
    expected = adata.copy()
    sft.tl.impute(expected, ckpt, batch_key="batch")
    on_disk = ad.read_h5ad(tmp_path / "in.h5ad", backed="r")
    sft.tl.impute(on_disk, ckpt, batch_key="batch", out=tmp_path / "out.h5ad", chunk_size=16)
    result = ad.read_h5ad(tmp_path / "out.h5ad")
    key = "cellplm_denoised"
    np.testing.assert_allclose(result.layers[key], expected.layers[key], rtol=1e-5)
    np.testing.assert_allclose(result.var[f"{key}_dispersion"], expected.var[f"{key}_dispersion"])
    assert result.uns[key]["params"]["n_sequences"] == 3
    on_disk.file.close()


def test_write_h5ad_of_backed_keeps_changes_made_in_memory(cells_file, tmp_path):
    adata = ad.read_h5ad(cells_file, backed="r")
    adata.obs["score"] = np.arange(adata.n_obs, dtype=float)
    adata.obsm["X_test"] = np.ones((adata.n_obs, 2), dtype=np.float32)
    write_h5ad(adata, tmp_path / "copy.h5ad")
    result = ad.read_h5ad(tmp_path / "copy.h5ad")
    np.testing.assert_array_equal(result.obs["score"], np.arange(adata.n_obs))
    assert result.obsm["X_test"].shape == (adata.n_obs, 2)
    assert (result.X != ad.read_h5ad(cells_file).X).nnz == 0
    with pytest.raises(ValueError, match="onto itself"):
        write_h5ad(adata, cells_file)
    adata.file.close()
