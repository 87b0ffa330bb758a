"""scBERT gene embeddings: the rows of its frozen gene2vec table (token mode only)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from ...pp._match_genes import match_adata_genes
from .._gene_embeddings import GeneEmbeddings, token_table_rows
from ._checkpoint import load_scbert_checkpoint

if TYPE_CHECKING:
    import torch
    from anndata import AnnData

    from ...hub import ResolvedModel

__all__ = ["embed_genes_resolved"]


def embed_genes_resolved(
    resolved: ResolvedModel,
    adata: AnnData,
    *,
    mode: Literal["token", "context"] = "token",
    layer: str | None = None,
    gene_key: str | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    random_state: int | None = 0,
    device: str | torch.device = "cpu",
    chunk_size: int = 10_000,
) -> GeneEmbeddings:
    """Embed ``adata``'s genes with a located scBERT checkpoint (``sft.tl.embed_genes``).

    scBERT adds a frozen gene2vec vector to each gene's token at its position; that table is
    its context-free gene embedding. Context-aware embeddings are not implemented for scBERT
    (every cell reads all ~17k genes, so a per-gene average over cells costs a full forward
    pass per cell with little to gain over its token embeddings).
    """
    if mode != "token":
        raise NotImplementedError(
            f"embed_genes(mode={mode!r}) is available for scGPT and scFoundation models "
            "only; use mode='token' for scBERT (its gene2vec table)."
        )
    gene_list = resolved.files.get("gene_list")
    if gene_list is None:
        raise FileNotFoundError(
            f"the scBERT checkpoint {resolved.weights.name} has no gene list beside it: put "
            f"gene_list.txt (the model's gene symbols, one per line, in checkpoint order) in "
            f"{resolved.path}."
        )
    module, genes, _ = load_scbert_checkpoint(resolved.weights, gene_list=gene_list)
    if module.gene2vec is None:
        raise NotImplementedError(
            f"the scBERT checkpoint {resolved.weights.name} has no gene2vec table "
            "(g2v_position_emb=False), so it has no gene embeddings."
        )
    match = match_adata_genes(adata, genes, gene_key=gene_key, caller="embed_genes")
    params: dict[str, Any] = {"n_genes_matched": int(match.n_matched), "table": "gene2vec"}
    return GeneEmbeddings(
        token_table_rows(module.gene2vec, match), match.matched.copy(), None, params
    )
