"""Gene x gene attention of an scGPT transformer layer, summed over cells (the GRN input).

One implementation behind :meth:`SCGPT.get_attention <scfm_tools.models.SCGPT.get_attention>`
and ``sft.tl.grn(method="attention")``: cells are tokenized as for embedding (expressed
vocabulary genes, ``<cls>`` first, per-cell quantile bins), one layer's attention weights are
averaged over the heads, and for every pair of genes that are both tokens of a cell the weight is
added up, per group of cells when groups are given. ``<cls>`` and padding are left out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from ..._anndata import get_matrix, resolve_seed, row_blocks
from ..._settings import settings
from ..._validation import InputError
from ...pp._match_genes import match_adata_genes
from ._checkpoint import load_scgpt_folder
from ._embed import token_batches
from ._module import SCGPTModule
from ._tokenizer import OFFICIAL_N_BINS, CellTokenizer

if TYPE_CHECKING:
    from anndata import AnnData

    from ...hub import ResolvedModel

__all__ = [
    "MAX_ATTENTION_GENES",
    "attention_resolved",
    "attention_sums",
    "restrict_gene_index",
]

# Gene x gene attention sums are held in memory: 5,000 genes take 300 MB (sums and counts).
MAX_ATTENTION_GENES = 5_000
# With groups, one sum per group: the groups together may hold this many gene pairs.
MAX_ATTENTION_ENTRIES = 2 * MAX_ATTENTION_GENES**2


def restrict_gene_index(
    index: np.ndarray, var_names: Sequence[str], genes: Sequence[str] | None
) -> np.ndarray:
    """Set the vocabulary id of every column not in ``genes`` to -1 (no token).

    Parameters
    ----------
    index
        Vocabulary id per column (-1: not in the vocabulary).
    var_names
        Name of each column.
    genes
        Names to keep; ``None`` keeps all.

    Returns
    -------
    A copy of ``index``.
    """
    index = np.array(index, dtype=np.int64)
    if genes is None:
        return index
    wanted = pd.Index([str(g) for g in genes])
    names = pd.Index(np.asarray(var_names, dtype=object).astype(str))
    absent = wanted.difference(names)
    if len(absent):
        raise KeyError(f"{len(absent)} genes are not in adata.var_names, e.g. {list(absent[:5])}.")
    index[~names.isin(wanted)] = -1
    return index


def attention_sums(
    module: SCGPTModule,
    blocks: Iterable,
    gene_index: np.ndarray,
    *,
    cls_id: int,
    layer: int = -1,
    groups: np.ndarray | None = None,
    n_groups: int = 1,
    batch_size: int = 16,
    max_length: int,
    n_bins: int = OFFICIAL_N_BINS,
    random_state: int | None = 0,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sum one layer's head-averaged attention over cells, for every pair of gene tokens.

    Entry ``(g, q, k)`` of the sums is the attention that query gene ``q`` pays to key gene
    ``k``, added over the cells of group ``g`` in which both are tokens; the counts say in how
    many cells that was. Their ratio is the average attention; the diagonal is each gene's
    attention to itself. Weights are computed in float32 (no autocast) and summed in float64
    (float32 on Apple MPS, which has no float64).

    Parameters
    ----------
    module
        The scGPT module (put in eval mode for the run; its training flag is restored).
    blocks
        Cells x genes blocks in dataset order (the tokenizer's random streams run across them).
    gene_index
        Vocabulary id of each column, -1 for columns that are not to be tokens.
    cls_id
        Id of ``<cls>``.
    layer
        Transformer layer (negative counts from the last).
    groups
        Group of each cell, ``0 .. n_groups - 1`` (``None``: all cells in group 0).
    n_groups
        Number of groups.
    batch_size
        Cells per forward pass.
    max_length
        Longest token sequence, ``<cls>`` included; longer cells are subsampled at random.
    n_bins
        Value bins.
    random_state
        Seed of the binning tie-breaks and of the subsampling (``None``: ``sft.settings.seed``).
    device
        Where to run.

    Returns
    -------
    ``(sums, counts, columns)``: sums ``(n_groups, n, n)`` float64, counts ``(n_groups, n, n)``
    int32, and the ``n`` columns that were tokens (positions in ``gene_index``), in column order.
    """
    n_layers = len(module.transformer_encoder.layers)
    if not -n_layers <= layer < n_layers:
        raise IndexError(f"layer {layer} does not exist: the model has {n_layers} layers.")
    gene_index = np.asarray(gene_index, dtype=np.int64)
    columns = np.flatnonzero(gene_index >= 0)
    n = columns.size
    if n == 0:
        raise InputError("none of the chosen genes is in the model's vocabulary.")
    if n > MAX_ATTENTION_GENES:
        raise ValueError(
            f"{n:,} genes would give a {n:,} x {n:,} matrix; pass `genes=` with at most "
            f"{MAX_ATTENTION_GENES:,} (e.g. highly variable genes)."
        )
    if n_groups * n * n > MAX_ATTENTION_ENTRIES:
        raise ValueError(
            f"{n_groups} groups of {n:,} x {n:,} attention sums would not fit in memory; pass "
            f"fewer `genes=` (at most {int(np.sqrt(MAX_ATTENTION_ENTRIES / n_groups)):,} for "
            f"{n_groups} groups) or fewer groups."
        )
    if groups is not None:
        groups = np.asarray(groups, dtype=np.int64)
        if groups.size and (groups.min() < 0 or groups.max() >= n_groups):
            raise ValueError(f"groups must hold codes 0 .. {n_groups - 1}, one per cell.")
    dev = settings.resolve_device(device) if isinstance(device, str) else torch.device(device)
    acc_dtype = torch.float32 if dev.type == "mps" else torch.float64
    # vocabulary id -> position among the token genes; <cls>, <pad> and the rest map to -1
    lookup = torch.full((int(max(gene_index.max(), cls_id, module.pad_token_id)) + 1,), -1)
    lookup[torch.from_numpy(gene_index[columns])] = torch.arange(n)
    lookup = lookup.to(dev)
    sums = torch.zeros(n_groups * n * n, dtype=acc_dtype, device=dev)
    counts = torch.zeros(n_groups * n * n, dtype=torch.int32, device=dev)
    tokenizer = CellTokenizer(
        gene_index,
        cls_id=cls_id,
        pad_value=module.pad_value,
        max_length=max_length,
        n_bins=n_bins,
        random_state=resolve_seed(random_state),
    )
    which = layer % n_layers
    current, first, block_groups = -1, 0, None
    batches = token_batches(
        module,
        tokenizer,
        blocks,
        pad_id=module.pad_token_id,
        pad_value=module.pad_value,
        batch_size=batch_size,
        device=dev,
    )
    # closing: an error below restores the module's training flag at once, not at collection
    with contextlib.closing(batches):
        for batch in batches:
            if batch.block != current:
                # a new block: its cells are the next n_block cells of `groups`
                current = batch.block
                block_groups = (
                    np.zeros(batch.n_block, dtype=np.int64)
                    if groups is None
                    else groups[first : first + batch.n_block]
                )
                if block_groups.size != batch.n_block:
                    raise ValueError("groups must give one code per cell; there are more cells.")
                first += batch.n_block
            if not batch.n_block:
                continue
            with torch.inference_mode():
                out = module.encode(**batch.tensors, return_attention=[which])
                weights = out["attention"][which].mean(1)  # (cells, query, key)
                pos = lookup[batch.tensors["gene_ids"]]
                both = (pos[:, :, None] >= 0) & (pos[:, None, :] >= 0)
                offset = torch.as_tensor(block_groups[batch.rows], device=dev) * (n * n)
                flat = offset[:, None, None] + pos[:, :, None] * n + pos[:, None, :]
                hits = flat[both]
                sums.index_add_(0, hits, weights[both].to(acc_dtype))
                ones = torch.ones(hits.shape, dtype=torch.int32, device=dev)
                counts.index_add_(0, hits, ones)
    shape = (n_groups, n, n)
    return (
        sums.double().cpu().numpy().reshape(shape),
        counts.cpu().numpy().reshape(shape),
        columns,
    )


def attention_resolved(
    resolved: ResolvedModel,
    adata: AnnData,
    *,
    layer: str | None = None,
    genes: Sequence[str] | None = None,
    groups: np.ndarray | None = None,
    n_groups: int = 1,
    attention_layer: int = -1,
    batch_size: int = 16,
    max_length: int | None = None,
    random_state: int | None = 0,
    device: str | torch.device = "cpu",
    chunk_size: int = 10_000,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """Attention sums of a located scGPT checkpoint over the cells of ``adata`` (``sft.tl.grn``).

    The cells are tokenized as by the zero-shot embedding (``max_length`` defaults to the
    checkpoint's ``max_seq_len``, 51 bins). Returns :func:`attention_sums`' ``(sums, counts,
    columns)`` and what to record about the run in ``uns[key]["params"]``.
    """
    module, vocab, args, _ = load_scgpt_folder(resolved.path)
    match = match_adata_genes(adata, vocab, caller="grn")
    index = restrict_gene_index(match.index, adata.var_names, genes)
    seed = resolve_seed(random_state)
    length = int(args.get("max_seq_len", 1200)) if max_length is None else int(max_length)
    blocks = row_blocks(get_matrix(adata, layer), chunk_size=chunk_size)
    sums, counts, columns = attention_sums(
        module,
        blocks,
        index,
        cls_id=vocab["<cls>"],
        layer=attention_layer,
        groups=groups,
        n_groups=n_groups,
        batch_size=batch_size,
        max_length=length,
        n_bins=OFFICIAL_N_BINS,
        random_state=seed,
        device=device,
    )
    n_layers = len(module.transformer_encoder.layers)
    params = {
        "n_genes_matched": int(match.n_matched),
        "attention_layer": int(attention_layer % n_layers),
        "max_length": length,
        "random_state": seed,
    }
    return sums, counts, columns, params
