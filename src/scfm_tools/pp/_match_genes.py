"""Match query genes to a model's gene vocabulary, by symbol or Ensembl ID, offline."""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._anndata import params_record, resolve_adata
from .._docs import DOC_ADATA, DOC_COPY, doc_params
from .._settings import logger
from .._validation import InputError, check_unique_names
from ._gene_ids import (
    IdType,
    _as_str_array,
    _id_to_symbol,
    _symbol_to_ids,
    classify_ids,
    majority_id_type,
    strip_version,
)

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = [
    "GeneMatch",
    "as_gene_match",
    "load_vocab",
    "match_adata_genes",
    "match_genes",
    "match_to_vocab",
]

VocabLike = Mapping[str, int] | Sequence[str] | str | os.PathLike

# Tokens such as "<pad>", "<cls>" or "[MASK]" are model specials, not genes.
_SPECIAL = re.compile(r"^(?:<[^<>]+>|\[[^\[\]]+\])$")
_HEADER_NAMES = {
    "gene",
    "genes",
    "gene_name",
    "gene_names",
    "gene_symbol",
    "gene_symbols",
    "symbol",
    "gene_id",
    "gene_ids",
    "ensembl_id",
    "ensembl",
    "feature_name",
    "feature_id",
    "name",
}
_EXACT, _TABLE, _CASE = 0, 1, 2
_METHOD_NAMES = np.array(["exact", "table", "case_insensitive", ""], dtype=object)


@dataclass(frozen=True, eq=False)
class GeneMatch:
    """Result of matching query genes to a vocabulary (see :func:`match_to_vocab`).

    Attributes
    ----------
    index
        Vocabulary id of each query gene, or -1 when it has no match (int64, one per query gene).
    matched
        Whether each query gene matched.
    method
        How each query gene matched: ``"exact"``, ``"table"`` (through the GENCODE v44
        symbol <-> Ensembl table), ``"case_insensitive"``, or ``""`` (no match).
    query_id_type, vocab_id_type
        Detected ID type of the query genes and of the vocabulary: ``"symbol"``, ``"ensembl"``,
        ``"ensembl_mouse"`` or ``"unknown"`` (empty input).
    n_genes
        Number of query genes.
    n_matched
        Number of query genes that matched.
    fraction
        ``n_matched / n_genes``: the fraction of query genes the model will see.
    vocab_size
        Number of distinct gene ids in the vocabulary (special tokens excluded).
    vocab_fraction
        Fraction of the vocabulary covered by the query.
    n_via_table
        Matches found through the symbol <-> Ensembl table.
    n_case_insensitive
        Matches found only by the case-insensitive symbol fallback.
    n_duplicates
        Query genes left unmatched because another query gene already took their vocabulary
        entry (each vocabulary entry is matched at most once).
    """

    index: np.ndarray
    matched: np.ndarray
    method: np.ndarray
    query_id_type: IdType
    vocab_id_type: IdType
    n_genes: int
    n_matched: int
    fraction: float
    vocab_size: int
    vocab_fraction: float
    n_via_table: int
    n_case_insensitive: int
    n_duplicates: int

    def summary(self) -> dict[str, Any]:
        """Return the overlap report as plain values (what ``match_genes`` stores in ``.uns``)."""
        return {
            "n_genes": self.n_genes,
            "n_matched": self.n_matched,
            "fraction": self.fraction,
            "vocab_size": self.vocab_size,
            "vocab_fraction": self.vocab_fraction,
            "query_id_type": self.query_id_type,
            "vocab_id_type": self.vocab_id_type,
            "n_via_table": self.n_via_table,
            "n_case_insensitive": self.n_case_insensitive,
            "n_duplicates": self.n_duplicates,
        }

    def describe(self) -> str:
        """One line saying how many genes matched, for logs and error messages."""
        text = (
            f"{self.n_matched:,} of {self.n_genes:,} query genes ({self.fraction:.1%}) matched "
            f"the vocabulary, covering {self.vocab_fraction:.1%} of its {self.vocab_size:,} "
            f"genes (query IDs: {self.query_id_type}, vocabulary IDs: {self.vocab_id_type})"
        )
        extra = []
        if self.n_via_table:
            extra.append(f"{self.n_via_table:,} through the GENCODE v44 symbol<->Ensembl table")
        if self.n_case_insensitive:
            extra.append(f"{self.n_case_insensitive:,} case-insensitively")
        if self.n_duplicates:
            extra.append(f"{self.n_duplicates:,} dropped as duplicates of a matched gene")
        return text + (f"; {', '.join(extra)}" if extra else "")


def load_vocab(path: str | os.PathLike) -> dict[str, int]:
    """Read a gene vocabulary file into ``{gene: id}``.

    Parameters
    ----------
    path
        A JSON file holding ``{gene: id}`` (scGPT's ``vocab.json``) or a list of genes, or a text
        file with one gene per line in its first column (tab-separated; comma-separated for
        ``.csv``), such as scFoundation's ``OS_scRNA_gene_index.19264.tsv``. In a text file the
        ids are the 0-based line positions, lines starting with ``#`` are skipped, and a header
        line is recognised when its first field is a column name such as ``gene_name``,
        ``gene_symbol`` or ``gene_id``. Files may be gzip-compressed (``.gz``).

    Returns
    -------
    ``{gene: id}``; a gene listed twice keeps its first id.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vocabulary file {str(path)!r} does not exist.")
    name = path.name.lower().removesuffix(".gz")
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        if name.endswith(".json"):
            obj = json.load(fh)
            if isinstance(obj, dict) and all(
                isinstance(v, int | np.integer) and not isinstance(v, bool) for v in obj.values()
            ):
                return {str(k): int(v) for k, v in obj.items()}
            if isinstance(obj, list) and all(isinstance(g, str) for g in obj):
                return _positions(obj)
            raise InputError(
                f"{path.name} is not a gene vocabulary: a JSON vocabulary must be a "
                "{gene: integer id} object or a list of gene names. For a model config that "
                "holds a gene list under some key (e.g. CellPLM's 'gene_list'), pass that list, "
                "e.g. `vocab=json.load(open(path))['gene_list']`."
            )
        sep = "," if name.endswith(".csv") else "\t"
        genes = []
        for line in fh:
            field = line.rstrip("\r\n").split(sep)[0].strip().strip('"')
            if field and not field.startswith("#"):
                genes.append(field)
    if genes and genes[0].lower() in _HEADER_NAMES:
        genes = genes[1:]
    if not genes:
        raise InputError(f"vocabulary file {path.name} lists no genes.")
    return _positions(genes)


def _positions(genes: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for i, gene in enumerate(genes):
        out.setdefault(str(gene), i)
    return out


def _as_mapping(vocab: VocabLike) -> dict[str, int]:
    if isinstance(vocab, str | os.PathLike):
        return load_vocab(vocab)
    if isinstance(vocab, Mapping):
        out = {}
        for key, value in vocab.items():
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise TypeError(
                    f"vocabulary ids must be integers, got {value!r} for {key!r}; pass "
                    "{gene: id} or a list of genes."
                )
            out[str(key)] = int(value)
        return out
    if isinstance(vocab, Sequence | np.ndarray | pd.Index | pd.Series):
        return _positions([str(g) for g in vocab])
    raise TypeError(
        f"vocab must be a {{gene: id}} mapping, a list of genes or a path to a vocabulary file, "
        f"got {type(vocab).__name__}."
    )


def match_to_vocab(
    genes: Sequence[str] | pd.Index | np.ndarray,
    vocab: VocabLike,
    *,
    case_insensitive: bool = True,
) -> GeneMatch:
    """Match query genes to a model vocabulary; the AnnData-free core of :func:`match_genes`.

    Query genes and vocabulary entries may be gene symbols or Ensembl gene IDs (human
    ``ENSG...``; mouse ``ENSMUSG...`` is recognised too). Version suffixes
    (``ENSG00000141510.16``) and GENCODE's ``_PAR_Y`` tag are ignored. Each query gene is
    matched by the first rule that succeeds:

    1. **exact**: the name (version-stripped for Ensembl IDs) is a vocabulary entry;
    2. **table**: a human Ensembl ID whose GENCODE v44 symbol is in the vocabulary, or a symbol
       one of whose Ensembl IDs is in the vocabulary. A symbol with several IDs (genes on
       alternative haplotypes, multi-copy RNAs) takes the ID present in the vocabulary, and if
       several are, the one with the lowest vocabulary id;
    3. **case_insensitive** (when ``case_insensitive=True``): a symbol equal, ignoring case, to
       exactly one vocabulary symbol (``C1ORF112`` -> ``C1orf112``). It is a fallback only, never
       applied to Ensembl IDs, and an ambiguous match (two vocabulary symbols differing only in
       case) is rejected.

    Each vocabulary entry is matched to at most one query gene, so the matched indices are
    unique: exact matches win over table matches over case-insensitive ones, and within a rule
    the first query gene wins. The losers count as ``n_duplicates``.

    Parameters
    ----------
    genes
        Query gene names or IDs, in ``var`` order. Missing or empty names never match.
    vocab
        ``{gene: id}`` (e.g. scGPT's vocabulary), a sequence of genes (id = position), or a path
        read by :func:`load_vocab`. Special tokens such as ``<pad>``, ``<cls>`` or ``[MASK]`` are
        not genes and are ignored.
    case_insensitive
        Allow the case-insensitive symbol fallback (rule 3).

    Returns
    -------
    A :class:`GeneMatch` with per-gene vocabulary ids and the overlap figures.
    """
    mapping = _as_mapping(vocab)
    vocab_names = np.array([k for k in mapping if not _SPECIAL.match(k)], dtype=object)
    vocab_ids = np.array([mapping[k] for k in vocab_names], dtype=np.int64)
    vocab_kinds = classify_ids(vocab_names)
    vocab_keys = strip_version(vocab_names, vocab_kinds)
    exact: dict[str, int] = {}
    for key, vid in zip(vocab_keys, vocab_ids, strict=True):
        exact.setdefault(key, int(vid))
    folded: dict[str, int] = {}
    for key, kind, vid in zip(vocab_keys, vocab_kinds, vocab_ids, strict=True):
        if kind == "symbol":
            upper = key.upper()
            # -1 marks a folded key shared by two different genes: ambiguous, never used.
            folded[upper] = int(vid) if folded.get(upper, vid) == vid else -1

    query = _as_str_array(genes)
    kinds = classify_ids(query)
    keys = strip_version(query, kinds)
    # the GENCODE tables are read only when a rule needs them (about half a second at first)
    unmatched = {kind for key, kind in zip(keys, kinds, strict=True) if kind and key not in exact}
    id_to_symbol = _id_to_symbol() if "ensembl" in unmatched else {}
    symbol_to_ids = _symbol_to_ids() if "symbol" in unmatched else {}
    n = len(keys)
    candidate = np.full(n, -1, dtype=np.int64)
    rule = np.full(n, 3, dtype=np.int64)
    for i, (key, kind) in enumerate(zip(keys, kinds, strict=True)):
        if not kind:
            continue
        if key in exact:
            candidate[i], rule[i] = exact[key], _EXACT
            continue
        if kind == "ensembl":
            symbol = id_to_symbol.get(key)
            if symbol is not None and symbol in exact:
                candidate[i], rule[i] = exact[symbol], _TABLE
                continue
        elif kind == "symbol":
            hits = [exact[g] for g in symbol_to_ids.get(key, ()) if g in exact]
            if hits:
                candidate[i], rule[i] = min(hits), _TABLE
                continue
            if case_insensitive and folded.get(key.upper(), -1) >= 0:
                candidate[i], rule[i] = folded[key.upper()], _CASE

    index = np.full(n, -1, dtype=np.int64)
    taken: set[int] = set()
    n_duplicates = 0
    for i in np.lexsort((np.arange(n), rule)):
        vid = int(candidate[i])
        if vid < 0:
            break  # unmatched genes sort last (rule 3)
        if vid in taken:
            n_duplicates += 1
            rule[i] = 3
            continue
        taken.add(vid)
        index[i] = vid
    matched = index >= 0
    n_matched = int(matched.sum())
    vocab_size = len(np.unique(vocab_ids))
    return GeneMatch(
        index=index,
        matched=matched,
        method=_METHOD_NAMES[rule],
        query_id_type=majority_id_type(kinds),
        vocab_id_type=majority_id_type(vocab_kinds),
        n_genes=n,
        n_matched=n_matched,
        fraction=n_matched / n if n else 0.0,
        vocab_size=vocab_size,
        vocab_fraction=n_matched / vocab_size if vocab_size else 0.0,
        n_via_table=int((rule == _TABLE).sum()),
        n_case_insensitive=int((rule == _CASE).sum()),
        n_duplicates=n_duplicates,
    )


def _describe_vocab(vocab: VocabLike) -> str:
    if isinstance(vocab, str | os.PathLike):
        return str(vocab)
    kind = "mapping" if isinstance(vocab, Mapping) else "list"
    return f"<{kind} of {len(vocab)} entries>"


def _hint(
    adata: AnnData, gene_key: str | None, result: GeneMatch, vocab: dict[str, int], case: bool
) -> str:
    """Say what to try when too few genes matched, naming var columns that would match better."""
    hints = []
    if "ensembl_mouse" in (result.query_id_type, result.vocab_id_type):
        hints.append(
            "mouse Ensembl IDs only match a vocabulary of mouse Ensembl IDs (no offline mouse "
            "table ships with scfm_tools); use gene symbols if the model takes symbols"
        )
    better = []
    for col in adata.var.columns[:20]:
        values = adata.var[col]
        if col == gene_key or not (
            pd.api.types.is_object_dtype(values)
            or pd.api.types.is_string_dtype(values)
            or isinstance(values.dtype, pd.CategoricalDtype)
        ):
            continue
        other = match_to_vocab(np.asarray(values, dtype=object), vocab, case_insensitive=case)
        if other.n_matched > result.n_matched:
            better.append(f"gene_key={col!r} ({other.query_id_type}) matches {other.n_matched:,}")
    if better:
        hints.append(f"pass `gene_key=` naming a better var column: {'; '.join(better)}")
    else:
        hints.append(
            "put gene symbols or Ensembl IDs in adata.var_names, or in a var column and pass "
            "`gene_key=` naming it"
        )
    hints.append("lower `min_genes`/`min_fraction` only if you are sure the genes are right")
    return "; ".join(hints)


@doc_params(adata=DOC_ADATA, copy=DOC_COPY)
def as_gene_match(
    var_names: Sequence[str] | GeneMatch, vocab: VocabLike | None, *, n_columns: int
) -> GeneMatch:
    """Return ``var_names`` matched to ``vocab`` (or as given when already a :class:`GeneMatch`).

    For the matrix-level embedding functions of the model families: checks that there is one
    name per column of the matrix (``n_columns``).
    """
    if isinstance(var_names, GeneMatch):
        match = var_names
    else:
        if vocab is None:
            raise ValueError("pass the model's gene list (`genes`) to match var_names against.")
        match = match_to_vocab(list(var_names), vocab)
    if len(match.index) != n_columns:
        raise ValueError(f"var_names has {len(match.index)} entries but X has {n_columns} columns.")
    return match


def match_adata_genes(
    ad: AnnData,
    vocab: VocabLike,
    *,
    gene_key: str | None = None,
    min_genes: int = 10,
    min_fraction: float = 0.1,
    case_insensitive: bool = True,
    caller: str = "match_genes",
) -> GeneMatch:
    """Match an AnnData's genes to a vocabulary, log the overlap and refuse too little of it.

    The checks behind :func:`match_genes`, for every function that tokenizes an AnnData
    (parameters as there; ``caller`` prefixes the log messages). Writes nothing.
    """
    if isinstance(min_genes, bool) or not isinstance(min_genes, int) or min_genes < 0:
        raise ValueError(f"min_genes must be a non-negative integer, got {min_genes!r}.")
    if not 0.0 <= float(min_fraction) <= 1.0:
        raise ValueError(f"min_fraction must lie in [0, 1], got {min_fraction!r}.")
    if gene_key is None:
        names, where = ad.var_names, "adata.var_names"
    else:
        if gene_key not in ad.var.columns:
            raise KeyError(
                f"gene_key {gene_key!r} is not a column of adata.var (columns: "
                f"{list(ad.var.columns)}); pass one of those, or gene_key=None for var_names."
            )
        names, where = ad.var[gene_key], f"adata.var[{gene_key!r}]"
    names = pd.Series(np.asarray(names, dtype=object))
    present = names[names.notna() & (names.astype(str).str.strip() != "")].astype(str)
    check_unique_names(pd.Index(present.str.strip()), what=where)

    mapping = _as_mapping(vocab)
    result = match_to_vocab(names.to_numpy(), mapping, case_insensitive=case_insensitive)
    if result.n_matched < min_genes or result.fraction < min_fraction:
        unmatched = names[~result.matched].dropna().astype(str).tolist()[:5]
        raise InputError(
            f"too few genes match the vocabulary: only {result.n_matched:,} of "
            f"{result.n_genes:,} genes in {where} ({result.fraction:.1%}) matched, but at least "
            f"{min_genes} genes and {min_fraction:.0%} are needed. Detected ID types: query "
            f"{result.query_id_type}, vocabulary {result.vocab_id_type}. Unmatched genes, "
            f"e.g. {unmatched}. To fix: {_hint(ad, gene_key, result, mapping, case_insensitive)}."
        )

    message = f"{caller}: {result.describe()}"
    if result.fraction < 0.5:
        logger.warning(message)
    else:
        logger.info(message)
    if result.n_case_insensitive > result.n_matched / 2:
        logger.warning(
            "%s: most matches (%d of %d) differ in letter case from the vocabulary; "
            "is the data from another species than the model (e.g. mouse symbols against a "
            "human vocabulary)? Then use a model of the data's species, or put the genes' "
            "orthologs in the vocabulary's species in an adata.var column and pass it as "
            "gene_key=. `sft.pp.match_genes(adata, vocab, case_insensitive=False)` shows what "
            "matches exactly.",
            caller,
            result.n_case_insensitive,
            result.n_matched,
        )
    return result


def match_genes(
    adata: AnnData,
    vocab: VocabLike,
    *,
    gene_key: str | None = None,
    min_genes: int = 10,
    min_fraction: float = 0.1,
    case_insensitive: bool = True,
    key_added: str = "gene_match",
    copy: bool = False,
    mod: str | None = None,
) -> AnnData | None:
    """Match the genes of ``adata`` to a model's gene vocabulary and report the overlap.

    Genes are matched by symbol or Ensembl ID, offline, with the rules of
    :func:`match_to_vocab` (exact, then through the shipped GENCODE v44 symbol <-> Ensembl
    table, then a case-insensitive symbol fallback). The overlap is logged (INFO; WARNING when
    less than half of the genes match) and the call is refused when too few genes match.

    The defaults refuse only input that is clearly wrong, not merely small: real panels and
    full transcriptomes match far above them (a 200-gene panel matching 190 genes passes; a
    20,000-gene dataset of another ID type with no ``gene_key`` matches ~0%). ``min_fraction=0.1``
    stays below the ~45% that a full GENCODE gene set (~36k genes, half non-coding) reaches
    against a ~17k protein-coding vocabulary, and ``min_genes=10`` rejects near-empty overlaps
    that no foundation model can embed meaningfully.

    Parameters
    ----------
    {adata}
    vocab
        The model vocabulary: ``{{gene: id}}``, a list of genes (id = position), or a path to a
        JSON vocabulary or a text/TSV gene list (see :func:`load_vocab`).
    gene_key
        Column of ``adata.var`` holding the gene symbols or Ensembl IDs to match; ``None`` uses
        ``adata.var_names``.
    min_genes
        Refuse when fewer genes than this match.
    min_fraction
        Refuse when less than this fraction of the query genes match.
    case_insensitive
        Allow the case-insensitive symbol fallback (used only where an exact match fails).
    key_added
        Prefix of the keys written.
    {copy}
    mod
        Modality to use when ``adata`` is a MuData (default ``"rna"``).

    Returns
    -------
    ``None``, or the modified copy with ``copy=True``. Writes

    - ``adata.var[f"{{key_added}}_index"]``: vocabulary id of each gene, -1 when unmatched (int64);
    - ``adata.var[f"{{key_added}}_matched"]``: whether each gene matched (bool);
    - ``adata.uns[key_added]``: the overlap report (``n_genes``, ``n_matched``, ``fraction``,
      ``vocab_size``, ``vocab_fraction``, ``query_id_type``, ``vocab_id_type``,
      ``n_via_table``, ``n_case_insensitive``, ``n_duplicates``) and ``params``.

    Raises
    ------
    InputError
        When gene names are duplicated (resolve duplicates first), or too few genes match (the
        message gives the counts, the detected ID types, example unmatched genes and what to do).
    """
    if not isinstance(key_added, str) or not key_added:
        raise ValueError(f"key_added must be a non-empty string, got {key_added!r}.")
    obj, ad = resolve_adata(adata, copy=copy, mod=mod)
    result = match_adata_genes(
        ad,
        vocab,
        gene_key=gene_key,
        min_genes=min_genes,
        min_fraction=min_fraction,
        case_insensitive=case_insensitive,
        caller="match_genes",
    )

    ad.var[f"{key_added}_index"] = result.index
    ad.var[f"{key_added}_matched"] = result.matched
    ad.uns[key_added] = {
        **result.summary(),
        "params": params_record(
            vocab=_describe_vocab(vocab),
            gene_key=gene_key,
            min_genes=min_genes,
            min_fraction=float(min_fraction),
            case_insensitive=case_insensitive,
            mod=mod,
        ),
    }
    return obj if copy else None
