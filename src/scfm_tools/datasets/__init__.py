"""Real public single-cell datasets and prior-knowledge tables, verified by sha256.

Every loader looks for its file in a local mirror folder first (``sft.settings.data_dir``,
environment variable ``SCFM_TOOLS_DATA``), then in the cache, then downloads it from the base URL
in ``SCFM_TOOLS_DATA_URL``. The files are small copies staged from public repositories (see
:func:`list_datasets` for each one's source, license and sha256); they have no canonical public
URL of their own.
"""

from ._fetch import DatasetChecksumError, DatasetNotFoundError, fetch
from ._gmt import read_gmt
from ._load import (
    cellbench,
    citeseq_pbmc_tiny,
    dorothea,
    gencode_gene_table,
    panglao_markers,
    papalexi2021,
    pbmc8k,
    pbmc_3chemistries,
    reactome_pathways,
    scgpt_vocab,
)
from ._registry import list_datasets

__all__ = [
    "DatasetChecksumError",
    "DatasetNotFoundError",
    "cellbench",
    "citeseq_pbmc_tiny",
    "dorothea",
    "fetch",
    "gencode_gene_table",
    "list_datasets",
    "panglao_markers",
    "papalexi2021",
    "pbmc8k",
    "pbmc_3chemistries",
    "reactome_pathways",
    "read_gmt",
    "scgpt_vocab",
]
