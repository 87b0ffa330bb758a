"""Preprocessing: value binning, read-depth-aware downsampling, gene-vocabulary matching."""

from ._binning import bin_values
from ._match_genes import GeneMatch, load_vocab, match_genes, match_to_vocab
from ._rda import downsample_rda

__all__ = [
    "GeneMatch",
    "bin_values",
    "downsample_rda",
    "load_vocab",
    "match_genes",
    "match_to_vocab",
]
