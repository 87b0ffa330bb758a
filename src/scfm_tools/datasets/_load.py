"""Loaders: one function per registered dataset, returning the object a user works with."""

from __future__ import annotations

import gzip
import json
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal, TypeVar

from .._docs import doc_params
from ._fetch import fetch
from ._registry import get_record

if TYPE_CHECKING:
    import pandas as pd
    from anndata import AnnData
    from mudata import MuData

__all__ = [
    "cellbench",
    "citeseq_pbmc_tiny",
    "dorothea",
    "gencode_gene_table",
    "panglao_markers",
    "papalexi2021",
    "pbmc8k",
    "pbmc_3chemistries",
    "reactome_pathways",
    "scgpt_vocab",
]

F = TypeVar("F", bound=Callable)


def _source_doc(*names: str) -> str:
    """Build the Notes text of a loader: file, sha256, source repository, license, citation."""
    records = [get_record(name) for name in names]
    parts = [
        f"File ``{rec.filename}`` ({rec.size:,} bytes, sha256 ``{rec.sha256}``), from "
        f"repository ``{rec.repository}`` (commit ``{rec.commit}``), ``{rec.source_path}``. "
        f"License: {rec.license}."
        for rec in records
    ]
    citations = dict.fromkeys(rec.citation for rec in records)
    parts += [f"Citation: {citation}." for citation in citations]
    return "\n\n".join(parts)


_FETCH_DOC = (
    "The file is read from the local mirror ``sft.settings.data_dir`` (environment variable\n"
    "``SCFM_TOOLS_DATA``), else the cache, else downloaded from ``SCFM_TOOLS_DATA_URL``; see\n"
    ":func:`~scfm_tools.datasets.fetch`."
)


def _documented(*names: str) -> Callable[[F], F]:
    return doc_params(source=_source_doc(*names), fetch=_FETCH_DOC)


def _read_h5ad(name: str) -> AnnData:
    import anndata as ad

    return ad.read_h5ad(fetch(name))


@_documented("cellbench")
def cellbench() -> AnnData:
    """CellBench: three lung adenocarcinoma cell lines profiled with CEL-seq2 and Drop-seq.

    Equal mixture of H1975, H2228 and HCC827 cells; the label (cell line) comes from genotype
    demultiplexing, so it is independent of expression. Two protocols give two batches, which
    makes this a small batch-integration benchmark with known groups.

    {fetch}

    Returns
    -------
    anndata.AnnData
        450 cells x 11,533 genes. Raw integer UMI counts in ``X`` (sparse), gene symbols as
        ``var_names`` (Ensembl IDs in ``var["gene_ids"]``); ``obs["cell_type"]`` (H1975 182,
        HCC827 136, H2228 132), ``obs["batch"]`` (``sc_celseq2`` 240, ``sc_dropseq`` 210),
        ``obs["protocol"]``.

    Notes
    -----
    {source}
    """
    return _read_h5ad("cellbench")


@_documented("pbmc8k")
def pbmc8k() -> AnnData:
    """PBMC8k (10x Genomics) with cell-type labels, reduced to 200 genes.

    Processed following the Bioconductor OSCA workflow and shipped by the Julia package scVI.jl;
    the labels are automated, reference-based annotations, not manual curation.

    {fetch}

    Returns
    -------
    anndata.AnnData
        7,480 cells x 200 genes. Raw integer UMI counts in ``X``; ``obs["cell_type"]``
        (CD8+ T-cells 2,740, Monocytes 1,583, CD4+ T-cells 1,541, B-cells 1,167, NK cells 408,
        NA 32, HSC 8, Erythrocytes 1) and ``obs["batch"]``.

    Notes
    -----
    {source}
    """
    return _read_h5ad("pbmc8k")


@_documented("pbmc_3chemistries")
def pbmc_3chemistries() -> AnnData:
    """Three 10x Genomics PBMC runs of different chemistries, without cell-type labels.

    3' v2 "1k PBMC" (954 cells), 3' v3 "1k PBMC" (906 cells) and 1,000 cells of the 5' "8k PBMC"
    run, QC-filtered by the source repository's authors, joined on the genes common to all
    three. Useful for embeddings of full-transcriptome counts and batch-mixing metrics.

    {fetch}

    Returns
    -------
    anndata.AnnData
        2,860 cells x 11,221 genes. Raw integer UMI counts in ``X``; ``obs["batch"]``
        (``1k_PBMC_v2_filt`` 954, ``1k_PBMC_v3_filt`` 906, ``5prime_PBMC_filt_1kcells`` 1,000)
        and ``obs["chemistry"]``.

    Notes
    -----
    {source}
    """
    return _read_h5ad("pbmc_3chemistries")


@_documented("papalexi2021")
def papalexi2021() -> AnnData:
    """ECCITE-seq low-MOI CRISPR knockout screen in stimulated THP-1 cells (Perturb-seq).

    The ``sceptredata`` subset: all 20,729 cells and 110 gRNAs, 299 genes (nine of them
    perturbation targets). The guide assignment in ``obs["perturbation"]`` was made when the
    file was staged (top gRNA with at least 5 UMIs and 80% of the cell's gRNA UMIs, otherwise
    ``"unassigned"``); it is not the original authors' Mixscape classification.

    {fetch}

    Returns
    -------
    anndata.AnnData
        20,729 cells x 299 genes. Raw integer UMI counts in ``X``; ``obs["perturbation"]``
        (target gene, ``"control"`` for non-targeting guides, ``"unassigned"``),
        ``obs["guide_id"]``, ``obs["is_control"]``, ``obs["bio_rep"]``; ``obsm["grna_counts"]``
        (cells x 110 gRNA UMI counts, columns named by ``uns["grna_names"]``).

    Notes
    -----
    {source}
    """
    return _read_h5ad("papalexi2021")


@_documented("citeseq_pbmc_tiny")
def citeseq_pbmc_tiny() -> MuData:
    """Tiny CITE-seq PBMC sample (RNA + antibody-derived tags) as a MuData.

    200 cells of donor P1 (3'), 50 genes and 30 antibody-derived tags, subset by the
    SingleCellProjections.jl authors for their tests. Only for MuData input/output and API smoke
    tests: it is too small for biology and has no cell-type labels.

    {fetch}

    Returns
    -------
    mudata.MuData
        200 cells with modalities ``"rna"`` (200 x 50) and ``"prot"`` (200 x 30), raw integer
        counts in each ``X``; ``var["feature_type"]`` is ``"Gene Expression"`` or
        ``"Antibody Capture"``.

    Notes
    -----
    {source}
    """
    import mudata as md

    path = fetch("citeseq_pbmc_tiny")
    # Gene and antibody names overlap (e.g. CD4), which makes mudata warn about joining var
    # columns on read; the modalities themselves are read as written.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        return md.read_h5mu(path)


@_documented("dorothea")
def dorothea(
    *,
    levels: Sequence[Literal["A", "B", "C", "D", "E"]] | None = None,
    decoupler_format: bool = False,
) -> pd.DataFrame:
    """DoRothEA human transcription-factor regulons.

    Signed TF -> target interactions, graded by confidence from A (most) to E (least).

    {fetch}

    Parameters
    ----------
    levels
        Keep only interactions of these confidence levels, e.g. ``["A", "B", "C"]`` (the usual
        choice for TF activity inference); ``None`` keeps all 454,504.
    decoupler_format
        Name the columns as :mod:`decoupler` expects them: ``source`` (TF), ``target``,
        ``weight`` (mode of regulation) and ``confidence``.

    Returns
    -------
    pandas.DataFrame
        Columns ``tf``, ``confidence``, ``target``, ``mor`` (mode of regulation, +1 activation,
        -1 repression); or ``source``, ``target``, ``weight``, ``confidence`` with
        ``decoupler_format=True``. All levels give 454,504 rows (A 5,434, B 974, C 6,815,
        D 15,863, E 425,418).

    Notes
    -----
    {source}
    """
    import pandas as pd

    allowed = {"A", "B", "C", "D", "E"}
    if levels is not None:
        if isinstance(levels, str):
            levels = list(levels)
        bad = sorted(set(levels) - allowed)
        if bad or not levels:
            raise ValueError(
                f"levels must be a non-empty list of confidence levels among {sorted(allowed)}, "
                f"got {levels!r}."
            )
    net = pd.read_csv(
        fetch("dorothea"),
        dtype={"tf": str, "confidence": str, "target": str, "mor": "int8"},
    )
    if levels is not None:
        net = net[net["confidence"].isin(levels)].reset_index(drop=True)
    if decoupler_format:
        net = net.rename(columns={"tf": "source", "mor": "weight"})[
            ["source", "target", "weight", "confidence"]
        ]
    return net


@_documented("reactome_pathways")
def reactome_pathways(*, as_dict: bool = False) -> pd.DataFrame | dict[str, list[str]]:
    """Reactome human pathways as gene sets.

    A third-party copy of Reactome's GMT download; the Reactome release is not stated in it.
    Some sets list viral genes (e.g. ``gag``, ``vif``) next to human symbols, as in Reactome.

    {fetch}

    Parameters
    ----------
    as_dict
        Return ``{{pathway name: [gene symbols]}}`` instead of a long table.

    Returns
    -------
    pandas.DataFrame or dict
        By default a long table, one row per (pathway, gene), with columns ``source`` (pathway
        name), ``target`` (gene symbol) and ``reactome_id`` (``R-HSA-...``), ready for
        :mod:`decoupler` (which sets ``weight`` to 1). 1,448 pathways, 113,746 rows. With
        ``as_dict=True``, ``{{pathway name: [gene symbols]}}`` instead.

    Notes
    -----
    {source}
    """
    from ._gmt import read_gmt

    path = fetch("reactome_pathways")
    if as_dict:
        return read_gmt(path, as_dict=True)
    return read_gmt(path).rename(columns={"description": "reactome_id"})


@_documented("panglao_markers")
def panglao_markers(*, species: Literal["Hs", "Mm"] | None = None) -> pd.DataFrame:
    """PanglaoDB cell-type marker genes (release of 27 March 2020).

    {fetch}

    Parameters
    ----------
    species
        ``"Hs"`` keeps markers recorded for human, ``"Mm"`` for mouse (rows marked for both are
        kept either way); ``None`` keeps every row.

    Returns
    -------
    pandas.DataFrame
        The table as distributed by PanglaoDB (8,286 rows with ``species=None``), with columns
        including ``species`` (``"Mm Hs"``, ``"Hs"``, ``"Mm"``), ``official gene symbol``,
        ``cell type``, ``organ``, ``canonical marker``, ``sensitivity_human``,
        ``specificity_human``.

    Notes
    -----
    {source}
    """
    import pandas as pd

    if species not in (None, "Hs", "Mm"):
        raise ValueError(f"species must be 'Hs', 'Mm' or None, got {species!r}.")
    table = pd.read_csv(fetch("panglao_markers"), sep="\t")
    if species is not None:
        tokens = table["species"].fillna("").str.split()
        table = table[tokens.map(lambda t: species in t)].reset_index(drop=True)
    return table


@_documented("gencode_gene_table")
def gencode_gene_table() -> pd.DataFrame:
    """GENCODE v44 map of human Ensembl gene IDs to gene symbols.

    Genes without a symbol carry their Ensembl ID as the symbol, as in the source table.

    {fetch}

    Returns
    -------
    pandas.DataFrame
        62,754 rows with columns ``gene_id`` (unique, unversioned ``ENSG...``) and
        ``gene_symbol`` (not unique).

    Notes
    -----
    {source}
    """
    import pandas as pd

    return pd.read_csv(
        fetch("gencode_gene_table"),
        header=None,
        names=["gene_id", "gene_symbol"],
        dtype=str,
    )


@_documented("scgpt_vocab_default", "scgpt_vocab_census")
def scgpt_vocab(kind: Literal["default", "census"] = "default") -> dict[str, int]:
    """Gene-token vocabulary of scGPT.

    {fetch}

    Parameters
    ----------
    kind
        ``"default"``: the vocabulary of scGPT's tokenizer (48,292 genes);
        ``"census"``: the vocabulary built from the CELLxGENE census (60,694 genes).

    Returns
    -------
    dict
        ``{{gene symbol: token id}}``. Special tokens such as ``<pad>`` and ``<cls>`` are not in
        these files; a model's own vocabulary adds them.

    Notes
    -----
    {source}
    """
    names = {"default": "scgpt_vocab_default", "census": "scgpt_vocab_census"}
    if kind not in names:
        raise ValueError(f"kind must be 'default' or 'census', got {kind!r}.")
    with gzip.open(fetch(names[kind]), "rt", encoding="utf-8") as fh:
        vocab = json.load(fh)
    return {str(k): int(v) for k, v in vocab.items()}
