"""sft.tl functions on a MuData (CITE-seq: rna + prot modalities): cells and genes.

The tiny CITE-seq file has no cell-type labels, so annotate transfers the labels of a pbmc8k
reference (another dataset, same model). One of its 200 cells has no RNA count in the 50 genes
and is dropped: the models refuse empty cells.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import scfm_tools as sft

mudata = pytest.importorskip("mudata")
# mudata 0.3 announces its 0.4 behaviour of update() on every MuData it builds.
pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning:mudata"),
    pytest.mark.filterwarnings("ignore:Cannot join columns:UserWarning:mudata"),
]


@pytest.fixture(scope="module")
def mdata(data_dir):
    full = mudata.read_h5mu(data_dir / "citeseq_pbmc_hao2021_tiny.h5mu")
    keep = np.asarray(full["rna"].X.sum(axis=1)).ravel() > 0
    assert (~keep).sum() == 1
    return full[keep].copy()


@pytest.fixture(scope="module")
def reference(mdata):
    """Labelled cells on the modality's own genes (labels must share genes to carry over).

    The tiny CITE-seq set has no cell types; its cells' depth (above or below the median total
    count) stands in for them: these tests are about where the labels land.
    """
    rna = mdata["rna"][:120].copy()
    totals = np.asarray(rna.X.sum(axis=1)).ravel()
    rna.obs["cell_type"] = np.where(totals > np.median(totals), "deep", "shallow")
    return rna


def test_embed_cells_writes_into_the_modality_and_the_mudata(mdata):
    m = mdata.copy()
    prot_before = m["prot"].copy()
    sft.tl.embed_cells(m, "scgpt-default", mod="rna")
    emb = m["rna"].obsm["X_scgpt"]
    assert emb.shape == (m.n_obs, 64)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    # the same as embedding the modality alone
    alone = m["rna"].copy()
    del alone.obsm["X_scgpt"]
    sft.tl.embed_cells(alone, "scgpt-default")
    np.testing.assert_array_equal(alone.obsm["X_scgpt"], emb)
    assert m["rna"].uns["scgpt"]["params"]["n_genes_matched"] > 0
    m.update()
    np.testing.assert_array_equal(np.asarray(m.obsm["X_scgpt"]), emb)
    assert "X_scgpt" not in m["prot"].obsm and m["prot"].obs.columns.equals(prot_before.obs.columns)


def test_annotate_writes_rna_columns_where_muon_users_look(mdata, reference):
    m = mdata.copy()
    ref_snapshot = reference.obs.copy()
    out = sft.tl.annotate(m, reference=reference, label_key="cell_type", mod="rna", copy=True)
    assert isinstance(out, mudata.MuData)
    assert "annotate_label" not in m["rna"].obs and "rna:annotate_label" not in m.obs
    pd.testing.assert_frame_equal(reference.obs, ref_snapshot)
    rna = out["rna"]
    classes = sorted(reference.obs["cell_type"].astype(str).unique())
    assert list(rna.obs["annotate_label"].cat.categories) == classes
    assert rna.uns["annotate"]["params"]["method"] == "auto"
    # identical to annotating the modality on its own
    alone = mdata["rna"].copy()
    sft.tl.annotate(alone, reference=reference, label_key="cell_type")
    np.testing.assert_array_equal(rna.obs["annotate_label"], alone.obs["annotate_label"])
    np.testing.assert_array_equal(rna.obs["annotate_score"], alone.obs["annotate_score"])
    # in the MuData as mdata.update() names them, before and after update()
    np.testing.assert_array_equal(out.obs["rna:annotate_label"], rna.obs["annotate_label"])
    np.testing.assert_array_equal(
        np.asarray(out.obsm["annotate_proba"]), rna.obsm["annotate_proba"]
    )
    out.update()
    np.testing.assert_array_equal(out.obs["rna:annotate_label"], rna.obs["annotate_label"])
    np.testing.assert_allclose(out.obs["rna:annotate_score"], rna.obs["annotate_score"])
    assert not any(c.startswith("prot:annotate") for c in out.obs.columns)


def test_modality_with_fewer_cells_aligns_by_name(mdata, reference):
    rna = mdata["rna"][50:].copy()
    m = mudata.MuData({"rna": rna, "prot": mdata["prot"].copy()})
    sft.tl.embed_cells(m, "scgpt-default", mod="rna")
    sft.tl.annotate(m, reference=reference, label_key="cell_type", mod="rna")
    assert "X_scgpt" not in m.obsm and "annotate_proba" not in m.obsm  # not all cells have one
    labels = m.obs["rna:annotate_label"]
    assert labels.loc[mdata.obs_names[:50]].isna().all()
    np.testing.assert_array_equal(labels.loc[rna.obs_names], m["rna"].obs["annotate_label"])


def test_gene_level_tasks_write_into_the_modality(mdata):
    """embed_genes, grn and gene_modules on a MuData equal the same calls on its RNA modality."""
    m = mdata.copy()
    prot_before = m["prot"].copy()
    alone = m["rna"].copy()
    for target in (m, alone):
        sft.tl.embed_genes(target, mode="context")
        sft.tl.grn(target, top_k=5)
        sft.tl.gene_modules(target, use_rep="X_scgpt_genes", n_neighbors=5, min_module_size=2)
    rna = m["rna"]
    emb = rna.varm["X_scgpt_genes"]
    assert emb.shape[0] == rna.n_vars and np.isfinite(emb).all(axis=1).sum() > 10
    np.testing.assert_array_equal(emb, alone.varm["X_scgpt_genes"])
    assert rna.varp["scgpt_grn_attention"].nnz > 0
    assert (rna.varp["scgpt_grn_attention"] != alone.varp["scgpt_grn_attention"]).nnz == 0
    pd.testing.assert_series_equal(rna.var["gene_module"], alone.var["gene_module"])
    assert rna.var["gene_module"].notna().sum() > 0
    # nothing leaked into the other modality
    assert not m["prot"].varm and not m["prot"].varp
    assert m["prot"].var.columns.equals(prot_before.var.columns)
    # after update() the module labels show in the MuData's var, prefixed by the modality
    m.update()
    # (rna and prot share some names, so rows are found through varmap, not by name)
    where = np.asarray(m.varmap["rna"]).ravel()
    rows = np.flatnonzero(where)[np.argsort(where[where > 0])]
    modules = m.var["rna:gene_module"].to_numpy()[rows]
    np.testing.assert_array_equal(modules.astype(str), rna.var["gene_module"].astype(str))
