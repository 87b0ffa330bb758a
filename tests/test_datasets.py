"""sft.datasets: registry, mirror/cache/download resolution, and each loader on the real files."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import scfm_tools as sft
from _http_server import FileServer
from scfm_tools._settings import settings
from scfm_tools.datasets import DatasetChecksumError, DatasetNotFoundError
from scfm_tools.datasets._registry import REGISTRY
from scfm_tools.hub import ChecksumError, DownloadError


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def clean(monkeypatch, tmp_path):
    """No mirror, no download URL, an empty cache of this test's own."""
    monkeypatch.delenv("SCFM_TOOLS_DATA", raising=False)
    monkeypatch.delenv("SCFM_TOOLS_DATA_URL", raising=False)
    monkeypatch.setenv("SCFM_TOOLS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(settings, "_data_dir", None)
    monkeypatch.setattr(settings, "_cache_dir", None)
    return tmp_path


@pytest.fixture
def mirror(clean, monkeypatch, data_dir):
    """The shared data folder as the local mirror, through the environment variable."""
    monkeypatch.setenv("SCFM_TOOLS_DATA", str(data_dir))
    return data_dir


# registry ---------------------------------------------------------------------------------------
def test_registry_matches_the_files(data_dir):
    table = sft.datasets.list_datasets()
    assert len(table) == 11
    assert table.loc["papalexi2021", "repository"] == "Katsevich-Lab/sceptredata"
    assert table.loc["dorothea", "subdir"] == "prior_knowledge"
    for name, row in table.iterrows():
        path = data_dir / (f"{row.subdir}/" if row.subdir else "") / row.filename
        assert path.stat().st_size == row["size"], name
        assert _sha256(path) == row["sha256"], name
        assert row["citation"] and row["license"] and len(row["commit"]) > 0


def test_unknown_name_lists_known_ones(clean):
    with pytest.raises(KeyError, match=r"no dataset named 'pbmc3k'.*cellbench"):
        sft.datasets.fetch("pbmc3k")


# the five single-cell datasets ---------------------------------------------------------------
def test_cellbench(mirror):
    adata = sft.datasets.cellbench()
    assert adata.shape == (450, 11_533)
    assert adata.obs["cell_type"].value_counts().to_dict() == {
        "H1975": 182,
        "HCC827": 136,
        "H2228": 132,
    }
    assert adata.obs["batch"].value_counts().to_dict() == {"sc_celseq2": 240, "sc_dropseq": 210}
    assert sparse.issparse(adata.X) and adata.X.dtype.kind == "i"
    assert adata.X.max() == 2_973
    assert adata.var["gene_ids"].str.startswith("ENSG").all()


def test_pbmc8k(mirror):
    adata = sft.datasets.pbmc8k()
    assert adata.shape == (7_480, 200)
    counts = adata.obs["cell_type"].value_counts()
    assert counts["CD8+ T-cells"] == 2_740
    assert counts["Monocytes"] == 1_583
    assert counts["Erythrocytes"] == 1
    totals = np.asarray(adata.X.sum(axis=1)).ravel()
    assert (totals.min(), totals.max()) == (13, 8_608)


def test_pbmc_3chemistries(mirror):
    adata = sft.datasets.pbmc_3chemistries()
    assert adata.shape == (2_860, 11_221)
    assert adata.obs["batch"].value_counts().to_dict() == {
        "5prime_PBMC_filt_1kcells": 1_000,
        "1k_PBMC_v2_filt": 954,
        "1k_PBMC_v3_filt": 906,
    }
    assert "cell_type" not in adata.obs


def test_papalexi2021(mirror):
    adata = sft.datasets.papalexi2021()
    assert adata.shape == (20_729, 299)
    pert = adata.obs["perturbation"].value_counts()
    assert (pert["unassigned"], pert["control"], pert["IFNGR1"], pert["SPI1"]) == (
        4_537,
        1_923,
        1_064,
        33,
    )
    assert adata.obsm["grna_counts"].shape == (20_729, 110)
    assert adata.obs["bio_rep"].value_counts()["rep_1"] == 9_428
    assert {"STAT1", "JAK2", "NFKBIA"} <= set(adata.var_names)


def test_citeseq_pbmc_tiny_is_a_mudata(mirror):
    import mudata as md

    mdata = sft.datasets.citeseq_pbmc_tiny()
    assert isinstance(mdata, md.MuData)
    assert mdata.n_obs == 200
    assert mdata.mod["rna"].shape == (200, 50)
    assert mdata.mod["prot"].shape == (200, 30)
    assert set(mdata.mod["prot"].var["feature_type"]) == {"Antibody Capture"}


# prior-knowledge tables ---------------------------------------------------------------------------
def test_dorothea(mirror):
    net = sft.datasets.dorothea()
    assert net.shape == (454_504, 4)
    assert list(net.columns) == ["tf", "confidence", "target", "mor"]
    assert net["confidence"].value_counts().to_dict() == {
        "E": 425_418,
        "D": 15_863,
        "C": 6_815,
        "A": 5_434,
        "B": 974,
    }
    assert set(net["mor"]) == {1, -1}

    ab = sft.datasets.dorothea(levels=["A", "B"], decoupler_format=True)
    assert len(ab) == 5_434 + 974
    assert list(ab.columns) == ["source", "target", "weight", "confidence"]
    assert not ab.duplicated(["source", "target"]).any()


def test_dorothea_rejects_unknown_levels(mirror):
    with pytest.raises(ValueError, match=r"levels must be .*\['A', 'B', 'C', 'D', 'E'\].*'Z'"):
        sft.datasets.dorothea(levels=["A", "Z"])


def test_reactome_pathways(mirror):
    long = sft.datasets.reactome_pathways()
    assert list(long.columns) == ["source", "target", "reactome_id"]
    assert long["source"].nunique() == 1_448
    assert len(long) == 113_746
    assert not long.duplicated(["source", "target"]).any()
    ltr = long[long["source"] == "2-LTR circle formation"]
    assert set(ltr["reactome_id"]) == {"R-HSA-164843"}
    assert {"BANF1", "XRCC6", "gag"} <= set(ltr["target"])

    sets = sft.datasets.reactome_pathways(as_dict=True)
    assert len(sets) == 1_448
    assert sets["2-LTR circle formation"][:3] == ["BANF1", "HMGA1", "LIG4"]


def test_panglao_markers(mirror):
    table = sft.datasets.panglao_markers()
    assert len(table) == 8_286
    assert {"official gene symbol", "cell type", "organ"} <= set(table.columns)
    # "Mm Hs" 7,507 + "Hs" 344 rows are human markers
    assert len(sft.datasets.panglao_markers(species="Hs")) == 7_851
    assert len(sft.datasets.panglao_markers(species="Mm")) == 7_909
    with pytest.raises(ValueError, match="species must be 'Hs', 'Mm' or None"):
        sft.datasets.panglao_markers(species="human")


def test_gencode_gene_table(mirror):
    table = sft.datasets.gencode_gene_table()
    assert table.shape == (62_754, 2)
    assert table["gene_id"].is_unique
    lookup = table.set_index("gene_id")["gene_symbol"]
    assert lookup["ENSG00000223972"] == "DDX11L1"
    assert lookup["ENSG00000186092"] == "OR4F5"


def test_scgpt_vocab(mirror):
    default = sft.datasets.scgpt_vocab()
    census = sft.datasets.scgpt_vocab(kind="census")
    assert (len(default), len(census)) == (48_292, 60_694)
    assert (default["ZZZ3"], census["ZZZ3"]) == (48_291, 36_565)
    assert sorted(default.values()) == list(range(48_292))
    with pytest.raises(ValueError, match="kind must be 'default' or 'census'"):
        sft.datasets.scgpt_vocab(kind="human")


# resolution: mirror, cache, download ------------------------------------------------------------
def test_settings_data_dir_and_flat_mirror(clean, data_dir):
    # tables at the top level of a mirror (no prior_knowledge/ folder) are found too
    flat = clean / "flat"
    flat.mkdir()
    shutil.copy(data_dir / "prior_knowledge" / "scgpt_default_gene_vocab.json.gz", flat)
    settings.data_dir = flat
    assert sft.datasets.fetch("scgpt_vocab_default") == flat / "scgpt_default_gene_vocab.json.gz"
    assert len(sft.datasets.scgpt_vocab()) == 48_292


def test_corrupted_mirror_file_is_refused(clean, data_dir, monkeypatch):
    broken = clean / "broken"
    broken.mkdir()
    target = broken / "citeseq_pbmc_hao2021_tiny.h5mu"
    shutil.copy(data_dir / target.name, target)
    raw = bytearray(target.read_bytes())
    raw[1000:1008] = bytes(b ^ 0xFF for b in raw[1000:1008])
    target.write_bytes(bytes(raw))
    monkeypatch.setenv("SCFM_TOOLS_DATA", str(broken))

    expected = REGISTRY["citeseq_pbmc_tiny"].sha256
    with pytest.raises(DatasetChecksumError) as err:
        sft.datasets.citeseq_pbmc_tiny()
    msg = str(err.value)
    assert f"expected sha256 {expected}" in msg
    assert f"got {_sha256(target)}" in msg
    assert "citeseq_pbmc_hao2021_tiny.h5mu" in msg


def test_missing_file_without_url_says_what_to_do(clean, monkeypatch):
    empty = clean / "empty"
    empty.mkdir()
    monkeypatch.setenv("SCFM_TOOLS_DATA", str(empty))
    rec = REGISTRY["dorothea"]
    with pytest.raises(DatasetNotFoundError) as err:
        sft.datasets.dorothea()
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    for needle in (rec.filename, rec.sha256, "SCFM_TOOLS_DATA", "SCFM_TOOLS_DATA_URL"):
        assert needle in msg
    assert "no canonical public URL" in msg


def test_missing_mirror_folder_is_named(clean, monkeypatch):
    monkeypatch.setenv("SCFM_TOOLS_DATA", str(clean / "nowhere"))
    with pytest.raises(DatasetNotFoundError, match=r"nowhere .*is not a folder"):
        sft.datasets.fetch("pbmc8k")


def test_cache_is_used_and_checked(clean, data_dir):
    cache = settings.cache_dir / "datasets"
    cache.mkdir(parents=True)
    shutil.copy(data_dir / "pbmc8k_200genes_labeled.h5ad", cache)
    assert sft.datasets.pbmc8k().shape == (7_480, 200)

    (cache / "pbmc8k_200genes_labeled.h5ad").write_bytes(b"not an h5ad")
    with pytest.raises(DatasetChecksumError, match=r"expected sha256 2b11a6e7.*delete it"):
        sft.datasets.pbmc8k()


@pytest.fixture
def http_root(tmp_path):
    """The shared test file server (127.0.0.1, free port) on a folder; yields (folder, base URL)."""
    root = tmp_path / "served"
    root.mkdir()
    with FileServer(root) as server:
        yield root, f"{server.base_url}/data/"


def test_download_into_cache_from_local_server(clean, data_dir, http_root, monkeypatch):
    root, base = http_root
    (root / "data" / "prior_knowledge").mkdir(parents=True)
    shutil.copy(data_dir / "citeseq_pbmc_hao2021_tiny.h5mu", root / "data")
    src_vocab = data_dir / "prior_knowledge" / "scgpt_default_census_vocab.json.gz"
    shutil.copy(src_vocab, root / "data" / "prior_knowledge")
    monkeypatch.setenv("SCFM_TOOLS_DATA_URL", base)

    mdata = sft.datasets.citeseq_pbmc_tiny()
    assert mdata.mod["prot"].shape == (200, 30)
    vocab = sft.datasets.scgpt_vocab(kind="census")
    assert vocab["ZZZ3"] == 36_565

    cache = settings.cache_dir / "datasets"
    assert _sha256(cache / "citeseq_pbmc_hao2021_tiny.h5mu") == REGISTRY["citeseq_pbmc_tiny"].sha256
    assert _sha256(cache / src_vocab.name) == REGISTRY["scgpt_vocab_census"].sha256

    # once cached, the server is no longer needed
    shutil.rmtree(root / "data")
    assert sft.datasets.fetch("citeseq_pbmc_tiny") == cache / "citeseq_pbmc_hao2021_tiny.h5mu"


def test_download_with_wrong_content_is_refused(clean, http_root, monkeypatch):
    root, base = http_root
    (root / "data").mkdir()
    (root / "data" / "pbmc8k_200genes_labeled.h5ad").write_bytes(b"something else entirely")
    monkeypatch.setenv("SCFM_TOOLS_DATA_URL", base)

    with pytest.raises(ChecksumError, match=f"sha256 {REGISTRY['pbmc8k'].sha256} was expected"):
        sft.datasets.pbmc8k()
    assert not (settings.cache_dir / "datasets" / "pbmc8k_200genes_labeled.h5ad").exists()


def test_download_of_a_file_the_server_lacks(clean, http_root, monkeypatch):
    _, base = http_root
    monkeypatch.setenv("SCFM_TOOLS_DATA_URL", base)
    rec = REGISTRY["gencode_gene_table"]
    with pytest.raises(DownloadError) as err:
        sft.datasets.gencode_gene_table()
    msg = str(err.value)
    assert f"serves prior_knowledge/{rec.filename}" in msg
    assert "SCFM_TOOLS_DATA" in msg and rec.sha256 in msg
    assert not (settings.cache_dir / "datasets" / rec.filename).exists()


def test_corrupted_cache_is_downloaded_again(clean, data_dir, http_root, monkeypatch):
    root, base = http_root
    (root / "data").mkdir()
    shutil.copy(data_dir / "pbmc8k_200genes_labeled.h5ad", root / "data")
    cached = settings.cache_dir / "datasets" / "pbmc8k_200genes_labeled.h5ad"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"truncated")
    monkeypatch.setenv("SCFM_TOOLS_DATA_URL", base)

    assert sft.datasets.pbmc8k().shape == (7_480, 200)
    assert _sha256(cached) == REGISTRY["pbmc8k"].sha256


def test_list_datasets_is_a_dataframe():
    table = sft.datasets.list_datasets()
    assert isinstance(table, pd.DataFrame)
    assert table.index.name == "name"
    assert table["sha256"].str.fullmatch(r"[0-9a-f]{64}").all()
    assert set(table["kind"]) == {"AnnData", "MuData", "DataFrame", "dict"}
