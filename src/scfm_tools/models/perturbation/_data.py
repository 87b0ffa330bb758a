"""Observed perturbations of an AnnData, as every perturbation predictor reads them.

Cells are log-normalised once (counts per 10,000, then ``log1p``: scanpy's
``normalize_total(target_sum=1e4)`` and ``log1p``), and kept with their perturbation label; the
means per perturbation are what the predictors learn from, the cells what the ones that train
on cells (scGPT fine-tuning, the GEARS-style model's resampled means) draw from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from scipy import sparse

from ..._anndata import DEFAULT_CHUNK_SIZE, get_matrix, row_blocks
from ..._lognorm import log1p_per_10k

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["PerturbationData", "join_perturbation", "split_perturbation"]


def split_perturbation(name: str, sep: str = "+") -> tuple[str, ...]:
    """Return the genes of a perturbation: ``"A+B"`` -> ``("A", "B")``, sorted, no duplicates."""
    parts = [p.strip() for p in str(name).split(sep)]
    if not all(parts):
        raise ValueError(f"perturbation {name!r} has an empty gene name between {sep!r}.")
    return tuple(sorted(set(parts)))


def join_perturbation(genes: Sequence[str], sep: str = "+") -> str:
    """Return the canonical name of a perturbation of ``genes`` (sorted, joined by ``sep``)."""
    return sep.join(sorted(set(genes)))


class PerturbationData:
    """Log-normalised cells grouped by perturbation, with the control's.

    Parameters
    ----------
    X
        Cells x genes log1p of counts per 10,000 (CSR).
    labels
        Canonical perturbation name of each cell (``"A+B"`` sorted); the control's is
        ``control``.
    genes
        The read-out genes (columns of ``X``).
    control
        The control's label.
    sep
        What joins the genes of a combination.
    """

    def __init__(
        self,
        X: sparse.csr_matrix,
        labels: np.ndarray,
        genes: np.ndarray,
        control: str,
        sep: str = "+",
    ) -> None:
        self.X = sparse.csr_matrix(X, dtype=np.float32)
        self.labels = np.asarray(labels, dtype=object)
        self.genes = np.asarray(genes, dtype=object)
        self.control = control
        self.sep = sep
        names, inverse = np.unique(self.labels.astype(str), return_inverse=True)
        self.rows = {str(n): np.flatnonzero(inverse == i) for i, n in enumerate(names)}
        if control not in self.rows:
            raise ValueError(f"no cell is labelled {control!r} (the control).")
        self.means = {
            n: np.asarray(self.X[r].mean(axis=0), dtype=np.float64).ravel()
            for n, r in self.rows.items()
        }
        self.control_mean = self.means[control]
        self.perturbations = [n for n in self.rows if n != control]
        self.parts = {n: split_perturbation(n, sep) for n in self.perturbations}

    @classmethod
    def from_anndata(
        cls,
        adata: AnnData,
        perturbation_key: str,
        control: str,
        *,
        layer: str | None = None,
        sep: str = "+",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> PerturbationData:
        """Read the counts of ``adata`` (checked by the caller) and its perturbation labels."""
        X = sparse.vstack(
            [
                log1p_per_10k(b, dtype=np.float32)
                for b in row_blocks(get_matrix(adata, layer), chunk_size=chunk_size)
            ],
            format="csr",
        )
        raw = adata.obs[perturbation_key].astype(str).to_numpy()
        labels = np.array(
            [
                r if r == control else join_perturbation(split_perturbation(r, sep), sep)
                for r in raw
            ],
            dtype=object,
        )
        return cls(X, labels, np.asarray(adata.var_names), control, sep)

    @property
    def singles(self) -> dict[str, str]:
        """Gene -> the name of its single perturbation, for the singles observed."""
        return {p[0]: n for n, p in self.parts.items() if len(p) == 1}

    def delta(self, name: str) -> np.ndarray:
        """Observed mean of ``name`` minus the control mean."""
        return self.means[name] - self.control_mean

    def subset(self, names: Sequence[str]) -> PerturbationData:
        """Keep the control and the perturbations ``names`` only (e.g. a training fold)."""
        keep = {self.control, *names}
        rows = np.flatnonzero(np.isin(self.labels, list(keep)))
        return PerturbationData(self.X[rows], self.labels[rows], self.genes, self.control, self.sep)
