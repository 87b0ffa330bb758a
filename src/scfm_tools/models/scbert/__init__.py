"""scBERT (TencentAILabHealthcare/scBERT): module, checkpoints, embedding, training, annotation."""

from ..._labels import UNASSIGNED, labels_from_proba
from ._checkpoint import (
    GENE_LIST_FILE,
    load_scbert_checkpoint,
    read_gene2vec,
    read_gene_list,
    read_scbert_state,
)
from ._embed import embed_matrix, iter_embeddings, iter_probabilities
from ._model import CLASSES_FILE, SCBERT, compute_class_weights
from ._module import Gene2VecEmbedding, SCBERTClassifierHead, SCBERTModule, mask_tokens
from ._tokenizer import SCBERTTokenizer
from ._training_plan import SCBERTTrainingPlan

__all__ = [
    "CLASSES_FILE",
    "GENE_LIST_FILE",
    "SCBERT",
    "UNASSIGNED",
    "Gene2VecEmbedding",
    "SCBERTClassifierHead",
    "SCBERTModule",
    "SCBERTTokenizer",
    "SCBERTTrainingPlan",
    "compute_class_weights",
    "embed_matrix",
    "iter_embeddings",
    "iter_probabilities",
    "labels_from_proba",
    "load_scbert_checkpoint",
    "mask_tokens",
    "read_gene2vec",
    "read_gene_list",
    "read_scbert_state",
]
