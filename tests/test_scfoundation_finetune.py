"""scFoundation fine-tuned for cell types on real PBMCs: freezing, prediction, export, annotate.

The model is the official fixture (random weights of the official code, encoder 16 wide and 2
layers deep, on the published 19,264 genes); the cells are real PBMCs with their labels.
"""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import scfm_tools as sft
from _unchanged import assert_unchanged, snapshot
from scfm_tools._validation import InputError
from scfm_tools.models import SCFoundation

TYPES = ["B-cells", "CD4+ T-cells", "CD8+ T-cells", "Monocytes", "NK cells"]
FAST = {"accelerator": "cpu", "enable_progress_bar": False}


@pytest.fixture(scope="module")
def cells(data_dir):
    adata = ad.read_h5ad(data_dir / "pbmc8k_200genes_labeled.h5ad")
    adata = adata[adata.obs["cell_type"].isin(TYPES)]
    order = np.random.default_rng(1).permutation(adata.n_obs)
    return adata[order[:600]].copy(), adata[order[600:900]].copy()


@pytest.fixture(scope="module")
def base(scfoundation_ckpt):
    return SCFoundation.from_pretrained(scfoundation_ckpt)


@pytest.fixture(scope="module")
def finetuned(cells, base):
    ref, _ = cells
    ref_before = snapshot(ref)
    weights_before = {k: v.clone() for k, v in base.module.state_dict().items()}
    rng_before = torch.random.get_rng_state()
    model = base.fine_tune_classifier(
        ref, "cell_type", max_epochs=6, batch_size=32, train_kwargs=FAST
    )
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the caller's stream
    return model, ref_before, weights_before


def test_fine_tuning_beats_the_majority_class_and_leaves_the_original(cells, base, finetuned):
    ref, query = cells
    model, ref_before, weights_before = finetuned
    pred = model.predict(query)
    truth = query.obs["cell_type"].astype(str).to_numpy()
    accuracy = (pred["label"].astype(str).to_numpy() == truth).mean()
    majority = query.obs["cell_type"].value_counts(normalize=True).iloc[0]
    assert accuracy > majority + 0.15, (accuracy, majority)
    assert model.classes == TYPES
    # held-out validation cells were watched every epoch
    loss = model.history["validation_loss"]["validation_loss"].to_numpy(dtype=float)
    assert 1 <= len(loss) <= 6 and np.isfinite(loss).all() and loss.min() < loss[0]
    # the original model, its weights and the reference are as they were
    assert base.classes is None and not base.module.is_classifier
    after = base.module.state_dict()
    assert all(torch.equal(after[k], v) for k, v in weights_before.items())
    assert_unchanged(ref, ref_before)


def test_official_freezing(base, finetuned):
    model, _, before = finetuned
    after = model.module.state_dict()
    changed = {k for k, v in before.items() if not torch.equal(after[k].cpu(), v)}
    # the second-to-last encoder layer (of two: layer 0) learns; all else stays as loaded
    assert changed and all(k.startswith("encoder.transformer_encoder.0.") for k in changed)
    trainable = {k for k, p in model.module.named_parameters() if p.requires_grad}
    assert trainable == {
        k
        for k, _ in model.module.named_parameters()
        if k.startswith(("encoder.transformer_encoder.0.", "classifier."))
    }
    # the head: BatchNorm without affine parameters, then Linear(16, 256), ReLU, Linear(256, 5)
    head = model.module.classifier
    assert not head.norm.affine and head.norm.eps == pytest.approx(1e-6)
    assert [type(m).__name__ for m in head.fc1] == ["Linear", "ReLU", "Linear"]
    assert head.fc1[0].in_features == 16 and head.fc1[2].out_features == len(TYPES)


def test_predictions_threshold_and_embeddings(cells, finetuned):
    _, query = cells
    model, _, _ = finetuned
    proba = model.predict_proba(query, batch_size=7)
    assert list(proba.index) == list(query.obs_names) and list(proba.columns) == TYPES
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    # the same cell gets the same probabilities whatever its minibatch
    np.testing.assert_allclose(model.predict_proba(query[:20]), proba[:20], atol=1e-5)
    pred = model.predict(query, threshold=0.6)
    assert isinstance(pred["label"].dtype, pd.CategoricalDtype)
    low = pred["score"] < 0.6
    assert 0 < low.sum() < len(pred)
    assert (pred.loc[low, "label"] == "Unassigned").all()
    assert (pred.loc[~low, "label"].astype(str) == proba[~low].idxmax(axis=1)).all()
    emb = model.get_latent_representation(query)
    assert emb.shape == (query.n_obs, 64) and np.isfinite(emb).all()


def test_export_reload_and_annotate_without_reference(cells, finetuned, tmp_path):
    _, query = cells
    model, _, _ = finetuned
    expected = model.predict(query)
    path = model.export(tmp_path / "ft")
    assert path.name == "models.safetensors"
    config = json.loads((path.parent / "config.json").read_text())
    assert config["classes"] == TYPES and config["architecture"]["n_classes"] == len(TYPES)
    # the head's gene cap (default 2,048) travels with the model
    assert config["architecture"]["classifier_max_genes"] == 2048
    with pytest.raises(ValueError, match="weights='safetensors'"):
        model.export(tmp_path / "ckpt", weights="ckpt")
    loaded = SCFoundation.from_pretrained(path.parent)
    assert loaded.classes == TYPES and loaded.module.config["classifier_max_genes"] == 2048
    np.testing.assert_allclose(loaded.predict_proba(query), model.predict_proba(query), atol=1e-6)
    for source in (path.parent, model):
        a = query.copy()
        sft.tl.annotate(a, source)
        np.testing.assert_array_equal(
            a.obs["scfoundation_label"].astype(str), expected["label"].astype(str)
        )
        np.testing.assert_allclose(a.obs["scfoundation_score"], expected["score"], atol=1e-6)
        assert a.uns["scfoundation"]["params"]["fine_tuned"] == "model"


def test_annotate_fine_tunes_a_checkpoint_on_a_reference(cells, scfoundation_ckpt):
    ref, query = cells
    ref, query = ref[:300].copy(), query[:100].copy()
    ref_before = snapshot(ref)
    sft.tl.annotate(
        query,
        scfoundation_ckpt,
        reference=ref,
        label_key="cell_type",
        method="finetune",
        max_epochs=2,
        device="cpu",
        train_kwargs={"enable_progress_bar": False},
    )
    labels, proba = query.obs["scfoundation_label"], query.obsm["scfoundation_proba"]
    assert isinstance(labels.dtype, pd.CategoricalDtype)
    assert list(proba.columns) == TYPES
    np.testing.assert_allclose(query.obs["scfoundation_score"], proba.max(axis=1), rtol=1e-6)
    params = query.uns["scfoundation"]["params"]
    assert params["method"] == "finetune" and params["fine_tuned"] == "reference"
    assert params["class_weights"] == "official" and params["max_epochs"] == 2
    assert params["n_reference_cells"] == 300 and np.isfinite(params["final_train_loss"])
    assert_unchanged(ref, ref_before)


def test_labels_registered_by_setup_anndata_train_the_head(cells, scfoundation_ckpt):
    ref, _ = cells
    adata = ref[:64].copy()
    SCFoundation.setup_anndata(adata, labels_key="cell_type")
    model = SCFoundation.from_pretrained(scfoundation_ckpt, adata)
    assert model.classes == TYPES and model.trainable_ == "official"
    frozen = model.module.pos_emb.weight.clone()
    model.train(max_epochs=1, batch_size=32, train_size=1.0, **FAST)
    assert torch.equal(model.module.pos_emb.weight, frozen)
    assert np.isfinite(model.history["train_loss"]["train_loss"].to_numpy(dtype=float)).all()


def test_bad_inputs_are_refused_and_change_nothing(cells, base):
    ref, query = cells
    one_type = ref[ref.obs["cell_type"] == "B-cells"].copy()
    snaps = {id(a): snapshot(a) for a in (ref, one_type, query)}
    cases = [
        (InputError, "no obs column 'celltype'",
         lambda: base.fine_tune_classifier(ref, "celltype")),
        (InputError, "1 cell type.*at least 2",
         lambda: base.fine_tune_classifier(one_type, "cell_type")),
        (InputError, "'celltype' is not a column",
         lambda: SCFoundation.setup_anndata(ref, labels_key="celltype")),
        (ValueError, "patience", lambda: base.fine_tune_classifier(ref, "cell_type", patience=0)),
        (ValueError, "no cell-type head", lambda: base.predict(query)),
    ]  # fmt: skip
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()
    for adata in (ref, one_type, query):
        assert_unchanged(adata, snaps[id(adata)])


def test_head_reads_genes_without_depth_tokens():
    # As the official finetune_model.py: the classifier's encoder sees a cell's genes only, so
    # its T and S depth tokens (here one higher: ten times the depth) do not move the probabilities.
    from _scfoundation_tiny import TINY
    from scfm_tools.models.scfoundation import SCFoundationModule

    torch.manual_seed(0)
    module = SCFoundationModule(50, **TINY, n_classes=3).eval()
    values = torch.zeros(4, 52)
    values[:, :50] = torch.poisson(torch.full((4, 50), 0.8)).log1p()
    values[:, 50], values[:, 51] = 4.0, 3.5
    deeper = values.clone()
    deeper[:, 50:] += 1.0
    expected = module.class_probabilities(values)
    torch.testing.assert_close(module.class_probabilities(deeper), expected)
    torch.testing.assert_close(
        module.inference(deeper)["hidden"], module.inference(values)["hidden"]
    )
    # the pretraining path still reads them
    assert not torch.allclose(module.encode(deeper)["hidden"], module.encode(values)["hidden"])


def test_head_reads_the_reference_variable_genes_only(cells, base):
    # A panel of the reference's most variable genes: kept with the model, and the genes
    # outside it do not reach the head (changing them leaves the probabilities as they are).
    ref, query = cells
    model = base.fine_tune_classifier(
        ref, "cell_type", n_top_genes=50, max_epochs=2, validation_size=0, train_kwargs=FAST
    )
    panel = model.module.config["classifier_genes"]
    assert len(panel) == 50 and panel == sorted(panel)
    in_panel = np.isin(model.match_genes(query).index, panel)
    assert in_panel.sum() == 50
    other = query.copy()
    X = other.X.toarray() if hasattr(other.X, "toarray") else np.array(other.X)
    X[:, ~in_panel] = X[:, ~in_panel] * 3 + 1
    other.X = X
    expected = model.predict_proba(query)
    pd.testing.assert_frame_equal(model.predict_proba(other), expected)
    full = base.fine_tune_classifier(
        ref, "cell_type", n_top_genes=None, max_epochs=2, validation_size=0, train_kwargs=FAST
    )
    assert full.module.config["classifier_genes"] is None
    assert not np.allclose(full.predict_proba(other), full.predict_proba(query))
    with pytest.raises(ValueError, match="n_top_genes"):
        base.fine_tune_classifier(ref, "cell_type", n_top_genes=0, train_kwargs=FAST)
