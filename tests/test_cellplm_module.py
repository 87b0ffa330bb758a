"""CellPLM: Flowformer layers, module, checkpoint loading and the embedding path."""

from __future__ import annotations

import json
import logging
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse, stats

import scfm_tools as sft
from _unchanged import assert_unchanged, snapshot
from scfm_tools._validation import InputError
from scfm_tools.models.cellplm import (
    CellPLMModule,
    embed_matrix,
    load_cellplm_checkpoint,
    module_config,
    nb_nll,
)
from scfm_tools.nn import FlowAttention, FlowformerEncoder, FlowformerLayer, make_norm
from scfm_tools.pp._gene_ids import ensembl_to_symbol

TINY = {
    "enc_hid": 16,
    "enc_layers": 2,
    "enc_head": 2,
    "post_latent_dim": 8,
    "num_clusters": 4,
    "dec_hid": 16,
    "dec_layers": 2,
    "batch_num": 3,
    "dataset_num": 2,
    "model_dropout": 0.2,
    "norm": "groupnorm",
    "enc_mod": "flowformer",
    "latent_mod": "gmvae",
    "dec_mod": "nbmlp",
    "lamda": 5.0,
    "w_li": 5.0,
    "w_en": 5.0,
}


@pytest.fixture
def sft_log():
    """Collect records of the package logger (it does not propagate to the root logger)."""
    records: list[logging.LogRecord] = []

    class _Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = _Keep(level=logging.INFO)
    logger = logging.getLogger("scfm_tools")
    old = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(old)


def _write_checkpoint(folder, genes, *, seed=0, drop=(), **overrides):
    """Write a tiny randomly initialised CellPLM checkpoint in the official layout."""
    config = {**TINY, **overrides, "gene_list": list(genes), "out_dim": len(genes)}
    torch.manual_seed(seed)
    module = CellPLMModule(**module_config(config))
    state = {k: v for k, v in module.state_dict().items() if not k.startswith(tuple(drop))}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny.config.json").write_text(json.dumps(config))
    torch.save({"model_state_dict": state}, folder / "tiny.best.ckpt")
    return folder / "tiny.best.ckpt"


# --- real data: CellBench, two protocols (batches), symbols + Ensembl IDs ------------------
@pytest.fixture(scope="module")
def cellbench(data_dir):
    adata = ad.read_h5ad(data_dir / "cellbench_3celllines_celseq2_dropseq.h5ad")
    # genes whose symbol maps back to the same Ensembl ID, the most expressed first
    ids = adata.var["gene_ids"].astype(str).to_numpy()
    round_trip = ensembl_to_symbol(ids) == adata.var_names.to_numpy()
    totals = np.asarray(adata.X.sum(0)).ravel()
    keep = np.flatnonzero(round_trip)[np.argsort(-totals[round_trip], kind="stable")[:300]]
    rng = np.random.default_rng(0)
    cells = np.concatenate(
        [
            rng.choice(np.flatnonzero(adata.obs["batch"] == b), 12, replace=False)
            for b in sorted(adata.obs["batch"].unique())
        ]
    )
    small = adata[np.sort(cells), np.sort(keep)].copy()
    small.X = sparse.csr_matrix(small.X, dtype=np.float32)
    return small


@pytest.fixture(scope="module")
def tiny_ckpt(cellbench, tmp_path_factory):
    # the model knows 250 of the 300 genes (plus genes the data lacks), in another order
    genes = [*list(cellbench.var["gene_ids"].astype(str))[:250][::-1], "ENSG00000000003"]
    return _write_checkpoint(tmp_path_factory.mktemp("cellplm_tiny"), genes)


# --- Flowformer layers ----------------------------------------------------------------------
def _flow_reference(attn: FlowAttention, x: torch.Tensor) -> torch.Tensor:
    """Flow attention written out per head with explicit loops over cells (one sequence)."""
    n, d = x.shape
    h, dh, eps = attn.num_heads, d // attn.num_heads, attn.eps
    q = torch.sigmoid(attn.query_projection(x)).view(n, h, dh)
    k = torch.sigmoid(attn.key_projection(x)).view(n, h, dh)
    v = attn.value_projection(x).view(n, h, dh)
    out = torch.zeros(n, h, dh, dtype=x.dtype)
    for head in range(h):
        qh, kh, vh = q[:, head], k[:, head], v[:, head]
        inc = torch.stack([1 / ((qh[i] + eps) @ (kh.sum(0) + eps)) for i in range(n)])
        outg = torch.stack([1 / ((kh[j] + eps) @ (qh.sum(0) + eps)) for j in range(n)])
        sink = torch.stack([(qh[i] + eps) @ ((kh * outg[:, None]).sum(0) + eps) for i in range(n)])
        src = torch.stack([(kh[j] + eps) @ ((qh * inc[:, None]).sum(0) + eps) for j in range(n)])
        comp = torch.softmax(src.clamp(-1, 1), 0) * n
        alloc = torch.sigmoid(sink)
        for i in range(n):
            acc = sum((qh[i] * inc[i]) @ kh[j] * vh[j] * comp[j] for j in range(n))
            out[i, head] = acc * alloc[i]
    return attn.out_projection(out.reshape(n, d))


def test_flow_attention_matches_written_out_formula():
    torch.manual_seed(0)
    attn = FlowAttention(8, 2).double().eval()
    x = torch.randn(6, 8, dtype=torch.float64)
    expected = _flow_reference(attn, x)
    np.testing.assert_allclose(attn(x[None])[0].detach(), expected.detach(), rtol=1e-10)


def test_flowformer_is_permutation_equivariant_over_cells():
    torch.manual_seed(0)
    enc = FlowformerEncoder(2, 8, 2, dropout=0.1).eval()
    x = torch.randn(9, 8)
    perm = torch.randperm(9)
    with torch.no_grad():
        out = enc(x)
        np.testing.assert_allclose(enc(x[perm]), out[perm], atol=1e-6)
        # a (seq, d) input is one sequence: same as a batch of one
        np.testing.assert_allclose(enc(x[None])[0], out, atol=0)
        # cells attend to each other: changing one cell changes the others' outputs
        y = x.clone()
        y[0] = torch.randn(8)  # (a constant shift would vanish in the pre-layer norm)
        assert not torch.allclose(enc(y)[1:], out[1:], atol=1e-4)


@pytest.mark.parametrize("norm", ["layernorm", "groupnorm", "batchnorm", "none"])
def test_flowformer_layer_norms_and_post_norm(norm):
    torch.manual_seed(0)
    for norm_first in (True, False):
        layer = FlowformerLayer(8, 2, norm=norm, norm_first=norm_first).eval()
        x = torch.randn(2, 5, 8)
        out = layer(x)
        assert out.shape == x.shape and torch.isfinite(out).all()
        # batch elements are separate sequences: each equals its own run
        if norm != "batchnorm":  # (eval batch norm is per feature too, but keep it simple)
            np.testing.assert_allclose(layer(x[1]).detach(), out[1].detach(), atol=1e-6)


def test_flow_attention_checks_heads_and_norm_names():
    with pytest.raises(ValueError, match="divisible"):
        FlowAttention(10, 3)
    with pytest.raises(ValueError, match="norm must be"):
        make_norm("rmsnorm", 8)


# --- module ---------------------------------------------------------------------------------
def _module(seed=0, **kw) -> CellPLMModule:
    torch.manual_seed(seed)
    config = {**TINY, **kw, "gene_list": [f"g{i}" for i in range(30)]}
    return CellPLMModule(**module_config(config))


def _counts(n=7, g=30, seed=0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.poisson(1.5, (n, g)).astype(np.float32))


def test_latent_modes():
    module = _module().eval()
    x = _counts()
    with torch.no_grad():
        det = module.inference(x)
        expected = torch.nn.functional.one_hot(det["logits"].argmax(-1), 4).float()
        np.testing.assert_array_equal(det["categorical"], expected)
        np.testing.assert_array_equal(det["z"], det["mean"])
        g = torch.Generator().manual_seed(3)
        drawn = module.inference(x, sample=True, generator=g)
        assert set(drawn["categorical"].unique().tolist()) <= {0.0, 1.0}
        np.testing.assert_allclose(drawn["categorical"].sum(-1), 1.0)
        np.testing.assert_array_equal(drawn["z"], drawn["mean"])
        # sparse and dense input give the same embedding
        np.testing.assert_allclose(module.inference(x.to_sparse())["mean"], det["mean"], atol=1e-6)
    module.train()
    soft = module.inference(x, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(soft["z"], soft["mean"])  # training uses the reparameterised draw
    np.testing.assert_allclose(soft["categorical"].sum(-1).detach(), 1.0, atol=1e-6)
    assert (soft["categorical"] < 1).all()  # a soft Gumbel-softmax sample


def test_nb_nll_is_negative_binomial_log_pmf():
    x = torch.tensor([0.0, 1.0, 3.0, 10.0, 50.0], dtype=torch.float64)
    mean = torch.tensor([0.5, 2.0, 3.0, 8.0, 20.0], dtype=torch.float64)
    disp = torch.tensor([0.3, 1.0, 5.0, 2.0, 0.7], dtype=torch.float64)
    p = (disp / (disp + mean)).numpy()
    expected = -stats.nbinom.logpmf(x.numpy(), disp.numpy(), p)
    np.testing.assert_allclose(nb_nll(x, mean, disp, eps=0.0).numpy(), expected, rtol=1e-10)


def test_pretraining_loss_and_gradients():
    module = _module().train()
    x = _counts()
    mask = (torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    tensors = {"X": x * (1 - mask), "X_target": x, "input_mask": mask, "batch": torch.zeros(7)}
    _, gen, loss = module(tensors, inference_kwargs={"generator": torch.Generator()})
    assert gen["mean"].shape == x.shape and torch.isfinite(loss.loss)
    assert loss.loss > 0 and loss.reconstruction_loss["reconstruction_loss"].shape == (7,)
    loss.loss.backward()
    assert module.embedder.feat_enc.emb.grad.abs().sum() > 0
    assert module.decoder.out_layer.dec_disp.grad.abs().sum() > 0
    # the masked-entry (DAE) term adds to the loss in training only
    off = _module()
    off.load_state_dict(module.state_dict())
    off.dae = False
    nb = {}
    for name, mod in (("dae", module), ("plain", off)):
        for training in (True, False):
            mod.train(training)
            torch.manual_seed(1)
            with torch.no_grad():
                _, _, out = mod(tensors, inference_kwargs={"generator": torch.Generator()})
            nb[name, training] = float(out.extra_metrics["nb_loss"])
    assert nb["dae", True] > nb["plain", True]
    assert nb["dae", False] == nb["plain", False]


def test_decoder_batch_covariate():
    module = _module().eval()
    z = torch.randn(5, 8)
    with torch.no_grad():
        a = module.generative(z, batch=torch.tensor([0, 1, 2, 0, 1]))["mean"]
        b = module.generative(z)["mean"]
        same = module.generative(z, batch=torch.zeros(5, dtype=torch.long))["mean"]
    assert not torch.allclose(a, b)
    # rows with the same batch id get the same batch shift
    assert torch.equal(a[0], same[0]) and torch.equal(a[3], same[3])
    with pytest.raises(ValueError, match=r"batch ids must lie in \[0, 3\)"):
        module.generative(z, batch=torch.tensor([0, 1, 2, 3, 0]))


# --- checkpoint loading ---------------------------------------------------------------------
def test_embedder_only_checkpoint_lists_missing_decoder(tmp_path, sft_log):
    path = _write_checkpoint(tmp_path, [f"ENSG{i:011d}" for i in range(20)], drop=("decoder.",))
    module, _, _, report = load_cellplm_checkpoint(path)
    assert not report.clean and all(k.startswith("decoder.") for k in report.missing)
    assert len(report.missing) == sum(k.startswith("decoder.") for k in module.state_dict())
    assert any("missing (left at initialisation)" in r.getMessage() for r in sft_log)
    with pytest.raises(ValueError, match="strict=True"):
        load_cellplm_checkpoint(path, strict=True)


def test_unsupported_config_is_refused(tmp_path):
    path = _write_checkpoint(tmp_path, ["ENSG00000000003"])
    config = json.loads((tmp_path / "tiny.config.json").read_text())
    (tmp_path / "tiny.config.json").write_text(json.dumps({**config, "enc_mod": "performer"}))
    with pytest.raises(NotImplementedError, match="enc_mod='performer' is not supported"):
        load_cellplm_checkpoint(path)


def test_other_family_checkpoint_is_refused(fixtures_dir, tmp_path):
    scgpt = fixtures_dir / "scgpt" / "ckpt_folder"
    # an scGPT folder: no CellPLM files there
    with pytest.raises(FileNotFoundError, match="CellPLM"):
        load_cellplm_checkpoint(scgpt)
    # scGPT weights renamed to the CellPLM layout: refused on their keys
    shutil.copy(fixtures_dir / "cellplm" / "fixture.config.json", tmp_path / "x.config.json")
    shutil.copy(scgpt / "best_model.pt", tmp_path / "x.best.ckpt")
    with pytest.raises(ValueError, match="does not look like a CellPLM checkpoint"):
        load_cellplm_checkpoint(tmp_path / "x.best.ckpt")
    # a CellPLM-only option given for an scGPT model: refused before anything is written
    adata = ad.AnnData(np.ones((3, 4), dtype=np.float32), var=pd.DataFrame(index=list("ABCD")))
    snap = snapshot(adata)
    with pytest.raises(TypeError, match=r"\['batch_key'\] that scgpt models do not take"):
        sft.tl.embed_cells(adata, scgpt, batch_key="batch")
    assert_unchanged(adata, snap)


# --- embedding through sft.tl.embed_cells, real data -------------------------------------------
def test_deterministic_mode_is_repeatable_and_leaves_global_rng(cellbench, tiny_ckpt):
    adata = cellbench.copy()
    state = torch.get_rng_state()
    sft.tl.embed_cells(adata, tiny_ckpt, batch_key="batch", device="cpu")
    first = adata.obsm["X_cellplm"].copy()
    sft.tl.embed_cells(adata, tiny_ckpt, batch_key="batch", device="cpu", random_state=5)
    np.testing.assert_array_equal(adata.obsm["X_cellplm"], first)
    assert torch.equal(torch.get_rng_state(), state)
    assert first.shape == (adata.n_obs, TINY["post_latent_dim"]) and np.isfinite(first).all()
    params = adata.uns["cellplm"]["params"]
    assert params["sample"] is False and "random_state" not in params
    assert params["n_sequences"] == 2 and params["n_genes_matched"] == 250


def test_sampling_follows_the_seed(cellbench, tiny_ckpt):
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        adata = cellbench.copy()
        sft.tl.embed_cells(adata, tiny_ckpt, batch_key="batch", sample=True, random_state=seed)
        runs[name] = adata.obsm["X_cellplm"]
    np.testing.assert_array_equal(runs["a"], runs["b"])
    assert not np.allclose(runs["a"], runs["c"])


def test_output_follows_adata_order(cellbench, tiny_ckpt):
    adata = cellbench.copy()
    sft.tl.embed_cells(adata, tiny_ckpt, batch_key="batch")
    perm = np.random.default_rng(1).permutation(adata.n_obs)
    shuffled = cellbench[perm].copy()
    sft.tl.embed_cells(shuffled, tiny_ckpt, batch_key="batch")
    # the same cells form the same sequences, and attention does not depend on cell order
    np.testing.assert_allclose(shuffled.obsm["X_cellplm"], adata.obsm["X_cellplm"][perm], atol=1e-5)


def test_sequences_and_chunks(cellbench, tiny_ckpt):
    module, genes, _, _ = load_cellplm_checkpoint(tiny_ckpt)
    X, ids = cellbench.X, list(cellbench.var["gene_ids"])
    batch = cellbench.obs["batch"].to_numpy()
    whole = embed_matrix(module, genes, X, ids, batch=batch)
    np.testing.assert_array_equal(
        embed_matrix(module, genes, X, ids, batch=batch, max_cells=12), whole
    )
    # one cell per sequence == each cell embedded on its own
    alone = embed_matrix(module, genes, X, ids, batch=batch, max_cells=1)
    single = np.vstack([embed_matrix(module, genes, X[[i]], ids) for i in range(3)])
    np.testing.assert_allclose(alone[:3], single, atol=1e-6)
    # cells attend to the other cells of their sequence: grouping matters
    assert not np.allclose(alone, whole, atol=1e-4)
    assert not np.allclose(embed_matrix(module, genes, X, ids), whole, atol=1e-4)


def test_symbols_and_ensembl_ids_give_the_same_embedding(cellbench, tiny_ckpt):
    by_symbol = cellbench.copy()
    sft.tl.embed_cells(by_symbol, tiny_ckpt, batch_key="batch")
    by_id = cellbench.copy()
    sft.tl.embed_cells(by_id, tiny_ckpt, batch_key="batch", gene_key="gene_ids")
    np.testing.assert_array_equal(by_symbol.obsm["X_cellplm"], by_id.obsm["X_cellplm"])


def test_symbol_named_fixture_input_works_offline(fixtures_dir):
    root = fixtures_dir / "cellplm"
    arrays = dict(np.load(root / "fixture_io.npz"))
    meta = json.loads((root / "fixture_meta.json").read_text())
    ids = [str(g) for g in arrays["var_names"]]
    symbols = ensembl_to_symbol(ids)
    names = [s if s is not None else i for s, i in zip(symbols, ids, strict=True)]
    assert sum(s is not None for s in symbols) >= 60  # the fixture's known genes have symbols
    runs = []
    for var_names in (ids, names):
        adata = ad.AnnData(
            arrays["counts"],
            obs=pd.DataFrame(
                {"batch": arrays["obs_batch"].astype(str)},
                index=[f"c{i}" for i in range(len(arrays["counts"]))],
            ),
            var=pd.DataFrame(index=var_names),
        )
        sft.tl.embed_cells(
            adata,
            root,
            batch_key="batch",
            sample=True,
            random_state=0,
            random_stream="official",
        )
        runs.append(adata.obsm["X_cellplm"])
        assert adata.uns["cellplm"]["params"]["n_genes_matched"] == len(
            json.loads((root / "fixture.config.json").read_text())["gene_list"]
        )
    np.testing.assert_array_equal(runs[0], runs[1])
    tol = meta["tolerance"]
    np.testing.assert_allclose(
        runs[1], arrays["cell_emb_seed0"], atol=tol["atol"], rtol=tol["rtol"]
    )


def test_barely_overlapping_genes_are_refused(cellbench, tiny_ckpt):
    adata = cellbench.copy()
    adata.var_names = [f"NOTAGENE{i}" if i > 3 else g for i, g in enumerate(adata.var_names)]
    snap = snapshot(adata)
    with pytest.raises(InputError, match="too few genes match the vocabulary"):
        sft.tl.embed_cells(adata, tiny_ckpt, batch_key="batch")
    assert_unchanged(adata, snap)


def test_bad_batch_key_leaves_adata_unchanged(cellbench, tiny_ckpt):
    adata = cellbench.copy()
    snap = snapshot(adata)
    with pytest.raises(KeyError, match="batch_key 'sample' is not a column of adata.obs"):
        sft.tl.embed_cells(adata, tiny_ckpt, batch_key="sample")
    assert_unchanged(adata, snap)
    adata.obs["with_nan"] = adata.obs["batch"].astype(object)
    adata.obs.iloc[2, adata.obs.columns.get_loc("with_nan")] = np.nan
    snap = snapshot(adata)
    with pytest.raises(InputError, match=r"adata.obs\['with_nan'\] is missing for 1 cells"):
        sft.tl.embed_cells(adata, tiny_ckpt, batch_key="with_nan")
    assert_unchanged(adata, snap)


def test_unknown_option_is_refused(cellbench, tiny_ckpt):
    adata = cellbench.copy()
    snap = snapshot(adata)
    with pytest.raises(
        TypeError, match=r"it takes \['batch_key', 'max_cells', 'random_stream', 'sample'\]"
    ):
        sft.tl.embed_cells(adata, tiny_ckpt, samples=True)
    assert_unchanged(adata, snap)


# --- imputation through sft.tl.impute ---------------------------------------------------------
def test_impute_denoises_known_genes(cellbench, tiny_ckpt):
    adata = cellbench.copy()
    sft.tl.impute(adata, tiny_ckpt, batch_key="batch")
    out = adata.layers["cellplm_denoised"]
    known = np.isin(
        adata.var["gene_ids"],
        json.loads(tiny_ckpt.with_name("tiny.config.json").read_text())["gene_list"],
    )
    assert out.shape == adata.shape and out.dtype == np.float32
    assert np.isnan(out[:, ~known]).all() and np.isfinite(out[:, known]).all()
    assert (out[:, known] > 0).all()  # NB means, zeros (dropouts) included
    # rescaled to each cell's observed total over the known genes
    observed = np.asarray(adata.X[:, known].sum(1)).ravel()
    np.testing.assert_allclose(out[:, known].sum(1), observed, rtol=1e-4)
    assert np.isfinite(adata.var.loc[known, "cellplm_denoised_dispersion"]).all()
    params = adata.uns["cellplm_denoised"]["params"]
    assert (
        params["rescale"] is True and params["batch_key"] == "batch" and params["sample"] is False
    )
    # deterministic
    again = cellbench.copy()
    sft.tl.impute(again, tiny_ckpt, batch_key="batch")
    np.testing.assert_array_equal(again.layers["cellplm_denoised"], out)


def test_impute_decoder_batch(cellbench, tiny_ckpt):
    adata = cellbench.copy()
    adata.obs["ids"] = (adata.obs["batch"] == "sc_dropseq").astype(int)
    sft.tl.impute(adata, tiny_ckpt, batch_key="batch", rescale=False, key_added="plain")
    sft.tl.impute(
        adata, tiny_ckpt, batch_key="batch", decoder_batch_key="ids", rescale=False, key_added="b"
    )
    known = ~np.isnan(adata.layers["plain"][0])
    assert not np.allclose(adata.layers["plain"][:, known], adata.layers["b"][:, known])
    assert adata.uns["b"]["params"]["decoder_batch_key"] == "ids"
    # ids outside the decoder's table (3 rows here) are refused, nothing written
    adata.obs["ids"] = 7
    snap = snapshot(adata)
    with pytest.raises(
        InputError, match=r"integer ids into the decoder's batch table, in \[0, 3\)"
    ):
        sft.tl.impute(adata, tiny_ckpt, decoder_batch_key="ids", key_added="c")
    assert_unchanged(adata, snap)
    assert "c" not in adata.layers


def test_impute_refuses_bad_input(cellbench, tiny_ckpt, tmp_path, fixtures_dir):
    adata = cellbench.copy()
    adata.X = adata.X.multiply(1.5).tocsr()  # not counts
    snap = snapshot(adata)
    with pytest.raises(InputError, match="non-integer values"):
        sft.tl.impute(adata, tiny_ckpt)
    assert_unchanged(adata, snap)
    adata = cellbench.copy()
    snap = snapshot(adata)
    with pytest.raises(NotImplementedError, match="impute is not available for scgpt models"):
        sft.tl.impute(adata, fixtures_dir / "scgpt" / "ckpt_folder")
    genes = list(cellbench.var["gene_ids"])[:100]
    headless = _write_checkpoint(tmp_path, genes, drop=("decoder.",))
    with pytest.raises(ValueError, match="no decoder weights"):
        sft.tl.impute(adata, headless)
    assert_unchanged(adata, snap)


def test_gene_embedder_dense_blocks_equal_the_sparse_product():
    # Deep cells take the densified path; its result is the sparse product's, empty cells too;
    # dense input, read by row blocks, too.
    from scfm_tools.models.cellplm._module import DENSE_FROM, GeneEmbedder, _log1p_matmul_by_blocks

    gen = torch.Generator().manual_seed(0)
    n, g = 600, 300  # more cells than one block of 256, not a multiple of it
    dense = torch.poisson(torch.rand(n, g, generator=gen) * 0.6, generator=gen)
    dense[[0, 257, 599]] = 0  # empty cells, at a block's start and at the end
    x = dense.to_sparse()
    assert x._nnz() >= DENSE_FROM * n * g
    embedder = GeneEmbedder(g, 16)
    expected = torch.sparse.mm(torch.log1p(x), embedder.emb)
    torch.testing.assert_close(embedder(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_log1p_matmul_by_blocks(x, embedder.emb), expected)
    torch.testing.assert_close(embedder(dense), expected, rtol=1e-5, atol=1e-6)  # dense blocks
    assert embedder(x)[[0, 257, 599]].abs().max() == 0
    # gradients reach the embedding table the same way
    embedder(x).sum().backward()
    grad = embedder.emb.grad.clone()
    embedder.emb.grad = None
    torch.sparse.mm(torch.log1p(x), embedder.emb).sum().backward()
    torch.testing.assert_close(grad, embedder.emb.grad, rtol=1e-5, atol=1e-5)


def test_dense_sequence_inputs_equal_the_sparse_ones(cellbench, tiny_ckpt, monkeypatch):
    # Deep cells reach the model as a dense tensor: the same counts, draws and embeddings.
    import dataclasses

    from scfm_tools.models.cellplm import _embed
    from scfm_tools.models.cellplm._embed import DENSE_INPUT_FROM, cell_noise
    from scfm_tools.models.cellplm._sequences import to_model_genes
    from scfm_tools.pp import match_to_vocab

    module, gene_list, _, _ = load_cellplm_checkpoint(tiny_ckpt)
    genes = cellbench.var["gene_ids"].astype(str).to_numpy()
    match = match_to_vocab(genes, gene_list)
    X = cellbench.X
    assert X.nnz >= DENSE_INPUT_FROM * X.shape[0] * len(gene_list)  # the dense path is taken
    sparse_counts = to_model_genes(X, match, len(gene_list))
    dense_counts = to_model_genes(X, match, len(gene_list), dense_from=DENSE_INPUT_FROM)
    assert sparse_counts.is_sparse and dense_counts.layout == torch.strided
    torch.testing.assert_close(dense_counts, sparse_counts.to_dense(), rtol=0, atol=0)
    dense_draws = cell_noise(dense_counts, 3, 4, 8)
    sparse_draws = cell_noise(sparse_counts, 3, 4, 8)
    for a, b in zip(dense_draws, sparse_draws, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # two query columns naming one model gene add up in both layouts
    twice = dataclasses.replace(match, index=match.index.copy(), matched=match.matched.copy())
    first, second = np.flatnonzero(match.matched)[:2]
    twice.index[second], twice.matched[second] = twice.index[first], True
    summed = to_model_genes(X, twice, len(gene_list)).to_dense()
    torch.testing.assert_close(
        to_model_genes(X, twice, len(gene_list), dense_from=0.0), summed, rtol=0, atol=0
    )
    column = torch.from_numpy(np.asarray(X[:, [first, second]].sum(1), np.float32).ravel())
    torch.testing.assert_close(summed[:, twice.index[first]], column, rtol=0, atol=0)
    # the embeddings, dense inputs against sparse ones (sampled, with per-cell draws)
    batch = cellbench.obs["batch"].to_numpy()
    kw = {"batch": batch, "sample": True, "random_stream": "cell"}
    dense_emb = embed_matrix(module, gene_list, X, genes, **kw)
    monkeypatch.setattr(_embed, "DENSE_INPUT_FROM", None)
    sparse_emb = embed_matrix(module, gene_list, X, genes, **kw)
    np.testing.assert_allclose(dense_emb, sparse_emb, atol=1e-5)
