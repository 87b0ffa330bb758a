"""Lightning training plan for scBERT pretraining (masked bins) and fine-tuning (cell types).

scvi-tools' data loaders deliver dense count rows (``tensors["X"]``, one column per registered
gene). The plan turns them into scBERT token sequences in Lightning's
``on_before_batch_transfer`` hook (CPU, main process of each rank, before the batch moves to
the device): the official tokenization (:class:`~scfm_tools.models.scbert.SCBERTTokenizer`),
then, for the pretraining head, the official masking (:func:`~scfm_tools.models.scbert.mask_tokens`:
15% of the non-zero bins picked, 90% of those replaced by ``[MASK]``). The loss is
:meth:`SCBERTModule.loss <scfm_tools.models.scbert.SCBERTModule.loss>`.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from scvi import REGISTRY_KEYS
from scvi.train import TrainingPlan

from ...train import SeededStreamsMixin
from ._module import LABELS, MASK_PROB, MLM_LABELS, REPLACE_PROB, TOKENS, SCBERTModule, mask_tokens
from ._tokenizer import SCBERTTokenizer

__all__ = ["SCBERTTrainingPlan"]

logger = logging.getLogger("scfm_tools")


class SCBERTTrainingPlan(SeededStreamsMixin, TrainingPlan):
    """scvi-tools :class:`~scvi.train.TrainingPlan` that tokenizes (and masks) cells on the fly.

    Built by :meth:`SCBERT.train <scfm_tools.models.SCBERT.train>`, which passes the gene
    mapping; users pass the rest through ``plan_kwargs``. Training masks restart each epoch from
    ``random_state``, the epoch and the process rank (DDP ranks draw different masks; a resumed
    run draws those of an uninterrupted one); validation masks restart from the same seed every
    validation epoch, so validation losses are comparable.

    Parameters
    ----------
    module
        The :class:`~scfm_tools.models.scbert.SCBERTModule` to train.
    gene_index
        Model gene position of each registered gene (-1 for genes not in the model).
    mask_prob
        Fraction of each cell's non-zero bins picked for prediction (official 0.15).
    replace_prob
        Probability that a picked bin is replaced by ``[MASK]`` (official 0.9).
    random_state
        Seed of the masks.
    lr
        Learning rate (official 1e-4).
    weight_decay
        Weight decay of the optimizer.
    eps
        Adam epsilon.
    **kwargs
        Passed to :class:`scvi.train.TrainingPlan` (``optimizer``, ``reduce_lr_on_plateau`` ...).
    """

    def __init__(
        self,
        module: SCBERTModule,
        *,
        gene_index: np.ndarray,
        mask_prob: float = MASK_PROB,
        replace_prob: float = REPLACE_PROB,
        random_state: int = 0,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        eps: float = 1e-8,
        **kwargs: Any,
    ) -> None:
        if not 0.0 < mask_prob < 1.0:
            raise ValueError(f"mask_prob must lie in (0, 1), got {mask_prob!r}.")
        if not 0.0 <= replace_prob <= 1.0:
            raise ValueError(f"replace_prob must lie in [0, 1], got {replace_prob!r}.")
        super().__init__(module, lr=lr, weight_decay=weight_decay, eps=eps, **kwargs)
        self.tokenizer = SCBERTTokenizer(gene_index, module.n_genes, bin_num=module.num_tokens - 2)
        self.mask_prob = float(mask_prob)
        self.replace_prob = float(replace_prob)
        self.random_state = int(random_state)
        self._warned_empty = False

    def _new_streams(self, seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    def on_before_batch_transfer(self, batch: dict[str, torch.Tensor], dataloader_idx: int):
        """Tokenize (and mask) the count rows (CPU, main process, before transfer)."""
        if TOKENS in batch:  # already tokenized (e.g. a custom data module)
            return batch
        X = batch[REGISTRY_KEYS.X_KEY]
        if X.layout != torch.strided:
            X = X.to_dense()
        tokens = self.tokenizer(X.detach().cpu().numpy())
        if self.module.is_classifier:
            return {TOKENS: tokens, LABELS: batch[REGISTRY_KEYS.LABELS_KEY]}
        masked, labels = mask_tokens(
            tokens,
            mask_token_id=self.module.mask_token_id,
            mask_prob=self.mask_prob,
            replace_prob=self.replace_prob,
            generator=self._stream(),
        )
        return {TOKENS: masked, MLM_LABELS: labels}

    def _has_targets(self, batch: dict[str, torch.Tensor]) -> bool:
        if self.module.is_classifier or batch[MLM_LABELS].ne(self.module.mask_token_id).any():
            return True
        if not self._warned_empty:
            self._warned_empty = True
            logger.warning(
                "a minibatch had no non-zero bin to mask (its cells express none of the model's "
                "genes above the first bin); it was skipped."
            )
        return False

    def training_step(self, batch, batch_idx):
        """Run a training step; a minibatch with nothing to predict is skipped."""
        if not self._has_targets(batch):
            return None
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        """Run a validation step; a minibatch with nothing to predict is skipped."""
        if not self._has_targets(batch):
            return None
        return super().validation_step(batch, batch_idx)
