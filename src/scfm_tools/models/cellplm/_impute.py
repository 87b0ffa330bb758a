"""Denoised expression from CellPLM's negative-binomial decoder, sequence by sequence."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from ..._anndata import iter_row_blocks
from ..._validation import InputError
from ._embed import SequenceInputs, run_sequences

if TYPE_CHECKING:
    from anndata import AnnData

    from ...pp._match_genes import GeneMatch
    from ._module import CellPLMModule

__all__ = ["decoder_batch_ids", "denoise_sequences", "posterior_mean"]


def decoder_batch_ids(adata: AnnData, key: str | None, n_batches: int) -> np.ndarray | None:
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


def denoise_sequences(
    module: CellPLMModule,
    X,
    sequences: list[np.ndarray],
    match: GeneMatch,
    *,
    covariate: np.ndarray | None,
    sample: bool,
    draws: Callable[[torch.Tensor], dict[str, Any]],
    rescale: bool,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray]:
    """Run each sequence of cells through CellPLM and its NB decoder.

    Each sequence (rows of ``X``) runs through the encoder and the latent layer (the most likely
    mixture component, or a draw with ``sample``: ``draws(counts)`` gives the keywords of
    ``module.inference`` for a sequence, see :func:`sample_draws`); the NB decoder, given the
    ``covariate`` ids or no batch at all, gives each cell's expected counts. With ``rescale``
    the means of the genes the model knows are scaled to the cell's observed total over those
    genes (the official denoising output).

    Returns
    -------
    ``(denoised, dispersion)``: ``(n_cells, n_matched)`` expected counts of the matched genes
    (``var`` order) and their NB dispersions.
    """
    cols = np.flatnonzero(match.matched)
    ids = torch.from_numpy(match.index[cols]).to(device)

    def forward(inputs: SequenceInputs) -> torch.Tensor:
        z = module.inference(inputs.counts, sample=sample, **inputs.draws)["z"]
        mean = module.generative(z, batch=inputs.batch)["mean"][:, ids]
        if rescale:
            observed = inputs.counts.sum(dim=1).to_dense().unsqueeze(1)  # sparse or dense
            mean = mean / mean.sum(1, keepdim=True) * observed
        return mean

    out = run_sequences(
        module,
        X,
        sequences,
        match,
        forward,
        cols.size,
        device=device,
        draws=draws,
        covariate=covariate,
    )
    with torch.inference_mode():
        dispersion = module.decoder.out_layer.dispersion()[ids].cpu().numpy()
    return out, dispersion


def posterior_mean(
    out: np.ndarray,
    means: np.ndarray,
    X,
    cols: np.ndarray,
    dispersion: np.ndarray,
    *,
    chunk_size: int = 256,
) -> None:
    """Write the posterior means of the observed counts into ``out`` (SAVER-style), in place.

    The decoder says a gene's count in a cell is negative binomial: Poisson around an
    expression level drawn from a gamma with mean ``mu`` (the decoder's mean) and shape
    ``theta`` (its dispersion). Given the count ``x`` actually observed, the expected level is
    ``mu * (x + theta) / (mu + theta)``: close to ``x`` where the decoder is unsure (small
    ``theta``), close to ``mu`` where it is sure or the cell is shallow. So the observed counts
    are denoised rather than replaced, as SAVER (Huang et al. 2018) does with its own prior.
    A gene the model does not know has no prior: its posterior mean is the observed count.

    Parameters
    ----------
    out
        ``(n_cells, n_vars)`` result: columns ``cols`` get the posterior means, the others
        the observed counts.
    means
        ``(n_cells, len(cols))`` decoder means at the cell's observed depth.
    X
        The observed counts, cells x all genes (dense or sparse, row-sliceable), read once.
    cols
        The columns of ``X`` that ``means`` holds, in its order.
    dispersion
        ``(len(cols),)`` NB dispersions (``theta``, positive).
    chunk_size
        Rows densified at a time.
    """
    theta = np.asarray(dispersion, dtype=means.dtype)
    for start, block in iter_row_blocks(X, chunk_size=chunk_size, views=True):
        x = block.toarray() if hasattr(block, "toarray") else np.asarray(block)
        stop = start + x.shape[0]
        out[start:stop] = x
        mu = means[start:stop]
        out[start:stop, cols] = mu * ((x[:, cols] + theta) / (mu + theta))
