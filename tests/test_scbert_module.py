"""scBERT: module, heads and losses, masking, tokenizer, checkpoint loading and its errors."""

from __future__ import annotations

import logging
import math
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse

import scfm_tools as sft
from _unchanged import assert_unchanged, snapshot
from scfm_tools._validation import InputError
from scfm_tools.models.scbert import (
    SCBERTModule,
    SCBERTTokenizer,
    embed_matrix,
    load_scbert_checkpoint,
    mask_tokens,
    read_gene2vec,
    read_gene_list,
)

TINY = {"dim": 8, "depth": 2, "heads": 2, "dim_head": 4}


@pytest.fixture
def pbmc(read_shared):
    return read_shared("pbmc8k_200genes_labeled.h5ad")[:48].copy()


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


def _tiny(n_genes, seed=0, **kwargs) -> SCBERTModule:
    torch.manual_seed(seed)
    g2v = torch.randn(n_genes, TINY["dim"], dtype=torch.float64)
    return SCBERTModule(n_genes, gene2vec_weight=g2v, **TINY, **kwargs)


def _tokens(adata) -> torch.Tensor:
    n = adata.n_vars
    return SCBERTTokenizer(np.arange(n), n)(adata.X)


@pytest.fixture
def ckpt(fixtures_dir, tmp_path):
    """A writable copy of the fixture checkpoint with a gene list beside it."""
    folder = tmp_path / "scbert"
    folder.mkdir()
    shutil.copyfile(fixtures_dir / "scbert" / "fixture_ckpt.pth", folder / "model.pth")
    (folder / "model.pth").chmod(0o644)
    n = torch.load(folder / "model.pth", weights_only=True)["model_state_dict"][
        "pos_emb.emb.weight"
    ].shape[0]
    (folder / "gene_list.txt").write_text("\n".join(f"G{i}" for i in range(n - 1)) + "\n")
    return folder


def _adata_for(folder, seed=0, n_cells=12):
    genes = read_gene_list(folder / "gene_list.txt")
    rng = np.random.default_rng(seed)
    X = rng.poisson(rng.gamma(0.5, 4.0, size=len(genes)), size=(n_cells, len(genes)))
    X[:, 0] += 1  # no empty cells
    return ad.AnnData(
        sparse.csr_matrix(X.astype(np.float32)),
        obs=pd.DataFrame(index=[f"c{i}" for i in range(n_cells)]),
        var=pd.DataFrame(index=genes),
    )


# --- module -----------------------------------------------------------------------------------
def test_pretraining_forward_backward_on_real_cells(pbmc):
    module = _tiny(pbmc.n_vars).train()
    tokens = _tokens(pbmc)
    masked, labels = mask_tokens(
        tokens, mask_token_id=module.mask_token_id, generator=torch.Generator().manual_seed(0)
    )
    batch = {"tokens": masked, "mlm_labels": labels}
    _, out = module(batch)[:2]
    assert out["logits"].shape == (pbmc.n_obs, pbmc.n_vars + 1, module.num_tokens)
    loss = module(batch)[2].loss
    # the loss is the mean cross-entropy over the masked positions only
    picked = labels != module.mask_token_id
    expected = torch.nn.functional.cross_entropy(out["logits"][picked], labels[picked])
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert module.pos_emb.emb.weight.grad is None  # gene2vec stays frozen
    assert module.token_emb.weight.grad.abs().sum() > 0
    assert module.performer.net.layers[0][0].fn.to_q.weight.grad.abs().sum() > 0
    # a few optimiser steps on the same masked cells lower the loss
    opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    first = loss.item()
    for _ in range(15):
        opt.zero_grad()
        step_loss = module(batch)[2].loss
        step_loss.backward()
        opt.step()
    assert step_loss.item() < first


def test_classifier_head_and_weighted_loss(pbmc):
    labels_str = pbmc.obs["cell_type"].astype(str).to_numpy()
    classes, labels = np.unique(labels_str, return_inverse=True)
    counts = np.bincount(labels, minlength=len(classes))
    weights = torch.tensor((1 - counts / counts.sum()) ** 2, dtype=torch.float32)
    module = _tiny(pbmc.n_vars, n_classes=len(classes), class_weights=weights)
    # the official head's layers and key names
    keys = {k for k in module.state_dict() if k.startswith("to_out.")}
    assert keys == {
        f"to_out.{layer}.{p}"
        for layer in ("conv1", "fc1", "fc2", "fc3")
        for p in ("weight", "bias")
    }
    assert module.to_out.fc1.in_features == pbmc.n_vars + 1
    assert "class_weights" not in module.state_dict()  # not an official key
    batch = {"tokens": _tokens(pbmc), "labels": torch.from_numpy(labels)[:, None].float()}
    _, gen, out = module(batch)
    logits = gen["class_logits"]
    assert logits.shape == (pbmc.n_obs, len(classes))
    expected = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels), weight=weights)
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert module.to_out.conv1.weight.grad.abs().sum() > 0
    proba = module.predict_proba(batch["tokens"])
    torch.testing.assert_close(proba.sum(1), torch.ones(pbmc.n_obs))
    with pytest.raises(KeyError, match="'labels'"):
        module.loss({"tokens": batch["tokens"]}, *module(batch)[:2])


def test_pretraining_head_refuses_predict_and_needs_labels(pbmc):
    module = _tiny(pbmc.n_vars)
    tokens = _tokens(pbmc)
    with pytest.raises(ValueError, match="pretraining head"):
        module.predict_proba(tokens)
    inf, gen = module({"tokens": tokens}, compute_loss=False)
    with pytest.raises(KeyError, match="mlm_labels"):
        module.loss({"tokens": tokens}, inf, gen)
    with pytest.raises(ValueError, match="no position is masked"):
        module.loss({"tokens": tokens, "mlm_labels": torch.full_like(tokens, 6)}, inf, gen)
    with pytest.raises(NotImplementedError, match="no count likelihood"):
        module.sample()
    with pytest.raises(ValueError, match="at most"):
        module.embed(torch.zeros(1, pbmc.n_vars + 2, dtype=torch.long))


def test_mask_tokens_follows_the_official_rule(pbmc):
    tokens = _tokens(pbmc)
    mask_id = 6
    masked, labels = mask_tokens(
        tokens, mask_token_id=mask_id, generator=torch.Generator().manual_seed(1)
    )
    picked = labels != mask_id
    # bin 0 is never picked; picked positions keep their original token as the label
    assert (tokens[picked] > 0).all()
    assert torch.equal(labels[picked], tokens[picked])
    # per cell, ceil(15%) of the non-zero bins
    n_nonzero = (tokens > 0).sum(1)
    expected = torch.ceil(n_nonzero * 0.15).long()
    assert torch.equal(picked.sum(1), expected)
    # about 90% of the picked tokens become [MASK], the others stay as they were
    replaced = (masked == mask_id) & picked
    assert torch.equal(masked[~picked], tokens[~picked])
    assert torch.equal(masked[picked & ~replaced], tokens[picked & ~replaced])
    share = replaced.sum() / picked.sum()
    assert 0.8 < share < 0.97
    again = mask_tokens(tokens, mask_token_id=mask_id, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again[0], masked) and torch.equal(again[1], labels)
    with pytest.raises(ValueError, match="mask_prob"):
        mask_tokens(tokens, mask_token_id=mask_id, mask_prob=1.0)


# --- tokenizer and embedding --------------------------------------------------------------------
def test_tokenizer_reindexes_onto_model_genes(pbmc):
    # model genes: the first 150 of the data, in reverse order, plus 10 the data lacks
    model_genes = list(pbmc.var_names[:150][::-1]) + [f"ABSENT{i}" for i in range(10)]
    match = sft.pp.match_to_vocab(pbmc.var_names, model_genes)
    tokenizer = SCBERTTokenizer.from_match(match, len(model_genes))
    counts = tokenizer.reindex(pbmc.X)
    X = pbmc.X.toarray()
    np.testing.assert_array_equal(counts[:, :150].toarray(), X[:, :150][:, ::-1])
    assert counts[:, 150:].nnz == 0
    # totals over the model's genes only, as the official reindex-then-normalise
    sub = X[:, :150][:, ::-1]
    expected = np.floor(np.minimum(np.log2(1 + sub / sub.sum(1, keepdims=True) * 1e4), 5))
    tokens = tokenizer(pbmc.X).numpy()
    assert tokens.shape == (pbmc.n_obs, len(model_genes) + 1)
    np.testing.assert_array_equal(tokens[:, :150], expected)
    assert (tokens[:, 150:] == 0).all()
    with pytest.raises(ValueError, match="one column per gene"):
        tokenizer(X[:, :10])


def test_embedding_does_not_depend_on_batch_chunk_or_gene_order(pbmc):
    module = _tiny(pbmc.n_vars)
    genes = list(pbmc.var_names)
    ref = embed_matrix(module, pbmc.X, genes, genes, batch_size=48)
    other = embed_matrix(module, pbmc.X, genes, genes, batch_size=5, chunk_size=7)
    np.testing.assert_allclose(other, ref, atol=1e-6, rtol=1e-5)
    single = embed_matrix(module, pbmc.X[10:11], genes, genes)
    np.testing.assert_allclose(single, ref[10:11], atol=1e-6, rtol=1e-5)
    perm = np.random.default_rng(0).permutation(pbmc.n_vars)
    shuffled = embed_matrix(module, pbmc.X[:, perm], [genes[i] for i in perm], genes)
    np.testing.assert_allclose(shuffled, ref, atol=1e-6, rtol=1e-5)
    assert module.performer.key_max == "sample"
    # different cells get different embeddings
    assert np.abs(ref[0] - ref[1]).max() > 1e-3


def test_encode_reuses_zero_gene_inputs_exactly(pbmc):
    # In inference the Performer reuses the first-block projections of zero-expression genes
    # (bin 0 plus gene2vec, the same in every cell); the plain path recomputes them per cell.
    module = _tiny(pbmc.n_vars).eval()
    tokens = _tokens(pbmc)
    assert 0.3 < float((tokens == 0).float().mean()) < 1.0
    with torch.inference_mode():
        reused = module.encode(tokens)
        plain = module.norm(module.performer(module.embed(tokens)))
    torch.testing.assert_close(reused, plain, atol=1e-5, rtol=1e-5)
    assert module._shared_block is not None


# --- checkpoint loading -------------------------------------------------------------------------
def test_gene_list_of_wrong_length(ckpt):
    genes = read_gene_list(ckpt / "gene_list.txt")
    adata = _adata_for(ckpt)
    (ckpt / "gene_list.txt").write_text("\n".join(genes[:-1]))
    with pytest.raises(
        ValueError, match=rf"gene list has {len(genes) - 1} genes.*trained on {len(genes)}"
    ):
        load_scbert_checkpoint(ckpt / "model.pth", gene_list=ckpt / "gene_list.txt")
    with pytest.raises(ValueError, match="gene list has"):
        load_scbert_checkpoint(ckpt / "model.pth", gene_list=[*genes, "EXTRA"])
    # through the public API: refused, nothing written
    snap = snapshot(adata)
    with pytest.raises(ValueError, match="gene list has"):
        sft.tl.embed_cells(adata, ckpt / "model.pth")
    assert_unchanged(adata, snap)


def test_gene_list_file_errors(tmp_path):
    path = tmp_path / "genes.txt"
    path.write_text("A\n\nB\n")
    with pytest.raises(ValueError, match="blank lines"):
        read_gene_list(path)
    path.write_text("A\nB\nA\n")
    with pytest.raises(InputError, match="duplicated"):
        read_gene_list(path)
    path.write_text("A \nB\r\nC\n\n")
    assert read_gene_list(path) == ["A", "B", "C"]
    with pytest.raises(FileNotFoundError, match="panglao_10000.h5ad"):
        read_gene_list(tmp_path / "missing.txt")


@pytest.mark.parametrize(
    ("family", "path", "label"),
    [
        ("scgpt", "ckpt_folder/best_model.pt", "scGPT"),
        ("scfoundation", "fixture_models.ckpt", "scFoundation"),
        ("cellplm", "fixture.best.ckpt", "CellPLM"),
    ],
)
def test_other_family_checkpoint_is_refused(fixtures_dir, ckpt, family, path, label):
    shutil.copyfile(fixtures_dir / family / path, ckpt / "model.pth")
    with pytest.raises(ValueError, match=f"not an scBERT checkpoint.*looks like a {label}"):
        load_scbert_checkpoint(ckpt / "model.pth")
    adata = _adata_for(ckpt)
    snap = snapshot(adata)
    with pytest.raises(ValueError, match="not an scBERT checkpoint"):
        sft.tl.embed_cells(adata, ckpt / "model.pth")
    assert_unchanged(adata, snap)


def test_unreadable_and_foreign_files(ckpt):
    (ckpt / "model.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_scbert_checkpoint(ckpt / "model.pth")
    torch.save({"model_state_dict": {"w": torch.zeros(2)}}, ckpt / "model.pth")
    with pytest.raises(ValueError, match=r"does not look like an scBERT checkpoint.*lacks"):
        load_scbert_checkpoint(ckpt / "model.pth")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_scbert_checkpoint(ckpt / "nowhere.pth")


def test_finetuned_ddp_checkpoint_round_trip(ckpt, pbmc):
    # A fine-tuned model as the official scripts save it: DDP "module." prefix, extra entries.
    module = _tiny(pbmc.n_vars, n_classes=3).eval()
    state = {f"module.{k}": v for k, v in module.state_dict().items()}
    torch.save({"epoch": 3, "model_state_dict": state, "losses": 0.5}, ckpt / "ft.pth")
    loaded, genes, report = load_scbert_checkpoint(ckpt / "ft.pth", gene_list=list(pbmc.var_names))
    assert report.clean and len(report.renamed) == len(state)
    assert loaded.n_classes == 3 and loaded.is_classifier
    assert loaded.config["dim"] == TINY["dim"] and loaded.n_genes == pbmc.n_vars
    assert genes == list(pbmc.var_names)
    tokens = _tokens(pbmc)
    torch.testing.assert_close(loaded.predict_proba(tokens), module.predict_proba(tokens))
    with pytest.raises(TypeError, match="read from the checkpoint"):
        load_scbert_checkpoint(ckpt / "ft.pth", dim=16)


def test_mismatched_keys_are_reported(ckpt, sft_log):
    obj = torch.load(ckpt / "model.pth", weights_only=True)
    state = obj["model_state_dict"]
    state["to_out.weight"] = state["to_out.weight"][:-1].clone()
    state["to_out.bias"] = state["to_out.bias"][:-1].clone()
    state["extra.weight"] = torch.ones(2)
    del state["norm.bias"]
    torch.save(obj, ckpt / "model.pth")
    module, _, report = load_scbert_checkpoint(ckpt / "model.pth")
    assert not report.clean
    assert report.unexpected == ("extra.weight",)
    assert report.missing == ("norm.bias",)
    # the token count is read from token_emb, so the shorter head is a mismatch
    n_tok, dim = module.token_emb.weight.shape
    assert report.mismatched == {
        "to_out.weight": ((n_tok - 1, dim), (n_tok, dim)),
        "to_out.bias": ((n_tok - 1,), (n_tok,)),
    }
    messages = " ".join(r.getMessage() for r in sft_log)
    assert "extra.weight" in messages and "norm.bias" in messages and "to_out.weight" in messages
    with pytest.raises(ValueError, match="strict=True"):
        load_scbert_checkpoint(ckpt / "model.pth", strict=True)


def test_gene2vec_is_rebuilt_from_the_checkpoint(ckpt):
    table = read_gene2vec(ckpt / "model.pth")
    module, _, _ = load_scbert_checkpoint(ckpt / "model.pth")
    assert table.dtype == np.float64 and table.shape == (module.n_genes, module.dim)
    np.testing.assert_array_equal(table, module.gene2vec.numpy())
    # a fresh model built from that table has the same embedding input
    fresh = SCBERTModule(
        module.n_genes,
        gene2vec_weight=torch.from_numpy(table),
        **{
            k: module.config[k]
            for k in ("num_tokens", "dim", "depth", "heads", "dim_head", "nb_features")
        },
    )
    assert torch.equal(fresh.pos_emb.emb.weight, module.pos_emb.emb.weight)
    assert fresh.pos_emb.emb.weight.dtype == torch.float64
    assert not fresh.pos_emb.emb.weight.requires_grad


# --- tl.embed_cells errors ------------------------------------------------------------------------
def test_embed_cells_needs_the_gene_list(ckpt):
    (ckpt / "gene_list.txt").unlink()
    genes = [f"G{i}" for i in range(64)]
    adata = ad.AnnData(
        sparse.csr_matrix(np.ones((3, len(genes)), dtype=np.float32)), var=pd.DataFrame(index=genes)
    )
    snap = snapshot(adata)
    with pytest.raises(FileNotFoundError, match="gene_list.txt"):
        sft.tl.embed_cells(adata, ckpt / "model.pth")
    assert_unchanged(adata, snap)


def test_embed_cells_needs_counts_and_no_max_length(ckpt):
    adata = _adata_for(ckpt)
    adata.X = adata.X.multiply(0.5).tocsr()
    snap = snapshot(adata)
    with pytest.raises(InputError, match="non-integer"):
        sft.tl.embed_cells(adata, ckpt / "model.pth")
    assert_unchanged(adata, snap)
    adata = _adata_for(ckpt)
    snap = snapshot(adata)
    with pytest.raises(ValueError, match="max_length does not apply"):
        sft.tl.embed_cells(adata, ckpt / "model.pth", max_length=100)
    assert_unchanged(adata, snap)


def test_embed_cells_copy_and_key(ckpt):
    adata = _adata_for(ckpt)
    out = sft.tl.embed_cells(adata, ckpt / "model.pth", key_added="X_bert", copy=True)
    assert "X_bert" not in adata.obsm and out.obsm["X_bert"].shape[0] == adata.n_obs
    assert out.uns["bert"]["params"]["family"] == "scbert"
    assert math.isfinite(float(out.obsm["X_bert"].sum()))


def test_embed_cells_model_options(ckpt):
    adata = _adata_for(ckpt)
    snap = snapshot(adata)
    with pytest.raises(TypeError, match="do not take"):
        sft.tl.embed_cells(adata, ckpt / "model.pth", sample=True)
    with pytest.raises(ValueError, match="key_max must be"):
        sft.tl.embed_cells(adata, ckpt / "model.pth", key_max="all")
    assert_unchanged(adata, snap)
