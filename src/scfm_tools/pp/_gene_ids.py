"""Offline gene identifiers: ID-type detection and the shipped Ensembl <-> symbol table.

The table ``scfm_tools/data/gencode_v44_genes.tsv.gz`` maps every human GENCODE v44 gene
(62,754 Ensembl gene IDs, 61,267 distinct symbols) to its symbol. It ships inside the package, so
matching symbols against Ensembl IDs never needs the network. It is built by
``scripts/build_gene_table.py`` from the GENCODE v44 table distributed with ``celltypist``
(MIT). There is no mouse table: mouse Ensembl IDs (``ENSMUSG...``) are recognised, but can only
be matched against a vocabulary of mouse Ensembl IDs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache
from importlib.resources import files
from typing import Literal

import numpy as np
import pandas as pd

__all__ = [
    "IdType",
    "classify_ids",
    "detect_id_type",
    "ensembl_to_symbol",
    "gene_table",
    "majority_id_type",
    "strip_version",
    "symbol_to_ensembl",
]

IdType = Literal["symbol", "ensembl", "ensembl_mouse", "unknown"]

GENE_TABLE_FILE = "gencode_v44_genes.tsv.gz"

# An optional version suffix (".16") and GENCODE's pseudo-autosomal "_PAR_Y" tag are not part
# of the stable ID; both are dropped before comparing.
_HUMAN = re.compile(r"^ENSG\d{11}(?:\.\d+)?(?:_PAR_Y)?$")
_MOUSE = re.compile(r"^ENSMUSG\d{11}(?:\.\d+)?(?:_PAR_Y)?$")
_SUFFIX = re.compile(r"(?:\.\d+)?(?:_PAR_Y)?$")


def _as_str_array(names: Iterable) -> np.ndarray:
    """Names as an object array of stripped strings, with missing values as ``""``."""
    values = names if isinstance(names, pd.Series | pd.Index) else pd.Series(list(names))
    mask = pd.isna(values)
    return np.array(
        ["" if m else str(v).strip() for v, m in zip(values, mask, strict=True)], dtype=object
    )


def _kind(name: str) -> str:
    if not name:
        return ""
    if name.startswith("ENSG") and _HUMAN.match(name):
        return "ensembl"
    if name.startswith("ENSMUSG") and _MOUSE.match(name):
        return "ensembl_mouse"
    return "symbol"


def classify_ids(names: Iterable) -> np.ndarray:
    """Classify each name as ``"ensembl"`` (human), ``"ensembl_mouse"``, ``"symbol"`` or ``""``.

    ``""`` marks a missing or empty name.
    """
    return np.array([_kind(name) for name in _as_str_array(names)], dtype=object)


def majority_id_type(kinds: np.ndarray) -> IdType:
    """Return the most common ID type among ``kinds`` (from :func:`classify_ids`), blanks aside."""
    kinds = kinds[kinds != ""]
    if kinds.size == 0:
        return "unknown"
    values, counts = np.unique(kinds.astype(str), return_counts=True)
    return str(values[np.argmax(counts)])  # type: ignore[return-value]


def detect_id_type(names: Iterable) -> IdType:
    """Say which ID type most of ``names`` are: ``"symbol"``, ``"ensembl"``, ``"ensembl_mouse"``.

    Returns ``"unknown"`` when no name is given. Versioned IDs (``ENSG00000141510.16``) count as
    Ensembl IDs. The majority decides, so a symbol list holding a few unmapped Ensembl IDs (common
    after a symbol conversion) is still a symbol list.
    """
    return majority_id_type(classify_ids(names))


def strip_version(names: Iterable, kinds: np.ndarray | None = None) -> np.ndarray:
    """Drop Ensembl version suffixes (``ENSG00000141510.16`` -> ``ENSG00000141510``).

    Only names that look like Ensembl gene IDs are changed (``kinds`` from
    :func:`classify_ids` may be passed to skip classifying again); symbols such as
    ``RP11-34P13.3`` keep their dots.
    """
    arr = _as_str_array(names)
    kinds = classify_ids(arr) if kinds is None else kinds
    out = arr.copy()
    for i in np.flatnonzero((kinds == "ensembl") | (kinds == "ensembl_mouse")):
        out[i] = _SUFFIX.sub("", arr[i])
    return out


@lru_cache(maxsize=1)
def gene_table() -> pd.DataFrame:
    """Load the shipped GENCODE v44 table: columns ``gene_id`` (no version), ``gene_name``."""
    path = files("scfm_tools").joinpath("data", GENE_TABLE_FILE)
    with path.open("rb") as fh:
        table = pd.read_csv(fh, sep="\t", comment="#", compression="gzip", dtype=str)
    return table


@lru_cache(maxsize=1)
def _id_to_symbol() -> dict[str, str]:
    table = gene_table()
    return dict(zip(table["gene_id"], table["gene_name"], strict=True))


@lru_cache(maxsize=1)
def _symbol_to_ids() -> dict[str, tuple[str, ...]]:
    table = gene_table()
    out: dict[str, list[str]] = {}
    for gene_id, symbol in zip(table["gene_id"], table["gene_name"], strict=True):
        out.setdefault(symbol, []).append(gene_id)
    return {symbol: tuple(ids) for symbol, ids in out.items()}


def ensembl_to_symbol(ids: Iterable) -> np.ndarray:
    """Map human Ensembl gene IDs (version suffixes allowed) to symbols; ``None`` where unknown."""
    table = _id_to_symbol()
    return np.array([table.get(i) for i in strip_version(ids)], dtype=object)


def symbol_to_ensembl(symbol: str) -> tuple[str, ...]:
    """All human Ensembl gene IDs carrying ``symbol`` (empty when the symbol is unknown).

    Most symbols have one ID; some (e.g. genes on alternative haplotypes, ``5S_rRNA``) have
    several, in the table's genomic order.
    """
    return _symbol_to_ids().get(symbol, ())
