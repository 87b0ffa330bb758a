"""Progress bars: shown over the cells of long loops and in training, switched by the setting."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pytest
import torch

import scfm_tools as sft
from scfm_tools import _progress
from scfm_tools._progress import progress_bar
from scfm_tools.models import SCGPT

TINY = {"d_model": 16, "n_heads": 2, "d_hid": 16, "n_layers": 1, "max_seq_len": 48, "dropout": 0.0}


@pytest.fixture
def bars(monkeypatch):
    """The (desc, count, total, disabled) of each bar closed; bars drawn at once (no delay)."""
    import tqdm

    monkeypatch.setattr(_progress, "_DELAY_S", 0.0)
    closed = []
    close = tqdm.tqdm.close

    def record(self):
        if not getattr(self, "_recorded", False):
            self._recorded = True
            closed.append((getattr(self, "desc", None), self.n, self.total, self.disable))
        close(self)

    monkeypatch.setattr(tqdm.tqdm, "close", record)
    return closed


@pytest.fixture
def bars_off():
    sft.settings.progress_bar = False
    yield
    sft.settings.progress_bar = True


@pytest.fixture(scope="module")
def cells(data_dir):
    """60 real cells of CellBench, raw counts."""
    adata = ad.read_h5ad(data_dir / "cellbench_3celllines_celseq2_dropseq.h5ad")
    rows = np.sort(np.random.default_rng(0).choice(adata.n_obs, 60, replace=False))
    return adata[rows].copy()


def test_setting_defaults_on_and_checks_its_type():
    assert sft.settings.progress_bar is True
    assert "progress_bar=True" in repr(sft.settings)
    with pytest.raises(TypeError, match="True or False"):
        sft.settings.progress_bar = "yes"
    assert sft.settings.progress_bar is True


def test_bar_draws_on_stderr(bars, capsys):
    with progress_bar(10, desc="demo", unit="genes") as bar:
        bar.update(4)
    assert bars == [("demo", 4, 10, False)]
    err = capsys.readouterr().err
    assert "demo" in err and "/10" in err and "genes" in err


def test_log_lines_go_through_the_bar(bars, capsys):
    logger = logging.getLogger("scfm_tools")
    handlers = list(logger.handlers)
    with progress_bar(2, desc="demo"):
        logger.warning("a message during the loop")
    assert "a message during the loop" in capsys.readouterr().err
    assert logger.handlers == handlers  # the package's own handler is back afterwards


def test_embed_cells_counts_the_cells(cells, bars):
    adata = cells.copy()
    sft.tl.embed_cells(adata, "scgpt-default", batch_size=16)
    assert ("scGPT", 60, 60, False) in bars


def test_setting_off_draws_nothing(cells, bars, bars_off, capsys):
    adata = cells.copy()
    sft.tl.embed_cells(adata, "scgpt-default", batch_size=16)
    assert bars and all(disabled for *_, disabled in bars)
    with progress_bar(3, desc="demo") as bar:
        bar.update(3)
    assert "demo" not in capsys.readouterr().err


def test_label_transfer_bar_counts_query_cells(bars):
    from scfm_tools.tl._label_transfer import knn_proba

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(30, 4))
    query = rng.normal(size=(25, 4))
    proba = knn_proba(ref, np.repeat(["a", "b", "c"], 10), query, n_neighbors=5)
    assert proba.shape == (25, 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    assert bars == [("kNN label transfer", 25, 25, False)]


@pytest.mark.parametrize("on", [True, False])
def test_training_progress_bar_follows_the_setting(cells, on):
    sft.settings.progress_bar = on
    try:
        detected = np.asarray((cells.X > 0).sum(axis=0)).ravel()
        adata = cells[:, np.argsort(-detected, kind="stable")[:200]].copy()
        SCGPT.setup_anndata(adata)
        torch.manual_seed(0)
        model = SCGPT(adata, **TINY)
        model.train(max_epochs=1, batch_size=32, accelerator="cpu")
    finally:
        sft.settings.progress_bar = True
    assert (model.trainer.progress_bar_callback is not None) is on
