"""scBERT cell embeddings: the mean of the per-gene encodings of the pretrained model.

scBERT publishes no cell-embedding function; the usual choice (and the fixture's
``cell_emb_mean``) is the mean over the model's genes of the final encodings
(``PerformerLM(..., return_encodings=True)[:, :-1].mean(1)``), the padding position excluded.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from ..._anndata import DEFAULT_CHUNK_SIZE, row_blocks
from ...pp._match_genes import GeneMatch, as_gene_match
from ..base._streaming import as_device, gather_blocks, iter_minibatches, run_minibatches
from ._module import SCBERTModule
from ._tokenizer import SCBERTTokenizer

if TYPE_CHECKING:
    pass

__all__ = [
    "cells_per_pass",
    "embed_matrix",
    "iter_embeddings",
    "iter_probabilities",
]

logger = logging.getLogger("scfm_tools")

# Tokens per forward pass: bounds the (cells, seq_len, heads * dim_head) q/k/v activations
# (~1 GiB in float32 at the published size on CPU).
_TOKENS_PER_PASS = {"cpu": 1 << 17, "cuda": 1 << 20}
# The official preprocess.py drops cells with fewer expressed genes (sc.pp.filter_cells); the
# rule is meant for genome-wide gene lists, so small (test) models are not warned about it.
_OFFICIAL_MIN_GENES = 200
_GENOME_WIDE = 10 * _OFFICIAL_MIN_GENES


def cells_per_pass(batch_size: int, seq_len: int, device: torch.device) -> int:
    """Cells per forward pass: ``batch_size``, capped so that activations stay bounded."""
    budget = _TOKENS_PER_PASS.get(device.type, _TOKENS_PER_PASS["cpu"])
    return max(1, min(batch_size, budget // seq_len))


@contextlib.contextmanager
def _key_max(module: SCBERTModule, key_max: str | None):
    """Override the module's FAVOR+ key stabiliser extent for the run, then restore it."""
    old_key_max = module.performer.key_max
    if key_max is not None:
        module.performer.key_max = key_max
    try:
        yield
    finally:
        module.performer.key_max = old_key_max


def _iter_outputs(
    module: SCBERTModule,
    tokenizer: SCBERTTokenizer,
    blocks: Iterable,
    *,
    fn: Callable[[torch.Tensor], torch.Tensor],
    width: int,
    batch_size: int,
    device: str | torch.device,
    key_max: str | None,
    n_cells: int | None,
) -> Iterator[np.ndarray]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    dev = as_device(device)
    step = cells_per_pass(batch_size, module.seq_len, dev)
    n_sparse = 0

    def split(block, dev: torch.device):
        # Every cell reads all of the model's genes: minibatches of equal length, in row order.
        nonlocal n_sparse
        counts = tokenizer.reindex(block)
        if module.n_genes >= _GENOME_WIDE:
            n_sparse += int((np.diff(counts.indptr) < _OFFICIAL_MIN_GENES).sum())
        passes = (
            (
                np.arange(start, min(start + step, counts.shape[0])),
                tokenizer.tokens_from_counts(counts[start : start + step]).to(dev),
            )
            for start in range(0, counts.shape[0], step)
        )
        return counts.shape[0], passes

    with _key_max(module, key_max):
        batches = iter_minibatches(
            module, blocks, split, device=dev, n_cells=n_cells, desc="scBERT"
        )
        yield from gather_blocks(run_minibatches(batches, fn, device=dev), (width,))
    if n_sparse:
        logger.warning(
            "%d cells express fewer than %d of the model's genes; the official scBERT "
            "preprocessing drops such cells (sc.pp.filter_cells(min_genes=200)), so their "
            "outputs are outside what the model was trained on.",
            n_sparse,
            _OFFICIAL_MIN_GENES,
        )


def iter_embeddings(
    module: SCBERTModule,
    tokenizer: SCBERTTokenizer,
    blocks: Iterable,
    *,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    key_max: Literal["sample", "batch"] | None = None,
    n_cells: int | None = None,
) -> Iterator[np.ndarray]:
    """Embed consecutive blocks of cells; yields one ``(n_block, dim)`` float32 array per block.

    Parameters
    ----------
    module
        The scBERT module (moved to ``device`` and put in eval mode for the run; its training
        flag is restored afterwards).
    tokenizer
        Maps the blocks' columns onto the model's genes.
    blocks
        Cells x genes raw-count blocks (dense or sparse).
    batch_size
        Most cells per forward pass (fewer when a pass would hold too many tokens).
    device
        Where to run.
    key_max
        Override the module's FAVOR+ key stabiliser extent for this run; with ``"batch"``
        a cell's embedding depends on the other cells of its forward pass.
    n_cells
        Cells in all the blocks, when known: the total of the progress bar.

    Yields
    ------
    Mean encodings over the model's genes, one row per cell of the block.
    """
    return _iter_outputs(
        module,
        tokenizer,
        blocks,
        fn=module.cell_embedding,
        width=module.dim,
        batch_size=batch_size,
        device=device,
        key_max=key_max,
        n_cells=n_cells,
    )


def iter_probabilities(
    module: SCBERTModule,
    tokenizer: SCBERTTokenizer,
    blocks: Iterable,
    *,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    n_cells: int | None = None,
) -> Iterator[np.ndarray]:
    """Class probabilities of a fine-tuned model, one ``(n_block, n_classes)`` array per block.

    Parameters are those of :func:`iter_embeddings`; the module needs the classifier head.

    Yields
    ------
    Softmax probabilities (official ``predict.py``), one row per cell of the block.
    """
    if not module.is_classifier:
        raise ValueError(
            "this scBERT model has the pretraining head, so it cannot annotate cells: fine-tune "
            "it first (e.g. `sft.tl.annotate(..., reference=ref, label_key=...)`), or load a "
            "fine-tuned checkpoint."
        )
    return _iter_outputs(
        module,
        tokenizer,
        blocks,
        fn=module.predict_proba,
        width=module.n_classes,
        batch_size=batch_size,
        device=device,
        key_max=None,
        n_cells=n_cells,
    )


def embed_matrix(
    module: SCBERTModule,
    X,
    var_names: Sequence[str] | GeneMatch,
    genes: Sequence[str] | None = None,
    *,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    key_max: Literal["sample", "batch"] | None = None,
) -> np.ndarray:
    """Embed the cells of a cells x genes count matrix with scBERT.

    Cells go through the official tokenization (:class:`SCBERTTokenizer`) and the pretrained
    model; each embedding is the mean of the final encodings over the model's genes. Runs
    under :func:`torch.inference_mode` (bf16 autocast on CUDA), streaming ``chunk_size`` cells
    at a time; with the module's default ``key_max="sample"``, a cell's embedding does not
    depend on ``batch_size``, ``chunk_size`` or the other cells.

    Parameters
    ----------
    module
        The scBERT module, e.g. from :func:`load_scbert_checkpoint`.
    X
        Cells x genes raw counts: a numpy array, a scipy sparse matrix, or anything whose row
        slices are one (e.g. a backed AnnData's ``X``).
    var_names
        Gene symbols of the columns, or a :class:`~scfm_tools.pp.GeneMatch` against
        ``genes`` computed already.
    genes
        The model's gene list (needed unless ``var_names`` is a ``GeneMatch``).
    batch_size
        Most cells per forward pass.
    device
        Where to run.
    chunk_size
        Cells read from ``X`` at a time.
    key_max
        Override the FAVOR+ key stabiliser extent (see :class:`scfm_tools.nn.Performer`).

    Returns
    -------
    ``(n_cells, dim)`` float32 array, in the order of ``X``.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
    match = as_gene_match(var_names, None if genes is None else list(genes), n_columns=X.shape[1])
    if match.n_matched == 0:
        raise ValueError(
            "none of the genes is in the model's gene list; var_names must be gene symbols."
        )
    tokenizer = SCBERTTokenizer.from_match(match, module.n_genes, bin_num=module.num_tokens - 2)

    blocks = row_blocks(X, chunk_size=chunk_size)
    parts = list(
        iter_embeddings(
            module,
            tokenizer,
            blocks,
            batch_size=batch_size,
            device=device,
            key_max=key_max,
            n_cells=X.shape[0],
        )
    )
    if not parts:
        return np.empty((0, module.dim), dtype=np.float32)
    return np.concatenate(parts)
