"""A tiny random-weight scFoundation checkpoint in the official ``models.ckpt`` layout."""

from __future__ import annotations

from pathlib import Path

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
