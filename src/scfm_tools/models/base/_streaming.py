"""The one loop that streams cells through a model, shared by every family.

Cells come in row blocks (``chunk_size`` at a time from an in-memory or backed AnnData, so
memory is set by the block, not by the number of cells). Each family splits a block into
minibatches its own way (scGPT and scFoundation sort cells by length so that a minibatch carries
little padding; scBERT reads every cell at the same length; CellPLM reads the cells of a sample
as one sequence). The loop keeps the module on the device in eval mode, shows progress, runs
each minibatch under :func:`torch.inference_mode` (bf16 autocast on CUDA), and puts each
block's results back in row order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import numpy as np
import torch

from ..._progress import progress_bar
from ..._settings import settings

__all__ = [
    "Minibatch",
    "Split",
    "as_device",
    "autocast",
    "gather_blocks",
    "iter_minibatches",
    "run_minibatches",
]


class Minibatch(NamedTuple):
    """Some cells of one block, ready for one forward pass."""

    block: int
    """Index of the block the cells come from (blocks in the order given)."""
    n_block: int
    """Number of cells in that block."""
    rows: np.ndarray
    """Positions of the minibatch's cells within their block."""
    inputs: Any
    """The family's model inputs, on the run's device (``None`` for an empty block)."""


#: ``split(block, device) -> (cells in the block, iterable of (rows, inputs on device))``.
Split = Callable[[Any, torch.device], tuple[int, Iterable[tuple[np.ndarray, Any]]]]


def as_device(device: str | torch.device | None) -> torch.device:
    """Return ``device`` as a torch device (``None`` or ``"auto"``: ``sft.settings.device``)."""
    if device is None or isinstance(device, str):
        return settings.resolve_device(device)
    return torch.device(device)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Return bf16 autocast on CUDA, and on CPU when ``sft.settings.cpu_bf16``; else nothing.

    On a CPU it trades exactness for speed, so only when asked for.
    """
    if device.type == "cuda" or (device.type == "cpu" and settings.cpu_bf16):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def iter_minibatches(
    module: torch.nn.Module,
    blocks: Iterable[Any],
    split: Split,
    *,
    device: str | torch.device = "cpu",
    n_cells: int | None = None,
    desc: str = "cells",
) -> Iterator[Minibatch]:
    """Split consecutive blocks of cells into minibatches on the device.

    While the iterator runs, ``module`` is on ``device`` in eval mode; its training flag is
    restored when the iterator ends or is closed.

    Parameters
    ----------
    module
        The model's module.
    blocks
        Consecutive blocks of cells, in the family's block format (e.g. a row slice of the
        counts).
    split
        The family's minibatching: ``split(block, device)`` returns the number of cells of the
        block and its minibatches, each ``(rows within the block, inputs on device)``, every
        cell in exactly one.
    device
        Where to run (``"auto"`` picks a GPU when there is one).
    n_cells
        Cells in all blocks, when known: the progress bar's total.
    desc
        The progress bar's label.

    Yields
    ------
    :class:`Minibatch` es, block after block; an empty block gives one with no rows.
    """
    dev = as_device(device)
    was_training = module.training
    module.to(dev).eval()
    try:
        with progress_bar(n_cells, desc=desc) as bar:
            for number, block in enumerate(blocks):
                n_block, parts = split(block, dev)
                # Neither the block nor (after its minibatches) what was made of it is held
                # while the next block is read: with deep cells each is hundreds of MB.
                del block
                if n_block == 0:
                    yield Minibatch(number, 0, np.empty(0, dtype=np.int64), None)
                    continue
                for rows, inputs in parts:
                    yield Minibatch(number, n_block, rows, inputs)
                    bar.update(len(rows))
                del parts
    finally:
        module.train(was_training)


def run_minibatches(
    minibatches: Iterable[Minibatch],
    forward: Callable[[Any], torch.Tensor],
    *,
    device: str | torch.device = "cpu",
    mixed_precision: bool = True,
) -> Iterator[tuple[Minibatch, torch.Tensor | None]]:
    """Run ``forward`` on each minibatch under inference mode (and bf16 autocast on CUDA).

    Parameters
    ----------
    minibatches
        From :func:`iter_minibatches`.
    forward
        The family's forward pass on a minibatch's inputs.
    device
        The run's device (for autocast).
    mixed_precision
        Allow bf16 autocast on CUDA (families with sparse inputs turn it off).

    Yields
    ------
    ``(minibatch, output)``; the output is ``None`` for an empty block.
    """
    dev = as_device(device)
    for batch in minibatches:
        if batch.inputs is None:
            yield batch, None
            continue
        cast = autocast(dev) if mixed_precision else contextlib.nullcontext()
        with torch.inference_mode(), cast:
            output = forward(batch.inputs)
        yield batch, output


def gather_blocks(
    results: Iterable[tuple[Minibatch, torch.Tensor | None]], width: tuple[int, ...]
) -> Iterator[np.ndarray]:
    """Put each block's outputs back in row order; yields one float32 array per block.

    Parameters
    ----------
    results
        From :func:`run_minibatches`.
    width
        Shape of one cell's output.

    Yields
    ------
    ``(n_block, *width)`` float32 arrays, in block order.
    """
    out: np.ndarray | None = None
    current = -1
    for batch, output in results:
        if batch.block != current:
            if out is not None:
                yield out
            out = np.empty((batch.n_block, *width), dtype=np.float32)
            current = batch.block
        if output is not None:
            out[batch.rows] = output.float().cpu().numpy()
    if out is not None:
        yield out
