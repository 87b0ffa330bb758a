"""The interface every family's model class offers to ``sft.tl``: load, describe, run."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

if TYPE_CHECKING:
    from anndata import AnnData

    from ...hub import Family, ResolvedModel
    from ...pp._match_genes import GeneMatch

__all__ = ["PretrainedMixin", "ValuesNeeded", "unbound_registry"]

#: What values a family reads: ``"counts"`` (raw counts, refused otherwise),
#: ``"counts_or_lognorm"`` (counts preferred; log-normalised values work, with a warning) or
#: ``"own"`` (the family checks the values itself, against its own options).
ValuesNeeded = Literal["counts", "counts_or_lognorm", "own"]


def unbound_registry(model_name: str) -> dict[str, Any]:
    """Return an empty scvi-tools registry, for a model built from weights alone (no AnnData).

    scvi-tools models are built around an AnnData or a saved registry; a pretrained model used
    only for inference streams over whatever AnnData it is given, so it registers none.
    """
    import scvi

    return {
        "scvi_version": scvi.__version__,
        "model_name": model_name,
        "setup_method_name": "setup_anndata",
        "setup_args": {},
        "field_registries": {},
    }


class PretrainedMixin:
    """Loading and describing a pretrained model; mixed into each family's model class.

    A model built by :meth:`from_pretrained` without an AnnData is *unbound*: it cannot be
    trained until built around a registered AnnData, but all its inference methods stream over
    any AnnData they are given (backed included).
    """

    family: ClassVar[Family]
    values_needed: ClassVar[ValuesNeeded] = "counts"
    #: Whether a cell's outputs depend on that cell alone, so that any row chunk can run on
    #: its own (False for CellPLM, whose cells attend to the other cells of their sequence).
    reads_cells_alone: ClassVar[bool] = True
    pretrained_: dict[str, Any]
    gene_match: GeneMatch | None

    @classmethod
    def locate(cls, name_or_path: str | os.PathLike | ResolvedModel) -> ResolvedModel:
        """Find the files of a registered name or a local checkpoint of this family.

        Parameters
        ----------
        name_or_path
            A registered model name, a checkpoint path, or an already located model.

        Returns
        -------
        The :class:`~scfm_tools.hub.ResolvedModel` (files, sha256 of the weights).
        """
        from ...hub import ResolvedModel, load

        if isinstance(name_or_path, ResolvedModel):
            if name_or_path.family != cls.family:
                raise ValueError(
                    f"{name_or_path.name!r} is a {name_or_path.family} model, not {cls.family}."
                )
            return name_or_path
        if not isinstance(name_or_path, str | os.PathLike):
            raise TypeError(
                f"a model must be a registered name or a checkpoint path, got "
                f"{type(name_or_path).__name__} {name_or_path!r}."
            )
        return load(name_or_path, family=cls.family)

    @classmethod
    def pretrained_options(
        cls, task: str, options: Mapping[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Split a tl call's family options into weight-choosing ones and run options.

        Most checkpoints hold one set of weights; a family whose checkpoint holds several
        (scFoundation) picks them by task and option here.

        Parameters
        ----------
        task
            The method that will run (e.g. ``"get_latent_representation"``).
        options
            The family options given to the tl function.

        Returns
        -------
        ``(from_pretrained keyword arguments, options left for the method)``.
        """
        return {}, dict(options)

    def _set_pretrained(self, resolved: ResolvedModel, report: Any = None, **extra: Any) -> None:
        self.pretrained_ = {
            "source": resolved.name,
            "weights_sha256": resolved.sha256,
            **({"clean": report.clean, "report": str(report)} if report is not None else {}),
            **extra,
        }

    @classmethod
    def _build(cls, *args: Any, **kwargs: Any) -> PretrainedMixin:
        """Construct a model whose weights are about to be overwritten by a checkpoint's.

        The fresh module's random initialisation must not move the caller's random state.
        """
        from .._load_report import build_without_moving_rng

        return build_without_moving_rng(cls, *args, **kwargs)

    def __repr__(self) -> str:
        # scvi-tools' own repr prints a table and returns an empty string.
        source = getattr(self, "pretrained_", None)
        extra = f"; from {source['source']}" if source else ""
        trained = getattr(self, "is_trained_", False)
        return f"{getattr(self, '_model_summary_string', '')}{extra}; trained: {trained}"

    def _model_genes(self) -> Any:
        """Return the vocabulary or gene list that :meth:`match_genes` matches against."""
        raise NotImplementedError

    def match_genes(self, adata: AnnData, gene_key: str | None = None) -> GeneMatch:
        """Match the genes of ``adata`` (``var_names`` or ``var[gene_key]``) to the model's.

        Parameters
        ----------
        adata
            The AnnData.
        gene_key
            ``adata.var`` column with gene symbols or Ensembl IDs (``None``: ``var_names``).

        Returns
        -------
        The match (model index of each gene, matched mask, overlap), logged; too small an
        overlap is refused.
        """
        from ...pp._match_genes import match_adata_genes

        bound = getattr(self, "adata", None)
        if gene_key is None and bound is not None and adata.var_names.equals(bound.var_names):
            return self.gene_match
        caller = type(self).__name__
        return match_adata_genes(adata, self._model_genes(), gene_key=gene_key, caller=caller)

    def _cells(self, adata: AnnData | None, indices: Sequence[int] | None) -> AnnData:
        """Return the cells to run on: ``adata`` (``None``: the model's own), rows ``indices``."""
        import numpy as np

        if adata is None:
            adata = getattr(self, "adata", None)
            if adata is None:
                raise ValueError("this model has no AnnData attached; pass `adata=`.")
        return adata if indices is None else adata[np.asarray(indices)]

    @property
    def model_name(self) -> str:
        """The registered name or checkpoint the weights came from (else the class name)."""
        source = getattr(self, "pretrained_", None) or {}
        return str(source.get("source", type(self).__name__))

    def params(self) -> dict[str, Any]:
        """Return what to record about the model in ``adata.uns[key]["params"]``."""
        source = getattr(self, "pretrained_", None) or {}
        trained = bool(getattr(self, "is_trained_", False))
        return {
            "model": self.model_name,
            "family": self.family,
            "weights_sha256": source.get("weights_sha256"),
            **({"trained_here": True} if trained else {}),
        }
