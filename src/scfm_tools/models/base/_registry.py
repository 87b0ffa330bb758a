"""Which class runs which family, and models loaded by name or path, cached by weights."""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ._pretrained import PretrainedMixin

if TYPE_CHECKING:
    from ...hub import Family, ResolvedModel

__all__ = ["clear_model_cache", "families_with", "load_model", "model_class"]

logger = logging.getLogger("scfm_tools")


def _scgpt() -> type[PretrainedMixin]:
    from ..scgpt import SCGPT

    return SCGPT


def _scbert() -> type[PretrainedMixin]:
    from ..scbert import SCBERT

    return SCBERT


def _scfoundation() -> type[PretrainedMixin]:
    from ..scfoundation import SCFoundation

    return SCFoundation


def _cellplm() -> type[PretrainedMixin]:
    from ..cellplm import CellPLM

    return CellPLM


# Imported on first use: a family's class pulls in its modules and scvi-tools.
_CLASSES: dict[str, Callable[[], type[PretrainedMixin]]] = {
    "scgpt": _scgpt,
    "scbert": _scbert,
    "scfoundation": _scfoundation,
    "cellplm": _cellplm,
}

# Checkpoints loaded by name or path in this process, newest last. A few models at most: a
# published model takes hundreds of MB, and a tl call needs one.
_CACHE: OrderedDict[tuple[Any, ...], PretrainedMixin] = OrderedDict()
_CACHE_SIZE = 2


def model_class(family: Family | str) -> type[PretrainedMixin]:
    """Return the model class of ``family`` (``"scgpt"``, ``"scbert"``, ...).

    Parameters
    ----------
    family
        The family name.

    Returns
    -------
    The class, e.g. :class:`~scfm_tools.models.SCGPT`.
    """
    if family not in _CLASSES:
        raise ValueError(f"unknown model family {family!r}; known: {sorted(_CLASSES)}.")
    return _CLASSES[family]()


def families_with(method: str) -> list[str]:
    """Return the families whose model class has ``method`` (for messages).

    Parameters
    ----------
    method
        A method name, e.g. ``"get_imputed_expression"``.

    Returns
    -------
    Sorted family names.
    """
    return sorted(f for f in _CLASSES if hasattr(model_class(f), method))


def _files_state(folder: os.PathLike) -> tuple[tuple[str, int, int], ...]:
    """Names, sizes and times of a checkpoint folder's files: companion files count too."""
    with os.scandir(folder) as entries:
        return tuple(
            sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in entries if e.is_file())
        )


def clear_model_cache() -> None:
    """Forget the models that :func:`load_model` keeps in memory."""
    _CACHE.clear()


def load_model(
    model: str | os.PathLike | ResolvedModel | PretrainedMixin,
    *,
    load_kwargs: Mapping[str, Any] | None = None,
) -> PretrainedMixin:
    """Return a model object for a registered name, a checkpoint path, or a model.

    A name or path is located (:func:`scfm_tools.hub.load`), its family's class chosen and the
    weights loaded once; the model is kept for later calls with the same weights (the same
    sha256 and ``load_kwargs``), so a session that calls several tl functions loads it once.
    A model object is returned as it is. A changed checkpoint folder (a companion file added,
    removed or rewritten) is loaded anew.

    Parameters
    ----------
    model
        Registered name, checkpoint path (file or folder), located model
        (:func:`scfm_tools.hub.load`) or model object.
    load_kwargs
        Options of the family's ``from_pretrained`` that choose the weights (e.g.
        scFoundation's ``entry``); refused with a model object, whose weights are loaded.

    Returns
    -------
    The model object (shared with later calls: train a copy, not it).
    """
    from ...hub import ResolvedModel, load

    if isinstance(model, PretrainedMixin):
        if load_kwargs:
            raise ValueError(
                f"options {sorted(load_kwargs)} choose the weights to load, but a loaded "
                f"{type(model).__name__} was given; load it with "
                f"{type(model).__name__}.from_pretrained(..., "
                + ", ".join(f"{k}={v!r}" for k, v in load_kwargs.items())
                + ") instead."
            )
        return model
    if not isinstance(model, str | os.PathLike | ResolvedModel):
        raise TypeError(
            "model must be a registered name (sft.hub.list_models()), a checkpoint path or a "
            f"model object such as sft.models.SCGPT; got {type(model).__name__} {model!r}."
        )
    resolved = model if isinstance(model, ResolvedModel) else load(model)
    options = dict(load_kwargs or {})
    key = (
        resolved.family,
        resolved.sha256,
        _files_state(resolved.path),
        tuple(sorted(options.items())),
    )
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    loaded = model_class(resolved.family).from_pretrained(resolved, **options)
    _CACHE[key] = loaded
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return loaded
