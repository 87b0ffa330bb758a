"""CellPLM (OmicsML/CellPLM): module, checkpoints, training; embed, impute, annotate, integrate."""

from ._checkpoint import IGNORED_PREFIXES, load_cellplm_checkpoint, module_config
from ._embed import cell_noise, embed_matrix, official_generator
from ._integration import CellPLMIntegration
from ._integration_module import CellPLMIntegrationModule
from ._masking import mask_input, mask_sequence
from ._model import CellPLM
from ._module import AnnotationHead, CellNoise, CellPLMModule, MergeLatentLayer, nb_nll
from ._sequences import batch_codes, sequence_rows
from ._training_plan import (
    CellPLMClassifierPlan,
    CellPLMTrainingPlan,
    LabelledSequenceSplitter,
    SequenceDataSplitter,
)

__all__ = [
    "IGNORED_PREFIXES",
    "AnnotationHead",
    "CellNoise",
    "CellPLM",
    "CellPLMClassifierPlan",
    "CellPLMIntegration",
    "CellPLMIntegrationModule",
    "CellPLMModule",
    "CellPLMTrainingPlan",
    "LabelledSequenceSplitter",
    "MergeLatentLayer",
    "SequenceDataSplitter",
    "batch_codes",
    "cell_noise",
    "embed_matrix",
    "load_cellplm_checkpoint",
    "mask_input",
    "mask_sequence",
    "module_config",
    "nb_nll",
    "official_generator",
    "sequence_rows",
]
