"""The ``model=`` argument shared by every tl function: a name, a path, a model object or None.

A tl function resolves it in two steps, so that the data are checked before any weights are
read: :func:`locate_model` finds the family (and the files), :func:`load_for` gives the model
object, and :func:`call_model` runs one of its methods with the tl function's arguments.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import numpy as np
    import torch
    from anndata import AnnData

    from ..hub import ResolvedModel
    from ..models.base import PretrainedMixin

logger = logging.getLogger("scfm_tools")

#: The model that ships inside the package, used when ``model=None``.
DEFAULT_MODEL = "scgpt-default"

DOC_MODEL = """\
model
    A registered model name (see :func:`scfm_tools.hub.list_models`), a path to a checkpoint
    (e.g. an official scGPT folder with ``best_model.pt``, ``args.json`` and ``vocab.json``),
    a model object (e.g. :meth:`sft.models.SCGPT.from_pretrained
    <scfm_tools.models.SCGPT.from_pretrained>` or one trained here), or ``None`` for the small
    default model that ships with the package (works offline)."""

# Arguments every call_model passes itself: never a family option.
_OWN = ("adata", "indices", "return_info")


class LocatedModel(NamedTuple):
    """A ``model=`` argument located: its class, and its files or the object itself."""

    cls: type[PretrainedMixin]
    source: ResolvedModel | PretrainedMixin

    @property
    def family(self) -> str:
        """The model family (``"scgpt"`` ...)."""
        return self.cls.family

    def params(self) -> dict[str, Any]:
        """Return what to record about the model in ``uns[key]["params"]``, unloaded."""
        return self.source.params()


def locate_model(model: Any) -> LocatedModel:
    """Find the family of ``model`` (``None``: the shipped default) without loading weights."""
    from ..hub import load
    from ..models.base import PretrainedMixin, model_class

    if isinstance(model, PretrainedMixin):
        return LocatedModel(type(model), model)
    if model is not None and not isinstance(model, str | os.PathLike):
        raise TypeError(
            "model must be a registered name (sft.hub.list_models()), a checkpoint path, a "
            "model object such as sft.models.SCGPT.from_pretrained(...), or None for the "
            f"default; got {type(model).__name__} {model!r}."
        )
    resolved = load(DEFAULT_MODEL if model is None else model)
    return LocatedModel(model_class(resolved.family), resolved)


def unavailable(method: str, family: str, task: str | None = None) -> str:
    """Say that ``family`` models cannot run ``method``, and which families can."""
    from ..models.base import families_with

    return (
        f"{task or method} is not available for {family} models; families that can: "
        f"{families_with(method)}."
    )


def load_for(
    located: LocatedModel, method: str, options: Mapping[str, Any]
) -> tuple[PretrainedMixin, dict[str, Any]]:
    """Return the model object that runs ``method``, and the options left for the method.

    A name or path is loaded once per process and set of weights (see
    :func:`scfm_tools.models.base.load_model`); the family picks which weights its checkpoint
    holds for the task from the options (scFoundation's entries).
    """
    from ..models.base import PretrainedMixin, load_model

    if not hasattr(located.cls, method):
        raise NotImplementedError(unavailable(method, located.family))
    load_kwargs, run_options = located.cls.pretrained_options(method, options)
    if isinstance(located.source, PretrainedMixin):
        # A loaded model's weights are chosen already: only options the user gave that would
        # choose others are refused.
        chosen = set(options) - set(run_options)
        return load_model(located.source, load_kwargs=load_kwargs if chosen else None), run_options
    return load_model(located.source, load_kwargs=load_kwargs), run_options


def call_model(
    fn: Callable[..., Any],
    *args: Any,
    task: str,
    family: str,
    given: Mapping[str, Any],
    quiet: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
    **fixed: Any,
) -> tuple[Any, dict[str, Any]]:
    """Call a model method with a tl function's arguments; refuse what it cannot honour.

    Parameters
    ----------
    fn
        The bound method.
    *args
        Positional arguments (the AnnData).
    task
        The tl function's name, for messages.
    family
        The model family, for messages.
    given
        Standard arguments the user set (``None``: not set, the method's default applies). One
        that the method does not take is refused when set.
    quiet
        Standard arguments with a value in every call (e.g. ``random_state``): passed where the
        method takes them, left out where it does not (the family has no use for them).
    options
        The family's own options (``**model_kwargs``): each must be a parameter of ``fn``.
    **fixed
        Passed as they are.

    Returns
    -------
    ``(result, used)``: what ``fn`` returned, and the standard arguments it ran with (the
    method's defaults filled in), for ``uns[key]["params"]``.
    """
    params = inspect.signature(fn).parameters
    standard = {*given, *(quiet or {})}
    own = sorted(p for p in params if p not in standard and p not in fixed and p not in _OWN)
    unknown = sorted(k for k in (options or {}) if k not in own)
    if unknown:
        takes = f"it takes {own}" if own else "it takes no model-specific options"
        raise TypeError(
            f"{task} got option(s) {unknown} that {family} models do not take; {takes}."
        )
    refused = sorted(k for k, v in given.items() if v is not None and k not in params)
    if refused:
        raise ValueError(
            f"{task}: {', '.join(refused)} does not apply to {family} models (see "
            f"{type(fn.__self__).__name__}.{fn.__name__}); leave it at None."
        )
    kwargs = {k: v for k, v in given.items() if v is not None and k in params}
    kwargs.update({k: v for k, v in (quiet or {}).items() if k in params})
    used = {k: kwargs.get(k, params[k].default) for k in standard if k in params}
    return fn(*args, **kwargs, **(options or {}), **fixed), used


def cell_embeddings(
    model: PretrainedMixin,
    adata: AnnData,
    *,
    task: str,
    batch_size: int | None,
    max_length: int | None,
    layer: str | None,
    gene_key: str | None,
    random_state: int | None,
    chunk_size: int,
    options: Mapping[str, Any],
) -> tuple[np.ndarray, dict[str, Any]]:
    """Embed ``adata``'s cells with ``model``, as ``embed_cells`` and label transfer do.

    Returns the ``(n_cells, d)`` float32 embeddings and the run's record (the model's, plus
    the ``batch_size`` it ran with).
    """
    import numpy as np

    (emb, info), used = call_model(
        model.get_latent_representation,
        adata,
        task=task,
        family=model.family,
        given={"batch_size": batch_size, "max_length": max_length},
        quiet={
            "layer": layer,
            "gene_key": gene_key,
            "random_state": random_state,
            "chunk_size": chunk_size,
        },
        options=options,
        return_info=True,
    )
    return np.asarray(emb, dtype=np.float32), {**info, "batch_size": used.get("batch_size")}


def prepare_device(model: PretrainedMixin, device: str | torch.device | None) -> torch.device:
    """Move ``model`` to ``device`` (``None``: ``sft.settings.device``) and set the threads."""
    from .._settings import settings

    dev = settings.resolve_device(device)
    settings.apply_threads()
    model.to_device(dev)
    return dev


def lightning_accelerator(device: torch.device) -> str:
    """Return the Lightning accelerator that trains on ``device``."""
    return {"cuda": "gpu", "cpu": "cpu", "mps": "mps"}.get(device.type, "auto")


def check_model_values(
    adata: AnnData, layer: str | None, located: LocatedModel, *, chunk_size: int, caller: str
) -> None:
    """Check that the values are what the model's family reads (``values_needed``).

    Raw counts where the family needs them; otherwise non-negative values, with a warning when a
    family that prefers counts gets other values. Empty cells are refused. Writes nothing.
    """
    from .._validation import check_counts, check_nonempty, check_nonnegative, first_non_integer

    needed = located.cls.values_needed
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
