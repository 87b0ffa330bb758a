"""CellPLM (OmicsML/CellPLM): module, official checkpoints, embedding, imputation, pretraining."""

from ._checkpoint import IGNORED_PREFIXES, load_cellplm_checkpoint, module_config
from ._embed import cell_noise, embed_matrix, official_generator
from ._masking import mask_sequence
from ._model import CellPLM
from ._module import CellNoise, CellPLMModule, nb_nll
from ._sequences import batch_codes, sequence_rows
from ._training_plan import CellPLMTrainingPlan, SequenceDataSplitter

__all__ = [
    "IGNORED_PREFIXES",
    "CellNoise",
    "CellPLM",
    "CellPLMModule",
    "CellPLMTrainingPlan",
    "SequenceDataSplitter",
    "batch_codes",
    "cell_noise",
    "embed_matrix",
    "load_cellplm_checkpoint",
    "mask_sequence",
    "module_config",
    "nb_nll",
    "official_generator",
    "sequence_rows",
]
