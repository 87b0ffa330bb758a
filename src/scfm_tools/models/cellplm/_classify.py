"""Cell-type probabilities from a fine-tuned CellPLM, sequence by sequence."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from ._embed import SequenceInputs, run_sequences

if TYPE_CHECKING:
    from ...pp._match_genes import GeneMatch
    from ._module import CellPLMModule

__all__ = ["class_probabilities"]


def class_probabilities(
    module: CellPLMModule,
    X,
    sequences: list[np.ndarray],
    match: GeneMatch,
    *,
    device: torch.device,
) -> np.ndarray:
    """Softmax of the annotation head for every cell, each sequence in one pass (eval mode).

    Parameters
    ----------
    module
        A CellPLM module with an annotation head.
    X
        Cells x genes raw counts.
    sequences
        Row indices of each sequence (the cells that attend to each other).
    match
        The data's genes matched to the model's.
    device
        Where to run.

    Returns
    -------
    ``(n_cells, n_classes)`` float32 probabilities, in the order of ``X``.
    """

    def forward(inputs: SequenceInputs) -> torch.Tensor:
        z = module.inference(inputs.counts)["z"]
        return torch.softmax(module.generative(z)["logits"].float(), dim=-1)

    return run_sequences(
        module, X, sequences, match, forward, module.config["n_classes"], device=device
    )
