"""scGPT against the official implementation: the fixture's checkpoint, inputs and outputs.

Everything (shapes, configuration, tolerance) is read from the fixture folder, so these tests
pass for any fixture written in the same format.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from scfm_tools.models.scgpt import embed_matrix, load_scgpt_checkpoint

pytestmark = pytest.mark.conformance


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
    folder = fixtures_dir / "scgpt"
    meta = json.loads((folder / "fixture_meta.json").read_text())
    with np.load(folder / "fixture_io.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    return folder, meta, arrays


@pytest.fixture(scope="module")
def loaded(fixture):
    folder, _, _ = fixture
    return load_scgpt_checkpoint(folder / "ckpt_folder")


@pytest.fixture(scope="module")
def outputs(fixture, loaded):
    _, _, a = fixture
    module = loaded[0]
    batch = {
        "gene_ids": torch.from_numpy(a["gene_ids"]).long(),
        "values": torch.from_numpy(a["expr_binned"]).float(),
        "padding_mask": torch.from_numpy(a["src_key_padding_mask"]).bool(),
    }
    with torch.inference_mode():
        inf = module.inference(**module._get_inference_input(batch))
        gen = module.generative(**module._get_generative_input(batch, inf))
    return inf, gen


def _close(actual, expected, meta):
    tol = meta["tolerance"]
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, atol=tol["atol"], rtol=tol["rtol"])


def test_load_report_is_clean(fixture, loaded):
    _, meta, _ = fixture
    module, vocab, args, report = loaded
    assert report.clean, str(report)
    # every flash-attn QKV tensor of the published layout was renamed, none dropped
    n_layers = args["nlayers"]
    assert len(report.renamed) == 2 * n_layers
    assert all(".self_attn.Wqkv." in k for k in report.renamed)
    assert set(report.loaded) == set(module.state_dict())
    assert module.encoder.embedding.num_embeddings == len(vocab)
    for key, shape in meta["state_dict_torch_names"].items():
        assert tuple(module.state_dict()[key].shape) == tuple(shape), key


def test_encoder_output(fixture, outputs):
    _, meta, a = fixture
    keep = ~a["src_key_padding_mask"]  # padded positions are meaningless in the official output
    _close(outputs[0]["transformer_output"].numpy()[keep], a["encoder_output"][keep], meta)


def test_cls_embedding(fixture, outputs):
    _, meta, a = fixture
    _close(outputs[0]["cell_emb"].numpy(), a["cell_emb_cls"], meta)


@pytest.mark.parametrize("key", ["mlm_output", "mvc_output"])
def test_token_decoders(fixture, outputs, key):
    _, meta, a = fixture
    keep = ~a["src_key_padding_mask"]
    _close(outputs[1][key].numpy()[keep], a[key][keep], meta)


def test_classifier_head(fixture, outputs):
    _, meta, a = fixture
    _close(outputs[1]["cls_output"].numpy(), a["cls_output"], meta)


def test_embed_data_end_to_end(fixture, loaded):
    _, meta, a = fixture
    module, vocab, args, _ = loaded
    # the official call's max_length, when the fixture records it; else the checkpoint's
    found = re.search(r"max_length=(\d+)", meta["outputs"].get("cell_emb_embed_data", ""))
    max_length = int(found.group(1)) if found else None
    emb = embed_matrix(
        module,
        vocab,
        args,
        a["counts"],
        [str(g) for g in a["var_names"]],
        max_length=max_length,
        random_state=0,
        random_stream="official",
    )
    _close(emb, a["cell_emb_embed_data"], meta)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)


def test_published_layout_maps_onto_module(fixture):
    """Every key of the published whole-human checkpoint has a place of the same shape."""
    folder, meta, _ = fixture
    path = folder / "published_model_meta.json"
    if not path.exists():
        pytest.skip("this fixture has no published_model_meta.json")
    from scfm_tools.models.scgpt import SCGPTModule
    from scfm_tools.models.scgpt._checkpoint import _rename

    published = json.loads(path.read_text())["state_dict_published_names"]
    pub = meta["published_args_json"]
    with torch.device("meta"):
        module = SCGPTModule(
            n_tokens=pub["vocab_size_incl_specials"],
            d_model=pub["embsize"],
            n_heads=pub["nheads"],
            d_hid=pub["d_hid"],
            n_layers=pub["nlayers"],
            pad_token_id=0,
            n_layers_cls=pub["n_layers_cls"],
        )
    renamed, _ = _rename({k: torch.empty(v, device="meta") for k, v in published.items()})
    own = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert own == {k: tuple(v.shape) for k, v in renamed.items()}
