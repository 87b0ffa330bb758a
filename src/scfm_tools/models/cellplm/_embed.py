"""Zero-shot CellPLM cell embeddings (official ``CellEmbeddingPipeline.predict`` path).

CellPLM reads a cell in the context of the other cells of its sequence (the cells of one sample,
attending to each other), so a cell's embedding depends on which cells share its sequence, by
design; not on their order (the encoder has no positions). With ``sample=True`` the mixture
component is drawn at random: by default (``random_stream="cell"``) from each cell's own stream
(:func:`cell_noise`), so the draw follows the cell, whatever its position in the sequence or
the sequences around it; ``random_stream="official"`` reproduces the official run, whose one
global stream runs over the sequences and their cells in order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from ..._anndata import resolve_seed
from ..._cell_rng import (
    STREAM_COMPONENT,
    STREAM_GAUSSIAN,
    RandomStream,
    cell_keys,
    cell_normal,
    cell_uniform,
    check_random_stream,
)
from ..._docs import DOC_RANDOM_STREAM, doc_params
from ...pp._match_genes import GeneMatch, as_gene_match
from ..base._streaming import as_device, gather_blocks, iter_minibatches, run_minibatches
from ._module import CellNoise, CellPLMModule
from ._sequences import iter_sequences, sequence_rows

if TYPE_CHECKING:
    pass

__all__ = ["cell_noise", "embed_matrix", "official_generator", "run_sequences", "sample_draws"]

logger = logging.getLogger("scfm_tools")

# Share of stored entries (over cells x model genes) from which a sequence goes to the model as
# a dense tensor (see to_model_genes): deep plate-based cells fill 30-50%, 10x cells 2-7%.
DENSE_INPUT_FROM = 0.2


def official_generator(seed: int, *, pipeline: bool) -> torch.Generator:
    """Return a CPU generator in the state the official run's global one has at its first draw.

    The draws come from this private stream, not torch's global one, so results depend neither
    on the device nor on other code using the global RNG. After ``torch.manual_seed(seed)``,
    the official pipelines (``pipeline=True``) iterate a :class:`torch.utils.data.DataLoader`,
    whose iterator takes one int64 base seed from the global generator before the model runs;
    a direct forward pass of the model (``pipeline=False``) draws nothing before the latent
    layer.

    Parameters
    ----------
    seed
        The seed given to ``torch.manual_seed`` in the official run.
    pipeline
        Skip the DataLoader's draw.

    Returns
    -------
    The seeded CPU generator.
    """
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    if pipeline:
        torch.empty((), dtype=torch.int64).random_(generator=generator)
    return generator


def cell_noise(counts: torch.Tensor, seed: int, n_clusters: int, latent_dim: int) -> CellNoise:
    """Per-cell draws for the latent layer, each cell's from its own stream.

    A cell's stream is keyed by ``seed`` and the cell's counts on the model's genes
    (:mod:`scfm_tools._cell_rng`), so its draws do not depend on the other cells of the
    sequence, their order, or how the data is split.

    Parameters
    ----------
    counts
        Counts of one sequence on the model's genes, on the CPU: a coalesced sparse COO or a
        dense tensor (:func:`~scfm_tools.models.cellplm._sequences.to_model_genes`).
    seed
        The run's seed.
    n_clusters
        Mixture components of the latent layer.
    latent_dim
        Width of the latent layer.

    Returns
    -------
    The uniform and normal draws, float32, one row per cell.
    """
    if counts.layout == torch.strided:
        index = counts.nonzero().T
        values = counts[index[0], index[1]].numpy()
        index = index.numpy()
    else:
        index, values = counts.indices().numpy(), counts.values().numpy()
    keys = cell_keys(seed, index[0], index[1], values, counts.shape[0])
    uniform = cell_uniform(keys, n_clusters, STREAM_COMPONENT, dtype=np.float32)
    normal = cell_normal(keys, latent_dim, STREAM_GAUSSIAN).astype(np.float32)
    return CellNoise(torch.from_numpy(uniform), torch.from_numpy(normal))


def sample_draws(
    module: CellPLMModule,
    random_state: int | None,
    random_stream: RandomStream,
    *,
    sample: bool,
    pipeline: bool,
) -> Callable[[torch.Tensor], dict[str, Any]]:
    """Return ``draws(counts)``: the keywords of ``module.inference`` for one sequence's draws.

    Without ``sample`` there are none; ``"official"``: one generator, shared by every sequence
    in turn (:func:`official_generator`, with ``pipeline``); ``"cell"``: :func:`cell_noise` of
    each sequence (``counts`` on the CPU).
    """
    check_random_stream(random_stream)
    if not sample:
        return lambda counts: {}
    seed = resolve_seed(random_state)
    if random_stream == "official":
        generator = official_generator(seed, pipeline=pipeline)
        return lambda counts: {"generator": generator}
    n_clusters, latent_dim = module.latent.gmvae.n_clusters, module.n_latent
    return lambda counts: {"noise": cell_noise(counts, seed, n_clusters, latent_dim)}


class SequenceInputs(NamedTuple):
    """One CellPLM sequence on the device: its cells' counts, draws and decoder batch ids."""

    counts: torch.Tensor
    """Sparse ``(cells, n_genes)`` counts on the model's genes."""
    draws: dict[str, Any]
    """Keywords of ``module.inference`` for the sequence's random draws."""
    batch: torch.Tensor | None
    """Decoder batch ids of the cells, or ``None``."""


def sequence_split(
    sequences: list[np.ndarray],
    match: GeneMatch,
    n_genes: int,
    draws: Callable[[torch.Tensor], dict[str, Any]],
    *,
    covariate: np.ndarray | None = None,
    inspect: Callable[[np.ndarray, torch.Tensor], None] | None = None,
):
    """CellPLM's minibatching in the shared streaming loop: one sequence of cells per pass.

    The whole matrix is one block (a sample's cells attend to each other, so a sequence cannot
    be cut at a row block); each pass is one sequence (a sample, or a ``max_cells`` chunk of
    one), read from the rows of ``X`` it names.

    Parameters
    ----------
    sequences
        Row indices of each sequence (:func:`~scfm_tools.models.cellplm._sequences.sequence_rows`).
    match
        The data's genes matched to the model's.
    n_genes
        The model's number of genes.
    draws
        ``draws(counts)``: the sequence's random draws (:func:`sample_draws`).
    covariate
        Decoder batch id of each row, or ``None``.
    inspect
        Called with each sequence's rows and CPU counts (e.g. to count empty cells).

    Returns
    -------
    A split function for :func:`~scfm_tools.models.base._streaming.iter_minibatches`.
    """

    def split(X, dev: torch.device):
        def passes():
            for rows, counts in iter_sequences(
                X, sequences, match, n_genes, dense_from=DENSE_INPUT_FROM
            ):
                if inspect is not None:
                    inspect(rows, counts)
                batch = None if covariate is None else torch.from_numpy(covariate[rows]).to(dev)
                yield rows, SequenceInputs(counts.to(dev), draws(counts), batch)

        return X.shape[0], passes()

    return split


def run_sequences(
    module: CellPLMModule,
    X,
    sequences: list[np.ndarray],
    match: GeneMatch,
    forward: Callable[[SequenceInputs], torch.Tensor],
    width: int,
    *,
    device: torch.device,
    draws: Callable[[torch.Tensor], dict[str, Any]] = lambda counts: {},
    covariate: np.ndarray | None = None,
    inspect: Callable[[np.ndarray, torch.Tensor], None] | None = None,
) -> np.ndarray:
    """Run ``forward`` on each sequence of ``X`` (eval mode, inference mode); cells in order.

    Parameters
    ----------
    module
        The CellPLM module (in eval mode for the run; its training flag is restored).
    X
        Cells x genes counts.
    sequences
        Row indices of each sequence.
    match
        The data's genes matched to the model's.
    forward
        The forward pass on one sequence's :class:`SequenceInputs`: ``(cells, width)``.
    width
        Width of one cell's output.
    device
        Where to run.
    draws, covariate, inspect
        As in :func:`sequence_split`.

    Returns
    -------
    ``(n_cells, width)`` float32, in the order of ``X``.
    """
    split = sequence_split(
        sequences, match, module.n_genes, draws, covariate=covariate, inspect=inspect
    )
    batches = iter_minibatches(
        module, [X], split, device=device, n_cells=X.shape[0], desc="CellPLM"
    )
    # sparse inputs: no mixed precision
    results = run_minibatches(batches, forward, device=device, mixed_precision=False)
    return next(gather_blocks(results, (width,)))


@doc_params(random_stream=DOC_RANDOM_STREAM)
def embed_matrix(
    module: CellPLMModule,
    gene_list: Sequence[str],
    X,
    var_names: Sequence[str] | GeneMatch,
    *,
    batch: Sequence | np.ndarray | None = None,
    max_cells: int | None = None,
    sample: bool = False,
    random_state: int | None = 0,
    random_stream: RandomStream = "cell",
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """CellPLM cell embeddings of a cells x genes count matrix.

    The official zero-shot path: genes matched to the model's gene list (unmatched genes
    dropped), one sequence per batch value (sorted order; all cells when ``batch`` is ``None``)
    cut into chunks of ``max_cells``, ``log1p`` counts through the embedder, the Flowformer
    across the cells of the sequence, the Gaussian-mixture latent layer; the embedding is the
    mean of ``q(z|x,y)``. Runs under :func:`torch.inference_mode`. A cell is read in the context
    of the other cells of its sequence (see the module documentation): its embedding depends on
    them, not on their order.

    Parameters
    ----------
    module
        The CellPLM module, e.g. from :func:`load_cellplm_checkpoint` (put in eval mode for
        the run; its training flag is restored afterwards).
    gene_list
        The model's genes (Ensembl IDs), in the module's gene order.
    X
        Cells x genes raw counts (dense, sparse, or anything whose row selections are).
    var_names
        Gene names of the columns (Ensembl IDs or symbols, matched offline), or a
        :class:`~scfm_tools.pp.GeneMatch` computed already.
    batch
        Sample of each cell (cells of one sample form a sequence); ``None``: one sample.
    max_cells
        Most cells per sequence; ``None`` keeps each sample whole (the official default).
    sample
        Draw the mixture component as the official model does in eval mode (random);
        ``False`` takes the most likely component (deterministic).
    random_state
        Seed of the draws with ``sample=True`` (``None``: ``sft.settings.seed``). With
        ``random_stream="official"``, ``s`` reproduces the official
        ``CellEmbeddingPipeline.predict`` run on CPU after ``torch.manual_seed(s)`` (see
        :func:`official_generator`).
    {random_stream}
        With ``sample=True`` only.
    device
        Where to run.

    Returns
    -------
    ``(n_cells, post_latent_dim)`` float32 embeddings, in the order of ``X``.
    """
    match = as_gene_match(var_names, gene_list, n_columns=X.shape[1])
    if match.n_matched == 0:
        raise ValueError(
            "none of the genes is in the CellPLM gene list; var_names must be human Ensembl IDs "
            "or gene symbols."
        )
    n_cells = X.shape[0]
    if batch is None:
        codes = np.zeros(n_cells, dtype=np.int64)
    else:
        batch = np.asarray(batch)
        if len(batch) != n_cells:
            raise ValueError(f"batch has {len(batch)} entries but X has {n_cells} rows.")
        codes = np.unique(batch, return_inverse=True)[1].astype(np.int64)
    dev = as_device(device)
    draws = sample_draws(module, random_state, random_stream, sample=sample, pipeline=True)
    n_empty = 0

    def count_empty(rows: np.ndarray, counts: torch.Tensor) -> None:
        nonlocal n_empty
        if counts.layout == torch.strided:
            n_empty += int((~counts.any(dim=1)).sum())
            return
        # a count per cell, without the sort torch.unique would do over every entry
        n_empty += int((torch.bincount(counts.indices()[0], minlength=len(rows)) == 0).sum())

    out = run_sequences(
        module,
        X,
        sequence_rows(codes, max_cells),
        match,
        lambda inputs: module.inference(inputs.counts, sample=sample, **inputs.draws)["mean"],
        module.n_latent,
        device=dev,
        draws=draws,
        inspect=count_empty,
    )
    if n_empty:
        logger.warning(
            "%d cells express no gene of the CellPLM gene list; their embedding comes from the "
            "other cells of their sequence only.",
            n_empty,
        )
    return out
