"""The simple predictors every model is held to: no change, the mean, the additive sum."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ._base import PerturbationPredictor

__all__ = ["AdditivePredictor", "ControlPredictor", "MeanPredictor"]

logger = logging.getLogger("scfm_tools")


class ControlPredictor(PerturbationPredictor):
    """No change: every perturbation is predicted as the control mean."""

    method = "control"

    def _predict_delta(self, parts: list[tuple[str, ...]]) -> np.ndarray:
        return np.zeros((len(parts), len(self.genes)))


class MeanPredictor(PerturbationPredictor):
    """Every perturbation gets the mean effect of the observed ones (singles and combinations)."""

    method = "mean"

    def _predict_delta(self, parts: list[tuple[str, ...]]) -> np.ndarray:
        data = self._fitted()
        shift = np.mean([data.delta(n) for n in data.perturbations], axis=0)
        return np.tile(shift, (len(parts), 1))


class AdditivePredictor(PerturbationPredictor):
    """Sum of the observed single-gene effects of a perturbation's genes.

    A gene never perturbed alone in the data (fallback, logged): the mean effect of the observed
    singles, with the gene itself (when it is a read-out gene) moved by the mean self-effect of
    the observed singles whose gene is read out.
    """

    method = "additive"

    def _predict_delta(self, parts: list[tuple[str, ...]]) -> np.ndarray:
        def fallback(genes: list[str]) -> np.ndarray:
            logger.warning(
                "additive: %d gene(s) never perturbed alone in the data (%s%s); each counts as "
                "the mean single-gene effect (with its own expression moved by the mean "
                "self-effect)",
                len(genes),
                ", ".join(genes[:5]),
                ", ..." if len(genes) > 5 else "",
            )
            return np.tile(self.mean_single_effect(), (len(genes), 1))

        return self.additive(parts, fallback)

    def params(self) -> dict[str, Any]:
        """Return what to record, with the singles observed."""
        return super().params() | {"n_singles_observed": len(self._fitted().singles)}
