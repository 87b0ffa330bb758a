"""scFoundation test helpers: a tiny random-weight checkpoint in the official ``models.ckpt``
layout, and the log-normalised input with total counts of the official ``pre_normalized="A"``."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import scanpy as sc
import torch

from scfm_tools.models.scfoundation import SCFoundationModule, official_entry, read_gene_index

TINY = {
    "enc_dim": 8,
    "enc_depth": 1,
    "enc_heads": 2,
    "dec_dim": 8,
    "dec_depth": 1,
    "dec_heads": 2,
    "dec_dim_head": 4,
}


def tiny_module(seed: int = 0, **kwargs) -> SCFoundationModule:
    """A random module on the published 19,264 genes, with tiny widths."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SCFoundationModule(len(read_gene_index()), **{**TINY, **kwargs})


def tiny_checkpoint(folder: Path, seed: int = 0) -> Path:
    """Write ``models.ckpt`` (same weights in its three entries) into ``folder``."""
    entry = official_entry(tiny_module(seed))
    path = Path(folder) / "models.ckpt"
    torch.save({"cell": entry, "gene": entry, "rde": entry}, path)
    return path


def add_lognorm_and_totals(adata: ad.AnnData) -> None:
    """Add ``layers["lognorm"]`` (log1p per 10,000) and ``obs["total_counts"]`` of its counts."""
    norm = adata.copy()
    sc.pp.normalize_total(norm, target_sum=1e4)
    sc.pp.log1p(norm)
    adata.layers["lognorm"] = norm.X
    adata.obs["total_counts"] = np.asarray(adata.X.sum(axis=1)).ravel()
