"""scFoundation outputs of many cells at once: embeddings, expression, cell-type probabilities.

The official ``get_embedding.py`` runs one cell at a time; here cells are batched (the encoder
pads and masks cells of different lengths, the decoder's FAVOR+ stabiliser is per cell), so a
cell's output does not depend on the batch it lands in, and equals the official one-cell run
to float rounding. Cells are streamed ``chunk_size`` at a time from the matrix and, within a
chunk, sorted by their number of expressed genes so that a batch holds cells of similar length.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from scipy import sparse

from ..._anndata import DEFAULT_CHUNK_SIZE, iter_row_blocks
from ..._validation import InputError, check_counts, check_lognorm
from ...pp._match_genes import GeneMatch, as_gene_match
from .._length_batches import length_batches
from ..base._streaming import Minibatch, as_device, gather_blocks, iter_minibatches, run_minibatches
from ._module import Pool, SCFoundationModule
from ._preprocess import (
    GeneReindexer,
    InputType,
    ParsedDepth,
    PreNormalized,
    TargetDepth,
    bulk_scale,
    check_options,
    model_values,
    parse_target_depth,
    sequences,
)

if TYPE_CHECKING:
    from anndata import AnnData


__all__ = [
    "Output",
    "check_values",
    "embed_matrix",
    "iter_outputs",
    "prepare_blocks",
    "prepare_options",
    "run_passes",
    "total_counts_of",
]

logger = logging.getLogger("scfm_tools")

Output = Literal["cell", "gene", "gene_expression", "proba"]
_OUTPUTS = ("cell", "gene", "gene_expression", "proba")
# Per forward pass: most tokens (the decoder reads n_genes + 2 per cell, the encoder the
# expressed genes), and most encoder attention scores (cells x heads x length^2), which
# attention with a padding mask may hold at once on CPU.
_TOKENS_PER_PASS = {"cpu": 1 << 17, "cuda": 1 << 20}
_SCORES_PER_PASS = {"cpu": 1 << 27, "cuda": 1 << 31}


def _check_output(output: str, pool: str) -> None:
    if output not in _OUTPUTS:
        raise ValueError(f"output must be one of {list(_OUTPUTS)}, got {output!r}.")
    if pool not in ("all", "max"):
        raise ValueError(f"pool must be 'all' or 'max', got {pool!r}.")


def iter_outputs(
    module: SCFoundationModule,
    blocks: Iterator[tuple[sparse.csr_matrix, np.ndarray, np.ndarray]],
    *,
    output: Output = "cell",
    pool: Pool = "all",
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    n_cells: int | None = None,
) -> Iterator[np.ndarray]:
    """Run the model on consecutive blocks of prepared cells; yields one array per block.

    Parameters
    ----------
    module
        The scFoundation module (moved to ``device`` and put in eval mode for the run; its
        training flag is restored afterwards).
    blocks
        ``(values, T, S)`` per block, as returned by
        :func:`~scfm_tools.models.scfoundation.model_values`.
    output
        ``"cell"``: cell embeddings (see ``pool``); ``"gene"``: the decoder's gene embeddings
        ``(cells, n_genes, dec_dim)``; ``"gene_expression"``: the regression head's predicted
        expression ``(cells, n_genes)``; ``"proba"``: the classifier head's cell-type
        probabilities ``(cells, n_classes)``.
    pool
        Cell-embedding pooling: ``"all"`` (``[S, T, max, mean]``) or ``"max"``.
    batch_size
        Most cells per forward pass (fewer when a pass would hold too many tokens).
    device
        Where to run.
    n_cells
        Cells in all the blocks, when known: the total of the progress bar.

    Yields
    ------
    float32 outputs, one row per cell of the block, in block order.
    """
    _check_output(output, pool)
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if output == "cell":
        width: tuple[int, ...] = (4 * module.enc_dim if pool == "all" else module.enc_dim,)
    elif output == "proba":
        if not module.is_classifier:
            raise ValueError("output='proba' needs a module with a classifier head.")
        width = (module.n_classes,)
    elif output == "gene":
        width = (module.n_genes, module.dec_dim)
    else:
        width = (module.n_genes,)
    yield from gather_blocks(
        run_passes(module, blocks, output, pool, batch_size, device, n_cells), width
    )


def run_passes(
    module: SCFoundationModule,
    blocks: Iterable[tuple[sparse.csr_matrix, np.ndarray, np.ndarray]],
    output: Output,
    pool: Pool,
    batch_size: int,
    device: str | torch.device,
    n_cells: int | None,
) -> Iterator[tuple[Minibatch, torch.Tensor | None]]:
    """Run the model on prepared blocks in the shared streaming loop, one pass at a time.

    scFoundation's minibatching: cells sorted by their number of expressed genes, as many per
    pass as the token and attention-score budgets allow. Arguments as in :func:`iter_outputs`,
    whose checks this skips; yields ``(minibatch, outputs)``, for callers that reduce over
    cells instead of keeping every cell's output.
    """
    dev = as_device(device)
    tokens = _TOKENS_PER_PASS.get(dev.type, _TOKENS_PER_PASS["cpu"])
    scores = _SCORES_PER_PASS.get(dev.type, _SCORES_PER_PASS["cpu"])
    heads = module.config["enc_heads"]
    decoder = output in ("gene", "gene_expression")

    def fits(n: int, longest: int) -> bool:
        longest += 2  # T and S
        per_cell = module.seq_len if decoder else longest
        return n * per_cell <= tokens and n * heads * longest * longest <= scores

    def split(block, dev: torch.device):
        values, t, s = block
        passes = (
            (rows, sequences(values[rows], t[rows], s[rows]).to(dev))
            for rows in length_batches(np.diff(values.indptr), batch_size, fits=fits)
        )
        return values.shape[0], passes

    def forward(x: torch.Tensor) -> torch.Tensor:
        if output == "cell":
            return module.cell_embedding(x, pool)
        if output == "proba":
            return module.class_probabilities(x)
        return module.gene_outputs(x, head=output == "gene_expression")

    batches = iter_minibatches(
        module, blocks, split, device=dev, n_cells=n_cells, desc="scFoundation"
    )
    return run_minibatches(batches, forward, device=dev)


def prepare_blocks(
    X,
    reindexer: GeneReindexer,
    *,
    pre_normalized: PreNormalized,
    input_type: InputType,
    depth: ParsedDepth,
    total_counts: np.ndarray | None,
    chunk_size: int,
    obs_names: Sequence[str] | None = None,
) -> Iterator[tuple[sparse.csr_matrix, np.ndarray, np.ndarray]]:
    """Yield ``(values, T, S)`` per chunk of ``X``: model genes, normalised, with the tokens.

    For bulk input with ``pre_normalized="F"`` the whole matrix is read once first, for the
    median total the official normalisation scales every sample to. Cells that express none of
    the model's genes are refused, naming them (``obs_names``).
    """

    def raw_blocks():
        for start, block in iter_row_blocks(X, chunk_size=chunk_size):
            reindexed = reindexer(block)
            del block  # one block held at a time (see iter_row_blocks)
            yield start, reindexed
            del reindexed

    bulk_target = None
    warned = False
    if input_type == "bulk" and pre_normalized == "F":
        # The official bulk normalisation scales every sample to the median total of all.
        totals = np.concatenate([np.asarray(b.sum(axis=1)).ravel() for _, b in raw_blocks()])
        bulk_target = bulk_scale(totals)
    for start, block in raw_blocks():
        empty = np.flatnonzero(np.diff(block.indptr) == 0)
        if empty.size:
            names = [
                obs_names[start + i] if obs_names is not None else int(start + i) for i in empty[:3]
            ]
            raise InputError(
                f"{empty.size} cells (e.g. {names}) express none of the scFoundation model's "
                "genes, so they can be neither normalised nor encoded; remove them first "
                "(their genes may all be outside the model's gene list)."
            )
        tc = None if total_counts is None else total_counts[start : start + block.shape[0]]
        values, t, s = model_values(
            block,
            pre_normalized=pre_normalized,
            input_type=input_type,
            target_depth=depth,
            total_counts=tc,
            bulk_target=bulk_target,
        )
        if not warned and ((t <= 0) | (s <= 0)).any():
            warned = True
            logger.warning(
                "some cells have a T or S token <= 0 (a total count of 1 or less, or a target "
                "depth below 1 count): the encoder, which reads positive values only, does not "
                "see that token, as in the official code; their pooled S/T embedding parts then "
                "come from other tokens."
            )
        yield values, t, s


def embed_matrix(
    module: SCFoundationModule,
    X,
    var_names: Sequence[str] | GeneMatch,
    genes: Sequence[str] | None = None,
    *,
    output: Output = "cell",
    pool: Pool = "all",
    target_depth: TargetDepth | ParsedDepth = "t4",
    pre_normalized: PreNormalized = "F",
    input_type: InputType = "singlecell",
    total_counts: Sequence[float] | np.ndarray | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    obs_names: Sequence[str] | None = None,
) -> np.ndarray:
    """Run scFoundation on the cells of a cells x genes matrix (official ``get_embedding.py``).

    Genes are matched to the model's gene list (missing model genes are zero, other genes are
    dropped), values prepared as ``pre_normalized`` / ``input_type`` say, ``T`` and ``S``
    appended (see :func:`~scfm_tools.models.scfoundation.model_values`), and the model run
    under :func:`torch.inference_mode` (bf16 autocast on CUDA), many cells per pass.

    Parameters
    ----------
    module
        The module, e.g. from
        :func:`~scfm_tools.models.scfoundation.load_scfoundation_checkpoint` with the entry the
        output needs (``"cell"``/``"rde"`` for cell embeddings, ``"gene"`` for gene outputs, as
        the official script).
    X
        Cells x genes matrix (dense, sparse, or anything whose row slices are, e.g. a backed
        AnnData's ``X``): raw counts for ``pre_normalized="F"``, ``log1p``-normalised values
        for ``"T"``/``"A"``.
    var_names
        Gene symbols of the columns, or a :class:`~scfm_tools.pp.GeneMatch` against ``genes``.
    genes
        The model's gene list (needed unless ``var_names`` is a ``GeneMatch``).
    output
        ``"cell"`` (``(cells, 4 * enc_dim)`` with ``pool="all"``, ``(cells, enc_dim)`` with
        ``"max"``), ``"gene"`` (the decoder's gene embeddings ``(cells, n_genes, dec_dim)``,
        official ``--output_type gene``; large: ``n_genes * dec_dim`` floats per cell) or
        ``"gene_expression"`` (predicted ``log1p``-normalised expression at the target depth,
        ``(cells, n_genes)``). Gene outputs are in the model's gene order.
    pool
        Cell-embedding pooling (official ``--pool_type``).
    target_depth
        Official ``--tgthighres`` (``"t4"``, ``"f2"``, ``"a1"``) or a total count (see
        :func:`~scfm_tools.models.scfoundation.parse_target_depth`).
    pre_normalized
        Official ``--pre_normalized``: ``"F"``, ``"T"`` or ``"A"`` (with ``total_counts``).
    input_type
        Official ``--input_type``: ``"singlecell"`` or ``"bulk"``.
    total_counts
        Each cell's total count, for ``pre_normalized="A"``.
    batch_size
        Most cells per forward pass.
    device
        Where to run.
    chunk_size
        Cells read from ``X`` at a time.
    obs_names
        Cell names, for error messages.

    Returns
    -------
    float32 array with one row per cell, in the order of ``X``.
    """
    _check_output(output, pool)
    check_options(pre_normalized, input_type)
    depth = parse_target_depth(target_depth)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
    match = as_gene_match(var_names, None if genes is None else list(genes), n_columns=X.shape[1])
    if match.n_matched == 0:
        raise InputError(
            "none of the genes is in the scFoundation gene list; var_names must be human gene "
            "symbols."
        )
    if pre_normalized == "A":
        if total_counts is None:
            raise ValueError("pre_normalized='A' needs total_counts (one per cell).")
        total_counts = np.asarray(total_counts, dtype=np.float64)
        if total_counts.shape != (X.shape[0],) or not (np.isfinite(total_counts).all()):
            raise ValueError(f"total_counts must hold one finite number per cell ({X.shape[0]}).")
        if (total_counts <= 0).any():
            raise InputError("total_counts must be positive (they are read depths).")
    blocks = prepare_blocks(
        X,
        GeneReindexer(match.index, module.n_genes),
        pre_normalized=pre_normalized,
        input_type=input_type,
        depth=depth,
        total_counts=None if total_counts is None else np.asarray(total_counts),
        chunk_size=chunk_size,
        obs_names=obs_names,
    )
    parts = list(
        iter_outputs(
            module,
            blocks,
            output=output,
            pool=pool,
            batch_size=batch_size,
            device=device,
            n_cells=X.shape[0],
        )
    )
    return np.concatenate(parts) if parts else np.empty((0,), dtype=np.float32)


def check_values(adata: AnnData, layer: str | None, pre_normalized: str, input_type: str) -> None:
    """Check that the matrix holds what ``pre_normalized`` says (counts or log-normalised)."""
    if input_type == "singlecell" and pre_normalized == "F":
        check_counts(adata, layer)
    elif input_type == "singlecell":
        check_lognorm(adata, layer)


def total_counts_of(adata: AnnData, key: str | None, pre_normalized: str) -> np.ndarray | None:
    """Read the per-cell total counts that ``pre_normalized="A"`` needs from ``adata.obs``."""
    if pre_normalized != "A":
        if key is not None:
            raise ValueError("total_counts_key applies to pre_normalized='A' only.")
        return None
    if key is None:
        raise ValueError(
            "pre_normalized='A' needs each cell's total count: pass total_counts_key naming the "
            "adata.obs column that holds it (e.g. 'total_counts' from "
            "sc.pp.calculate_qc_metrics on the raw counts)."
        )
    if key not in adata.obs.columns:
        raise KeyError(
            f"total_counts_key {key!r} is not a column of adata.obs (columns: "
            f"{list(adata.obs.columns)})."
        )
    values = np.asarray(adata.obs[key], dtype=np.float64)
    bad = ~np.isfinite(values) | (values <= 0)
    if bad.any():
        first = adata.obs_names[np.flatnonzero(bad)[0]]
        raise InputError(
            f"adata.obs[{key!r}] must hold positive total counts; cell {first!r} has "
            f"{adata.obs[key].loc[first]!r}."
        )
    return values


def prepare_options(
    adata: AnnData,
    layer: str | None,
    *,
    target_depth: TargetDepth,
    pre_normalized: PreNormalized,
    input_type: InputType,
    total_counts_key: str | None,
) -> tuple[ParsedDepth, np.ndarray | None, dict[str, Any]]:
    """Check the official preprocessing options and the values they imply.

    Shared by the model's methods that read cells (see
    :meth:`SCFoundation.get_latent_representation` for the options). Returns the parsed
    target depth, the per-cell total counts (``pre_normalized="A"`` only) and the options to
    record in ``uns[key]["params"]``. Writes nothing.
    """
    check_options(pre_normalized, input_type)
    depth = parse_target_depth(target_depth)
    totals = total_counts_of(adata, total_counts_key, pre_normalized)
    check_values(adata, layer, pre_normalized, input_type)
    options = {
        "target_depth": depth.text if input_type == "singlecell" else None,
        "pre_normalized": pre_normalized,
        "input_type": input_type,
        "total_counts_key": total_counts_key,
    }
    return depth, totals, options
