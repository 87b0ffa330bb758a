"""Cell-type labels from class probabilities, and a reference's labels: shared by every layer.

Annotation happens in two places, ``sft.tl.annotate`` (label transfer on embeddings) and
scBERT's fine-tuned classifier (:mod:`scfm_tools.models.scbert`); both read the labels off
class probabilities here, so the ``"Unassigned"`` rule and the reference checks are one.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ._validation import InputError

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["UNASSIGNED", "labels_from_proba", "reference_labels"]

logger = logging.getLogger("scfm_tools")

#: Label of cells whose best class probability is below the threshold (scBERT's novel type).
UNASSIGNED = "Unassigned"


def labels_from_proba(proba: pd.DataFrame, threshold: float | None) -> pd.DataFrame:
    """Best class and its probability per cell; ``"Unassigned"`` below ``threshold``.

    Parameters
    ----------
    proba
        Cells x classes probabilities.
    threshold
        Confidence below which a cell is ``"Unassigned"``; ``None`` never.

    Returns
    -------
    DataFrame with ``label`` (categorical) and ``score``.
    """
    if threshold is not None and not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1] or be None, got {threshold!r}.")
    values = proba.to_numpy()
    classes = np.asarray(proba.columns, dtype=object)
    score = values.max(axis=1) if values.size else np.empty(0, np.float32)
    labels = classes[values.argmax(axis=1)] if values.size else np.empty(0, object)
    if threshold is not None:
        labels = np.where(score < threshold, UNASSIGNED, labels)
    categories = list(classes) + ([UNASSIGNED] if threshold is not None else [])
    return pd.DataFrame(
        {
            "label": pd.Categorical(labels, categories=categories),
            "score": score.astype(np.float32),
        },
        index=proba.index,
    )


def reference_labels(reference: AnnData, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate the reference's cell-type column; return ``(labelled_mask, labels_as_str)``.

    Cells without a label (NaN) are left out, with a warning; integer labels stay integers
    (``1``, not ``1.0``) when missing values made the column float. Raises :class:`InputError`
    when the column is missing, holds fewer than two cell types, or names one
    ``"Unassigned"`` (the label of cells below the threshold).
    """
    if label_key not in reference.obs.columns:
        raise InputError(
            f"the reference has no obs column {label_key!r} (columns: "
            f"{list(reference.obs.columns)}); pass label_key= naming the column with its cell "
            "types."
        )
    column = reference.obs[label_key]
    keep = column.notna().to_numpy()
    if not keep.all():
        logger.warning(
            "annotate: %d reference cells have no %r label and are left out.",
            int((~keep).sum()),
            label_key,
        )
    kept = column[keep]
    values = kept.cat.categories if isinstance(kept.dtype, pd.CategoricalDtype) else kept
    if pd.api.types.is_float_dtype(values) and np.all(np.mod(values, 1) == 0):
        # Integer labels become floats beside missing values; name them as the integers.
        kept = kept.astype(np.float64).astype(np.int64)
    labels = kept.astype(str).to_numpy()
    if UNASSIGNED in labels:
        raise InputError(
            f"the reference has a cell type named {UNASSIGNED!r} in obs[{label_key!r}], the "
            "label annotate gives cells below the threshold; rename it first, e.g. "
            f"`ref.obs[{label_key!r}] = ref.obs[{label_key!r}].replace({{{UNASSIGNED!r}: "
            "'Unassigned (reference)'})`, or drop those cells."
        )
    n_types = len(np.unique(labels))
    if n_types < 2:
        raise InputError(
            f"the reference has {n_types} cell type in obs[{label_key!r}]; annotation needs at "
            "least 2."
        )
    return keep, labels
