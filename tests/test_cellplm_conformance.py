"""CellPLM against the official implementation: the fixture's checkpoint, inputs and outputs.

Everything (configuration, tolerance, seeds, which arrays exist) is read from the fixture folder,
so these tests pass for any fixture written in the same format. Inputs are only ``counts``,
``var_names`` and ``obs_batch`` (plus, for the reconstruction, the decoder batch ids the
official run was given).
"""

from __future__ import annotations

import json
import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse

import scfm_tools as sft
from scfm_tools.models.cellplm import (
    IGNORED_PREFIXES,
    batch_codes,
    load_cellplm_checkpoint,
    sequence_rows,
)
from scfm_tools.models.cellplm._embed import official_generator
from scfm_tools.models.cellplm._sequences import to_model_genes
from scfm_tools.pp import match_to_vocab

pytestmark = pytest.mark.conformance


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
    folder = fixtures_dir / "cellplm"
    meta = json.loads((folder / "fixture_meta.json").read_text())
    with np.load(folder / "fixture_io.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    return folder, meta, arrays


@pytest.fixture(scope="module")
def loaded(fixture):
    return load_cellplm_checkpoint(fixture[0])


def _adata(arrays) -> ad.AnnData:
    counts = arrays["counts"]
    return ad.AnnData(
        sparse.csr_matrix(counts),
        obs=pd.DataFrame(
            {"batch": pd.Categorical(arrays["obs_batch"].astype(str))},
            index=[f"cell{i}" for i in range(counts.shape[0])],
        ),
        var=pd.DataFrame(index=[str(g) for g in arrays["var_names"]]),
    )


def _close(actual, expected, meta):
    tol = meta["tolerance"]
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, atol=tol["atol"], rtol=tol["rtol"])


def _seed(text: str, default: int = 0) -> int:
    """The seed an output's description names ("manual_seed(1)", "the seed0 run")."""
    found = re.search(r"manual_seed\((\d+)\)", text) or re.search(r"seed(\d+)", text)
    return int(found.group(1)) if found else default


def _sequences(arrays, module, genes):
    """Per official sequence (obs batch, LabelEncoder order): rows and counts in model order."""
    adata = _adata(arrays)
    codes, _ = batch_codes(adata, "batch")
    match = match_to_vocab(list(adata.var_names), genes)
    return [
        (r, to_model_genes(arrays["counts"][r], match, len(genes))) for r in sequence_rows(codes)
    ]


def test_load_report_is_clean(fixture, loaded):
    _, meta, _ = fixture
    module, genes, config, report = loaded
    assert report.clean, str(report)
    own = module.state_dict()
    assert set(report.loaded) == set(own)
    expected = meta["state_dict"]
    ignored = {k for k in expected if k.startswith(IGNORED_PREFIXES)}
    assert set(report.loaded) | ignored == set(expected)
    for key in report.loaded:
        assert tuple(own[key].shape) == tuple(expected[key]), key
    assert genes == config["gene_list"] and module.n_genes == len(genes)


def test_sequences_follow_the_official_order(fixture, loaded):
    _, _, a = fixture
    order = np.concatenate([rows for rows, _ in _sequences(a, loaded[0], loaded[1])])
    np.testing.assert_array_equal(order, a["seq_order"])


@pytest.fixture(scope="module")
def seed0_run(fixture, loaded):
    """The module's intermediates on the official seed-0 embedding run, in sequence order."""
    _, meta, a = fixture
    module, genes = loaded[0], loaded[1]
    key = next(k for k in meta["outputs"] if k.startswith("gmvae_"))
    generator = official_generator(_seed(meta["outputs"][key]), pipeline=True)
    outs = []
    with torch.inference_mode():
        for _, counts in _sequences(a, module, genes):
            outs.append(module.inference(counts, sample=True, generator=generator))
    return {k: torch.cat([o[k] for o in outs]).numpy() for k in outs[0] if outs[0][k].dim()}


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        ("embedder", "embedder_out_seq_order"),
        ("encoder", "encoder_out_seq_order"),
        ("pre_latent", "pre_latent_norm_out_seq_order"),
        ("logits", "gmvae_logits_seq_order"),
        ("categorical", "gmvae_categorical_seq_order"),
        ("mean", "gmvae_mean_seq_order"),
    ],
)
def test_intermediates(fixture, seed0_run, ours, theirs):
    _, meta, a = fixture
    _close(seed0_run[ours], a[theirs], meta)


def test_mean_given_official_component(fixture, loaded):
    """The GMVAE mean given the official categorical draw, without reproducing the draw."""
    _, meta, a = fixture
    module = loaded[0]
    h = torch.from_numpy(a["pre_latent_norm_out_seq_order"])
    y = torch.from_numpy(a["gmvae_categorical_seq_order"])
    with torch.inference_mode():
        mean, _ = module.latent.gmvae.inference.qzxy(h, y)
    _close(mean.numpy(), a["gmvae_mean_seq_order"], meta)


def test_sampled_embeddings_through_embed_cells(fixture):
    """Every sampled embedding of the fixture, each with its seed, from counts and obs batch."""
    folder, meta, a = fixture
    keys = sorted(k for k in a if re.fullmatch(r"cell_emb_seed\d+", k))
    assert keys, "the fixture holds no cell_emb_seed<N> array"
    for key in keys:
        seed = _seed(meta["outputs"].get(key, ""), int(key.removeprefix("cell_emb_seed")))
        adata = _adata(a)
        sft.tl.embed_cells(
            adata,
            folder,
            batch_key="batch",
            sample=True,
            random_state=seed,
            random_stream="official",
            device="cpu",
        )
        _close(adata.obsm["X_cellplm"], a[key], meta)
        params = adata.uns["cellplm"]["params"]
        assert params["sample"] is True and params["random_state"] == seed
        assert params["random_stream"] == "official"
        assert params["batch_key"] == "batch" and params["family"] == "cellplm"


@pytest.fixture(scope="module")
def recon_run(fixture, loaded):
    _, meta, a = fixture
    module, genes = loaded[0], loaded[1]
    # the reconstruction run fed all cells, in data order, as one sequence to the model
    match = match_to_vocab([str(g) for g in a["var_names"]], genes)
    assert set(np.asarray(genes)[match.index[match.matched]]) == set(a["recon_input_gene_list"])
    counts = to_model_genes(a["counts"], match, len(genes))
    text = next(v for k, v in meta["outputs"].items() if k.startswith("recon_mean"))
    generator = official_generator(_seed(text), pipeline=False)
    with torch.inference_mode():
        inf = module.inference(counts, sample=True, generator=generator)
        batch = module.generative(inf["z"], batch=torch.from_numpy(a["recon_batch"]))
        no_batch = module.generative(inf["z"])
    return inf, batch, no_batch


def test_reconstruction_latent(fixture, recon_run):
    _, meta, a = fixture
    _close(recon_run[0]["z"].numpy(), a["recon_latent"], meta)


@pytest.mark.parametrize(
    ("which", "key", "theirs"),
    [
        (1, "mean", "recon_mean"),
        (1, "disp", "recon_disp"),
        (2, "mean", "recon_mean_no_batch"),
    ],
)
def test_reconstruction_decoder(fixture, recon_run, which, key, theirs):
    _, meta, a = fixture
    _close(recon_run[which][key].numpy(), a[theirs], meta)


def test_decoder_from_official_latent(fixture, loaded):
    """The decoder alone, fed the official latent: independent of the latent draw."""
    _, meta, a = fixture
    module = loaded[0]
    z = torch.from_numpy(a["recon_latent"])
    with torch.inference_mode():
        out = module.generative(z, batch=torch.from_numpy(a["recon_batch"]))
        plain = module.generative(z)
    _close(out["mean"].numpy(), a["recon_mean"], meta)
    _close(out["disp"].numpy(), a["recon_disp"], meta)
    _close(plain["mean"].numpy(), a["recon_mean_no_batch"], meta)


def test_published_layout_maps_onto_module(fixture, reference_dir):
    """Every key of the published checkpoint has a place of the same shape (or is ignored)."""
    folder, _, _ = fixture
    path = folder / "published_model_meta.json"
    if not path.exists():
        pytest.skip("this fixture has no published_model_meta.json")
    from scfm_tools.models.cellplm import CellPLMModule, module_config

    published = json.loads(path.read_text())["state_dict_embedder_head"]
    config = json.loads((reference_dir / "cellplm" / "20230926_85M.config.json").read_text())
    with torch.device("meta"):
        module = CellPLMModule(**module_config(config))
    own = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    used = {k: tuple(v) for k, v in published.items() if not k.startswith(IGNORED_PREFIXES)}
    assert used == {k: v for k, v in own.items() if not k.startswith("decoder.")}


@pytest.mark.parametrize(
    ("decoder_batch", "theirs"), [(True, "recon_mean"), (False, "recon_mean_no_batch")]
)
def test_reconstruction_through_impute(fixture, loaded, decoder_batch, theirs):
    """The official reconstruction from counts and var_names with sft.tl.impute."""
    folder, meta, a = fixture
    genes = loaded[1]
    adata = _adata(a)
    adata.obs["decoder_batch"] = a["recon_batch"]
    text = next(v for k, v in meta["outputs"].items() if k.startswith("recon_mean"))
    sft.tl.impute(
        adata,
        folder,
        sample=True,
        random_state=_seed(text),
        random_stream="official",
        decoder_batch_key="decoder_batch" if decoder_batch else None,
        rescale=False,
    )
    match = match_to_vocab(list(adata.var_names), genes)
    cols = np.flatnonzero(match.matched)
    denoised = adata.layers["cellplm_denoised"]
    _close(denoised[:, cols], a[theirs][:, match.index[cols]], meta)
    assert np.isnan(denoised[:, ~match.matched]).all()
    dispersion = adata.var["cellplm_denoised_dispersion"].to_numpy()
    _close(
        np.broadcast_to(dispersion[cols], (adata.n_obs, cols.size)),
        a["recon_disp"][:, match.index[cols]],
        meta,
    )
