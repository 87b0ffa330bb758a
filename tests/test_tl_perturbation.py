"""sft.tl.predict_perturbation and sft.tl.perturbation_metrics on real Norman 2019 cells."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pytest
import scanpy as sc

import scfm_tools as sft
from _unchanged import assert_unchanged, snapshot
from scfm_tools._errors import InputError

KEY = "perturbation"
HELD_OUT = ["KLF1+MAP2K6", "MAP2K3+SLC38A2"]


@pytest.fixture(scope="module")
def norman(data_dir) -> ad.AnnData:
    return ad.read_h5ad(data_dir / "norman2019_crispra_k562_500hvg.h5ad")


@pytest.fixture(scope="module")
def train(norman) -> ad.AnnData:
    """Norman without two doubles whose genes were both perturbed alone, and without FOXO4."""
    held = norman.obs[KEY].isin([*HELD_OUT, "FOXO4"])
    return norman[~held.to_numpy()].copy()


@pytest.fixture(scope="module")
def lognorm_means(norman) -> dict[str, np.ndarray]:
    """Mean log1p counts per 10,000 of every perturbation, computed with scanpy."""
    x = norman.copy()
    x.X = x.X.astype(np.float64)
    sc.pp.normalize_total(x, target_sum=1e4)
    sc.pp.log1p(x)
    labels = x.obs[KEY].astype(str).to_numpy()
    return {p: np.asarray(x.X[labels == p].mean(axis=0)).ravel() for p in np.unique(labels)}


def test_additive_is_the_sum_of_observed_single_effects(train, lognorm_means):
    before = snapshot(train)
    pred = sft.tl.predict_perturbation(train, [*HELD_OUT, "KLF1"], method="additive")
    assert_unchanged(train, before)
    control = lognorm_means["control"]
    for double in HELD_OUT:
        a, b = double.split("+")
        expected = control + (lognorm_means[a] - control) + (lognorm_means[b] - control)
        got = pred[pred.obs[KEY] == double].X.ravel()
        np.testing.assert_allclose(got, np.clip(expected, 0, None), atol=1e-5)
    # A single observed in the data is its own observed mean.
    np.testing.assert_allclose(
        pred[pred.obs[KEY] == "KLF1"].X.ravel(), lognorm_means["KLF1"], atol=1e-5
    )
    np.testing.assert_allclose(pred.var["control_mean"], control, atol=1e-5)
    assert pred.obs["n_cells_observed"].tolist() == [0, 0, 100]
    assert pred.uns["predict_perturbation"]["params"]["method"] == "additive"


def test_baselines_control_and_mean(train, lognorm_means):
    control = lognorm_means["control"]
    pred = sft.tl.predict_perturbation(train, ["FOXO4"], method="control")
    np.testing.assert_allclose(pred.X.ravel(), control, atol=1e-5)
    pred = sft.tl.predict_perturbation(train, ["FOXO4", "MAP2K3+MAP2K6"], method="mean")
    observed = [p for p in np.unique(train.obs[KEY].astype(str)) if p != "control"]
    shift = np.mean([lognorm_means[p] - control for p in observed], axis=0)
    np.testing.assert_allclose(
        pred.X, np.tile(np.clip(control + shift, 0, None), (2, 1)), atol=1e-5
    )


def test_additive_unseen_gene_falls_back_to_the_mean_single_effect(train, lognorm_means, caplog):
    singles = [p for p in np.unique(train.obs[KEY].astype(str)) if p != "control" and "+" not in p]
    control = lognorm_means["control"]
    mean_single = np.mean([lognorm_means[p] - control for p in singles], axis=0)
    with caplog.at_level(logging.WARNING, logger="scfm_tools"):
        pred = sft.tl.predict_perturbation(train, ["FOXO4+KLF1"], method="additive")
    assert "never perturbed alone" in caplog.text and "FOXO4" in caplog.text
    expected = control + mean_single + (lognorm_means["KLF1"] - control)
    np.testing.assert_allclose(pred.X.ravel(), np.clip(expected, 0, None), atol=1e-5)


def test_linear_on_default_gene_embeddings_fits_predicts_and_is_reused(train, norman):
    perts = ["FOXO4", *HELD_OUT, "FOXO4+MAPK1"]
    pred, predictor = sft.tl.predict_perturbation(train, perts, method="linear", return_model=True)
    params = pred.uns["predict_perturbation"]["params"]
    assert params["model"] == "scgpt-default" and params["n_singles_fitted"] >= 10
    assert pred.shape == (4, train.n_vars) and np.isfinite(pred.X).all() and (pred.X >= 0).all()
    # FOXO4 was never perturbed in training: its prediction is the model's, not the mean's.
    mean = sft.tl.predict_perturbation(train, ["FOXO4"], method="mean")
    assert np.abs(pred[pred.obs[KEY] == "FOXO4"].X - mean.X).max() > 1e-4
    # Reuse: no refit, the same predictions, with or without the AnnData.
    again = sft.tl.predict_perturbation(None, perts, model=predictor)
    np.testing.assert_allclose(again.X, pred.X)
    np.testing.assert_allclose(predictor.predict(["FOXO4"]), pred[:1].X, rtol=1e-6)
    # The held-out double's prediction is scored against its real cells.
    scores = sft.tl.perturbation_metrics(norman, pred, ceiling=True)
    assert set(scores["method"]) == {"linear", "replicate ceiling"}
    assert scores["discrimination_l1"].between(0, 1).all()


def test_unknown_gene_is_refused_with_a_clear_message(train):
    before = snapshot(train)
    # CNN1 is in no shipped vocabulary and the training data never perturbed it alone.
    with pytest.raises(InputError, match=r"not in the vocabulary of scgpt-default.*CNN1"):
        sft.tl.predict_perturbation(train, ["CNN1+MAPK1"], method="linear")
    with pytest.raises(InputError, match="NOT_A_GENE"):
        sft.tl.predict_perturbation(train, ["NOT_A_GENE"], method="linear")
    assert_unchanged(train, before)


def test_bad_input_is_refused_and_adata_unchanged(train):
    before = snapshot(train)
    with pytest.raises(InputError, match="control cells are needed"):
        sft.tl.predict_perturbation(train, ["FOXO4"], control="non-targeting")
    with pytest.raises(KeyError, match="perturbation_key"):
        sft.tl.predict_perturbation(train, ["FOXO4"], perturbation_key="guide")
    with pytest.raises(ValueError, match="reads no model"):
        sft.tl.predict_perturbation(train, ["FOXO4"], method="mean", model="scgpt-default")
    with pytest.raises(TypeError, match="ridge"):
        sft.tl.predict_perturbation(train, ["FOXO4"], method="additive", ridge=1.0)
    assert_unchanged(train, before)
    normalised = train.copy()
    sc.pp.normalize_total(normalised, target_sum=1e4)
    sc.pp.log1p(normalised)
    before = snapshot(normalised)
    with pytest.raises(InputError, match="raw integer counts"):
        sft.tl.predict_perturbation(normalised, ["FOXO4"])
    assert_unchanged(normalised, before)


def test_metrics_additive_beats_mean_on_held_out_doubles(train, norman):
    preds = {
        m: sft.tl.predict_perturbation(train, HELD_OUT, method=m) for m in ("mean", "additive")
    }
    scores = sft.tl.perturbation_metrics(norman, preds, ceiling=True).set_index(
        ["method", "perturbation"]
    )
    for double in HELD_OUT:
        additive = scores.loc[("additive", double)]
        assert (
            additive["pearson_delta_top_de"] > scores.loc[("mean", double), "pearson_delta_top_de"]
        )
        assert additive["pearson_delta_top_de"] > 0.5
    ceiling = scores.loc["replicate ceiling"]
    assert (ceiling["discrimination_l1"] == 1.0).all()
    assert ceiling["pearson_delta_top_de"].gt(0.5).all()


def test_gears_trains_and_predicts_singles_combinations_and_unseen_genes(train, norman):
    import torch

    perts = [*HELD_OUT, "FOXO4", "CNN1"]
    rng = torch.get_rng_state()
    pred, predictor = sft.tl.predict_perturbation(
        train, perts, method="gears", max_epochs=3, hidden=16, return_model=True
    )
    assert torch.equal(torch.get_rng_state(), rng)  # trained from its own seed, not the caller's
    params = pred.uns["predict_perturbation"]["params"]
    assert params["method"] == "gears" and params["max_epochs"] == 3
    assert np.isfinite(params["final_train_loss"])
    assert pred.shape == (4, train.n_vars) and np.isfinite(pred.X).all() and (pred.X >= 0).all()
    # Different perturbations get different predictions (the perturbation reaches the output).
    assert np.abs(pred.X[0] - pred.X[2]).max() > 1e-5
    # Reused without refitting: the same predictions.
    np.testing.assert_allclose(predictor.predict(perts), pred.X, rtol=1e-5, atol=1e-6)
    # CNN1 has no embedding but was perturbed (with CBL) in training: its own learnt embedding.
    # A gene neither embedded nor perturbed is refused.
    with pytest.raises(InputError, match="NOT_A_GENE"):
        sft.tl.predict_perturbation(train, ["NOT_A_GENE+FOXO4"], method="gears", max_epochs=1)


def test_finetune_scgpt_predicts_from_control_cells(train):
    # 120 read-out genes keep the transformer's sequences short; the cells are real.
    small = train[:, :120].copy()
    import torch

    perts = ["MAP2K3+SLC38A2", "FOXO4", "CNN1"]
    rng = torch.get_rng_state()
    pred = sft.tl.predict_perturbation(
        small,
        perts,
        method="finetune",
        max_epochs=1,
        cells_per_perturbation=4,
        control_cells=8,
    )
    assert torch.equal(torch.get_rng_state(), rng)  # trained from its own seed, not the caller's
    params = pred.uns["predict_perturbation"]["params"]
    assert params["method"] == "finetune" and params["model"] == "scgpt-default"
    assert np.isfinite(params["final_train_loss"])
    assert pred.shape == (3, small.n_vars) and np.isfinite(pred.X).all() and (pred.X >= 0).all()
    # The flags reach the output: two perturbations, two predictions.
    assert np.abs(pred.X[0] - pred.X[1]).max() > 1e-6
    with pytest.raises(InputError, match="no token for them"):
        sft.tl.predict_perturbation(small, ["NOT_A_GENE"], method="finetune", max_epochs=1)
    with pytest.raises(NotImplementedError, match="finetune"):
        sft.tl.predict_perturbation(small, ["FOXO4"], method="finetune", model="cellplm-default")


def test_finetune_decoder_starts_as_no_change():
    # The new decoder returns the control values until trained, whatever the flags say.
    import torch

    from scfm_tools.models import SCGPT
    from scfm_tools.models.scgpt._perturbation_module import PERTURBED, SCGPTPerturbationModule

    model = SCGPT.from_pretrained("scgpt-default")
    module = SCGPTPerturbationModule.from_pretrained(model.module).eval()
    ids = torch.arange(10, 30).repeat(3, 1)
    values = torch.rand(3, 20) * 3
    flags = torch.zeros_like(ids)
    flags[:, 2] = PERTURBED
    padding = torch.zeros_like(ids, dtype=torch.bool)
    with torch.no_grad():
        assert (module(ids, values, flags, padding) - values).abs().max() > 1e-2  # random start
        module.decoder.start_as_identity()
        np.testing.assert_allclose(module(ids, values, flags, padding), values, atol=1e-6)
