"""A GEARS-style gene-graph network as a pure-torch module (no AnnData, no GEARS code).

After Roohani, Huang & Leskovec (Nat Biotechnol 2024), with a foundation model's gene
embeddings as the gene features, scFoundation's route: each read-out gene has a learnt
embedding plus its projected foundation embedding, smoothed over a co-expression graph; each
perturbed gene is described by its projected foundation embedding plus the learnt embeddings of
its most similar perturbed genes of the training data (an embedding-similarity graph in place of
GEARS' Gene Ontology graph), so an unseen gene borrows from the genes it resembles. A
combination sums its genes' perturbation embeddings, which are added to every read-out gene's
embedding; a shared MLP, per-gene output weights and a cross-gene layer give each gene's change.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["GeneGraphModule"]


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_out))


class GeneGraphModule(nn.Module):
    """Predicts the change of every read-out gene under a (combination of) perturbation(s).

    Parameters
    ----------
    readout_features
        ``(n_genes, d_in)`` foundation embeddings of the read-out genes (zeros where a gene has
        none; its learnt embedding then carries it).
    coexpression
        ``(n_genes, n_genes)`` sparse row-normalised co-expression graph of the read-out genes.
    n_anchors
        Number of anchor genes (the genes perturbed in training), each with a learnt embedding.
    offset
        ``(n_genes,)`` change added to every prediction (the mean training effect), so the
        network learns what differs from it.
    hidden
        Width of every embedding and hidden layer.
    """

    def __init__(
        self,
        readout_features: Tensor,
        coexpression: Tensor,
        n_anchors: int,
        offset: Tensor,
        *,
        hidden: int = 64,
    ) -> None:
        super().__init__()
        n_genes, d_in = readout_features.shape
        self.register_buffer("readout_features", readout_features.float())
        self.register_buffer("coexpression", coexpression.float().coalesce())
        self.register_buffer("offset", offset.float())
        self.gene_embedding = nn.Embedding(n_genes, hidden)
        self.gene_in = nn.Linear(d_in, hidden)
        self.gene_graph = nn.Linear(hidden, hidden)
        self.anchor_embedding = nn.Embedding(n_anchors, hidden)
        self.pert_in = _mlp(d_in, hidden, hidden)
        self.pert_graph = nn.Linear(hidden, hidden)
        self.decoder = _mlp(hidden, hidden, hidden)
        self.gene_weight = nn.Parameter(torch.randn(n_genes, hidden) / hidden**0.5)
        self.gene_bias = nn.Parameter(torch.zeros(n_genes))
        self.cross = _mlp(n_genes, hidden, hidden)
        self.out_weight = nn.Parameter(torch.randn(n_genes, hidden + 1) / (hidden + 1) ** 0.5)
        self.out_bias = nn.Parameter(torch.zeros(n_genes))
        for p in (self.gene_embedding.weight, self.anchor_embedding.weight):
            nn.init.normal_(p, std=0.1)

    def genes(self) -> Tensor:
        """``(n_genes, hidden)`` read-out gene embeddings after one co-expression step."""
        z = self.gene_embedding.weight + self.gene_in(self.readout_features)
        return z + torch.relu(self.gene_graph(torch.sparse.mm(self.coexpression, z)))

    def perturbations(self, features: Tensor, anchors: Tensor, weights: Tensor) -> Tensor:
        """``(m, hidden)`` embeddings of ``m`` perturbed genes.

        Parameters
        ----------
        features
            ``(m, d_in)`` foundation embeddings (zeros for a gene without one).
        anchors
            ``(m, k)`` indices of each gene's neighbouring anchor genes.
        weights
            ``(m, k)`` their weights (rows sum to 1, or 0 for a gene with no neighbour).
        """
        borrowed = (weights.unsqueeze(-1) * self.anchor_embedding(anchors)).sum(1)
        return self.pert_in(features) + self.pert_graph(borrowed)

    def forward(
        self, combinations: Tensor, features: Tensor, anchors: Tensor, weights: Tensor
    ) -> Tensor:
        """Predict ``(batch, n_genes)`` changes.

        Parameters
        ----------
        combinations
            ``(batch, m)`` 0/1: which of the ``m`` genes each prediction perturbs.
        features, anchors, weights
            The ``m`` genes, as in :meth:`perturbations`.
        """
        pert = combinations @ self.perturbations(features, anchors, weights)  # (batch, hidden)
        hidden = self.decoder(self.genes().unsqueeze(0) + pert.unsqueeze(1))
        per_gene = (hidden * self.gene_weight).sum(-1) + self.gene_bias  # (batch, n_genes)
        cross = self.cross(per_gene).unsqueeze(1).expand(-1, per_gene.shape[1], -1)
        both = torch.cat([per_gene.unsqueeze(-1), cross], dim=-1)
        return self.offset + (both * self.out_weight).sum(-1) + self.out_bias
