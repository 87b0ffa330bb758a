"""sft.pp.match_genes / match_to_vocab on real datasets and the official vocabularies."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest

import scfm_tools as sft
from _unchanged import assert_unchanged, snapshot
from scfm_tools._validation import InputError
from scfm_tools.pp import load_vocab, match_genes, match_to_vocab
from scfm_tools.pp._gene_ids import (
    detect_id_type,
    ensembl_to_symbol,
    gene_table,
    strip_version,
    symbol_to_ensembl,
)

CELLBENCH = "cellbench_3celllines_celseq2_dropseq.h5ad"
PBMC = "pbmc_10x_3chemistries_unlabeled.h5ad"


@pytest.fixture(scope="module")
def census_path(reference_dir):
    return reference_dir / "scgpt" / "default_census_vocab.json"


@pytest.fixture(scope="module")
def census(census_path):
    with open(census_path) as fh:
        return json.load(fh)


@pytest.fixture(scope="module")
def scfoundation_path(reference_dir):
    return reference_dir / "scfoundation" / "OS_scRNA_gene_index.19264.tsv"


@pytest.fixture(scope="module")
def cellplm_genes(reference_dir):
    with open(reference_dir / "cellplm" / "20230926_85M.config.json") as fh:
        return json.load(fh)["gene_list"]


# --- the shipped table ---------------------------------------------------------------------------


def test_gene_table_ships_and_maps_known_genes():
    table = gene_table()
    assert len(table) == 62_754
    assert list(table.columns) == ["gene_id", "gene_name"]
    assert not table["gene_id"].duplicated().any()
    assert list(
        ensembl_to_symbol(["ENSG00000141510", "ENSG00000141510.16", "ENSG00000000000"])
    ) == [
        "TP53",
        "TP53",
        None,
    ]
    assert symbol_to_ensembl("TP53") == ("ENSG00000141510",)
    assert symbol_to_ensembl("NOT_A_GENE") == ()


def test_id_type_detection_and_version_stripping():
    assert detect_id_type(["TP53", "CD3E", "ENSG00000141510"]) == "symbol"
    assert detect_id_type(["ENSG00000141510.16", "ENSG00000000003", "TP53"]) == "ensembl"
    assert detect_id_type(["ENSMUSG00000059552.8", "ENSMUSG00000020122"]) == "ensembl_mouse"
    assert detect_id_type([]) == "unknown"
    stripped = strip_version(["ENSG00000141510.16", "ENSMUSG00000059552.8", "RP11-34P13.3", None])
    assert list(stripped) == ["ENSG00000141510", "ENSMUSG00000059552", "RP11-34P13.3", ""]
    # GENCODE's pseudo-autosomal copies on chrY share the stable ID of the chrX gene.
    assert list(strip_version(["ENSG00000002586.20_PAR_Y"])) == ["ENSG00000002586"]


# --- real data against the official vocabularies -------------------------------------------------


def test_cellbench_symbols_and_ensembl_routes_agree(read_shared, census_path, census):
    adata = read_shared(CELLBENCH)
    match_genes(adata, census_path)
    report = adata.uns["gene_match"]
    assert report["n_genes"] == 11_533
    assert report["query_id_type"] == "symbol"
    assert report["vocab_id_type"] == "symbol"
    assert report["vocab_size"] == len(census) == 60_694
    assert report["fraction"] > 0.9
    assert report["n_matched"] == adata.var["gene_match_matched"].sum()
    assert report["vocab_fraction"] == pytest.approx(report["n_matched"] / 60_694)
    assert adata.var.loc["TP53", "gene_match_index"] == census["TP53"]
    assert adata.var["gene_match_index"].dtype == np.int64
    assert adata.var["gene_match_matched"].dtype == bool
    unmatched = ~adata.var["gene_match_matched"]
    assert (adata.var.loc[unmatched, "gene_match_index"] == -1).all()
    assert adata.uns["gene_match"]["params"]["vocab"] == str(census_path)

    match_genes(adata, census, gene_key="gene_ids", key_added="by_id")
    by_id = adata.uns["by_id"]
    assert by_id["query_id_type"] == "ensembl"
    assert by_id["n_via_table"] > 0.9 * by_id["n_genes"]
    assert by_id["fraction"] > 0.9
    both = adata.var["gene_match_matched"] & adata.var["by_id_matched"]
    agree = adata.var.loc[both, "gene_match_index"] == adata.var.loc[both, "by_id_index"]
    assert both.sum() > 0.9 * adata.n_vars
    assert agree.mean() > 0.99


def test_pbmc_to_scfoundation_gene_list(read_shared, scfoundation_path):
    vocab = load_vocab(scfoundation_path)
    assert len(vocab) == 19_264
    assert "gene_name" not in vocab  # the header line is not a gene
    assert vocab["A1BG"] == 0
    adata = read_shared(PBMC)
    match_genes(adata, scfoundation_path)
    report = adata.uns["gene_match"]
    assert report["vocab_size"] == 19_264
    assert report["fraction"] > 0.9
    assert report["n_via_table"] == 0
    tsv = pd.read_csv(scfoundation_path, sep="\t")
    expected = tsv.set_index("gene_name")["index"]
    matched = adata.var_names[adata.var["gene_match_matched"]]
    assert (adata.var.loc[matched, "gene_match_index"] == expected[matched].to_numpy()).all()


def test_symbols_against_ensembl_vocab_cellplm(read_shared, cellplm_genes):
    adata = read_shared(PBMC)
    match_genes(adata, cellplm_genes)
    report = adata.uns["gene_match"]
    assert report["query_id_type"] == "symbol"
    assert report["vocab_id_type"] == "ensembl"
    assert report["vocab_size"] == 19_374
    assert report["n_via_table"] == report["n_matched"]
    assert report["fraction"] > 0.9
    # CD3E is ENSG00000198851 in GENCODE v44.
    assert adata.var.loc["CD3E", "gene_match_index"] == cellplm_genes.index("ENSG00000198851")


def test_version_suffixed_ids_on_both_sides(read_shared, cellplm_genes):
    adata = read_shared(CELLBENCH)
    plain = match_to_vocab(adata.var["gene_ids"], cellplm_genes)
    versioned_query = [f"{g}.7" for g in adata.var["gene_ids"]]
    versioned_vocab = [f"{g}.3" for g in cellplm_genes]
    assert plain.fraction > 0.8
    assert plain.n_via_table == 0
    for query, vocab in [
        (versioned_query, cellplm_genes),
        (adata.var["gene_ids"], versioned_vocab),
        (versioned_query, versioned_vocab),
    ]:
        other = match_to_vocab(query, vocab)
        np.testing.assert_array_equal(other.index, plain.index)
        assert other.query_id_type == "ensembl"
        assert other.vocab_id_type == "ensembl"
    # Symbols against the versioned Ensembl vocabulary still go through the table.
    sym = match_to_vocab(adata.var_names, versioned_vocab)
    assert sym.n_via_table > 0.8 * sym.n_genes


def test_200_gene_panel_passes(read_shared, census_path, scfoundation_path):
    adata = read_shared("pbmc8k_200genes_labeled.h5ad")
    match_genes(adata, census_path)
    assert adata.uns["gene_match"]["n_genes"] == 200
    assert adata.uns["gene_match"]["n_matched"] == 192
    # scFoundation lists protein-coding genes only: immunoglobulin/TCR segments and lncRNAs of
    # the panel are absent, and the panel still passes the default thresholds.
    match_genes(adata, scfoundation_path, key_added="scf")
    assert adata.uns["scf"]["n_matched"] == 171
    assert not adata.var.loc[["IGKC", "NEAT1"], "scf_matched"].any()


# --- rules: duplicates, one-to-many, case, specials ----------------------------------------------


def test_each_vocab_entry_is_matched_once(census):
    result = match_to_vocab(["ENSG00000141510", "TP53", "CD3E"], census)
    # The exact symbol match wins over the table match of the earlier Ensembl ID.
    assert list(result.index) == [-1, census["TP53"], census["CD3E"]]
    assert list(result.method) == ["", "exact", "exact"]
    assert result.n_duplicates == 1
    assert result.n_via_table == 0


def test_symbol_with_several_ensembl_ids_takes_the_one_in_the_vocab():
    table = gene_table()
    counts = table["gene_name"].value_counts()
    symbol = counts.index[(counts == 2)][0]
    first, second = symbol_to_ensembl(symbol)
    result = match_to_vocab([symbol], ["ENSG00000141510", second])
    assert list(result.index) == [1]
    assert result.n_via_table == 1
    # With both IDs present, the lower vocabulary id is taken.
    assert list(match_to_vocab([symbol], {second: 5, first: 9}).index) == [5]


def test_case_insensitive_fallback(read_shared, census_path):
    adata = read_shared(PBMC)
    adata.var_names = [g.lower() for g in adata.var_names]
    with pytest.raises(InputError, match=r"too few genes match"):
        match_genes(adata, census_path, case_insensitive=False)
    match_genes(adata, census_path)
    report = adata.uns["gene_match"]
    assert report["fraction"] > 0.9
    assert report["n_case_insensitive"] == report["n_matched"]
    # Exact matches come first; the fallback never overrides them.
    result = match_to_vocab(["C1orf112", "C1ORF112"], ["C1orf112", "TP53"])
    assert list(result.index) == [0, -1]
    assert result.n_duplicates == 1
    # Ambiguous (two vocabulary symbols differ only in case): no match.
    assert list(match_to_vocab(["abc"], ["ABC", "Abc"]).index) == [-1]


def test_special_tokens_are_not_genes():
    result = match_to_vocab(["TP53", "<pad>"], {"<pad>": 0, "<cls>": 1, "[MASK]": 2, "TP53": 3})
    assert result.vocab_size == 1
    assert list(result.index) == [3, -1]


# --- refusals ------------------------------------------------------------------------------------


def test_no_overlap_is_refused_and_adata_unchanged(read_shared, census_path):
    adata = read_shared(CELLBENCH)
    adata.var_names = [f"feature_{i}" for i in range(adata.n_vars)]
    snap = snapshot(adata)
    with pytest.raises(InputError) as err:
        match_genes(adata, census_path)
    msg = str(err.value)
    assert "only 0 of 11,533 genes" in msg
    assert "query symbol, vocabulary symbol" in msg
    assert "feature_0" in msg
    assert "gene_key='gene_ids'" in msg
    assert_unchanged(adata, snap)


def test_ensembl_ids_without_gene_key_hint(read_shared, scfoundation_path):
    adata = read_shared(CELLBENCH)
    adata.var["symbol"] = adata.var_names.to_numpy()
    adata.var_names = adata.var["gene_ids"].to_numpy()
    # scFoundation lists symbols; the Ensembl var_names still match through the table.
    match_genes(adata, scfoundation_path)
    assert adata.uns["gene_match"]["n_via_table"] > 0.5 * adata.n_vars


def test_mouse_ids_refused_with_reason(census_path):
    import anndata as ad

    mouse = ad.AnnData(
        np.ones((3, 20), dtype=np.float32),
        var=pd.DataFrame(index=[f"ENSMUSG{i:011d}" for i in range(20)]),
    )
    with pytest.raises(InputError, match=r"mouse Ensembl IDs only match"):
        match_genes(mouse, census_path)
    assert "gene_match" not in mouse.uns


def test_duplicated_names_refused(read_shared, census_path):
    adata = read_shared(CELLBENCH)
    names = adata.var_names.to_list()
    names[1] = names[0]
    adata.var_names = names
    snap = snapshot(adata)
    with pytest.raises(InputError, match=r"duplicated names"):
        match_genes(adata, census_path)
    assert_unchanged(adata, snap)

    adata = read_shared(CELLBENCH)
    adata.var["dup"] = ["TP53"] * adata.n_vars
    snap = snapshot(adata)
    with pytest.raises(InputError, match=r"adata.var\['dup'\] contains duplicated names"):
        match_genes(adata, census_path, gene_key="dup")
    assert_unchanged(adata, snap)


def test_bad_arguments_leave_adata_unchanged(read_shared, census_path, reference_dir):
    adata = read_shared(CELLBENCH)
    snap = snapshot(adata)
    with pytest.raises(KeyError, match=r"gene_key 'symbols' is not a column"):
        match_genes(adata, census_path, gene_key="symbols")
    with pytest.raises(ValueError, match=r"min_fraction"):
        match_genes(adata, census_path, min_fraction=1.5)
    with pytest.raises(FileNotFoundError):
        match_genes(adata, reference_dir / "no_such_vocab.json")
    with pytest.raises(InputError, match=r"gene_list"):
        match_genes(adata, reference_dir / "cellplm" / "20230926_85M.config.json")
    assert_unchanged(adata, snap)


# --- API semantics -------------------------------------------------------------------------------


def test_copy_semantics(read_shared, census_path):
    adata = read_shared(CELLBENCH)
    out = match_genes(adata, census_path, copy=True)
    assert out is not adata
    assert "gene_match" in out.uns and "gene_match_index" in out.var
    assert "gene_match" not in adata.uns and "gene_match_index" not in adata.var
    assert match_genes(adata, census_path) is None
    np.testing.assert_array_equal(adata.var["gene_match_index"], out.var["gene_match_index"])


@pytest.mark.filterwarnings("ignore:.*update\\(\\):FutureWarning", "ignore:Cannot join columns")
def test_mudata_modality(data_dir, census_path):
    import mudata as md

    mdata = md.read_h5mu(data_dir / "citeseq_pbmc_hao2021_tiny.h5mu")
    out = match_genes(mdata, census_path, mod="rna", copy=True)
    assert isinstance(out, md.MuData)
    assert out["rna"].uns["gene_match"]["n_genes"] == 50
    # The 6 unmatched are clone-based names (AL391597.1, ...) absent from the census vocabulary.
    assert out["rna"].uns["gene_match"]["n_matched"] == 44
    assert "gene_match" not in mdata["rna"].uns
    assert match_genes(mdata, census_path, mod="rna") is None
    assert mdata["rna"].var["gene_match_matched"].sum() == 44
    with pytest.raises(KeyError, match=r"modality 'atac'"):
        match_genes(mdata, census_path, mod="atac")


def test_overlap_is_logged(read_shared, census_path, caplog):
    adata = read_shared(PBMC)
    logger = logging.getLogger("scfm_tools")
    logger.addHandler(caplog.handler)
    old = sft.settings.verbosity
    try:
        sft.settings.verbosity = "info"
        match_genes(adata, census_path)
    finally:
        sft.settings.verbosity = old
        logger.removeHandler(caplog.handler)
    n = adata.uns["gene_match"]["n_matched"]
    assert any(
        f"{n:,} of 11,221 query genes" in r.getMessage() and r.levelno == logging.INFO
        for r in caplog.records
    )
