"""Pretraining data from many h5ad files: lazy reads, block shuffling, sharding over processes.

Neither scvi-tools (its loaders read one registered AnnData, or a lamindb / TileDB-SOMA /
annbatch store) nor anything installed here streams a folder of plain ``.h5ad`` files, so this is
a small :class:`~torch.utils.data.IterableDataset`:

- the files stay on disk: each data-loader worker opens them read-only (``h5py``, the matrix as
  an :func:`anndata.io.sparse_dataset`) and reads contiguous row blocks;
- each epoch the list of ``(file, row block)`` pairs is shuffled, then the rows within each block
  (block shuffling: reads stay contiguous, batches still mix cells from all over the corpus);
- the resulting order of all cells is cut into one contiguous share per DDP rank, each share into
  minibatches, and minibatch ``k`` of a rank goes to worker ``k mod num_workers``. PyTorch takes
  worker outputs in turn, so a rank's minibatches come out in the same order whatever the number
  of workers;
- genes are put on one gene space (a model's vocabulary) per file, by symbol or Ensembl ID;
- an optional ``collate`` (a model's tokenizer) runs in the workers, seeded per minibatch.

Every epoch, the union over ranks and workers is every cell exactly once when the number of
cells is divisible by the number of ranks. Otherwise ranks need equal shares (DDP steps in lock
step): with ``drop_last=False`` (default) the order is extended by its own first
``ranks - N mod ranks`` cells (those cells are seen twice that epoch; different ones each epoch
when shuffled), with ``drop_last=True`` its last ``N mod ranks`` cells are left out.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from lightning.pytorch import LightningDataModule
from scipy import sparse
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .._anndata import resolve_seed
from .._validation import InputError
from ..train import Collate, derive_seed, training_epoch

__all__ = ["CELL_ID", "X_KEY", "MultiFileCellDataset", "MultiFileDataModule", "h5ad_summary"]

logger = logging.getLogger("scfm_tools")

#: Batch key of the global cell numbers (file offset + row, files in the order given).
CELL_ID = "cell_id"
#: Batch key of the expression rows when there is no ``collate``.
X_KEY = "X"
# Open files kept per worker (each holds an HDF5 handle).
_MAX_OPEN_FILES = 16


@dataclass(frozen=True)
class _File:
    path: str
    n_obs: int
    offset: int
    columns: np.ndarray  # target column of each file column, -1 where unmatched


def _matrix_node(handle, layer: str | None, path: str):
    if layer is None:
        return handle["X"]
    if "layers" not in handle or layer not in handle["layers"]:
        raise KeyError(f"{path}: layer {layer!r} is not in the file's layers.")
    return handle["layers"][layer]


def h5ad_summary(path: str | os.PathLike, layer: str | None = None) -> tuple[int, pd.Index]:
    """Read the number of cells and the ``var_names`` of an ``.h5ad`` file (not its matrix).

    Parameters
    ----------
    path
        The file.
    layer
        Layer that will be read (``None``: ``X``); it must be dense or CSR.

    Returns
    -------
    ``(n_obs, var_names)``.
    """
    import h5py
    from anndata.io import read_elem

    path = os.fspath(path)
    with h5py.File(path, "r") as handle:
        node = _matrix_node(handle, layer, path)
        if isinstance(node, h5py.Dataset):
            n_obs = int(node.shape[0])
        else:
            encoding = node.attrs.get("encoding-type", "")
            if encoding != "csr_matrix":
                raise InputError(
                    f"{path}: the matrix is stored as {encoding or 'an unknown type'}; reading "
                    "rows lazily needs a dense or CSR matrix. Rewrite it with "
                    "`adata.X = scipy.sparse.csr_matrix(adata.X); adata.write_h5ad(path)`."
                )
            n_obs = int(node.attrs["shape"][0])
        var_names = pd.Index(read_elem(handle["var"]).index.astype(str))
    return n_obs, var_names


def _to_columns(block: sparse.csr_matrix, columns: np.ndarray, n_columns: int):
    """Put a CSR block on the target gene space (drop genes without a target column)."""
    target = columns[block.indices]
    keep = target >= 0
    kept = np.concatenate([[0], np.cumsum(keep)])
    out = sparse.csr_matrix(
        (block.data[keep], target[keep], kept[block.indptr]), shape=(block.shape[0], n_columns)
    )
    out.sort_indices()
    return out


class MultiFileCellDataset(IterableDataset):
    """Minibatches of cells from several h5ad files, block-shuffled and sharded (module docs).

    Parameters
    ----------
    files
        The files, with their cell counts and gene columns (built by
        :class:`MultiFileDataModule`).
    n_columns
        Width of the target gene space.
    batch_size
        Cells per minibatch (per process).
    block_size
        Rows per shuffled block: larger blocks mean fewer, longer reads and less mixing.
    layer
        Layer to read (``None``: ``X``).
    shuffle
        Shuffle blocks and rows each epoch (``False``: files, then rows, in order).
    drop_last
        How to make the ranks' shares equal when the cells do not divide evenly (module docs).
    num_replicas, rank
        Number of DDP processes and this one's rank.
    random_state
        Seed of the order and of ``collate``.
    collate
        ``collate(X, seed) -> dict`` run in the workers on each minibatch (``X``: CSR, cells x
        ``n_columns``); ``None`` yields ``{"X": dense float32 rows}``. :data:`CELL_ID` is added.
    """

    def __init__(
        self,
        files: Sequence[_File],
        n_columns: int,
        *,
        batch_size: int,
        block_size: int,
        layer: str | None = None,
        shuffle: bool = True,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
        random_state: int = 0,
        collate: Collate | None = None,
    ) -> None:
        for name, value in (("batch_size", batch_size), ("block_size", block_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must lie in [0, {num_replicas}), got {rank}.")
        self.files = list(files)
        self.n_columns = int(n_columns)
        self.batch_size, self.block_size = batch_size, block_size
        self.layer, self.shuffle, self.drop_last = layer, bool(shuffle), bool(drop_last)
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.random_state = int(random_state)
        self.collate = collate
        self.epoch = 0
        self.n_obs = sum(f.n_obs for f in self.files)
        if self.n_obs == 0:
            raise InputError("the files hold no cells.")
        share = self.n_obs // num_replicas if drop_last else -(-self.n_obs // num_replicas)
        if share == 0:
            raise ValueError(
                f"{self.n_obs} cells cannot give each of {num_replicas} processes one with "
                "drop_last=True."
            )
        self.per_rank = share
        # Blocks in file order: (file, first row, rows).
        starts = [(i, s, min(self.block_size, f.n_obs - s)) for i, f in enumerate(self.files)
                  for s in range(0, f.n_obs, self.block_size)]  # fmt: skip
        self._block_file = np.array([b[0] for b in starts], dtype=np.int64)
        self._block_start = np.array([b[1] for b in starts], dtype=np.int64)
        self._block_len = np.array([b[2] for b in starts], dtype=np.int64)
        self._handles: OrderedDict[int, Any] = OrderedDict()
        self._cache: OrderedDict[int, sparse.csr_matrix] = OrderedDict()

    # epochs -----------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order the next iteration gives (called each epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Minibatches this rank yields per epoch (all workers together)."""
        return -(-self.per_rank // self.batch_size)

    def _layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        n_blocks = self._block_len.size
        if self.shuffle:
            order = np.random.default_rng(derive_seed(self.random_state, epoch)).permutation(
                n_blocks
            )
        else:
            order = np.arange(n_blocks)
        return order, np.cumsum(self._block_len[order])

    def _rows_in_block(self, block: int, epoch: int) -> np.ndarray:
        n = int(self._block_len[block])
        if not self.shuffle:
            return np.arange(n)
        rng = np.random.default_rng(derive_seed(self.random_state, epoch, block))
        return rng.permutation(n)

    def epoch_order(self, epoch: int | None = None) -> np.ndarray:
        """Global cell numbers of the whole epoch in order, before sharding (for inspection)."""
        epoch = self.epoch if epoch is None else epoch
        order, _ = self._layout(epoch)
        offsets = np.array([self.files[i].offset for i in self._block_file])
        parts = [offsets[b] + self._block_start[b] + self._rows_in_block(b, epoch) for b in order]
        return np.concatenate(parts)

    # reading ----------------------------------------------------------------------------------
    def _matrix(self, i: int):
        if i in self._handles:
            self._handles.move_to_end(i)
            return self._handles[i][1]
        import h5py
        from anndata.io import sparse_dataset

        handle = h5py.File(self.files[i].path, "r")
        node = _matrix_node(handle, self.layer, self.files[i].path)
        matrix = node if isinstance(node, h5py.Dataset) else sparse_dataset(node)
        self._handles[i] = (handle, matrix)
        if len(self._handles) > _MAX_OPEN_FILES:
            _, (old, _) = self._handles.popitem(last=False)
            old.close()
        return matrix

    def _block(self, block: int) -> sparse.csr_matrix:
        """Rows of one block on the target genes (the last two blocks read are kept)."""
        if block in self._cache:
            self._cache.move_to_end(block)
            return self._cache[block]
        i = int(self._block_file[block])
        start = int(self._block_start[block])
        rows = self._matrix(i)[start : start + int(self._block_len[block])]
        rows = sparse.csr_matrix(rows, dtype=np.float32)
        out = _to_columns(rows, self.files[i].columns, self.n_columns)
        self._cache[block] = out
        if len(self._cache) > 2:
            self._cache.popitem(last=False)
        return out

    def _gather(
        self, positions: np.ndarray, epoch: int, layout
    ) -> tuple[sparse.csr_matrix, np.ndarray]:
        order, ends = layout
        slot = np.searchsorted(ends, positions, side="right")
        within = positions - (ends[slot] - self._block_len[order[slot]])
        parts, ids = [], []
        cuts = np.flatnonzero(np.diff(slot)) + 1
        for run in np.split(np.arange(positions.size), cuts):
            block = int(order[slot[run[0]]])
            rows = self._rows_in_block(block, epoch)[within[run]]
            parts.append(self._block(block)[rows])
            file = self.files[int(self._block_file[block])]
            ids.append(file.offset + int(self._block_start[block]) + rows)
        return sparse.vstack(parts, format="csr"), np.concatenate(ids)

    def _close(self) -> None:
        for handle, _ in self._handles.values():
            handle.close()
        self._handles.clear()
        self._cache.clear()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch
        layout = self._layout(epoch)
        first = self.rank * self.per_rank
        try:
            for k in range(worker, len(self), n_workers):
                lo = first + k * self.batch_size
                hi = min(lo + self.batch_size, first + self.per_rank)
                # Positions past the last cell wrap to the start (the padding rule).
                X, ids = self._gather(np.arange(lo, hi) % self.n_obs, epoch, layout)
                if self.collate is None:
                    batch = {X_KEY: torch.from_numpy(X.toarray())}
                else:
                    seed = derive_seed(self.random_state, epoch, self.rank, k)
                    batch = dict(self.collate(X, seed))
                batch[CELL_ID] = torch.from_numpy(ids.astype(np.int64))
                yield batch
        finally:
            self._close()

    def __getstate__(self) -> dict[str, Any]:
        # Open HDF5 handles do not travel to worker processes; each worker opens its own.
        state = self.__dict__.copy()
        state["_handles"], state["_cache"] = OrderedDict(), OrderedDict()
        return state


class MultiFileDataModule(LightningDataModule):
    """Lightning data module over many ``.h5ad`` files, for pretraining at scale.

    Pass it to a model's ``train(datamodule=...)``: the model puts the files' genes on its own
    vocabulary and, for scGPT, tokenizes and masks the cells in the data-loader workers
    (:meth:`bind`). Each DDP process reads its own share of every epoch; see
    :mod:`scfm_tools.dataloaders` for the order and the padding rule.

    Parameters
    ----------
    paths
        The ``.h5ad`` files (matrix dense or CSR, in ``X`` or ``layers[layer]``). They may have
        different genes, named by symbol or Ensembl ID.
    batch_size
        Cells per minibatch and process.
    block_size
        Rows per shuffled block (contiguous reads; larger is faster to read, mixes less).
    layer
        Layer to read in every file (``None``: ``X``).
    shuffle
        Shuffle blocks and rows each epoch.
    drop_last
        When the cells do not divide evenly among the processes: ``False`` repeats the first
        cells of the epoch's order, ``True`` leaves the last ones out.
    num_workers
        Data-loader worker processes per training process (reading and tokenizing).
    pin_memory
        Pin minibatches in page-locked memory (faster copies to a GPU).
    random_state
        Seed of the order and the per-minibatch randomness (``None``: ``sft.settings.seed``).
    genes
        Target gene space: ``{gene: column}`` or a gene list; ``None`` takes the first file's
        ``var_names``. A model's ``train`` sets it with :meth:`bind`.
    collate
        ``collate(X, seed) -> dict`` run in the workers (see :class:`MultiFileCellDataset`).

    Examples
    --------
    >>> dm = sft.dataloaders.MultiFileDataModule(paths, batch_size=64, num_workers=4)
    >>> model.train(max_epochs=5, datamodule=dm, accelerator="gpu", devices=4, strategy="ddp")
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        *,
        batch_size: int = 64,
        block_size: int = 1024,
        layer: str | None = None,
        shuffle: bool = True,
        drop_last: bool = False,
        num_workers: int = 0,
        pin_memory: bool = False,
        random_state: int | None = None,
        genes: Mapping[str, int] | Sequence[str] | None = None,
        collate: Collate | None = None,
    ) -> None:
        super().__init__()
        if isinstance(paths, str | os.PathLike):
            paths = [paths]
        paths = [os.fspath(Path(p).expanduser()) for p in paths]
        if not paths:
            raise ValueError("paths is empty: pass at least one .h5ad file.")
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} files do not exist, e.g. {missing[:3]}.")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be a non-negative integer, got {num_workers!r}.")
        self.paths = paths
        self.layer = layer
        summaries = [h5ad_summary(p, layer) for p in paths]
        self._n_obs = [n for n, _ in summaries]
        self._var_names = [v for _, v in summaries]
        self.options = {
            "batch_size": batch_size,
            "block_size": block_size,
            "layer": layer,
            "shuffle": shuffle,
            "drop_last": drop_last,
            "random_state": resolve_seed(random_state),
        }
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.dataset: MultiFileCellDataset | None = None
        self.bind(self._var_names[0] if genes is None else genes, collate)

    @property
    def n_obs(self) -> int:
        """Cells in all files."""
        return sum(self._n_obs)

    @property
    def n_vars(self) -> int:
        """Width of the target gene space."""
        return self.n_columns

    def bind(
        self,
        genes: Mapping[str, int] | Sequence[str],
        collate: Collate | None = None,
        *,
        min_genes: int = 10,
        min_fraction: float = 0.1,
    ) -> None:
        """Set the target gene space (and worker-side ``collate``), matching each file's genes.

        Parameters
        ----------
        genes
            ``{gene: column}`` (e.g. a vocabulary) or a gene list (column = position).
        collate
            ``collate(X, seed) -> dict`` run in the workers, or ``None``.
        min_genes, min_fraction
            Refuse a file with fewer matched genes, or a smaller share of its genes matched.
        """
        from ..pp._match_genes import _as_mapping, match_to_vocab

        mapping = _as_mapping(list(genes) if not isinstance(genes, Mapping) else genes)
        self.n_columns = max(mapping.values()) + 1
        files, offset = [], 0
        for path, n_obs, var_names in zip(self.paths, self._n_obs, self._var_names, strict=True):
            match = match_to_vocab(var_names, mapping)
            if match.n_matched < min_genes or match.fraction < min_fraction:
                raise InputError(
                    f"{path}: only {match.n_matched:,} of its {match.n_genes:,} genes match the "
                    f"model's genes ({match.fraction:.1%}); is it from another species, or are "
                    "its var_names neither gene symbols nor Ensembl IDs?"
                )
            logger.info("%s: %s", Path(path).name, match.describe())
            files.append(_File(path, n_obs, offset, match.index))
            offset += n_obs
        self.files = files
        self.collate = collate
        self.dataset = None

    def setup(self, stage: str | None = None) -> None:
        """Build this process's dataset (its DDP rank and world size come from the trainer)."""
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        self.dataset = MultiFileCellDataset(
            self.files,
            self.n_columns,
            num_replicas=world,
            rank=rank,
            collate=self.collate,
            **self.options,
        )

    def train_dataloader(self) -> DataLoader:
        """Build the training loader (set to the current epoch; iterated once per epoch)."""
        if self.dataset is None:
            self.setup("fit")
        # Workers copy the dataset when an iteration starts: its epoch must be right by then,
        # also for the first epoch of a resumed run.
        self.dataset.set_epoch(training_epoch(self.trainer))
        return DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
        )
