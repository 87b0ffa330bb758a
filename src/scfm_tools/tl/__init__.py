"""Tools: tasks that run a model on AnnData and write the results back into it."""

from ._annotate import annotate
from ._embed_cells import embed_cells
from ._embed_genes import embed_genes
from ._gene_modules import gene_modules
from ._grn import grn
from ._grn_score import grn_score
from ._impute import impute
from ._integrate import integrate
from ._perturbation_metrics import perturbation_metrics
from ._predict_perturbation import predict_perturbation

__all__ = [
    "annotate",
    "embed_cells",
    "embed_genes",
    "gene_modules",
    "grn",
    "grn_score",
    "impute",
    "integrate",
    "perturbation_metrics",
    "predict_perturbation",
]
