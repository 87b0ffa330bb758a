"""The linear model of Ahlmann-Eltze, Huber & Anders (Nat Methods 2025) on gene embeddings.

``Y ~ G W P^T + b``: ``Y`` holds the observed single-gene effects (read-out genes x
perturbations), ``b`` their mean over perturbations, ``G`` the read-out genes' top principal
components of ``Y - b`` and ``P`` the perturbed genes' embeddings from a foundation model;
``W`` is the ridge solution ``(G^T G + lambda I)^-1 G^T (Y - b) P (P^T P + lambda I)^-1``. An
unseen gene ``g`` is predicted as ``G W p_g + b``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..._errors import InputError
from ._data import PerturbationData
from ._embedded import EmbeddingPredictor, GeneEmbedder

__all__ = ["LinearPredictor"]

logger = logging.getLogger("scfm_tools")


class LinearPredictor(EmbeddingPredictor):
    """Ahlmann-Eltze et al.'s linear model with foundation-model gene embeddings as ``P``.

    A gene perturbed alone in the data contributes its observed effect; another gets the
    model's prediction, with the gene itself (when read out) moved by the mean self-effect of the
    observed singles. A combination is the sum of its genes' effects (as the additive baseline,
    with predicted effects for unseen genes).

    Parameters
    ----------
    embed
        Gives the perturbed genes' embeddings (NaN rows for genes without one).
    n_components
        Principal components of the training effects used as ``G`` (10 in the paper; fewer
        when there are fewer training perturbations).
    ridge
        ``lambda`` of both ridge penalties (0.1 in the paper).
    embedding_source
        What made the embeddings, for the record.
    """

    method = "linear"

    def __init__(
        self,
        embed: GeneEmbedder,
        *,
        n_components: int = 10,
        ridge: float = 0.1,
        embedding_source: str = "the model",
    ) -> None:
        super().__init__(embed, embedding_source=embedding_source)
        if isinstance(n_components, bool) or not isinstance(n_components, int) or n_components < 1:
            raise ValueError(f"n_components must be a positive integer, got {n_components!r}.")
        if not ridge > 0:
            raise ValueError(f"ridge must be positive, got {ridge!r}.")
        self.n_components = n_components
        self.ridge = float(ridge)

    def _fit(self, data: PerturbationData) -> None:
        genes = sorted(data.singles)
        known = [g for g, ok in zip(genes, self.has_embedding(genes), strict=True) if ok]
        if len(known) < 2:
            raise InputError(
                f"method 'linear' learns from single-gene perturbations of genes that "
                f"{self.embedding_source} embeds; {len(known)} of the {len(genes)} observed "
                "singles are (at least 2 are needed). Pass a model whose vocabulary covers the "
                "perturbed genes, or use method='mean' or 'additive'."
            )
        if len(known) < len(genes):
            logger.info(
                "linear: %d observed single(s) without an embedding are left out of the fit: %s",
                len(genes) - len(known),
                sorted(set(genes) - set(known)),
            )
        Y = np.stack([data.delta(data.singles[g]) for g in known], axis=1)
        self.offset_ = Y.mean(axis=1)
        centred = Y - self.offset_[:, None]
        k = min(self.n_components, len(known) - 1)
        G = np.linalg.svd(centred, full_matrices=False)[0][:, :k]
        P = self.embeddings(known)
        lam = self.ridge
        left = np.linalg.solve(G.T @ G + lam * np.eye(k), G.T @ centred @ P)
        self.W_ = np.linalg.solve((P.T @ P + lam * np.eye(P.shape[1])).T, left.T).T
        self.G_ = G
        self.genes_fitted_ = known

    def predict_genes(self, genes: list[str]) -> np.ndarray:
        """Predict the effect of perturbing each gene alone, ``(len(genes), n_genes)``."""
        P = self.embeddings(genes)
        return (self.G_ @ self.W_ @ P.T).T + self.offset_

    def _predict_delta(self, parts: list[tuple[str, ...]]) -> np.ndarray:
        return self.additive(parts, self.predict_genes)

    def params(self) -> dict[str, Any]:
        """Return what to record, with the fit's sizes."""
        return super().params() | {
            "n_components": int(self.G_.shape[1]),
            "ridge": self.ridge,
            "n_singles_fitted": len(self.genes_fitted_),
        }
