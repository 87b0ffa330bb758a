"""scGPT fine-tuned for batch integration, as the official integration example and tutorial.

The official recipe (``examples/finetune_integration.py``, ``tutorials/Tutorial_Integration
.ipynb`` of bowang-lab/scGPT): keep the genes of the pretrained vocabulary, take the 1,200 most
variable, read every one of them for every cell (zeros included: ``include_zero_gene=True``,
sequences of 1,201 tokens with ``<cls>``), values binned per cell into 51 quantile bins; train
from the pretrained weights (tensors whose shape changed, such as the decoders' first layers
once the batch embedding is concatenated to their input, start fresh, as the official
``load_pretrained``) with masked expression prediction (GEP, 40% masked, explicit zero
probabilities), the cell-embedding-based prediction (GEPC/MVC), elastic cell similarity (ECS,
threshold 0.8, weight 10), the adversarial batch classifier (DAR, weight 1), domain-specific
batch norm (DSBN) and the batch embedding in the decoders; Adam at ``lr=1e-4``, decayed by 0.9
after every epoch, minibatches of 64 cells, 15 epochs (the tutorial; the example script runs 30).
The integrated embedding is the L2-normalised ``<cls>`` output, each cell with its batch's norm.

:class:`SCGPTIntegration` is that model; its module is
:class:`~scfm_tools.models.scgpt.SCGPTIntegrationModule` and its plan
:class:`SCGPTIntegrationPlan`, which tokenizes every registered gene of each cell.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from scipy import sparse
from scvi import REGISTRY_KEYS

from ..._anndata import DEFAULT_CHUNK_SIZE, get_matrix, iter_row_blocks, resolve_seed
from ..._lognorm import log1p_per_10k
from ..._validation import InputError
from ...pp._binning import _scgpt_chunk
from ...train import seeded_torch
from .._load_report import load_matching
from ._integration_module import SCGPTIntegrationModule
from ._model import SCGPT
from ._module import BATCH_LABELS, GENE_IDS, PADDING_MASK, TARGET_VALUES, VALUES, mask_values
from ._training_plan import SCGPTTrainingPlan

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["SCGPTIntegration", "SCGPTIntegrationPlan", "tokenize_all_genes"]

logger = logging.getLogger("scfm_tools")

# The official integration settings (example script and tutorial).
OFFICIAL_N_HVG = 1200
OFFICIAL_LR = 1e-4
OFFICIAL_D_MODEL = 512
OFFICIAL_EPOCHS = 15
OFFICIAL_GAMMA = 0.9
OFFICIAL_BATCH_SIZE = 64
OFFICIAL_DROPOUT = 0.2
#: The recipes of :meth:`SCGPTIntegration.fine_tune`: module options of each.
METHODS: dict[str, dict[str, Any]] = {
    # GEP + GEPC + ECS + DAR + DSBN, batch embedding in the decoders, explicit zero probabilities
    "official": {
        "dsbn": True,
        "dab_weight": 1.0,
        "ecs_threshold": 0.8,
        "use_batch_labels": True,
        "explicit_zero_prob": True,
    },
    # GEP + GEPC with the batch embedding in the decoders, nothing else
    "batch_decoder": {
        "dsbn": False,
        "dab_weight": 0.0,
        "ecs_threshold": 0.0,
        "use_batch_labels": True,
        "explicit_zero_prob": True,
    },
}
DEFAULT_METHOD = "official"
# The official run makes ~2,500 optimisation steps (15 epochs of PBMC 10K's 10,791 training
# cells, 64 a minibatch); 15 epochs of a few hundred cells are a few dozen, too few for the
# adversary (CellPLM's integration needs ~800 on CellBench). At least MIN_STEPS are made.
MIN_STEPS = 800


def variable_genes(
    adata: AnnData, layer: str | None, columns: np.ndarray, n_top: int, batch_key: str
) -> np.ndarray:
    """Return the ``n_top`` most variable of ``columns`` (positions in ``var``), in order.

    scanpy's ``highly_variable_genes(flavor="seurat", batch_key=...)`` on counts per 10,000
    then ``log1p`` (the official integration selects 1,200 genes per batch-aware ranking too,
    with ``seurat_v3``, which needs the optional scikit-misc).
    """
    import anndata as ad
    from scanpy.pp import highly_variable_genes

    if columns.size <= n_top:
        return columns
    lognorm = ad.AnnData(
        log1p_per_10k(get_matrix(adata, layer), columns, dtype=np.float32),
        obs=pd.DataFrame({batch_key: adata.obs[batch_key].astype(str).to_numpy()}),
    )
    table = highly_variable_genes(
        lognorm, n_top_genes=n_top, flavor="seurat", batch_key=batch_key, inplace=False
    )
    return columns[np.asarray(table["highly_variable"], dtype=bool)]


def tokenize_all_genes(
    block,
    gene_ids: np.ndarray,
    *,
    cls_id: int,
    pad_value: float,
    n_bins: int,
    random_state: int,
) -> dict[str, torch.Tensor]:
    """Tokenize every gene of each cell, zeros included (official ``include_zero_gene=True``).

    Parameters
    ----------
    block
        Cells x genes values (dense or sparse); column ``j`` is the gene of ``gene_ids[j]``.
    gene_ids
        Vocabulary id of each column.
    cls_id
        Id of ``<cls>``, prepended with value ``pad_value``.
    pad_value
        Value at ``<cls>``.
    n_bins
        Number of value bins (zero bin included): each cell's non-zero values are binned by
        its own quantiles, zeros stay 0 (:func:`scfm_tools.pp.bin_values`).
    random_state
        Seed of the tie-breaking draws; each cell draws from its own stream, so its tokens do
        not depend on the other cells.

    Returns
    -------
    ``gene_ids`` (long), ``values`` (float32) and ``padding_mask`` (all ``False``), each
    ``(n_cells, n_genes + 1)``.
    """
    csr = sparse.csr_matrix(block, dtype=np.float32)
    csr.sum_duplicates()
    csr.eliminate_zeros()
    binned, _ = _scgpt_chunk(csr, n_bins, random_state, None)
    n = csr.shape[0]
    values = np.full((n, csr.shape[1] + 1), 0.0, dtype=np.float32)
    values[:, 0] = pad_value
    values[:, 1:] = binned.toarray()
    ids = np.concatenate([[cls_id], np.asarray(gene_ids, dtype=np.int64)])
    gene_tensor = torch.from_numpy(np.broadcast_to(ids, values.shape).copy())
    return {
        GENE_IDS: gene_tensor,
        VALUES: torch.from_numpy(values),
        PADDING_MASK: torch.zeros(values.shape, dtype=torch.bool),
    }


class SCGPTIntegrationPlan(SCGPTTrainingPlan):
    """The scGPT training plan reading every registered gene of a cell, with its batch.

    Each minibatch's expression rows become sequences of all registered genes, zeros
    included (:func:`tokenize_all_genes`), of which ``mask_ratio`` of the positions are masked
    (zeros too, as the official ``random_mask_value``); the registered batch codes go along as
    ``batch_labels``. Parameters as :class:`~scfm_tools.models.scgpt.SCGPTTrainingPlan`
    (``max_seq_len`` and subsampling do not apply: every gene is read).
    """

    def on_before_batch_transfer(self, batch: dict[str, torch.Tensor], dataloader_idx: int):
        """Tokenize all genes, mask, attach the batch codes (CPU, before transfer)."""
        if GENE_IDS in batch:
            return batch
        _, generator = self._stream()
        X = batch[REGISTRY_KEYS.X_KEY]
        X = (X.to_dense() if X.layout != torch.strided else X).detach().cpu().numpy()
        genes = np.flatnonzero(self.gene_index >= 0)
        out = tokenize_all_genes(
            X[:, genes],
            self.gene_index[genes],
            cls_id=self.cls_id,
            pad_value=self.module.pad_value,
            n_bins=self.n_bins,
            random_state=self.random_state,
        )
        out[TARGET_VALUES] = out[VALUES]
        out[VALUES] = mask_values(
            out[TARGET_VALUES],
            mask_ratio=self.mask_ratio,
            mask_value=self.module.mask_value,
            pad_value=self.module.pad_value,
            generator=generator,
        )
        out[BATCH_LABELS] = batch[REGISTRY_KEYS.BATCH_KEY].reshape(-1).long()
        return out


class SCGPTIntegration(SCGPT):
    """scGPT fine-tuned on a dataset's own cells to integrate its batches.

    Built from a pretrained :class:`~scfm_tools.models.SCGPT` with :meth:`from_model` on an
    AnnData registered with :meth:`setup_anndata` (the genes to read, typically the most
    variable ones, and the batch of each cell); trained with :meth:`train
    <scfm_tools.models.SCGPT.train>` (the integration objectives of
    :class:`~scfm_tools.models.scgpt.SCGPTIntegrationModule`); embedded with
    :meth:`get_latent_representation`. ``sft.tl.integrate`` does all three.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`: every one of its genes is read.
    **kwargs
        Passed to :class:`~scfm_tools.models.SCGPT` (architecture, vocabulary) and on to
        :class:`~scfm_tools.models.scgpt.SCGPTIntegrationModule` (``dsbn``, ``dab_weight``,
        ``ecs_threshold``, ``ecs_weight``, ``explicit_zero_prob``, ``use_batch_labels`` ...).
    """

    _module_cls = SCGPTIntegrationModule
    _training_plan_cls = SCGPTIntegrationPlan

    def __init__(self, adata: AnnData, **kwargs: Any) -> None:
        manager = self._get_most_recent_anndata_manager(adata, required=True)
        if manager.registry["setup_args"].get("batch_key") is None:
            raise ValueError(
                "SCGPTIntegration needs the batch of each cell: call "
                "SCGPTIntegration.setup_anndata(adata, batch_key=...) first."
            )
        kwargs.setdefault("n_domains", manager.summary_stats.n_batch)
        kwargs.setdefault("max_seq_len", adata.n_vars + 1)
        super().__init__(adata, **kwargs)
        self.batch_categories_ = list(
            manager.get_state_registry(REGISTRY_KEYS.BATCH_KEY).categorical_mapping
        )
        # What scvi-tools' save/load rebuilds the model from: this constructor's arguments.
        self.init_params_ = self._get_init_params(locals())

    @classmethod
    def from_model(
        cls,
        pretrained: SCGPT,
        adata: AnnData,
        *,
        dropout: float = OFFICIAL_DROPOUT,
        **kwargs: Any,
    ) -> SCGPTIntegration:
        """Build an integration model on ``adata`` from a pretrained model's weights.

        Every tensor of the pretrained module whose name and shape the new module shares is
        copied (the official ``load_pretrained``); the others (DSBN, discriminator, zero
        probability heads, decoders whose input grew by the batch embedding) start fresh, as
        ``load_report_`` lists (logged at INFO).

        Parameters
        ----------
        pretrained
            A pretrained scGPT (``SCGPT.from_pretrained(...)``), not changed.
        adata
            AnnData registered with :meth:`setup_anndata`.
        dropout
            Dropout for fine-tuning (official 0.2).
        **kwargs
            Integration options, passed to :class:`~scfm_tools.models.scgpt.
            SCGPTIntegrationModule` (``dsbn``, ``dab_weight``, ``ecs_threshold``,
            ``ecs_weight``, ``explicit_zero_prob``, ``use_batch_labels``, ``do_mvc``).

        Returns
        -------
        The model, untrained; ``pretrained_`` is the pretrained model's.
        """
        cfg = pretrained.module.config
        model = cls._build(
            adata,
            vocab=pretrained.vocab,
            d_model=cfg["d_model"],
            n_heads=cfg["n_heads"],
            d_hid=cfg["d_hid"],
            n_layers=cfg["n_layers"],
            n_bins=pretrained.n_bins,
            dropout=dropout,
            pad_token=pretrained.args.get("pad_token", "<pad>"),
            n_layers_cls=cfg["n_layers_cls"],
            pad_value=cfg["pad_value"],
            mask_value=cfg["mask_value"],
            norm_first=cfg["norm_first"],
            max_value=cfg["max_value"],
            **kwargs,
        )
        report = load_matching(
            model.module,
            pretrained.module.state_dict(),
            source=pretrained.model_name,
            family="scGPT integration",
            level=logging.INFO,
        )
        model.pretrained_ = dict(getattr(pretrained, "pretrained_", {}) or {})
        model.load_report_ = report
        return model

    @classmethod
    def fine_tune(
        cls,
        pretrained: SCGPT,
        adata: AnnData,
        batch_key: str,
        *,
        method: str | None = None,
        layer: str | None = None,
        n_top_genes: int = OFFICIAL_N_HVG,
        max_epochs: int | None = None,
        batch_size: int = OFFICIAL_BATCH_SIZE,
        lr: float | None = None,
        random_state: int = 0,
        train_kwargs: dict[str, Any] | None = None,
    ) -> tuple[SCGPTIntegration, dict[str, Any]]:
        """Fine-tune a copy of ``pretrained`` on ``adata``'s cells to integrate its batches.

        ``method="official"`` is the official recipe (module documentation):
        the ``n_top_genes`` most variable vocabulary genes (batch-aware ranking), every one
        read for every cell, GEP + GEPC + ECS + DAR + DSBN with the batch embedding in the
        decoders, Adam decayed by 0.9 per epoch, 64 cells per minibatch, every cell trained on.
        ``"batch_decoder"``: GEP + GEPC with the batch embedding in the decoders only.

        Parameters
        ----------
        pretrained
            The pretrained scGPT; not changed.
        adata
            Cells x genes (raw counts, or log-normalised values) with the batch column; read,
            never registered or modified.
        batch_key
            Column of ``adata.obs`` with each cell's batch.
        method
            ``"official"`` or ``"batch_decoder"``; ``None``: ``"official"``.
        layer
            Layer with the values (``None``: ``X``).
        n_top_genes
            Genes read per cell (official 1,200).
        max_epochs
            Passes over the cells; ``None``: the tutorial's 15, or more where 15 make fewer
            than 800 optimisation steps (small datasets).
        batch_size
            Cells per minibatch (official 64).
        lr
            Learning rate; ``None``: the official 1e-4 scaled by the published width over this
            model's (``512 / d_model``, as Adam learning rates scale with width): 1e-4 for the
            published models, 8e-4 for the shipped ``scgpt-default``.
        random_state
            Seed of the training order, masks and dropout.
        train_kwargs
            Passed to :meth:`SCGPT.train <scfm_tools.models.SCGPT.train>` (``accelerator``,
            ``devices`` ...).

        Returns
        -------
        The trained model and what to record about the run.
        """
        import anndata as ad

        method = DEFAULT_METHOD if method is None else method
        if method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)} for scGPT, got {method!r}.")
        match = pretrained.match_genes(adata)
        genes = variable_genes(
            adata, layer, np.flatnonzero(match.matched), int(n_top_genes), batch_key
        )
        X = get_matrix(adata, layer)
        data = ad.AnnData(
            X=sparse.csr_matrix(X[:, genes], dtype=np.float32),
            obs=pd.DataFrame(
                {batch_key: adata.obs[batch_key].astype(str).to_numpy()}, index=adata.obs_names
            ),
            var=pd.DataFrame(index=pd.Index(np.asarray(adata.var_names)[genes])),
        )
        # The copy's genes are named by their vocabulary tokens, whatever the caller's names.
        token = {i: name for name, i in pretrained.vocab.items()}
        data.var_names = pd.Index([token[i] for i in match.index[genes]])
        cls.setup_anndata(data, batch_key=batch_key)
        if max_epochs is None:
            per_epoch = math.ceil(data.n_obs / batch_size)
            epochs = max(OFFICIAL_EPOCHS, math.ceil(MIN_STEPS / per_epoch))
        else:
            epochs = int(max_epochs)
        with seeded_torch(random_state):
            model = cls.from_model(pretrained, data, **METHODS[method])
            if lr is None:
                lr = OFFICIAL_LR * OFFICIAL_D_MODEL / model.module.d_model
            model.train(
                max_epochs=epochs,
                batch_size=batch_size,
                train_size=1.0,
                plan_kwargs={
                    "lr": lr,
                    "lr_schedule": "step",
                    "lr_gamma": OFFICIAL_GAMMA,
                    "random_state": random_state,
                },
                **(train_kwargs or {}),
            )
        params = {
            "method": method,
            "n_top_genes": int(genes.size),
            "max_epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            **{k: v for k, v in METHODS[method].items()},
        }
        return model, params

    def batch_codes(self, adata: AnnData, batch_key: str | None) -> np.ndarray:
        """Code each cell of ``adata`` by its batch among the batches the model was trained on.

        Parameters
        ----------
        adata
            The cells.
        batch_key
            ``adata.obs`` column with the batches (``None``: the registered one).

        Returns
        -------
        int64 code per cell.
        """
        key = batch_key or self.registry_["setup_args"]["batch_key"]
        if key not in adata.obs.columns:
            raise KeyError(f"batch_key {key!r} is not a column of adata.obs.")
        values = adata.obs[key].astype(object)
        codes = pd.Categorical(values, categories=self.batch_categories_).codes
        if (codes < 0).any():
            unknown = sorted({str(v) for v in values[codes < 0]})[:5]
            raise InputError(
                f"batches {unknown} were not in the training data; the model normalises each "
                f"cell by its batch's statistics and knows {self.batch_categories_}."
            )
        return codes.astype(np.int64)

    @torch.inference_mode()
    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        batch_key: str | None = None,
        layer: str | None = None,
        batch_size: int = OFFICIAL_BATCH_SIZE,
        random_state: int | None = 0,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        return_info: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, dict[str, Any]]:
        """Integrated embeddings: the L2-normalised ``<cls>`` output, with each cell's batch norm.

        Cells are read as in training: every gene the model was trained on (by name; genes
        missing from ``adata`` are left out), zeros included, binned per cell.

        Parameters
        ----------
        adata
            Cells to embed (``None``: the model's AnnData); their batches must be among the
            training batches.
        indices
            Rows of ``adata`` to embed (``None``: all).
        batch_key
            ``adata.obs`` column with the batches (``None``: the registered one).
        layer
            Layer with the expression values (``None``: the registered layer, else ``X``).
        batch_size
            Cells per forward pass.
        random_state
            Seed of the binning's tie-breaking draws (``None``: ``sft.settings.seed``).
        chunk_size
            Cells read at a time.
        return_info
            Also return what to record about the run.

        Returns
        -------
        ``(n_cells, d_model)`` float32 array (and the run's record with ``return_info``).
        """
        adata = self._cells(adata, indices)
        codes = self.batch_codes(adata, batch_key)
        layer = self._layer if layer is None else layer
        trained = np.asarray(self.adata.var_names)[self.gene_match.matched]
        position = pd.Index(adata.var_names).get_indexer(trained)
        found = position >= 0
        if not found.any():
            raise InputError("none of the model's genes is in adata.var_names.")
        gene_ids = self.gene_match.index[self.gene_match.matched][found]
        seed = resolve_seed(random_state)
        module = self.module
        module.eval()
        device = self.device
        out = np.empty((adata.n_obs, module.d_model), dtype=np.float32)
        for start, block in iter_row_blocks(get_matrix(adata, layer), chunk_size=chunk_size):
            block = sparse.csr_matrix(block)[:, position[found]]
            for lo in range(0, block.shape[0], batch_size):
                rows = slice(lo, min(lo + batch_size, block.shape[0]))
                tokens = tokenize_all_genes(
                    block[rows],
                    gene_ids,
                    cls_id=self.vocab["<cls>"],
                    pad_value=module.pad_value,
                    n_bins=self.n_bins,
                    random_state=seed,
                )
                labels = torch.from_numpy(codes[start + rows.start : start + rows.stop])
                emb = module.integrated_embedding(
                    *(tokens[k].to(device) for k in (GENE_IDS, VALUES, PADDING_MASK)),
                    labels.to(device),
                )
                out[start + rows.start : start + rows.stop] = emb.cpu().numpy()
        if not return_info:
            return out
        info = {
            "n_genes": int(found.sum()),
            "n_genes_missing": int((~found).sum()),
            "random_state": seed,
        }
        return out, info
