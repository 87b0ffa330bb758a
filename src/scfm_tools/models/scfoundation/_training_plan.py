"""Lightning training plan for scFoundation's read-depth-aware (RDA) pretraining.

scvi-tools' data loaders deliver dense count rows: the registered counts (the *target*, total
count ``T``) and, when registered, the downsampled counts made from them by
:func:`scfm_tools.pp.downsample_rda` (the *input*, total count ``S``). In Lightning's
``on_before_batch_transfer`` hook (CPU, before the batch moves to the device) the plan puts
both on the model's genes, normalises them (``log1p`` of counts per 10,000), appends the
``T = log10(target total)`` and ``S = log10(input total)`` tokens to the input, and selects a
share of the input's values (:func:`mask_values`). As the published dataset config
(``replace_prob=0.8``, ``random_token_prob=0.1``), BERT-style, 80% of the selected values are
masked (the encoder does not see them, the decoder gets the mask embedding there), 10% are
replaced by a random expression value and 10% are left as they are (:func:`corrupt_selected`).
The loss (:meth:`SCFoundationModule.loss
<scfm_tools.models.scfoundation.SCFoundationModule.loss>`) is the mean squared error of the
predicted *target* values at all selected positions. The unmasked share matters: inference
(``sft.tl.impute``, ``output_type="gene_expression"``) masks nothing, so every prediction is
made at a position whose value the model reads; a model scored only at masked positions never
learns to predict there.

A module with a classifier head is fine-tuned for cell types instead: each cell is read as the
official ``get_embedding.py`` reads raw counts (``log1p`` of counts per 10,000, ``T`` from
:data:`CLASSIFIER_TARGET_DEPTH`, ``S`` its depth), nothing is masked, and the loss is the
head's cross-entropy against the registered labels.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from scipy import sparse
from scvi.train import TrainingPlan

from ...train import SeededStreamsMixin
from ._module import HIDDEN, LABELS, MASK, TARGET, VALUES, SCFoundationModule
from ._preprocess import GeneReindexer, model_values, sequences

__all__ = [
    "CLASSIFIER_TARGET_DEPTH",
    "RDA_KEY",
    "SCFoundationTrainingPlan",
    "corrupt_selected",
    "mask_values",
    "rda_pairs",
]

logger = logging.getLogger("scfm_tools")

#: Registry key of the downsampled (input) counts.
RDA_KEY = "rda_X"
# Published dataset config: share of non-zero / zero values masked.
VALUE_MASK_PROB = 0.3
ZERO_MASK_PROB = 0.03
# Published dataset config: of the selected values, share masked / replaced by a random value
# (the rest, 0.1, are left unchanged).
REPLACE_PROB = 0.8
RANDOM_TOKEN_PROB = 0.1
#: The ``T`` token of cells read for the classifier: ``get_embedding.py``'s default ``t4``.
CLASSIFIER_TARGET_DEPTH = "t4"


def mask_values(
    values: torch.Tensor,
    n_genes: int,
    *,
    value_mask_prob: float = VALUE_MASK_PROB,
    zero_mask_prob: float = ZERO_MASK_PROB,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick positions to predict: a share of each cell's non-zero and of its zero gene values.

    Per cell, ``round(value_mask_prob * n)`` of its ``n`` non-zero gene values and
    ``round(zero_mask_prob * z)`` of its ``z`` zero gene values are picked uniformly (the
    published ``value_mask_prob=0.3``, ``zero_mask_prob=0.03``); the ``T`` and ``S`` tokens
    are never picked.

    Parameters
    ----------
    values
        ``(batch, n_genes + 2)`` input values.
    n_genes
        Number of gene positions.
    value_mask_prob, zero_mask_prob
        Shares of non-zero and zero values picked.
    generator
        Random generator (CPU), for reproducible masks.

    Returns
    -------
    Boolean ``(batch, n_genes + 2)`` mask.
    """
    for name, p in (("value_mask_prob", value_mask_prob), ("zero_mask_prob", zero_mask_prob)):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"{name} must lie in [0, 1), got {p!r}.")
    genes = values[:, :n_genes]
    mask = torch.zeros_like(values, dtype=torch.bool)
    rand = torch.rand(genes.shape, generator=generator)
    for group, p in ((genes != 0, value_mask_prob), (genes == 0, zero_mask_prob)):
        n_pick = torch.round(group.sum(1, keepdim=True) * p).long()
        score = rand.masked_fill(~group, -1.0)
        order = score.argsort(dim=1, descending=True)
        rank = torch.empty_like(order).scatter_(
            1, order, torch.arange(n_genes).expand_as(order).contiguous()
        )
        mask[:, :n_genes] |= (rank < n_pick) & group
    return mask


def _check_corruption(replace_prob: float, random_token_prob: float) -> None:
    for name, p in (("replace_prob", replace_prob), ("random_token_prob", random_token_prob)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {p!r}.")
    if replace_prob + random_token_prob > 1.0 + 1e-12:
        raise ValueError(
            f"replace_prob + random_token_prob must be at most 1, got {replace_prob!r} + "
            f"{random_token_prob!r}."
        )


def corrupt_selected(
    values: torch.Tensor,
    selected: torch.Tensor,
    n_genes: int,
    *,
    replace_prob: float = REPLACE_PROB,
    random_token_prob: float = RANDOM_TOKEN_PROB,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt the selected values BERT-style: mask most, randomise some, leave the rest.

    Each selected position is, independently, hidden with probability ``replace_prob`` (the
    encoder skips it, the decoder gets the mask embedding), given a random value with
    probability ``random_token_prob``, and left unchanged otherwise; the loss scores all of
    them. The published dataset config has ``replace_prob=0.8`` and ``random_token_prob=0.1``;
    the official pretraining code is not public, so how its random value is drawn is not known:
    here it is a non-zero gene value drawn uniformly from the whole minibatch (the continuous
    counterpart of BERT's random vocabulary token).

    Parameters
    ----------
    values
        ``(batch, n_genes + 2)`` input values.
    selected
        Boolean ``(batch, n_genes + 2)``, the positions to predict (:func:`mask_values`).
    n_genes
        Number of gene positions.
    replace_prob, random_token_prob
        Shares of the selected positions hidden and randomised (their sum at most 1).
    generator
        Random generator (CPU), for reproducible corruption.

    Returns
    -------
    ``(corrupted, hidden)``: the input values with the random replacements, and the boolean
    ``(batch, n_genes + 2)`` positions to hide.
    """
    _check_corruption(replace_prob, random_token_prob)
    u = torch.rand(selected.shape, generator=generator)
    hidden = selected & (u < replace_prob)
    randomised = selected & (u >= replace_prob) & (u < replace_prob + random_token_prob)
    genes = values[:, :n_genes]
    pool = genes[genes > 0]
    corrupted = values
    if pool.numel() and bool(randomised.any()):
        pick = torch.randint(pool.numel(), (int(randomised.sum()),), generator=generator)
        corrupted = values.clone()
        corrupted[randomised] = pool[pick]
    return corrupted, hidden


def _lognorm(x: sparse.csr_matrix) -> tuple[sparse.csr_matrix, np.ndarray]:
    totals = np.asarray(x.sum(axis=1), dtype=np.float64).ravel()
    out = x.copy()
    scale = np.divide(1e4, totals, out=np.zeros_like(totals), where=totals > 0)
    out.data = np.log1p(out.data * np.repeat(scale, np.diff(out.indptr)))
    return out, totals


def rda_pairs(
    target_counts: np.ndarray, input_counts: np.ndarray, reindexer: GeneReindexer
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Model input and target sequences of (downsampled input, original target) count pairs.

    Parameters
    ----------
    target_counts, input_counts
        Cells x registered genes counts (the same cells).
    reindexer
        Puts the registered genes on the model's genes.

    Returns
    -------
    ``(values, target, usable)``: input sequences ``[log1p-normalised input, T, S]``, target
    sequences ``[log1p-normalised target, T, S]`` (float32, ``(cells, n_genes + 2)``), and
    which cells have counts on the model's genes (the others get all zeros).
    """
    target, t_total = _lognorm(reindexer(target_counts))
    source, s_total = _lognorm(reindexer(input_counts))
    usable = (s_total > 0) & (t_total > 0)
    with np.errstate(divide="ignore"):
        t = np.where(usable, np.log10(t_total), 0.0)
        s = np.where(usable, np.log10(s_total), 0.0)
    return sequences(source, t, s), sequences(target, t, s), usable


class SCFoundationTrainingPlan(SeededStreamsMixin, TrainingPlan):
    """scvi-tools :class:`~scvi.train.TrainingPlan` that builds RDA pairs and masks on the fly.

    For a module with a classifier head it builds the cells' input sequences and passes their
    labels instead (no masks); training minibatches of one cell are skipped (the head's
    ``BatchNorm1d`` needs two). Built by
    :meth:`SCFoundation.train <scfm_tools.models.SCFoundation.train>`, which passes the gene
    mapping; users pass the rest through ``plan_kwargs``. Training masks restart each
    epoch from ``random_state``, the epoch and the process rank (DDP ranks draw different masks;
    a resumed run draws those of an uninterrupted one); validation masks restart from the same
    seed every validation epoch, so validation losses are comparable.

    Parameters
    ----------
    module
        The :class:`~scfm_tools.models.scfoundation.SCFoundationModule` to train.
    gene_index
        Model gene position of each registered gene (-1 for genes not in the model).
    value_mask_prob, zero_mask_prob
        Shares of each cell's non-zero and zero values selected for prediction (published 0.3
        and 0.03).
    replace_prob, random_token_prob
        Shares of the selected values masked and replaced by a random value; the rest are left
        unchanged (published 0.8 and 0.1; see :func:`corrupt_selected`). ``replace_prob=1``
        masks every selected value.
    random_state
        Seed of the masks.
    lr
        Learning rate.
    weight_decay
        Weight decay of the optimizer.
    eps
        Adam epsilon (PyTorch's 1e-8; scvi-tools' VAE default 0.01 slows transformers down).
    **kwargs
        Passed to :class:`scvi.train.TrainingPlan` (``optimizer``, ``reduce_lr_on_plateau`` ...).
    """

    def __init__(
        self,
        module: SCFoundationModule,
        *,
        gene_index: np.ndarray,
        value_mask_prob: float = VALUE_MASK_PROB,
        zero_mask_prob: float = ZERO_MASK_PROB,
        replace_prob: float = REPLACE_PROB,
        random_token_prob: float = RANDOM_TOKEN_PROB,
        random_state: int = 0,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        eps: float = 1e-8,
        **kwargs: Any,
    ) -> None:
        super().__init__(module, lr=lr, weight_decay=weight_decay, eps=eps, **kwargs)
        self.reindexer = GeneReindexer(gene_index, module.n_genes)
        self.value_mask_prob = float(value_mask_prob)
        self.zero_mask_prob = float(zero_mask_prob)
        _check_corruption(replace_prob, random_token_prob)
        self.replace_prob = float(replace_prob)
        self.random_token_prob = float(random_token_prob)
        self.random_state = int(random_state)
        self._warned = False

    def _new_streams(self, seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    def _classifier_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        X = batch["X"]
        X = X.to_dense() if X.layout != torch.strided else X
        block = self.reindexer(X.detach().cpu().numpy())
        # The model refuses such cells before training; a custom data module may still hold some.
        keep = np.diff(block.indptr) > 0
        values, t, s = model_values(block[keep], target_depth=CLASSIFIER_TARGET_DEPTH)
        labels = batch[LABELS].reshape(-1)[torch.from_numpy(keep)]
        return {VALUES: sequences(values, t, s), LABELS: labels}

    def on_before_batch_transfer(self, batch: dict[str, torch.Tensor], dataloader_idx: int):
        """Build the RDA input/target pair and the mask, or the classifier's input (CPU)."""
        if VALUES in batch:  # already built (e.g. a custom data module)
            return batch
        if self.module.is_classifier:
            return self._classifier_batch(batch)
        target = batch["X"]
        source = batch.get(RDA_KEY, target)
        rows = [t.to_dense() if t.layout != torch.strided else t for t in (target, source)]
        target_np, source_np = (t.detach().cpu().numpy() for t in rows)
        values, target_seq, usable = rda_pairs(target_np, source_np, self.reindexer)
        generator = self._stream()
        mask = mask_values(
            values,
            self.module.n_genes,
            value_mask_prob=self.value_mask_prob,
            zero_mask_prob=self.zero_mask_prob,
            generator=generator,
        )
        values, hidden = corrupt_selected(
            values,
            mask,
            self.module.n_genes,
            replace_prob=self.replace_prob,
            random_token_prob=self.random_token_prob,
            generator=generator,
        )
        keep = torch.from_numpy(usable)
        if not bool(keep.all()) and not self._warned:
            self._warned = True
            logger.warning(
                "some cells have no counts on the model's genes; they are left out of training."
            )
        return {
            VALUES: values[keep],
            TARGET: target_seq[keep],
            MASK: mask[keep],
            HIDDEN: hidden[keep],
        }

    def _has_targets(self, batch: dict[str, torch.Tensor]) -> bool:
        if self.module.is_classifier:
            return batch[VALUES].shape[0] > 0
        return batch[VALUES].shape[0] > 0 and bool(batch[MASK].any())

    def training_step(self, batch, batch_idx):
        """Run a training step; a minibatch with nothing to predict is skipped."""
        if not self._has_targets(batch):
            return None
        if self.module.is_classifier and batch[VALUES].shape[0] < 2:
            return None
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        """Run a validation step; a minibatch with nothing to predict is skipped."""
        if not self._has_targets(batch):
            return None
        return super().validation_step(batch, batch_idx)
