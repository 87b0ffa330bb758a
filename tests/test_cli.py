"""The ``scfm-tools`` command line: outputs equal the Python API's; bad input exits with 2.

Commands run in-process through ``main([...])`` (fast); one test runs ``python -m scfm_tools``
in a subprocess, as a user would.
"""

from __future__ import annotations

import os
import subprocess
import sys

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import torch

import scfm_tools as sft
from _scfoundation_tiny import tiny_checkpoint
from scfm_tools.cli import main
from scfm_tools.models import SCBERT, CellPLM
from scfm_tools.models.scgpt import load_scgpt_checkpoint

SCBERT_TINY = {"dim": 8, "depth": 1, "heads": 2, "dim_head": 4}


@pytest.fixture(scope="module")
def cellbench_file(data_dir, tmp_path_factory):
    """100 real cells (both protocols, three cell lines) of CellBench, raw counts, on disk."""
    adata = ad.read_h5ad(data_dir / "cellbench_3celllines_celseq2_dropseq.h5ad")
    rows = np.sort(np.random.default_rng(0).choice(adata.n_obs, 100, replace=False))
    path = tmp_path_factory.mktemp("cli") / "cells.h5ad"
    adata[rows].copy().write_h5ad(path)
    return path


# The command-line mechanics are tested with the zero-shot scgpt-default (fast); the default
# model's fine-tuning is tested below with few steps.
SCGPT = ("--model", "scgpt-default")


@pytest.fixture(scope="module")
def embedded(cellbench_file):
    """The API's result on the same cells, to compare the command's with."""
    adata = ad.read_h5ad(cellbench_file)
    sft.tl.embed_cells(adata, "scgpt-default")
    return adata


def _run(*argv) -> int:
    return main(["-q", *map(str, argv)])


def test_python_m_embed_equals_the_api(cellbench_file, embedded, tmp_path):
    out = tmp_path / "out.h5ad"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "scfm_tools", "embed", str(cellbench_file), "-o", str(out), *SCGPT],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "wrote obsm['X_scgpt']" in proc.stderr
    result = ad.read_h5ad(out)
    np.testing.assert_allclose(result.obsm["X_scgpt"], embedded.obsm["X_scgpt"], atol=1e-5)
    assert result.uns["scgpt"]["params"]["model"] == "scgpt-default"
    # the input comes through unchanged
    source = ad.read_h5ad(cellbench_file)
    assert (result.X != source.X).nnz == 0
    pd.testing.assert_frame_equal(result.obs, source.obs)


def test_backed_embed_equals_in_memory(cellbench_file, embedded, tmp_path):
    out = tmp_path / "out.h5ad"
    args = ["embed", cellbench_file, "-o", out, *SCGPT, "--backed", "--chunk-size", 30]
    args += ["--batch-size", 7]
    assert _run(*args) == 0
    result = ad.read_h5ad(out)
    np.testing.assert_allclose(result.obsm["X_scgpt"], embedded.obsm["X_scgpt"], atol=1e-5)
    assert (result.X != embedded.X).nnz == 0
    assert result.uns["scgpt"]["params"]["batch_size"] == 7


def test_output_is_compressed_with_ordinary_permissions(cellbench_file, tmp_path):
    out = tmp_path / "out.h5ad"
    before = os.umask(0o022)
    try:
        assert _run("embed", cellbench_file, "-o", out, *SCGPT) == 0
    finally:
        os.umask(before)
    assert out.stat().st_mode & 0o777 == 0o644  # not mkstemp's private 0600
    with h5py.File(out) as f:
        assert f["X/data"].compression == "gzip"
        assert f["obsm/X_scgpt"].compression == "gzip"
    assert [p.name for p in tmp_path.iterdir()] == ["out.h5ad"]  # no temporary file left


def test_settings_are_restored_after_a_quiet_run(cellbench_file, tmp_path):
    before = sft.settings.verbosity, sft.settings.progress_bar
    assert _run("embed", cellbench_file, "-o", tmp_path / "out.h5ad", *SCGPT) == 0
    assert (sft.settings.verbosity, sft.settings.progress_bar) == before == (1, True)


def test_output_not_h5ad_exits_2(cellbench_file, tmp_path, capsys):
    for name in ("out.csv", "out", "out.h5ad.gz"):
        assert _run("embed", cellbench_file, "-o", tmp_path / name) == 2
        err = capsys.readouterr().err.strip()
        assert "does not end in .h5ad" in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []  # refused before any work or file


def test_options_reach_the_function(cellbench_file, tmp_path):
    out = tmp_path / "out.h5ad"
    args = ("--key-added", "X_fm", "--max-length", 64)
    assert _run("embed", cellbench_file, "-o", out, *SCGPT, *args) == 0
    result = ad.read_h5ad(out)
    assert result.obsm["X_fm"].shape == (100, 64)
    assert result.uns["fm"]["params"]["max_length"] == 64


def test_bad_input_exits_2_with_one_line(cellbench_file, tmp_path, capsys):
    out = tmp_path / "out.h5ad"
    assert _run("embed", tmp_path / "missing.h5ad", "-o", out) == 2
    assert "missing.h5ad does not exist" in capsys.readouterr().err

    text = tmp_path / "counts.txt"
    text.write_text("gene\tcell1\nCD3E\t4\n")
    assert _run("embed", text, "-o", out) == 2
    assert "is not an .h5ad file" in capsys.readouterr().err

    assert _run("embed", cellbench_file, "-o", out, "--model", "no-such-model") == 2
    err = capsys.readouterr().err
    assert "No model card named 'no-such-model'" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err

    assert _run("embed", cellbench_file, "-o", out, "--model-option", "nokey") == 2
    assert "KEY=VALUE" in capsys.readouterr().err

    # an InputError from the input checks: negative values
    bad = ad.read_h5ad(cellbench_file)
    bad.X = bad.X.astype(np.float32)
    bad.X[3, bad.X[3].indices[0]] = -1.0
    bad_path = tmp_path / "negative.h5ad"
    bad.write_h5ad(bad_path)
    assert _run("embed", bad_path, "-o", out, *SCGPT) == 2
    assert "contains negative values" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.glob(".out.h5ad*")) == []

    # a usage error from argparse
    assert _run("embed", cellbench_file) == 2
    assert "required" in capsys.readouterr().err


def test_output_is_never_overwritten_without_flag(cellbench_file, tmp_path, capsys):
    out = tmp_path / "out.h5ad"
    out.write_bytes(b"keep me")
    assert _run("embed", cellbench_file, "-o", out) == 2
    assert "exists already" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    assert _run("embed", cellbench_file, "-o", out, *SCGPT, "--overwrite") == 0
    assert "X_scgpt" in ad.read_h5ad(out).obsm


def test_embed_default_fine_tunes_cellplm_default_as_the_api(cellbench_file, tmp_path, monkeypatch):
    """No --model: the API's default, cellplm-default fine-tuned on the cells (few steps here)."""
    monkeypatch.setitem(CellPLM.fine_tune_denoiser.__kwdefaults__, "steps", 4)  # 2 passes
    expected = ad.read_h5ad(cellbench_file)
    sft.tl.embed_cells(expected, batch_key="batch")
    for backed in (False, True):  # a backed file's cells are all read to fine-tune on (< 20,000)
        out = tmp_path / f"out_{backed}.h5ad"
        extra = ["--backed", "--chunk-size", 30] if backed else []
        assert _run("embed", cellbench_file, "-o", out, "--batch-key", "batch", *extra) == 0
        result = ad.read_h5ad(out)
        np.testing.assert_allclose(result.obsm["X_cellplm"], expected.obsm["X_cellplm"], atol=1e-4)
        params = result.uns["cellplm"]["params"]
        assert params["model"] == "cellplm-default" and params["denoiser_steps"] == 4
    out = tmp_path / "zero_shot.h5ad"
    assert _run("embed", cellbench_file, "-o", out, "--batch-key", "batch", "--no-fine-tune") == 0
    result = ad.read_h5ad(out)
    assert "denoiser_steps" not in result.uns["cellplm"]["params"]
    assert not np.allclose(result.obsm["X_cellplm"], expected.obsm["X_cellplm"], atol=1e-3)


def test_debug_shows_the_traceback(cellbench_file, tmp_path):
    with pytest.raises(KeyError, match="no-such-model"):
        main(["--debug", "embed", str(cellbench_file), "-o", str(tmp_path / "o.h5ad"),
              "--model", "no-such-model"])  # fmt: skip


# impute -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pbmc_file(data_dir, tmp_path_factory):
    """6 real full-transcriptome PBMCs (2 per chemistry), raw counts, on disk."""
    adata = ad.read_h5ad(data_dir / "pbmc_10x_3chemistries_unlabeled.h5ad")
    rows = np.concatenate(
        [np.flatnonzero(adata.obs["batch"] == b)[:2] for b in adata.obs["batch"].unique()]
    )
    path = tmp_path_factory.mktemp("cli_pbmc") / "pbmc.h5ad"
    adata[rows].copy().write_h5ad(path)
    return path


def test_impute_equals_the_api(pbmc_file, tmp_path):
    ckpt = tiny_checkpoint(tmp_path, seed=3)
    expected = ad.read_h5ad(pbmc_file)
    sft.tl.impute(expected, ckpt, target_depth="f10")
    key = "scfoundation_imputed"
    for backed in (False, True):
        out = tmp_path / f"imputed_{backed}.h5ad"
        extra = ["--backed", "--chunk-size", 4] if backed else []
        args = ["impute", pbmc_file, "-o", out, "--model", ckpt, "--target-depth", "f10"]
        assert _run(*args, *extra) == 0
        result = ad.read_h5ad(out)
        np.testing.assert_allclose(result.layers[key], expected.layers[key], atol=1e-5)
        assert result.uns[key]["params"]["target_depth"] == "f10"
        assert (result.X != expected.X).nnz == 0


def test_impute_default_on_backed_input_equals_in_memory(pbmc_file, tmp_path, monkeypatch):
    # the default fine-tunes on the cells: a backed file's are read (a sample of at most 20,000)
    monkeypatch.setitem(CellPLM.fine_tune_denoiser.__kwdefaults__, "steps", 3)
    expected = ad.read_h5ad(pbmc_file)
    sft.tl.impute(expected)
    out = tmp_path / "o.h5ad"
    assert _run("impute", pbmc_file, "-o", out, "--backed", "--chunk-size", 4) == 0
    result = ad.read_h5ad(out)
    key = "cellplm_denoised"
    np.testing.assert_allclose(result.layers[key], expected.layers[key], rtol=1e-4, atol=1e-4)
    assert result.uns[key]["params"]["denoiser_steps"] == 3


# annotate ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def labelled(data_dir, tmp_path_factory):
    """Reference (120 cells) and query (60 cells) files of labelled PBMCs, and a checkpoint."""
    adata = ad.read_h5ad(data_dir / "pbmc8k_200genes_labeled.h5ad")
    adata = adata[adata.obs["cell_type"] != "NA"]
    order = np.random.default_rng(2).permutation(adata.n_obs)
    folder = tmp_path_factory.mktemp("cli_annotate")
    ref, query = adata[order[:120]].copy(), adata[order[120:180]].copy()
    ref.write_h5ad(folder / "ref.h5ad")
    query.write_h5ad(folder / "query.h5ad")
    base = ad.AnnData(ref.X.copy(), var=pd.DataFrame(index=ref.var_names))
    SCBERT.setup_anndata(base)
    torch.manual_seed(0)
    g2v = np.random.default_rng(3).normal(size=(base.n_vars, SCBERT_TINY["dim"]))
    pretrained = SCBERT(base, gene2vec=g2v, **SCBERT_TINY).export_checkpoint(folder / "pre")
    # a fine-tuned checkpoint (a classifier head on the encoder; its training is not the point)
    SCBERT.setup_anndata(ref, labels_key="cell_type")
    torch.manual_seed(1)
    tuned = SCBERT.from_pretrained(pretrained, ref, head="classifier")
    return folder, pretrained, tuned.export_checkpoint(folder / "tuned")


def test_annotate_with_a_fine_tuned_model_equals_the_api(labelled, tmp_path):
    folder, _, tuned = labelled
    expected = ad.read_h5ad(folder / "query.h5ad")
    sft.tl.annotate(expected, tuned)
    out = tmp_path / "annotated.h5ad"
    assert _run("annotate", folder / "query.h5ad", "-o", out, "--model", tuned, "--backed") == 0
    result = ad.read_h5ad(out)
    np.testing.assert_array_equal(result.obs["scbert_label"], expected.obs["scbert_label"])
    np.testing.assert_allclose(result.obs["scbert_score"], expected.obs["scbert_score"], atol=1e-6)


def test_annotate_fine_tunes_on_a_reference(labelled, tmp_path):
    folder, pretrained, _ = labelled
    out = tmp_path / "annotated.h5ad"
    args = ["annotate", folder / "query.h5ad", "-o", out, "--model", pretrained]
    ref_args = ["--reference", folder / "ref.h5ad", "--label-key", "cell_type"]
    assert _run(*args, *ref_args, "--max-epochs", 1, "--device", "cpu") == 0
    result = ad.read_h5ad(out)
    classes = set(ad.read_h5ad(folder / "ref.h5ad").obs["cell_type"])
    assert set(result.obs["scbert_label"]) <= classes
    proba = result.obsm["scbert_proba"]
    np.testing.assert_allclose(proba.to_numpy().sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(result.obs["scbert_score"], proba.to_numpy().max(1), atol=1e-6)
    assert result.uns["scbert"]["params"]["fine_tuned"] == "reference"


def test_annotate_reference_without_label_key(labelled, tmp_path, capsys):
    folder, pretrained, _ = labelled
    args = ["annotate", folder / "query.h5ad", "-o", tmp_path / "o.h5ad", "--model", pretrained]
    assert _run(*args, "--reference", folder / "ref.h5ad") == 2
    assert "label_key" in capsys.readouterr().err


def test_annotate_default_with_majority_voting_equals_the_api(labelled, tmp_path):
    folder = labelled[0]
    reference = ad.read_h5ad(folder / "ref.h5ad")
    expected = ad.read_h5ad(folder / "query.h5ad")
    sft.tl.annotate(expected, reference=reference, label_key="cell_type", majority_voting=True)
    out = tmp_path / "annotated.h5ad"
    args = ["annotate", folder / "query.h5ad", "-o", out, "--reference", folder / "ref.h5ad"]
    assert _run(*args, "--label-key", "cell_type", "--majority-voting") == 0
    result = ad.read_h5ad(out)
    for column in ("annotate_label", "annotate_majority_voting", "annotate_over_clustering"):
        np.testing.assert_array_equal(result.obs[column], expected.obs[column])
    assert result.uns["annotate"]["params"]["method"] == "auto"


# pretrain ---------------------------------------------------------------------------------------
def test_pretrain_writes_a_loadable_model(cellbench_file, tmp_path, capsys):
    model_dir = tmp_path / "model"
    out = tmp_path / "embedded.h5ad"
    tiny = ["--d-model", 16, "--n-layers", 1, "--n-heads", 2, "--d-hid", 16, "--max-seq-len", 48]
    args = ["pretrain", cellbench_file, "--save-model", model_dir, "-o", out, "--max-epochs", 1]
    assert _run(*args, *tiny, "--batch-size", 32, "--device", "cpu") == 0
    module, vocab, model_args, _ = load_scgpt_checkpoint(model_dir)
    assert module.d_model == 16 and model_args["max_seq_len"] == 48
    source = ad.read_h5ad(cellbench_file)
    assert set(source.var_names) <= set(vocab)
    # the output holds the cells embedded with the saved model
    sft.tl.embed_cells(source, model_dir)
    result = ad.read_h5ad(out)
    np.testing.assert_allclose(result.obsm["X_scgpt"], source.obsm["X_scgpt"], atol=1e-5)
    assert not any(k.startswith("_scvi") for k in result.uns)
    # a second run does not replace the model without --overwrite
    assert _run(*args[:4], "--max-epochs", 1) == 2
    assert "not empty" in capsys.readouterr().err
    assert _run("pretrain", cellbench_file, "--save-model", tmp_path / "m2", "--model",
                "scgpt-default", "--d-model", 8) == 2  # fmt: skip
    assert "--d-model" in capsys.readouterr().err
