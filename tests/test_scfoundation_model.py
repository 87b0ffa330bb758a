"""The SCFoundation model class: RDA pretraining on CPU, export and reload, masking."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch

import scfm_tools as sft
from scfm_tools._validation import InputError
from scfm_tools.models.scfoundation import GeneReindexer, mask_values, rda_pairs

PBMC8K = "pbmc8k_200genes_labeled.h5ad"
TINY = {
    "enc_dim": 8,
    "enc_depth": 1,
    "enc_heads": 2,
    "dec_dim": 8,
    "dec_depth": 1,
    "dec_heads": 2,
    "dec_dim_head": 4,
    "bin_num": 10,
}


@pytest.fixture(scope="module")
def cells(data_dir):
    """48 real PBMCs (200 genes, raw counts) with RDA-downsampled counts beside them."""
    adata = ad.read_h5ad(data_dir / PBMC8K)[:48].copy()
    sft.pp.downsample_rda(adata, min_counts=0, random_state=0)
    return adata


@pytest.fixture(scope="module")
def trained(cells):
    adata = cells.copy()
    sft.models.SCFoundation.setup_anndata(adata, rda_layer="rda_counts")
    model = sft.models.SCFoundation(adata, **TINY)
    model.train(
        max_epochs=6,
        accelerator="cpu",
        batch_size=16,
        train_size=1.0,
        random_state=0,
        plan_kwargs={"lr": 1e-2},
        enable_progress_bar=False,
    )
    return model, adata


def test_rda_pretraining_loss_decreases(trained):
    model, _ = trained
    loss = model.history["train_loss"]["train_loss"].to_numpy(dtype=float)
    assert len(loss) == 6 and np.isfinite(loss).all()
    assert loss[-1] < 0.7 * loss[0]
    assert model.is_trained_


def test_outputs_export_and_reload(trained, tmp_path):
    model, adata = trained
    emb = model.get_latent_representation()
    assert emb.shape == (adata.n_obs, 4 * TINY["enc_dim"]) and np.isfinite(emb).all()
    expr = model.get_gene_expression(indices=[0, 1], target_depth="f2")
    assert expr.shape == (2, adata.n_vars)
    path = model.export(tmp_path)
    assert path.name == "models.ckpt"
    assert (tmp_path / "OS_scRNA_gene_index.19264.tsv").is_file()  # its own gene list
    with pytest.raises(FileExistsError):
        model.export(tmp_path)
    reloaded = sft.models.SCFoundation.from_pretrained(path, adata)
    assert reloaded.pretrained_["clean"]
    np.testing.assert_array_equal(reloaded.get_latent_representation(), emb)
    # the exported file goes through the functional API as an official checkpoint would
    fresh = adata.copy()
    sft.tl.embed_cells(fresh, path, batch_size=7)
    np.testing.assert_allclose(fresh.obsm["X_scfoundation"], emb, atol=1e-5, rtol=1e-4)


def test_mask_values_shares():
    rng = np.random.default_rng(0)
    values = torch.from_numpy((rng.random((6, 102)) * (rng.random((6, 102)) < 0.3)).astype("f4"))
    g = torch.Generator().manual_seed(1)
    mask = mask_values(values, 100, value_mask_prob=0.3, zero_mask_prob=0.1, generator=g)
    genes = values[:, :100]
    for i in range(6):
        nz, z = int((genes[i] != 0).sum()), int((genes[i] == 0).sum())
        assert int((mask[i, :100] & (genes[i] != 0)).sum()) == round(0.3 * nz)
        assert int((mask[i, :100] & (genes[i] == 0)).sum()) == round(0.1 * z)
    assert not mask[:, 100:].any()  # T and S are never masked
    again = mask_values(values, 100, value_mask_prob=0.3, zero_mask_prob=0.1,
                        generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert torch.equal(mask, again)


def test_rda_pairs_tokens(cells):
    target = cells.X[:5].toarray()
    source = cells.layers["rda_counts"][:5].toarray()
    values, tgt, usable = rda_pairs(target, source, GeneReindexer(np.arange(200), 200))
    assert usable.all()
    np.testing.assert_allclose(values[:, 200].numpy(), np.log10(target.sum(1)), rtol=1e-6)
    np.testing.assert_allclose(values[:, 201].numpy(), np.log10(source.sum(1)), rtol=1e-6)
    np.testing.assert_allclose(
        values[:, :200].numpy(), np.log1p(source / source.sum(1, keepdims=True) * 1e4), rtol=1e-5
    )
    np.testing.assert_allclose(
        tgt[:, :200].numpy(), np.log1p(target / target.sum(1, keepdims=True) * 1e4), rtol=1e-5
    )


def test_setup_refuses_non_counts(cells):
    adata = cells.copy()
    adata.layers["rda_counts"] = adata.layers["rda_counts"].astype(np.float32) * 0.5
    uns = set(adata.uns)
    with pytest.raises(InputError, match="non-integer"):
        sft.models.SCFoundation.setup_anndata(adata, rda_layer="rda_counts")
    assert set(adata.uns) == uns
