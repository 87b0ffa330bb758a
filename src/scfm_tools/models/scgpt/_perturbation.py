"""scGPT perturbation fine-tuning (the official tutorial) as a perturbation predictor.

Every read-out gene is a token (the tutorial's ``include_zero_gene="all"``; a gene outside the
vocabulary gets the ``<pad>`` token, as the tutorial maps it), valued by a control cell's
log-normalised expression, and flagged when perturbed. Training pairs each perturbed cell with a
random control cell (as GEARS' data loader does) and regresses the perturbed cell's values at
every read-out gene (MSE on all positions, the tutorial's loss); Adam, learning rate decayed by
0.9 per epoch, gradients clipped at norm 1. Predictions average the model's output over control
cells. Unlike the tutorial, the new decoder starts by default as "no change"
(``start_from_control``).

One extension: the tutorial can only flag a gene that is read out (GEARS data keep the
perturbed genes among the measured ones). A perturbed gene that is not read out is appended as
an extra token (its vocabulary id, value 0, flagged); one outside the vocabulary too gets the
``<pad>`` token, so the model cannot tell such genes apart.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..._progress import progress_bar
from ...train import seeded_torch
from ..perturbation import PerturbationData, PerturbationPredictor
from ._perturbation_module import NOT_PERTURBED, PERTURBED, SCGPTPerturbationModule

if TYPE_CHECKING:
    from ._model import SCGPT

__all__ = ["SCGPTPerturbationPredictor"]

logger = logging.getLogger("scfm_tools")


class SCGPTPerturbationPredictor(PerturbationPredictor):
    """Fine-tunes a copy of a pretrained scGPT to predict perturbations from control cells.

    Parameters
    ----------
    model
        The pretrained :class:`~scfm_tools.models.SCGPT`; it is left as it is.
    max_epochs
        Passes over the training cells (15 in the tutorial).
    batch_size
        Cell pairs per step (64 in the tutorial).
    lr
        Adam learning rate (1e-4 in the tutorial).
    cells_per_perturbation
        Perturbed cells drawn per perturbation and epoch; ``None`` uses them all, as the
        tutorial does (a smaller number makes an epoch shorter on a CPU).
    control_cells
        Control cells each prediction is averaged over (GEARS' default 300, or all of them).
    start_from_control
        Start the new decoder as "no change" (it returns the control values until trained;
        ``AffineExprDecoder.start_as_identity``). ``False``
        initialises it randomly, as the tutorial does; with a CPU budget of a few dozen steps
        the random start had not converged in the benchmark (MAE of the predicted change 3-7
        times that of predicting no change), hence the default.
    random_state
        Seed of the pairing, the draws and the new layers' initialisation.
    device
        Torch device to train and predict on.
    """

    method = "finetune"

    def __init__(
        self,
        model: SCGPT,
        *,
        max_epochs: int = 15,
        batch_size: int = 64,
        lr: float = 1e-4,
        cells_per_perturbation: int | None = None,
        control_cells: int = 300,
        start_from_control: bool = True,
        random_state: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        for name, value in (
            ("max_epochs", max_epochs),
            ("batch_size", batch_size),
            ("control_cells", control_cells),
            (
                "cells_per_perturbation",
                1 if cells_per_perturbation is None else cells_per_perturbation,
            ),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        self.model = model
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.lr = lr
        self.cells_per_perturbation = cells_per_perturbation
        self.control_cells = control_cells
        self.start_from_control = start_from_control
        self.random_state = random_state
        self.device = torch.device(device)

    # which genes ------------------------------------------------------------------------------
    def _vocab_ids(self, genes: Sequence[str]) -> np.ndarray:
        """Vocabulary id of each gene (symbol or Ensembl ID), ``<pad>``'s where it has none."""
        from ...pp._match_genes import match_to_vocab

        match = match_to_vocab(list(genes), self.model.vocab)
        return np.where(match.matched, match.index, self.model.module.pad_token_id)

    def unpredictable(self, genes: Sequence[str], data: PerturbationData) -> list[str]:
        """Return the genes outside the vocabulary that are neither read out nor perturbed."""
        seen = {g for p in data.parts.values() for g in p} | set(map(str, data.genes))
        unseen = [g for g in genes if g not in seen]
        if not unseen:
            return []
        pad = self.model.module.pad_token_id
        return [g for g, i in zip(unseen, self._vocab_ids(unseen), strict=True) if i == pad]

    def _unpredictable_message(self, genes: list[str]) -> str:
        return (
            f"{len(genes)} perturbed gene(s) are not in the vocabulary of "
            f"{self.model.model_name}, not read out and never perturbed in the data: "
            f"{genes[:10]}; the fine-tuned scGPT has no token for them. Drop them, pass an scGPT "
            "whose vocabulary has them, or use method='mean' or 'additive'."
        )

    # inputs -----------------------------------------------------------------------------------
    def _tokens(self, parts: list[tuple[str, ...]]):
        """Token ids and flags ``(n, n_genes + extra)`` and padding of each perturbation."""
        n_genes = len(self.readout_ids_)
        extra = [[g for g in p if g not in self.position_] for p in parts]
        width = n_genes + max((len(e) for e in extra), default=0)
        ids = np.full((len(parts), width), self.model.module.pad_token_id, dtype=np.int64)
        ids[:, :n_genes] = self.readout_ids_
        flags = np.full((len(parts), width), NOT_PERTURBED, dtype=np.int64)
        padding = np.zeros((len(parts), width), dtype=bool)
        for row, (p, e) in enumerate(zip(parts, extra, strict=True)):
            flags[row, [self.position_[g] for g in p if g in self.position_]] = PERTURBED
            ids[row, n_genes : n_genes + len(e)] = self._extra_ids(e)
            flags[row, n_genes : n_genes + len(e)] = PERTURBED
            padding[row, n_genes + len(e) :] = True
        return ids, flags, padding

    def _extra_ids(self, genes: list[str]) -> np.ndarray:
        missing = [g for g in genes if g not in self.extra_ids_]
        if missing:
            self.extra_ids_.update(zip(missing, self._vocab_ids(missing), strict=True))
        return np.array([self.extra_ids_[g] for g in genes], dtype=np.int64)

    def _forward(self, control_values: np.ndarray, parts: list[tuple[str, ...]]) -> torch.Tensor:
        ids, flags, padding = self._tokens(parts)
        values = np.zeros(ids.shape, dtype=np.float32)
        values[:, : control_values.shape[1]] = control_values
        as_tensor = torch.as_tensor
        return self.module_(
            as_tensor(ids, device=self.device),
            as_tensor(values, device=self.device),
            as_tensor(flags, device=self.device),
            as_tensor(padding, device=self.device),
        )[:, : control_values.shape[1]]

    # fitting ----------------------------------------------------------------------------------
    def _fit(self, data: PerturbationData) -> None:
        genes = list(map(str, data.genes))
        self.readout_ids_ = self._vocab_ids(genes)
        self.position_ = {g: i for i, g in enumerate(genes)}
        self.extra_ids_: dict[str, int] = {}
        logger.info(
            "finetune: %d of %d read-out genes in the vocabulary of %s",
            int((self.readout_ids_ != self.model.module.pad_token_id).sum()),
            len(genes),
            self.model.model_name,
        )
        with seeded_torch(self.random_state):
            self.module_ = SCGPTPerturbationModule.from_pretrained(self.model.module).to(
                self.device
            )
            if self.start_from_control:
                self.module_.decoder.start_as_identity()
            self.history_ = self._train(data)

    def _epoch_cells(self, data: PerturbationData, rng: np.random.Generator) -> np.ndarray:
        rows = []
        for name in data.perturbations:
            cells = data.rows[name]
            k = self.cells_per_perturbation
            rows.append(
                cells if k is None or len(cells) <= k else rng.choice(cells, k, replace=False)
            )
        return rng.permutation(np.concatenate(rows))

    def _train(self, data: PerturbationData) -> list[float]:
        rng = np.random.default_rng(self.random_state)
        part_of = {r: data.parts[n] for n in data.perturbations for r in data.rows[n]}
        controls = data.rows[data.control]
        optimizer = torch.optim.Adam(self.module_.parameters(), lr=self.lr)
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.9)
        self.module_.train()
        history = []
        with progress_bar(self.max_epochs, desc="finetune: training", unit="epochs") as bar:
            for _ in range(self.max_epochs):
                cells, losses = self._epoch_cells(data, rng), []
                for start in range(0, len(cells), self.batch_size):
                    batch = cells[start : start + self.batch_size]
                    paired = rng.choice(controls, len(batch))
                    target = torch.as_tensor(data.X[batch].toarray(), device=self.device)
                    pred = self._forward(data.X[paired].toarray(), [part_of[r] for r in batch])
                    loss = torch.mean((pred - target) ** 2)
                    optimizer.zero_grad()
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(self.module_.parameters(), 1.0)
                    optimizer.step()
                    losses.append(loss.item())
                schedule.step()
                history.append(float(np.mean(losses)))
                bar.update(1)
        self.module_.eval()
        logger.info("finetune: %d epochs, final training loss %.4g", self.max_epochs, history[-1])
        return history

    # predicting -------------------------------------------------------------------------------
    @torch.inference_mode()
    def _predict_delta(self, parts: list[tuple[str, ...]]) -> np.ndarray:
        data = self._fitted()
        controls = data.rows[data.control]
        rng = np.random.default_rng(self.random_state)
        if len(controls) > self.control_cells:
            controls = np.sort(rng.choice(controls, self.control_cells, replace=False))
        out = np.zeros((len(parts), len(data.genes)))
        for start in range(0, len(controls), self.batch_size):
            values = data.X[controls[start : start + self.batch_size]].toarray()
            for i, p in enumerate(parts):
                pred = self._forward(values, [p] * len(values))
                out[i] += pred.double().sum(0).cpu().numpy()
        return out / len(controls) - data.control_mean

    def params(self) -> dict[str, Any]:
        """Return what to record, with the fine-tuning settings and the final loss."""
        return super().params() | {
            "max_epochs": self.max_epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "cells_per_perturbation": self.cells_per_perturbation,
            "control_cells": self.control_cells,
            "start_from_control": self.start_from_control,
            "final_train_loss": self.history_[-1],
        }
