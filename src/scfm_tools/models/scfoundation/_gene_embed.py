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
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from scipy import sparse

from ..._anndata import get_matrix
from ..._progress import progress_bar
from ...pp._match_genes import match_adata_genes
from .._gene_embeddings import GeneEmbeddings, rows_on_var, token_table_rows
from ._checkpoint import entry_for, load_scfoundation
from ._embed import _device, _eval_on, block_passes, prepare_blocks, prepare_options
from ._preprocess import (
    GeneReindexer,
    InputType,
    PreNormalized,
    TargetDepth,
    check_options,
    parse_target_depth,
)

if TYPE_CHECKING:
    from anndata import AnnData

    from ...hub import ResolvedModel
    from .._load_report import LoadReport
    from ._module import SCFoundationModule

__all__ = ["context_gene_embeddings", "embed_genes_resolved", "token_gene_embeddings"]

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
    dev = _device(device)
    expressed = np.zeros(module.n_genes, dtype=np.int64)
    n_seen = 0
    sums = None
    with _eval_on(module, dev), progress_bar(n_cells, desc="scFoundation") as bar:
        for values, t, s in blocks:
            n_seen += values.shape[0]
            expressed += np.bincount(values.indices[values.data > 0], minlength=module.n_genes)
            passes = block_passes(
                module, values, t, s, output="gene", batch_size=batch_size, device=dev
            )
            for rows, out in passes:
                if sums is None:
                    # float64 sums keep the mean exact over many cells; MPS has no float64.
                    dtype = torch.float32 if out.device.type == "mps" else torch.float64
                    sums = torch.zeros(out.shape[1:], dtype=dtype, device=out.device)
                sums += out.sum(dim=0, dtype=sums.dtype)
                bar.update(len(rows))
    if sums is None:
        return np.full((module.n_genes, module.dec_dim), np.nan, np.float32), expressed
    return (sums.cpu().numpy() / n_seen).astype(np.float32), expressed


def _require(report: LoadReport, prefixes: tuple[str, ...], name: str, what: str) -> None:
    """Refuse a checkpoint whose needed weights were missing (they would be random)."""
    if any(k.startswith(prefixes) for k in report.missing):
        raise ValueError(
            f"the checkpoint {name} [{ENTRY!r}] lacks the {what} weights, so it cannot give "
            "these gene embeddings."
        )


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
    target_depth: TargetDepth = "t4",
    pre_normalized: PreNormalized = "F",
    input_type: InputType = "singlecell",
    total_counts_key: str | None = None,
) -> GeneEmbeddings:
    """Embed ``adata``'s genes with a located scFoundation checkpoint (``sft.tl.embed_genes``).

    ``mode="token"``: the gene's row of the position embedding ``pos_emb`` of the ``gene``
    weights (``enc_dim`` wide); no value is read, and the options below play no role (they are
    still checked). ``mode="context"``: each cell is prepared as in ``embed_cells`` (the
    official ``get_embedding.py`` options ``target_depth``, ``pre_normalized``,
    ``input_type``, ``total_counts_key``; see
    :func:`~scfm_tools.models.scfoundation._embed.embed_resolved`), run through encoder and
    decoder, and each gene's decoder output (official ``output_type="gene"``, ``dec_dim``
    wide) averaged over **all** cells, since the decoder reads every gene of every cell. The
    returned ``n_cells`` counts, per gene, the cells that express it (whose encoder read it):
    it tells how much of the average rests on the gene's own measured values. scFoundation is
    deterministic: ``random_state`` plays no role, and ``max_length`` must be ``None``.
    """
    if mode not in ("token", "context"):
        raise ValueError(f"mode must be 'token' or 'context', got {mode!r}.")
    if mode == "token":
        check_options(pre_normalized, input_type)
        parse_target_depth(target_depth)
        module, genes, _, report = load_scfoundation(resolved, ENTRY)
        _require(report, ("pos_emb.",), resolved.name, "gene (position) embedding")
        match = match_adata_genes(adata, genes, gene_key=gene_key, caller="embed_genes")
        rows = token_table_rows(token_gene_embeddings(module), match)
        params = {"n_genes_matched": int(match.n_matched), "entry": ENTRY, "table": "pos_emb"}
        return GeneEmbeddings(rows, match.matched.copy(), None, params)
    depth, totals, options = prepare_options(
        adata,
        layer,
        max_length=max_length,
        target_depth=target_depth,
        pre_normalized=pre_normalized,
        input_type=input_type,
        total_counts_key=total_counts_key,
    )
    module, genes, _, report = load_scfoundation(resolved, ENTRY)
    _require(report, ("decoder.", "decoder_embed.", "norm."), resolved.name, "decoder")
    match = match_adata_genes(adata, genes, gene_key=gene_key, caller="embed_genes")
    blocks = prepare_blocks(
        get_matrix(adata, layer),
        GeneReindexer(match.index, module.n_genes),
        pre_normalized=pre_normalized,
        input_type=input_type,
        depth=depth,
        total_counts=totals,
        chunk_size=chunk_size,
        obs_names=adata.obs_names,
    )
    means, expressed = context_gene_embeddings(
        module, blocks, batch_size=batch_size, device=device, n_cells=adata.n_obs
    )
    cols = match.index[match.matched]
    n_cells = np.zeros(match.n_genes, dtype=np.int64)
    n_cells[match.matched] = expressed[cols]
    params: dict[str, Any] = {
        "n_genes_matched": int(match.n_matched),
        "entry": ENTRY,
        "output": "decoder gene embeddings, mean over all cells",
        "n_cells_counts": "cells expressing the gene",
        **options,
    }
    return GeneEmbeddings(rows_on_var(means[cols], match), match.matched.copy(), n_cells, params)
