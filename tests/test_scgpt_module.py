"""scGPT: SDPA layers, module and loss, tokenizer, embedding path, checkpoint loading."""

from __future__ import annotations

import itertools
import json
import logging
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from scfm_tools.models.scgpt import (
    CellTokenizer,
    SCGPTModule,
    embed_matrix,
    load_scgpt_checkpoint,
    mask_values,
    pad_cells,
    read_vocab,
)
from scfm_tools.nn import TransformerEncoder, TransformerEncoderLayer

D, HEADS, HID = 16, 2, 24


# --- helpers --------------------------------------------------------------------------------
@pytest.fixture
def pbmc(read_shared):
    adata = read_shared("pbmc8k_200genes_labeled.h5ad")
    return adata[:32].copy()


def _vocab(genes) -> dict[str, int]:
    vocab = {str(g): i for i, g in enumerate(genes)}
    for token in ("<pad>", "<cls>", "<eoc>"):
        vocab[token] = len(vocab)
    return vocab


def _module(vocab, *, n_layers=2, dropout=0.0, **kwargs) -> SCGPTModule:
    torch.manual_seed(0)
    return SCGPTModule(
        len(vocab), D, HEADS, HID, n_layers, vocab["<pad>"], dropout=dropout, **kwargs
    ).eval()


ARGS = {
    "embsize": D,
    "nheads": HEADS,
    "d_hid": HID,
    "nlayers": 2,
    "pad_token": "<pad>",
    "pad_value": -2,
    "mask_value": -1,
    "max_seq_len": 1200,
}


@pytest.fixture
def sft_log():
    """Collect records of the package logger (it does not propagate to the root logger)."""
    records: list[logging.LogRecord] = []

    class _Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = _Keep(level=logging.WARNING)
    logger = logging.getLogger("scfm_tools")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


# --- attention layers -----------------------------------------------------------------------
def _padded_input(seed=0, lengths=(7, 4, 1, 5)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), max(lengths), D, generator=g)
    mask = torch.arange(max(lengths))[None, :] >= torch.tensor(lengths)[:, None]
    return x, mask


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_sdpa_layer_equals_torch_layer(norm_first, activation):
    torch.manual_seed(1)
    ref = nn.TransformerEncoderLayer(
        D, HEADS, HID, dropout=0.0, activation=activation, batch_first=True, norm_first=norm_first
    )
    ours = TransformerEncoderLayer(D, HEADS, HID, 0.0, activation, norm_first=norm_first)
    assert set(ours.state_dict()) == set(ref.state_dict())
    ours.load_state_dict(ref.state_dict())  # strict: torch's names load directly
    x, mask = _padded_input()
    # train mode with dropout 0 keeps torch off its fast path, so padded rows are comparable too
    ref.train()
    ours.train()
    expected = ref(x, src_key_padding_mask=mask)
    got, weights = ours(x, mask)
    assert weights is None
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # eval mode: torch's fast path zeroes padded rows; compare where there is a token
    ref.eval()
    ours.eval()
    with torch.inference_mode():
        expected = ref(x, src_key_padding_mask=mask)
        got, _ = ours(x, mask)
    torch.testing.assert_close(got[~mask], expected[~mask], atol=1e-5, rtol=1e-5)


def test_sdpa_stack_equals_torch_encoder():
    torch.manual_seed(2)
    layer = nn.TransformerEncoderLayer(D, HEADS, HID, dropout=0.0, batch_first=True)
    ref = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False).eval()
    ours = TransformerEncoder(3, D, HEADS, HID, 0.0).eval()
    ours.load_state_dict(ref.state_dict())
    x, mask = _padded_input(3)
    with torch.inference_mode():
        expected = ref(x, src_key_padding_mask=mask)
        got, attn = ours(x, mask)
    assert attn == {}
    torch.testing.assert_close(got[~mask], expected[~mask], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm_first", [False, True])
def test_last_layer_for_first_queries_only(norm_first):
    torch.manual_seed(3)
    ours = TransformerEncoder(3, D, HEADS, HID, 0.0, norm_first=norm_first).eval()
    x, mask = _padded_input(4)
    with torch.inference_mode():
        full, _ = ours(x, mask, return_attention=[-1])
        first, attn = ours(x, mask, return_attention=[-1], last_queries=2)
    assert first.shape == (x.shape[0], 2, D)
    torch.testing.assert_close(first, full[:, :2], atol=1e-6, rtol=1e-6)
    assert attn[2].shape == (x.shape[0], HEADS, 2, x.shape[1])


def test_cell_embedding_reads_cls_of_full_encoder(pbmc):
    vocab = _vocab(pbmc.var_names)
    module = _module(vocab, n_layers=3)
    index = np.arange(pbmc.n_vars)
    cells = CellTokenizer(index, cls_id=vocab["<cls>"], pad_value=-2, max_length=1200)(pbmc.X[:6])
    batch = pad_cells(cells, pad_id=vocab["<pad>"], pad_value=-2.0)
    with torch.inference_mode():
        full = module.encode(**batch)["transformer_output"][:, 0]
        emb = module.cell_embedding(**batch, normalize=False)
    torch.testing.assert_close(emb, full, atol=1e-6, rtol=1e-6)


def test_attention_weights_are_explicit_softmax():
    torch.manual_seed(3)
    ours = TransformerEncoder(2, D, HEADS, HID, 0.0).eval()
    x, mask = _padded_input(4)
    with torch.inference_mode():
        plain, _ = ours(x, mask)
        out, attn = ours(x, mask, return_attention=[-1])
    assert list(attn) == [1]
    w = attn[1]
    assert w.shape == (x.shape[0], HEADS, x.shape[1], x.shape[1])
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))
    assert (w.transpose(1, 3)[mask] == 0).all()  # padded keys get no weight
    torch.testing.assert_close(out, plain, atol=1e-6, rtol=1e-6)
    # against torch's own averaged weights for the same layer input
    mha = nn.MultiheadAttention(D, HEADS, batch_first=True).eval()
    mha.load_state_dict(ours.layers[0].self_attn.state_dict())
    with torch.inference_mode():
        _, ref_w = mha(x, x, x, key_padding_mask=mask, average_attn_weights=False)
        _, attn0 = ours(x, mask, return_attention=True)
    keep = ~mask
    torch.testing.assert_close(attn0[0].transpose(1, 2)[keep], ref_w.transpose(1, 2)[keep])
    with pytest.raises(IndexError, match="2 layers"):
        ours(x, mask, return_attention=[5])


# --- tokenizer ------------------------------------------------------------------------------
def test_tokenizer_matches_cells(pbmc):
    vocab = _vocab(pbmc.var_names[:150])  # the last 50 genes are not in the vocabulary
    index = np.array([vocab.get(g, -1) for g in pbmc.var_names])
    tok = CellTokenizer(index, cls_id=vocab["<cls>"], pad_value=-2, max_length=1200)
    cells = tok(pbmc.X[:5])
    X = pbmc.X[:5].toarray()
    for (ids, vals), row in zip(cells, X, strict=True):
        expressed = np.flatnonzero((row > 0) & (index >= 0))
        assert ids[0] == vocab["<cls>"] and vals[0] == -2
        np.testing.assert_array_equal(ids[1:], index[expressed])  # var order, in-vocab, non-zero
        assert vals[1:].min() >= 1 and vals[1:].max() <= 50
        # bins are ordered like the counts (ties spread at random, but never past another level)
        counts, bins = row[expressed], vals[1:]
        levels = np.unique(counts)
        for lo, hi in itertools.pairwise(levels):
            assert bins[counts == lo].max() <= bins[counts == hi].min()


def test_subsampling_keeps_cls_and_is_seeded(pbmc):
    vocab = _vocab(pbmc.var_names)
    index = np.arange(pbmc.n_vars)
    cls_id = vocab["<cls>"]

    def run(max_length, seed):
        tok = CellTokenizer(
            index, cls_id=cls_id, pad_value=-2, max_length=max_length, random_state=seed
        )
        return tok(pbmc.X[:10])

    full, a, b, c = run(1200, 0), run(12, 0), run(12, 0), run(12, 1)
    assert any(len(ids) > 12 for ids, _ in full)
    for (fid, fval), (ids, vals), (ids_b, vals_b) in zip(full, a, b, strict=True):
        assert len(ids) == min(12, len(fid))
        assert ids[0] == cls_id and vals[0] == -2
        np.testing.assert_array_equal(ids, ids_b)
        np.testing.assert_array_equal(vals, vals_b)
        # bins come from all expressed genes (binning happens before subsampling)
        lookup = dict(zip(fid, fval, strict=True))
        assert [lookup[i] for i in ids] == list(vals)
        assert len(set(ids)) == len(ids)
    assert any(not np.array_equal(x[0], y[0]) for x, y in zip(a, c, strict=True))


def test_pad_cells():
    cells = [
        (np.array([5, 1, 2]), np.array([-2, 3, 4], np.float32)),
        (np.array([5]), np.array([-2], np.float32)),
    ]
    batch = pad_cells(cells, pad_id=9, pad_value=-2)
    assert batch["gene_ids"].tolist() == [[5, 1, 2], [5, 9, 9]]
    assert batch["values"].tolist() == [[-2, 3, 4], [-2, -2, -2]]
    assert batch["padding_mask"].tolist() == [[False] * 3, [False, True, True]]


# --- embedding path -------------------------------------------------------------------------
@pytest.mark.parametrize("max_length", [1200, 16])
def test_embedding_does_not_depend_on_batching(pbmc, max_length):
    vocab = _vocab(pbmc.var_names)
    module = _module(vocab)
    X, genes = pbmc.X, list(pbmc.var_names)
    ref = embed_matrix(module, vocab, ARGS, X, genes, max_length=max_length)
    assert ref.shape == (pbmc.n_obs, D)
    np.testing.assert_allclose(np.linalg.norm(ref, axis=1), 1, atol=1e-6)
    for batch_size, chunk_size in [(1, 48), (5, 7), (64, 1)]:
        got = embed_matrix(
            module,
            vocab,
            ARGS,
            X,
            genes,
            max_length=max_length,
            batch_size=batch_size,
            chunk_size=chunk_size,
        )
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    dense = embed_matrix(module, vocab, ARGS, X.toarray(), genes, max_length=max_length)
    np.testing.assert_allclose(dense, ref, atol=1e-5, rtol=0)
    # a different seed changes tie-breaking (and subsampling), so the embeddings move
    other = embed_matrix(module, vocab, ARGS, X, genes, max_length=max_length, random_state=1)
    assert np.abs(other - ref).max() > 1e-4
    assert not module.training


def test_same_cell_same_embedding_in_any_batch(pbmc):
    vocab = _vocab(pbmc.var_names)
    module = _module(vocab)
    tok = CellTokenizer(
        np.arange(pbmc.n_vars), cls_id=vocab["<cls>"], pad_value=-2, max_length=1200
    )
    cells = tok(pbmc.X[:20])
    pad = vocab["<pad>"]
    with torch.inference_mode():
        alone = torch.cat(
            [module.cell_embedding(**pad_cells([c], pad_id=pad, pad_value=-2)) for c in cells]
        )
        perm = np.random.default_rng(0).permutation(len(cells))
        mixed = module.cell_embedding(
            **pad_cells([cells[i] for i in perm], pad_id=pad, pad_value=-2)
        )
    torch.testing.assert_close(mixed, alone[perm], atol=1e-5, rtol=0)


def test_embed_matrix_bad_inputs(pbmc):
    vocab = _vocab(pbmc.var_names)
    module = _module(vocab)
    with pytest.raises(ValueError, match="var_names has 199 entries but X has 200 columns"):
        embed_matrix(module, vocab, ARGS, pbmc.X, list(pbmc.var_names[1:]))
    with pytest.raises(ValueError, match="none of the genes is in the scGPT vocabulary"):
        embed_matrix(module, vocab, ARGS, pbmc.X, [f"NOTAGENE{i}" for i in range(pbmc.n_vars)])
    with pytest.raises(ValueError, match="batch_size"):
        embed_matrix(module, vocab, ARGS, pbmc.X, list(pbmc.var_names), batch_size=0)


# --- module and loss ------------------------------------------------------------------------
def _masked_batch(pbmc, vocab, n=16, seed=0):
    tok = CellTokenizer(
        np.arange(pbmc.n_vars), cls_id=vocab["<cls>"], pad_value=-2, max_length=1200
    )
    batch = pad_cells(tok(pbmc.X[:n]), pad_id=vocab["<pad>"], pad_value=-2)
    g = torch.Generator().manual_seed(seed)
    batch["target_values"] = batch["values"]
    batch["values"] = mask_values(
        batch["values"], mask_ratio=0.4, mask_value=-1, pad_value=-2, generator=g
    )
    return batch


def test_mask_values(pbmc):
    vocab = _vocab(pbmc.var_names)
    batch = _masked_batch(pbmc, vocab)
    masked = batch["values"].eq(-1)
    assert not masked[:, 0].any() and not masked[batch["padding_mask"]].any()
    n_genes = (~batch["padding_mask"]).sum(1) - 1
    assert masked.sum(1).tolist() == [int(n * 0.4) for n in n_genes.tolist()]
    keep = ~masked
    assert torch.equal(batch["values"][keep], batch["target_values"][keep])


def test_loss_is_masked_gep_plus_mvc_and_trains(pbmc):
    vocab = _vocab(pbmc.var_names)
    module = _module(vocab).train()
    batch = _masked_batch(pbmc, vocab)
    inf, gen, out = module(batch)
    masked = batch["values"].eq(-1)
    target = batch["target_values"]
    gep = ((gen["mlm_output"] - target)[masked] ** 2).mean()
    mvc = ((gen["mvc_output"] - target)[masked] ** 2).mean()
    torch.testing.assert_close(out.loss, gep + mvc)
    assert set(out.reconstruction_loss) == {"gep", "mvc"}
    assert out.reconstruction_loss["gep"].shape == (16,)
    assert inf["cell_emb"].shape == (16, D) and gen["cls_output"].shape == (16, 1)
    out.loss.backward()
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert module.mvc_decoder.W.weight.grad.abs().sum() > 0

    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = module(batch)[2].loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert sum(b < a for a, b in itertools.pairwise(losses)) >= len(losses) - 3


def test_loss_needs_targets_and_masked_positions(pbmc):
    vocab = _vocab(pbmc.var_names)
    module = _module(vocab)
    batch = _masked_batch(pbmc, vocab)
    no_target = {k: v for k, v in batch.items() if k != "target_values"}
    with pytest.raises(KeyError, match="target_values"):
        module(no_target)
    unmasked = dict(batch, values=batch["target_values"])
    with pytest.raises(ValueError, match="nothing to predict"):
        module(unmasked)
    with pytest.raises(NotImplementedError, match="regression"):
        module.sample()


def test_batch_labels_and_zero_prob_heads(pbmc):
    vocab = _vocab(pbmc.var_names)
    module = _module(vocab, use_batch_labels=True, n_batch_labels=3, explicit_zero_prob=True)
    batch = _masked_batch(pbmc, vocab, n=6)
    with pytest.raises(ValueError, match="pass batch_labels"):
        module(batch)
    batch["batch_labels"] = torch.tensor([0, 1, 2, 0, 1, 2])
    _, gen, out = module(batch)
    assert gen["mlm_zero_probs"].shape == gen["mlm_output"].shape
    assert set(out.extra_metrics) == {
        "gep_loss",
        "mvc_loss",
        "mlm_zero_nll_loss",
        "mvc_zero_nll_loss",
    }
    assert torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="use_batch_labels=True needs n_batch_labels"):
        SCGPTModule(10, D, HEADS, HID, 1, 0, use_batch_labels=True)


# --- checkpoint folders ---------------------------------------------------------------------
@pytest.fixture
def ckpt(fixtures_dir, tmp_path):
    folder = tmp_path / "scgpt_ckpt"
    shutil.copytree(fixtures_dir / "scgpt" / "ckpt_folder", folder)
    for f in folder.iterdir():
        f.chmod(0o644)
    return folder


def test_missing_file_is_named(ckpt):
    (ckpt / "args.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"args\.json is missing from the scGPT"):
        load_scgpt_checkpoint(ckpt)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_scgpt_checkpoint(ckpt / "nowhere")


def test_args_without_model_size(ckpt):
    args = json.loads((ckpt / "args.json").read_text())
    del args["nheads"]
    (ckpt / "args.json").write_text(json.dumps(args))
    with pytest.raises(ValueError, match=r"lacks \['nheads'\]"):
        load_scgpt_checkpoint(ckpt)


def test_wrong_shapes_are_reported(ckpt, sft_log):
    state = torch.load(ckpt / "best_model.pt", weights_only=True)
    state["decoder.fc.0.weight"] = state["decoder.fc.0.weight"][:, :-1].clone()
    state["dsbn.bns.0.weight"] = torch.ones(3)
    del state["value_encoder.norm.bias"]
    torch.save(state, ckpt / "best_model.pt")
    vocab = json.loads((ckpt / "vocab.json").read_text())
    vocab["EXTRA_GENE"] = len(vocab)
    (ckpt / "vocab.json").write_text(json.dumps(vocab))

    _, vocab2, args, report = load_scgpt_checkpoint(ckpt)
    assert not report.clean
    d = args["embsize"]
    assert report.mismatched == {
        "encoder.embedding.weight": ((len(vocab2) - 1, d), (len(vocab2), d)),
        "decoder.fc.0.weight": ((d, d - 1), (d, d)),
    }
    assert report.unexpected == ("dsbn.bns.0.weight",)
    assert report.missing == ("value_encoder.norm.bias",)
    messages = " ".join(r.getMessage() for r in sft_log)
    assert "decoder.fc.0.weight" in messages and "dsbn.bns.0.weight" in messages
    assert "value_encoder.norm.bias" in messages
    with pytest.raises(ValueError, match="strict=True"):
        load_scgpt_checkpoint(ckpt, strict=True)


def test_flash_impl_names_are_renamed(ckpt):
    ref_module, *_ = load_scgpt_checkpoint(ckpt)
    state = torch.load(ckpt / "best_model.pt", weights_only=True)
    for old, new in [
        ("self_attn.Wqkv.", "self_attn._impl.Wqkv."),
        ("self_attn.out_proj.", "self_attn._impl.out_proj."),
    ]:
        state = {k.replace(old, new): v for k, v in state.items()}
    torch.save(state, ckpt / "best_model.pt")
    module, _, _, report = load_scgpt_checkpoint(ckpt)
    assert report.clean
    for key, value in ref_module.state_dict().items():
        assert torch.equal(module.state_dict()[key], value)


def test_other_family_checkpoint_is_refused(ckpt, fixtures_dir):
    cellplm = fixtures_dir / "cellplm"
    weights = ckpt / "best_model.pt"
    original = weights.read_bytes()
    shutil.copyfile(cellplm / "fixture.best.ckpt", weights)
    with pytest.raises(ValueError, match="this does not look like an scGPT checkpoint") as err:
        load_scgpt_checkpoint(ckpt)
    assert "embedder." in str(err.value)  # it shows what the file holds
    weights.write_bytes(original)
    shutil.copyfile(cellplm / "fixture.config.json", ckpt / "args.json")
    with pytest.raises(ValueError, match=r"this does not look like an scGPT args\.json"):
        load_scgpt_checkpoint(ckpt)
    # scFoundation's checkpoint is a dict of per-task dicts, not a state dict
    (ckpt / "args.json").write_text(json.dumps(ARGS))
    shutil.copyfile(fixtures_dir / "scfoundation" / "fixture_models.ckpt", weights)
    with pytest.raises(ValueError, match="does not hold a state dict of tensors"):
        load_scgpt_checkpoint(ckpt)


def test_read_vocab_appends_specials(tmp_path):
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps({"A": 0, "B": 1, "<cls>": 2}))
    assert read_vocab(path) == {"A": 0, "B": 1, "<cls>": 2, "<pad>": 3, "<eoc>": 4}
    path.write_text(json.dumps(["A", "B"]))
    with pytest.raises(ValueError, match="JSON object mapping gene names"):
        read_vocab(path)


def test_cell_without_vocab_genes_sees_only_cls(pbmc, sft_log):
    vocab = _vocab(pbmc.var_names)
    module = _module(vocab)
    X = pbmc.X[:4].toarray()
    X[2] = (
        0  # the official embed_data crashes on such a cell; here it gets the <cls>-only embedding
    )
    emb = embed_matrix(module, vocab, ARGS, X, list(pbmc.var_names))
    assert np.isfinite(emb).all()
    cls_only = pad_cells(
        [(np.array([vocab["<cls>"]]), np.array([-2.0], np.float32))],
        pad_id=vocab["<pad>"],
        pad_value=-2,
    )
    with torch.inference_mode():
        expected = module.cell_embedding(**cls_only).numpy()[0]
    np.testing.assert_allclose(emb[2], expected, atol=1e-6)
    assert any("1 cells express no gene of the vocabulary" in r.getMessage() for r in sft_log)
