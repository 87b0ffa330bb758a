"""The shared real datasets the scripts train on: read one, or concatenate several unlabelled.

The folder is ``../shared/data`` beside the repository, or ``$SFT_DATA``.
"""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("SFT_DATA", REPO.parent / "shared" / "data"))
# The shared files with full or broad gene panels, which the CellPLM, scBERT and scFoundation
# defaults pretrain on (their labels unused).
PRETRAINING_FILES = (
    "pbmc_10x_3chemistries_unlabeled.h5ad",
    "cellbench_3celllines_celseq2_dropseq.h5ad",
    "pbmc8k_200genes_labeled.h5ad",
    "norman2019_crispra_k562_500hvg.h5ad",
)


def read(name: str) -> ad.AnnData:
    """Read one of the shared real datasets."""
    path = DATA_DIR / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: set SFT_DATA to the folder holding the shared datasets."
        )
    return ad.read_h5ad(path)


def unlabelled_union(files: tuple[str, ...]) -> ad.AnnData:
    """Concatenate the files' counts over the union of their genes, labels removed.

    ``obs["dataset"]`` names each cell's file. A gene absent from a file is stored as zero:
    exactly what the file says about it ("not measured" reads as "not expressed").
    """
    parts = {}
    for name in files:
        adata = read(name)
        parts[name] = ad.AnnData(X=adata.X.astype(np.float32), obs=adata.obs[[]], var=adata.var[[]])
    adata = ad.concat(parts, join="outer", label="dataset", index_unique="-")
    adata.X = adata.X.tocsr()
    return adata
