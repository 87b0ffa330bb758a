"""Run by tests/test_ddp.py in a subprocess: a tiny scGPT trained by 2 DDP processes on CPU.

Lightning's ``"ddp"`` strategy starts the second process by running this script again, so the
whole run lives in a script rather than inside pytest. Each process writes, under ``out``:
``start_<rank>.pt`` / ``step1_<rank>.pt`` / ``end_<rank>.pt`` (the module's weights before
training, after the first optimizer step, at the end), ``cells_<rank>.json`` (the AnnData rows
its sampler gave it) and, for the multi-file run, ``files_<rank>.json`` (the cell ids its
data module gave it).

Usage: ``python _ddp_worker.py DATA.h5ad OUT_DIR [FILE.h5ad ...]``.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from scfm_tools.dataloaders import CELL_ID, MultiFileDataModule
from scfm_tools.models import SCGPT

TINY = {"d_model": 32, "n_heads": 2, "d_hid": 32, "n_layers": 2, "max_seq_len": 64}


def tiny_cellbench(path: str, n_cells: int = 64, n_genes: int = 300) -> ad.AnnData:
    """Real cells: a fixed random subset, the most often detected genes, float counts."""
    adata = ad.read_h5ad(path)
    adata = adata[np.sort(np.random.default_rng(0).choice(adata.n_obs, n_cells, replace=False))]
    detected = np.asarray((adata.X > 0).sum(0)).ravel()
    adata = adata[:, np.sort(np.argsort(-detected, kind="stable")[:n_genes])].copy()
    adata.X = adata.X.astype(np.float32)
    return adata


class Snapshot(Callback):
    """Save each process's weights and the data it was given."""

    def __init__(self, out: Path, tag: str = "") -> None:
        self.out, self.tag, self.seen = out, tag, []

    def _save(self, name: str, trainer, pl_module) -> None:
        state = {k: v.detach().cpu().clone() for k, v in pl_module.module.state_dict().items()}
        torch.save(state, self.out / f"{self.tag}{name}_{trainer.global_rank}.pt")

    def on_train_start(self, trainer, pl_module) -> None:
        self._save("start", trainer, pl_module)
        loader = trainer.train_dataloader
        if not self.tag:
            # the rows scvi-tools' distributed sampler gives this process this epoch
            rows = [int(i) for batch in loader.sampler for i in batch]
            (self.out / f"cells_{trainer.global_rank}.json").write_text(json.dumps(rows))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if CELL_ID in batch:
            self.seen.extend(batch[CELL_ID].tolist())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 0:
            self._save("step1", trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._save("end", trainer, pl_module)
        if self.tag:
            (self.out / f"{self.tag}cells_{trainer.global_rank}.json").write_text(
                json.dumps(self.seen)
            )


def main(data: str, out: str, files: list[str]) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    out_dir = Path(out)
    adata = tiny_cellbench(data)
    SCGPT.setup_anndata(adata)
    torch.manual_seed(0)
    model = SCGPT(adata, **TINY)
    common = {
        "accelerator": "cpu",
        "devices": 2,
        "strategy": "ddp",
        "enable_progress_bar": False,
        "plan_kwargs": {"lr": 1e-3, "random_state": 3},
    }
    model.train(
        max_epochs=1,
        batch_size=16,
        train_size=1.0,
        checkpoint_dir=out_dir / "ckpt",
        callbacks=[Snapshot(out_dir)],
        **common,
    )
    if files:
        datamodule = MultiFileDataModule(files, batch_size=8, block_size=16, random_state=3)
        model.train(
            max_epochs=1, datamodule=datamodule, callbacks=[Snapshot(out_dir, "files_")], **common
        )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
