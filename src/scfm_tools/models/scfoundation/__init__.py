"""scFoundation (biomap-research/scFoundation): module, checkpoints, embeddings, RDA, annotation."""

from ._checkpoint import (
    CONFIG_FILE,
    ENTRIES,
    GENE_INDEX_FILE,
    SAFETENSORS_FILE,
    entry_for,
    load_scfoundation_checkpoint,
    module_config,
    official_entry,
    read_gene_index,
    read_scfoundation_config,
    read_scfoundation_entry,
    write_scfoundation_safetensors,
)
from ._classifier import SCFoundationClassifierHead, max_over_genes
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
from ._training_plan import (
    CLASSIFIER_TARGET_DEPTH,
    SCFoundationTrainingPlan,
    corrupt_selected,
    mask_values,
    rda_pairs,
)

__all__ = [
    "CLASSIFIER_TARGET_DEPTH",
    "CONFIG_FILE",
    "ENTRIES",
    "GENE_INDEX_FILE",
    "SAFETENSORS_FILE",
    "AutoDiscretizationEmbedding",
    "GeneReindexer",
    "ParsedDepth",
    "SCFoundation",
    "SCFoundationClassifierHead",
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
    "max_over_genes",
    "model_values",
    "module_config",
    "official_entry",
    "parse_target_depth",
    "pool_cells",
    "rda_pairs",
    "read_gene_index",
    "read_scfoundation_config",
    "read_scfoundation_entry",
    "sequences",
    "write_scfoundation_safetensors",
]
