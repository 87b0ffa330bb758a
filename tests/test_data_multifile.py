"""Multi-file pretraining data: lazy h5ad reads, block shuffling, sharding over ranks, workers."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch
from scipy import sparse
from torch.utils.data import DataLoader

from _ddp_worker import TINY, tiny_cellbench
from scfm_tools._validation import InputError
from scfm_tools.dataloaders import CELL_ID, X_KEY, MultiFileCellDataset, MultiFileDataModule
from scfm_tools.models import SCGPT

DATA = "cellbench_3celllines_celseq2_dropseq.h5ad"


@pytest.fixture(scope="module")
def cells(data_dir):
    """64 real cells x 300 genes (symbols), raw counts."""
    return tiny_cellbench(str(data_dir / DATA))


@pytest.fixture(scope="module")
def files(cells, tmp_path_factory):
    """Three h5ad files of 20, 31 and 13 of those cells: the second with its genes reversed and
    20 of them left out, the third named by Ensembl ID."""
    folder = tmp_path_factory.mktemp("multifile")
    a = cells[:20].copy()
    b = cells[20:51, ::-1][:, 20:].copy()
    c = cells[51:].copy()
    c.var_names = c.var["gene_ids"].astype(str).to_numpy()
    paths = []
    for i, part in enumerate((a, b, c)):
        part.X = sparse.csr_matrix(part.X)
        paths.append(folder / f"part{i}.h5ad")
        part.write_h5ad(paths[-1])
    return paths


def _epoch(dataset: MultiFileCellDataset, epoch: int, workers: int) -> tuple[list, list]:
    dataset.set_epoch(epoch)
    loader = DataLoader(dataset, batch_size=None, num_workers=workers)
    batches = list(loader)
    assert len(batches) == len(dataset)
    return [b[CELL_ID].tolist() for b in batches], batches


def _module(files, **kwargs) -> MultiFileDataModule:
    return MultiFileDataModule(files, batch_size=6, block_size=8, random_state=7, **kwargs)


def _shards(files, world: int, epoch: int, workers: int = 2, **kwargs) -> list[list[int]]:
    dm = _module(files, **kwargs)
    shards = []
    for rank in range(world):
        ds = MultiFileCellDataset(
            dm.files, dm.n_columns, num_replicas=world, rank=rank, collate=None, **dm.options
        )
        ids, _ = _epoch(ds, epoch, workers)
        shards.append([i for batch in ids for i in batch])
    return shards


# --- sharding and order ---------------------------------------------------------------------
def test_each_cell_once_per_epoch_over_ranks_and_workers(files):
    for epoch in (0, 1):
        rank0, rank1 = _shards(files, world=2, epoch=epoch)
        assert len(rank0) == len(rank1) == 32
        assert sorted(rank0 + rank1) == list(range(64))
    # the order is the epoch's global order, cut in two; two workers keep the batch order
    dm = _module(files)
    ds = MultiFileCellDataset(dm.files, dm.n_columns, num_replicas=2, rank=1, **dm.options)
    order = ds.epoch_order(1)
    assert sorted(order) == list(range(64))
    assert rank1 == list(order[32:]) and rank0 == list(order[:32])
    assert _shards(files, world=2, epoch=1, workers=0) == [rank0, rank1]


def test_order_differs_between_epochs_and_repeats_for_a_seed(files):
    epoch0 = _shards(files, world=2, epoch=0)
    epoch1 = _shards(files, world=2, epoch=1)
    assert epoch0 != epoch1
    assert epoch0 == _shards(files, world=2, epoch=0)  # a fresh data module, the same seed
    other = MultiFileDataModule(files, batch_size=6, block_size=8, random_state=8)
    ds = MultiFileCellDataset(other.files, other.n_columns, **other.options)
    assert list(ds.epoch_order(0)) != [i for shard in epoch0 for i in shard]


def test_block_shuffle_keeps_blocks_contiguous(files):
    dm = _module(files)
    ds = MultiFileCellDataset(dm.files, dm.n_columns, **dm.options)
    order = ds.epoch_order(3)
    # blocks are 8 consecutive rows of one file; file offsets are 0, 20, 51
    offsets = np.array([0, 20, 51])
    file_of = np.searchsorted(offsets, order, side="right") - 1
    block_of = file_of * 100 + (order - offsets[file_of]) // 8
    runs = np.split(block_of, np.flatnonzero(np.diff(block_of)) + 1)
    assert len(runs) == len(np.unique(block_of)) == 3 + 4 + 2  # each block read as one run
    # rows are shuffled within blocks and blocks across files
    assert not np.array_equal(order, np.sort(order))
    assert len({int(r[0]) for r in runs}) == len(runs)
    unshuffled = MultiFileDataModule(files, batch_size=6, block_size=8, shuffle=False)
    plain = MultiFileCellDataset(unshuffled.files, unshuffled.n_columns, **unshuffled.options)
    np.testing.assert_array_equal(plain.epoch_order(5), np.arange(64))


def test_padding_rule_when_cells_do_not_divide(files):
    # 51 cells (first two files) over 2 ranks: 26 each, the epoch's first cell seen twice
    rank0, rank1 = _shards(files[:2], world=2, epoch=2)
    dm = _module(files[:2])
    order = MultiFileCellDataset(dm.files, dm.n_columns, **dm.options).epoch_order(2)
    assert len(rank0) == len(rank1) == 26
    assert rank0 + rank1 == [*order.tolist(), int(order[0])]
    # drop_last: 25 each, the epoch's last cell left out
    rank0, rank1 = _shards(files[:2], world=2, epoch=2, drop_last=True)
    assert rank0 + rank1 == order[:50].tolist()


# --- what is read -----------------------------------------------------------------------------
def test_rows_are_the_files_cells_on_the_target_genes(files, cells):
    dm = _module(files, genes=list(cells.var_names))
    dm.setup()
    _, batches = _epoch(dm.dataset, 0, workers=2)
    X = torch.cat([b[X_KEY] for b in batches]).numpy()
    ids = np.concatenate([b[CELL_ID].numpy() for b in batches])
    expected = cells.X.toarray()[ids]
    # the second file lacks 20 genes (its first 20 after reversal: the last 20 of cells.var)
    in_b = (ids >= 20) & (ids < 51)
    expected[np.ix_(in_b, np.arange(280, 300))] = 0
    np.testing.assert_array_equal(X, expected)
    assert X.dtype == np.float32 and X.shape == (64, 300)


def test_scgpt_tokenizes_in_the_workers(files, cells):
    adata = cells.copy()
    SCGPT.setup_anndata(adata)
    model = SCGPT(adata, **TINY)
    dm = _module(files[2:], num_workers=2)  # the Ensembl-named file
    model._bind_datamodule(dm, {"mask_ratio": 0.4})
    dm.setup()
    _, batches = _epoch(dm.dataset, 0, workers=2)
    vocab_of = {v: k for k, v in model.vocab.items()}
    for batch in batches:
        ids = batch["gene_ids"]
        assert (ids[:, 0] == model.vocab["<cls>"]).all()
        for row, cell in zip(ids, batch[CELL_ID].tolist(), strict=True):
            genes = [vocab_of[int(i)] for i in row[1:] if int(i) != model.module.pad_token_id]
            counts = cells[cell, genes].X.toarray().ravel()
            assert len(genes) == min(63, int((cells.X[cell] > 0).sum())) and (counts > 0).all()
        masked = batch["values"] == model.module.mask_value
        assert masked.any() and not masked[:, 0].any()
    # the same seed gives the same tokens and masks whatever the number of workers
    again = list(DataLoader(dm.dataset, batch_size=None, num_workers=0))
    for one, two in zip(batches, again, strict=True):
        assert torch.equal(one["values"], two["values"])


def test_scgpt_trains_on_files(files, cells, tmp_path):
    adata = cells.copy()
    SCGPT.setup_anndata(adata)
    torch.manual_seed(0)
    model = SCGPT(adata, **TINY)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    dm = _module(files)
    model.train(
        max_epochs=1,
        datamodule=dm,
        accelerator="cpu",
        enable_progress_bar=False,
        checkpoint_dir=tmp_path / "ckpt",
    )
    assert np.isfinite(model.history["train_loss"].to_numpy(dtype=float)).all()
    after = model.module.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert [p.name for p in (tmp_path / "ckpt").glob("*.ckpt")] == ["epoch=0-step=11.ckpt"]


# --- bad input --------------------------------------------------------------------------------
def test_bad_files_are_refused(files, cells, tmp_path):
    with pytest.raises(FileNotFoundError, match="1 files do not exist"):
        MultiFileDataModule([files[0], tmp_path / "absent.h5ad"])
    csc = cells[:5].copy()
    csc.X = sparse.csc_matrix(csc.X)
    csc.write_h5ad(tmp_path / "csc.h5ad")
    with pytest.raises(InputError, match="stored as csc_matrix.*csr_matrix"):
        MultiFileDataModule([tmp_path / "csc.h5ad"])
    other = ad.AnnData(
        X=sparse.csr_matrix(np.ones((4, 30), dtype=np.float32)),
        var={"name": [f"feature_{i}" for i in range(30)]},
    )
    other.var_names = other.var["name"].astype(str)
    other.write_h5ad(tmp_path / "other.h5ad")
    with pytest.raises(InputError, match=r"other\.h5ad: only 0 of its 30 genes match"):
        MultiFileDataModule([files[0], tmp_path / "other.h5ad"], genes=list(cells.var_names))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        MultiFileDataModule(files, batch_size=0).setup()
