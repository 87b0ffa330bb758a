"""Perturbation-response predictors: the baselines and the gene-embedding models.

Each learns from the observed perturbations of an AnnData
(:class:`~scfm_tools.models.perturbation.PerturbationData`) and predicts the mean
log-normalised expression of named perturbations, single genes or combinations (``"A+B"``).
``sft.tl.predict_perturbation`` is the AnnData-level entry point. scGPT's perturbation
fine-tuning lives with its family (:mod:`scfm_tools.models.scgpt`).
"""

from ._base import PerturbationPredictor
from ._baselines import AdditivePredictor, ControlPredictor, MeanPredictor
from ._data import PerturbationData, join_perturbation, split_perturbation
from ._embedded import EmbeddingPredictor, GeneEmbedder
from ._gears import GearsPredictor
from ._gears_module import GeneGraphModule
from ._linear import LinearPredictor

__all__ = [
    "AdditivePredictor",
    "ControlPredictor",
    "EmbeddingPredictor",
    "GearsPredictor",
    "GeneEmbedder",
    "GeneGraphModule",
    "LinearPredictor",
    "MeanPredictor",
    "PerturbationData",
    "PerturbationPredictor",
    "join_perturbation",
    "split_perturbation",
]
