"""Build the offline Ensembl gene ID <-> symbol table shipped in ``scfm_tools/data``.

Usage (from the repository root)::

    python scripts/build_gene_table.py [SOURCE_CSV_GZ] [--out OUT_TSV_GZ]

``SOURCE_CSV_GZ`` defaults to
``../shared/data/prior_knowledge/gencode_v44_geneid_to_symbol.csv.gz`` (relative to the repository
root): a two-column CSV without header (Ensembl gene ID, gene symbol), the GENCODE v44 table shipped
with the MIT-licensed ``celltypist`` package as
``celltypist/data/samples/GENCODEv44_Gene_id2name.csv``.
The output is a gzip-compressed TSV with two comment lines naming the source, a header
``gene_id<TAB>gene_name`` and one row per gene in the source order, version suffixes removed.
It is written with a fixed gzip timestamp, so rebuilding from the same source gives identical bytes.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import re
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = (
    REPO.parent / "shared" / "data" / "prior_knowledge" / "gencode_v44_geneid_to_symbol.csv.gz"
)
DEFAULT_OUT = REPO / "src" / "scfm_tools" / "data" / "gencode_v44_genes.tsv.gz"

HEADER_COMMENT = (
    "# Ensembl gene ID -> gene symbol, GENCODE v44 (human), {n} genes; built by "
    "scripts/build_gene_table.py\n"
    "# source: celltypist 1.7.1 celltypist/data/samples/GENCODEv44_Gene_id2name.csv "
    "(MIT license; GENCODE data are openly available); source sha256 {sha}\n"
)
_ENSG = re.compile(r"^ENSG\d{11}$")


def build(source: Path, out: Path) -> pd.DataFrame:
    """Read ``source``, check it, and write the shipped table to ``out``."""
    raw = source.read_bytes()
    table = pd.read_csv(
        io.BytesIO(raw), compression="gzip", header=None, names=["gene_id", "gene_name"], dtype=str
    )
    table["gene_id"] = table["gene_id"].str.strip().str.replace(r"\.\d+$", "", regex=True)
    table["gene_name"] = table["gene_name"].str.strip()
    table = table.dropna()
    bad = table.loc[~table["gene_id"].str.match(_ENSG), "gene_id"]
    if len(bad):
        raise ValueError(f"{len(bad)} rows hold no human Ensembl gene ID, e.g. {list(bad[:3])}")
    if table["gene_id"].duplicated().any():
        raise ValueError("the source lists some Ensembl gene IDs twice")
    text = HEADER_COMMENT.format(n=len(table), sha=hashlib.sha256(raw).hexdigest())
    text += table.to_csv(sep="\t", index=False, lineterminator="\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as fh, gzip.GzipFile(fileobj=fh, mode="wb", mtime=0, filename="") as gz:
        gz.write(text.encode("utf-8"))
    return table


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if not args.source.exists():
        print(f"source table not found: {args.source}", file=sys.stderr)
        return 1
    table = build(args.source, args.out)
    n_sym = table["gene_name"].nunique()
    print(f"wrote {args.out}: {len(table)} genes, {n_sym} distinct symbols")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
