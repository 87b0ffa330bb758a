"""Distributed training (2 DDP processes on CPU, gloo), atomic checkpoints and exact resuming."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from scipy import sparse

from _ddp_worker import TINY, tiny_cellbench
from scfm_tools.models import SCGPT
from scfm_tools.train import (
    AtomicModelCheckpoint,
    find_resume_checkpoint,
    is_complete_checkpoint,
    resolve_strategy,
)

DATA = "cellbench_3celllines_celseq2_dropseq.h5ad"
WORKER = Path(__file__).with_name("_ddp_worker.py")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cells(data_dir):
    return tiny_cellbench(str(data_dir / DATA))


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# --- two DDP processes ----------------------------------------------------------------------
@pytest.mark.slow
def test_two_ddp_processes_keep_identical_weights(data_dir, cells, tmp_path):
    files = []
    for i, rows in enumerate((slice(0, 20), slice(20, 51), slice(51, 64))):
        part = cells[rows].copy()
        part.X = sparse.csr_matrix(part.X)
        files.append(str(tmp_path / f"part{i}.h5ad"))
        part.write_h5ad(files[-1])
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, str(WORKER), str(data_dir / DATA), str(out), *files],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "distributed_backend=gloo" in done.stdout + done.stderr

    def load(name: str, rank: int) -> dict:
        return torch.load(out / f"{name}_{rank}.pt", weights_only=True)

    for name in ("start", "step1", "end", "files_end"):
        assert _max_diff(load(name, 0), load(name, 1)) == 0.0, name
    # the first optimizer step (gradients averaged over both processes) moved the weights
    assert _max_diff(load("start", 0), load("step1", 0)) > 1e-4
    assert _max_diff(load("end", 0), load("files_start", 0)) == 0.0
    assert _max_diff(load("files_start", 0), load("files_end", 0)) > 1e-4
    # each process trained on its own half of the cells, in both runs
    rows = [json.loads((out / f"cells_{r}.json").read_text()) for r in (0, 1)]
    assert len(rows[0]) == len(rows[1]) == 32 and sorted(rows[0] + rows[1]) == list(range(64))
    seen = [json.loads((out / f"files_cells_{r}.json").read_text()) for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 32 and sorted(seen[0] + seen[1]) == list(range(64))
    # rank 0 wrote the checkpoint, whole, and no partial file is left
    ckpt = out / "ckpt"
    assert [p.name for p in ckpt.glob("*.ckpt")] == ["epoch=0-step=2.ckpt"]
    assert is_complete_checkpoint(ckpt / "epoch=0-step=2.ckpt")
    assert not list(ckpt.glob("*.partial"))


def test_strategy_resolution():
    assert resolve_strategy("auto", "auto", 1) == "auto"
    assert resolve_strategy("auto", 2, 1) == "ddp_find_unused_parameters_true"
    assert resolve_strategy("auto", "0,1", 1) == "ddp_find_unused_parameters_true"
    assert resolve_strategy("auto", 1, 2) == "ddp_find_unused_parameters_true"
    assert resolve_strategy("ddp_spawn", 2, 1) == "ddp_spawn_find_unused_parameters_true"
    assert resolve_strategy("ddp_find_unused_parameters_false", 2, 1).endswith("_false")


# --- resuming -----------------------------------------------------------------------------
class _Crash(RuntimeError):
    pass


class _CrashAtEpoch(Callback):
    """Stop the job at the start of an epoch, as a killed job would (after its checkpoint)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            raise _Crash("simulated interruption")


def _fresh(cells) -> SCGPT:
    adata = cells.copy()
    SCGPT.setup_anndata(adata)
    torch.manual_seed(0)
    return SCGPT(adata, **TINY, dropout=0.1)


TRAIN = {
    "max_epochs": 2,
    "batch_size": 16,
    "accelerator": "cpu",
    "enable_progress_bar": False,
    "check_val_every_n_epoch": 1,
    "plan_kwargs": {"lr": 3e-3, "random_state": 5, "lr_schedule": "cosine"},
}


def test_resume_reaches_the_uninterrupted_weights(cells, tmp_path):
    whole = _fresh(cells)
    # resume=True with no checkpoint yet starts afresh: one command starts and resumes a job
    whole.train(checkpoint_dir=tmp_path / "a", resume=True, **TRAIN)

    broken = _fresh(cells)
    with pytest.raises(_Crash):
        broken.train(checkpoint_dir=tmp_path / "b", callbacks=[_CrashAtEpoch(1)], **TRAIN)
    assert [p.name for p in (tmp_path / "b").glob("*.ckpt")] == ["epoch=0-step=4.ckpt"]
    resumed = _fresh(cells)  # a new process would start from fresh weights
    resumed.train(checkpoint_dir=tmp_path / "b", resume=True, **TRAIN)

    a, b = whole.module.state_dict(), resumed.module.state_dict()
    assert _max_diff(a, _fresh(cells).module.state_dict()) > 1e-3  # it did train
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-7, msg=key)
    # the resumed epoch is the uninterrupted run's second epoch, validation included
    for key in ("train_loss", "validation_loss"):
        np.testing.assert_allclose(
            resumed.history[key].to_numpy(dtype=float).ravel(),
            whole.history[key].to_numpy(dtype=float).ravel()[1:],
            rtol=1e-6,
        )
    # the same held-out cells in both runs (the split is seeded too)
    np.testing.assert_array_equal(resumed.validation_indices, whole.validation_indices)


def test_cellplm_resume_reaches_the_uninterrupted_weights(cells, tmp_path):
    """CellPLM has its own sequence splitter and sampler: its resumed run is exact too."""
    from scfm_tools.models import CellPLM

    def fresh():
        adata = cells.copy()
        adata.obs["batch"] = adata.obs["batch"].astype(str)
        CellPLM.setup_anndata(adata, batch_key="batch")
        torch.manual_seed(0)
        small = {"enc_hid": 16, "enc_heads": 2, "post_latent_dim": 8, "num_clusters": 4}
        return CellPLM(adata, dec_hid=16, **small)

    train = {
        "max_epochs": 2,
        "accelerator": "cpu",
        "max_cells": 16,
        "random_state": 1,
        "enable_progress_bar": False,
        "plan_kwargs": {"lr": 1e-2},
    }
    whole = fresh()
    whole.train(checkpoint_dir=tmp_path / "a", **train)
    with pytest.raises(_Crash):
        fresh().train(checkpoint_dir=tmp_path / "b", callbacks=[_CrashAtEpoch(1)], **train)
    resumed = fresh()
    resumed.train(checkpoint_dir=tmp_path / "b", resume=True, **train)
    a, b = whole.module.state_dict(), resumed.module.state_dict()
    assert _max_diff(a, fresh().module.state_dict()) > 1e-3
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-7, msg=key)


def test_truncated_checkpoint_is_not_resumed(cells, tmp_path):
    model = _fresh(cells)
    folder = tmp_path / "ckpt"
    model.train(checkpoint_dir=folder, **{**TRAIN, "max_epochs": 1})
    good = folder / "epoch=0-step=4.ckpt"
    assert is_complete_checkpoint(good)
    # a newer, truncated checkpoint (a write cut short) and a leftover partial file
    data = good.read_bytes()
    truncated = folder / "epoch=1-step=8.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    (folder / "epoch=2-step=12.ckpt.partial").write_bytes(data)
    later = good.stat().st_mtime_ns + 10**9
    os.utime(truncated, ns=(later, later))
    assert not is_complete_checkpoint(truncated)
    assert find_resume_checkpoint(folder) == good
    with pytest.raises(ValueError, match="is not a complete checkpoint"):
        model.train(checkpoint_dir=folder, resume=truncated, **TRAIN)
    # resume=True goes on from the good one: one more epoch, to max_epochs=2
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    model.train(checkpoint_dir=folder, resume=True, **TRAIN)
    assert len(model.history["train_loss"]) == 2  # scvi-tools appends to the history
    assert _max_diff(before, model.module.state_dict()) > 0


class _Stub:
    """The part of a Lightning trainer a checkpoint write touches."""

    is_global_zero = True
    global_step = 3
    loggers = ()

    class strategy:
        @staticmethod
        def barrier(name=None):
            pass

    def __init__(self, fail: bool) -> None:
        self.fail = fail

    def save_checkpoint(self, path, weights_only=False):
        with open(path, "wb") as fh:
            fh.write(b"PK" + b"\0" * 100)
            if self.fail:
                raise OSError("disk full")


def test_interrupted_write_keeps_the_previous_checkpoint(tmp_path):
    callback = AtomicModelCheckpoint(dirpath=tmp_path)
    target = tmp_path / "epoch=0-step=3.ckpt"
    target.write_bytes(b"previous")
    with pytest.raises(OSError, match="disk full"):
        callback._save_checkpoint(_Stub(fail=True), str(target))
    assert target.read_bytes() == b"previous"
    assert (tmp_path / "epoch=0-step=3.ckpt.partial").exists()
    assert find_resume_checkpoint(tmp_path) is None  # neither file is a whole checkpoint
    callback._save_checkpoint(_Stub(fail=False), str(target))
    assert target.read_bytes().startswith(b"PK") and not list(tmp_path.glob("*.partial"))


def test_bad_resume_arguments(cells, tmp_path):
    model = _fresh(cells)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    with pytest.raises(ValueError, match="resume=True looks for the latest checkpoint"):
        model.train(resume=True, **TRAIN)
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        model.train(resume=tmp_path / "absent.ckpt", **TRAIN)
    with pytest.raises(ValueError, match="not ckpt_path"):
        model.train(ckpt_path=str(tmp_path / "x.ckpt"), **TRAIN)
    with pytest.raises(ValueError, match="checkpoint_kwargs needs checkpoint_dir"):
        model.train(checkpoint_kwargs={"every_n_epochs": 2}, **TRAIN)
    with pytest.raises(ValueError, match="num_nodes must be a positive integer"):
        model.train(num_nodes=0, **TRAIN)
    assert _max_diff(before, model.module.state_dict()) == 0.0 and not model.is_trained_
