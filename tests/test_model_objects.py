"""One path from sft.tl to the model classes: a model object gives what its name or path gives."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse

import scfm_tools as sft
from _unchanged import assert_unchanged, snapshot
from scfm_tools.models import SCBERT, SCGPT, CellPLM, SCFoundation
from scfm_tools.models.base import clear_model_cache, load_model, model_class

CELLBENCH = "cellbench_3celllines_celseq2_dropseq.h5ad"
PBMC = "pbmc8k_200genes_labeled.h5ad"


@pytest.fixture(scope="module")
def cells(data_dir):
    adata = ad.read_h5ad(data_dir / CELLBENCH)
    return adata[np.random.default_rng(0).permutation(adata.n_obs)[:40]].copy()


@pytest.fixture(scope="module")
def pbmc(data_dir):
    return ad.read_h5ad(data_dir / PBMC)[:30].copy()


@pytest.fixture(scope="module")
def plm_cells(fixtures_dir):
    """The CellPLM fixture's cells: counts on (a subset of) its own gene list, in samples."""
    arrays = dict(np.load(fixtures_dir / "cellplm" / "fixture_io.npz"))
    return ad.AnnData(
        sparse.csr_matrix(arrays["counts"]),
        obs=pd.DataFrame(
            {"batch": arrays["obs_batch"].astype(str)},
            index=[f"c{i}" for i in range(len(arrays["counts"]))],
        ),
        var=pd.DataFrame(index=[str(g) for g in arrays["var_names"]]),
    )


@pytest.fixture(scope="module")
def scbert_ckpt(pbmc, tmp_path_factory):
    """A tiny scBERT checkpoint (official layout with gene_list.txt) on the data's genes."""
    adata = ad.AnnData(pbmc.X.copy(), var=pd.DataFrame(index=pbmc.var_names))
    SCBERT.setup_anndata(adata)
    torch.manual_seed(0)
    g2v = np.random.default_rng(2).normal(size=(adata.n_vars, 8))
    model = SCBERT(adata, gene2vec=g2v, dim=8, depth=2, heads=2, dim_head=4)
    return model.export_checkpoint(tmp_path_factory.mktemp("scbert"))


def test_unbound_models_load_without_adata(fixtures_dir, scfoundation_ckpt, scbert_ckpt):
    sources = {
        SCGPT: "scgpt-default",
        SCBERT: scbert_ckpt,
        SCFoundation: scfoundation_ckpt,
        CellPLM: fixtures_dir / "cellplm",
    }
    for cls, source in sources.items():
        model = cls.from_pretrained(source)
        assert model.adata is None
        assert model.family == cls.family and model_class(cls.family) is cls
        assert "no AnnData" in repr(model)
        record = model.params()
        assert record["family"] == cls.family and len(record["weights_sha256"]) == 64


@pytest.mark.parametrize("family", ["scgpt", "scbert", "scfoundation", "cellplm"])
def test_embed_cells_with_object_equals_path(
    family, cells, pbmc, plm_cells, fixtures_dir, scfoundation_ckpt, scbert_ckpt
):
    source, obj, data, kwargs = {
        "scgpt": ("scgpt-default", lambda: SCGPT.from_pretrained("scgpt-default"), cells, {}),
        "scbert": (scbert_ckpt, lambda: SCBERT.from_pretrained(scbert_ckpt), pbmc, {}),
        # tl reads the weights the official cell embedding uses: the "cell" entry.
        "scfoundation": (
            scfoundation_ckpt,
            lambda: SCFoundation.from_pretrained(scfoundation_ckpt, entry="cell"),
            pbmc,
            {},
        ),
        "cellplm": (
            fixtures_dir / "cellplm",
            lambda: CellPLM.from_pretrained(fixtures_dir / "cellplm"),
            plm_cells,
            {"batch_key": "batch"},
        ),
    }[family]
    by_name = data.copy()
    sft.tl.embed_cells(by_name, source, **kwargs)
    by_object = data.copy()
    model = obj()
    sft.tl.embed_cells(by_object, model, **kwargs)
    key = f"X_{family}"
    np.testing.assert_allclose(by_object.obsm[key], by_name.obsm[key], atol=1e-6)
    assert (
        by_object.uns[family]["params"]["weights_sha256"]
        == (by_name.uns[family]["params"]["weights_sha256"])
    )
    direct = model.get_latent_representation(data, **kwargs)
    np.testing.assert_allclose(direct, by_name.obsm[key], atol=1e-6)


def test_a_model_trained_here_runs_through_tl(cells):
    adata = cells[:, :300].copy()
    SCGPT.setup_anndata(adata)
    torch.manual_seed(0)
    model = SCGPT(adata, d_model=16, n_heads=2, d_hid=16, n_layers=1, max_seq_len=64)
    model.train(max_epochs=1, batch_size=20, accelerator="cpu", enable_progress_bar=False)
    query = adata.copy()
    sft.tl.embed_cells(query, model)
    np.testing.assert_allclose(
        query.obsm["X_scgpt"], model.get_latent_representation(query), atol=1e-6
    )
    assert query.uns["scgpt"]["params"]["trained_here"] is True
    assert np.isfinite(query.obsm["X_scgpt"]).all()


def test_impute_with_object_equals_path(plm_cells, fixtures_dir, pbmc, scfoundation_ckpt):
    root = fixtures_dir / "cellplm"
    by_path = sft.tl.impute(plm_cells, root, batch_key="batch", copy=True)
    model = CellPLM.from_pretrained(root)
    by_object = sft.tl.impute(plm_cells, model, batch_key="batch", copy=True)
    np.testing.assert_allclose(
        by_object.layers["cellplm_denoised"], by_path.layers["cellplm_denoised"], atol=1e-5
    )
    by_path = sft.tl.impute(pbmc, scfoundation_ckpt, copy=True)
    model = SCFoundation.from_pretrained(scfoundation_ckpt, entry="gene")
    by_object = sft.tl.impute(pbmc, model, copy=True)
    np.testing.assert_allclose(
        by_object.layers["scfoundation_imputed"],
        by_path.layers["scfoundation_imputed"],
        atol=1e-5,
        equal_nan=True,
    )
    with pytest.raises(ValueError, match=r"choose the weights.*entry='rde'"):
        sft.tl.impute(pbmc, model, entry="rde", copy=True)


def test_gene_tasks_with_object_equal_path(cells):
    by_name = sft.tl.embed_genes(cells, copy=True)
    by_object = sft.tl.embed_genes(cells, SCGPT.from_pretrained("scgpt-default"), copy=True)
    np.testing.assert_array_equal(by_object.varm["X_scgpt_genes"], by_name.varm["X_scgpt_genes"])
    genes = list(cells.var_names[np.asarray(cells.X.sum(0)).ravel().argsort()[-30:]])
    by_name = sft.tl.grn(cells, method="attention", genes=genes, copy=True)
    model = SCGPT.from_pretrained("scgpt-default")
    by_object = sft.tl.grn(cells, model, method="attention", genes=genes, copy=True)
    key = "scgpt_grn_attention"
    assert (by_object.varp[key] != by_name.varp[key]).nnz == 0


def test_gene_modules_with_object_equals_name(cells):
    by_name = sft.tl.gene_modules(cells, score_cells=False, copy=True)
    model = SCGPT.from_pretrained("scgpt-default")
    by_object = sft.tl.gene_modules(cells, model, score_cells=False, copy=True)
    assert by_object.var["gene_module"].equals(by_name.var["gene_module"])
    assert by_object.uns["gene_module"]["params"]["model"] == "scgpt-default"


def test_a_checkpoint_is_loaded_once(cells, monkeypatch):
    from scfm_tools.models.scgpt import _model

    calls = []
    original = _model.load_scgpt_checkpoint
    monkeypatch.setattr(
        _model, "load_scgpt_checkpoint", lambda *a, **k: calls.append(a) or original(*a, **k)
    )
    clear_model_cache()
    sft.tl.embed_cells(cells, "scgpt-default", key_added="X_a")
    sft.tl.embed_genes(cells, "scgpt-default")
    sft.tl.embed_cells(cells, "scgpt-default", key_added="X_b")
    assert len(calls) == 1
    assert load_model("scgpt-default") is load_model("scgpt-default")
    clear_model_cache()
    sft.tl.embed_cells(cells, "scgpt-default", key_added="X_c")
    assert len(calls) == 2
    np.testing.assert_array_equal(cells.obsm["X_a"], cells.obsm["X_c"])


@pytest.mark.parametrize(
    ("model", "kwargs", "error", "match"),
    [
        (123, {}, TypeError, r"model must be a registered name.*got int 123"),
        ("cellplm_fixture", {"batch_size": 8}, ValueError, "batch_size does not apply to cellplm"),
        ("cellplm_fixture", {"max_length": 8}, ValueError, "max_length does not apply to cellplm"),
        ("scbert", {"max_length": 8}, ValueError, "max_length does not apply to scbert"),
        ("scgpt-default", {"max_cells": 8}, TypeError, r"option\(s\) \['max_cells'\]"),
    ],
)
def test_arguments_a_family_cannot_honour_are_refused(
    model, kwargs, error, match, cells, pbmc, plm_cells, fixtures_dir, scbert_ckpt
):
    source = {"cellplm_fixture": fixtures_dir / "cellplm", "scbert": scbert_ckpt}.get(model, model)
    data = {"scbert": pbmc, "cellplm_fixture": plm_cells}.get(model, cells).copy()
    snap = snapshot(data)
    with pytest.raises(error, match=match):
        sft.tl.embed_cells(data, source, **kwargs)
    assert_unchanged(data, snap)


def test_cellplm_cells_per_sequence_is_max_cells(plm_cells, fixtures_dir):
    adata = plm_cells.copy()
    sft.tl.embed_cells(adata, fixtures_dir / "cellplm", max_cells=7)
    params = adata.uns["cellplm"]["params"]
    assert params["max_cells"] == 7 and params["n_sequences"] == int(np.ceil(adata.n_obs / 7))
    assert "batch_size" not in params and "max_length" not in params
