"""scGPT gene embeddings: the gene-token encoder (token mode) or transformer outputs (context).

Token mode is what the official GRN tutorial takes as gene embeddings: each gene's
embedding-table row through the gene encoder's layer norm, independent of any cell. Context
mode runs cells through the model exactly as zero-shot cell embedding does (same tokens, same
random streams, see :func:`~scfm_tools.models.scgpt._embed.iter_token_batches`) and averages,
for each gene, the last layer's output at that gene's token over the cells in which it is a
token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from ..._anndata import get_matrix, resolve_seed, row_blocks
from ...pp._match_genes import GeneMatch, match_adata_genes
from .._gene_embeddings import GeneEmbeddings, rows_on_var
from ._checkpoint import load_scgpt_folder
from ._embed import _autocast, iter_token_batches
from ._module import SCGPTModule
from ._tokenizer import OFFICIAL_N_BINS

if TYPE_CHECKING:
    from anndata import AnnData

    from ...hub import ResolvedModel

__all__ = ["context_gene_embeddings", "embed_genes_resolved", "token_gene_embeddings"]


@torch.inference_mode()
def token_gene_embeddings(module: SCGPTModule, ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """Gene encoder output (embedding row, then layer norm) for vocabulary ids, float32.

    Parameters
    ----------
    module
        The scGPT module.
    ids
        Vocabulary ids.

    Returns
    -------
    ``(len(ids), d_model)`` array.
    """
    device = next(module.parameters()).device
    idx = torch.as_tensor(np.asarray(ids, dtype=np.int64), device=device)
    return module.encoder(idx).float().cpu().numpy()


def context_gene_embeddings(
    module: SCGPTModule,
    vocab: dict[str, int],
    args: dict[str, Any],
    X,
    match: GeneMatch,
    *,
    batch_size: int = 64,
    max_length: int | None = None,
    n_bins: int = OFFICIAL_N_BINS,
    random_state: int | None = 0,
    device: str | torch.device = "cpu",
    chunk_size: int = 10_000,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean last-layer output at each matched gene's token, over the cells where it is one.

    Parameters
    ----------
    module
        The scGPT module.
    vocab
        Token -> id vocabulary.
    args
        The checkpoint's ``args.json``.
    X
        Cells x genes values (raw counts preferred), rows streamed ``chunk_size`` at a time.
    match
        The match of the columns of ``X`` to ``vocab``.
    batch_size
        Cells per forward pass.
    max_length
        Longest token sequence (``<cls>`` included); longer cells are subsampled as in cell
        embedding. ``None`` uses ``args["max_seq_len"]``.
    n_bins
        Value bins.
    random_state
        Seed of the binning tie-breaks and the subsampling.
    device
        Where to run.
    chunk_size
        Cells tokenized and held at a time.

    Returns
    -------
    ``(embeddings, n_cells)``: ``(n_matched, d_model)`` float32 means (NaN for genes that were
    never a token) and ``(n_matched,)`` int64 counts of cells, for the matched genes in
    ``var`` order.
    """
    ids = match.index[match.matched]
    # vocabulary id -> row among the matched genes (-1: not one of them)
    position = np.full(max(vocab.values()) + 1, -1, dtype=np.int64)
    position[ids] = np.arange(ids.size)
    sums = counts = lookup = None
    blocks = row_blocks(X, chunk_size=chunk_size)
    for batch in iter_token_batches(
        module,
        vocab,
        args,
        blocks,
        match,
        batch_size=batch_size,
        max_length=max_length,
        n_bins=n_bins,
        random_state=random_state,
        device=device,
    ):
        if not batch.n_block:
            continue
        gene_ids = batch.tensors["gene_ids"]
        if sums is None:
            dev = gene_ids.device
            # float64 sums keep the mean exact over many cells; MPS has no float64.
            dtype = torch.float32 if dev.type == "mps" else torch.float64
            sums = torch.zeros((ids.size, module.d_model), dtype=dtype, device=dev)
            counts = torch.zeros(ids.size, dtype=torch.int64, device=dev)
            lookup = torch.as_tensor(position, device=dev)
        with torch.inference_mode(), _autocast(gene_ids.device):
            out = module.encode(**batch.tensors)["transformer_output"]
        # <cls> (first) and padding carry no gene
        rows = lookup[gene_ids[:, 1:]]
        keep = ~batch.tensors["padding_mask"][:, 1:] & (rows >= 0)
        rows = rows[keep]
        sums.index_add_(0, rows, out[:, 1:][keep].to(sums.dtype))
        counts.index_add_(0, rows, torch.ones_like(rows))
    if sums is None:
        return np.full((ids.size, module.d_model), np.nan, np.float32), np.zeros(ids.size, np.int64)
    sums, counts = sums.cpu().numpy(), counts.cpu().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sums / counts[:, None]
    return mean.astype(np.float32), counts.astype(np.int64)


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
    """Embed ``adata``'s genes with a located scGPT checkpoint (``sft.tl.embed_genes``).

    ``mode="token"`` reads no expression values (``layer``, ``batch_size``, ``max_length``,
    ``random_state`` and ``chunk_size`` play no role); ``mode="context"`` streams the cells
    ``chunk_size`` at a time.
    """
    module, vocab, args, _ = load_scgpt_folder(resolved.path)
    match = match_adata_genes(adata, vocab, gene_key=gene_key, caller="embed_genes")
    params: dict[str, Any] = {"n_genes_matched": int(match.n_matched)}
    if mode == "token":
        module.to(device).eval()
        rows = token_gene_embeddings(module, match.index[match.matched])
        return GeneEmbeddings(rows_on_var(rows, match), match.matched.copy(), None, params)
    seed = resolve_seed(random_state)
    length = int(args.get("max_seq_len", 1200)) if max_length is None else int(max_length)
    rows, counts = context_gene_embeddings(
        module,
        vocab,
        args,
        get_matrix(adata, layer),
        match,
        batch_size=batch_size,
        max_length=length,
        random_state=seed,
        device=device,
        chunk_size=chunk_size,
    )
    n_cells = np.zeros(match.n_genes, dtype=np.int64)
    n_cells[match.matched] = counts
    params.update(
        max_length=length,
        random_state=seed,
        n_genes_embedded=int((counts > 0).sum()),
    )
    return GeneEmbeddings(rows_on_var(rows, match), match.matched.copy(), n_cells, params)
