"""What the families' classifier heads share: the labels registered and the classes named.

A family's model class with a cell-type head registers cell types with
``setup_anndata(labels_key=...)`` and names its outputs by the registered categories; the checks
of both are one here (class weights and the validation split of fine-tuning are in
:mod:`scfm_tools.train`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from .._validation import InputError

if TYPE_CHECKING:
    from anndata import AnnData
    from scvi.data import AnnDataManager

__all__ = ["Head", "check_labels_key", "registered_classes", "resolve_classes"]

Head = Literal["pretrain", "classifier"]


def check_labels_key(adata: AnnData, labels_key: str | None) -> None:
    """Refuse a ``labels_key`` that is not an ``obs`` column, or that has missing labels.

    Parameters
    ----------
    adata
        The AnnData about to be registered.
    labels_key
        Column of ``adata.obs`` with the cell types (``None``: nothing to check).
    """
    if labels_key is None:
        return
    if labels_key not in adata.obs.columns:
        raise InputError(
            f"labels_key {labels_key!r} is not a column of adata.obs (columns: "
            f"{list(adata.obs.columns)}); pass the column that holds the cell types."
        )
    if adata.obs[labels_key].isna().any():
        raise InputError(
            f"adata.obs[{labels_key!r}] has missing labels; drop those cells first, "
            f"e.g. `adata = adata[adata.obs[{labels_key!r}].notna()].copy()`."
        )


def registered_classes(manager: AnnDataManager | None) -> list[str] | None:
    """Return the cell types registered as ``labels_key`` (category order), or ``None``."""
    from scvi import REGISTRY_KEYS

    if manager is None or manager.registry["setup_args"].get("labels_key") is None:
        return None
    mapping = manager.get_state_registry(REGISTRY_KEYS.LABELS_KEY)
    return [str(c) for c in mapping.categorical_mapping]


def resolve_classes(
    head: Head,
    classes: Sequence[str] | None,
    registered: list[str] | None,
    *,
    model: str,
) -> list[str] | None:
    """Return the classifier's class names (``None`` for the pretraining head).

    Parameters
    ----------
    head
        ``"pretrain"`` or ``"classifier"``.
    classes
        Class names given; ``None`` takes the registered ones.
    registered
        The registered cell types (:func:`registered_classes`).
    model
        Name of the model class, for messages.

    Returns
    -------
    The class names, at least two; registered labels must be these, in this order.
    """
    if head not in ("pretrain", "classifier"):
        raise ValueError(f"head must be 'pretrain' or 'classifier', got {head!r}.")
    if head == "pretrain":
        return None
    if classes is None:
        if registered is None:
            raise ValueError(
                f"head='classifier' needs cell-type labels: call "
                f"{model}.setup_anndata(adata, labels_key=...) first, or pass `classes`."
            )
        classes = registered
    classes = [str(c) for c in classes]
    if registered is not None and registered != classes:
        raise ValueError(
            f"the registered labels {registered[:5]}... are not the classifier's classes "
            f"{classes[:5]}... (same names in the same order are needed)."
        )
    if len(classes) < 2:
        raise InputError(f"a classifier needs at least 2 cell types, got {classes}.")
    return classes
