"""Zero-shot scGPT cell embeddings on a cells x genes matrix (official ``embed_data`` path)."""

from __future__ import annotations

import logging
from collections.abc import Generator, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ..._anndata import DEFAULT_CHUNK_SIZE, resolve_seed, row_blocks
from ..._cell_rng import RandomStream
from ..._docs import DOC_RANDOM_STREAM, doc_params
from ...pp._match_genes import GeneMatch, as_gene_match, match_to_vocab
from .._length_batches import length_batches
from ..base._streaming import Minibatch, gather_blocks, iter_minibatches, run_minibatches
from ._module import SCGPTModule
from ._tokenizer import OFFICIAL_N_BINS, CellTokenizer, pad_cells

__all__ = [
    "embed_matrix",
    "iter_embeddings",
    "iter_token_batches",
    "token_batches",
]

logger = logging.getLogger("scfm_tools")


def _gene_index(var_names: Sequence[str] | GeneMatch, vocab: dict[str, int]) -> np.ndarray:
    match = var_names if isinstance(var_names, GeneMatch) else match_to_vocab(var_names, vocab)
    if match.n_matched == 0:
        raise ValueError(
            "none of the genes is in the scGPT vocabulary; var_names must be gene symbols "
            "(or Ensembl IDs) of the model's species."
        )
    return np.asarray(match.index, dtype=np.int64)


def iter_token_batches(
    module: SCGPTModule,
    vocab: dict[str, int],
    args: dict[str, Any],
    blocks: Iterable,
    var_names: Sequence[str] | GeneMatch,
    *,
    batch_size: int = 64,
    max_length: int | None = None,
    n_bins: int = OFFICIAL_N_BINS,
    random_state: int | None = 0,
    random_stream: RandomStream = "cell",
    device: str | torch.device = "cpu",
    n_cells: int | None = None,
) -> Iterator[Minibatch]:
    """Tokenize consecutive blocks of cells into length-sorted minibatches on the device.

    The input side shared by every scGPT pass over cells (cell embeddings, context-aware gene
    embeddings): cells tokenized as the official ``embed_data`` does (see
    :class:`CellTokenizer`), sorted by length within each block so that minibatches carry
    little padding. While the iterator runs, ``module`` is on ``device`` in eval mode; its
    training flag is restored when the iterator ends or is closed. The parameters are those of
    :func:`iter_embeddings`.

    Yields
    ------
    :class:`~scfm_tools.models.base._streaming.Minibatch` es (``inputs``: ``gene_ids``,
    ``values`` and ``padding_mask``, ``<cls>`` first), block after block, every cell of a
    block in exactly one of them;
    an empty block gives one batch with no rows and no tensors.
    """
    pad_token = args.get("pad_token", "<pad>")
    for token in ("<cls>", pad_token):
        if token not in vocab:
            raise ValueError(f"the vocabulary has no {token!r} token.")
    pad_id, pad_value = vocab[pad_token], float(args.get("pad_value", -2))
    max_length = int(args.get("max_seq_len", 1200)) if max_length is None else int(max_length)
    tokenizer = CellTokenizer(
        _gene_index(var_names, vocab),
        cls_id=vocab["<cls>"],
        pad_value=pad_value,
        max_length=max_length,
        n_bins=n_bins,
        random_state=resolve_seed(random_state),
        random_stream=random_stream,
    )
    n_empty = yield from token_batches(
        module,
        tokenizer,
        blocks,
        pad_id=pad_id,
        pad_value=pad_value,
        batch_size=batch_size,
        device=device,
        n_cells=n_cells,
    )
    if n_empty:
        logger.warning(
            "%d cells express no gene of the vocabulary; they are read as <cls> alone.",
            n_empty,
        )


def token_batches(
    module: SCGPTModule,
    tokenizer: CellTokenizer,
    blocks: Iterable,
    *,
    pad_id: int,
    pad_value: float,
    batch_size: int,
    device: str | torch.device = "cpu",
    n_cells: int | None = None,
) -> Generator[Minibatch, None, int]:
    """Tokenize blocks with ``tokenizer`` into length-sorted, padded minibatches on the device.

    scGPT's minibatching in the shared streaming loop
    (:func:`~scfm_tools.models.base._streaming.iter_minibatches`), for callers that build their
    own tokenizer (e.g. attention over a chosen subset of genes). ``module`` is moved to
    ``device`` and kept in eval mode while the generator runs; its training flag is restored
    when it ends or is closed. ``n_cells`` (the cells in all blocks, when known) is the progress
    bar's total.

    Yields
    ------
    :class:`~scfm_tools.models.base._streaming.Minibatch` es whose ``inputs`` are
    ``gene_ids``, ``values`` and ``padding_mask`` (``<cls>`` first), block after block.

    Returns
    -------
    The number of cells read as ``<cls>`` alone (no gene of the tokenizer's).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    n_empty = 0

    def split(block, dev: torch.device):
        nonlocal n_empty
        cells = tokenizer(block)
        lengths = np.fromiter((len(ids) for ids, _ in cells), dtype=np.int64, count=len(cells))
        n_empty += int((lengths == 1).sum())

        def passes():
            for rows in length_batches(lengths, batch_size):
                batch = pad_cells([cells[i] for i in rows], pad_id=pad_id, pad_value=pad_value)
                yield rows, {k: v.to(dev, non_blocking=True) for k, v in batch.items()}

        return len(cells), passes()

    yield from iter_minibatches(module, blocks, split, device=device, n_cells=n_cells, desc="scGPT")
    return n_empty


@doc_params(random_stream=DOC_RANDOM_STREAM)
def iter_embeddings(
    module: SCGPTModule,
    vocab: dict[str, int],
    args: dict[str, Any],
    blocks: Iterable,
    var_names: Sequence[str] | GeneMatch,
    *,
    batch_size: int = 64,
    max_length: int | None = None,
    n_bins: int = OFFICIAL_N_BINS,
    random_state: int | None = 0,
    random_stream: RandomStream = "cell",
    device: str | torch.device = "cpu",
    n_cells: int | None = None,
) -> Iterator[np.ndarray]:
    """Embed consecutive blocks of cells; yields one ``(n_block, d_model)`` array per block.

    With the default ``random_stream="cell"`` a cell's embedding depends on that cell alone, so
    blocks may come in any order or from several files. With ``"official"`` the random streams
    of :class:`CellTokenizer` run across blocks, which must then come in dataset order (feeding
    the row chunks of a backed AnnData gives the same result as one matrix). Within a block,
    cells are sorted by length into minibatches (little padding) and the results put back in
    block order.

    Parameters
    ----------
    module
        The scGPT module (moved to ``device`` and put in eval mode for the run; its training
        flag is restored afterwards).
    vocab
        Token -> id vocabulary with ``<cls>`` and the ``args["pad_token"]`` token.
    args
        The checkpoint's ``args.json`` (``pad_token``, ``pad_value``, ``max_seq_len`` are read).
    blocks
        Cells x genes blocks (dense or sparse), columns in ``var_names`` order.
    var_names
        Gene names of the columns, or a :class:`~scfm_tools.pp.GeneMatch` computed already.
    batch_size
        Cells per forward pass.
    max_length
        Longest token sequence (``<cls>`` included); ``None`` uses ``args["max_seq_len"]``
        (1200 when absent, as the official ``embed_data`` default).
    n_bins
        Value bins; the official embedding path always uses 51.
    random_state
        Seed of the binning tie-breaks and the subsampling; ``None`` uses
        ``sft.settings.seed``. With ``random_stream="official"``, ``0`` reproduces the official
        ``embed_data`` run after ``np.random.seed(0)``.
    {random_stream}
    device
        Where to run (``"auto"`` picks a GPU when there is one).
    n_cells
        Cells in all the blocks, when known: the total of the progress bar.

    Yields
    ------
    L2-normalised ``<cls>`` embeddings, float32, one row per cell of the block.
    """
    batches = iter_token_batches(
        module,
        vocab,
        args,
        blocks,
        var_names,
        batch_size=batch_size,
        max_length=max_length,
        n_bins=n_bins,
        random_state=random_state,
        random_stream=random_stream,
        device=device,
        n_cells=n_cells,
    )
    results = run_minibatches(
        batches,
        lambda inputs: module.cell_embedding(**inputs, normalize=True),
        device=device,
    )
    yield from gather_blocks(results, (module.d_model,))


@doc_params(random_stream=DOC_RANDOM_STREAM)
def embed_matrix(
    module: SCGPTModule,
    vocab: dict[str, int],
    args: dict[str, Any],
    X,
    var_names: Sequence[str] | GeneMatch,
    *,
    batch_size: int = 64,
    max_length: int | None = None,
    n_bins: int = OFFICIAL_N_BINS,
    random_state: int | None = 0,
    random_stream: RandomStream = "cell",
    device: str | torch.device = "cpu",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> np.ndarray:
    """Zero-shot scGPT cell embeddings of a cells x genes count matrix.

    The official ``scgpt.tasks.embed_data`` path: genes matched to the vocabulary, per cell
    the expressed in-vocabulary genes with ``<cls>`` first, per-cell quantile binning of the raw
    counts, subsampling above ``max_length``, the transformer, the ``<cls>`` output
    L2-normalised. Runs under :func:`torch.inference_mode` (bf16 autocast on CUDA), streaming
    ``chunk_size`` cells at a time; a cell's embedding does not depend on ``batch_size`` or
    ``chunk_size`` and, with the default ``random_stream="cell"``, not on the other cells
    either (a subset, another order or the same cells in two files give the same vectors).

    Parameters
    ----------
    module
        The scGPT module, e.g. from :func:`load_scgpt_checkpoint`.
    vocab
        Token -> id vocabulary.
    args
        The checkpoint's ``args.json``.
    X
        Cells x genes raw counts: a numpy array, a scipy sparse matrix, or anything whose row
        slices are one (e.g. a backed AnnData's ``X``).
    var_names
        Gene names of the columns (symbols or Ensembl IDs), or a
        :class:`~scfm_tools.pp.GeneMatch`.
    batch_size
        Cells per forward pass.
    max_length
        Longest token sequence (``<cls>`` included); ``None`` uses ``args["max_seq_len"]``.
    n_bins
        Value bins; the official embedding path always uses 51.
    random_state
        Seed of the binning tie-breaks and the subsampling (``None``: ``sft.settings.seed``).
        With ``random_stream="official"``, ``0`` reproduces the official ``embed_data`` run
        after ``np.random.seed(0)``.
    {random_stream}
    device
        Where to run.
    chunk_size
        Cells tokenized and held at a time.

    Returns
    -------
    ``(n_cells, d_model)`` float32 array of unit-norm embeddings, in the order of ``X``.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
    n_cells = X.shape[0]
    match = as_gene_match(var_names, vocab, n_columns=X.shape[1])
    blocks = row_blocks(X, chunk_size=chunk_size)
    out = np.empty((n_cells, module.d_model), dtype=np.float32)
    start = 0
    for emb in iter_embeddings(
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
        n_cells=n_cells,
    ):
        out[start : start + len(emb)] = emb
        start += len(emb)
    return out
