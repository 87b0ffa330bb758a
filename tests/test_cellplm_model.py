"""CellPLM model class: pretraining corruption, training through Lightning, export, reload."""

from __future__ import annotations

import json
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse

import scfm_tools as sft
from scfm_tools._validation import InputError
from scfm_tools.models.cellplm import CellPLM, load_cellplm_checkpoint, mask_sequence

SMALL = {"enc_hid": 16, "enc_heads": 2, "post_latent_dim": 8, "num_clusters": 4, "dec_hid": 16}


@pytest.fixture(scope="module")
def cellbench(data_dir):
    adata = ad.read_h5ad(data_dir / "cellbench_3celllines_celseq2_dropseq.h5ad")
    totals = np.asarray(adata.X.sum(0)).ravel()
    rng = np.random.default_rng(0)
    cells = np.sort(
        np.concatenate(
            [
                rng.choice(np.flatnonzero(adata.obs["batch"] == b), 48, replace=False)
                for b in sorted(adata.obs["batch"].unique())
            ]
        )
    )
    small = adata[cells, np.sort(np.argsort(-totals)[:150])].copy()
    small.X = sparse.csr_matrix(small.X, dtype=np.float32)
    return small


# --- corruption -------------------------------------------------------------------------------
def test_mask_sequence_follows_the_published_recipe():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.poisson(3.0, (40, 2000)).astype(np.float32) + 1)  # no zero counts
    batch = torch.arange(40)
    out = mask_sequence(
        x.to_sparse(),
        mask_node_rate=0.75,
        mask_feature_rate=0.25,
        drop_node_rate=0.3,
        rng=np.random.default_rng(1),
        extra={"batch": batch},
    )
    kept = out["batch"]
    assert len(kept) == int(40 * 0.7) and torch.equal(out["X_target"], x[kept])
    mask = out["input_mask"].bool()
    masked_cells = mask.any(1)
    assert int(masked_cells.sum()) == int(0.75 * len(kept))
    # masked counts are zero in the input, the others untouched
    assert (out["X"][mask] == 0).all()
    assert torch.equal(out["X"][~mask], out["X_target"][~mask])
    # Beta(5, 4/0.25 - 3) per cell: mean 5/18, spread between cells
    frac = mask[masked_cells].float().mean(1).numpy()
    assert abs(frac.mean() - 5 / 18) < 0.05 and frac.std() > 0.03
    flat = mask_sequence(
        x, mask_node_rate=0.5, mask_feature_rate=0.25, mask_beta=False, rng=np.random.default_rng(2)
    )
    frac = flat["input_mask"][flat["input_mask"].bool().any(1)].mean(1).numpy()
    np.testing.assert_allclose(frac, 0.25, atol=0.04)
    assert len(flat["X"]) == 40  # nothing dropped
    # the cap on cells applies after dropping
    capped = mask_sequence(
        x,
        mask_node_rate=0.5,
        mask_feature_rate=0.25,
        drop_node_rate=0.3,
        max_cells=10,
        rng=np.random.default_rng(3),
    )
    assert len(capped["X"]) == 10
    # the same stream gives the same corruption
    again = mask_sequence(
        x.to_sparse(),
        mask_node_rate=0.75,
        mask_feature_rate=0.25,
        drop_node_rate=0.3,
        rng=np.random.default_rng(1),
        extra={"batch": batch},
    )
    assert torch.equal(again["input_mask"], out["input_mask"])
    with pytest.raises(ValueError, match="drop_node_rate must lie in"):
        mask_sequence(
            x,
            mask_node_rate=0.5,
            mask_feature_rate=0.2,
            drop_node_rate=1.0,
            rng=np.random.default_rng(0),
        )


# --- training ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(cellbench):
    adata = cellbench.copy()
    CellPLM.setup_anndata(adata, batch_key="batch")
    model = CellPLM(adata, **SMALL)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.train(
            max_epochs=2,
            accelerator="cpu",
            max_cells=24,
            random_state=0,
            plan_kwargs={"lr": 1e-2},
            check_val_every_n_epoch=1,
            enable_progress_bar=False,
        )
    model.caught_warnings = [str(w.message) for w in caught]
    return adata, model, before


def test_training_runs_the_published_objective(trained):
    adata, model, before = trained
    # Losses are weighted by the cells of each sequence, not by a size Lightning guesses.
    assert not [w for w in model.caught_warnings if "infer the `batch_size`" in w]
    history = model.history
    for key in ("train_loss", "nb_loss_train", "latent_loss_train", "validation_loss"):
        assert key in history, sorted(history)
        assert np.isfinite(np.asarray(history[key], dtype=float)).all()
    # the latent terms are floored at lamda each (free bits): w_li*lamda + w_en*lamda at least
    assert float(history["latent_loss_train"].iloc[-1, 0]) >= 5.0 * 5.0 * 2 - 1e-4
    after = model.module.state_dict()
    for key in (
        "embedder.feat_enc.emb",
        "encoder.layers.0.self_attn.query_projection.weight",
        "decoder.covariate_layers.0.batch.0.weight",
    ):
        assert not torch.equal(before[key], after[key]), key
    assert model.module.config["batch_num"] == adata.obs["batch"].nunique()


def test_export_reload_and_embed_cells_agree(trained, tmp_path):
    adata, model, _ = trained
    ours = model.get_latent_representation()
    assert ours.shape == (adata.n_obs, SMALL["post_latent_dim"])
    path = model.export(tmp_path / "mine")
    with pytest.raises(FileExistsError):
        model.export(tmp_path / "mine")
    _, genes, config, report = load_cellplm_checkpoint(path)
    assert report.clean and genes == list(adata.var_names)
    assert config["enc_hid"] == SMALL["enc_hid"] and config["batch_num"] == 2
    fresh = adata.copy()
    sft.tl.embed_cells(fresh, path, batch_key="batch")
    np.testing.assert_allclose(fresh.obsm["X_cellplm"], ours, atol=1e-5)
    # and the decoder reconstructs through sft.tl.impute
    sft.tl.impute(fresh, path, batch_key="batch")
    assert np.isfinite(fresh.layers["cellplm_denoised"]).all()
    # the package's own format: safetensors beside the same config, read the same way
    safe = model.export(tmp_path / "safe" / "mine", weights="safetensors")
    assert safe.name == "mine.safetensors" and not (safe.parent / "mine.best.ckpt").exists()
    again = adata.copy()
    sft.tl.embed_cells(again, safe.parent, batch_key="batch")
    np.testing.assert_array_equal(again.obsm["X_cellplm"], fresh.obsm["X_cellplm"])
    with pytest.raises(ValueError, match="weights must be 'ckpt' or 'safetensors'"):
        model.export(tmp_path / "other", weights="pickle")


def test_setup_refuses_non_counts(cellbench):
    adata = cellbench.copy()
    adata.X = adata.X.multiply(0.5).tocsr()
    with pytest.raises(InputError, match="non-integer values"):
        CellPLM.setup_anndata(adata)
    assert "_scvi_uuid" not in adata.uns


def test_from_pretrained_reproduces_the_official_embedding(fixtures_dir):
    root = fixtures_dir / "cellplm"
    arrays = dict(np.load(root / "fixture_io.npz"))
    tol = json.loads((root / "fixture_meta.json").read_text())["tolerance"]
    adata = ad.AnnData(
        sparse.csr_matrix(arrays["counts"]),
        obs=pd.DataFrame(
            {"batch": arrays["obs_batch"].astype(str)},
            index=[f"c{i}" for i in range(len(arrays["counts"]))],
        ),
        var=pd.DataFrame(index=[str(g) for g in arrays["var_names"]]),
    )
    CellPLM.setup_anndata(adata, batch_key="batch")
    model = CellPLM.from_pretrained(root, adata)
    assert model.pretrained_["clean"] and not model.batch_covariate
    emb = model.get_latent_representation(sample=True, random_state=0, random_stream="official")
    np.testing.assert_allclose(emb, arrays["cell_emb_seed0"], atol=tol["atol"], rtol=tol["rtol"])
    det = model.get_latent_representation()
    np.testing.assert_array_equal(det, model.get_latent_representation())
    sft.tl.embed_cells(adata, root, batch_key="batch")
    np.testing.assert_allclose(adata.obsm["X_cellplm"], det, atol=1e-6)
