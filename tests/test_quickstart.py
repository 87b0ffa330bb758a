"""The README's main job runs offline on the embedded default model and packaged data."""

import pytest


@pytest.mark.slow
def test_quickstart_main_job(tmp_path):
    from scfm_tools.quickstart import main

    scores = main(["--out", str(tmp_path)])
    ours = scores["X_scgpt"]
    # The tiny default model must carry cell-type signal: well above always guessing the
    # largest of the 10 bulk labels (its share is the chance level).
    assert ours["knn_accuracy"] > ours["chance_accuracy"] + 0.15
    assert (tmp_path / "umap.png").stat().st_size > 10_000
    assert (tmp_path / "pbmc68k_embedded.h5ad").is_file()
    assert set(scores) == {"X_scgpt", "X_pca (baseline)"}


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
