"""What the families' classifier heads share: the labels registered and the classes named.

A family's model class with a cell-type head registers cell types with
``setup_anndata(labels_key=...)`` and names its outputs by the registered categories; the checks
of both are one here (class weights and the validation split of fine-tuning are in
:mod:`scfm_tools.train`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar, Literal

from .._validation import InputError

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    from anndata import AnnData
    from scvi.data import AnnDataManager

    from ..pp._match_genes import GeneMatch

__all__ = [
    "ClassifierMixin",
    "Head",
    "check_labels_key",
    "labelled_reference",
    "proba_frame",
    "registered_classes",
    "resolve_classes",
    "variable_genes",
]

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


def labelled_reference(
    model_cls: type,
    reference: AnnData,
    labels_key: str,
    layer: str | None = None,
    gene_key: str | None = None,
) -> AnnData:
    """Return ``reference`` registered with its cell types for ``model_cls``'s fine-tuning.

    A reference registered by ``model_cls.setup_anndata(labels_key=labels_key)`` is returned as
    it is; any other is read into a new AnnData (its counts, labels with unlabelled cells left
    out, gene symbols) that is registered instead, so the caller's object is never modified.

    Parameters
    ----------
    model_cls
        The family's model class (its ``setup_anndata`` registers the copy).
    reference
        Labelled cells, raw counts.
    labels_key
        Column of ``reference.obs`` with the cell types.
    layer
        Layer with the counts of an unregistered reference (``None``: ``X``).
    gene_key
        ``reference.var`` column with gene symbols of an unregistered reference (``None``:
        ``var_names``).

    Returns
    -------
    A registered AnnData with the cell types in ``obs[labels_key]``.
    """
    import anndata as ad
    import numpy as np
    import pandas as pd

    from .._anndata import get_matrix
    from .._labels import reference_labels

    manager = model_cls._get_most_recent_anndata_manager(reference)
    registered = None if manager is None else manager.registry["setup_args"]
    if registered is not None and registered.get("labels_key") == labels_key:
        if layer is not None or gene_key is not None:
            raise ValueError(
                "layer= and gene_key= apply to an unregistered reference; this one was "
                "registered with setup_anndata, whose layer and var_names are used."
            )
        return reference
    keep, labels = reference_labels(reference, labels_key)
    names = reference.var_names if gene_key is None else reference.var[gene_key].astype(str)
    X = get_matrix(reference, layer)
    rows = np.flatnonzero(keep)
    ref = ad.AnnData(
        X=X[rows] if not keep.all() else X,
        obs=pd.DataFrame(
            {labels_key: pd.Categorical(labels)}, index=reference.obs_names[rows].copy()
        ),
        var=pd.DataFrame(index=pd.Index(np.asarray(names, dtype=str))),
    )
    model_cls.setup_anndata(ref, labels_key=labels_key)
    return ref


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


def proba_frame(parts: list[np.ndarray], obs_names: Sequence[str], classes: Sequence[str]):
    """Return the per-block class probabilities as one cells x classes DataFrame.

    Parameters
    ----------
    parts
        Probabilities of consecutive blocks of cells (none for an empty query).
    obs_names
        The cells, in order.
    classes
        The classifier's class names, in output order.

    Returns
    -------
    A :class:`pandas.DataFrame` indexed by ``obs_names`` with one column per class.
    """
    import numpy as np
    import pandas as pd

    proba = np.concatenate(parts) if parts else np.empty((0, len(classes)), np.float32)
    return pd.DataFrame(proba, index=pd.Index(obs_names).copy(), columns=list(classes))


class ClassifierMixin:
    """``predict`` for a model class whose ``predict_proba`` gives cells x classes."""

    #: Fine-tuned copies whose probabilities ``sft.tl.annotate(method="finetune")`` averages
    #: by default (each its own seed); more where one copy's result depends on its seed.
    fine_tune_ensemble: ClassVar[int] = 1

    def predict(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        threshold: float | None = None,
        **kwargs,
    ) -> pd.DataFrame:
        """Cell types and their probabilities (classifier head).

        Parameters
        ----------
        adata
            Cells to label (``None``: the model's AnnData), as in ``predict_proba``.
        indices
            Cells of ``adata`` to label (``None``: all).
        threshold
            Cells whose best probability is below it are labelled ``"Unassigned"`` (scBERT's
            novel-type option, whose official threshold is 0.5); ``None`` labels every cell.
        **kwargs
            Passed to the model class's ``predict_proba`` (``layer``, ``gene_key``,
            ``batch_size`` ...).

        Returns
        -------
        A DataFrame indexed by ``obs_names`` with ``label`` (categorical) and ``score`` (the
        best probability).
        """
        from .._labels import labels_from_proba

        return labels_from_proba(self.predict_proba(adata, indices, **kwargs), threshold)


def variable_genes(X, match: GeneMatch, n_top: int) -> list[int]:
    """Model ids of the ``n_top`` most variable genes of cells ``X`` among those matched.

    scanpy's ``highly_variable_genes(flavor="seurat")`` on counts per 10,000 then ``log1p``
    (the official scGPT tutorials' HVG step), over the genes the model knows; ids as in
    ``match.index`` (vocabulary ids, or positions in the model's gene list), sorted.
    """
    import anndata as ad
    import numpy as np
    from scanpy.pp import highly_variable_genes

    from .._lognorm import log1p_per_10k

    columns = np.flatnonzero(match.matched)
    if columns.size <= n_top:
        return sorted(int(i) for i in match.index[columns])
    lognorm = ad.AnnData(log1p_per_10k(X, columns, dtype=np.float32))
    table = highly_variable_genes(lognorm, n_top_genes=n_top, flavor="seurat", inplace=False)
    chosen = columns[np.asarray(table["highly_variable"], dtype=bool)]
    return sorted(int(i) for i in match.index[chosen])
