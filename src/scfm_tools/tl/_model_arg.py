"""The ``model=`` argument shared by every tl function: a registered name, a path, or None."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..hub import ResolvedModel

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
