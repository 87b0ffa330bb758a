"""scGPT (bowang-lab/scGPT): the module, the AnnData-facing model, checkpoints, embedding."""

from ._checkpoint import (
    SPECIAL_TOKENS,
    LoadReport,
    add_special_tokens,
    load_scgpt_checkpoint,
    read_vocab,
    write_scgpt_checkpoint,
)
from ._embed import embed_matrix, iter_embeddings
from ._integration import SCGPTIntegration, SCGPTIntegrationPlan, tokenize_all_genes
from ._integration_module import SCGPTIntegrationModule
from ._model import SCGPT
from ._module import SCGPTModule, mask_values
from ._perturbation import SCGPTPerturbationPredictor
from ._perturbation_module import SCGPTPerturbationModule
from ._tokenizer import OFFICIAL_N_BINS, CellTokenizer, pad_cells
from ._training_plan import SCGPTTrainingPlan, TokenizeCells, tokenize_block, tokenize_minibatch

__all__ = [
    "OFFICIAL_N_BINS",
    "SCGPT",
    "SPECIAL_TOKENS",
    "CellTokenizer",
    "LoadReport",
    "SCGPTIntegration",
    "SCGPTIntegrationModule",
    "SCGPTIntegrationPlan",
    "SCGPTModule",
    "SCGPTPerturbationModule",
    "SCGPTPerturbationPredictor",
    "SCGPTTrainingPlan",
    "TokenizeCells",
    "add_special_tokens",
    "embed_matrix",
    "iter_embeddings",
    "load_scgpt_checkpoint",
    "mask_values",
    "pad_cells",
    "read_vocab",
    "tokenize_all_genes",
    "tokenize_block",
    "tokenize_minibatch",
    "write_scgpt_checkpoint",
]
