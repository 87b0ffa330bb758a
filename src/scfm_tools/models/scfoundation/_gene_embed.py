"""scFoundation gene embeddings: the gene (position) embedding table, or decoder outputs.

scFoundation identifies a gene by its position in the model's gene list: the encoder and the
decoder add the position embedding ``pos_emb`` (one row per gene, then ``T``, ``S`` and a
padding row) to the embedding of the gene's value. Its gene rows are the model's context-free
gene embeddings (token mode, ``enc_dim`` wide). The official ``get_embedding.py --output_type
gene`` gives each cell's decoder output at every gene (``dec_dim`` wide); context mode averages
it over the cells of the AnnData, one forward pass at a time, so only a pass's cells are ever
held. Both modes read the ``gene`` weights of ``models.ckpt``, the ones the official script
loads for gene outputs (see :func:`~scfm_tools.models.scfoundation.entry_for`), so that the two
kinds of embedding come from the same model.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy import sparse

from ._checkpoint import entry_for
from ._embed import run_passes

if TYPE_CHECKING:
    from ._module import SCFoundationModule

__all__ = ["context_gene_embeddings", "token_gene_embeddings"]

#: The ``models.ckpt`` entry both modes read: the official script's for ``output_type="gene"``.
ENTRY = entry_for("gene")


def token_gene_embeddings(module: SCFoundationModule) -> np.ndarray:
    """Return the gene rows of the position embedding ``pos_emb`` (model gene order), float32.

    Parameters
    ----------
    module
        The scFoundation module.

    Returns
    -------
    ``(n_genes, enc_dim)`` array (the ``T``, ``S`` and padding rows left out).
    """
    return module.pos_emb.weight[: module.n_genes].detach().float().cpu().numpy()


@torch.inference_mode()
def context_gene_embeddings(
    module: SCFoundationModule,
    blocks: Iterable[tuple[sparse.csr_matrix, np.ndarray, np.ndarray]],
    *,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    n_cells: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean over cells of the decoder's gene embeddings, and how many cells express each gene.

    Parameters
    ----------
    module
        The scFoundation module (moved to ``device`` and put in eval mode for the run; its
        training flag is restored afterwards).
    blocks
        ``(values, T, S)`` per block of cells, as
        :func:`~scfm_tools.models.scfoundation._embed.prepare_blocks` yields them.
    batch_size
        Most cells per forward pass (fewer when a pass would hold too many tokens).
    device
        Where to run; the sums stay there, so only the means travel back.
    n_cells
        Cells in all the blocks, when known: the total of the progress bar.

    Returns
    -------
    ``(means, expressed)`` in model gene order: ``(n_genes, dec_dim)`` float32 means over all
    cells (NaN when there is no cell), and ``(n_genes,)`` int64 counts of the cells with a
    positive value for the gene (the cells whose encoder read it).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    expressed = np.zeros(module.n_genes, dtype=np.int64)
    n_seen = 0
    sums = None

    def counted():
        nonlocal n_seen, expressed
        for values, t, s in blocks:
            n_seen += values.shape[0]
            expressed += np.bincount(values.indices[values.data > 0], minlength=module.n_genes)
            yield values, t, s

    for _, out in run_passes(module, counted(), "gene", "all", batch_size, device, n_cells):
        if out is None:
            continue
        if sums is None:
            # float64 sums keep the mean exact over many cells; MPS has no float64.
            dtype = torch.float32 if out.device.type == "mps" else torch.float64
            sums = torch.zeros(out.shape[1:], dtype=dtype, device=out.device)
        sums += out.sum(dim=0, dtype=sums.dtype)
    if sums is None:
        return np.full((module.n_genes, module.dec_dim), np.nan, np.float32), expressed
    return (sums.cpu().numpy() / n_seen).astype(np.float32), expressed
