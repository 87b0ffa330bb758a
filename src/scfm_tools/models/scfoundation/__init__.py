"""scFoundation (biomap-research/scFoundation): module, official checkpoints, embeddings, RDA."""

from ._checkpoint import (
    ENTRIES,
    GENE_INDEX_FILE,
    entry_for,
    load_scfoundation_checkpoint,
    module_config,
    official_entry,
    read_gene_index,
    read_scfoundation_entry,
)
from ._embed import embed_matrix, iter_outputs
from ._model import SCFoundation
from ._module import (
    AutoDiscretizationEmbedding,
    SCFoundationDecoder,
    SCFoundationEncoder,
    SCFoundationModule,
    gather_tokens,
    pool_cells,
)
from ._preprocess import GeneReindexer, ParsedDepth, model_values, parse_target_depth, sequences
from ._training_plan import SCFoundationTrainingPlan, corrupt_selected, mask_values, rda_pairs

__all__ = [
    "ENTRIES",
    "GENE_INDEX_FILE",
    "AutoDiscretizationEmbedding",
    "GeneReindexer",
    "ParsedDepth",
    "SCFoundation",
    "SCFoundationDecoder",
    "SCFoundationEncoder",
    "SCFoundationModule",
    "SCFoundationTrainingPlan",
    "corrupt_selected",
    "embed_matrix",
    "entry_for",
    "gather_tokens",
    "iter_outputs",
    "load_scfoundation_checkpoint",
    "mask_values",
    "model_values",
    "module_config",
    "official_entry",
    "parse_target_depth",
    "pool_cells",
    "rda_pairs",
    "read_gene_index",
    "read_scfoundation_entry",
    "sequences",
]
