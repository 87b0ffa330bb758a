"""sft.tl.embed_cells through the public API, on the official scGPT fixture and real cells."""

import hashlib
import json
import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import scfm_tools as sft
from _unchanged import assert_unchanged, snapshot
from scfm_tools._validation import InputError


@pytest.fixture(scope="module")
def scgpt_fixture(fixtures_dir):
    root = fixtures_dir / "scgpt"
    meta = json.loads((root / "fixture_meta.json").read_text())
    arrays = dict(np.load(root / "fixture_io.npz"))
    return root, meta, arrays


def _fixture_adata(arrays):
    counts = arrays["counts"]
    return ad.AnnData(
        sparse.csr_matrix(counts),
        obs=pd.DataFrame(index=[f"cell{i}" for i in range(counts.shape[0])]),
        var=pd.DataFrame(index=[str(g) for g in arrays["var_names"]]),
    )


@pytest.mark.conformance
def test_embed_cells_reproduces_official_embed_data(scgpt_fixture):
    root, meta, arrays = scgpt_fixture
    adata = _fixture_adata(arrays)
    sft.tl.embed_cells(
        adata, root / "ckpt_folder", random_state=0, random_stream="official", device="cpu"
    )
    tol = meta["tolerance"]
    np.testing.assert_allclose(
        adata.obsm["X_scgpt"], arrays["cell_emb_embed_data"], atol=tol["atol"], rtol=tol["rtol"]
    )
    params = adata.uns["scgpt"]["params"]
    weights = root / "ckpt_folder" / "best_model.pt"
    assert params["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert params["family"] == "scgpt" and params["random_state"] == 0
    assert params["random_stream"] == "official"
    vocab = json.loads((root / "ckpt_folder" / "vocab.json").read_text())
    assert params["n_genes_matched"] == int(np.isin(adata.var_names, list(vocab)).sum())


def test_copy_key_added_backed_and_batch_independence(scgpt_fixture, tmp_path):
    root, _, arrays = scgpt_fixture
    adata = _fixture_adata(arrays)
    out = sft.tl.embed_cells(adata, root / "ckpt_folder", key_added="X_emb", copy=True)
    assert "X_emb" not in adata.obsm and "emb" not in adata.uns
    embsize = json.loads((root / "ckpt_folder" / "args.json").read_text())["embsize"]
    assert out.obsm["X_emb"].shape == (adata.n_obs, embsize)
    np.testing.assert_allclose(np.linalg.norm(out.obsm["X_emb"], axis=1), 1.0, atol=1e-5)
    small = sft.tl.embed_cells(adata, root / "ckpt_folder", batch_size=1, chunk_size=2, copy=True)
    np.testing.assert_allclose(small.obsm["X_scgpt"], out.obsm["X_emb"], atol=1e-5)
    path = tmp_path / "fixture.h5ad"
    adata.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    sft.tl.embed_cells(backed, root / "ckpt_folder", chunk_size=4)
    np.testing.assert_allclose(backed.obsm["X_scgpt"], out.obsm["X_emb"], atol=1e-5)
    backed.file.close()


def test_lognormalised_values_warn_and_stay_close(scgpt_fixture, caplog):
    root, _, arrays = scgpt_fixture
    counts = _fixture_adata(arrays)
    lognorm = counts.copy()
    X = lognorm.X.toarray()
    X = np.log1p(X / X.sum(1, keepdims=True) * 1e4)
    lognorm.X = sparse.csr_matrix(X)
    logger = logging.getLogger("scfm_tools")
    logger.propagate = True
    try:
        with caplog.at_level(logging.WARNING, logger="scfm_tools"):
            sft.tl.embed_cells(lognorm, root / "ckpt_folder")
    finally:
        logger.propagate = False
    assert any("not raw counts" in r.getMessage() for r in caplog.records)
    sft.tl.embed_cells(counts, root / "ckpt_folder")
    cos = np.sum(counts.obsm["X_scgpt"] * lognorm.obsm["X_scgpt"], axis=1)
    assert cos.min() > 0.9


@pytest.mark.parametrize("problem", ["nan", "negative", "empty_cell", "duplicate_gene"])
def test_bad_input_is_refused_and_adata_unchanged(scgpt_fixture, problem):
    root, _, arrays = scgpt_fixture
    adata = _fixture_adata(arrays)
    X = adata.X.toarray()
    if problem == "nan":
        X[1, 2], match = np.nan, "NaN"
    elif problem == "negative":
        X[1, 2], match = -1, "negative"
    elif problem == "empty_cell":
        X[3], match = 0, "empty cells"
    if problem == "duplicate_gene":
        names = list(adata.var_names)
        names[1] = names[0]
        adata.var_names = names
        match = "duplicated"
    adata.X = sparse.csr_matrix(X)
    snap = snapshot(adata)
    with pytest.raises(InputError, match=match):
        sft.tl.embed_cells(adata, root / "ckpt_folder")
    assert_unchanged(adata, snap)


def test_no_gene_overlap_is_refused(scgpt_fixture, read_shared):
    root, _, _ = scgpt_fixture
    adata = read_shared("pbmc8k_200genes_labeled.h5ad")[:40].copy()
    snap = snapshot(adata)
    with pytest.raises(InputError, match="too few genes match"):
        sft.tl.embed_cells(adata, root / "ckpt_folder")
    assert_unchanged(adata, snap)


def test_bad_model_arguments(scgpt_fixture, tmp_path):
    root, _, arrays = scgpt_fixture
    adata = _fixture_adata(arrays)
    with pytest.raises(KeyError, match="No model card named 'no-such-model'"):
        sft.tl.embed_cells(adata, "no-such-model")
    folder = tmp_path / "broken"
    folder.mkdir()
    for name in ("best_model.pt", "vocab.json"):
        (folder / name).write_bytes((root / "ckpt_folder" / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="args.json"):
        sft.tl.embed_cells(adata, folder)
    assert "X_scgpt" not in adata.obsm


def test_mudata_modality(scgpt_fixture):
    mudata = pytest.importorskip("mudata")
    root, _, arrays = scgpt_fixture
    rna = _fixture_adata(arrays)
    mdata = mudata.MuData({"rna": rna})
    sft.tl.embed_cells(mdata, root / "ckpt_folder", mod="rna")
    assert mdata.mod["rna"].obsm["X_scgpt"].shape[0] == rna.n_obs
    np.testing.assert_array_equal(mdata.obsm["X_scgpt"], mdata.mod["rna"].obsm["X_scgpt"])


def test_count_models_refuse_lognormalised_values(fixtures_dir):
    # CellPLM takes log1p of raw counts inside the model: other values must be refused, not warned.
    arrays = dict(np.load(fixtures_dir / "cellplm" / "fixture_io.npz"))
    counts = np.asarray(arrays["counts"], dtype=np.float32)
    lognorm = np.log1p(counts / np.maximum(counts.sum(1, keepdims=True), 1) * 1e4)
    adata = ad.AnnData(
        sparse.csr_matrix(lognorm),
        var=pd.DataFrame(index=[str(g) for g in arrays["var_names"]]),
    )
    snap = snapshot(adata)
    with pytest.raises(InputError, match="non-integer values"):
        sft.tl.embed_cells(adata, fixtures_dir / "cellplm" / "fixture.best.ckpt")
    assert_unchanged(adata, snap)


def test_view_of_backed_adata_is_refused_before_any_work(scgpt_fixture, tmp_path, monkeypatch):
    root, _, arrays = scgpt_fixture
    path = tmp_path / "fixture.h5ad"
    _fixture_adata(arrays).write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    view = backed[:4]

    def no_model(*args, **kwargs):
        raise AssertionError("the model was reached")

    for where in ("_embed_cells", "_embed_genes", "_impute"):
        monkeypatch.setattr(f"scfm_tools.tl.{where}.locate_model", no_model)
    for call in (sft.tl.embed_cells, sft.tl.embed_genes, sft.tl.impute):
        with pytest.raises(InputError, match=r"view \(a subset\) of a backed AnnData.*to_memory"):
            call(view, root / "ckpt_folder")
    assert view.obsm.keys() == set() and backed.isbacked
    monkeypatch.undo()
    # what the message advises works, and gives the same as the parent's first cells
    subset = view.to_memory()
    sft.tl.embed_cells(subset, root / "ckpt_folder")
    whole = sft.tl.embed_cells(_fixture_adata(arrays), root / "ckpt_folder", copy=True)
    np.testing.assert_allclose(subset.obsm["X_scgpt"], whole.obsm["X_scgpt"][:4], atol=1e-5)
    backed.file.close()


def test_dense_float16_counts_embed_as_float32(scgpt_fixture):
    root, _, arrays = scgpt_fixture
    adata = _fixture_adata(arrays)
    half = ad.AnnData(adata.X.toarray().astype(np.float16), obs=adata.obs, var=adata.var)
    snap = snapshot(half)
    sft.tl.embed_cells(half, root / "ckpt_folder", chunk_size=3)
    sft.tl.embed_cells(adata, root / "ckpt_folder")
    np.testing.assert_allclose(half.obsm["X_scgpt"], adata.obsm["X_scgpt"], atol=1e-5)
    assert half.X.dtype == np.float16  # widened a block at a time, the input left as it was
    del half.obsm["X_scgpt"], half.uns["scgpt"]
    assert_unchanged(half, snap)


def test_letter_case_warning_advises_what_embed_cells_takes(scgpt_fixture, caplog, monkeypatch):
    root, _, arrays = scgpt_fixture
    adata = _fixture_adata(arrays)
    # mouse-style symbols (Cd3e for CD3E): found only by ignoring letter case
    adata.var_names = [g[0] + g[1:].lower() if g.isupper() else g for g in adata.var_names]
    monkeypatch.setattr(logging.getLogger("scfm_tools"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="scfm_tools")
    sft.tl.embed_cells(adata, root / "ckpt_folder")
    warnings = [r.getMessage() for r in caplog.records if "letter case" in r.getMessage()]
    assert warnings and all("gene_key=" in w and "sft.pp.match_genes" in w for w in warnings)
    # the advice holds: embed_cells takes gene_key=, and refuses case_insensitive=
    adata.var["human"] = [g.upper() for g in adata.var_names]
    caplog.clear()
    sft.tl.embed_cells(adata, root / "ckpt_folder", gene_key="human")
    assert "letter case" not in caplog.text
    with pytest.raises(TypeError):
        sft.tl.embed_cells(adata, root / "ckpt_folder", case_insensitive=False)
