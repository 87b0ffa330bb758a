"""The README's main job runs offline on the embedded default model and packaged data."""

import pytest


@pytest.mark.slow
def test_quickstart_main_job(tmp_path):
    from scfm_tools.quickstart import main

    scores = main(["--out", str(tmp_path)])
    ours, pca = scores["X_cellplm"], scores["X_pca (baseline)"]
    # The default (cellplm-default fine-tuned on these cells, which it never saw) separates the
    # 10 bulk labels about as well as PCA does (0.81 vs 0.80 kNN accuracy, 0.25 vs 0.19
    # silhouette when measured); the margin allows for other float libraries, not for a loss.
    assert ours["knn_accuracy"] >= pca["knn_accuracy"] - 0.03
    assert ours["silhouette"] >= pca["silhouette"] - 0.03
    assert ours["knn_accuracy"] > ours["chance_accuracy"] + 0.3
    assert (tmp_path / "umap.png").stat().st_size > 10_000
    assert (tmp_path / "pbmc68k_embedded.h5ad").is_file()
    assert set(scores) == {"X_cellplm", "X_pca (baseline)"}


def test_counts_are_recovered_from_log_normalised_values():
    import numpy as np
    from scipy import sparse

    from scfm_tools.quickstart import counts_from_log_normalised

    rng = np.random.default_rng(0)
    counts = rng.poisson(0.8, (50, 300)).astype(np.float32)
    counts[:, 0] = 1  # every cell holds a gene with one count
    totals = counts.sum(axis=1, keepdims=True)
    logged = np.log1p(counts / totals * 1e4).astype(np.float32)
    np.testing.assert_array_equal(counts_from_log_normalised(sparse.csr_matrix(logged)), counts)
    with pytest.raises(ValueError, match="not log1p of per-cell scaled counts"):
        counts_from_log_normalised(rng.normal(1.0, 0.3, (5, 20)).clip(0.1))
