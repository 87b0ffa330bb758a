"""The SCBERT model class: pretraining and fine-tuning through model.train, export, prediction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scfm_tools._validation import InputError
from scfm_tools.models import SCBERT
from scfm_tools.models.scbert import (
    UNASSIGNED,
    compute_class_weights,
    embed_matrix,
    load_scbert_checkpoint,
)

TINY = {"dim": 8, "depth": 2, "heads": 2, "dim_head": 4}
TRAIN = {"accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False}


@pytest.fixture(scope="module")
def pbmc(read_shared_module):
    adata = read_shared_module("pbmc8k_200genes_labeled.h5ad")
    rng = np.random.default_rng(0)
    return adata[rng.permutation(adata.n_obs)[:900]].copy()


@pytest.fixture(scope="module")
def read_shared_module(data_dir):
    import anndata as ad

    return lambda name: ad.read_h5ad(data_dir / name)


@pytest.fixture(scope="module")
def pretrained(pbmc, tmp_path_factory):
    """A tiny model pretrained (masked bins) on real cells, exported in the official layout."""
    adata = pbmc[:300].copy()
    SCBERT.setup_anndata(adata)
    torch.manual_seed(0)
    g2v = np.random.default_rng(1).normal(size=(adata.n_vars, TINY["dim"]))
    model = SCBERT(adata, gene2vec=g2v, **TINY)
    model.train(max_epochs=3, batch_size=32, plan_kwargs={"lr": 3e-3}, train_size=1.0, **TRAIN)
    path = model.export_checkpoint(tmp_path_factory.mktemp("scbert_pre"))
    return model, path


@pytest.fixture(scope="module")
def finetuned(pbmc, pretrained):
    ref = pbmc[:600].copy()
    SCBERT.setup_anndata(ref, labels_key="cell_type")
    torch.manual_seed(0)  # the new head's initialisation and the minibatch order
    model = SCBERT.from_pretrained(pretrained[1], ref, head="classifier")
    model.train(
        max_epochs=6,
        batch_size=32,
        class_weights="official",
        plan_kwargs={"lr": 3e-3},
        train_size=1.0,
        **TRAIN,
    )
    return model, ref


def test_pretraining_lowers_the_masked_bin_loss(pretrained):
    model, _ = pretrained
    loss = np.asarray(model.history["train_loss"]).ravel().astype(float)
    assert len(loss) == 3 and np.isfinite(loss).all()
    assert loss[-1] < loss[0]
    acc = np.asarray(model.history["accuracy_train"]).ravel().astype(float)
    assert 0 < acc[-1] <= 1
    # features are never redrawn unless asked
    assert int(model.module.performer.calls_since_last_redraw) == 0


def test_export_is_an_official_layout_checkpoint(pretrained):
    model, path = pretrained
    obj = torch.load(path, weights_only=True)
    assert set(obj) == {"model_state_dict"}
    assert obj["model_state_dict"]["pos_emb.emb.weight"].dtype == torch.float64
    module, genes, report = load_scbert_checkpoint(path, gene_list=path.parent / "gene_list.txt")
    assert report.clean and genes == model.genes
    for key, value in model.module.state_dict().items():
        assert torch.equal(module.state_dict()[key], value.cpu()), key
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.export_checkpoint(path.parent)


def test_fine_tuning_trains_the_official_parts_and_predicts(pbmc, finetuned, pretrained):
    model, ref = finetuned
    module = model.module
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable, "nothing to train"
    depth = module.config["depth"]
    for name in trainable:
        assert name.startswith(("to_out.", "norm.", f"performer.net.layers.{depth - 2}.")), name
    assert any(n.startswith("to_out.conv1") for n in trainable)
    assert "pos_emb.emb.weight" not in trainable
    # the encoder parts that were frozen kept their pretrained values
    pre = pretrained[0].module.state_dict()
    for key in ("token_emb.weight", "performer.net.layers.1.0.fn.to_q.weight"):
        if not key.startswith(f"performer.net.layers.{depth - 2}."):
            assert torch.equal(module.state_dict()[key].cpu(), pre[key].cpu()), key
    # the official class weights of the reference's label counts
    counts = ref.obs["cell_type"].value_counts().reindex(model.classes).to_numpy()
    torch.testing.assert_close(
        module.class_weights.cpu(), torch.tensor((1 - counts / counts.sum()) ** 2).float()
    )
    query = pbmc[600:].copy()
    pred = model.predict(query)
    truth = query.obs["cell_type"].astype(str).to_numpy()
    accuracy = (pred["label"].astype(str).to_numpy() == truth).mean()
    majority = query.obs["cell_type"].value_counts(normalize=True).iloc[0]
    assert accuracy > majority + 0.15, (accuracy, majority)
    proba = model.predict_proba(query)
    np.testing.assert_allclose(proba.sum(1), 1, rtol=1e-5)
    np.testing.assert_allclose(pred["score"], proba.max(1), rtol=1e-6)
    assert list(proba.columns) == model.classes


def test_threshold_marks_unassigned(pbmc, finetuned):
    model, _ = finetuned
    query = pbmc[600:700].copy()
    pred = model.predict(query, threshold=0.9)
    low = pred["score"] < 0.9
    assert low.any() and (pred.loc[low, "label"] == UNASSIGNED).all()
    assert (pred.loc[~low, "label"] != UNASSIGNED).all()
    assert UNASSIGNED in pred["label"].cat.categories
    with pytest.raises(ValueError, match="threshold"):
        model.predict(query, threshold=1.5)


def test_latent_representation_is_the_embedding_path(pbmc, pretrained):
    model, _ = pretrained
    query = pbmc[700:720].copy()
    emb = model.get_latent_representation(query)
    expected = embed_matrix(model.module, query.X, list(query.var_names), model.genes)
    np.testing.assert_allclose(emb, expected, atol=1e-6)
    assert emb.shape == (20, TINY["dim"])


def test_save_and_load_round_trip(finetuned, pbmc, tmp_path):
    model, ref = finetuned
    model.save(tmp_path / "model", overwrite=True)
    loaded = SCBERT.load(tmp_path / "model", adata=ref)
    query = pbmc[600:640].copy()
    np.testing.assert_allclose(
        loaded.predict_proba(query).to_numpy(), model.predict_proba(query).to_numpy(), atol=1e-6
    )
    assert loaded.classes == model.classes and loaded.genes == model.genes


def test_class_weight_schemes():
    counts = np.array([90, 10])
    torch.testing.assert_close(
        compute_class_weights(counts, "official"), torch.tensor([0.01, 0.81])
    )
    torch.testing.assert_close(
        compute_class_weights(counts, "balanced"), torch.tensor([100 / 180, 5.0])
    )
    torch.testing.assert_close(compute_class_weights(counts, [1, 2]), torch.tensor([1.0, 2.0]))
    assert compute_class_weights(counts, None) is None
    with pytest.raises(ValueError, match="class_weights must be"):
        compute_class_weights(counts, "inverse")
    with pytest.raises(ValueError, match="one per class"):
        compute_class_weights(counts, [1.0])


def test_setup_and_construction_errors(pbmc):
    adata = pbmc[:50].copy()
    adata.obs["half"] = adata.obs["cell_type"].astype(object)
    adata.obs.loc[adata.obs_names[:3], "half"] = np.nan
    with pytest.raises(InputError, match="missing labels"):
        SCBERT.setup_anndata(adata, labels_key="half")
    with pytest.raises(InputError, match="not a column of adata.obs"):
        SCBERT.setup_anndata(adata, labels_key="celltype")
    lognorm = adata.copy()
    lognorm.X = lognorm.X.astype(np.float32) * 0.5
    with pytest.raises(InputError, match="non-integer"):
        SCBERT.setup_anndata(lognorm)
    assert "_scvi_uuid" not in lognorm.uns
    SCBERT.setup_anndata(adata)
    with pytest.raises(ValueError, match="needs cell-type labels"):
        SCBERT(adata, head="classifier", **TINY)
    with pytest.raises(ValueError, match="gene2vec table has shape"):
        SCBERT(adata, gene2vec=np.zeros((3, TINY["dim"])), **TINY)
    model = SCBERT(adata, **TINY)
    assert model.module.pos_emb is None  # no gene2vec: official g2v_position_emb=False
    with pytest.raises(ValueError, match="pretraining head"):
        model.predict(adata)
    with pytest.raises(ValueError, match="classifier head only"):
        model.train(max_epochs=1, class_weights="official", **TRAIN)


def test_fine_tune_classifier_holds_out_a_validation_part_and_stops_early(pbmc, pretrained):
    """A stratified fifth of the reference is watched; training stops when its loss stalls."""
    model, _ = pretrained
    reference = pbmc[600:800].copy()
    with pytest.raises(ValueError, match="patience"):
        model.fine_tune_classifier(reference, "cell_type", patience=0)
    tuned = model.fine_tune_classifier(
        reference,
        "cell_type",
        max_epochs=8,
        batch_size=32,
        validation_size=0.2,
        patience=1,
        train_kwargs=TRAIN,
    )
    validation = tuned.history["validation_loss"].to_numpy().ravel().astype(float)
    train = tuned.history["train_loss"].to_numpy().ravel().astype(float)
    assert np.isfinite(validation).all() and 1 <= len(validation) <= 8
    assert len(train) == len(validation)
    # patience 1: a run that stops early stops one epoch after its best
    if len(validation) < 8:
        assert int(np.argmin(validation)) == len(validation) - 2, validation
    assert tuned.classes == sorted(reference.obs["cell_type"].astype(str).unique())
    # every layer but gene2vec trains by default (trainable="all")
    frozen = {n for n, p in tuned.module.named_parameters() if not p.requires_grad}
    assert frozen <= {"pos_emb.emb.weight"}, frozen
