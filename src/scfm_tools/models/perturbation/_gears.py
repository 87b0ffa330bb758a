"""The GEARS-style predictor: builds the graphs, trains :class:`GeneGraphModule`, predicts."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy import sparse

from ..._errors import InputError
from ..._progress import progress_bar
from ...train import seeded_torch
from ._data import PerturbationData
from ._embedded import EmbeddingPredictor, GeneEmbedder
from ._gears_module import GeneGraphModule

__all__ = ["GearsPredictor"]

logger = logging.getLogger("scfm_tools")

#: Cells whose co-expression the read-out gene graph is computed from, at most.
_COEXPRESSION_CELLS = 5_000


def coexpression_graph(X: sparse.csr_matrix, n_neighbors: int, seed: int) -> sparse.csr_matrix:
    """Row-normalised graph linking each gene to its most positively correlated genes."""
    rng = np.random.default_rng(seed)
    if X.shape[0] > _COEXPRESSION_CELLS:
        X = X[np.sort(rng.choice(X.shape[0], _COEXPRESSION_CELLS, replace=False))]
    dense = np.asarray(X.todense(), dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.nan_to_num(np.corrcoef(dense, rowvar=False))
    np.fill_diagonal(corr, 0.0)
    k = min(n_neighbors, corr.shape[0] - 1)
    cols = np.argsort(-corr, axis=1, kind="stable")[:, :k]
    vals = np.maximum(np.take_along_axis(corr, cols, axis=1), 0.0)
    total = vals.sum(axis=1, keepdims=True)
    vals = np.divide(vals, total, out=np.zeros_like(vals), where=total > 0)
    rows = np.repeat(np.arange(corr.shape[0]), k)
    return sparse.csr_matrix((vals.ravel(), (rows, cols.ravel())), shape=corr.shape)


def _to_torch_sparse(graph: sparse.csr_matrix) -> torch.Tensor:
    coo = graph.tocoo()
    index = torch.as_tensor(np.vstack([coo.row, coo.col]), dtype=torch.long)
    return torch.sparse_coo_tensor(
        index, torch.as_tensor(coo.data), graph.shape, check_invariants=True
    )


class GearsPredictor(EmbeddingPredictor):
    """GEARS-style gene-graph network on a foundation model's gene embeddings.

    Trained on the observed perturbations (singles and combinations): each step draws a few
    perturbations and, for each, the mean of a random subset of its cells, so the network sees
    the cell-to-cell noise of the means it learns (GEARS trains on single cells). Loss: mean
    squared error of the change from the control mean. A gene perturbed in training keeps a
    learnt embedding of its own; half the time in training it is hidden, so that the network also
    learns to predict a gene from the genes its foundation embedding resembles, as it must for a
    gene never perturbed.

    Parameters
    ----------
    embed
        Gives genes' foundation embeddings (NaN rows for genes without one).
    hidden
        Width of the network.
    n_neighbors
        Perturbed training genes a perturbed gene borrows from (embedding cosine similarity).
    coexpression_neighbors
        Co-expressed genes each read-out gene is linked to.
    max_epochs
        Passes over the training perturbations.
    batch_size
        Perturbations per step.
    cells_per_mean
        Cells averaged into one training target (fewer when a perturbation has fewer).
    lr
        Adam learning rate.
    weight_decay
        Adam weight decay.
    random_state
        Seed of the initialisation, the draws and the graph's cell subsample.
    device
        Torch device to train and predict on.
    embedding_source
        What made the embeddings, for the record.
    """

    method = "gears"

    def __init__(
        self,
        embed: GeneEmbedder,
        *,
        hidden: int = 64,
        n_neighbors: int = 5,
        coexpression_neighbors: int = 10,
        max_epochs: int = 100,
        batch_size: int = 16,
        cells_per_mean: int = 32,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        random_state: int = 0,
        device: str | torch.device = "cpu",
        embedding_source: str = "the model",
    ) -> None:
        super().__init__(embed, embedding_source=embedding_source)
        for name, value in (
            ("hidden", hidden),
            ("n_neighbors", n_neighbors),
            ("coexpression_neighbors", coexpression_neighbors),
            ("max_epochs", max_epochs),
            ("batch_size", batch_size),
            ("cells_per_mean", cells_per_mean),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        self.hidden = hidden
        self.n_neighbors = n_neighbors
        self.coexpression_neighbors = coexpression_neighbors
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.cells_per_mean = cells_per_mean
        self.lr = lr
        self.weight_decay = weight_decay
        self.random_state = random_state
        self.device = torch.device(device)

    # which genes ------------------------------------------------------------------------------
    def unpredictable(self, genes: Sequence[str], data: PerturbationData) -> list[str]:
        """Return the genes without an embedding that no training perturbation perturbed."""
        seen = {g for p in data.parts.values() for g in p}
        unseen = [g for g in genes if g not in seen]
        return [g for g, ok in zip(unseen, self.has_embedding(unseen), strict=True) if not ok]

    def _unpredictable_message(self, genes: list[str]) -> str:
        return super()._unpredictable_message(genes).replace("perturbed alone", "perturbed")

    def _inputs(self, genes: list[str], hide_own: np.ndarray | None = None):
        """Features, anchors and weights of ``genes`` for the module (see its ``perturbations``)."""
        emb = self.embeddings(genes)
        known = np.isfinite(emb).all(axis=1)
        features = np.where(known[:, None], emb, 0.0)
        k = self.n_neighbors + 1
        anchors = np.zeros((len(genes), k), dtype=np.int64)
        weights = np.zeros((len(genes), k))
        unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
        for i, gene in enumerate(genes):
            own = self.anchor_index_.get(gene)
            if known[i] and self.anchor_known_.any():
                sim = self.anchor_unit_ @ unit[i]
                sim[~self.anchor_known_] = -np.inf
                if own is not None:
                    sim[own] = -np.inf
                take = np.argsort(-sim, kind="stable")[: self.n_neighbors]
                take = take[np.isfinite(sim[take])]
                anchors[i, : len(take)] = take
                weights[i, : len(take)] = np.maximum(sim[take], 0.0)
            if own is not None and not (hide_own is not None and hide_own[i] and known[i]):
                anchors[i, -1] = own
                weights[i, -1] = 1.0
        total = weights.sum(axis=1, keepdims=True)
        weights = np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)
        return (
            torch.as_tensor(features, dtype=torch.float32, device=self.device),
            torch.as_tensor(anchors, dtype=torch.long, device=self.device),
            torch.as_tensor(weights, dtype=torch.float32, device=self.device),
        )

    def _batch(self, parts: list[tuple[str, ...]], hide: bool, rng: np.random.Generator):
        genes = sorted({g for p in parts for g in p})
        position = {g: i for i, g in enumerate(genes)}
        combinations = np.zeros((len(parts), len(genes)), dtype=np.float32)
        for row, p in enumerate(parts):
            combinations[row, [position[g] for g in p]] = 1.0
        hide_own = rng.random(len(genes)) < 0.5 if hide else None
        inputs = self._inputs(genes, hide_own)
        return torch.as_tensor(combinations, device=self.device), *inputs

    # fitting ----------------------------------------------------------------------------------
    def _fit(self, data: PerturbationData) -> None:
        anchors = sorted({g for p in data.parts.values() for g in p})
        emb = self.embeddings(anchors)
        self.anchor_index_ = {g: i for i, g in enumerate(anchors)}
        self.anchor_known_ = np.isfinite(emb).all(axis=1)
        if not self.anchor_known_.any():
            raise InputError(
                f"no perturbed gene of the data has an embedding in {self.embedding_source}; "
                "method 'gears' needs some. Pass a model whose vocabulary covers them, or use "
                "method='mean' or 'additive'."
            )
        anchor_feats = np.where(self.anchor_known_[:, None], emb, 0.0)
        self.anchor_unit_ = anchor_feats / np.maximum(
            np.linalg.norm(anchor_feats, axis=1, keepdims=True), 1e-12
        )
        readout = self.embeddings(list(map(str, data.genes)))
        readout = np.where(np.isfinite(readout).all(axis=1, keepdims=True), readout, 0.0)
        graph = coexpression_graph(data.X, self.coexpression_neighbors, self.random_state)
        offset = np.mean([data.delta(n) for n in data.perturbations], axis=0)
        with seeded_torch(self.random_state):
            self.module_ = GeneGraphModule(
                torch.as_tensor(readout, dtype=torch.float32),
                _to_torch_sparse(graph),
                len(anchors),
                torch.as_tensor(offset, dtype=torch.float32),
                hidden=self.hidden,
            ).to(self.device)
            self.history_ = self._train(data)

    def _train(self, data: PerturbationData) -> list[float]:
        rng = np.random.default_rng(self.random_state)
        names = list(data.perturbations)
        control = torch.as_tensor(data.control_mean, dtype=torch.float32, device=self.device)
        optimizer = torch.optim.Adam(
            self.module_.parameters(), lr=self.lr, weight_decay=self.weight_decay
        )
        self.module_.train()
        history = []
        with progress_bar(self.max_epochs, desc="gears: training", unit="epochs") as bar:
            for _ in range(self.max_epochs):
                losses = []
                order = rng.permutation(len(names))
                for start in range(0, len(order), self.batch_size):
                    batch = [names[i] for i in order[start : start + self.batch_size]]
                    target = torch.as_tensor(
                        np.stack([self._resampled_mean(data, n, rng) for n in batch]),
                        dtype=torch.float32,
                        device=self.device,
                    )
                    pred = self.module_(*self._batch([data.parts[n] for n in batch], True, rng))
                    loss = torch.mean((pred - (target - control)) ** 2)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    losses.append(loss.item())
                history.append(float(np.mean(losses)))
                bar.update(1)
        self.module_.eval()
        logger.info("gears: %d epochs, final training loss %.4g", self.max_epochs, history[-1])
        return history

    def _resampled_mean(self, data: PerturbationData, name: str, rng) -> np.ndarray:
        rows = data.rows[name]
        if len(rows) > self.cells_per_mean:
            rows = rng.choice(rows, self.cells_per_mean, replace=False)
        return np.asarray(data.X[rows].mean(axis=0)).ravel()

    # predicting -------------------------------------------------------------------------------
    @torch.inference_mode()
    def _predict_delta(self, parts: list[tuple[str, ...]]) -> np.ndarray:
        inputs = self._batch(parts, False, np.random.default_rng(0))
        return self.module_(*inputs).double().cpu().numpy()

    def params(self) -> dict[str, Any]:
        """Return what to record, with the training settings and the final loss."""
        return super().params() | {
            "hidden": self.hidden,
            "n_neighbors": self.n_neighbors,
            "coexpression_neighbors": self.coexpression_neighbors,
            "max_epochs": self.max_epochs,
            "batch_size": self.batch_size,
            "cells_per_mean": self.cells_per_mean,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "final_train_loss": self.history_[-1],
        }
