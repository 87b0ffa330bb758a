"""sft.tl.annotate with scBERT on real labelled cells: reference, checkpoints, errors."""

from __future__ import annotations

import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import scfm_tools as sft
from _unchanged import assert_unchanged, snapshot
from scfm_tools._validation import InputError
from scfm_tools.models import SCBERT

TINY = {"dim": 8, "depth": 2, "heads": 2, "dim_head": 4}
FAST = {
    "max_epochs": 4,
    "batch_size": 32,
    "device": "cpu",
    "train_kwargs": {"plan_kwargs": {"lr": 3e-3}, "train_size": 1.0},
}


@pytest.fixture(scope="module")
def cells(data_dir):
    adata = ad.read_h5ad(data_dir / "pbmc8k_200genes_labeled.h5ad")
    order = np.random.default_rng(1).permutation(adata.n_obs)
    return adata[order[:600]].copy(), adata[order[600:900]].copy()


@pytest.fixture(scope="module")
def checkpoint(cells, tmp_path_factory):
    """A tiny scBERT checkpoint on the data's 200 genes (official layout + gene_list.txt)."""
    ref, _ = cells
    adata = ad.AnnData(ref.X.copy(), var=pd.DataFrame(index=ref.var_names))
    SCBERT.setup_anndata(adata)
    torch.manual_seed(0)
    g2v = np.random.default_rng(2).normal(size=(adata.n_vars, TINY["dim"]))
    model = SCBERT(adata, gene2vec=g2v, **TINY)
    return model.export_checkpoint(tmp_path_factory.mktemp("scbert_ckpt"))


@pytest.fixture(scope="module")
def annotated(cells, checkpoint):
    ref, query = cells
    query = query.copy()
    ref_before = ref.copy()
    sft.tl.annotate(query, checkpoint, reference=ref, label_key="cell_type", **FAST)
    return query, ref_before


def test_reference_annotation_writes_labels_and_scores(cells, annotated):
    ref, _ = cells
    query, ref_before = annotated
    labels, scores = query.obs["scbert_label"], query.obs["scbert_score"]
    assert isinstance(labels.dtype, pd.CategoricalDtype)
    assert scores.dtype == np.float32 and ((scores > 0) & (scores <= 1)).all()
    proba = query.obsm["scbert_proba"]
    assert list(proba.index) == list(query.obs_names)
    assert set(proba.columns) == set(ref.obs["cell_type"].astype(str))
    np.testing.assert_allclose(scores, proba.max(axis=1), rtol=1e-6)
    assert (labels.astype(str).to_numpy() == proba.idxmax(axis=1).to_numpy()).all()
    # better than always answering the most frequent cell type
    truth = query.obs["cell_type"].astype(str).to_numpy()
    accuracy = (labels.astype(str).to_numpy() == truth).mean()
    majority = query.obs["cell_type"].value_counts(normalize=True).iloc[0]
    assert accuracy > majority + 0.15, (accuracy, majority)
    params = query.uns["scbert"]["params"]
    assert params["family"] == "scbert" and params["label_key"] == "cell_type"
    assert params["n_reference_cells"] == ref.n_obs and params["max_epochs"] == 4
    assert params["class_weights"] == "official" and params["fine_tuned"] == "reference"
    assert params["n_genes_matched"] == 200 and np.isfinite(params["final_train_loss"])
    # the reference was neither registered nor changed
    assert_unchanged(ref, ref_before)


def test_threshold_and_copy(cells, checkpoint):
    ref, query = cells
    out = sft.tl.annotate(
        query, checkpoint, reference=ref, label_key="cell_type", threshold=0.95, copy=True, **FAST
    )
    assert "scbert_label" not in query.obs
    low = out.obs["scbert_score"] < 0.95
    assert low.any()
    assert (out.obs.loc[low, "scbert_label"] == "Unassigned").all()
    assert (out.obs.loc[~low, "scbert_label"] != "Unassigned").all()
    assert out.uns["scbert"]["params"]["threshold"] == 0.95


def test_fine_tuned_checkpoint_and_model_object(cells, checkpoint, tmp_path):
    ref, query = cells
    train_ref = ref.copy()
    SCBERT.setup_anndata(train_ref, labels_key="cell_type")
    model = SCBERT.from_pretrained(checkpoint, train_ref, head="classifier")
    model.train(max_epochs=2, batch_size=32, accelerator="cpu", enable_progress_bar=False)
    expected = model.predict(query)
    # the in-memory model
    a = query.copy()
    sft.tl.annotate(a, model, key_added="ft")
    np.testing.assert_array_equal(a.obs["ft_label"].astype(str), expected["label"].astype(str))
    assert a.uns["ft"]["params"]["fine_tuned"] == "model"
    # a fine-tuned model with a reference: predict, or fine-tune anew? Said, not guessed.
    snap = snapshot(a)
    with pytest.raises(ValueError, match="fine-tuned classifier.*ambiguous.*method="):
        sft.tl.annotate(a, model, reference=ref, label_key="cell_type", key_added="ft")
    assert_unchanged(a, snap)
    # the same model exported (with classes.txt) and read back from disk
    path = model.export_checkpoint(tmp_path / "ft")
    assert (path.parent / "classes.txt").read_text().split("\n") == model.classes
    b = query.copy()
    sft.tl.annotate(b, path)
    np.testing.assert_allclose(b.obs["scbert_score"], expected["score"], rtol=1e-5)
    np.testing.assert_array_equal(b.obs["scbert_label"].astype(str), expected["label"].astype(str))
    # without its class names, a fine-tuned checkpoint cannot label cells
    (path.parent / "classes.txt").unlink()
    c = query.copy()
    snap = snapshot(c)
    with pytest.raises(FileNotFoundError, match=r"classes\.txt"):
        sft.tl.annotate(c, path)
    assert_unchanged(c, snap)


def test_reference_without_label_column(cells, checkpoint):
    ref, query = cells
    query = query.copy()
    snap = snapshot(query)
    with pytest.raises(InputError, match="no obs column 'celltype'"):
        sft.tl.annotate(query, checkpoint, reference=ref, label_key="celltype", **FAST)
    assert_unchanged(query, snap)
    with pytest.raises(ValueError, match="needs label_key"):
        sft.tl.annotate(query, checkpoint, reference=ref)
    assert_unchanged(query, snap)
    one_type = ref[ref.obs["cell_type"] == "B-cells"].copy()
    with pytest.raises(InputError, match="at least 2"):
        sft.tl.annotate(query, checkpoint, reference=one_type, label_key="cell_type", **FAST)
    assert_unchanged(query, snap)


def test_pretrained_checkpoint_needs_a_reference(cells, checkpoint):
    _, query = cells
    query = query.copy()
    snap = snapshot(query)
    with pytest.raises(ValueError, match="pretrained scbert model.*not a fine-tuned one"):
        sft.tl.annotate(query, checkpoint)
    assert_unchanged(query, snap)


def test_bad_inputs_are_refused(cells, checkpoint, fixtures_dir, tmp_path):
    ref, query = cells
    query = query.copy()
    snap = snapshot(query)
    with pytest.raises(TypeError, match="do not take"):
        sft.tl.annotate(query, checkpoint, reference=ref, label_key="cell_type", sample=True)
    with pytest.raises(ValueError, match="threshold"):
        sft.tl.annotate(query, checkpoint, threshold=2.0)
    lognorm = query.copy()
    lognorm.X = lognorm.X.astype(np.float32) * 0.5
    lsnap = snapshot(lognorm)
    with pytest.raises(InputError, match="non-integer"):
        sft.tl.annotate(lognorm, checkpoint, reference=ref, label_key="cell_type")
    assert_unchanged(lognorm, lsnap)
    # another family's checkpoint under a .pth name
    other = tmp_path / "other"
    other.mkdir()
    shutil.copyfile(fixtures_dir / "cellplm" / "fixture.best.ckpt", other / "model.pth")
    shutil.copyfile(checkpoint.parent / "gene_list.txt", other / "gene_list.txt")
    with pytest.raises(ValueError, match="not an scBERT checkpoint"):
        sft.tl.annotate(query, other / "model.pth", reference=ref, label_key="cell_type", **FAST)
    assert_unchanged(query, snap)
