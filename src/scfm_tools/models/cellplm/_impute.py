"""Denoised expression from CellPLM's negative-binomial decoder (``sft.tl.impute``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from ..._anndata import get_matrix, resolve_seed
from ..._cell_rng import RandomStream
from ..._validation import InputError
from ...pp._match_genes import match_adata_genes
from ._checkpoint import load_cellplm
from ._embed import _device, sample_draws
from ._sequences import batch_codes, iter_sequences, sequence_rows

if TYPE_CHECKING:
    from anndata import AnnData

    from ...hub import ResolvedModel

__all__ = ["impute_resolved"]


def _decoder_batch(adata: AnnData, key: str | None, n_batches: int) -> np.ndarray | None:
    """Integer ids into the decoder's batch table, read from ``adata.obs[key]``."""
    if key is None:
        return None
    if n_batches == 0:
        raise ValueError(
            "decoder_batch_key was given, but this checkpoint's decoder has no batch table "
            "(batch_num=0); leave decoder_batch_key=None."
        )
    if key not in adata.obs.columns:
        raise KeyError(
            f"decoder_batch_key {key!r} is not a column of adata.obs (columns: "
            f"{list(adata.obs.columns)})."
        )
    values = adata.obs[key]
    if isinstance(values.dtype, pd.CategoricalDtype):
        values = values.astype(object)
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
    bad = ~np.isfinite(numbers) | (numbers != np.round(numbers))
    bad |= (numbers < 0) | (numbers >= n_batches)
    if bad.any():
        first = adata.obs_names[np.flatnonzero(bad)[0]]
        raise InputError(
            f"adata.obs[{key!r}] must hold integer ids into the decoder's batch table, in "
            f"[0, {n_batches}); cell {first!r} has {values.loc[first]!r}. These ids select the "
            "batch embeddings the model learned in pretraining; leave decoder_batch_key=None to "
            "decode without a batch effect."
        )
    return numbers.astype(np.int64)


def impute_resolved(
    resolved: ResolvedModel,
    adata: AnnData,
    *,
    layer: str | None = None,
    gene_key: str | None = None,
    max_length: int | None = None,
    random_state: int | None = 0,
    device: str | torch.device = "cpu",
    batch_key: str | None = None,
    decoder_batch_key: str | None = None,
    sample: bool = False,
    rescale: bool = True,
    random_stream: RandomStream = "cell",
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, Any]]:
    """Denoise the cells of ``adata`` with a located CellPLM checkpoint (``sft.tl.impute``).

    Each sequence (the cells of one ``batch_key`` value, cut at ``max_length`` cells) runs
    through the encoder and the latent layer (the most likely mixture component, or a draw with
    ``sample``); the NB decoder, given the ``decoder_batch_key`` ids or no batch at all, gives
    each cell's expected counts. With ``rescale`` the means of the genes the model knows are
    scaled to the cell's observed total over those genes (the official denoising output);
    genes the model does not know are NaN. With ``sample``, the draws come from each cell's own
    stream (``random_stream="cell"``, default: a cell's draw does not depend on the other cells
    or their order), or, with ``random_stream="official"``, from one stream over the sequences
    in order: ``random_state`` then reproduces the official model's forward pass after
    ``torch.manual_seed(random_state)`` on CPU.

    Returns the denoised matrix ``(n_obs, n_vars)``, the var columns to write (``dispersion``:
    the NB dispersion per gene, NaN where unknown) and what to record in ``uns[key]["params"]``.
    """
    codes, _ = batch_codes(adata, batch_key)
    rows_list = sequence_rows(codes, max_length)
    module, gene_list, _, report = load_cellplm(resolved)
    covariate = _decoder_batch(adata, decoder_batch_key, module.config["batch_num"])
    if any(k.startswith("decoder.") for k in report.missing):
        raise ValueError(
            f"the checkpoint {resolved.name} has no decoder weights (an embedder-only "
            "checkpoint), so it cannot reconstruct expression."
        )
    match = match_adata_genes(adata, gene_list, gene_key=gene_key, caller="impute")
    cols = np.flatnonzero(match.matched)
    ids = match.index[cols]
    dev = _device(device)
    seed = resolve_seed(random_state) if sample else None
    draws = sample_draws(module, seed, random_stream, sample=sample, pipeline=False)
    out = np.full(adata.shape, np.nan, dtype=np.float32)
    X = get_matrix(adata, layer)
    was_training = module.training
    module.to(dev).eval()
    try:
        for rows, counts in iter_sequences(X, rows_list, match, module.n_genes):
            extra = draws(counts)
            counts = counts.to(dev)
            batch = None if covariate is None else torch.from_numpy(covariate[rows]).to(dev)
            with torch.inference_mode():
                z = module.inference(counts, sample=sample, **extra)["z"]
                mean = module.generative(z, batch=batch)["mean"][:, torch.from_numpy(ids).to(dev)]
                if rescale:
                    observed = torch.sparse.sum(counts, dim=1).to_dense().unsqueeze(1)
                    mean = mean / mean.sum(1, keepdim=True) * observed
            out[np.ix_(rows, cols)] = mean.float().cpu().numpy()
        with torch.inference_mode():
            disp = module.decoder.out_layer.dispersion().cpu().numpy()
    finally:
        module.train(was_training)
    dispersion = np.full(adata.n_vars, np.nan, dtype=np.float32)
    dispersion[cols] = disp[ids]
    params = {
        "n_genes_matched": int(match.n_matched),
        "batch_key": batch_key,
        "decoder_batch_key": decoder_batch_key,
        "max_length": max_length,
        "n_sequences": len(rows_list),
        "sample": bool(sample),
        "random_state": seed,
        "random_stream": random_stream if sample else None,
        "rescale": bool(rescale),
    }
    return out, {"dispersion": dispersion}, params
