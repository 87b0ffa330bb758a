"""Shared parameter documentation, injected with :func:`doc_params` (like scanpy's)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)

DOC_ADATA = """\
adata
    Annotated data matrix (cells x genes). A :class:`mudata.MuData` is accepted too, with
    ``mod=`` naming the modality to use."""

DOC_LAYER = """\
layer
    Layer holding the values to read; ``None`` reads ``adata.X``."""

DOC_COPY = """\
copy
    Return a modified copy instead of writing into ``adata``."""

DOC_RANDOM_STATE = """\
random_state
    Seed for the random steps; ``None`` uses ``sft.settings.seed``."""

DOC_RANDOM_STREAM = """\
random_stream
    Where the random draws come from. ``"cell"`` (default): each cell draws from its own
    stream, keyed by ``random_state`` and a hash of the cell's expressed genes and values, so a
    cell's result depends only on that cell: not on the other cells, their order, or how the
    data is split into files, chunks or batches. ``"official"``: one stream runs over the cells
    in order, as the official code draws from its global generator; this reproduces the
    official run, but a cell's result then depends on the cells before it."""

DOC_CHUNK_SIZE = """\
chunk_size
    Cells read and processed at a time (default 2,000); bounds memory on large or backed
    data."""


def doc_params(**kwds: str) -> Callable[[F], F]:
    """Fill ``{name}`` placeholders in a docstring with the shared text above.

    The docstring is dedented first (:func:`inspect.cleandoc`), so that the shared text, written
    at column 0 with descriptions indented by four spaces, lines up with the section it lands in.
    """

    def dec(obj: F) -> F:
        if obj.__doc__:
            obj.__doc__ = inspect.cleandoc(obj.__doc__).format_map(kwds)
        return obj

    return dec
