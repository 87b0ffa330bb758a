"""SCGPT model class: setup, on-the-fly tokenization, training, outputs, save/export, defaults."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
import torch
from scipy import sparse

import scfm_tools as sft
from _unchanged import assert_unchanged, snapshot
from scfm_tools._validation import InputError
from scfm_tools.models import SCGPT
from scfm_tools.models.scgpt import (
    CellTokenizer,
    SCGPTTrainingPlan,
    embed_matrix,
    load_scgpt_checkpoint,
    tokenize_minibatch,
)

TINY = {"d_model": 16, "n_heads": 2, "d_hid": 16, "n_layers": 1, "max_seq_len": 48, "dropout": 0.0}
PAD, MASK = -2.0, -1.0


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Train on one thread: beside other busy processes, two OpenMP threads on two cores were
    ~10x slower here (each parallel region waits for the thread that lost its core)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pbmc(data_dir):
    """300 real PBMCs (3 chemistries) x their 200 most often detected genes, raw counts."""
    adata = ad.read_h5ad(data_dir / "pbmc_10x_3chemistries_unlabeled.h5ad")
    rng = np.random.default_rng(0)
    adata = adata[np.sort(rng.choice(adata.n_obs, 300, replace=False))]
    detected = np.asarray((adata.X > 0).sum(0)).ravel()
    genes = np.sort(np.argsort(-detected, kind="stable")[:200])
    adata = adata[:, genes].copy()
    adata.X = adata.X.astype(np.float32)
    return adata


@pytest.fixture(scope="module")
def trained(pbmc):
    """A tiny model trained a few epochs (train/validation split as scvi-tools does it)."""
    adata = pbmc.copy()
    SCGPT.setup_anndata(adata, batch_key="batch")
    torch.manual_seed(0)
    model = SCGPT(adata, **TINY)
    model.train(
        max_epochs=4,
        batch_size=64,
        accelerator="cpu",
        check_val_every_n_epoch=1,
        enable_progress_bar=False,
        plan_kwargs={"lr": 1e-2, "random_state": 0, "lr_schedule": "cosine", "warmup_ratio": 0.1},
    )
    return model


# --- setup and training ---------------------------------------------------------------------
def test_setup_registers_and_builds_vocab(pbmc):
    adata = pbmc.copy()
    SCGPT.setup_anndata(adata)
    model = SCGPT(adata, **TINY)
    assert list(model.vocab)[: adata.n_vars] == list(adata.var_names)
    assert [model.vocab[t] for t in ("<pad>", "<cls>", "<eoc>")] == [200, 201, 202]
    np.testing.assert_array_equal(model.gene_match.index, np.arange(adata.n_vars))
    assert model.module.encoder.embedding.num_embeddings == 203
    assert model.args["embsize"] == 16 and model.args["max_seq_len"] == 48
    assert "200 of 200 genes" in repr(model)


def test_training_reduces_loss_and_fills_history(trained):
    history = trained.history
    # the cosine schedule ran down to (almost) zero by the last step
    assert trained.trainer.optimizers[0].param_groups[0]["lr"] < 1e-4
    assert trained.is_trained_
    for key in ("train_loss", "validation_loss", "gep_loss_train", "mvc_loss_train"):
        values = history[key].to_numpy().ravel().astype(float)
        assert len(values) == 4 and np.isfinite(values).all(), key
    train = history["train_loss"].to_numpy().ravel().astype(float)
    valid = history["validation_loss"].to_numpy().ravel().astype(float)
    # bins lie in 0..50: an untrained head predicting ~0 has a mean squared error in the hundreds
    assert train[0] > 100
    assert train[-1] < 0.7 * train[0]
    assert valid[-1] < valid[0]
    # the total is the sum of the two published terms
    terms = sum(history[f"{k}_loss_train"].to_numpy().ravel().astype(float) for k in ("gep", "mvc"))
    np.testing.assert_allclose(train, terms, rtol=0.02)


def test_train_refuses_tokenizer_settings_in_plan_kwargs(trained):
    with pytest.raises(ValueError, match=r"\['max_seq_len'\] are set by the model"):
        trained.train(max_epochs=1, plan_kwargs={"max_seq_len": 10})


def test_batch_label_tokens(pbmc, tmp_path):
    adata = pbmc[:128].copy()
    SCGPT.setup_anndata(adata, batch_key="batch")
    model = SCGPT(adata, use_batch_labels=True, **TINY)
    n_batch = model.summary_stats.n_batch
    assert n_batch >= 2 and model.module.batch_encoder.embedding.num_embeddings == n_batch
    model.train(max_epochs=1, batch_size=64, accelerator="cpu", enable_progress_bar=False)
    assert np.isfinite(model.history["train_loss"].to_numpy(dtype=float)).all()
    module, _, _, report = load_scgpt_checkpoint(model.export_folder(tmp_path / "ckpt"))
    assert report.clean and module.use_batch_labels and module.config["n_batch_labels"] == n_batch
    SCGPT.setup_anndata(adata)
    with pytest.raises(ValueError, match="batch_key"):
        SCGPT(adata, use_batch_labels=True, **TINY)


# --- on-the-fly tokenization ----------------------------------------------------------------
def test_tokenizer_reads_a_long_block_as_cell_after_cell(pbmc):
    """A block longer than the tokenizer's row slices gives the tokens of one cell at a time."""
    X = sparse.vstack([pbmc.X] * 8).tocsr()  # 2,400 cells: slices of 1,024 rows and a rest
    kwargs = {"cls_id": 201, "pad_value": PAD, "max_length": 48, "random_state": 3}
    whole = CellTokenizer(np.arange(pbmc.n_vars), **kwargs)(X)
    one = CellTokenizer(np.arange(pbmc.n_vars), **kwargs)
    single = [one(X[i : i + 1])[0] for i in range(X.shape[0])]
    # both subsampled (48 tokens) and shorter cells, so both random streams are exercised
    assert len(whole) == X.shape[0] and {len(ids) == 48 for ids, _ in whole} == {True, False}
    for (ids, vals), (want_ids, want_vals) in zip(whole, single, strict=True):
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(vals, want_vals)


def test_minibatch_tokenization_masks_only_gene_values(pbmc):
    X = torch.from_numpy(pbmc.X[:40].toarray())
    n_genes = (X > 0).sum(1)
    tokenizer = CellTokenizer(np.arange(pbmc.n_vars), cls_id=201, pad_value=PAD, max_length=48)
    batch = tokenize_minibatch(
        {"X": X},
        tokenizer,
        pad_id=200,
        pad_value=PAD,
        mask_value=MASK,
        mask_ratio=0.4,
        generator=torch.Generator().manual_seed(0),
    )
    ids, values, target = batch["gene_ids"], batch["values"], batch["target_values"]
    assert (ids[:, 0] == 201).all() and (target[:, 0] == PAD).all()
    assert torch.equal(batch["padding_mask"], ids == 200)
    kept = torch.clamp(n_genes, max=47)  # <cls> + at most 47 genes
    assert torch.equal((~batch["padding_mask"]).sum(1), kept + 1)
    masked = values == MASK
    # never <cls> nor padding; unmasked positions carry the target unchanged
    assert not masked[:, 0].any() and not masked[batch["padding_mask"]].any()
    assert torch.equal(values[~masked], target[~masked])
    assert ((target[masked] >= 1) & (target[masked] <= 50)).all()
    # int(n * ratio) of each cell's gene positions, as the official random_mask_value
    assert torch.equal(masked.sum(1), (kept.double() * 0.4).long())
    assert abs(masked.sum().item() / kept.sum().item() - 0.4) < 0.02


def test_plan_hook_tokenizes_and_buckets_give_the_same_loss(trained, pbmc):
    module = trained.module.eval()
    plan = SCGPTTrainingPlan(module, **trained._tokenizer_kwargs(), random_state=3)
    # a minibatch mixing long and short cells: the short ones keep 8 genes
    X = pbmc.X[:24].toarray()
    X[12:, 8:] = 0
    batch = plan.on_before_batch_transfer({"X": torch.from_numpy(X)}, 0)
    lengths = (~batch["padding_mask"]).sum(1)
    assert lengths[:12].min() > 2 * lengths[12:].max()
    assert len(plan._buckets(lengths)) == 2
    with torch.no_grad():
        _, _, bucketed = plan.forward(batch)
        plan.length_buckets = False
        _, _, whole = plan.forward(batch)
    torch.testing.assert_close(bucketed.loss, whole.loss, rtol=1e-5, atol=1e-4)
    for key in ("gep_loss", "mvc_loss"):
        torch.testing.assert_close(bucketed.extra_metrics[key], whole.extra_metrics[key])
    assert bucketed.n_obs_minibatch == whole.n_obs_minibatch == 24


# --- outputs --------------------------------------------------------------------------------
def test_latent_representation_is_the_embedding_path(trained):
    adata = trained.adata
    emb = trained.get_latent_representation(batch_size=17)
    assert emb.shape == (adata.n_obs, 16)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    direct = embed_matrix(
        trained.module, trained.vocab, trained.args, adata.X, adata.var_names, random_state=0
    )
    np.testing.assert_allclose(emb, direct, atol=1e-6)
    # a subset gets its cells' own vectors (each cell draws from its own stream) ...
    part = trained.get_latent_representation(indices=[5, 0])
    np.testing.assert_allclose(part, emb[[5, 0]], atol=1e-5)
    # ... and with the official stream, those of that matrix (the stream runs over its cells)
    part = trained.get_latent_representation(indices=[5, 0], random_stream="official")
    rows = embed_matrix(
        trained.module,
        trained.vocab,
        trained.args,
        adata.X[[5, 0]],
        adata.var_names,
        random_stream="official",
    )
    np.testing.assert_allclose(part, rows, atol=1e-6)
    # another gene order and a gene subset work too (genes are matched by name)
    other = adata[:10, ::-1].copy()
    assert trained.get_latent_representation(other).shape == (10, 16)


def test_gene_embeddings(trained):
    table = trained.get_gene_embeddings()
    assert table.shape == (200, 16)
    assert list(table.index) == list(trained.adata.var_names)
    gene = table.index[7]
    with torch.no_grad():
        ids = torch.tensor([trained.vocab[gene]])
        expected = trained.module.encoder(ids)[0].numpy()
        raw = trained.module.encoder.embedding(ids)[0].numpy()
    np.testing.assert_allclose(table.loc[gene].to_numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(
        trained.get_gene_embeddings([gene], layer_norm=False).to_numpy()[0], raw, atol=1e-6
    )
    with pytest.raises(KeyError, match="not in the model's vocabulary"):
        trained.get_gene_embeddings(["NOT_A_GENE"])


def test_attention_of_one_cell_matches_the_module(trained):
    adata = trained.adata
    genes = list(adata.var_names[:120])
    att = trained.get_attention(indices=[3], genes=genes, layer=-1)
    assert att.shape == (120, 120) and list(att.index) == genes
    # recompute for that cell: its tokens, the layer's weights averaged over heads
    index = np.where(np.isin(adata.var_names, genes), np.arange(adata.n_vars), -1)
    tok = CellTokenizer(index, cls_id=trained.vocab["<cls>"], pad_value=PAD, max_length=48)
    ids, vals = tok(adata.X[3:4])[0]
    with torch.no_grad():
        out = trained.module.eval().encode(
            torch.from_numpy(ids)[None],
            torch.from_numpy(vals)[None],
            torch.zeros(1, len(ids), dtype=torch.bool),
            return_attention=[0],
        )
    expected = out["attention"][0][0].mean(0).numpy()[1:, 1:]
    names = [adata.var_names[i] for i in ids[1:]]
    np.testing.assert_allclose(att.loc[names, names].to_numpy(), expected, atol=1e-6)
    absent = [g for g in genes if g not in names]
    assert (att.loc[absent].to_numpy() == 0).all()
    with pytest.raises(IndexError, match="1 layers"):
        trained.get_attention(indices=[0], layer=3)


# --- persistence ----------------------------------------------------------------------------
def test_save_load_round_trip(trained, tmp_path):
    emb = trained.get_latent_representation()
    trained.save(tmp_path / "model", overwrite=True)
    loaded = SCGPT.load(tmp_path / "model", adata=trained.adata)
    assert loaded.vocab == trained.vocab
    np.testing.assert_array_equal(loaded.get_latent_representation(), emb)


def test_export_folder_round_trip(trained, tmp_path):
    emb = trained.get_latent_representation()
    folder = trained.export_folder(tmp_path / "ckpt")
    assert sorted(p.name for p in folder.iterdir()) == [
        "args.json",
        "model.safetensors",
        "vocab.json",
    ]
    args = json.loads((folder / "args.json").read_text())
    assert (args["embsize"], args["nlayers"], args["max_seq_len"]) == (16, 1, 48)
    module, vocab, args, report = load_scgpt_checkpoint(folder)
    assert report.clean and len(report.loaded) == len(trained.module.state_dict())
    assert vocab == trained.vocab
    adata = trained.adata
    np.testing.assert_allclose(
        embed_matrix(module, vocab, args, adata.X, adata.var_names), emb, atol=1e-6
    )
    with pytest.raises(FileExistsError, match="overwrite=True"):
        trained.export_folder(folder)
    # a vocab.json path is read as the official loader reads it
    assert SCGPT(adata, vocab=folder / "vocab.json", **TINY).vocab == trained.vocab
    # fine-tuning starts from exactly these weights
    again = SCGPT.from_pretrained(folder, adata)
    assert again.pretrained_["clean"]
    np.testing.assert_allclose(again.get_latent_representation(), emb, atol=1e-6)


def test_from_pretrained_official_fixture_folder(fixtures_dir):
    folder = fixtures_dir / "scgpt" / "ckpt_folder"
    with np.load(fixtures_dir / "scgpt" / "fixture_io.npz") as npz:
        counts, names = npz["counts"], [str(g) for g in npz["var_names"]]
        official = npz["cell_emb_embed_data"]
    adata = ad.AnnData(counts.astype(np.float32))
    adata.var_names = names
    SCGPT.setup_anndata(adata)
    model = SCGPT.from_pretrained(folder, adata)
    assert model.pretrained_["clean"] and len(model.pretrained_["weights_sha256"]) == 64
    assert model.gene_match.n_matched == 40
    emb = model.get_latent_representation(random_stream="official")
    module, vocab, args, _ = load_scgpt_checkpoint(folder)
    direct = embed_matrix(module, vocab, args, counts, names, random_stream="official")
    np.testing.assert_allclose(emb, direct, atol=1e-6)
    np.testing.assert_allclose(emb, official, atol=1e-5)


def test_shipped_default_model(read_shared):
    resolved = sft.hub.load("scgpt-default")
    assert resolved.card is not None and resolved.card.embedded
    assert resolved.weights.name == "model.safetensors"
    module, vocab, args, report = load_scgpt_checkpoint(resolved.path)
    assert report.clean
    pbmc8k = read_shared("pbmc8k_200genes_labeled.h5ad")
    cells = pbmc8k[pbmc8k.obs["cell_type"].isin(["B-cells", "Monocytes"])][:40].copy()
    emb = embed_matrix(module, vocab, args, cells.X, cells.var_names)
    assert emb.shape == (40, args["embsize"]) and np.isfinite(emb).all()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # two clearly different cell types: each cell is closer to its own type's centroid
    labels = cells.obs["cell_type"].to_numpy()
    centroids = np.stack([emb[labels == t].mean(0) for t in ("B-cells", "Monocytes")])
    nearest = np.array(["B-cells", "Monocytes"])[np.argmax(emb @ centroids.T, axis=1)]
    assert (nearest == labels).mean() > 0.8
    # and the model class builds around it for fine-tuning
    SCGPT.setup_anndata(cells)
    model = SCGPT.from_pretrained("scgpt-default", cells)
    assert model.pretrained_["source"] == "scgpt-default"
    np.testing.assert_allclose(model.get_latent_representation(), emb, atol=1e-6)


# --- bad inputs -----------------------------------------------------------------------------
def test_from_pretrained_unknown_model(pbmc):
    adata = pbmc[:20].copy()
    SCGPT.setup_anndata(adata)
    with pytest.raises(sft.hub.UnknownModelError, match="not an existing file or folder"):
        SCGPT.from_pretrained("no-such-scgpt-model", adata)


def test_no_overlap_with_given_vocab_is_refused(pbmc):
    adata = pbmc[:50].copy()
    SCGPT.setup_anndata(adata)
    before = snapshot(adata)
    vocab = {f"GENE{i}": i for i in range(100)}
    with pytest.raises(InputError, match=r"too few genes match the vocabulary: only 0 of 200"):
        SCGPT(adata, vocab=vocab, **TINY)
    assert_unchanged(adata, before)


@pytest.mark.parametrize(
    ("value", "message"), [(np.nan, "NaN or infinite"), (-1.0, "negative values")]
)
def test_bad_values_are_refused_before_registration(pbmc, value, message):
    adata = pbmc[:50].copy()
    adata.X = adata.X.toarray()
    adata.X[3, 7] = value
    before = snapshot(adata)
    with pytest.raises(InputError, match=message):
        SCGPT.setup_anndata(adata)
    assert_unchanged(adata, before)
    assert "_scvi_uuid" not in adata.uns


def test_log_normalised_values_are_accepted(pbmc):
    adata = pbmc[:60].copy()
    adata.layers["counts"] = adata.X.copy()
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    SCGPT.setup_anndata(adata)
    model = SCGPT(adata, **TINY)
    SCGPT.setup_anndata(adata, layer="counts")
    counts_model = SCGPT(adata, **TINY)
    counts_model.module.load_state_dict(model.module.state_dict())
    # ranks within a cell survive normalisation and log1p: same bins, same embedding
    np.testing.assert_allclose(
        model.get_latent_representation(), counts_model.get_latent_representation(), atol=1e-5
    )
