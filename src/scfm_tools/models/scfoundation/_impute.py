"""Read-depth enhancement with scFoundation's regression head (``sft.tl.impute``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from ..._anndata import get_matrix
from ...pp._match_genes import match_adata_genes
from ._checkpoint import load_scfoundation
from ._embed import iter_outputs, prepare_blocks
from ._preprocess import GeneReindexer, TargetDepth, parse_target_depth

if TYPE_CHECKING:
    from anndata import AnnData

    from ...hub import ResolvedModel

__all__ = ["impute_resolved"]


def impute_resolved(
    resolved: ResolvedModel,
    adata: AnnData,
    *,
    layer: str | None = None,
    gene_key: str | None = None,
    max_length: int | None = None,
    random_state: int | None = 0,
    device: str | torch.device = "cpu",
    target_depth: TargetDepth = "t4",
    entry: Literal["gene", "rde"] = "gene",
    clip_negative: bool = True,
    batch_size: int = 8,
    chunk_size: int = 10_000,
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, Any]]:
    """Predict each cell's expression at ``target_depth`` (``sft.tl.impute``).

    Each cell (raw counts, normalised as the official ``pre_normalized="F"``) is encoded from
    its expressed genes and its ``S`` (observed depth) and ``T`` (``target_depth``) tokens; the
    decoder and regression head predict every model gene's ``log1p``-normalised expression
    (natural log of counts per 10,000) as if the cell had been sequenced at the target depth,
    the official ``--output_type gene_expression`` output. With ``clip_negative`` predictions
    below 0 (impossible for ``log1p`` values) are set to 0. Genes the model does not know are
    NaN. ``entry`` picks the weights: ``"gene"`` (as the official script) or ``"rde"``.
    scFoundation is deterministic, so ``random_state`` plays no role; ``max_length`` must be
    ``None``.

    Returns the imputed matrix ``(n_obs, n_vars)``, no var columns, and what to record in
    ``uns[key]["params"]``.
    """
    depth = parse_target_depth(target_depth)
    if entry not in ("gene", "rde"):
        raise ValueError(f"entry must be 'gene' or 'rde', got {entry!r}.")
    if max_length is not None:
        raise ValueError(
            "max_length does not apply to scFoundation, whose encoder reads every expressed "
            "gene; leave it at None."
        )
    module, genes, _, report = load_scfoundation(resolved, entry)
    if any(k.startswith(("decoder.", "to_final.")) for k in report.missing):
        raise ValueError(
            f"the checkpoint {resolved.name} [{entry!r}] lacks decoder or regression-head "
            "weights, so it cannot predict expression."
        )
    match = match_adata_genes(adata, genes, gene_key=gene_key, caller="impute")
    cols = np.flatnonzero(match.matched)
    model_cols = match.index[cols]
    out = np.full(adata.shape, np.nan, dtype=np.float32)
    blocks = prepare_blocks(
        get_matrix(adata, layer),
        GeneReindexer(match.index, module.n_genes),
        pre_normalized="F",
        input_type="singlecell",
        depth=depth,
        total_counts=None,
        chunk_size=chunk_size,
        obs_names=adata.obs_names,
    )
    start = 0
    outputs = iter_outputs(
        module,
        blocks,
        output="gene_expression",
        batch_size=batch_size,
        device=device,
        n_cells=adata.n_obs,
    )
    for predicted in outputs:
        if clip_negative:
            np.maximum(predicted, 0.0, out=predicted)
        stop = start + predicted.shape[0]
        out[start:stop, cols] = predicted[:, model_cols]
        start = stop
    params = {
        "n_genes_matched": int(match.n_matched),
        "entry": entry,
        "target_depth": depth.text,
        "clip_negative": bool(clip_negative),
        "values": "log1p(counts per 10,000) at the target depth",
    }
    return out, {}, params
