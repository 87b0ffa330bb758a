"""Cells -> scFoundation input sequences (official ``get_embedding.py`` preprocessing).

Each cell is put on the model's genes (official ``main_gene_selection``: genes the model lacks
are dropped, model genes the data lacks are zero), normalised as ``pre_normalized`` says, and
given its two total-count tokens: ``S`` (source depth, ``log10`` of the cell's total count) and
``T`` (target depth, from ``target_depth``). See :func:`model_values` for every option.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy import sparse

from ..._validation import InputError

__all__ = [
    "GeneReindexer",
    "InputType",
    "ParsedDepth",
    "PreNormalized",
    "TargetDepth",
    "bulk_scale",
    "check_options",
    "model_values",
    "parse_target_depth",
    "sequences",
]

PreNormalized = Literal["F", "T", "A"]
InputType = Literal["singlecell", "bulk"]
TargetDepth = str | float | int
_PRE_NORMALIZED = ("F", "T", "A")
_INPUT_TYPES = ("singlecell", "bulk")
_MODES = {"t": "absolute", "f": "fold", "a": "add"}


@dataclass(frozen=True)
class ParsedDepth:
    """A parsed target depth and its official spelling.

    ``mode`` is ``"t"`` (``T = value``), ``"f"`` (``T = log10(total * value)``) or ``"a"``
    (``T = log10(total) + value``).
    """

    mode: Literal["t", "f", "a"]
    value: float
    text: str

    def tokens(self, totals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(T, S)`` for cells of the given total counts (``S = log10(total)``)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            s = np.log10(totals)
            if self.mode == "t":
                t = np.full_like(s, self.value)
            elif self.mode == "f":
                t = np.log10(totals * self.value)
            else:
                t = s + self.value
        return t, s


def parse_target_depth(target_depth: TargetDepth | ParsedDepth) -> ParsedDepth:
    """Read a target depth: the official ``--tgthighres`` string, or a total count.

    Parameters
    ----------
    target_depth
        ``"tX"``: ``T = X``, i.e. a target total count of ``10**X`` (``"t4"``: 10,000);
        ``"fX"``: ``X`` times the cell's own total count; ``"aX"``: ``log10`` of the cell's
        total count plus ``X`` (``"a1"``: ten times deeper). A number is a target total count
        (reads or UMIs per cell), ``1e4`` meaning ``"t4"``.

    Returns
    -------
    The parsed depth.
    """
    if isinstance(target_depth, ParsedDepth):
        return target_depth
    if isinstance(target_depth, bool):
        raise TypeError("target_depth must be a string such as 't4' or a number, not a bool.")
    if isinstance(target_depth, int | float | np.integer | np.floating):
        if not (math.isfinite(target_depth) and target_depth > 0):
            raise ValueError(
                f"target_depth as a number is a total count per cell and must be positive, got "
                f"{target_depth!r}."
            )
        value = math.log10(float(target_depth))
        return ParsedDepth("t", value, f"t{value:.10g}")
    if isinstance(target_depth, str) and len(target_depth) > 1 and target_depth[0] in _MODES:
        try:
            value = float(target_depth[1:])
        except ValueError:
            value = math.nan
        if math.isfinite(value) and not (target_depth[0] == "f" and value <= 0):
            return ParsedDepth(target_depth[0], value, target_depth)  # type: ignore[arg-type]
    raise ValueError(
        f"target_depth must be 'tX' (T = X = log10 of the target total count, e.g. 't4'), 'fX' "
        f"(X times the cell's total count, X > 0), 'aX' (log10 of the cell's total count plus X) "
        f"or a positive total count such as 1e4; got {target_depth!r}."
    )


def check_options(pre_normalized: str, input_type: str) -> None:
    """Refuse unknown or unsupported ``pre_normalized`` / ``input_type`` combinations."""
    if pre_normalized not in _PRE_NORMALIZED:
        raise ValueError(
            f"pre_normalized must be 'F' (raw counts), 'T' (log-normalised) or 'A' "
            f"(log-normalised, total counts given), got {pre_normalized!r}."
        )
    if input_type not in _INPUT_TYPES:
        raise ValueError(f"input_type must be 'singlecell' or 'bulk', got {input_type!r}.")
    if input_type == "bulk" and pre_normalized == "A":
        raise ValueError(
            "pre_normalized='A' applies to single cells only (as in the official code)."
        )


class GeneReindexer:
    """Put the columns of a cells x genes block on the model's genes, in model order.

    Parameters
    ----------
    gene_index
        Model gene position of each input column, -1 for genes not in the model (e.g.
        :attr:`scfm_tools.pp.GeneMatch.index`).
    n_genes
        Number of model genes.
    """

    def __init__(self, gene_index: np.ndarray, n_genes: int) -> None:
        gene_index = np.asarray(gene_index, dtype=np.int64)
        kept = gene_index[gene_index >= 0]
        if kept.size and kept.max() >= n_genes:
            raise ValueError(
                f"gene_index refers to gene {kept.max()}, but the model has {n_genes}."
            )
        if np.unique(kept).size != kept.size:
            raise ValueError("gene_index maps several columns onto the same model gene.")
        self.n_columns = gene_index.size
        self.columns = np.flatnonzero(gene_index >= 0)
        self.positions = gene_index[self.columns]
        self.n_genes = int(n_genes)

    def __call__(self, block) -> sparse.csr_matrix:
        """``(cells, n_genes)`` float64 CSR with sorted indices and no stored zeros."""
        if block.ndim != 2 or block.shape[1] != self.n_columns:
            raise ValueError(
                f"expected a cells x {self.n_columns} matrix (one column per gene), got shape "
                f"{block.shape}."
            )
        sub = sparse.csr_matrix(block, dtype=np.float64)[:, self.columns]
        sub.eliminate_zeros()
        out = sparse.csr_matrix(
            (sub.data, self.positions[sub.indices], sub.indptr), shape=(sub.shape[0], self.n_genes)
        )
        out.sort_indices()
        return out


def _row_sums(x: sparse.csr_matrix) -> np.ndarray:
    return np.asarray(x.sum(axis=1), dtype=np.float64).ravel()


def _scale_rows(x: sparse.csr_matrix, factors: np.ndarray) -> sparse.csr_matrix:
    out = x.copy()
    out.data = out.data * np.repeat(factors, np.diff(out.indptr))
    return out


def bulk_scale(totals: np.ndarray) -> float:
    """Return the official bulk normalisation target: the median total of the non-empty samples.

    As scanpy ``normalize_total`` without ``target_sum``.
    """
    positive = totals[totals > 0]
    if positive.size == 0:
        raise InputError("every sample is empty on the model's genes; nothing to normalise.")
    return float(np.median(positive))


def model_values(
    x: sparse.csr_matrix,
    *,
    pre_normalized: PreNormalized = "F",
    input_type: InputType = "singlecell",
    target_depth: ParsedDepth | TargetDepth = "t4",
    total_counts: np.ndarray | None = None,
    bulk_target: float | None = None,
) -> tuple[sparse.csr_matrix, np.ndarray, np.ndarray]:
    """Model input values and total-count tokens of cells already on the model's genes.

    As the official ``get_embedding.py``:

    - single cell, ``pre_normalized="F"`` (raw counts): values ``log1p(x / total * 1e4)``,
      ``total`` = the cell's count over the model's genes;
    - ``"T"`` (already ``log1p``-normalised): values as given, and ``total`` = the **sum of the
      given values** (an official quirk kept for fidelity: ``S`` is then not a read depth);
    - ``"A"``: values as given, ``total`` from ``total_counts`` (officially a last column);
    - ``S = log10(total)``, ``T`` from ``target_depth`` (see :func:`parse_target_depth`);
    - bulk, ``pre_normalized="F"``: values ``log1p(x / total * bulk_target)`` (``bulk_target``:
      the median total over all samples, see :func:`bulk_scale`), and ``T = S = log10`` of the
      sum of those values; ``"T"``: values as given and ``T = S`` = their sum (no ``log10``).
      ``target_depth`` does not apply to bulk input.

    Parameters
    ----------
    x
        Cells x model genes (output of :class:`GeneReindexer`).
    pre_normalized
        ``"F"``, ``"T"`` or ``"A"`` as above.
    input_type
        ``"singlecell"`` or ``"bulk"``.
    target_depth
        Target depth (single cell only).
    total_counts
        Total count per cell, for ``pre_normalized="A"``.
    bulk_target
        Normalisation target for bulk ``pre_normalized="F"``.

    Returns
    -------
    ``(values, T, S)``: float32 CSR values, and float64 ``T`` and ``S`` per cell.
    """
    check_options(pre_normalized, input_type)
    totals = _row_sums(x)
    empty = np.diff(x.indptr) == 0
    if empty.any():
        raise InputError(
            f"{int(empty.sum())} cells express none of the model's genes (e.g. row "
            f"{int(np.flatnonzero(empty)[0])} of the block); scFoundation can neither normalise "
            "nor encode them. Remove them, or check that the genes are human gene symbols."
        )
    if input_type == "bulk":
        if pre_normalized == "F":
            if bulk_target is None:
                raise ValueError("bulk input with pre_normalized='F' needs bulk_target.")
            values = _scale_rows(x, bulk_target / totals)
            values.data = np.log1p(values.data)
            t = s = np.log10(_row_sums(values))
        else:
            values = x
            t = s = totals
        return _as_float32(values), np.asarray(t, dtype=np.float64), np.asarray(s, dtype=np.float64)
    depth = parse_target_depth(target_depth)
    if pre_normalized == "F":
        values = _scale_rows(x, 1e4 / totals)
        values.data = np.log1p(values.data)
    else:
        values = x
        if pre_normalized == "A":
            if total_counts is None or len(total_counts) != x.shape[0]:
                raise ValueError("pre_normalized='A' needs one total count per cell.")
            totals = np.asarray(total_counts, dtype=np.float64)
    t, s = depth.tokens(totals)
    return _as_float32(values), t, s


def _as_float32(values: sparse.csr_matrix) -> sparse.csr_matrix:
    out = sparse.csr_matrix(values, dtype=np.float32)
    out.eliminate_zeros()
    return out


def sequences(values: sparse.csr_matrix, t: np.ndarray, s: np.ndarray) -> torch.Tensor:
    """Dense model inputs ``(cells, n_genes + 2)``: the values, then ``T`` and ``S``."""
    n, n_genes = values.shape
    out = np.zeros((n, n_genes + 2), dtype=np.float32)
    out[:, :n_genes] = values.toarray()
    out[:, n_genes] = t
    out[:, n_genes + 1] = s
    return torch.from_numpy(out)
