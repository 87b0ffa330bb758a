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
