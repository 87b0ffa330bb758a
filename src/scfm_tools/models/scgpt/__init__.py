"""scGPT (bowang-lab/scGPT): the module, official-checkpoint loading, zero-shot embedding."""

from ._checkpoint import SPECIAL_TOKENS, LoadReport, load_scgpt_folder, read_vocab
from ._embed import embed_matrix, iter_embeddings
from ._module import SCGPTModule, mask_values
from ._tokenizer import OFFICIAL_N_BINS, CellTokenizer, pad_cells

__all__ = [
    "OFFICIAL_N_BINS",
    "SPECIAL_TOKENS",
    "CellTokenizer",
    "LoadReport",
    "SCGPTModule",
    "embed_matrix",
    "iter_embeddings",
    "load_scgpt_folder",
    "mask_values",
    "pad_cells",
    "read_vocab",
]
