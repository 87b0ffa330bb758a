"""scGPT fine-tuned for cell-type annotation: SCGPT.fine_tune_classifier, predict, export, annotate.

Real labelled cells and the shipped default model, two epochs (the default is more). The held-out
accuracy must clearly beat the majority class; pbmc8k is a random 240/200 split, cellbench a
cross-protocol transfer (CEL-seq2 reference, Drop-seq query).
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
from scfm_tools.models import SCGPT

FAST = {"max_epochs": 2, "train_kwargs": {"accelerator": "cpu"}}


@pytest.fixture(scope="module")
def pbmc(data_dir):
    """A random split of labelled pbmc8k cells: 240 reference, 200 query."""
    adata = ad.read_h5ad(data_dir / "pbmc8k_200genes_labeled.h5ad")
    adata = adata[adata.obs["cell_type"] != "NA"]
    order = np.random.default_rng(1).permutation(adata.n_obs)
    return adata[order[:240]].copy(), adata[order[240:440]].copy()


@pytest.fixture(scope="module")
def pretrained():
    return SCGPT.from_pretrained("scgpt-default")


@pytest.fixture(scope="module")
def tuned(pbmc, pretrained):
    """The default model fine-tuned on the pbmc reference, and what was there before."""
    ref, _ = pbmc
    weights = {k: v.clone() for k, v in pretrained.module.state_dict().items()}
    rng, snap = torch.get_rng_state(), snapshot(ref)
    model = pretrained.fine_tune_classifier(ref, "cell_type", **FAST)
    return model, weights, rng, snap


def _accuracy(predicted, cells) -> float:
    return float(np.mean(np.asarray(predicted, dtype=str) == cells.obs["cell_type"].astype(str)))


def _majority(cells) -> float:
    return float(cells.obs["cell_type"].value_counts(normalize=True).max())


def test_fine_tuning_beats_the_majority_class_on_held_out_cells(pbmc, tuned):
    ref, query = pbmc
    model = tuned[0]
    assert model.classes == sorted(ref.obs["cell_type"].astype(str).unique())
    proba = model.predict_proba(query)
    assert list(proba.columns) == model.classes and list(proba.index) == list(query.obs_names)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    prediction = model.predict(query)
    assert isinstance(prediction["label"].dtype, pd.CategoricalDtype)
    np.testing.assert_allclose(prediction["score"], proba.max(axis=1), rtol=1e-6)
    accuracy, majority = _accuracy(prediction["label"], query), _majority(query)
    assert accuracy > majority + 0.15, (accuracy, majority)
    # inference draws nothing new: the same call, and a subset, give the same probabilities
    pd.testing.assert_frame_equal(model.predict_proba(query), proba)
    subset = model.predict_proba(query, indices=[5, 1])
    np.testing.assert_allclose(subset, proba.iloc[[5, 1]], rtol=1e-5, atol=1e-6)
    unsure = model.predict(query, threshold=0.99)
    assert "Unassigned" in unsure["label"].cat.categories
    assert ((unsure["label"] == "Unassigned") == (prediction["score"] < 0.99)).all()
    # losses per epoch, on the training cells and on the held-out tenth of the reference
    history = model.history
    assert len(history["train_loss"]) == len(history["validation_loss"]) == FAST["max_epochs"]
    assert float(history["validation_loss"].iloc[-1, 0]) < np.log(len(model.classes))


def test_the_pretrained_model_the_caller_rng_and_the_reference_are_left_alone(
    pbmc, pretrained, tuned
):
    model, weights, rng, snap = tuned
    for key, value in pretrained.module.state_dict().items():
        assert torch.equal(value, weights[key]), key
    assert pretrained.classes is None and not pretrained.module.is_classifier
    assert torch.equal(torch.get_rng_state(), rng)
    assert_unchanged(pbmc[0], snap)
    assert model.module.is_classifier and model.pretrained_["fine_tuned"] is True


def test_a_fine_tuned_model_still_embeds(pbmc, tuned):
    query = pbmc[1]
    emb = tuned[0].get_latent_representation(query)
    assert emb.shape == (query.n_obs, 64) and np.isfinite(emb).all()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)


def test_export_and_reload_predict_the_same(pbmc, tuned, tmp_path):
    query = pbmc[1]
    model = tuned[0]
    folder = model.export_folder(tmp_path / "tuned")
    args = json.loads((folder / "args.json").read_text())
    assert args["classes"] == model.classes
    expected = model.predict(query)
    reloaded = SCGPT.from_pretrained(folder)
    assert reloaded.classes == model.classes and reloaded.input_genes == model.input_genes
    # trained on 128-token subsets, it predicts with the pretrained model's length, reloaded too
    assert args["max_seq_len"] == reloaded.max_seq_len == model.max_seq_len == 256
    got = reloaded.predict(query)
    assert (got["label"] == expected["label"]).all()
    np.testing.assert_allclose(got["score"], expected["score"], atol=1e-5)
    # annotate without a reference: the folder, or the model object
    for source in (folder, model):
        out = sft.tl.annotate(query, source, copy=True)
        assert (out.obs["scgpt_label"].astype(str) == expected["label"].astype(str)).all()
        np.testing.assert_allclose(out.obs["scgpt_score"], expected["score"], atol=1e-5)
        params = out.uns["scgpt"]["params"]
        assert params["method"] == "classifier" and params["fine_tuned"] == "model"
        assert params["classes"] == model.classes


def test_annotate_fine_tunes_across_protocols(data_dir):
    cells = ad.read_h5ad(data_dir / "cellbench_3celllines_celseq2_dropseq.h5ad")
    ref = cells[cells.obs["batch"] == "sc_celseq2"].copy()
    query = cells[cells.obs["batch"] == "sc_dropseq"].copy()
    ref_snap = snapshot(ref)
    sft.tl.annotate(
        query,
        "scgpt-default",
        reference=ref,
        label_key="cell_type",
        method="finetune",
        max_epochs=3,
        device="cpu",
        n_top_genes=200,  # a family option: fewer genes learn faster than the default 500
    )
    assert_unchanged(ref, ref_snap)
    accuracy, majority = _accuracy(query.obs["scgpt_label"], query), _majority(query)
    assert accuracy > majority + 0.3, (accuracy, majority)
    proba = query.obsm["scgpt_proba"]
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(query.obs["scgpt_score"], proba.max(axis=1), rtol=1e-6)
    params = query.uns["scgpt"]["params"]
    assert params["method"] == "finetune" and params["fine_tuned"] == "reference"
    assert params["model"] == "scgpt-default" and params["n_reference_cells"] == ref.n_obs
    # the tutorial's unweighted loss (None values are not recorded)
    assert "class_weights" not in params and params["max_epochs"] == 3
    assert params["classes"] == sorted(ref.obs["cell_type"].astype(str).unique())
    # scGPT's default: copies from three seeds, averaged
    assert params["ensemble"] == SCGPT.fine_tune_ensemble == 3
    assert len(set(params["ensemble_seeds"])) == 3 and params["ensemble_seeds"][0] == 0


def test_annotate_averages_the_copies_it_fine_tunes(data_dir, pretrained):
    cells = ad.read_h5ad(data_dir / "cellbench_3celllines_celseq2_dropseq.h5ad")
    ref = cells[cells.obs["batch"] == "sc_dropseq"][::2].copy()
    query = cells[cells.obs["batch"] == "sc_celseq2"][:40].copy()
    opts = {"n_top_genes": 200, "random_state": 5}
    out = sft.tl.annotate(
        query, pretrained, reference=ref, label_key="cell_type", method="finetune",
        max_epochs=2, ensemble=2, device="cpu", copy=True, **opts,
    )  # fmt: skip
    seeds = out.uns["scgpt"]["params"]["ensemble_seeds"]
    assert out.uns["scgpt"]["params"]["ensemble"] == 2 and seeds[0] == 5 and seeds[1] != 5
    opts.pop("random_state")
    copies = [
        pretrained.fine_tune_classifier(ref, "cell_type", random_state=seed, **FAST, **opts)
        for seed in seeds
    ]
    probas = [c.predict_proba(query) for c in copies]
    # two different copies, whose mean is what annotate wrote
    assert np.abs(probas[0].to_numpy() - probas[1].to_numpy()).max() > 1e-3
    expected = (probas[0] + probas[1]) / 2
    np.testing.assert_allclose(out.obsm["scgpt_proba"].to_numpy(), expected.to_numpy(), atol=1e-5)
    assert (out.obs["scgpt_label"].astype(str).to_numpy() == expected.idxmax(axis=1)).all()


def test_deep_query_cells_are_read_whole_up_to_the_prediction_length(data_dir, pretrained):
    cells = ad.read_h5ad(data_dir / "cellbench_3celllines_celseq2_dropseq.h5ad")
    ref = cells[cells.obs["batch"] == "sc_dropseq"][:120].copy()
    query = cells[cells.obs["batch"] == "sc_celseq2"][:40].copy()
    opts = {**FAST, "max_epochs": 1, "max_length": 32, "n_top_genes": 200}
    whole = pretrained.fine_tune_classifier(ref, "cell_type", **opts)
    short = pretrained.fine_tune_classifier(ref, "cell_type", predict_max_length=32, **opts)
    assert whole.max_seq_len == pretrained.max_seq_len and short.max_seq_len == 32
    # the same training (same seed), read differently: most query cells express > 31 of the genes
    for key, value in whole.module.state_dict().items():
        assert torch.equal(value, short.module.state_dict()[key]), key
    genes = np.isin(query.var_names, whole.input_genes)
    assert np.median(np.asarray((query.X[:, genes] > 0).sum(axis=1)).ravel()) > 31
    read_whole, read_short = whole.predict_proba(query), short.predict_proba(query)
    pd.testing.assert_frame_equal(read_short, whole.predict_proba(query, max_length=32))
    assert np.abs(read_whole.to_numpy() - read_short.to_numpy()).max() > 1e-3
    with pytest.raises(ValueError, match="at least 2"):
        pretrained.fine_tune_classifier(ref, "cell_type", predict_max_length=1, **opts)


def test_bad_references_fail_cleanly(pbmc, pretrained):
    ref = pbmc[0][:60].copy()
    one_type = ref[ref.obs["cell_type"] == ref.obs["cell_type"].iloc[0]].copy()
    gaps = ref.copy()
    gaps.obs["cell_type"] = gaps.obs["cell_type"].astype(object)
    gaps.obs.iloc[0, gaps.obs.columns.get_loc("cell_type")] = np.nan
    cases = [
        (ref, "celltype", "no obs column 'celltype'"),
        (one_type, "cell_type", "needs at least 2"),
    ]
    for cells, key, message in cases:
        snap = snapshot(cells)
        with pytest.raises(InputError, match=message):
            pretrained.fine_tune_classifier(cells, key, **FAST)
        assert_unchanged(cells, snap)
    # A cell without a label is left out of training (as the other families do).
    snap = snapshot(gaps)
    tuned = pretrained.fine_tune_classifier(gaps, "cell_type", **FAST)
    assert tuned.adata.n_obs == gaps.n_obs - 1 and gaps.obs_names[0] not in tuned.adata.obs_names
    assert_unchanged(gaps, snap)
    with pytest.raises(ValueError, match="no classifier head"):
        pretrained.predict(ref)


def test_a_classifier_built_on_registered_labels_trains_with_train(pbmc):
    ref = pbmc[0][:120].copy()
    ref.obs["cell_type"] = ref.obs["cell_type"].cat.remove_unused_categories()
    SCGPT.setup_anndata(ref, labels_key="cell_type")
    tiny = {"d_model": 16, "n_heads": 2, "d_hid": 16, "n_layers": 1, "max_seq_len": 64}
    model = SCGPT(ref, head="classifier", **tiny)
    assert model.classes == list(ref.obs["cell_type"].cat.categories)
    assert model.module.config["n_cls"] == len(model.classes)
    model.train(max_epochs=1, batch_size=16, class_weights="balanced", accelerator="cpu")
    weights = model.module.class_weights
    counts = ref.obs["cell_type"].value_counts()[model.classes].to_numpy()
    np.testing.assert_allclose(weights.numpy(), counts.sum() / (len(counts) * counts), rtol=1e-6)
    assert np.isfinite(model.history["train_loss"].to_numpy(dtype=float)).all()
    assert model.predict(ref)["label"].notna().all()
    unlabelled = pbmc[1][:50].copy()
    SCGPT.setup_anndata(unlabelled)
    with pytest.raises(ValueError, match="needs cell-type labels"):
        SCGPT(unlabelled, head="classifier", **tiny)
    with pytest.raises(ValueError, match="classifier head only"):
        SCGPT(ref, **tiny).train(max_epochs=1, class_weights="balanced")
