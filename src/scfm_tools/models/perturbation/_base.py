"""What every perturbation predictor shares: fit on observed perturbations, predict named ones.

A predictor learns from a :class:`~scfm_tools.models.perturbation.PerturbationData` and predicts
the mean log-normalised expression (``log1p`` of counts per 10,000) of each requested
perturbation over the same genes. Most methods build a combination from its genes' effects;
those shared steps live here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from ..._errors import InputError
from ._data import PerturbationData, split_perturbation

__all__ = ["PerturbationPredictor"]

logger = logging.getLogger("scfm_tools")


class PerturbationPredictor:
    """Base class: ``fit(data)`` once, then ``predict(names)`` as often as wanted.

    Subclasses set :attr:`method` and implement :meth:`_fit` and :meth:`_predict_delta`; those
    that cannot predict some genes override :meth:`unpredictable`.
    """

    method: ClassVar[str] = ""

    def __init__(self) -> None:
        self.data: PerturbationData | None = None

    # fitting -----------------------------------------------------------------------------------
    def fit(self, data: PerturbationData) -> PerturbationPredictor:
        """Learn from the observed perturbations (and the control) of ``data``; returns self."""
        if not data.perturbations:
            raise InputError(
                "no perturbed cells to learn from: every cell is the control. Pass an AnnData "
                "with cells of at least one perturbation."
            )
        self.data = data
        self._fit(data)
        return self

    def _fit(self, data: PerturbationData) -> None:
        """Method-specific fitting (nothing for the baselines that only read means)."""

    @property
    def genes(self) -> np.ndarray:
        """The read-out genes, in the order of the predictions' columns."""
        return self._fitted().genes

    def _fitted(self) -> PerturbationData:
        if self.data is None:
            raise RuntimeError(f"this {type(self).__name__} is not fitted; call fit() first.")
        return self.data

    # predicting --------------------------------------------------------------------------------
    def unpredictable(self, genes: Sequence[str], data: PerturbationData) -> list[str]:
        """Return the genes among ``genes`` whose perturbation this method cannot predict.

        ``data`` is what the predictor learns (or learnt) from, so that the check can run
        before a costly fit.
        """
        return []

    def check_predictable(self, perturbations: Sequence[str], data: PerturbationData) -> None:
        """Refuse, with what to do, perturbations this method cannot predict from ``data``."""
        genes = sorted({g for p in perturbations for g in split_perturbation(p, data.sep)})
        missing = self.unpredictable(genes, data)
        if missing:
            raise InputError(self._unpredictable_message(missing))

    def predict(self, perturbations: Sequence[str]) -> np.ndarray:
        """Predict the mean ``log1p`` expression per 10,000 counts of each perturbation.

        Parameters
        ----------
        perturbations
            Names: a gene (``"KLF1"``) or a combination (``"KLF1+MAP2K6"``).

        Returns
        -------
        ``(n_perturbations, n_genes)`` float64 array, non-negative.
        """
        data = self._fitted()
        self.check_predictable(perturbations, data)
        parts = [split_perturbation(p, data.sep) for p in perturbations]
        if not parts:
            return np.zeros((0, len(data.genes)))
        delta = self._predict_delta(parts)
        return np.clip(data.control_mean + delta, 0.0, None)

    def _unpredictable_message(self, genes: list[str]) -> str:
        return f"method {self.method!r} cannot predict a perturbation of {genes}."

    def _predict_delta(self, parts: list[tuple[str, ...]]) -> np.ndarray:
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        """Return what to record about the fitted predictor in ``uns[key]["params"]``."""
        data = self._fitted()
        return {
            "method": self.method,
            "n_perturbations_trained": len(data.perturbations),
            "n_control_cells": len(data.rows[data.control]),
        }

    # shared steps ------------------------------------------------------------------------------
    def mean_single_effect(self) -> np.ndarray:
        """Mean effect of the observed single-gene perturbations (all of them if none is single)."""
        data = self._fitted()
        names = list(data.singles.values()) or data.perturbations
        return np.mean([data.delta(n) for n in names], axis=0)

    def self_effect(self) -> float | None:
        """Mean change of a perturbed gene in its own perturbation, over observed singles.

        Read only where the gene is also a read-out gene; ``None`` when no observed single is.
        """
        data = self._fitted()
        position = {g: i for i, g in enumerate(data.genes)}
        own = [data.delta(n)[position[g]] for g, n in data.singles.items() if g in position]
        return float(np.mean(own)) if own else None

    def with_self_effect(self, effect: np.ndarray, gene: str) -> np.ndarray:
        """``effect`` of an unobserved gene, with that gene itself moved by :meth:`self_effect`."""
        data = self._fitted()
        position = np.flatnonzero(data.genes == gene)
        own = self.self_effect()
        if position.size and own is not None:
            effect = effect.copy()
            effect[position] = own
        return effect

    def additive(self, parts: list[tuple[str, ...]], unseen_effect) -> np.ndarray:
        """Each combination as the sum of its genes' effects.

        A gene observed alone contributes its observed effect; another ``unseen_effect(genes)``
        (one row per gene), with the gene itself moved by :meth:`self_effect`.
        """
        data = self._fitted()
        singles = data.singles
        unseen = sorted({g for p in parts for g in p if g not in singles})
        rows = dict(zip(unseen, unseen_effect(unseen), strict=True)) if unseen else {}
        effect = {g: self.with_self_effect(rows[g], g) for g in unseen}
        effect |= {g: data.delta(n) for g, n in singles.items()}
        return np.stack([np.sum([effect[g] for g in p], axis=0) for p in parts])
