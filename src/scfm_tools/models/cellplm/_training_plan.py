"""Lightning data and training plan for CellPLM pretraining: minibatches are sequences.

CellPLM attends across the cells of a sample, so a minibatch is not a random set of cells but
one *sequence*: cells of one ``batch_key`` category (at most ``max_cells``, in random chunks).
:class:`SequenceDataSplitter` splits the cells into training and validation sets as scvi-tools'
:class:`~scvi.dataloaders.DataSplitter` does (seeded), then serves each set as sequences, in an
order drawn from the seed and the epoch (with a :class:`~torch.utils.data.DistributedSampler`
over sequences under DDP).
:class:`CellPLMTrainingPlan` corrupts each training sequence on the CPU before it moves to the
device (:func:`~scfm_tools.models.cellplm.mask_sequence`: dropped cells, masked cells and
features) and optimises :meth:`CellPLMModule.loss <scfm_tools.models.cellplm.CellPLMModule.loss>`.

Fine-tuning for annotation follows the official ``CellTypeAnnotationPipeline``: the validation
cells are not taken out of the sequences but stay in them as unlabelled context (a sequence is
still the cells of one sample), and a per-cell ``loss_mask`` says whose label counts: the
training cells in the training pass, the validation cells in the validation pass
(:class:`LabelledSequenceSplitter`). :class:`CellPLMClassifierPlan` corrupts the training input
as pretraining does, optimises the head's cross-entropy with the official optimiser settings
and logs the validation macro-F1 that early stopping watches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scvi import REGISTRY_KEYS
from scvi.train import TrainingPlan
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..._anndata import get_matrix
from ...train import (
    EpochShuffleSampler,
    SeededDataSplitter,
    SeededStreamsMixin,
    stratified_split,
    training_epoch,
)
from ._masking import mask_input, mask_sequence
from ._module import (
    BATCH_KEY,
    GENE_MASK_KEY,
    LABEL_KEY,
    LOSS_MASK_KEY,
    X_KEY,
    CellPLMModule,
)
from ._sequences import sequence_rows, to_model_genes

if TYPE_CHECKING:
    from scvi.data import AnnDataManager

    from ...pp._match_genes import GeneMatch

__all__ = [
    "CellPLMClassifierPlan",
    "CellPLMTrainingPlan",
    "LabelledSequenceSplitter",
    "SequenceDataSplitter",
]

#: Name of the logged validation macro-F1 (what fine-tuning's early stopping watches).
VALIDATION_F1 = "validation_macro_f1"


class _Sequences(Dataset):
    """Sequences of cells of one sample each, read from the registered matrix."""

    def __init__(
        self,
        X,
        rows: list[np.ndarray],
        match: GeneMatch,
        n_genes: int,
        batch: np.ndarray | None,
        labels: np.ndarray | None = None,
        loss_mask: np.ndarray | None = None,
    ) -> None:
        self.X, self.rows, self.match, self.n_genes, self.batch = X, rows, match, n_genes, batch
        self.labels, self.loss_mask = labels, loss_mask
        measured = torch.zeros(n_genes, dtype=torch.bool)
        measured[torch.from_numpy(match.index[match.matched])] = True
        self.gene_mask = measured

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rows = self.rows[i]
        out = {
            X_KEY: to_model_genes(self.X[rows], self.match, self.n_genes),
            GENE_MASK_KEY: self.gene_mask,
        }
        if self.batch is not None:
            out[BATCH_KEY] = torch.from_numpy(self.batch[rows])
        if self.labels is not None:
            out[LABEL_KEY] = torch.from_numpy(self.labels[rows])
            out[LOSS_MASK_KEY] = torch.from_numpy(self.loss_mask[rows])
        return out


def _chunk(indices: np.ndarray, codes: np.ndarray, max_cells: int | None, rng) -> list[np.ndarray]:
    """Group ``indices`` by sample code; cut each sample, shuffled, into chunks of max_cells."""
    out = []
    for code in np.unique(codes[indices]):
        members = rng.permutation(indices[codes[indices] == code])
        step = len(members) if max_cells is None else int(max_cells)
        out.extend(np.sort(members[i : i + step]) for i in range(0, len(members), step))
    return out


class SequenceDataSplitter(SeededDataSplitter):
    """Split cells into train/validation/test like scvi-tools, serve them as sequences.

    Parameters
    ----------
    adata_manager
        Manager of the registered AnnData (``X`` counts; ``batch`` categories = samples).
    match
        The registered genes' match to the model's gene list.
    n_genes
        Number of model genes.
    max_cells
        Most cells per sequence; larger samples are shuffled and cut into chunks (``None``:
        each sample whole).
    use_batch_covariate
        Give the registered batch codes to the decoder's batch table.
    random_state
        Seed of the split, the chunking and the order of the training sequences.
    **kwargs
        Passed to :class:`scvi.dataloaders.DataSplitter` (``train_size``, ``validation_size``,
        ``shuffle_set_split``, ``distributed_sampler`` ...); ``batch_size`` is ignored (a
        sequence is a minibatch).
    """

    def __init__(
        self,
        adata_manager: AnnDataManager,
        *,
        match: GeneMatch,
        n_genes: int,
        max_cells: int | None,
        use_batch_covariate: bool,
        random_state: int = 0,
        **kwargs: Any,
    ) -> None:
        self.distributed = bool(kwargs.pop("distributed_sampler", False))
        kwargs.pop("load_sparse_tensor", None)
        kwargs["batch_size"] = 1  # one sequence per minibatch: no tiny-last-batch concerns
        super().__init__(adata_manager, random_state=random_state, **kwargs)
        self.match, self.n_genes = match, n_genes
        self.max_cells = None if max_cells is None else int(max_cells)
        self.use_batch_covariate = use_batch_covariate
        codes = adata_manager.get_from_registry(REGISTRY_KEYS.BATCH_KEY)
        self.codes = np.asarray(codes).reshape(-1).astype(np.int64)

    def _loader(self, indices: np.ndarray, shuffle: bool, offset: int) -> DataLoader | None:
        if len(indices) == 0:
            return None
        rng = np.random.default_rng(self.random_state + offset)
        rows = _chunk(np.asarray(indices), self.codes, self.max_cells, rng)
        return self._sequence_loader(rows, shuffle)

    def _sequence_loader(
        self,
        rows: list[np.ndarray],
        shuffle: bool,
        labels: np.ndarray | None = None,
        loss_mask: np.ndarray | None = None,
    ) -> DataLoader:
        """Serve the sequences ``rows`` (with labels and loss masks when given)."""
        adata = self.adata_manager.adata
        layer = self.adata_manager.registry["setup_args"].get("layer")
        dataset = _Sequences(
            get_matrix(adata, layer),
            rows,
            self.match,
            self.n_genes,
            self.codes if self.use_batch_covariate else None,
            labels,
            loss_mask,
        )
        # The order is a function of (seed, epoch), so that a resumed run sees the same one.
        epoch = training_epoch(self.trainer)
        if self.distributed:
            sampler = DistributedSampler(dataset, shuffle=shuffle, seed=self.random_state)
            sampler.set_epoch(epoch)
        elif shuffle:
            sampler = EpochShuffleSampler(len(dataset), self.random_state, epoch)
        else:
            sampler = None
        return DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=0)

    def train_dataloader(self):
        """Sequences of the training cells, in random order."""
        return self._loader(self.train_idx, True, 0)

    def val_dataloader(self):
        """Sequences of the validation cells."""
        return self._loader(self.val_idx, False, 1)

    def test_dataloader(self):
        """Sequences of the test cells."""
        return self._loader(self.test_idx, False, 2)


class CellPLMTrainingPlan(SeededStreamsMixin, TrainingPlan):
    """scvi-tools :class:`~scvi.train.TrainingPlan` that corrupts sequences as CellPLM pretraining.

    Training sequences go through :func:`~scfm_tools.models.cellplm.mask_sequence` (random,
    restarted each epoch from ``random_state``, the epoch and the process rank); validation
    sequences are not corrupted (as the official model in eval mode), so the validation loss is
    the NB reconstruction of the whole sequence from the most likely mixture component.

    Parameters
    ----------
    module
        The :class:`~scfm_tools.models.cellplm.CellPLMModule` to train.
    mask_node_rate
        Fraction of cells masked (official 0.75).
    mask_feature_rate
        Fraction of a masked cell's counts masked (official 0.25).
    drop_node_rate
        Fraction of cells dropped from a sequence (official 0.3).
    max_cells
        Most cells kept per sequence (official ``max_batch_size``).
    mask_beta
        Per-cell masking probabilities from a Beta distribution (official ``True``).
    random_state
        Seed of the corruption.
    lr
        Learning rate (official 2e-4).
    weight_decay
        Weight decay (official 1e-8).
    eps
        Adam epsilon.
    **kwargs
        Passed to :class:`scvi.train.TrainingPlan` (``optimizer``, ``reduce_lr_on_plateau`` ...).
    """

    def __init__(
        self,
        module: CellPLMModule,
        *,
        mask_node_rate: float = 0.75,
        mask_feature_rate: float = 0.25,
        drop_node_rate: float = 0.3,
        max_cells: int | None = 4000,
        mask_beta: bool = True,
        random_state: int = 0,
        lr: float = 2e-4,
        weight_decay: float = 1e-8,
        eps: float = 1e-8,
        **kwargs: Any,
    ) -> None:
        super().__init__(module, lr=lr, weight_decay=weight_decay, eps=eps, **kwargs)
        self.mask_kwargs = {
            "mask_node_rate": mask_node_rate,
            "mask_feature_rate": mask_feature_rate,
            "drop_node_rate": drop_node_rate,
            "max_cells": max_cells,
            "mask_beta": mask_beta,
        }
        self.random_state = int(random_state)

    def _new_streams(self, seed: int) -> np.random.Generator:
        return np.random.default_rng(seed)

    def _count_cells(self, batch: dict[str, torch.Tensor]) -> None:
        self._n_cells = int(batch[X_KEY].shape[0])

    def on_train_batch_start(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Note the cells of the sequence, the weight of its losses in epoch averages."""
        self._count_cells(batch)

    def on_validation_batch_start(
        self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Note the cells of the sequence, the weight of its losses in epoch averages."""
        self._count_cells(batch)

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        """Log as Lightning does, weighting by the sequence's cells unless told otherwise.

        A minibatch here is a dict of a (cells x genes) matrix and per-gene tensors, from which
        Lightning cannot tell the batch size; scvi-tools' plan logs its losses without one.
        """
        n_cells = getattr(self, "_n_cells", None)
        if n_cells is not None:
            kwargs.setdefault("batch_size", n_cells)
        super().log(name, value, *args, **kwargs)

    def on_before_batch_transfer(self, batch: dict[str, torch.Tensor], dataloader_idx: int):
        """Corrupt a training sequence on the CPU before it moves to the device."""
        if self.trainer is None or not self.trainer.training:
            return batch
        extra = {BATCH_KEY: batch[BATCH_KEY]} if BATCH_KEY in batch else None
        out = mask_sequence(batch[X_KEY], rng=self._stream(), extra=extra, **self.mask_kwargs)
        out[GENE_MASK_KEY] = batch[GENE_MASK_KEY]
        return out


class LabelledSequenceSplitter(SequenceDataSplitter):
    """Sequences of labelled cells for fine-tuning, with a stratified validation split.

    As the official annotation pipeline: every sequence holds all the cells of its sample (in
    chunks of at most ``max_cells``), training and validation cells alike; the split decides
    whose label counts (``loss_mask``): the training cells in the training pass (chunks drawn
    from the seed, in an order drawn each epoch), the validation cells in the validation pass
    (consecutive chunks in data order, as at prediction). The validation cells are
    :func:`~scfm_tools.train.stratified_split` from the registered labels.

    Parameters
    ----------
    adata_manager
        Manager of the registered AnnData (``X`` counts, ``labels``, ``batch`` = samples).
    match, n_genes, max_cells
        As in :class:`SequenceDataSplitter`.
    validation_size
        Share of each cell type held out for validation.
    random_state
        Seed of the split, the chunking and the order.
    **kwargs
        Passed to :class:`SequenceDataSplitter` (``train_size`` is ignored: the training cells
        are the rest).
    """

    def __init__(
        self,
        adata_manager: AnnDataManager,
        *,
        match: GeneMatch,
        n_genes: int,
        max_cells: int | None,
        validation_size: float = 0.1,
        random_state: int = 0,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("train_size", None)
        kwargs.pop("use_batch_covariate", None)
        super().__init__(
            adata_manager,
            match=match,
            n_genes=n_genes,
            max_cells=max_cells,
            use_batch_covariate=False,  # the annotation head reads no covariate
            random_state=random_state,
            **kwargs,
        )
        self.validation_share = float(validation_size)
        labels = adata_manager.get_from_registry(REGISTRY_KEYS.LABELS_KEY)
        self.labels = np.asarray(labels).reshape(-1).astype(np.int64)

    def setup(self, stage: str | None = None) -> None:
        """Split the cells class by class (no test set)."""
        super().setup(stage)
        train, val = stratified_split(self.labels, self.validation_share, self.random_state)
        self.train_idx, self.val_idx, self.test_idx = train, val, np.empty(0, np.int64)

    def _mask(self, indices: np.ndarray) -> np.ndarray:
        mask = np.zeros(self.labels.size, dtype=bool)
        mask[indices] = True
        return mask

    def train_dataloader(self):
        """All cells in sequences (random chunks), the training cells' labels counting."""
        rng = np.random.default_rng(self.random_state)
        every = np.arange(self.labels.size)
        rows = _chunk(every, self.codes, self.max_cells, rng)
        return self._sequence_loader(rows, True, self.labels, self._mask(self.train_idx))

    def val_dataloader(self):
        """All cells in sequences (as at prediction), the validation cells' labels counting."""
        if len(self.val_idx) == 0:
            return None
        rows = sequence_rows(self.codes, self.max_cells)
        return self._sequence_loader(rows, False, self.labels, self._mask(self.val_idx))

    def test_dataloader(self):
        """No test set."""
        return None


class CellPLMClassifierPlan(CellPLMTrainingPlan):
    """Fine-tune a CellPLM module with an annotation head, as the official pipeline does.

    Training sequences are corrupted as in pretraining (cells dropped, cells and counts masked:
    the official pipeline keeps the pretraining ``MaskBuilder``), on the sparse input
    (:func:`~scfm_tools.models.cellplm._masking.mask_input`); the loss is the head's
    cross-entropy over the training cells. The optimiser is the official one: AdamW with the
    embedder at a tenth of the learning rate (weight decay 1e-10) and the encoder, latent and
    head at ``lr`` (weight decay ``weight_decay``); their learning rate rises linearly over the
    first ``warmup_epochs`` epochs; a plateau scheduler on the training loss multiplies every
    rate by ``plateau_factor`` after ``plateau_patience`` steps without improvement. The
    pre-latent layer norm is in neither group, as upstream (it keeps its pretrained values).
    Each validation pass logs the macro-F1 of the validation cells (``validation_macro_f1``).

    Parameters
    ----------
    module
        A :class:`~scfm_tools.models.cellplm.CellPLMModule` with an annotation head.
    lr
        Learning rate of the encoder, latent and head (official 5e-3).
    weight_decay
        Their weight decay (official 1e-7).
    embedder_lr_scale
        The embedder's learning rate as a share of ``lr`` (official 0.1).
    embedder_weight_decay
        The embedder's weight decay (official 1e-10).
    warmup_epochs
        Epochs of linear warm-up of ``lr`` (official 30).
    plateau_patience
        Steps without a lower training loss before the rates shrink (official 25).
    plateau_factor
        Their shrink factor (official 0.95).
    mask_node_rate, mask_feature_rate, drop_node_rate, mask_beta
        The input corruption (official 0.75, 0.25, 0.3 and, from the pretrained config, True).
    max_cells
        Most cells kept per training sequence after dropping (official ``max_batch_size``
        70,000).
    random_state
        Seed of the corruption.
    **kwargs
        Passed to :class:`CellPLMTrainingPlan` and on to :class:`scvi.train.TrainingPlan`.
    """

    def __init__(
        self,
        module: CellPLMModule,
        *,
        lr: float = 5e-3,
        weight_decay: float = 1e-7,
        embedder_lr_scale: float = 0.1,
        embedder_weight_decay: float = 1e-10,
        warmup_epochs: int = 30,
        plateau_patience: int = 25,
        plateau_factor: float = 0.95,
        mask_node_rate: float = 0.75,
        mask_feature_rate: float = 0.25,
        drop_node_rate: float = 0.3,
        max_cells: int | None = 70_000,
        mask_beta: bool = True,
        random_state: int = 0,
        **kwargs: Any,
    ) -> None:
        if not module.is_classifier:
            raise ValueError("CellPLMClassifierPlan trains a module with an annotation head.")
        super().__init__(
            module,
            mask_node_rate=mask_node_rate,
            mask_feature_rate=mask_feature_rate,
            drop_node_rate=drop_node_rate,
            max_cells=max_cells,
            mask_beta=mask_beta,
            random_state=random_state,
            lr=lr,
            weight_decay=weight_decay,
            **kwargs,
        )
        self.embedder_lr_scale = float(embedder_lr_scale)
        self.embedder_weight_decay = float(embedder_weight_decay)
        self.warmup_epochs = int(warmup_epochs)
        self.plateau_patience = int(plateau_patience)
        self.plateau_factor = float(plateau_factor)
        self._val_pred: list[torch.Tensor] = []
        self._val_true: list[torch.Tensor] = []

    def configure_optimizers(self):
        """AdamW in the official two groups, the plateau scheduler stepped on each step's loss."""
        module = self.module
        rest = [
            *module.encoder.parameters(),
            *module.latent.parameters(),
            *module.head.parameters(),
        ]
        optimizer = torch.optim.AdamW(
            [
                {
                    "params": list(module.embedder.parameters()),
                    "lr": self.lr * self.embedder_lr_scale,
                    "weight_decay": self.embedder_weight_decay,
                },
                {"params": rest, "lr": self.lr, "weight_decay": self.weight_decay},
            ],
            eps=self.eps,
        )
        plateau = ReduceLROnPlateau(
            optimizer, "min", patience=self.plateau_patience, factor=self.plateau_factor
        )
        schedule = {"scheduler": plateau, "interval": "step", "monitor": "train_loss_step"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    def on_train_epoch_start(self) -> None:
        """Warm the encoder, latent and head's learning rate up (official: first 30 epochs)."""
        super().on_train_epoch_start()
        epoch = training_epoch(self.trainer)
        if epoch < self.warmup_epochs:
            for group in self.optimizers().optimizer.param_groups[1:]:
                group["lr"] = self.lr * (epoch + 1) / self.warmup_epochs

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int):
        """scvi-tools' step, also logging the step's loss for the plateau scheduler."""
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss_step", loss.detach(), on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """scvi-tools' step, also keeping the validation cells' predictions for the F1."""
        _, generative, loss = self.forward(batch, loss_kwargs=self.loss_kwargs)
        self.log("validation_loss", loss.loss, on_epoch=True, sync_dist=self.use_sync_dist)
        keep = batch[LOSS_MASK_KEY].bool()
        self._val_pred.append(generative["logits"].argmax(-1)[keep.to(self.device)].cpu())
        self._val_true.append(batch[LABEL_KEY][keep].cpu())

    def on_validation_epoch_end(self) -> None:
        """Log the macro-F1 over the validation cells (the official early-stopping score)."""
        from sklearn.metrics import f1_score

        super().on_validation_epoch_end()
        if self._val_true:
            truth = torch.cat(self._val_true).numpy()
            pred = torch.cat(self._val_pred).numpy()
            score = float(f1_score(truth, pred, average="macro", zero_division=0.0))
            self.log(VALIDATION_F1, score, on_epoch=True)
        self._val_pred, self._val_true = [], []

    def on_before_batch_transfer(self, batch: dict[str, torch.Tensor], dataloader_idx: int):
        """Corrupt a training sequence's input on the CPU (labels follow the kept cells)."""
        if self.trainer is None or not self.trainer.training:
            return batch
        extra = {LABEL_KEY: batch[LABEL_KEY], LOSS_MASK_KEY: batch[LOSS_MASK_KEY]}
        return mask_input(batch[X_KEY], rng=self._stream(), extra=extra, **self.mask_kwargs)
