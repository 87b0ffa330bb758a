"""The ``model=`` argument shared by every tl function: a registered name, a path, or None."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from anndata import AnnData

    from ..hub import ResolvedModel

logger = logging.getLogger("scfm_tools")

#: The model that ships inside the package, used when ``model=None``.
DEFAULT_MODEL = "scgpt-default"

DOC_MODEL = """\
model
    A registered model name (see :func:`scfm_tools.hub.list_models`), a path to a checkpoint
    (e.g. an official scGPT folder with ``best_model.pt``, ``args.json`` and ``vocab.json``),
    or ``None`` for the small default model that ships with the package (works offline)."""


def resolve_model(model: str | os.PathLike | None) -> ResolvedModel:
    """Locate the files of ``model`` (``None``: the embedded default)."""
    from ..hub import load

    return load(DEFAULT_MODEL if model is None else model)


def check_model_values(
    adata: AnnData, layer: str | None, family: str, *, chunk_size: int, caller: str
) -> None:
    """Check that the values are what ``family``'s models read (see ``values_needed``).

    Raw counts where the family needs them; otherwise non-negative values, with a warning when a
    family that prefers counts gets other values. Empty cells are refused. Writes nothing.
    """
    from .._validation import check_counts, check_nonempty, check_nonnegative, first_non_integer
    from ..models._families import values_needed

    needed = values_needed(family)
    if needed == "counts":
        check_counts(adata, layer, chunk_size=chunk_size)
    else:
        check_nonnegative(adata, layer, chunk_size=chunk_size)
    check_nonempty(adata, layer, chunk_size=chunk_size)
    if needed == "counts_or_lognorm":
        non_integer = first_non_integer(adata, layer, chunk_size=chunk_size)
        if non_integer is not None:
            logger.warning(
                "%s: the values are not raw counts (%s). The model was trained on "
                "counts; its per-cell rank binning gives nearly the same input for "
                "log-normalised values, but pass the counts (`layer=`) where you have them.",
                caller,
                non_integer,
            )
