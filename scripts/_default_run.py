"""The command line shared by the scripts that train a shipped default and score it.

Each script gives its docstring, output folder, training settings, ``train`` and ``write_card``;
this parses ``--out``, ``--exclude``, ``--threads`` and ``--max-epochs``, trains on the shared
pretraining files, scores the trained and the untrained weights with 5-NN against PCA, and
writes the card.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

from _knn_eval import knn5_vs_pca
from _shared_data import PRETRAINING_FILES

logger = logging.getLogger(__name__)


def run_record(training: dict, seconds: float, cpu_seconds: float, history: dict) -> dict:
    """Return what a card records about a training run: cells read, times, threads, versions.

    Parameters
    ----------
    training
        The script's training settings (``max_epochs``, ``batches_per_epoch``, ``batch_size``).
    seconds
        Wall time of the training.
    cpu_seconds
        CPU time of the training.
    history
        Per-epoch losses; ``train_loss`` is recorded.
    """
    import scvi
    import torch

    return {
        "cells_read": training["max_epochs"]
        * training["batches_per_epoch"]
        * training["batch_size"],
        "seconds": round(seconds),
        "cpu_seconds": round(cpu_seconds),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "scvi_tools": scvi.__version__,
        "train_loss_per_epoch": history["train_loss"],
    }


def run_default_training(
    doc: str,
    out_dir: Path,
    training: dict,
    train: Callable[[tuple[str, ...], Path, Path], dict],
    write_card: Callable[[Path, tuple[str, ...], dict, dict, dict], None],
) -> None:
    """Parse the command line, train, score and write the card.

    Parameters
    ----------
    doc
        The script's docstring (its first line describes the command).
    out_dir
        Default folder to write the weights and the card into.
    training
        The script's training settings; ``max_epochs`` is set from the command line.
    train
        ``train(files, out, initial)``: trains on ``files``, writes the weights into ``out``
        and the untrained ones into ``initial``, returns what to record about the run.
    write_card
        ``write_card(out, files, run, evaluation, untrained)``.
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", type=Path, default=out_dir, help="folder to write into")
    parser.add_argument("--exclude", nargs="*", default=[], help="training files to leave out")
    # One thread: with other processes on the two cores, two OpenMP threads ran much slower.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--max-epochs", type=int, default=training["max_epochs"])
    opts = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    unknown = set(opts.exclude) - set(PRETRAINING_FILES)
    if unknown:
        parser.error(f"--exclude names files that are not trained on: {sorted(unknown)}")
    training["max_epochs"] = opts.max_epochs
    import torch

    torch.set_num_threads(opts.threads)
    files = tuple(f for f in PRETRAINING_FILES if f not in opts.exclude)
    with tempfile.TemporaryDirectory() as scratch:
        run = train(files, opts.out, Path(scratch))
        evaluation = knn5_vs_pca(str(opts.out))
        untrained = knn5_vs_pca(scratch)
    logger.info("evaluation: %s", json.dumps({"trained": evaluation, "untrained": untrained}))
    write_card(opts.out, files, run, evaluation, untrained)
