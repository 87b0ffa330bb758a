"""sft.tl.grn, sft.tl.grn_score and sft.pl.grn: attention and embedding GRNs, scored, drawn."""

from __future__ import annotations

import logging

import anndata as ad
import matplotlib
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import torch
from scipy import sparse

import scfm_tools as sft
from _unchanged import assert_unchanged, snapshot
from scfm_tools._validation import InputError

matplotlib.use("Agg")

KEY = "scgpt_grn_attention"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: beside other busy processes two threads on two cores were slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _hvgs(adata: ad.AnnData, n: int) -> list[str]:
    norm = adata.copy()
    sc.pp.normalize_total(norm)
    sc.pp.log1p(norm)
    sc.pp.highly_variable_genes(norm, n_top_genes=n)
    return list(norm.var_names[norm.var["highly_variable"].to_numpy()])


@pytest.fixture(scope="module")
def pbmc(data_dir):
    """200 real PBMCs of three 10x chemistries (obs['batch']), raw counts, all 11,221 genes."""
    adata = ad.read_h5ad(data_dir / "pbmc_10x_3chemistries_unlabeled.h5ad")
    rng = np.random.default_rng(0)
    return adata[np.sort(rng.choice(adata.n_obs, 200, replace=False))].copy()


@pytest.fixture(scope="module")
def hvg100(pbmc):
    return _hvgs(pbmc, 100)


@pytest.fixture(scope="module")
def attention_grn(pbmc, hvg100):
    """The attention GRN of the default model over 100 HVGs, per batch and overall."""
    adata = pbmc.copy()
    sft.tl.grn(adata, genes=hvg100, groupby="batch", top_k=10)
    return adata


# --- attention --------------------------------------------------------------------------------
def test_attention_grn_is_the_models_attention(attention_grn, pbmc, hvg100):
    adata = attention_grn
    net = adata.varp[KEY]
    assert sparse.isspmatrix_csr(net) and net.shape == (adata.n_vars, adata.n_vars)
    per_row = np.diff(net.indptr)
    assert per_row.max() == 10 and net.nnz > 50 * 10
    # only scored genes have edges, never to themselves
    scored = set(adata.uns[KEY]["genes"])
    assert scored <= set(hvg100) and len(scored) > 80
    rows, cols = net.nonzero()
    assert set(adata.var_names[rows]) <= scored and set(adata.var_names[cols]) <= scored
    assert not (rows == cols).any()

    # the same numbers through the model class: score(source -> target) = attention that the
    # target (query) pays to the source (key), averaged over heads and over cells
    ref = pbmc.copy()
    sft.models.SCGPT.setup_anndata(ref)
    model = sft.models.SCGPT.from_pretrained("scgpt-default", ref)
    att = model.get_attention(genes=hvg100, layer=-1, random_state=0)
    names = adata.var_names
    expected = att.loc[names[cols], names[rows]].to_numpy()[
        np.arange(rows.size), np.arange(rows.size)
    ]
    np.testing.assert_allclose(np.asarray(net[rows, cols]).ravel(), expected, rtol=1e-5)
    # each row holds the source's 10 largest attention scores (self excluded)
    src = names[rows[0]]
    column = att[src].drop(src).sort_values(ascending=False)
    assert set(names[net[rows[0]].indices]) == set(column.index[:10])

    # the edge table is varp, sorted by score
    edges = adata.uns[KEY]["edges"]
    assert list(edges.columns) == ["source", "target", "score"] and len(edges) == net.nnz
    assert (np.diff(edges["score"].to_numpy()) <= 0).all()
    i = names.get_indexer(edges["source"])
    j = names.get_indexer(edges["target"])
    np.testing.assert_allclose(np.asarray(net[i, j]).ravel(), edges["score"], rtol=1e-6)
    params = adata.uns[KEY]["params"]
    assert params["method"] == "attention" and params["model"] == "scgpt-default"
    assert params["attention_layer"] == 1 and params["top_k"] == 10
    assert adata.uns[KEY]["scores"].shape == (len(scored), len(scored))


def test_groups_give_their_own_networks(attention_grn):
    adata = attention_grn
    groups = list(adata.obs["batch"].cat.categories)
    assert adata.uns[KEY]["params"]["groups"] == groups
    nets = [adata.varp[f"{KEY}_{g}"] for g in groups]
    for net in nets:
        assert np.diff(net.indptr).max() <= 10 and net.nnz > 0
    # different cells, different networks: edge sets overlap only partly
    edge_sets = [set(zip(*net.nonzero(), strict=True)) for net in nets]
    for a in range(3):
        for b in range(a + 1, 3):
            jaccard = len(edge_sets[a] & edge_sets[b]) / len(edge_sets[a] | edge_sets[b])
            assert 0.05 < jaccard < 0.9
    table = adata.uns[KEY]["group_edges"]
    assert set(table["group"]) == set(groups)
    first = table[table["group"] == groups[0]]
    assert len(first) == nets[0].nnz
    i = adata.var_names.get_indexer(first["source"])
    j = adata.var_names.get_indexer(first["target"])
    np.testing.assert_allclose(np.asarray(nets[0][i, j]).ravel(), first["score"], rtol=1e-6)


def test_many_groups_keep_edge_tables_only(pbmc, hvg100):
    adata = pbmc[:60].copy()
    adata.obs["label"] = pd.Categorical([f"g/{i % 25}" for i in range(adata.n_obs)])
    sft.tl.grn(adata, genes=hvg100[:40], groupby="label", top_k=3)
    assert list(adata.varp.keys()) == [KEY]  # 25 groups > 20: no per-group varp
    table = adata.uns[KEY]["group_edges"]
    assert len(adata.uns[KEY]["params"]["groups"]) == 25
    # groups of 2-3 cells: most, not all, have two of the 40 genes expressed together
    assert 15 < table["group"].nunique() <= 25
    assert table.groupby("group").size().max() <= 40 * 3
    few = pbmc[:60].copy()
    few.obs["label"] = pd.Categorical(["a/b" if i % 2 else "c" for i in range(few.n_obs)])
    sft.tl.grn(few, genes=hvg100[:40], groupby="label", top_k=3)
    assert sorted(few.varp.keys()) == [KEY, f"{KEY}_a_b", f"{KEY}_c"]


def test_grn_results_survive_h5ad(attention_grn, tmp_path):
    path = tmp_path / "grn.h5ad"
    attention_grn.write_h5ad(path)
    back = ad.read_h5ad(path)
    assert (back.varp[KEY] != attention_grn.varp[KEY]).nnz == 0
    pd.testing.assert_frame_equal(back.uns[KEY]["edges"], attention_grn.uns[KEY]["edges"])


def test_grn_score_against_dorothea(pbmc, data_dir):
    adata = pbmc.copy()
    sft.tl.grn(adata, genes=_hvgs(pbmc, 300))
    dorothea = data_dir / "prior_knowledge" / "dorothea_hs.csv.gz"
    table = sft.tl.grn_score(adata, dorothea)
    assert list(table.index) == ["attention", "correlation"]
    assert np.isfinite(table[["auroc", "auprc"]].to_numpy()).all()
    assert ((table["auroc"] > 0) & (table["auroc"] < 1)).all()
    row = table.loc["attention"]
    assert row["n_positives"] >= 20 and row["n_regulators"] >= 5
    assert row["prevalence"] == pytest.approx(row["n_positives"] / row["n_edges"])
    # both rankings run over the same pairs
    assert (table["n_edges"] == row["n_edges"]).all()
    pd.testing.assert_frame_equal(adata.uns[KEY]["score"], table)
    # the same prior as a DataFrame with DoRothEA's own column names gives the same result
    prior = pd.read_csv(dorothea)
    assert "tf" in prior.columns
    again = sft.tl.grn_score(adata, prior, inplace=False)
    pd.testing.assert_frame_equal(again, table)


@pytest.mark.filterwarnings("ignore:Some cells have zero counts")
def test_correlation_baseline_is_pearson_of_lognormalised(pbmc, hvg100):
    from sklearn.metrics import roc_auc_score

    adata = pbmc[:, hvg100].copy()
    genes = list(adata.var_names[:6])
    adata.uns["toy"] = {"params": {"tool": "grn", "method": "toy"}, "genes": np.array(genes)}
    adata.varp["toy"] = sparse.csr_matrix((adata.n_vars, adata.n_vars))
    prior = pd.DataFrame({"source": [genes[0], genes[0]], "target": [genes[1], genes[2]]})
    table = sft.tl.grn_score(adata, prior, inplace=False)
    # |r| of the regulator with the others: correlation ranks target 1 and 2 by that
    norm = adata.copy()  # normalised over the genes of the AnnData scored
    sc.pp.normalize_total(norm, target_sum=1e4)
    sc.pp.log1p(norm)
    x = norm[:, genes].X.toarray()
    r = np.abs(np.corrcoef(x.T)[0, 1:])
    assert table.loc["correlation", "auroc"] == pytest.approx(
        roc_auc_score([1, 1, 0, 0, 0], r), abs=1e-9
    )
    assert table.loc["toy", "auroc"] == pytest.approx(0.5)  # no scores: all tied


# --- embedding --------------------------------------------------------------------------------
def _planted(seed: int = 0, shuffle: bool = False):
    """200 genes: 10 regulators with 8 targets each whose embeddings sit near the regulator's."""
    rng = np.random.default_rng(seed)
    n_genes, n_tf, n_targets, dim = 200, 10, 8, 16
    names = [f"G{i}" for i in range(n_genes)]
    centres = rng.normal(size=(n_tf, dim))
    emb = rng.normal(size=(n_genes, dim))
    prior = []
    for t in range(n_tf):
        members = range(t * (n_targets + 1), (t + 1) * (n_targets + 1))
        for m in members:
            emb[m] = centres[t] + 0.15 * rng.normal(size=dim)
        prior += [(names[members[0]], names[m]) for m in members[1:]]
    if shuffle:
        emb = emb[rng.permutation(n_genes)]
    emb[-5:] = np.nan  # genes without an embedding
    adata = ad.AnnData(
        X=sparse.csr_matrix(rng.poisson(1.0, size=(60, n_genes)).astype(np.float32)),
        var=pd.DataFrame(index=names),
    )
    adata.varm["X_scgpt_genes"] = emb.astype(np.float32)
    return adata, pd.DataFrame(prior, columns=["source", "target"])


def test_embedding_grn_recovers_planted_structure():
    adata, prior = _planted()
    out = sft.tl.grn(adata, method="embedding", top_k=8, copy=True)
    assert "scgpt_grn_embedding" not in adata.uns  # copy=True leaves the input alone
    key = "scgpt_grn_embedding"
    net = out.varp[key]
    assert np.diff(net.indptr)[:195].tolist() == [8] * 195
    assert np.diff(net.indptr)[195:].sum() == 0  # NaN rows: no embedding, no edges
    assert len(out.uns[key]["genes"]) == 195
    # a regulator's 8 nearest genes are its 8 targets, scored by their cosine
    targets = set(prior.loc[prior["source"] == "G0", "target"])
    assert set(out.var_names[net[0].indices]) == targets
    emb = out.varm["X_scgpt_genes"]
    j = net[0].indices[0]
    cos = emb[0] @ emb[j] / np.linalg.norm(emb[0]) / np.linalg.norm(emb[j])
    assert net[0, j] == pytest.approx(cos, rel=1e-5)

    table = sft.tl.grn_score(out, prior)
    assert table.loc["embedding", "n_positives"] == 80
    assert table.loc["embedding", "n_edges"] == 10 * 194
    assert table.loc["embedding", "auprc"] > 0.95
    assert table.loc["embedding", "auroc"] > 0.99
    # random counts: the co-expression baseline knows nothing
    assert table.loc["correlation", "auprc"] < 0.2

    shuffled, _ = _planted(shuffle=True)
    sft.tl.grn(shuffled, method="embedding", top_k=8)
    random = sft.tl.grn_score(shuffled, prior)
    prevalence = random.loc["embedding", "prevalence"]
    assert prevalence == pytest.approx(80 / 1940)
    assert random.loc["embedding", "auprc"] < 3 * prevalence
    assert abs(random.loc["embedding", "auroc"] - 0.5) < 0.15


def test_embedding_grn_computes_missing_gene_embeddings(pbmc, hvg100):
    adata = pbmc[:20, hvg100].copy()
    sft.tl.grn(adata, method="embedding", top_k=5)
    assert "X_scgpt_genes" in adata.varm  # written by embed_genes on the way
    emb = adata.varm["X_scgpt_genes"]
    net = adata.varp["scgpt_grn_embedding"]
    i, j = net.nonzero()
    cos = (
        np.sum(emb[i] * emb[j], 1) / np.linalg.norm(emb[i], axis=1) / np.linalg.norm(emb[j], axis=1)
    )
    np.testing.assert_allclose(np.asarray(net[i, j]).ravel(), cos, rtol=1e-4)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_mudata_modality():
    md = pytest.importorskip("mudata")
    rna, _ = _planted()
    mdata = md.MuData({"rna": rna})
    sft.tl.grn(mdata, method="embedding", mod="rna", key_added="net")
    assert "net" in mdata.mod["rna"].varp and mdata.mod["rna"].uns["net"]["params"]["top_k"] == 20


# --- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"method": "correlation"}, ValueError, "method must be one of"),
        ({"groupby": "cell_type"}, KeyError, "not a column of adata.obs"),
        ({"top_k": 0}, ValueError, "top_k must be a positive integer"),
        ({"genes": ["CD3E", "NOT_A_GENE"]}, KeyError, "not in adata.var_names"),
        ({"genes": "highly_variable"}, KeyError, "not a boolean column"),
        ({"method": "embedding", "groupby": "batch"}, ValueError, "attention' only"),
        ({"method": "embedding", "use_rep": "X_nope"}, KeyError, "not in adata.varm"),
        ({}, ValueError, "pass `genes=` with at most 5,000"),
    ],
)
def test_bad_grn_input_leaves_adata_unchanged(pbmc, kwargs, error, message):
    adata = pbmc[:30].copy()
    snap = snapshot(adata)
    with pytest.raises(error, match=message):
        sft.tl.grn(adata, **kwargs)
    assert_unchanged(adata, snap)


def test_family_without_attention_is_refused(pbmc, fixtures_dir, hvg100):
    adata = pbmc[:30].copy()
    snap = snapshot(adata)
    with pytest.raises(NotImplementedError, match=r"families that can: \['scgpt'\]"):
        sft.tl.grn(adata, fixtures_dir / "cellplm" / "fixture.best.ckpt", genes=hvg100)
    assert_unchanged(adata, snap)


def test_bad_prior_leaves_adata_unchanged(attention_grn):
    adata = attention_grn.copy()
    snap = snapshot(adata)
    with pytest.raises(InputError, match="needs a 'source' \\(or 'tf'\\) and a 'target'"):
        sft.tl.grn_score(adata, pd.DataFrame({"regulator": ["A"], "gene": ["B"]}))
    far = pd.DataFrame({"source": ["NOT_SCORED", "CD3E"], "target": ["CD3E", "ALSO_NOT"]})
    with pytest.raises(InputError, match="no interaction of the prior links two"):
        sft.tl.grn_score(adata, far)
    with pytest.raises(KeyError, match="is not a GRN"):
        sft.tl.grn_score(adata, far, key="scgpt")
    with pytest.raises(ValueError, match="min_targets"):
        sft.tl.grn_score(adata, far, min_targets=0)
    assert_unchanged(adata, snap)
    assert "score" not in adata.uns[KEY]


# --- plot -------------------------------------------------------------------------------------
def test_plot_draws_the_top_edges_around_genes(attention_grn, tmp_path):
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch

    adata = attention_grn
    edges = adata.uns[KEY]["edges"]
    gene = edges["source"].iloc[0]
    near = edges[(edges["source"] == gene) | (edges["target"] == gene)].head(7)
    path = tmp_path / "grn.png"
    ax = sft.pl.grn(adata, gene, n_edges=7, show=False, save=str(path))
    arrows = [p for p in ax.patches if isinstance(p, FancyArrowPatch)]
    assert len(arrows) == 7
    nodes = set(near["source"]) | set(near["target"])
    assert len(ax.collections[0].get_offsets()) == len(nodes)
    assert {t.get_text() for t in ax.texts} == nodes
    assert path.stat().st_size > 0
    plt.close(ax.figure)

    # a group's network, into given axes
    _, given = plt.subplots()
    group = adata.obs["batch"].cat.categories[0]
    out = sft.pl.grn(adata, [gene], n_edges=3, group=group, ax=given, show=False)
    assert out is given and len([p for p in given.patches if isinstance(p, FancyArrowPatch)]) == 3
    plt.close(given.figure)
    with pytest.raises(ValueError, match="no edge of the GRN"):
        sft.pl.grn(adata, adata.var_names[0], show=False)


def test_plot_names_the_genes_it_cannot_draw(attention_grn, caplog, monkeypatch):
    import matplotlib.pyplot as plt

    monkeypatch.setattr(logging.getLogger("scfm_tools"), "propagate", True)  # let caplog see it
    caplog.set_level(logging.WARNING, logger="scfm_tools")
    adata = attention_grn
    edges = adata.uns[KEY]["edges"]
    gene = edges["source"].iloc[0]
    touched = set(edges["source"]) | set(edges["target"])
    unscored = next(g for g in adata.var_names if g not in touched)
    ax = sft.pl.grn(adata, [gene, unscored], n_edges=3, show=False)
    drawn = {t.get_text() for t in ax.texts}
    assert gene in drawn and unscored not in drawn
    assert "1 of the genes are not drawn" in caplog.text and unscored in caplog.text
    caplog.clear()
    sft.pl.grn(adata, gene, n_edges=3, show=False)
    assert "not drawn" not in caplog.text
    plt.close("all")
