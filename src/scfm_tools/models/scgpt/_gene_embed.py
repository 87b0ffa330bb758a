"""scGPT gene embeddings: the gene-token encoder (token mode) or transformer outputs (context).

Token mode is what the official GRN tutorial takes as gene embeddings: each gene's
embedding-table row through the gene encoder's layer norm, independent of any cell. Context
mode runs cells through the model exactly as zero-shot cell embedding does (same tokens, same
random draws, see :func:`~scfm_tools.models.scgpt._embed.iter_token_batches`) and averages,
for each gene, the last layer's output at that gene's token over the cells in which it is a
token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..._anndata import DEFAULT_CHUNK_SIZE, row_blocks
from ..._cell_rng import RandomStream
from ..._docs import DOC_RANDOM_STREAM, doc_params
from ...pp._match_genes import GeneMatch
from ..base._streaming import autocast
from ._embed import iter_token_batches
from ._module import SCGPTModule
from ._tokenizer import OFFICIAL_N_BINS

if TYPE_CHECKING:
    pass

__all__ = ["context_gene_embeddings", "token_gene_embeddings"]


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


@doc_params(random_stream=DOC_RANDOM_STREAM)
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
    random_stream: RandomStream = "cell",
    device: str | torch.device = "cpu",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
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
    {random_stream}
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
        random_stream=random_stream,
        device=device,
        n_cells=X.shape[0],
    ):
        if not batch.n_block:
            continue
        gene_ids = batch.inputs["gene_ids"]
        if sums is None:
            dev = gene_ids.device
            # float64 sums keep the mean exact over many cells; MPS has no float64.
            dtype = torch.float32 if dev.type == "mps" else torch.float64
            sums = torch.zeros((ids.size, module.d_model), dtype=dtype, device=dev)
            counts = torch.zeros(ids.size, dtype=torch.int64, device=dev)
            lookup = torch.as_tensor(position, device=dev)
        with torch.inference_mode(), autocast(gene_ids.device):
            out = module.encode(**batch.inputs)["transformer_output"]
        # <cls> (first) and padding carry no gene
        rows = lookup[gene_ids[:, 1:]]
        keep = ~batch.inputs["padding_mask"][:, 1:] & (rows >= 0)
        rows = rows[keep]
        sums.index_add_(0, rows, out[:, 1:][keep].to(sums.dtype))
        counts.index_add_(0, rows, torch.ones_like(rows))
    if sums is None:
        return np.full((ids.size, module.d_model), np.nan, np.float32), np.zeros(ids.size, np.int64)
    sums, counts = sums.cpu().numpy(), counts.cpu().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sums / counts[:, None]
    return mean.astype(np.float32), counts.astype(np.int64)
