"""sft.tl.embed_genes, sft.tl.gene_modules and sft.pl.gene_modules on real PBMC data."""

import gzip
import json
import shutil

import anndata as ad
import matplotlib
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from scipy import sparse
from scipy.stats import hypergeom
from sklearn.metrics import adjusted_rand_score

import scfm_tools as sft
from _unchanged import assert_unchanged, snapshot
from scfm_tools._validation import InputError

matplotlib.use("Agg")

PBMC = "pbmc_10x_3chemistries_unlabeled.h5ad"
REACTOME = "prior_knowledge/reactome_pathways_human.gmt.gz"
FAKE = ["NOT-A-GENE-1", "NOT-A-GENE-2", "NOT-A-GENE-3"]


@pytest.fixture(scope="module")
def pbmc(data_dir):
    """Every 10th cell of the three PBMC runs (raw counts), 600 HVGs flagged, 3 fake genes."""
    full = ad.read_h5ad(data_dir / PBMC)
    adata = full[::10].copy()
    sc.pp.filter_genes(adata, min_cells=10)
    names = adata.var_names.to_numpy().copy()
    names[[5, 6, 7]] = FAKE
    adata.var_names = names
    lognorm = adata.copy()
    sc.pp.normalize_total(lognorm, target_sum=1e4)
    sc.pp.log1p(lognorm)
    sc.pp.highly_variable_genes(lognorm, n_top_genes=600)
    adata.var["highly_variable"] = lognorm.var["highly_variable"].to_numpy()
    adata.layers["lognorm"] = lognorm.X
    return adata


@pytest.fixture(scope="module")
def modules_run(pbmc, data_dir):
    adata = pbmc.copy()
    sft.tl.gene_modules(
        adata, genes="highly_variable", gene_sets=data_dir / REACTOME, random_state=0
    )
    return adata


def _zscore_means(lognorm, modules):
    """Reference scores: mean over a module's genes of z-scored (ddof=1) expression."""
    X = lognorm.toarray() if sparse.issparse(lognorm) else np.asarray(lognorm)
    sd = X.std(axis=0, ddof=1)
    Z = np.divide(X - X.mean(axis=0), sd, out=np.zeros_like(X), where=sd > 1e-12)
    return np.column_stack([Z[:, cols].mean(axis=1) for cols in modules])


# embed_genes -------------------------------------------------------------------------------


def test_token_embeddings_are_the_models_gene_encoder_rows(pbmc):
    adata = pbmc.copy()
    sft.tl.embed_genes(adata)
    emb = adata.varm["X_scgpt_genes"]
    assert emb.dtype == np.float32 and emb.shape == (adata.n_vars, 64)

    reference = adata.copy()
    sft.models.SCGPT.setup_anndata(reference)
    model = sft.models.SCGPT.from_pretrained("scgpt-default", reference)
    expected = model.get_gene_embeddings()  # genes in the vocabulary, under their var_names
    rows = adata.var_names.get_indexer(expected.index)
    assert len(expected) == adata.n_vars - len(FAKE)
    np.testing.assert_allclose(emb[rows], expected.to_numpy(), rtol=1e-5, atol=1e-6)

    fake = adata.var_names.isin(FAKE)
    assert np.isnan(emb[fake]).all() and np.isfinite(emb[~fake]).all()
    np.testing.assert_array_equal(adata.var["scgpt_in_vocab"].to_numpy(), ~fake)
    params = adata.uns["scgpt_genes"]["params"]
    assert params["mode"] == "token" and params["model"] == "scgpt-default"
    assert params["n_genes_matched"] == params["n_genes_embedded"] == adata.n_vars - 3
    assert "n_cells" not in params  # token mode reads no cells
    # token mode reads no values: log-normalised input gives the same rows
    other = sft.tl.embed_genes(adata, layer="lognorm", key_added="tok", copy=True)
    np.testing.assert_array_equal(other.varm["tok"], emb)


@pytest.fixture(scope="module")
def small(pbmc):
    """40 cells x the 300 genes expressed in the most cells, plus one never-expressed gene."""
    cells = pbmc[:40]
    expressed = np.asarray((cells.X > 0).sum(0)).ravel()
    top = np.sort(np.argsort(-expressed, kind="stable")[:300])
    adata = cells[:, top].copy()
    X = adata.X.toarray()
    X[:, 0] = 0  # a vocabulary gene that is never a token
    adata.X = sparse.csr_matrix(X)
    return adata[np.asarray(adata.X.sum(1)).ravel() > 0].copy()


def test_context_embeddings_average_transformer_outputs(small):
    import torch

    from scfm_tools.models.scgpt import CellTokenizer, load_scgpt_checkpoint

    adata = small.copy()
    sft.tl.embed_genes(
        adata, mode="context", max_length=400, batch_size=7, chunk_size=16, random_state=3
    )
    emb = adata.varm["X_scgpt_genes"]
    n_cells = adata.var["scgpt_genes_n_cells"].to_numpy()
    # every expressed gene is a token (no subsampling below max_length)
    np.testing.assert_array_equal(n_cells, np.asarray((adata.X > 0).sum(0)).ravel())
    assert n_cells[0] == 0 and np.isnan(emb[0]).all()
    assert np.isfinite(emb[n_cells > 0]).all()
    params = adata.uns["scgpt_genes"]["params"]
    assert params["mode"] == "context" and params["n_cells"] == adata.n_obs
    assert params["n_genes_embedded"] == int((n_cells > 0).sum())
    assert params["random_state"] == 3 and params["max_length"] == 400

    # Reference: each cell alone through the transformer (no padding, no batching), averaged.
    module, vocab, args, _ = load_scgpt_checkpoint(sft.hub.load("scgpt-default").path)
    index = np.array([vocab[g] for g in adata.var_names])
    tokenizer = CellTokenizer(
        index, cls_id=vocab["<cls>"], pad_value=args["pad_value"], max_length=400, random_state=3
    )
    sums = np.zeros((len(vocab) + 1, 64))
    counts = np.zeros(len(vocab) + 1)
    with torch.inference_mode():
        for ids, vals in tokenizer(adata.X):
            ids_t = torch.as_tensor(ids)[None]
            out = module.encode(
                ids_t, torch.as_tensor(vals)[None], torch.zeros_like(ids_t, dtype=torch.bool)
            )["transformer_output"][0, 1:]
            sums[ids[1:]] += out.numpy()
            counts[ids[1:]] += 1
    expressed = n_cells > 0
    expected = sums[index[expressed]] / counts[index[expressed], None]
    np.testing.assert_allclose(emb[expressed], expected, rtol=1e-4, atol=1e-5)

    token = sft.tl.embed_genes(adata, key_added="tok", copy=True).varm["tok"]
    cos = np.sum(emb[expressed] * token[expressed], 1) / (
        np.linalg.norm(emb[expressed], axis=1) * np.linalg.norm(token[expressed], axis=1)
    )
    assert cos.max() < 0.99  # the context changes every gene's vector


def test_context_subsampling_counts_fewer_cells(small):
    out = sft.tl.embed_genes(small, mode="context", max_length=50, copy=True)
    n_cells = out.var["scgpt_genes_n_cells"].to_numpy()
    tokens = np.minimum(np.asarray((small.X > 0).sum(1)).ravel(), 49)
    assert n_cells.sum() == tokens.sum()  # 49 genes + <cls> per long cell
    assert (n_cells <= np.asarray((small.X > 0).sum(0)).ravel()).all()


def test_scbert_and_cellplm_token_tables(fixtures_dir, tmp_path):
    from scfm_tools.models.cellplm._checkpoint import load_cellplm_checkpoint
    from scfm_tools.models.scbert import load_scbert_checkpoint

    folder = tmp_path / "scbert"
    folder.mkdir()
    shutil.copyfile(fixtures_dir / "scbert" / "fixture_ckpt.pth", folder / "fixture_ckpt.pth")
    genes = [f"GENE{i}" for i in range(64)]
    (folder / "gene_list.txt").write_text("\n".join(genes))
    var_names = [*genes[10:40][::-1], "UNKNOWN1", "UNKNOWN2"]
    adata = ad.AnnData(
        sparse.csr_matrix(np.ones((3, len(var_names)), dtype=np.float32)),
        var=pd.DataFrame(index=var_names),
    )
    sft.tl.embed_genes(adata, folder / "fixture_ckpt.pth")
    module, _, _ = load_scbert_checkpoint(folder / "fixture_ckpt.pth", gene_list=genes)
    table = module.gene2vec.float().numpy()
    emb = adata.varm["X_scbert_genes"]
    np.testing.assert_allclose(emb[:30], table[[genes.index(g) for g in var_names[:30]]])
    assert np.isnan(emb[30:]).all()
    with pytest.raises(NotImplementedError, match="for scGPT and scFoundation models only"):
        sft.tl.embed_genes(adata, folder / "fixture_ckpt.pth", mode="context", key_added="c")
    assert "c" not in adata.varm

    ckpt = fixtures_dir / "cellplm" / "fixture.best.ckpt"
    gene_list = json.loads((fixtures_dir / "cellplm" / "fixture.config.json").read_text())[
        "gene_list"
    ]
    cells = ad.AnnData(
        sparse.csr_matrix(np.ones((2, 40), dtype=np.float32)),
        var=pd.DataFrame(index=gene_list[::-1][:40]),
    )
    sft.tl.embed_genes(cells, ckpt)
    module, model_genes, _, _ = load_cellplm_checkpoint(ckpt)
    expected = module.embedder.feat_enc.emb.detach().numpy()
    rows = [model_genes.index(g) for g in cells.var_names]
    np.testing.assert_allclose(cells.varm["X_cellplm_genes"], expected[rows])
    assert cells.var["cellplm_in_vocab"].all()


def test_embed_genes_bad_inputs(small, fixtures_dir):
    adata = small.copy()
    snap = snapshot(adata)
    with pytest.raises(ValueError, match="mode must be 'token' or 'context'"):
        sft.tl.embed_genes(adata, mode="contextual")
    with pytest.raises(TypeError, match="do not take"):
        sft.tl.embed_genes(adata, pool="max")
    adata.layers["neg"] = -adata.X
    snap = snapshot(adata)
    with pytest.raises(InputError, match="negative values"):
        sft.tl.embed_genes(adata, mode="context", layer="neg")
    assert_unchanged(adata, snap)
    renamed = adata.copy()
    renamed.var_names = [f"X{i}" for i in range(adata.n_vars)]
    snap = snapshot(renamed)
    with pytest.raises(InputError, match="too few genes match"):
        sft.tl.embed_genes(renamed)
    assert_unchanged(renamed, snap)


# gene_modules ------------------------------------------------------------------------------


def test_gene_modules_on_pbmc_hvgs(modules_run, pbmc, data_dir):
    adata = modules_run
    module = adata.var["gene_module"]
    assert isinstance(module.dtype, pd.CategoricalDtype)
    clustered = module.notna().to_numpy()
    hvg = adata.var["highly_variable"].to_numpy()
    usable = hvg & adata.var["scgpt_in_vocab"].to_numpy()
    assert not (clustered & ~usable).any()  # only HVGs with an embedding
    params = adata.uns["gene_module"]["params"]
    assert params["n_genes"] == usable.sum() and params["n_genes_in_modules"] == clustered.sum()
    sizes = module.value_counts(sort=False).reindex(module.cat.categories).to_numpy()
    assert params["n_modules"] == len(sizes) >= 2
    assert (sizes >= 5).all() and (np.diff(sizes) <= 0).all()  # named by decreasing size
    assert list(module.cat.categories) == [str(i) for i in range(len(sizes))]
    assert params["use_rep"] == "X_scgpt_genes" and params["embedding_mode"] == "token"
    assert adata.uns["scgpt_genes"]["params"]["mode"] == "token"  # the embeddings were written

    scores = adata.obsm["gene_module_scores"]
    assert isinstance(scores, pd.DataFrame) and scores.shape == (adata.n_obs, len(sizes))
    assert list(scores.columns) == list(module.cat.categories)
    assert (scores.index == adata.obs_names).all()
    cols = [np.flatnonzero((module == m).to_numpy()) for m in module.cat.categories]
    expected = _zscore_means(pbmc.layers["lognorm"], cols)
    np.testing.assert_allclose(scores.to_numpy(), expected, rtol=1e-4, atol=1e-4)
    assert params["score_values"] == "counts"
    np.testing.assert_array_equal(adata.X.toarray(), pbmc.X.toarray())  # X left as counts

    table = adata.uns["gene_module"]["enrichment"]
    assert len(table) > 0
    assert list(table.columns[:7]) == [
        "module",
        "gene_set",
        "overlap",
        "module_size",
        "set_size",
        "p_value",
        "p_adj",
    ]
    assert table["p_adj"].between(0, 1).all() and (table["p_adj"] >= table["p_value"]).all()
    assert table["p_value"].is_monotonic_increasing and (table["overlap"] >= 1).all()
    # the top row, recomputed from the GMT file
    top = table.iloc[0]
    sets = sft.datasets.read_gmt(data_dir / REACTOME, as_dict=True)
    background = set(adata.var_names[usable])
    members = set(adata.var_names[(module == top["module"]).to_numpy()])
    in_set = set(sets[top["gene_set"]]) & background
    assert top["overlap"] == len(members & in_set) and top["set_size"] == len(in_set)
    assert set(top["genes"].split(";")) == members & in_set
    p = hypergeom.sf(top["overlap"] - 1, len(background), len(in_set), len(members))
    assert top["p_value"] == pytest.approx(p, rel=1e-9)


def test_gene_modules_deterministic_and_reuses_embeddings(modules_run, caplog):
    with caplog.at_level("INFO", logger="scfm_tools"):
        again = sft.tl.gene_modules(modules_run, genes="highly_variable", copy=True)
    assert any("using the gene embeddings in varm" in r.getMessage() for r in caplog.records)
    pd.testing.assert_series_equal(again.var["gene_module"], modules_run.var["gene_module"])
    pd.testing.assert_frame_equal(
        again.obsm["gene_module_scores"], modules_run.obsm["gene_module_scores"]
    )
    assert "enrichment" not in again.uns["gene_module"]
    assert again.uns["gene_module"]["params"]["model"] == "scgpt-default"


def test_gene_modules_on_context_embeddings(small, caplog):
    adata = small.copy()
    sft.tl.embed_genes(adata)  # token embeddings first: replaced below, with a warning
    with caplog.at_level("WARNING", logger="scfm_tools"):
        sft.tl.gene_modules(adata, mode="context", n_neighbors=8, min_module_size=3)
    assert any("will be replaced" in r.getMessage() for r in caplog.records)
    assert adata.uns["scgpt_genes"]["params"]["mode"] == "context"
    params = adata.uns["gene_module"]["params"]
    assert params["embedding_mode"] == "context"
    never_token = adata.var["scgpt_genes_n_cells"].to_numpy() == 0
    assert adata.var["gene_module"][never_token].isna().all()
    assert params["n_genes"] == (~never_token).sum()
    # stored context embeddings are reused as they are when nothing else is asked for
    again = sft.tl.gene_modules(adata, n_neighbors=8, min_module_size=3, copy=True)
    assert again.uns["gene_module"]["params"]["embedding_mode"] == "context"
    pd.testing.assert_series_equal(again.var["gene_module"], adata.var["gene_module"])


@pytest.fixture(scope="module")
def planted():
    """Genes in 6 planted clusters of 30 in a 32-d space, plus 10 genes without embedding."""
    rng = np.random.default_rng(0)
    truth = np.repeat(np.arange(6), 30)
    centers = rng.normal(size=(6, 32))
    emb = centers[truth] + 0.35 * rng.normal(size=(truth.size, 32))
    emb = np.vstack([emb, np.full((10, 32), np.nan)]).astype(np.float32)
    counts = rng.poisson(2.0, size=(80, emb.shape[0])).astype(np.float32)
    adata = ad.AnnData(
        sparse.csr_matrix(counts),
        obs=pd.DataFrame(
            {"group": pd.Categorical(np.repeat(["a", "b", "c", "d"], 20))},
            index=[f"c{i}" for i in range(80)],
        ),
        var=pd.DataFrame(index=[f"g{i}" for i in range(emb.shape[0])]),
    )
    adata.varm["planted"] = emb
    return adata, truth


def test_planted_modules_are_recovered(planted):
    adata, truth = planted
    out = sft.tl.gene_modules(adata, use_rep="planted", n_neighbors=10, copy=True)
    found = out.var["gene_module"]
    assert found.iloc[truth.size :].isna().all()
    assert found.iloc[: truth.size].notna().all()
    assert adjusted_rand_score(truth, found.iloc[: truth.size].astype(str)) > 0.9
    assert out.uns["gene_module"]["params"]["neighbors"] == "exact"
    assert "model" not in out.uns["gene_module"]["params"]  # no model was run

    # log-normalised values in a layer give the same scores as the counts in X
    lognorm = adata.copy()
    sc.pp.normalize_total(lognorm, target_sum=1e4)
    sc.pp.log1p(lognorm)
    adata2 = adata.copy()
    adata2.layers["lognorm"] = lognorm.X
    out2 = sft.tl.gene_modules(
        adata2, use_rep="planted", n_neighbors=10, layer="lognorm", copy=True
    )
    assert out2.uns["gene_module"]["params"]["score_values"] == "log-normalised"
    np.testing.assert_allclose(
        out2.obsm["gene_module_scores"], out.obsm["gene_module_scores"], atol=1e-5
    )

    big = sft.tl.gene_modules(adata, use_rep="planted", min_module_size=31, copy=True)
    assert big.var["gene_module"].isna().all() and "gene_module_scores" not in big.obsm


def test_gene_set_forms_and_gmt_reader(planted, tmp_path):
    adata, _ = planted
    sets = {"first": [f"g{i}" for i in range(0, 30)] + ["g0", "absent"], "mixed": ["g5", "g65"]}
    gmt = tmp_path / "sets.gmt"
    gmt.write_text(
        "".join(f"{name}\tdesc\t" + "\t".join(genes) + "\n" for name, genes in sets.items())
        + "empty\tnothing\t\n"
    )
    gz = tmp_path / "sets.gmt.gz"
    gz.write_bytes(gzip.compress(gmt.read_bytes()))
    read = sft.datasets.read_gmt(gz, as_dict=True)
    assert read == {"first": list(dict.fromkeys(sets["first"])), "mixed": ["g5", "g65"]}
    long = sft.datasets.read_gmt(gmt)
    assert list(long.columns) == ["source", "target", "description"] and len(long) == 33

    tables = []
    for form in (sets, long, gmt, str(gz)):
        out = sft.tl.gene_modules(
            adata, use_rep="planted", n_neighbors=10, gene_sets=form, score_cells=False, copy=True
        )
        tables.append(out.uns["gene_module"]["enrichment"])
    for table in tables[1:]:
        pd.testing.assert_frame_equal(table, tables[0])
    top = tables[0].iloc[0]
    assert top["gene_set"] == "first" and top["overlap"] == 30 and top["set_size"] == 30
    assert top["module_size"] == 30 and top["p_adj"] < 1e-20


def test_gene_modules_bad_inputs_leave_adata_unchanged(planted):
    adata = planted[0].copy()
    snap = snapshot(adata)
    cases = [
        (KeyError, "use_rep='nope' is not in adata.varm", {"use_rep": "nope"}),
        (InputError, "not in adata.var_names", {"use_rep": "planted", "genes": ["g1", "CD3E"]}),
        (InputError, "not a column of adata.var", {"use_rep": "planted", "genes": "hvg"}),
        (
            InputError,
            "too few genes to build modules: 8 of the 8",
            {"use_rep": "planted", "genes": [f"g{i}" for i in range(8)]},
        ),
        (
            InputError,
            "needs the columns 'source'",
            {"use_rep": "planted", "gene_sets": pd.DataFrame({"set": ["a"], "gene": ["g1"]})},
        ),
        (
            InputError,
            "must be a list of gene names",
            {"use_rep": "planted", "gene_sets": {"a": "g1"}},
        ),
        (ValueError, "resolution must be positive", {"use_rep": "planted", "resolution": 0}),
        (ValueError, "n_neighbors must be a positive", {"use_rep": "planted", "n_neighbors": 0}),
        (TypeError, "gene_modules sets them itself", {"use_rep": "planted", "caller": "x"}),
    ]
    for error, match, kwargs in cases:
        with pytest.raises(error, match=match):
            sft.tl.gene_modules(adata, **kwargs)
        assert_unchanged(adata, snap)
    negative = adata.copy()
    negative.X = -negative.X
    snap = snapshot(negative)
    with pytest.raises(InputError, match="negative values"):
        sft.tl.gene_modules(negative, use_rep="planted")
    assert_unchanged(negative, snap)


def test_gene_modules_on_mudata(planted):
    mudata = pytest.importorskip("mudata")
    adata, truth = planted
    mdata = mudata.MuData({"rna": adata.copy()})
    sft.tl.gene_modules(mdata, use_rep="planted", n_neighbors=10, mod="rna")
    assert mdata.mod["rna"].var["gene_module"].iloc[: truth.size].notna().all()
    assert mdata.mod["rna"].obsm["gene_module_scores"].shape[0] == adata.n_obs


# pl.gene_modules ---------------------------------------------------------------------------


def test_plot_heatmap_and_dotplot(planted):
    import matplotlib.pyplot as plt

    adata = sft.tl.gene_modules(planted[0], use_rep="planted", n_neighbors=10, copy=True)
    scores = adata.obsm["gene_module_scores"]
    expected = scores.groupby(adata.obs["group"].to_numpy()).mean()

    ax = sft.pl.gene_modules(adata, "group", show=False)
    image = ax.images[0].get_array()
    assert image.shape == (4, scores.shape[1])
    np.testing.assert_allclose(np.asarray(image), expected.to_numpy(), rtol=1e-5, atol=1e-6)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c", "d"]
    assert [t.get_text() for t in ax.get_xticklabels()] == list(scores.columns)
    plt.close("all")

    chosen = list(scores.columns[[2, 0]])
    ax = sft.pl.gene_modules(adata, "group", kind="dotplot", modules=chosen, show=False)
    dots = ax.collections[0]
    assert len(dots.get_offsets()) == 4 * 2
    frac = (scores[chosen] > 0).groupby(adata.obs["group"].to_numpy()).mean().to_numpy().ravel()
    np.testing.assert_allclose(dots.get_sizes(), 20 + 280 * frac)
    np.testing.assert_allclose(dots.get_array(), expected[chosen].to_numpy().ravel(), atol=1e-6)
    assert [t.get_text() for t in ax.get_xticklabels()] == chosen
    plt.close("all")

    with pytest.raises(KeyError, match="run `sft.tl.gene_modules"):
        sft.pl.gene_modules(adata, "group", key="other", show=False)
    with pytest.raises(KeyError, match="not among the scored modules"):
        sft.pl.gene_modules(adata, "group", modules=["99"], show=False)
