"""Read gene sets from a GMT file (the Broad/MSigDB format that Reactome and others publish)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["read_gmt"]


def read_gmt(
    path: str | os.PathLike, *, as_dict: bool = False
) -> pd.DataFrame | dict[str, list[str]]:
    """Read a GMT gene-set file (plain or gzip-compressed).

    Each line of a GMT file is one set: its name, a description (often a URL or an ID), then
    its genes, all separated by tabs. Lines with no gene are skipped; a gene listed twice in a
    set is kept once (first position), and a set name seen twice keeps its last line.

    Parameters
    ----------
    path
        A ``.gmt`` file, or a gzip-compressed one (``.gmt.gz``; recognised by its content).
    as_dict
        Return ``{set name: [genes]}`` instead of a long table.

    Returns
    -------
    pandas.DataFrame or dict
        By default a long table, one row per (set, gene), with columns ``source`` (set name),
        ``target`` (gene) and ``description``, the network format of :mod:`decoupler`. With
        ``as_dict=True``, ``{set name: [genes]}`` in file order.
    """
    import pandas as pd

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"gene-set file {path} does not exist.")
    with open(path, "rb") as fh:
        gzipped = fh.read(2) == b"\x1f\x8b"
    opener = gzip.open if gzipped else open
    sets: dict[str, list[str]] = {}
    descriptions: dict[str, str] = {}
    with opener(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            fields = line.rstrip("\r\n").split("\t")
            genes = [g.strip() for g in fields[2:] if g.strip()]
            if not genes:
                continue
            name = fields[0].strip()
            sets[name] = list(dict.fromkeys(genes))
            descriptions[name] = fields[1]
    if not sets:
        raise ValueError(
            f"no gene set found in {path}: a GMT file has one set per line, "
            "'name<TAB>description<TAB>gene<TAB>gene...'."
        )
    if as_dict:
        return sets
    rows = [(name, gene, descriptions[name]) for name, genes in sets.items() for gene in genes]
    return pd.DataFrame(rows, columns=["source", "target", "description"])
