"""CellPLM's pretraining corruption of a sequence: dropped cells, masked cells and features.

As the official ``MaskBuilder.apply_mask`` (with ``drop_nodes``): first a fraction
``drop_node_rate`` of the sequence's cells is dropped (at most ``max_cells`` kept); then a
fraction ``mask_node_rate`` of the remaining cells is chosen, and in each chosen cell every
count is masked (set to 0 in the input) with probability ``mask_feature_rate``, or, with
``mask_beta``, with a per-cell probability drawn from ``Beta(5, 4 / mask_feature_rate - 3)``
(mean near ``mask_feature_rate``; capped at 0.9). The model sees the masked counts and is asked
to reconstruct the unmasked ones.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["mask_sequence"]

_BETA_ALPHA = 5.0
_MAX_RATIO = 0.9


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
    for name, rate in (("mask_node_rate", mask_node_rate), ("drop_node_rate", drop_node_rate)):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"{name} must lie in [0, 1), got {rate!r}.")
    if not 0.0 < mask_feature_rate <= 1.0:
        raise ValueError(f"mask_feature_rate must lie in (0, 1], got {mask_feature_rate!r}.")
    dense = (x.to_dense() if x.layout != torch.strided else x).float()
    n = dense.shape[0]
    keep = np.arange(n)
    if drop_node_rate > 0 or (max_cells is not None and n > max_cells):
        n_keep = max(1, int(n * (1.0 - drop_node_rate)))
        if max_cells is not None:
            n_keep = min(n_keep, int(max_cells))
        keep = np.sort(rng.permutation(n)[:n_keep])
    target = dense[torch.from_numpy(keep)]
    n = target.shape[0]
    mask = torch.zeros_like(target)
    n_masked = int(mask_node_rate * n)
    if n_masked:
        cells = rng.permutation(n)[:n_masked]
        if mask_beta:
            beta = 4.0 / mask_feature_rate + 2.0 - _BETA_ALPHA
            ratio = np.minimum(rng.beta(_BETA_ALPHA, beta, size=n_masked), _MAX_RATIO)
        else:
            ratio = np.full(n_masked, mask_feature_rate)
        draws = rng.random((n_masked, target.shape[1]), dtype=np.float32)
        mask[torch.from_numpy(cells)] = torch.from_numpy(
            draws <= ratio[:, None].astype(np.float32)
        ).float()
    out = {"X": target * (1.0 - mask), "X_target": target, "input_mask": mask}
    index = torch.from_numpy(keep)
    for key, value in (extra or {}).items():
        out[key] = value[index.to(value.device)]
    return out
