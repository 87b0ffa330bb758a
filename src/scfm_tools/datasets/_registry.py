"""The registry of staged public datasets: file, provenance, license and sha256 of each."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["REGISTRY", "DatasetRecord", "get_record", "list_datasets"]


@dataclass(frozen=True)
class DatasetRecord:
    """One staged file and where it came from.

    Attributes
    ----------
    name
        Registry key, also the name of the loader function where there is one.
    filename
        File name in a mirror folder, in the cache and under the download base URL.
    subdir
        Sub-folder of the mirror (``"prior_knowledge"`` for the tables, ``""`` for the data sets).
    sha256
        Checksum of the staged file; every copy is verified against it before being read.
    size
        File size in bytes.
    kind
        What the loader returns: ``"AnnData"``, ``"MuData"``, ``"DataFrame"`` or ``"dict"``.
    description
        One line on what the file holds.
    repository
        Public GitHub repository the source file was taken from.
    commit
        Commit of that repository.
    source_path
        Path of the source file(s) in that repository.
    citation
        Paper to cite for the data.
    license
        License of the source, as stated by its repository.
    """

    name: str
    filename: str
    subdir: str
    sha256: str
    size: int
    kind: str
    description: str
    repository: str
    commit: str
    source_path: str
    citation: str
    license: str

    @property
    def relpath(self) -> str:
        """Path of the file relative to a mirror folder or the download base URL."""
        return f"{self.subdir}/{self.filename}" if self.subdir else self.filename


_PK = "prior_knowledge"

_RECORDS = (
    DatasetRecord(
        name="cellbench",
        filename="cellbench_3celllines_celseq2_dropseq.h5ad",
        subdir="",
        sha256="1eac19250d7b3cc6cef9cc6532f4f8a169dc48b5826b61ee9162f15ff044054b",
        size=6_588_049,
        kind="AnnData",
        description=(
            "CellBench 3 lung adenocarcinoma cell lines (H1975, H2228, HCC827), CEL-seq2 and "
            "Drop-seq; 450 cells x 11,533 genes, raw counts, demuxlet cell-line labels"
        ),
        repository="LuyiTian/sc_mixology",
        commit="7d00ffb0bd043467f365a9358d7312f294f13c9f",
        source_path=(
            "data/csv/sc_celseq2.{count,metadata}.csv.gz, "
            "data/csv/sc_dropseq.{count,metadata}.csv.gz"
        ),
        citation=(
            "Tian L. et al. (2019) Benchmarking single cell RNA-sequencing analysis pipelines "
            "using mixture control experiments. Nat Methods 16:479. GEO GSE118767"
        ),
        license="MIT",
    ),
    DatasetRecord(
        name="pbmc8k",
        filename="pbmc8k_200genes_labeled.h5ad",
        subdir="",
        sha256="2b11a6e7b3b98e17e7c01a5b025af4616a6a04ed2578131f05d07993a28139a4",
        size=822_771,
        kind="AnnData",
        description=(
            "10x Genomics PBMC8k processed with the Bioconductor OSCA workflow, reduced to "
            "200 genes; 7,480 cells, raw counts, automated cell-type labels"
        ),
        repository="maren-ha/scVI.jl",
        commit="8760eda1bd20a7a4ecd2d5f730c6f91fbc7b6b6e",
        source_path="data/pbmc.h5ad",
        citation=(
            "Zheng G.X.Y. et al. (2017) Massively parallel digital transcriptional profiling of "
            "single cells. Nat Commun 8:14049 (10x Genomics PBMC8k data release)"
        ),
        license="BSD-3-Clause",
    ),
    DatasetRecord(
        name="pbmc_3chemistries",
        filename="pbmc_10x_3chemistries_unlabeled.h5ad",
        subdir="",
        sha256="d0d533ed9e22df1d3fd1d4e61a71bad592d47f7a30d9014592b493185838a086",
        size=9_878_818,
        kind="AnnData",
        description=(
            "Three 10x Genomics PBMC runs (3' v2, 3' v3, 5'), QC-filtered; 2,860 cells x "
            "11,221 genes, raw counts, batch = chemistry, no cell-type labels"
        ),
        repository="baj12/scWGParis",
        commit="4a3ea760e194ea1d79e7d1600b476ddc5107924d",
        source_path=(
            "data/1k_PBMC_v2_filt.rds, data/1k_PBMC_v3_filt.rds, data/5prime_PBMC_filt_1kcells.rds"
        ),
        citation="10x Genomics public datasets (1k PBMC v2, 1k PBMC v3, 5' 8k PBMC)",
        license="GPL-2.0 (repository); 10x Genomics data CC BY 4.0",
    ),
    DatasetRecord(
        name="papalexi2021",
        filename="papalexi2021_eccite_lowmoi_perturb.h5ad",
        subdir="",
        sha256="70ce2ea764827a2217290c524036a6c41a5a2c4ead1a5005001748196afb29ce",
        size=3_610_798,
        kind="AnnData",
        description=(
            "ECCITE-seq low-MOI CRISPR-KO screen in stimulated THP-1 cells (sceptredata "
            "subset); 20,729 cells x 299 genes, raw counts, 110 gRNAs, guide assignment"
        ),
        repository="Katsevich-Lab/sceptredata",
        commit="ec722d5df90dfd34ace6cc9a5745ab6a5c2a6731",
        source_path="data/lowmoi_example_data.rda",
        citation=(
            "Papalexi E. et al. (2021) Characterizing the molecular regulation of inhibitory "
            "immune checkpoints with multimodal single-cell screens. Nat Genet 53:322"
        ),
        license="MIT",
    ),
    DatasetRecord(
        name="citeseq_pbmc_tiny",
        filename="citeseq_pbmc_hao2021_tiny.h5mu",
        subdir="",
        sha256="982e63b0e65676a7d17a01fb90489a7760332ee4d67852675fb34d8d9aa706f9",
        size=158_900,
        kind="MuData",
        description=(
            "CITE-seq PBMC (donor P1, 3'), 200 cells: rna 50 genes + prot 30 antibody tags, "
            "raw counts; for MuData smoke tests only"
        ),
        repository="BioJulia/SingleCellProjections.jl",
        commit="a28a22508f80e5c2cde0b72ae9ac073281ebb658",
        source_path="test/data/GSE164378_RNA_ADT_3P_P1_subsetted.h5",
        citation=(
            "Hao Y. et al. (2021) Integrated analysis of multimodal single-cell data. "
            "Cell 184:3573. GEO GSE164378"
        ),
        license="MIT",
    ),
    DatasetRecord(
        name="dorothea",
        filename="dorothea_hs.csv.gz",
        subdir=_PK,
        sha256="30345a6655d1b6ab30987af204450bf6dd996071f5040e69c99d440c3d153996",
        size=1_879_633,
        kind="DataFrame",
        description=(
            "DoRothEA human TF-target regulons (v1.7.4): 454,504 interactions, columns tf, "
            "confidence (A-E), target, mor"
        ),
        repository="saezlab/dorothea",
        commit="1461fb75e23e110c2281860526d4333920925282",
        source_path="data/dorothea_hs.rda",
        citation=(
            "Garcia-Alonso L. et al. (2019) Benchmark and integration of resources for the "
            "estimation of human transcription factor activities. Genome Res 29:1363"
        ),
        license="GPL-3",
    ),
    DatasetRecord(
        name="reactome_pathways",
        filename="reactome_pathways_human.gmt.gz",
        subdir=_PK,
        sha256="d859104435ab444564bc0f8450a727983fda3e7ecec27a0cdaf61bf3d24975be",
        size=214_785,
        kind="DataFrame",
        description=(
            "Reactome human pathways as GMT (1,448 gene sets); Reactome release not stated "
            "in the source repository"
        ),
        repository="pavanish/PathwayScore",
        commit="4cda2d996da825d25d8def414617c3943c072589",
        source_path="data/ReactomePathways.gmt",
        citation=(
            "Reactome pathway knowledgebase (reactome.org); third-party copy of the Reactome "
            "GMT download"
        ),
        license="Reactome data CC BY 4.0; no data license stated in the source repository",
    ),
    DatasetRecord(
        name="panglao_markers",
        filename="PanglaoDB_markers_27_Mar_2020.tsv.gz",
        subdir=_PK,
        sha256="cea6b8dd93051b70745172b236bb8624cffeb6b0b9a2d132afe77c28c5080920",
        size=311_902,
        kind="DataFrame",
        description="PanglaoDB cell-type marker genes, human and mouse (8,286 rows, 27 Mar 2020)",
        repository="Xenon8778/scAutoCT",
        commit="7c4382c0e2c3cd79da452da4883ec8c86e6c0fcd",
        source_path="data/PanglaoDB_markers_27_Mar_2020.tsv",
        citation=(
            "Franzén O., Gan L.-M., Björkegren J.L.M. (2019) PanglaoDB: a web server for "
            "exploration of mouse and human single-cell RNA sequencing data. Database baz046"
        ),
        license="not stated in the source repository; check PanglaoDB's terms",
    ),
    DatasetRecord(
        name="gencode_gene_table",
        filename="gencode_v44_geneid_to_symbol.csv.gz",
        subdir=_PK,
        sha256="c61afb430aa01454cbb16a9bad4005fc15bc60512efa765130116d38dceb05f0",
        size=464_224,
        kind="DataFrame",
        description="GENCODE v44 Ensembl gene ID -> gene symbol table (62,754 genes)",
        repository="Teichlab/celltypist",
        commit="celltypist 1.7.1 (PyPI)",
        source_path="celltypist/data/samples/GENCODEv44_Gene_id2name.csv",
        citation=(
            "GENCODE release 44 (Frankish A. et al. (2023) GENCODE: reference annotation for "
            "the human and mouse genomes in 2023. Nucleic Acids Res 51:D942), as shipped by "
            "CellTypist"
        ),
        license="MIT (celltypist); GENCODE data are openly available",
    ),
    DatasetRecord(
        name="scgpt_vocab_default",
        filename="scgpt_default_gene_vocab.json.gz",
        subdir=_PK,
        sha256="e780e1bf849e3eaea1de74530c91fcd41186b5f441879dcd6cc209c23cf13bd1",
        size=327_720,
        kind="dict",
        description="scGPT default gene-token vocabulary {symbol: token id} (48,292 genes)",
        repository="bowang-lab/scGPT",
        commit="cebd6fae655b9c585a4807daa3ac31bb764f06b4",
        source_path="scgpt/tokenizer/default_gene_vocab.json",
        citation=(
            "Cui H. et al. (2024) scGPT: toward building a foundation model for single-cell "
            "multi-omics using generative AI. Nat Methods 21:1470"
        ),
        license="MIT",
    ),
    DatasetRecord(
        name="scgpt_vocab_census",
        filename="scgpt_default_census_vocab.json.gz",
        subdir=_PK,
        sha256="727cd06163881f875bf61368830bcf1a9afbf3650b7cb17f105cbc426b1c6f0d",
        size=435_434,
        kind="dict",
        description=(
            "scGPT CELLxGENE-census gene-token vocabulary {symbol: token id} (60,694 genes)"
        ),
        repository="bowang-lab/scGPT",
        commit="cebd6fae655b9c585a4807daa3ac31bb764f06b4",
        source_path="scgpt/tokenizer/default_census_vocab.json",
        citation=(
            "Cui H. et al. (2024) scGPT: toward building a foundation model for single-cell "
            "multi-omics using generative AI. Nat Methods 21:1470"
        ),
        license="MIT",
    ),
)

REGISTRY: dict[str, DatasetRecord] = {rec.name: rec for rec in _RECORDS}


def get_record(name: str) -> DatasetRecord:
    """Return the registry entry ``name``, or say which names exist."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"no dataset named {name!r}; known datasets: {sorted(REGISTRY)} "
            "(see `sft.datasets.list_datasets()`)."
        ) from None


def list_datasets() -> pd.DataFrame:
    """List the datasets this package knows, with their provenance.

    Returns
    -------
    pandas.DataFrame
        One row per file, indexed by dataset name, with columns ``filename``, ``subdir``
        (``"prior_knowledge"`` for the tables), ``kind`` (what the loader returns),
        ``description``, ``size`` (bytes), ``sha256``, ``license``, ``repository``, ``commit``,
        ``source_path`` and ``citation``.

    Examples
    --------
    >>> import scfm_tools as sft
    >>> sft.datasets.list_datasets().loc["cellbench", "sha256"][:12]
    '1eac19250d7b'
    """
    import pandas as pd

    columns = [
        "filename",
        "subdir",
        "kind",
        "description",
        "size",
        "sha256",
        "license",
        "repository",
        "commit",
        "source_path",
        "citation",
    ]
    rows = [asdict(rec) for rec in _RECORDS]
    return pd.DataFrame(rows).set_index("name")[columns]
