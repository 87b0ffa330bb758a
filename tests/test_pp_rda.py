"""sft.pp.downsample_rda on real PBMC counts (10x, three chemistries)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
from scipy import sparse, stats

import scfm_tools as sft
from _unchanged import assert_unchanged, snapshot
from scfm_tools._validation import InputError
from scfm_tools.pp import downsample_rda

PBMC = "pbmc_10x_3chemistries_unlabeled.h5ad"
OBS_KEYS = ["rda_T", "rda_S", "rda_log10_T", "rda_log10_S", "rda_rate", "rda_downsampled"]


@pytest.fixture(scope="module")
def pbmc(data_dir):
    path = data_dir / PBMC
    if not path.exists():
        pytest.skip(f"{PBMC} not found")
    return ad.read_h5ad(path)


@pytest.fixture(scope="module")
def pbmc_rda(pbmc):
    """One default run (seed 0) shared by the read-only checks."""
    return downsample_rda(pbmc, random_state=0, copy=True)


def _row_sums(x):
    return np.asarray(x.sum(axis=1), dtype=np.float64).ravel()


def test_totals_recorded_and_consistent(pbmc, pbmc_rda):
    out = pbmc_rda
    layer = out.layers["rda_counts"]
    assert sparse.issparse(layer) and layer.format == "csr"
    assert layer.dtype == pbmc.X.dtype
    assert (out.X != pbmc.X).nnz == 0  # X untouched
    T, S = out.obs["rda_T"].to_numpy(), out.obs["rda_S"].to_numpy()
    np.testing.assert_array_equal(T, _row_sums(pbmc.X))
    np.testing.assert_array_equal(S, _row_sums(layer))
    assert (S <= T).all() and (S > 0).all()
    np.testing.assert_allclose(out.obs["rda_log10_T"], np.log10(T))
    np.testing.assert_allclose(out.obs["rda_log10_S"], np.log10(S))
    # Thinning only removes counts: same or fewer nonzeros, each value at most the input value.
    X = sparse.csr_matrix(pbmc.X)
    assert (layer.multiply(X != 0) != layer).nnz == 0
    assert (layer > X).nnz == 0
    assert layer.nnz < X.nnz
    report = out.uns["rda"]
    assert report["n_downsampled"] == out.obs["rda_downsampled"].sum()
    assert report["params"]["random_state"] == 0
    assert report["params"]["alpha"] == 2.0


def test_which_cells_are_downsampled(pbmc, pbmc_rda):
    out = pbmc_rda
    T = out.obs["rda_T"].to_numpy()
    down = out.obs["rda_downsampled"].to_numpy()
    eligible = T >= 1000
    assert (~eligible).sum() == 1  # one cell of this dataset has 992 counts
    assert not down[~eligible].any()
    assert out.uns["rda"]["n_eligible"] == eligible.sum()
    # Each eligible cell is downsampled with probability 0.5 (binomial sd ~ 0.0094 here).
    assert down[eligible].mean() == pytest.approx(0.5, abs=0.04)
    # Cells left alone keep their counts exactly and a rate of 1.
    kept = np.flatnonzero(~down)
    X, L = sparse.csr_matrix(pbmc.X), out.layers["rda_counts"]
    assert (X[kept] != L[kept]).nnz == 0
    assert (out.obs["rda_rate"].to_numpy()[kept] == 1.0).all()
    np.testing.assert_array_equal(out.obs["rda_S"].to_numpy()[kept], T[kept])


def test_kept_fraction_matches_drawn_rate(pbmc_rda):
    obs = pbmc_rda.obs[pbmc_rda.obs["rda_downsampled"]]
    r, T, S = obs["rda_rate"].to_numpy(), obs["rda_T"].to_numpy(), obs["rda_S"].to_numpy()
    assert ((r > 0) & (r < 1)).all()
    # S | r ~ Binomial(T, r): standardised residuals have mean 0 and sd 1.
    z = (S - r * T) / np.sqrt(T * r * (1 - r))
    assert abs(z.mean()) < 4 / np.sqrt(len(z))
    assert 0.9 < z.std() < 1.1
    assert np.abs(S / T - r).max() < 0.06


def test_drawn_rates_follow_beta(pbmc, pbmc_rda):
    rates = pbmc_rda.obs.loc[pbmc_rda.obs["rda_downsampled"], "rda_rate"].to_numpy()
    assert stats.kstest(rates, stats.beta(2, 2).cdf).pvalue > 1e-3
    assert rates.mean() == pytest.approx(0.5, abs=0.03)
    assert rates.std() == pytest.approx(np.sqrt(1 / 20), abs=0.02)  # Beta(2,2) sd = 0.2236
    skewed = downsample_rda(pbmc, alpha=5.0, beta=1.0, p_downsample=1.0, random_state=3, copy=True)
    r = skewed.obs["rda_rate"].to_numpy()[skewed.obs["rda_downsampled"].to_numpy()]
    assert len(r) == 2859
    assert stats.kstest(r, stats.beta(5, 1).cdf).pvalue > 1e-3
    assert r.mean() == pytest.approx(5 / 6, abs=0.01)


def test_fixed_rate_halves_totals(pbmc):
    out = downsample_rda(pbmc, rate=0.5, min_counts=0, random_state=1, copy=True)
    T, S = out.obs["rda_T"].to_numpy(), out.obs["rda_S"].to_numpy()
    assert out.obs["rda_downsampled"].all()
    assert (out.obs["rda_rate"] == 0.5).all()
    assert S.sum() / T.sum() == pytest.approx(0.5, abs=0.002)
    assert (S / T).mean() == pytest.approx(0.5, abs=0.005)
    # rate=1 keeps every count.
    same = downsample_rda(pbmc, rate=1.0, min_counts=0, random_state=1, copy=True)
    assert (same.layers["rda_counts"] != pbmc.X).nnz == 0


def test_deterministic_and_seed_dependent(pbmc, pbmc_rda, monkeypatch):
    again = downsample_rda(pbmc, random_state=0, copy=True)
    assert (again.layers["rda_counts"] != pbmc_rda.layers["rda_counts"]).nnz == 0
    np.testing.assert_array_equal(again.obs["rda_rate"], pbmc_rda.obs["rda_rate"])
    other = downsample_rda(pbmc, random_state=1, copy=True)
    assert (other.layers["rda_counts"] != pbmc_rda.layers["rda_counts"]).nnz > 0
    assert not np.array_equal(other.obs["rda_rate"], pbmc_rda.obs["rda_rate"])
    monkeypatch.setattr(sft.settings, "_seed", 0)
    default = downsample_rda(pbmc, copy=True)
    assert (default.layers["rda_counts"] != pbmc_rda.layers["rda_counts"]).nnz == 0


def test_chunk_size_and_density_do_not_matter(pbmc, pbmc_rda):
    small = downsample_rda(pbmc, random_state=0, chunk_size=257, copy=True)
    assert (small.layers["rda_counts"] != pbmc_rda.layers["rda_counts"]).nnz == 0
    for key in OBS_KEYS:
        np.testing.assert_array_equal(small.obs[key], pbmc_rda.obs[key])
    sub = pbmc[:600].copy()
    sub_sparse = downsample_rda(sub, random_state=5, chunk_size=100, copy=True)
    dense = ad.AnnData(sub.X.toarray(), obs=sub.obs[[]], var=sub.var[[]])
    downsample_rda(dense, random_state=5, chunk_size=1000)
    assert isinstance(dense.layers["rda_counts"], np.ndarray)
    assert dense.layers["rda_counts"].dtype == sub.X.dtype
    np.testing.assert_array_equal(
        dense.layers["rda_counts"], sub_sparse.layers["rda_counts"].toarray()
    )


def test_leading_cells_get_the_same_draws_in_a_subset(pbmc, pbmc_rda):
    # Draws are consumed in cell order, so a dataset made of the first cells reproduces them.
    head = downsample_rda(pbmc[:500].copy(), random_state=0, copy=True)
    for key in OBS_KEYS:
        np.testing.assert_array_equal(head.obs[key], pbmc_rda.obs[key].iloc[:500])
    assert (head.layers["rda_counts"] != pbmc_rda.layers["rda_counts"][:500]).nnz == 0


def test_cells_emptied_by_thinning_keep_their_counts(pbmc):
    sub = pbmc[:300].copy()
    out = downsample_rda(sub, rate=1e-4, min_counts=0, random_state=2, copy=True)
    restored = ~out.obs["rda_downsampled"].to_numpy()
    assert out.uns["rda"]["n_restored"] == restored.sum() > 200
    T, S = out.obs["rda_T"].to_numpy(), out.obs["rda_S"].to_numpy()
    np.testing.assert_array_equal(S[restored], T[restored])
    assert (out.obs["rda_rate"].to_numpy()[restored] == 1.0).all()
    assert (S[~restored] >= 1).all() and (S[~restored] < T[~restored]).all()
    np.testing.assert_array_equal(S, _row_sums(out.layers["rda_counts"]))


@pytest.mark.filterwarnings("ignore:.*update\\(\\):FutureWarning", "ignore:Cannot join columns")
def test_layer_key_added_copy_and_mudata(pbmc, data_dir):
    import mudata as md

    sub = pbmc[:200].copy()
    sub.layers["counts"] = sub.X.copy()
    sub.X = sparse.csr_matrix(sub.X, dtype=np.float32) * 0.5  # not counts; must not be read
    assert downsample_rda(sub, layer="counts", key_added="ds", random_state=0) is None
    assert {"ds_counts"} <= set(sub.layers) and "ds_T" in sub.obs and "ds" in sub.uns
    np.testing.assert_array_equal(sub.obs["ds_T"], _row_sums(sub.layers["counts"]))
    assert sub.uns["ds"]["params"]["layer"] == "counts"

    mdata = md.read_h5mu(data_dir / "citeseq_pbmc_hao2021_tiny.h5mu")
    out = downsample_rda(mdata, mod="prot", min_counts=0, random_state=0, copy=True)
    assert isinstance(out, md.MuData)
    assert "rda_counts" in out["prot"].layers and "rda_counts" not in mdata["prot"].layers
    # The tiny RNA modality (50 genes) has cells with no counts: refused, nothing written.
    with pytest.raises(InputError, match=r"empty cells"):
        downsample_rda(mdata, mod="rna")
    assert "rda_counts" not in mdata["rna"].layers


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rate": 0.0}, r"rate must be a number in \(0, 1\]"),
        ({"rate": 1.5}, r"rate must be a number in \(0, 1\]"),
        ({"rate": -0.2}, r"rate must be a number in \(0, 1\]"),
        ({"rate": float("nan")}, r"rate must be a number in \(0, 1\]"),
        ({"alpha": 0.0}, r"alpha must be a positive number"),
        ({"beta": -1.0}, r"beta must be a positive number"),
        ({"p_downsample": 2.0}, r"p_downsample must be a probability"),
        ({"min_counts": -1}, r"min_counts must be a non-negative"),
        ({"chunk_size": 0}, r"chunk_size must be a positive integer"),
    ],
)
def test_bad_parameters(pbmc, kwargs, match):
    sub = pbmc[:50].copy()
    snap = snapshot(sub)
    with pytest.raises(ValueError, match=match):
        downsample_rda(sub, **kwargs)
    assert_unchanged(sub, snap)


def test_bad_inputs_leave_adata_unchanged(pbmc):
    sub = pbmc[:100].copy()

    normalised = sub.copy()
    normalised.X = sparse.csr_matrix(normalised.X, dtype=np.float32)
    normalised.X.data = normalised.X.data / 3.0
    snap = snapshot(normalised)
    with pytest.raises(InputError, match=r"non-integer values"):
        downsample_rda(normalised)
    assert_unchanged(normalised, snap)

    negative = sub.copy()
    negative.X.data[0] = -1
    snap = snapshot(negative)
    with pytest.raises(InputError, match=r"negative values"):
        downsample_rda(negative)
    assert_unchanged(negative, snap)

    nan = sub.copy()
    nan.X = sparse.csr_matrix(nan.X, dtype=np.float64)
    nan.X.data[5] = np.nan
    snap = snapshot(nan)
    with pytest.raises(InputError, match=r"NaN or infinite"):
        downsample_rda(nan)
    assert_unchanged(nan, snap)

    empty = sub.copy()
    X = empty.X.tolil()
    X[3, :] = 0
    empty.X = X.tocsr()
    empty.X.eliminate_zeros()
    snap = snapshot(empty)
    with pytest.raises(InputError, match=r"empty cells"):
        downsample_rda(empty)
    assert_unchanged(empty, snap)

    snap = snapshot(sub)
    with pytest.raises(KeyError, match=r"layer 'counts' is not in adata.layers"):
        downsample_rda(sub, layer="counts")
    assert_unchanged(sub, snap)
