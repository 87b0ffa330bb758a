"""sft.pl.imputation and sft.pl.training_history: what they draw."""

from __future__ import annotations

import anndata as ad
import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt

import scfm_tools as sft


@pytest.fixture(scope="module")
def pbmc(data_dir):
    adata = ad.read_h5ad(data_dir / "pbmc8k_200genes_labeled.h5ad")[:300].copy()
    adata.X = adata.X.astype(np.float32)
    return adata


def _log1p_cp10k(X):
    X = X.toarray()
    return np.log1p(X / X.sum(1, keepdims=True) * 1e4)


def test_imputation_identity_layer_lies_on_the_diagonal(pbmc):
    adata = pbmc.copy()
    adata.layers["imp"] = _log1p_cp10k(adata.X).astype(np.float32)
    adata.layers["imp"][:, :5] = np.nan  # genes the model does not know
    scatter, hist = sft.pl.imputation(adata, "imp", n_points=400, show=False)
    x, y = scatter.collections[0].get_offsets().T
    assert x.size == 400
    np.testing.assert_allclose(x, y, atol=1e-5)
    counts = [p.get_height() for p in hist.patches]
    # Every known gene with variance gets r = 1; the 5 unknown genes are left out.
    n_var = int((np.asarray(adata.X[:, 5:].toarray()).std(0) > 0).sum())
    assert sum(counts) == n_var
    assert "median r = 1.00" in hist.get_title()
    plt.close("all")


def test_imputation_counts_scale_from_family_and_genes(pbmc, tmp_path):
    adata = pbmc.copy()
    adata.layers["cellplm_denoised"] = adata.X.toarray() * 3.0  # expected counts, other depth
    adata.uns["cellplm_denoised"] = {"params": {"family": "cellplm"}}
    genes = list(adata.var_names[:3])
    out = tmp_path / "imp.png"
    scatter, _ = sft.pl.imputation(
        adata, "cellplm_denoised", genes=genes, n_points=10_000, save=out, show=False
    )
    x, y = scatter.collections[0].get_offsets().T
    assert x.size == 3 * adata.n_obs  # only the chosen genes' entries
    np.testing.assert_allclose(x, y, atol=1e-5)  # normalising removes the depth factor
    assert out.stat().st_size > 0
    # read as log1p instead, the values no longer agree
    scatter, _ = sft.pl.imputation(adata, "cellplm_denoised", scale="log1p", show=False)
    x, y = scatter.collections[0].get_offsets().T
    assert not np.allclose(x, y)
    plt.close("all")


def test_imputation_bad_inputs(pbmc):
    adata = pbmc.copy()
    with pytest.raises(KeyError, match="run sft.tl.impute"):
        sft.pl.imputation(adata, "nope", show=False)
    adata.layers["imp"] = np.full(adata.shape, np.nan, dtype=np.float32)
    with pytest.raises(ValueError, match="all NaN"):
        sft.pl.imputation(adata, "imp", show=False)
    with pytest.raises(KeyError, match="not in adata.var_names"):
        sft.pl.imputation(adata, "imp", genes=["NOT_A_GENE"], show=False)


def test_training_history_draws_each_logged_epoch(data_dir):
    adata = ad.read_h5ad(data_dir / "cellbench_3celllines_celseq2_dropseq.h5ad")[:80]
    genes = np.argsort(-np.asarray((adata.X > 0).sum(0)).ravel())[:100]
    adata = adata[:, np.sort(genes)].copy()
    sft.models.SCGPT.setup_anndata(adata)
    torch.manual_seed(0)
    model = sft.models.SCGPT(
        adata, d_model=16, n_heads=2, d_hid=16, n_layers=1, max_seq_len=32, dropout=0.0
    )
    model.train(max_epochs=3, batch_size=40, accelerator="cpu", enable_progress_bar=False)
    ax = sft.pl.training_history(model, show=False)
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert "train_loss" in lines
    y = lines["train_loss"].get_ydata()
    np.testing.assert_allclose(y, model.history["train_loss"].iloc[:, 0].to_numpy(dtype=float))
    assert len(y) == 3
    with pytest.raises(KeyError, match="it has"):
        sft.pl.training_history(model, "no_such_metric", show=False)
    with pytest.raises(ValueError, match="train it"):
        sft.pl.training_history(object(), show=False)
    plt.close("all")
