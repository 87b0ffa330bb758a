"""CellPLM fine-tuned for cell-type annotation (the official CellTypeAnnotationPipeline recipe).

Real cells: CellBench CEL-seq2 reference -> Drop-seq query (three lung cancer cell lines, labels
from genotypes), on the reference's 200 most variable genes, with the shipped
``cellplm-default`` (which was pretrained, without labels, on these cells among others). A few
dozen epochs of the official recipe separate the cell lines across the protocols.
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
from scfm_tools.models import CellPLM

EPOCHS = 40
FAST = {"accelerator": "cpu", "enable_progress_bar": False}


@pytest.fixture(scope="module")
def cellbench(data_dir):
    """CEL-seq2 reference and Drop-seq query, on the 200 most variable genes of the reference."""
    import scanpy as sc

    adata = ad.read_h5ad(data_dir / "cellbench_3celllines_celseq2_dropseq.h5ad")
    ref = adata[adata.obs["batch"] == "sc_celseq2"].copy()
    query = adata[adata.obs["batch"] == "sc_dropseq"].copy()
    hvg = sc.pp.highly_variable_genes(ref, n_top_genes=200, flavor="seurat_v3", inplace=False)
    genes = ref.var_names[hvg["highly_variable"].to_numpy()]
    return ref[:, genes].copy(), query[:, genes].copy()


@pytest.fixture(scope="module")
def pretrained():
    return CellPLM.from_pretrained("cellplm-default")


@pytest.fixture(scope="module")
def tuned(pretrained, cellbench):
    """The default model fine-tuned on the reference; the inputs' states before and after."""
    ref, _ = cellbench
    before = {k: v.clone() for k, v in pretrained.module.state_dict().items()}
    ref_snap = snapshot(ref)
    rng_state = torch.random.get_rng_state()
    model = pretrained.fine_tune_classifier(
        ref, "cell_type", max_epochs=EPOCHS, random_state=0, train_kwargs=FAST
    )
    rng_after = torch.random.get_rng_state()
    return model, before, ref_snap, torch.equal(rng_state, rng_after)


def test_fine_tuned_model_beats_the_majority_class_across_protocols(tuned, cellbench):
    model, _, _, _ = tuned
    ref, query = cellbench
    assert model.classes == sorted(ref.obs["cell_type"].astype(str).unique())
    pred = model.predict(query)
    truth = query.obs["cell_type"].astype(str).to_numpy()
    accuracy = float((pred["label"].astype(str).to_numpy() == truth).mean())
    majority = float(pd.Series(truth).value_counts(normalize=True).iloc[0])
    assert accuracy > majority + 0.3, (accuracy, majority)
    proba = model.predict_proba(query)
    assert list(proba.columns) == model.classes and proba.index.equals(query.obs_names)
    np.testing.assert_allclose(proba.to_numpy().sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(pred["score"].to_numpy(), proba.to_numpy().max(1), rtol=1e-6)
    # early stopping watched the stratified validation cells' macro-F1
    f1 = model.history["validation_macro_f1"].to_numpy().ravel()
    assert len(f1) <= EPOCHS and f1.max() > 0.8


def test_the_original_model_and_the_reference_are_left_alone(tuned, pretrained, cellbench):
    model, before, ref_snap, rng_untouched = tuned
    ref, _ = cellbench
    assert_unchanged(ref, ref_snap)
    assert rng_untouched, "the caller's torch random state moved"
    assert pretrained.classes is None and pretrained.module.head is None
    after = pretrained.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the whole model was trained (as upstream: not the pre-latent norm, left out of its optimiser)
    tuned_state = model.module.state_dict()
    for key in ("embedder.feat_enc.emb", "encoder.layers.1.self_attn.query_projection.weight"):
        assert not torch.equal(tuned_state[key], before[key]), key
    norm = "pre_latent_norm.norm.weight"
    assert torch.equal(tuned_state[norm], before[norm])
    assert "latent.layers.1.lat_2lat.0.weight" in tuned_state and "head.mlp.1.weight" in tuned_state
    assert not any(k.startswith("decoder.") for k in tuned_state)


def test_latent_of_a_fine_tuned_model(tuned, cellbench):
    model, _, _, _ = tuned
    _, query = cellbench
    emb = model.get_latent_representation(query)
    assert emb.shape == (query.n_obs, model.module.n_latent) and np.isfinite(emb).all()
    with pytest.raises(ValueError, match="no mixture component"):
        model.get_latent_representation(query, sample=True)
    with pytest.raises(ValueError, match="cannot reconstruct"):
        model.get_imputed_expression(query)


def test_predictions_follow_the_cell_not_its_position(tuned, cellbench):
    """A sequence is a set: permuting the query permutes the probabilities, nothing else."""
    model, _, _, _ = tuned
    _, query = cellbench
    order = np.random.default_rng(0).permutation(query.n_obs)
    proba = model.predict_proba(query)
    shuffled = model.predict_proba(query[order].copy())
    np.testing.assert_allclose(shuffled.to_numpy(), proba.to_numpy()[order], atol=1e-5)
    # per sample (batch_key): each sample read as its own sequence, as the official predict
    halves = query.copy()
    halves.obs["half"] = np.where(np.arange(query.n_obs) < query.n_obs // 2, "a", "b")
    alone = model.predict_proba(halves[halves.obs["half"] == "a"].copy())
    by_half = model.predict_proba(halves, batch_key="half")
    np.testing.assert_allclose(by_half.loc[alone.index].to_numpy(), alone.to_numpy(), atol=1e-5)


def test_export_and_reload_predict_the_same(tuned, cellbench, tmp_path):
    model, _, _, _ = tuned
    _, query = cellbench
    weights = model.export(tmp_path / "tuned" / "cellplm", weights="safetensors")
    config = json.loads((tmp_path / "tuned" / "cellplm.config.json").read_text())
    assert config["head_type"] == "annotation" and config["latent_mod"] == "ae"
    assert config["classes"] == model.classes and config["out_dim"] == len(model.classes)
    loaded = CellPLM.from_pretrained(weights.parent)
    assert loaded.classes == model.classes
    expected = model.predict(query)
    again = loaded.predict(query)
    assert (again["label"].astype(str) == expected["label"].astype(str)).all()
    np.testing.assert_allclose(again["score"], expected["score"], atol=1e-5)
    # and through sft.tl.annotate, without a reference, by path and by object
    for source in (weights.parent, model):
        out = query.copy()
        sft.tl.annotate(out, model=source, threshold=0.5)
        labels = expected["label"].astype(str).where(expected["score"] >= 0.5, "Unassigned")
        assert (out.obs["cellplm_label"].astype(str) == labels).all()
        np.testing.assert_allclose(out.obs["cellplm_score"], expected["score"], atol=1e-5)
        assert out.uns["cellplm"]["params"]["classes"] == model.classes


def test_annotate_fine_tunes_the_default_end_to_end(cellbench):
    ref, query = cellbench
    out = query.copy()
    sft.tl.annotate(
        out,
        reference=ref,
        label_key="cell_type",
        model="cellplm-default",
        method="finetune",
        max_epochs=3,
        train_kwargs=FAST,
    )
    params = out.uns["cellplm"]["params"]
    assert params["method"] == "finetune" and params["fine_tuned"] == "reference"
    assert params["max_epochs"] == 3 and params.get("batch_size") is None
    assert params.get("class_weights") is None and params["n_reference_cells"] == ref.n_obs
    classes = sorted(ref.obs["cell_type"].astype(str).unique())
    assert list(out.obsm["cellplm_proba"].columns) == classes
    assert set(out.obs["cellplm_label"].astype(str)) <= set(classes)
    assert np.isfinite(out.obs["cellplm_score"]).all()


def test_labels_registered_make_train_fine_tune_a_classifier(cellbench):
    ref, _ = cellbench
    adata = ref[:120].copy()
    CellPLM.setup_anndata(adata, labels_key="cell_type")
    model = CellPLM.from_pretrained("cellplm-default", adata)
    assert model.classes == sorted(adata.obs["cell_type"].astype(str).unique())
    assert model.module.config["latent_mod"] == "ae" and model.module.decoder is None
    model.train(max_epochs=2, random_state=0, **FAST)
    assert len(model.history["validation_macro_f1"]) == 2
    assert model.predict(adata)["label"].isin(model.classes).all()


def test_seeded_fine_tuning_repeats(pretrained, cellbench):
    ref, _ = cellbench
    small = ref[:120].copy()
    runs = [
        pretrained.fine_tune_classifier(
            small, "cell_type", max_epochs=2, random_state=3, train_kwargs=FAST
        ).module.state_dict()
        for _ in range(2)
    ]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_bad_inputs_are_refused_and_change_nothing(pretrained, cellbench):
    ref, query = cellbench
    ref = ref.copy()
    snap = snapshot(ref)
    one_type = ref[ref.obs["cell_type"] == ref.obs["cell_type"].iloc[0]].copy()
    one_snap = snapshot(one_type)
    with pytest.raises(InputError, match="labels_key 'celltype' is not a column"):
        pretrained.fine_tune_classifier(ref, "celltype", max_epochs=1)
    with pytest.raises(InputError, match="at least 2 cell types"):
        pretrained.fine_tune_classifier(one_type, "cell_type", max_epochs=1)
    missing = ref.copy()
    missing.obs["cell_type"] = missing.obs["cell_type"].astype(object)
    missing.obs.iloc[0, missing.obs.columns.get_loc("cell_type")] = np.nan
    miss_snap = snapshot(missing)
    with pytest.raises(InputError, match="missing labels"):
        pretrained.fine_tune_classifier(missing, "cell_type", max_epochs=1)
    assert_unchanged(ref, snap)
    assert_unchanged(one_type, one_snap)
    assert_unchanged(missing, miss_snap)
    with pytest.raises(ValueError, match="without an annotation head"):
        pretrained.predict_proba(query)
    with pytest.raises(ValueError, match="not a fine-tuned classifier|no classifier head"):
        sft.tl.annotate(query.copy(), model="cellplm-default")
