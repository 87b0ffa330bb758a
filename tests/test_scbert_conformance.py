"""scBERT against the official implementation: the fixture's checkpoint, inputs and outputs.

Everything (sizes, configuration, tolerance) is read from the fixture folder, so these tests
pass for any fixture written in the same format. The fixture's outputs come from one official
``PerformerLM.forward`` on all its cells at once, whose FAVOR+ key stabiliser spans the batch:
they are reproduced with ``key_max="batch"`` (also through ``sft.tl.embed_cells``). Its
default, the per-cell stabiliser (each cell as if alone, as the official ``predict.py`` runs
them), is checked against the official computation on one cell at a time.
"""

from __future__ import annotations

import json
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse

import scfm_tools as sft
from scfm_tools.models.scbert import SCBERTTokenizer, embed_matrix, load_scbert_checkpoint
from scfm_tools.pp._binning import scbert_log2_norm

pytestmark = pytest.mark.conformance


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
    folder = fixtures_dir / "scbert"
    meta = json.loads((folder / "fixture_meta.json").read_text())
    with np.load(folder / "fixture_io.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    return folder, meta, arrays


@pytest.fixture(scope="module")
def loaded(fixture):
    folder, _, _ = fixture
    module, genes, report = load_scbert_checkpoint(folder / "fixture_ckpt.pth")
    # the fixture ran every cell in one official forward: its key stabiliser spans the batch
    module.performer.key_max = "batch"
    return module, genes, report


@pytest.fixture(scope="module")
def outputs(fixture, loaded):
    _, _, a = fixture
    module = loaded[0]
    tensors = {"tokens": torch.from_numpy(a["tokens"]).long()}
    with torch.inference_mode():
        inf = module.inference(**module._get_inference_input(tensors))
        gen = module.generative(**module._get_generative_input(tensors, inf))
    return inf, gen


def _genes(n: int) -> list[str]:
    # The fixture's genes are unnamed: its columns are the checkpoint's genes in order.
    return [f"FIXGENE{i}" for i in range(n)]


def _close(actual, expected, meta):
    tol = meta["tolerance"]
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, atol=tol["atol"], rtol=tol["rtol"])


def test_checkpoint_loads_clean_with_fixture_config(fixture, loaded):
    _, meta, a = fixture
    module, genes, report = loaded
    cfg = meta["fixture_config"]
    assert report.clean, str(report)
    assert genes is None
    assert set(report.loaded) == set(module.state_dict())
    assert module.n_genes == cfg["n_genes"] == a["counts"].shape[1]
    assert module.seq_len == cfg["max_seq_len"] == a["tokens"].shape[1]
    for key in ("num_tokens", "dim", "depth", "heads", "dim_head", "qkv_bias"):
        assert module.config[key] == cfg[key], key
    assert module.config["gene2vec"] == cfg["g2v_position_emb"]
    for key, (shape, dtype) in meta["state_dict"].items():
        value = module.state_dict()[key]
        assert tuple(value.shape) == tuple(shape), key
        assert str(value.dtype) == dtype, key


def test_log2_norm(fixture):
    _, meta, a = fixture
    counts = sparse.csr_matrix(a["counts"])
    n = counts.shape[1]
    tokenizer = SCBERTTokenizer(np.arange(n), n, bin_num=meta["fixture_config"]["bin_num"])
    _close(tokenizer.log2_norm(counts).toarray(), a["log2_norm"], meta)
    values = sparse.csr_matrix((scbert_log2_norm(counts), counts.indices, counts.indptr))
    _close(values.toarray(), a["log2_norm"], meta)


def test_tokens(fixture, loaded):
    _, meta, a = fixture
    module = loaded[0]
    n = module.n_genes
    tokenizer = SCBERTTokenizer(np.arange(n), n, bin_num=module.num_tokens - 2)
    np.testing.assert_array_equal(tokenizer(a["counts"]).numpy(), a["tokens"])
    # the same bins through the AnnData function, plus the appended padding token
    adata = ad.AnnData(sparse.csr_matrix(a["counts"]))
    sft.pp.bin_values(adata, flavor="scbert", n_bins=meta["fixture_config"]["bin_num"])
    np.testing.assert_array_equal(adata.layers["X_scbert_bins"].toarray(), a["tokens"][:, :-1])
    assert (a["tokens"][:, -1] == 0).all()


def test_embedding_input(fixture, loaded):
    _, meta, a = fixture
    module = loaded[0]
    tokens = torch.from_numpy(a["tokens"]).long()
    with torch.inference_mode():
        exact = module.token_emb(tokens).double() + module.pos_emb(tokens.shape[1])
        stored = module.embed(tokens)
    _close(exact.numpy(), a["embedding_input"], meta)
    # the model keeps the float64 sum in its float32 activations (official in-place add)
    assert stored.dtype == torch.float32
    np.testing.assert_array_equal(stored.numpy(), a["embedding_input"].astype(np.float32))


def test_logits(fixture, outputs):
    _, meta, a = fixture
    _close(outputs[1]["logits"].numpy(), a["logits"], meta)


def test_encodings(fixture, outputs):
    _, meta, a = fixture
    _close(outputs[0]["encodings"].numpy(), a["encodings"], meta)


def test_cell_emb_mean(fixture, loaded, outputs):
    _, meta, a = fixture
    _close(outputs[0]["cell_emb"].numpy(), a["cell_emb_mean"], meta)
    module = loaded[0]
    genes = _genes(module.n_genes)
    emb = embed_matrix(
        module, a["counts"], genes, genes, batch_size=len(a["counts"]), key_max="batch"
    )
    _close(emb, a["cell_emb_mean"], meta)


@pytest.fixture
def fixture_adata(fixture, loaded, tmp_path):
    """The fixture's counts as an AnnData, and its checkpoint copied beside a gene list."""
    folder, _, a = fixture
    module = loaded[0]
    model_dir = tmp_path / "scbert_fixture"
    model_dir.mkdir()
    shutil.copyfile(folder / "fixture_ckpt.pth", model_dir / "fixture_ckpt.pth")
    genes = _genes(module.n_genes)
    (model_dir / "gene_list.txt").write_text("\n".join(genes))
    n_cells = a["counts"].shape[0]
    adata = ad.AnnData(
        sparse.csr_matrix(a["counts"]),
        obs=pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)]),
        var=pd.DataFrame(index=genes),
    )
    return adata, model_dir / "fixture_ckpt.pth"


def test_cell_emb_mean_through_embed_cells(fixture, fixture_adata):
    _, meta, a = fixture
    adata, ckpt = fixture_adata
    # one forward pass over all cells with the batch-wide stabiliser, as the fixture ran
    sft.tl.embed_cells(adata, ckpt, batch_size=adata.n_obs, key_max="batch")
    _close(adata.obsm["X_scbert"], a["cell_emb_mean"], meta)
    assert adata.uns["scbert"]["params"]["key_max"] == "batch"


def test_embed_cells_default_is_per_cell(fixture, loaded, fixture_adata):
    _, meta, a = fixture
    module = loaded[0]
    adata, ckpt = fixture_adata
    sft.tl.embed_cells(adata, ckpt, batch_size=4)
    emb = adata.obsm["X_scbert"]
    assert emb.shape == (adata.n_obs, module.dim) and emb.dtype == np.float32
    # each cell as the official predict.py runs it: alone, so the stabiliser is its own
    tokens = torch.from_numpy(a["tokens"]).long()
    with torch.inference_mode():
        alone = np.concatenate(
            [module.cell_embedding(tokens[i : i + 1]).numpy() for i in range(adata.n_obs)]
        )
    _close(emb, alone, meta)
    params = adata.uns["scbert"]["params"]
    assert params["family"] == "scbert" and params["model"] == ckpt.name
    assert params["n_genes_matched"] == module.n_genes == params["n_genes_model"]
    assert params["key_max"] == "sample"
    assert len(params["weights_sha256"]) == 64
