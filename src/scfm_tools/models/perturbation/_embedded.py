"""Predictors that read a foundation model's gene embeddings: the embeddings, looked up once."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ._base import PerturbationPredictor
from ._data import PerturbationData

__all__ = ["EmbeddingPredictor", "GeneEmbedder"]

#: ``genes -> (len(genes), d)`` float array, NaN rows for genes without an embedding.
GeneEmbedder = Callable[[Sequence[str]], np.ndarray]


class EmbeddingPredictor(PerturbationPredictor):
    """A predictor whose perturbed genes are described by their gene embeddings.

    Parameters
    ----------
    embed
        Gives the embeddings of genes (NaN rows for genes the model does not know); called
        once per new gene set, the rows are kept.
    embedding_source
        What made the embeddings (the model's name), for the record and the messages.
    """

    def __init__(self, embed: GeneEmbedder, *, embedding_source: str = "the model") -> None:
        super().__init__()
        self.embed = embed
        self.embedding_source = embedding_source
        self._rows: dict[str, np.ndarray] = {}

    def embeddings(self, genes: Sequence[str]) -> np.ndarray:
        """Return ``(len(genes), d)`` embeddings, NaN rows for genes without one."""
        new = [g for g in dict.fromkeys(genes) if g not in self._rows]
        if new:
            rows = np.asarray(self.embed(new), dtype=np.float64)
            self._rows.update(zip(new, rows, strict=True))
        return np.stack([self._rows[g] for g in genes]) if genes else np.zeros((0, 0))

    def has_embedding(self, genes: Sequence[str]) -> np.ndarray:
        """Tell whether each gene has a (finite) embedding."""
        if not genes:
            return np.zeros(0, dtype=bool)
        return np.isfinite(self.embeddings(genes)).all(axis=1)

    def unpredictable(self, genes: Sequence[str], data: PerturbationData) -> list[str]:
        """Return the genes never perturbed alone in ``data`` and without an embedding."""
        unseen = [g for g in genes if g not in data.singles]
        return [g for g, ok in zip(unseen, self.has_embedding(unseen), strict=True) if not ok]

    def _unpredictable_message(self, genes: list[str]) -> str:
        return (
            f"{len(genes)} perturbed gene(s) are not in the vocabulary of {self.embedding_source} "
            f"and were never perturbed alone in the data: {genes[:10]}. Method {self.method!r} "
            "predicts an unseen gene from its embedding, so it cannot predict these. Drop them, "
            "pass a model whose vocabulary has them (model=), or use method='mean' or "
            "'additive', which need no embedding."
        )

    def params(self) -> dict[str, Any]:
        """Return what to record, with the source of the embeddings."""
        return super().params() | {"embeddings": self.embedding_source}
