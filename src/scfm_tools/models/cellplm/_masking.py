"""CellPLM's pretraining corruption of a sequence: dropped cells, masked cells and features.

As the official ``MaskBuilder.apply_mask`` (with ``drop_nodes``): first a fraction
``drop_node_rate`` of the sequence's cells is dropped (at most ``max_cells`` kept); then a
fraction ``mask_node_rate`` of the remaining cells is chosen, and in each chosen cell every
count is masked (set to 0 in the input) with probability ``mask_feature_rate``, or, with
``mask_beta``, with a per-cell probability drawn from ``Beta(5, 4 / mask_feature_rate - 3)``
(mean near ``mask_feature_rate``; capped at 0.9). The model sees the masked counts and is asked
to reconstruct the unmasked ones.

Fine-tuning for annotation corrupts its training sequences the same way (the official
``CellTypeAnnotationPipeline`` keeps the pretraining ``MaskBuilder``), but needs only the masked
input: :func:`mask_input` masks the stored counts of a sparse sequence and keeps it sparse (a
masked zero is still zero), with the same draws of dropped cells, masked cells and ratios.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["mask_input", "mask_sequence"]

_BETA_ALPHA = 5.0
_MAX_RATIO = 0.9


def _check_rates(mask_node_rate: float, mask_feature_rate: float, drop_node_rate: float) -> None:
    for name, rate in (("mask_node_rate", mask_node_rate), ("drop_node_rate", drop_node_rate)):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"{name} must lie in [0, 1), got {rate!r}.")
    if not 0.0 < mask_feature_rate <= 1.0:
        raise ValueError(f"mask_feature_rate must lie in (0, 1], got {mask_feature_rate!r}.")


def _kept_cells(
    n: int, drop_node_rate: float, max_cells: int | None, rng: np.random.Generator
) -> np.ndarray:
    """Sorted rows of the cells left after dropping ``drop_node_rate`` (at most max_cells)."""
    if drop_node_rate > 0 or (max_cells is not None and n > max_cells):
        n_keep = max(1, int(n * (1.0 - drop_node_rate)))
        if max_cells is not None:
            n_keep = min(n_keep, int(max_cells))
        return np.sort(rng.permutation(n)[:n_keep])
    return np.arange(n)


def _masked_cells(
    n: int,
    mask_node_rate: float,
    mask_feature_rate: float,
    mask_beta: bool,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the masked cells and each one's masking probability."""
    n_masked = int(mask_node_rate * n)
    if not n_masked:
        return np.empty(0, np.int64), np.empty(0)
    cells = rng.permutation(n)[:n_masked]
    if mask_beta:
        beta = 4.0 / mask_feature_rate + 2.0 - _BETA_ALPHA
        ratio = np.minimum(rng.beta(_BETA_ALPHA, beta, size=n_masked), _MAX_RATIO)
    else:
        ratio = np.full(n_masked, mask_feature_rate)
    return cells, ratio


def _subset(extra: dict[str, Tensor] | None, keep: np.ndarray) -> dict[str, Tensor]:
    index = torch.from_numpy(keep)
    return {key: value[index.to(value.device)] for key, value in (extra or {}).items()}


def mask_sequence(
    x: Tensor,
    *,
    mask_node_rate: float,
    mask_feature_rate: float,
    drop_node_rate: float = 0.0,
    max_cells: int | None = None,
    mask_beta: bool = True,
    rng: np.random.Generator,
    extra: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Corrupt one sequence of cells for pretraining.

    Parameters
    ----------
    x
        Counts ``(n_cells, n_genes)``, dense or torch sparse.
    mask_node_rate
        Fraction of cells whose counts are masked (official ``mask_node_rate``, 0.75).
    mask_feature_rate
        Fraction of a masked cell's counts that are masked (``mask_feature_rate``, 0.25).
    drop_node_rate
        Fraction of cells dropped from the sequence first (``drop_node_rate``, 0.3).
    max_cells
        Most cells kept after dropping (``max_batch_size``); ``None``: no cap.
    mask_beta
        Draw each masked cell's masking probability from a Beta distribution (``mask_beta``).
    rng
        Source of all random choices.
    extra
        Per-cell tensors (first axis = cells, e.g. ``batch``) to subset with the kept cells.

    Returns
    -------
    ``X`` (masked counts, dense float32), ``X_target`` (unmasked counts of the kept cells),
    ``input_mask`` (float, 1 where a count was masked) and the subset ``extra`` tensors.
    """
    _check_rates(mask_node_rate, mask_feature_rate, drop_node_rate)
    dense = (x.to_dense() if x.layout != torch.strided else x).float()
    keep = _kept_cells(dense.shape[0], drop_node_rate, max_cells, rng)
    target = dense[torch.from_numpy(keep)]
    mask = torch.zeros_like(target)
    cells, ratio = _masked_cells(target.shape[0], mask_node_rate, mask_feature_rate, mask_beta, rng)
    if cells.size:
        draws = rng.random((cells.size, target.shape[1]), dtype=np.float32)
        mask[torch.from_numpy(cells)] = torch.from_numpy(
            draws <= ratio[:, None].astype(np.float32)
        ).float()
    out = {"X": target * (1.0 - mask), "X_target": target, "input_mask": mask}
    return {**out, **_subset(extra, keep)}


def mask_input(
    x: Tensor,
    *,
    mask_node_rate: float,
    mask_feature_rate: float,
    drop_node_rate: float = 0.0,
    max_cells: int | None = None,
    mask_beta: bool = True,
    rng: np.random.Generator,
    extra: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Corrupt the input of one sparse sequence, as :func:`mask_sequence`, keeping it sparse.

    The same cells are dropped and masked (and with the same ratios) as by
    :func:`mask_sequence` from the same ``rng``; each stored count of a masked cell is then set
    to zero with the cell's probability (one draw per stored count, not per gene, so the masks
    themselves differ). No reconstruction target is returned: this is the input corruption of
    fine-tuning.

    Parameters
    ----------
    x
        Counts ``(n_cells, n_genes)``, a torch sparse COO tensor (on the CPU).
    mask_node_rate, mask_feature_rate, drop_node_rate, max_cells, mask_beta, rng, extra
        As in :func:`mask_sequence`.

    Returns
    -------
    ``X`` (the masked counts of the kept cells, sparse COO) and the subset ``extra`` tensors.
    """
    _check_rates(mask_node_rate, mask_feature_rate, drop_node_rate)
    x = x.coalesce()
    n = x.shape[0]
    keep = _kept_cells(n, drop_node_rate, max_cells, rng)
    cells, ratio = _masked_cells(keep.size, mask_node_rate, mask_feature_rate, mask_beta, rng)
    # new row of each old one (-1: dropped); renumbering kept rows in order keeps the
    # coalesced (row-major) order, so no re-sorting is needed
    new_row = np.full(n, -1, dtype=np.int64)
    new_row[keep] = np.arange(keep.size)
    index = x.indices().numpy()
    stored = np.flatnonzero(new_row[index[0]] >= 0)
    rows = new_row[index[0, stored]]
    cell_ratio = np.zeros(keep.size, dtype=np.float32)
    cell_ratio[cells] = ratio
    draws = rng.random(rows.size, dtype=np.float32)
    masked = (draws <= cell_ratio[rows]) & (cell_ratio[rows] > 0)
    values = x.values()[torch.from_numpy(stored)]
    values = torch.where(torch.from_numpy(masked), values.new_zeros(()), values)
    indices = torch.from_numpy(np.vstack([rows, index[1, stored]]))
    out = torch.sparse_coo_tensor(
        indices, values, (keep.size, x.shape[1]), is_coalesced=True, check_invariants=False
    )
    return {"X": out, **_subset(extra, keep)}
