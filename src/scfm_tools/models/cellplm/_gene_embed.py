"""CellPLM gene embeddings: the rows of its gene-embedding table (token mode only)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from ...pp._match_genes import match_adata_genes
from .._gene_embeddings import GeneEmbeddings, token_table_rows
from ._checkpoint import load_cellplm_checkpoint

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
    batch_size: int = 64,
    max_length: int | None = None,
    random_state: int | None = 0,
    device: str | torch.device = "cpu",
    chunk_size: int = 10_000,
) -> GeneEmbeddings:
    """Embed ``adata``'s genes with a located CellPLM checkpoint (``sft.tl.embed_genes``).

    CellPLM embeds a cell as ``log1p(counts) @ E`` with a genes x ``d`` table ``E``; its rows
    are the model's gene embeddings. CellPLM's tokens are cells, not genes, so there are no
    context-aware gene embeddings to average: ``mode="context"`` is refused.
    """
    if mode != "token":
        raise NotImplementedError(
            f"embed_genes(mode={mode!r}) is available for scGPT and scFoundation models "
            "only; CellPLM's tokens are cells, so use mode='token' (its gene-embedding table)."
        )
    module, gene_list, _, _ = load_cellplm_checkpoint(resolved)
    match = match_adata_genes(adata, gene_list, gene_key=gene_key, caller="embed_genes")
    params: dict[str, Any] = {"n_genes_matched": int(match.n_matched), "table": "embedder"}
    table = module.embedder.feat_enc.emb
    return GeneEmbeddings(token_table_rows(table, match), match.matched.copy(), None, params)
