"""Lightning training plan for scGPT pretraining and fine-tuning on AnnData minibatches.

scvi-tools' data loaders deliver dense expression rows (``tensors["X"]``, one column per
registered gene). The plan turns them into scGPT token sequences in Lightning's
``on_before_batch_transfer`` hook, which runs on the CPU in the main process of each rank before
the batch moves to the device: per cell the expressed genes found in the vocabulary, ``<cls>``
first, per-cell quantile bins, random subsampling to ``max_seq_len``, padding
(:class:`~scfm_tools.models.scgpt.CellTokenizer`, :func:`~scfm_tools.models.scgpt.pad_cells`),
then a random ``mask_ratio`` of each cell's gene values replaced by ``mask_value``
(:func:`~scfm_tools.models.scgpt.mask_values`). The loss is
:meth:`SCGPTModule.loss <scfm_tools.models.scgpt.SCGPTModule.loss>`: masked gene-expression
prediction plus MVC, as in the official ``pretrain.py``. A classifier module (two or more
classes) is fine-tuned as in the official annotation tutorial: the cells are tokenized without
masking, with their registered cell types as ``labels``, and scored by cross-entropy.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import numpy as np
import torch
from scvi import REGISTRY_KEYS
from scvi.module.base import LossOutput
from scvi.train import TrainingPlan

from ...train import SeededStreamsMixin, derive_seed
from ._module import (
    BATCH_LABELS,
    GENE_IDS,
    LABELS,
    PADDING_MASK,
    TARGET_VALUES,
    VALUES,
    SCGPTModule,
    mask_values,
)
from ._tokenizer import OFFICIAL_N_BINS, CellTokenizer, pad_cells

__all__ = ["SCGPTTrainingPlan", "TokenizeCells", "tokenize_block", "tokenize_minibatch"]

logger = logging.getLogger("scfm_tools")

LrSchedule = Literal["constant", "cosine", "step"]
# Official pretrain.py default (its "pcpt" task; the generative task is not implemented here).
DEFAULT_MASK_RATIO = 0.4


def tokenize_block(
    block,
    tokenizer: CellTokenizer,
    *,
    pad_id: int,
    pad_value: float,
    mask_value: float,
    mask_ratio: float,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Tokenize, pad and mask a block of expression rows (dense or sparse, numpy/scipy).

    Parameters
    ----------
    block
        Cells x genes, columns as ``tokenizer`` expects them.
    tokenizer
        Tokenizer over those columns (see :class:`CellTokenizer` for its random draws).
    pad_id
        Id of ``<pad>``.
    pad_value
        Value at ``<cls>`` and padding.
    mask_value
        Value written at masked positions.
    mask_ratio
        Fraction of each cell's gene positions to mask.
    generator
        Random stream of the masks.

    Returns
    -------
    ``gene_ids``, ``values`` (masked), ``padding_mask`` and ``target_values`` (unmasked bins).
    """
    out = pad_cells(tokenizer(block), pad_id=pad_id, pad_value=pad_value)
    target = out["values"]
    out[VALUES] = mask_values(
        target,
        mask_ratio=mask_ratio,
        mask_value=mask_value,
        pad_value=pad_value,
        generator=generator,
    )
    out[TARGET_VALUES] = target
    return out


def tokenize_minibatch(
    tensors: dict[str, torch.Tensor],
    tokenizer: CellTokenizer,
    *,
    pad_id: int,
    pad_value: float,
    mask_value: float,
    mask_ratio: float,
    generator: torch.Generator,
    use_batch_labels: bool = False,
    labels: bool = False,
) -> dict[str, torch.Tensor]:
    """Turn an scvi-tools minibatch of expression rows into a masked scGPT minibatch.

    Parameters
    ----------
    tensors
        scvi-tools minibatch: ``X`` (cells x registered genes, dense or sparse), with
        ``use_batch_labels`` ``batch`` (``(cells, 1)`` batch codes), with ``labels`` ``labels``
        (``(cells, 1)`` cell-type codes).
    tokenizer
        Tokenizer over the registered genes (see :class:`CellTokenizer` for its random draws).
    pad_id
        Id of ``<pad>``.
    pad_value
        Value at ``<cls>`` and padding.
    mask_value
        Value written at masked positions.
    mask_ratio
        Fraction of each cell's gene positions to mask.
    generator
        Random stream of the masks.
    use_batch_labels
        Add ``batch_labels`` (long, ``(cells,)``) from ``tensors["batch"]``.
    labels
        For a classifier: no masking (``mask_value``, ``mask_ratio`` and ``generator`` are not
        used) and ``labels`` (long, ``(cells,)``) from ``tensors["labels"]``.

    Returns
    -------
    ``gene_ids``, ``values`` (masked), ``padding_mask``, ``target_values`` (unmasked bins) and,
    with ``use_batch_labels``, ``batch_labels``; with ``labels``: ``gene_ids``, ``values``
    (unmasked), ``padding_mask`` and ``labels``. All on the CPU.
    """
    X = tensors[REGISTRY_KEYS.X_KEY]
    if X.layout != torch.strided:
        X = X.to_dense()
    X = X.detach().cpu().numpy()
    if labels:
        out = pad_cells(tokenizer(X), pad_id=pad_id, pad_value=pad_value)
        out[LABELS] = tensors[REGISTRY_KEYS.LABELS_KEY].reshape(-1).long()
    else:
        out = tokenize_block(
            X,
            tokenizer,
            pad_id=pad_id,
            pad_value=pad_value,
            mask_value=mask_value,
            mask_ratio=mask_ratio,
            generator=generator,
        )
    if use_batch_labels:
        out[BATCH_LABELS] = tensors[REGISTRY_KEYS.BATCH_KEY].reshape(-1).long()
    return out


class TokenizeCells:
    """Worker-side tokenizer for :class:`~scfm_tools.dataloaders.MultiFileDataModule`.

    Called on each minibatch in the data-loader workers with rows whose columns are vocabulary
    ids (the data module puts every file's genes there); does what the training plan's hook
    does for AnnData minibatches (tokenize, pad, mask), seeded by the minibatch's own seed.
    Picklable, so that it travels to worker processes.

    Parameters
    ----------
    n_columns
        Width of the vocabulary-id space.
    special_ids
        Ids that are not genes (never tokens from the data).
    cls_id, pad_id
        Ids of ``<cls>`` and ``<pad>``.
    pad_value, mask_value
        Values at ``<cls>``/padding and at masked positions.
    max_seq_len
        Longest token sequence (``<cls>`` included).
    n_bins
        Number of value bins.
    mask_ratio
        Fraction of each cell's gene values masked.
    """

    def __init__(
        self,
        n_columns: int,
        *,
        special_ids: list[int],
        cls_id: int,
        pad_id: int,
        pad_value: float,
        mask_value: float,
        max_seq_len: int,
        n_bins: int,
        mask_ratio: float,
    ) -> None:
        index = np.arange(n_columns, dtype=np.int64)
        index[np.asarray(special_ids, dtype=np.int64)] = -1
        self.gene_index = index
        self.cls_id, self.pad_id = int(cls_id), int(pad_id)
        self.pad_value, self.mask_value = float(pad_value), float(mask_value)
        self.max_seq_len, self.n_bins = int(max_seq_len), int(n_bins)
        self.mask_ratio = float(mask_ratio)

    def __call__(self, X, seed: int) -> dict[str, torch.Tensor]:
        """Tokenize and mask ``X`` (cells x vocabulary ids), with randomness from ``seed``."""
        tokenizer = CellTokenizer(
            self.gene_index,
            cls_id=self.cls_id,
            pad_value=self.pad_value,
            max_length=self.max_seq_len,
            n_bins=self.n_bins,
            random_state=seed,
        )
        return tokenize_block(
            X,
            tokenizer,
            pad_id=self.pad_id,
            pad_value=self.pad_value,
            mask_value=self.mask_value,
            mask_ratio=self.mask_ratio,
            generator=torch.Generator().manual_seed(derive_seed(seed, 1)),
        )


class SCGPTTrainingPlan(SeededStreamsMixin, TrainingPlan):
    """scvi-tools :class:`~scvi.train.TrainingPlan` that tokenizes and masks cells on the fly.

    Built by :meth:`SCGPT.train <scfm_tools.models.SCGPT.train>`, which fills in the tokenizer
    settings (``gene_index``, ``cls_id``, ``pad_id``, ``max_seq_len``, ``n_bins``) from the
    model; users pass the rest through ``plan_kwargs``.

    A classifier module (:attr:`SCGPTModule.is_classifier
    <scfm_tools.models.scgpt.SCGPTModule.is_classifier>`) is trained on unmasked cells and their
    registered cell types (cross-entropy), as the official annotation tutorial.

    Training masks are random, restarted each epoch from ``random_state``, the epoch and the
    process rank (DDP ranks draw different masks; a resumed run draws the masks of an
    uninterrupted one). Validation masks restart from the same seed every validation epoch, so
    validation losses of different epochs are comparable.

    Parameters
    ----------
    module
        The :class:`~scfm_tools.models.scgpt.SCGPTModule` to train.
    gene_index
        Vocabulary id of each registered gene (-1 for genes outside the vocabulary).
    cls_id
        Id of ``<cls>``.
    pad_id
        Id of ``<pad>``.
    max_seq_len
        Longest token sequence (``<cls>`` included); longer cells are subsampled at random.
    n_bins
        Number of value bins (zero bin included).
    mask_ratio
        Fraction of each cell's gene values to mask (official default 0.4; a classifier masks
        nothing).
    random_state
        Seed of the binning tie-breaks, the subsampling and the masks.
    lr
        Learning rate.
    weight_decay
        Weight decay of the optimizer.
    eps
        Adam epsilon (the official scripts use 1e-8; scvi-tools' VAE default 0.01 slows
        transformers down).
    lr_schedule
        ``"constant"``; ``"cosine"``: linear warm-up over ``warmup_ratio`` of the steps, then
        cosine decay to zero, as the official ``pretrain.py``; or ``"step"``: the learning rate
        times ``lr_gamma`` after every epoch, as the official fine-tuning tutorials
        (``StepLR(optimizer, 1, gamma=schedule_ratio)``). Ignored with
        ``reduce_lr_on_plateau=True``.
    warmup_ratio
        Fraction of the training steps used for warm-up with ``lr_schedule="cosine"``.
    lr_gamma
        Factor applied to the learning rate after each epoch with ``lr_schedule="step"``
        (the annotation tutorial's ``schedule_ratio``, 0.9).
    length_buckets
        Run a minibatch whose cells differ a lot in length as a few sub-batches of similar
        length (each padded only to its own longest cell; a new sub-batch starts where the
        length halves). The loss is the same as for the whole minibatch (masked errors summed,
        divided by all masked positions; the classifier's weighted cross-entropies summed,
        divided by all cells' weights); only the padding work is saved.
    **kwargs
        Passed to :class:`scvi.train.TrainingPlan` (``optimizer``, ``reduce_lr_on_plateau`` ...).
    """

    def __init__(
        self,
        module: SCGPTModule,
        *,
        gene_index: np.ndarray,
        cls_id: int,
        pad_id: int,
        max_seq_len: int,
        n_bins: int = OFFICIAL_N_BINS,
        mask_ratio: float = DEFAULT_MASK_RATIO,
        random_state: int = 0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        eps: float = 1e-8,
        lr_schedule: LrSchedule = "constant",
        warmup_ratio: float = 0.1,
        lr_gamma: float = 0.9,
        length_buckets: bool = True,
        **kwargs: Any,
    ) -> None:
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must lie in (0, 1), got {mask_ratio!r}.")
        if lr_schedule not in ("constant", "cosine", "step"):
            raise ValueError(
                f"lr_schedule must be 'constant', 'cosine' or 'step', got {lr_schedule!r}."
            )
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must lie in [0, 1), got {warmup_ratio!r}.")
        if not 0.0 < lr_gamma <= 1.0:
            raise ValueError(f"lr_gamma must lie in (0, 1], got {lr_gamma!r}.")
        super().__init__(module, lr=lr, weight_decay=weight_decay, eps=eps, **kwargs)
        self.gene_index = np.asarray(gene_index, dtype=np.int64)
        self.cls_id = int(cls_id)
        self.pad_id = int(pad_id)
        self.max_seq_len = int(max_seq_len)
        self.n_bins = int(n_bins)
        self.mask_ratio = float(mask_ratio)
        self.random_state = int(random_state)
        self.lr_schedule = lr_schedule
        self.warmup_ratio = float(warmup_ratio)
        self.lr_gamma = float(lr_gamma)
        self.length_buckets = bool(length_buckets)
        self._warned_empty = False

    # tokenization ------------------------------------------------------------------------------
    def _new_streams(self, seed: int) -> tuple[CellTokenizer, torch.Generator]:
        tokenizer = CellTokenizer(
            self.gene_index,
            cls_id=self.cls_id,
            pad_value=self.module.pad_value,
            max_length=self.max_seq_len,
            n_bins=self.n_bins,
            random_state=seed,
        )
        return tokenizer, torch.Generator().manual_seed(seed)

    def on_before_batch_transfer(self, batch: dict[str, torch.Tensor], dataloader_idx: int):
        """Tokenize, pad and mask the expression rows (CPU, main process, before transfer)."""
        if GENE_IDS in batch:  # already tokenized (e.g. a custom data module)
            return batch
        tokenizer, generator = self._stream()
        return tokenize_minibatch(
            batch,
            tokenizer,
            pad_id=self.pad_id,
            pad_value=self.module.pad_value,
            mask_value=self.module.mask_value,
            mask_ratio=self.mask_ratio,
            generator=generator,
            use_batch_labels=self.module.use_batch_labels,
            labels=self.module.is_classifier,
        )

    # forward with length buckets ---------------------------------------------------------------
    @staticmethod
    def _buckets(lengths: torch.Tensor) -> list[torch.Tensor]:
        order = torch.argsort(lengths, descending=True)
        buckets, start = [], 0
        sorted_lengths = lengths[order].tolist()
        for i in range(1, len(sorted_lengths) + 1):
            if i == len(sorted_lengths) or 2 * sorted_lengths[i] < sorted_lengths[start]:
                buckets.append(order[start:i])
                start = i
        return buckets

    def forward(self, *args, **kwargs):
        """Run the module on a tokenized minibatch, by length buckets (see ``length_buckets``)."""
        tensors = args[0] if args else kwargs.get("tensors")
        if not (self.length_buckets and isinstance(tensors, dict) and PADDING_MASK in tensors):
            return super().forward(*args, **kwargs)
        lengths = (~tensors[PADDING_MASK]).sum(1)
        buckets = self._buckets(lengths)
        if len(buckets) == 1:
            return super().forward(*args, **kwargs)
        rest = {k: v for k, v in kwargs.items() if k != "tensors"}
        shares = self.module.loss_weights(tensors)
        total = shares.sum().clamp_min(1e-12)
        loss, extra, per_cell = 0.0, {}, {}
        for rows in buckets:
            width = int(lengths[rows].max())
            sub = {k: v[rows][:, :width] if v.dim() == 2 else v[rows] for k, v in tensors.items()}
            _, _, out = super().forward(sub, *args[1:], **rest)
            # Each term is a mean over the bucket's masked positions (classifier: its cells'
            # weights); weighting by their share gives the mean over the whole minibatch's.
            weight = shares[rows].sum() / total
            loss = loss + out.loss * weight
            for key, value in out.extra_metrics.items():
                extra[key] = extra.get(key, 0.0) + value * weight
            for key, value in out.reconstruction_loss.items():
                per_cell.setdefault(key, []).append(value)
        output = LossOutput(
            loss=loss,
            reconstruction_loss={k: torch.cat(v) for k, v in per_cell.items()},
            n_obs_minibatch=int(lengths.numel()),
            extra_metrics=extra,
        )
        return None, None, output

    def compute_and_log_metrics(self, loss_output: LossOutput, metrics, mode: str) -> None:
        """Log scvi-tools' metrics, and the GEP/MVC terms outside inference mode.

        scvi-tools logs extra metrics inside :func:`torch.inference_mode`; under DDP, Lightning
        later averages the logged states across processes in place, which an inference-mode
        tensor refuses. The terms are logged here under :func:`torch.no_grad` instead.
        """
        extra = dict(loss_output.extra_metrics)
        loss_output.extra_metrics = {}
        try:
            super().compute_and_log_metrics(loss_output, metrics, mode)
        finally:
            loss_output.extra_metrics = extra
        with torch.no_grad():
            for key, value in extra.items():
                self.log(
                    f"{key}_{mode}",
                    value.detach(),
                    on_step=self.on_step,
                    on_epoch=self.on_epoch,
                    batch_size=loss_output.n_obs_minibatch,
                    sync_dist=self.use_sync_dist,
                )

    def _has_masked(self, batch: dict[str, torch.Tensor]) -> bool:
        if self.module.is_classifier or batch[VALUES].eq(self.module.mask_value).any():
            return True
        if not self._warned_empty:
            self._warned_empty = True
            logger.warning(
                "a minibatch had no position to mask (its cells express fewer than %d "
                "vocabulary genes each); it was skipped.",
                math.ceil(1 / self.mask_ratio),
            )
        return False

    def training_step(self, batch, batch_idx):
        """Run a training step; a minibatch with nothing masked is skipped (returns ``None``)."""
        if not self._has_masked(batch):
            return None
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        """Run a validation step; a minibatch with nothing masked is skipped."""
        if not self._has_masked(batch):
            return None
        return super().validation_step(batch, batch_idx)

    # optimizer ---------------------------------------------------------------------------------
    def configure_optimizers(self):
        """Optimizer of :class:`~scvi.train.TrainingPlan`, plus the optional schedule."""
        config = super().configure_optimizers()
        if self.lr_schedule == "constant" or self.reduce_lr_on_plateau:
            return config
        if self.lr_schedule == "step":
            step = torch.optim.lr_scheduler.StepLR(config["optimizer"], 1, gamma=self.lr_gamma)
            config["lr_scheduler"] = {"scheduler": step, "interval": "epoch"}
            return config
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = int(total * self.warmup_ratio)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(total - warmup, 1)
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(config["optimizer"], factor)
        config["lr_scheduler"] = {"scheduler": scheduler, "interval": "step"}
        return config
