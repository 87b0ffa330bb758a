"""The AnnData-facing CellPLM model: setup, pretraining, fine-tuning, embeddings, annotation."""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField, LayerField
from scvi.model.base import BaseModelClass

from ..._anndata import get_matrix, resolve_seed
from ..._cell_rng import RandomStream
from ..._docs import DOC_RANDOM_STREAM, doc_params
from ..._validation import InputError, check_counts, check_unique_names
from ...pp._match_genes import GeneMatch, match_to_vocab
from ...train import (
    DOC_TRAIN_SCALE,
    ClassWeights,
    RestoreBestWeights,
    TrainingMixin,
    compute_class_weights,
    seeded_torch,
)
from .._classifier import ClassifierMixin, check_labels_key, registered_classes, resolve_classes
from .._gene_embeddings import GeneEmbeddings, token_table_rows
from ..base import PretrainedMixin, unbound_registry
from ..base._streaming import as_device
from ._checkpoint import load_cellplm_checkpoint
from ._classify import class_probabilities
from ._embed import embed_matrix, sample_draws
from ._impute import decoder_batch_ids, denoise_sequences, posterior_mean
from ._module import CellPLMModule
from ._sequences import batch_codes, sequence_rows
from ._training_plan import (
    VALIDATION_F1,
    CellPLMClassifierPlan,
    CellPLMTrainingPlan,
    LabelledSequenceSplitter,
    SequenceDataSplitter,
)

if TYPE_CHECKING:
    from anndata import AnnData
    from lightning.pytorch.strategies import Strategy

    from ...hub import ResolvedModel

__all__ = ["CellPLM"]

logger = logging.getLogger("scfm_tools")

# The same floor as sft.pp.match_genes: refuse only clearly wrong gene names.
MIN_GENES = 10
MIN_FRACTION = 0.1
# A small architecture for training from scratch; from_pretrained takes the checkpoint's.
DEFAULT_ARCHITECTURE = {
    "enc_hid": 128,
    "enc_layers": 2,
    "enc_heads": 8,
    "post_latent_dim": 32,
    "num_clusters": 16,
    "dec_hid": 128,
    "dec_layers": 2,
    "dropout": 0.2,
    "norm": "groupnorm",
    "lamda": 5.0,
    "w_li": 5.0,
    "w_en": 5.0,
}
# The official annotation fine-tuning's model settings (CellTypeAnnotationDefaultModelConfig):
# a linear latent in place of the mixture, a one-layer head, dropout 0.5 everywhere.
ANNOTATION_ARCHITECTURE = {"latent_mod": "ae", "dec_layers": 1, "dropout": 0.5}
# Defaults of fine_tune_classifier (see its docstring for the figures behind them).
FINE_TUNE_EPOCHS = 300
FINE_TUNE_PATIENCE = 50
# Defaults of fine_tune_denoiser: optimisation steps (one sequence of DENOISE_CELLS cells each)
# and learning rate. On 400 thinned PBMCs, 200 steps beat no imputation at 10% depth but not at
# 20%; 800 steps (about 2 minutes on 2 CPU cores) beat it at both (benchmarks/results/
# imputation_default.md).
DENOISE_STEPS = 800
DENOISE_CELLS = 256
DENOISE_LR = 1e-3
# Official config keys of each module argument, for export.
_OFFICIAL_KEYS = {
    "enc_hid": "enc_hid",
    "enc_layers": "enc_layers",
    "enc_heads": "enc_head",
    "post_latent_dim": "post_latent_dim",
    "num_clusters": "num_clusters",
    "dec_hid": "dec_hid",
    "dec_layers": "dec_layers",
    "batch_num": "batch_num",
    "dataset_num": "dataset_num",
    "platform_num": "platform_num",
    "dropout": "model_dropout",
    "norm": "norm",
    "lamda": "lamda",
    "w_li": "w_li",
    "w_en": "w_en",
    "dae": "dae",
}


def _match(var_names, gene_list: Sequence[str]) -> GeneMatch:
    match = match_to_vocab(list(var_names), list(gene_list))
    if match.n_matched < MIN_GENES or match.fraction < MIN_FRACTION:
        raise InputError(
            f"too few genes match the model's gene list: {match.describe()}. CellPLM gene lists "
            "are Ensembl IDs; symbols are mapped offline, but the data must be of the model's "
            "species and hold enough of its genes."
        )
    return match


def _counts_view(
    adata: AnnData, layer: str | None, gene_key: str | None, keys: list[str]
) -> AnnData:
    """Return a private AnnData to train on: the counts (not copied), gene names, ``keys``."""
    import anndata as ad

    names = adata.var_names if gene_key is None else adata.var[gene_key].astype(str)
    return ad.AnnData(
        X=get_matrix(adata, layer),
        obs=adata.obs[keys].copy(),
        var=pd.DataFrame(index=pd.Index(np.asarray(names, dtype=str))),
    )


def grown_state(
    state: dict[str, torch.Tensor], target: dict[str, torch.Tensor], n_source: int
) -> dict[str, torch.Tensor]:
    """Return ``state`` (over ``n_source`` genes), its gene-indexed weights grown to ``target``'s.

    The gene embedding and the decoder's per-gene outputs have one row per gene: the source's
    rows go first, the target's own (freshly initialised) rows stay for the new genes. Other
    weights are returned as they are.
    """

    def grown(key: str, weights: torch.Tensor) -> torch.Tensor:
        into = target.get(key)
        if (
            into is None
            or weights.ndim == 0
            or weights.shape[0] != n_source
            or into.shape[0] <= n_source
            or weights.shape[1:] != into.shape[1:]
        ):
            return weights
        rows = into.clone()
        rows[:n_source] = weights
        return rows

    return {key: grown(key, weights) for key, weights in state.items()}


class CellPLM(ClassifierMixin, PretrainedMixin, TrainingMixin, BaseModelClass):
    """CellPLM (Wen et al., ICLR 2024) as an scvi-tools model: pretrain, embed, annotate.

    Cells are the tokens: the cells of one sample (the ``batch_key`` of :meth:`setup_anndata`)
    form a sequence, and a Flowformer lets them attend to each other; a Gaussian-mixture latent
    layer gives the cell embedding and a negative-binomial decoder, aware of the sample
    (batch) covariate, reconstructs the counts. Training is the published objective: the NB
    reconstruction of sequences whose cells were dropped and masked at random, plus the
    mixture-VAE terms (:class:`~scfm_tools.models.cellplm.CellPLMTrainingPlan`).

    With cell types (``labels_key`` of :meth:`setup_anndata`, or ``classes``) the model is the
    official annotation model instead: the mixture latent becomes a linear one and an MLP head
    on it predicts the cell type (official ``CellTypeAnnotationPipeline``); :meth:`train` then
    fine-tunes the whole model with the official recipe, :meth:`fine_tune_classifier` does so
    on a copy from a labelled reference, and :meth:`predict` labels cells.

    Call :meth:`setup_anndata` first. Start from scratch with this constructor, or from a
    checkpoint (official or exported here) with :meth:`from_pretrained`, which needs no AnnData
    for inference.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata` (raw counts); ``None`` builds an unbound
        model for inference only (then ``gene_list`` is needed, and ``classes`` for a
        classifier).
    gene_list
        The model's genes: ``None`` uses ``adata.var_names``; an official checkpoint's are
        Ensembl IDs. Data genes are matched to it by symbol or Ensembl ID, offline; too small an
        overlap (fewer than 10 genes or 10%) is refused.
    batch_covariate
        Give the decoder the registered batch (one embedding per category), as the official
        pretraining does; the batch table then has as many rows as categories. A classifier
        has no decoder.
    classes
        Cell types of an annotation head, in the order of its outputs; ``None`` takes the
        registered label categories (sorted), or builds no head when no labels are registered.
        When labels are registered they must be these, in this order.
    **module_kwargs
        Architecture, passed to :class:`~scfm_tools.models.cellplm.CellPLMModule` (defaults:
        ``enc_hid=128``, ``enc_layers=2``, ``enc_heads=8``, ``post_latent_dim=32``,
        ``num_clusters=16``, ``dec_hid=128``, ``dec_layers=2``, ``dropout=0.2``,
        ``norm="groupnorm"``, ``lamda=5``, ``w_li=5``, ``w_en=5``; a classifier takes the
        official annotation settings ``latent_mod="ae"``, ``dec_layers=1``, ``dropout=0.5``).

    Examples
    --------
    >>> sft.models.CellPLM.setup_anndata(adata, batch_key="sample")
    >>> model = sft.models.CellPLM(adata, enc_hid=64, post_latent_dim=16)
    >>> model.train(max_epochs=20, plan_kwargs={"lr": 1e-3})
    >>> adata.obsm["X_cellplm"] = model.get_latent_representation()
    >>> classifier = sft.models.CellPLM.from_pretrained("cellplm-default").fine_tune_classifier(
    ...     ref, "cell_type"
    ... )
    >>> classifier.predict(query)
    """

    _module_cls = CellPLMModule
    _training_plan_cls = CellPLMTrainingPlan
    _data_splitter_cls = SequenceDataSplitter
    family = "cellplm"
    values_needed = "counts"
    reads_cells_alone = False

    def __init__(
        self,
        adata: AnnData | None = None,
        *,
        gene_list: Sequence[str] | None = None,
        batch_covariate: bool = True,
        classes: Sequence[str] | None = None,
        **module_kwargs: Any,
    ) -> None:
        super().__init__(adata, registry=None if adata is not None else unbound_registry("CellPLM"))
        if adata is None and gene_list is None:
            raise ValueError("a CellPLM model built without adata needs its gene_list.")
        genes = [str(g) for g in (adata.var_names if gene_list is None else gene_list)]
        if len(set(genes)) != len(genes):
            raise ValueError("gene_list contains duplicated genes.")
        self.gene_list = genes
        self.gene_match = None if adata is None else _match(adata.var_names, genes)
        self.classes = self._resolve_classes(classes)
        has_batch = self.registry_["setup_args"].get("batch_key") is not None
        self.batch_covariate = bool(batch_covariate and has_batch and self.classes is None)
        kwargs = {**DEFAULT_ARCHITECTURE, **module_kwargs}
        if self.classes is not None:
            kwargs = {**DEFAULT_ARCHITECTURE, **ANNOTATION_ARCHITECTURE, **module_kwargs}
            kwargs["n_classes"] = len(self.classes)
            # instance attributes: scvi-tools' train builds the plan and data from these
            self._training_plan_cls = CellPLMClassifierPlan
            self._data_splitter_cls = LabelledSequenceSplitter
        if self.batch_covariate:
            kwargs.setdefault("batch_num", self.summary_stats.n_batch)
        self.module = self._module_cls(len(genes), **kwargs)
        cfg = self.module.config
        latent = (
            f"latent {cfg['post_latent_dim']} ({cfg['num_clusters']} components)"
            if cfg["latent_mod"] == "gmvae"
            else f"linear latent {cfg['post_latent_dim']}"
        )
        self._model_summary_string = (
            f"CellPLM model: enc_hid {cfg['enc_hid']}, {cfg['enc_layers']} Flowformer layers, "
            f"{latent}, {len(genes):,} genes ("
            + ("no AnnData" if adata is None else f"{self.gene_match.n_matched:,} in the data")
            + ")"
            + (f", decoder batch table of {cfg['batch_num']}" if self.batch_covariate else "")
            + ("" if self.classes is None else f", annotation head ({len(self.classes)} classes)")
        )
        self.init_params_ = self._get_init_params(locals())

    def _resolve_classes(self, classes: Sequence[str] | None) -> list[str] | None:
        """Return the classifier's cell types: given, or registered; ``None``: no head."""
        registered = registered_classes(self.adata_manager)
        head = "pretrain" if classes is None and registered is None else "classifier"
        return resolve_classes(head, classes, registered, model="CellPLM")

    # setup -------------------------------------------------------------------------------------
    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Register an AnnData for :class:`CellPLM`.

        The matrix must hold raw counts (the model takes ``log1p`` of counts and reconstructs
        them with a negative binomial), with unique gene names. Nothing is written to ``adata``
        when a check fails.

        Parameters
        ----------
        adata
            Cells x genes raw counts; gene symbols or Ensembl IDs in ``var_names``.
        layer
            Layer holding the counts; ``None`` uses ``adata.X``.
        batch_key
            Column of ``adata.obs`` naming each cell's sample: the cells of a sample form the
            model's sequences. ``None``: all cells are one sample.
        labels_key
            Column of ``adata.obs`` with cell types: the model built on ``adata`` is then a
            classifier (one class per category, sorted), which :meth:`train` fine-tunes.
        **kwargs
            Passed to :meth:`scvi.data.AnnDataManager.register_fields`.
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        if batch_key is not None and batch_key not in adata.obs.columns:
            raise InputError(
                f"batch_key {batch_key!r} is not a column of adata.obs (columns: "
                f"{list(adata.obs.columns)}); pass the column that names each cell's sample."
            )
        check_labels_key(adata, labels_key)
        check_counts(adata, layer)
        check_unique_names(adata.var_names)
        anndata_fields = [
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=True),
            CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key),
        ]
        if labels_key is not None:  # pretraining registers no label field
            anndata_fields.append(CategoricalObsField(REGISTRY_KEYS.LABELS_KEY, labels_key))
        adata_manager = AnnDataManager(fields=anndata_fields, setup_method_args=setup_method_args)
        adata_manager.register_fields(adata, **kwargs)
        cls.register_manager(adata_manager)

    # pretrained weights ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike | ResolvedModel,
        adata: AnnData | None = None,
        *,
        dropout: float | None = None,
    ) -> CellPLM:
        """Load a CellPLM checkpoint, for inference or continued training.

        The decoder keeps the checkpoint's batch table but is not given the data's batches
        (their ids mean nothing to it): it decodes without a batch effect. A checkpoint
        fine-tuned for annotation (:meth:`fine_tune_classifier`, then :meth:`export`) comes
        back as the classifier, with its cell types and the ``batch_key`` its cells were
        grouped by. A pretrained checkpoint loaded around an AnnData registered with
        ``labels_key`` becomes a classifier with a new head (and the official annotation
        settings), ready for :meth:`train`.

        Parameters
        ----------
        name_or_path
            A registered model name (``"cellplm"``) or a local checkpoint (``<prefix>.best.ckpt``
            or ``<prefix>.safetensors`` beside ``<prefix>.config.json``, or their folder;
            official or :meth:`export`-ed).
        adata
            AnnData registered with :meth:`setup_anndata`, to train on; ``None`` for inference
            on any AnnData.
        dropout
            Dropout for further training; ``None`` keeps the checkpoint's (0.5 for a new
            classifier, as the official annotation pipeline).

        Returns
        -------
        A :class:`CellPLM` whose module holds the checkpoint's weights; ``pretrained_`` records
        the source, the weights' sha256 and the load report.
        """
        resolved = cls.locate(name_or_path)
        pretrained, genes, config, report = load_cellplm_checkpoint(resolved)
        classes = config.get("classes") if pretrained.is_classifier else None
        model = cls._around(pretrained, genes, adata, classes, dropout=dropout)
        model._set_pretrained(resolved, report)
        model.has_decoder_ = model.module.decoder is not None and not any(
            k.startswith("decoder.") for k in report.missing
        )
        model.official_config_ = {k: v for k, v in config.items() if k != "gene_list"}
        if pretrained.is_classifier:
            model.batch_key_ = config.get("batch_key")
        return model

    @classmethod
    def _around(
        cls,
        source: CellPLMModule,
        genes: list[str],
        adata: AnnData | None,
        classes: list[str] | None,
        *,
        fresh_head: bool = False,
        dropout: float | None = None,
    ) -> CellPLM:
        """Build a model holding ``source``'s weights, with a new head where it needs one.

        The model is a classifier when ``classes`` are given or ``adata`` has labels
        registered. Built from a module without an annotation head, it takes the official
        annotation settings, and its linear latent and head start afresh; ``fresh_head``
        starts the head afresh in any case (a new set of cell types). ``genes`` may extend
        the source's gene list (its genes first, in order): the new genes' rows of the gene
        embedding and of the decoder's output start as a model trained from scratch starts.
        """
        config = dict(source.config)
        n_source = config.pop("n_genes")
        config.pop("n_classes")
        labelled = adata is not None and (
            cls._get_most_recent_anndata_manager(adata, required=True).registry["setup_args"]
        ).get("labels_key")
        if (classes is not None or labelled) and not source.is_classifier:
            for key in ANNOTATION_ARCHITECTURE:
                config.pop(key)  # the constructor's annotation defaults apply
        if dropout is not None:
            config["dropout"] = dropout
        model = cls._build(adata, gene_list=genes, batch_covariate=False, classes=classes, **config)
        state = {
            k: v
            for k, v in source.state_dict().items()
            if not (fresh_head and k.startswith("head."))
        }
        target = model.module.state_dict()
        if len(genes) > n_source:
            state = grown_state(state, target, n_source)
        kept = {k: v for k, v in state.items() if k in target and v.shape == target[k].shape}
        model.module.load_state_dict(kept, strict=False)
        fresh = sorted(set(target) - set(kept))
        # the same architecture by construction: only a new latent or head may start afresh
        if any(not k.startswith(("latent.layers.1.", "head.")) for k in fresh):
            raise RuntimeError(f"internal error: weights {fresh} did not carry over.")
        if fresh:
            parts = sorted({k.split(".")[0] for k in fresh})
            logger.info("CellPLM: the %s initialised afresh", " and ".join(parts))
        model.module.eval()
        return model

    def export(
        self,
        prefix: str | os.PathLike,
        *,
        overwrite: bool = False,
        weights: Literal["ckpt", "safetensors"] = "ckpt",
    ) -> Path:
        """Write the model as an official CellPLM checkpoint pair.

        ``<prefix>.config.json`` (official keys and the gene list; for a classifier also the
        official ``head_type='annotation'``, ``latent_mod='ae'``, ``out_dim`` = number of cell
        types, and ``classes`` and ``batch_key``, read back by :meth:`from_pretrained`) and
        ``<prefix>.best.ckpt`` (``{"model_state_dict": ...}``), which
        :func:`~scfm_tools.models.cellplm.load_cellplm_checkpoint`, :meth:`from_pretrained`,
        ``sft.tl`` and the official ``load_pretrain`` read; or ``<prefix>.safetensors`` in place
        of the pickle (the package's own, which the official code does not read).

        Parameters
        ----------
        prefix
            Path prefix, e.g. ``"models/my_cellplm"``.
        overwrite
            Replace existing files.
        weights
            ``"ckpt"`` (the official format) or ``"safetensors"``.

        Returns
        -------
        Path of the weights file.
        """
        prefix = Path(prefix).expanduser()
        config_path = prefix.with_name(prefix.name + ".config.json")
        if weights not in ("ckpt", "safetensors"):
            raise ValueError(f"weights must be 'ckpt' or 'safetensors', got {weights!r}.")
        suffix = ".best.ckpt" if weights == "ckpt" else ".safetensors"
        weights_path = prefix.with_name(prefix.name + suffix)
        existing = [p.name for p in (config_path, weights_path) if p.exists()]
        if existing and not overwrite:
            raise FileExistsError(f"{existing} exist in {prefix.parent}; pass overwrite=True.")
        cfg = self.module.config
        carried = getattr(self, "official_config_", {})
        config = {
            **{k: v for k, v in carried.items() if k not in ("classes", "batch_key")},
            "name": prefix.name,
            "enc_mod": "flowformer",
            "latent_mod": cfg["latent_mod"],
            "dec_mod": "nbmlp" if self.classes is None else "mlp",
            "head_type": None if self.classes is None else "annotation",
            **{official: cfg[ours] for ours, official in _OFFICIAL_KEYS.items()},
            "out_dim": len(self.gene_list if self.classes is None else self.classes),
            "gene_list": self.gene_list,
        }
        if self.classes is not None:
            config.update(classes=self.classes, batch_key=self._default_batch_key())
        prefix.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
        if weights == "ckpt":
            torch.save({"model_state_dict": state}, weights_path)
        else:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in state.items()}, str(weights_path))
            weights_path.chmod(0o644)  # readable as package data, as torch.save's files are
        config_path.write_text(json.dumps(config), encoding="utf-8")
        return weights_path

    # training ----------------------------------------------------------------------------------
    @doc_params(scale=DOC_TRAIN_SCALE)
    def train(
        self,
        max_epochs: int = 10,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        max_cells: int | None = 2000,
        train_size: float | None = None,
        validation_size: float | None = None,
        random_state: int | None = None,
        plan_kwargs: dict[str, Any] | None = None,
        *,
        class_weights: ClassWeights = None,
        patience: int | None = FINE_TUNE_PATIENCE,
        strategy: str | Strategy = "auto",
        num_nodes: int = 1,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_kwargs: dict[str, Any] | None = None,
        resume: bool | str | os.PathLike = False,
        **kwargs: Any,
    ):
        """Pretrain with the published corruption and objective, or fine-tune a classifier.

        Each step is one sequence: up to ``max_cells`` cells of one sample (larger samples are
        shuffled and cut into chunks), corrupted as the official pretraining (30% of cells
        dropped, 75% of the rest masked, each masking about 25% of its counts), reconstructed
        by the NB decoder; the mixture-VAE terms are added.

        A classifier (labels registered) is fine-tuned whole as the official
        ``CellTypeAnnotationPipeline.fit``: the same corruption of the input, the head's
        cross-entropy on the training cells, the official optimiser
        (:class:`~scfm_tools.models.cellplm.CellPLMClassifierPlan`: AdamW, ``lr`` 5e-3 with a
        30-epoch warm-up, the embedder at a tenth; gradients clipped at norm 2). A stratified
        share ``validation_size`` of each cell type is held out, but stays in the sequences as
        unlabelled context, as upstream; after every epoch the macro-F1 of these cells is
        measured, training stops after ``patience`` epochs without reaching the best again, and
        the weights of the best epoch (the last of equal ones) are restored.

        Parameters
        ----------
        max_epochs
            Passes over the training cells (counting those done before a resume).
        accelerator
            Lightning accelerator (``"auto"``, ``"cpu"``, ``"gpu"`` ...).
        devices
            Devices (processes) per node: a number, a list of GPU indices, or ``"auto"`` (one).
        max_cells
            Most cells per sequence (the official pretraining data loader uses 2000); ``None``
            keeps each sample whole (as official fine-tuning).
        train_size
            Pretraining: fraction of cells for training (scvi-tools default 0.9). A classifier
            trains on the cells not held out for validation.
        validation_size
            Fraction of cells for validation (pretraining default: the rest; classifier: 0.1 of
            each cell type, as the official tutorial).
        random_state
            Seed of the split, the chunking, the sequence order, the corruption and the dropout
            (``None``: ``sft.settings.seed``).
        plan_kwargs
            Passed to :class:`~scfm_tools.models.cellplm.CellPLMTrainingPlan`: ``lr`` (2e-4),
            ``mask_node_rate`` (0.75), ``mask_feature_rate`` (0.25), ``drop_node_rate`` (0.3),
            ``mask_beta`` (True), ``weight_decay`` ...; or, for a classifier, to
            :class:`~scfm_tools.models.cellplm.CellPLMClassifierPlan` (``lr`` 5e-3,
            ``weight_decay`` 1e-7, ``warmup_epochs`` 30 ...).
        class_weights
            Classifier only: loss weights for imbalanced cell types, ``None`` (the official
            CellPLM loss), ``"official"`` (scBERT's ``(1 - n_c / N)^2``), ``"balanced"`` or
            explicit weights; see :func:`~scfm_tools.train.compute_class_weights`.
        patience
            Classifier only: stop after this many epochs in which the validation macro-F1 did
            not reach its best (official: 200 of at most 2000 epochs); ``None``: never stop
            early.
        {scale}
        **kwargs
            Passed to :meth:`scvi.model.base.UnsupervisedTrainingMixin.train` and on to the
            Lightning trainer (``check_val_every_n_epoch``, ``early_stopping``,
            ``precision``, ``gradient_clip_val`` ...).

        Returns
        -------
        What scvi-tools' training runner returns; losses per epoch are in ``history``
        (``train_loss``, ``nb_loss_train``, ``latent_loss_train``, ``validation_loss``; for a
        classifier ``train_loss``, ``validation_loss`` and ``validation_macro_f1``).
        """
        seed = resolve_seed(random_state)
        plan = {"random_state": seed, **(plan_kwargs or {})}
        splitter = dict(kwargs.pop("datasplitter_kwargs", None) or {})
        splitter.update(
            match=self.gene_match,
            n_genes=len(self.gene_list),
            max_cells=max_cells,
            use_batch_covariate=self.batch_covariate,
            random_state=seed,
        )
        if self.classes is not None:
            if train_size is not None:
                raise ValueError(
                    "a classifier trains on the cells not held out for validation; give "
                    "validation_size= instead of train_size=."
                )
            validation_size = 0.1 if validation_size is None else validation_size
            codes = np.asarray(self.adata_manager.get_from_registry(REGISTRY_KEYS.LABELS_KEY))
            counts = np.bincount(codes.ravel().astype(int), minlength=len(self.classes))
            self.module.class_weights = compute_class_weights(counts, class_weights)
            best = RestoreBestWeights(VALIDATION_F1, "max", ties=True, patience=patience)
            kwargs["callbacks"] = [*list(kwargs.get("callbacks") or []), best]
            kwargs.setdefault("check_val_every_n_epoch", 1)
            kwargs.setdefault("gradient_clip_val", 2.0)  # official clip_grad_norm_(..., 2.0)
            # Lightning keeps the module's mode; dropout needs training mode
            self.module.train()
        elif class_weights is not None:
            raise ValueError("class_weights apply to a classifier (labels registered) only.")
        return super().train(
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            train_size=train_size,
            validation_size=validation_size,
            datasplitter_kwargs=splitter,
            plan_kwargs=plan,
            strategy=strategy,
            num_nodes=num_nodes,
            checkpoint_dir=checkpoint_dir,
            checkpoint_kwargs=checkpoint_kwargs,
            resume=resume,
            **kwargs,
        )

    def fine_tune_classifier(
        self,
        reference: AnnData,
        labels_key: str,
        *,
        max_epochs: int = FINE_TUNE_EPOCHS,
        batch_size: int | None = None,
        class_weights: ClassWeights = None,
        patience: int | None = FINE_TUNE_PATIENCE,
        validation_size: float = 0.1,
        layer: str | None = None,
        batch_key: str | None = None,
        gene_key: str | None = None,
        random_state: int | None = 0,
        train_kwargs: Mapping[str, Any] | None = None,
    ) -> CellPLM:
        """Fine-tune a copy of this model for the cell types of a labelled reference.

        As the official ``CellTypeAnnotationPipeline``: the mixture latent is replaced by a
        linear one and an MLP head (one linear layer after dropout 0.5) predicts the cell type
        from it; the whole model is trained with the head's cross-entropy, the pretraining
        corruption of the input and the official optimiser, with early stopping on the macro-F1
        of a stratified 10% of the reference (see :meth:`train`). This model is left as it is,
        and so is ``reference`` (a private view of it is registered).

        Cells are read as CellPLM reads them, as a sentence: the cells of one sample
        (``batch_key``; all cells when ``None``) form a sequence and attend to each other. The
        held-out cells stay in the sequences as unlabelled context. The fine-tuned model groups
        query cells the same way (:meth:`predict_proba`: by the same ``batch_key`` column when
        the query has it, else all query cells in one sequence), so a query cell's prediction
        depends on the other query cells of its sample, as in the official ``predict``.

        Defaults: the official pipeline runs at most 2,000 epochs and stops after 200 without
        reaching its best validation macro-F1 again; with one sequence per sample an epoch is
        one step. Here at most 300 epochs and patience 50: fine-tuning the shipped
        ``cellplm-default`` on 1,000 pbmc8k cells, the validation macro-F1 passed 0.94 by epoch
        60 and peaked at epoch 123 (0.956) of 300; an epoch cost about 0.1 s of one CPU core
        there (200 genes) and 0.3-0.4 s on 240 full-transcriptome CellBench cells, whose
        validation macro-F1 reaches 1.0 and, ties counting as the best, runs all 300 epochs.

        Parameters
        ----------
        reference
            Raw counts of labelled cells (gene symbols or Ensembl IDs).
        labels_key
            Column of ``reference.obs`` with the cell types (at least two; no missing values).
        max_epochs
            Most passes over the reference (one step per sequence).
        batch_size
            Most cells per sequence, at fine-tuning and prediction alike (larger samples are cut
            into chunks); ``None``: each sample whole (the official setting).
        class_weights
            Loss weights for imbalanced cell types; ``None`` is the official CellPLM loss (see
            :meth:`train`).
        patience
            Epochs without reaching the best validation macro-F1 before stopping; ``None``:
            train all ``max_epochs``.
        validation_size
            Share of each cell type held out for early stopping (official tutorial: 0.1).
        layer
            Layer of ``reference`` with the counts (``None``: ``X``).
        batch_key
            Column of ``reference.obs`` naming each cell's sample (one sequence each); ``None``:
            all cells form one sample.
        gene_key
            ``reference.var`` column with gene symbols or Ensembl IDs (``None``: ``var_names``).
        random_state
            Seed of the new latent and head, the split, the corruption and the dropout
            (``None``: ``sft.settings.seed``); the caller's global torch random state is left
            alone.
        train_kwargs
            Passed to :meth:`train` (``plan_kwargs``, ``accelerator``, ``devices``,
            ``precision`` ...).

        Returns
        -------
        The fine-tuned :class:`CellPLM` (a classifier bound to the private view of
        ``reference``); its ``history`` holds the losses and ``validation_macro_f1`` per epoch.
        """
        seed = resolve_seed(random_state)
        keys = [k for k in (labels_key, batch_key) if k is not None and k in reference.obs]
        view = _counts_view(reference, layer, gene_key, keys)
        type(self).setup_anndata(view, labels_key=labels_key, batch_key=batch_key)
        train_kwargs = dict(train_kwargs or {})
        with seeded_torch(seed):
            model = type(self)._around(self.module, self.gene_list, view, None, fresh_head=True)
            model.train(
                max_epochs=max_epochs,
                max_cells=batch_size,
                validation_size=validation_size,
                random_state=seed,
                class_weights=class_weights,
                patience=patience,
                **train_kwargs,
            )
        model.module.eval()
        model.pretrained_ = {**getattr(self, "pretrained_", {}), "fine_tuned": True}
        model.official_config_ = dict(getattr(self, "official_config_", {}))
        return model

    def fine_tune_denoiser(
        self,
        adata: AnnData,
        *,
        steps: int = DENOISE_STEPS,
        max_cells: int = DENOISE_CELLS,
        lr: float = DENOISE_LR,
        layer: str | None = None,
        batch_key: str | None = None,
        gene_key: str | None = None,
        add_genes: bool = False,
        random_state: int | None = 0,
        train_kwargs: Mapping[str, Any] | None = None,
    ) -> CellPLM:
        """Fine-tune a copy of this model on ``adata``'s own cells, to impute or embed them.

        Self-supervised, as the pretraining (:meth:`train`: cells dropped and masked, their
        counts reconstructed by the negative-binomial decoder, the mixture-VAE terms): the
        model learns what these cells' genes say about each other, at these cells' depth,
        before :meth:`get_imputed_expression` denoises them or :meth:`get_latent_representation`
        embeds them. No labels, no other data. This is what ``sft.tl.impute`` and
        ``sft.tl.embed_cells`` do when given no model: a small pretrained model alone imputes
        unseen cells worse than no imputation and embeds them worse than PCA
        (``benchmarks/results/imputation_default.md``, ``default_embedding.md``).
        This model and ``adata`` are left as they are.

        Parameters
        ----------
        adata
            Raw counts of the cells to impute (gene symbols or Ensembl IDs).
        steps
            Optimisation steps, one sequence of ``max_cells`` cells each; rounded up to whole
            passes over the cells.
        max_cells
            Most cells per training sequence (larger samples are shuffled and cut).
        lr
            Learning rate.
        layer
            Layer of ``adata`` with the counts (``None``: ``X``).
        batch_key
            Column of ``adata.obs`` naming each cell's sample: a training sequence holds cells
            of one sample; ``None``: all cells are one sample.
        gene_key
            ``adata.var`` column with gene symbols or Ensembl IDs (``None``: ``var_names``).
        add_genes
            Add the genes of ``adata`` that the model does not know to the copy's genes (by
            their names in ``adata``), their embedding and decoder rows learned from scratch
            here, so that the copy reads and reconstructs every gene of the data, as PCA
            would (``sft.tl.embed_cells`` does); ``False`` keeps the model's genes (as
            ``sft.tl.impute`` does: unknown genes keep their counts there).
        random_state
            Seed of the chunking, the corruption and the sequence order (``None``:
            ``sft.settings.seed``); the caller's global torch random state is left alone.
        train_kwargs
            Passed to :meth:`train` (``accelerator``, ``precision`` ...).

        Returns
        -------
        The fine-tuned :class:`CellPLM`, bound to a private view of ``adata``; ``history``
        holds its losses.
        """
        if self.module.decoder is None:
            raise ValueError(
                f"{self.model_name} is fine-tuned for cell-type annotation: it has no decoder "
                "to reconstruct expression with. Start from the pretrained model."
            )
        if steps < 1 or max_cells < 1:
            raise ValueError(
                f"steps and max_cells must be positive integers, got {steps!r}, {max_cells!r}."
            )
        seed = resolve_seed(random_state)
        codes, _ = batch_codes(adata, batch_key)  # a clear error for a missing column
        view = _counts_view(adata, layer, gene_key, [] if batch_key is None else [batch_key])
        genes = self.genes_with(view) if add_genes else list(self.gene_list)
        type(self).setup_anndata(view, batch_key=batch_key)
        per_epoch = int(sum(np.ceil(np.bincount(codes) / max_cells)))
        epochs = int(np.ceil(steps / per_epoch))
        with seeded_torch(seed), warnings.catch_warnings():
            # The module stays in eval mode, deliberately (no dropout, the latent's most likely
            # component): on 400 PBMCs thinned to 10% / 20%, RMSE 0.699 / 0.663 and MAE 0.28 /
            # 0.31 against 0.708 / 0.655 and 0.37 / 0.35 in training mode. Lightning warns.
            warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode")
            model = type(self)._around(self.module, genes, view, None)
            model.train(
                max_epochs=epochs,
                max_cells=max_cells,
                train_size=1.0,
                random_state=seed,
                plan_kwargs={"lr": lr},
                **dict(train_kwargs or {}),
            )
        model.module.eval()
        model.pretrained_ = {**getattr(self, "pretrained_", {}), "fine_tuned": True}
        model.official_config_ = dict(getattr(self, "official_config_", {}))
        model.denoiser_params_ = {
            "steps": epochs * per_epoch,
            "epochs": epochs,
            "max_cells": max_cells,
            "lr": lr,
            "genes_added": len(genes) - len(self.gene_list),
            "random_state": seed,
        }
        return model

    def genes_with(self, adata: AnnData) -> list[str]:
        """Return the model's genes followed by those of ``adata`` (``var_names``) it lacks."""
        unknown = adata.var_names[~self.match_genes(adata).matched]
        return [*self.gene_list, *map(str, unknown)]

    def params(self) -> dict[str, Any]:
        """Return what to record in ``uns[key]["params"]``, with a denoiser fine-tuning's run."""
        tuned = getattr(self, "denoiser_params_", {})
        return {**super().params(), **{f"denoiser_{k}": v for k, v in tuned.items()}}

    # outputs -----------------------------------------------------------------------------------
    def _model_genes(self) -> Any:
        return self.gene_list

    def _default_batch_key(self) -> str | None:
        """Return the registered sample column, or the one a loaded classifier was tuned with."""
        return self.registry_["setup_args"].get("batch_key") or getattr(self, "batch_key_", None)

    def _sequences(
        self, adata: AnnData, batch_key: str | None, max_cells: int | None
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        key = batch_key or self._default_batch_key()
        codes, _ = batch_codes(adata, key)
        if key is None and adata.n_obs > 1:
            logger.info(
                "CellPLM: no batch_key, so all %d cells form one sequence (cells attend to each "
                "other); pass batch_key= naming the sample column to read each sample on its "
                "own, as the official pipeline does with obs['batch'].",
                adata.n_obs,
            )
        return codes, sequence_rows(codes, max_cells)

    @torch.inference_mode()
    @doc_params(random_stream=DOC_RANDOM_STREAM)
    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        layer: str | None = None,
        gene_key: str | None = None,
        batch_key: str | None = None,
        max_cells: int | None = None,
        sample: bool = False,
        random_state: int | None = 0,
        random_stream: RandomStream = "cell",
        return_info: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, dict[str, Any]]:
        """Cell embeddings: the mean of the latent Gaussian given the mixture component.

        CellPLM's tokens are cells: the cells of one sample (``batch_key``) form a sequence and
        attend to each other, so a cell's embedding depends on the other cells of its sequence
        by design (as in the official pipeline), though not on their order; with
        ``sample=True`` its draw depends on that cell alone by default
        (``random_stream="cell"``). A sequence is one forward pass, held whole.

        Parameters
        ----------
        adata
            Cells to embed, raw counts (``None``: the model's AnnData); genes are matched to the
            model's (Ensembl IDs or symbols), unmatched ones dropped.
        indices
            Cells to embed; ``None`` embeds all.
        layer
            Layer with the counts (``None``: the registered layer, else ``X``).
        gene_key
            ``adata.var`` column with gene symbols or Ensembl IDs (``None``: ``var_names``).
        batch_key
            ``obs`` column naming the samples (one sequence each); ``None`` uses the one given
            to :meth:`setup_anndata` (all cells in one sequence if there was none).
        max_cells
            Most cells per sequence (longer samples are cut into chunks); ``None`` keeps each
            sample whole (the official default).
        sample
            Draw the mixture component as the official model does in eval mode (random);
            ``False`` takes the most likely one (deterministic).
        random_state
            Seed of the draw with ``sample=True`` (``None``: ``sft.settings.seed``); with
            ``random_stream="official"``, ``s`` reproduces the official run after
            ``torch.manual_seed(s)`` on CPU.
        {random_stream}
            With ``sample=True`` only.
        return_info
            Also return what to record about the run.

        Returns
        -------
        ``(n_cells, post_latent_dim)`` float32 array (and the run's record with
        ``return_info=True``).
        """
        adata = self._cells(adata, indices)
        codes, rows = self._sequences(adata, batch_key, max_cells)
        layer = self.registry_["setup_args"].get("layer") if layer is None else layer
        match = self.match_genes(adata, gene_key)
        seed = resolve_seed(random_state) if sample else None
        emb = embed_matrix(
            self.module,
            self.gene_list,
            get_matrix(adata, layer),
            match,
            batch=codes,
            max_cells=max_cells,
            sample=sample,
            random_state=seed,
            random_stream=random_stream,
            device=self.device,
        )
        if not return_info:
            return emb
        info = {
            "n_genes_matched": int(match.n_matched),
            "batch_key": batch_key,
            "max_cells": max_cells,
            "n_sequences": len(rows),
            "sample": bool(sample),
            "random_state": seed,
            "random_stream": random_stream if sample else None,
        }
        return emb, info

    @torch.inference_mode()
    @doc_params(random_stream=DOC_RANDOM_STREAM)
    def get_imputed_expression(
        self,
        adata: AnnData,
        *,
        layer: str | None = None,
        gene_key: str | None = None,
        batch_key: str | None = None,
        max_cells: int | None = None,
        decoder_batch_key: str | None = None,
        sample: bool = False,
        random_state: int | None = 0,
        random_stream: RandomStream = "cell",
        rescale: bool = True,
        posterior: bool = False,
    ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, Any]]:
        """Denoised expression from the negative-binomial decoder (``sft.tl.impute``).

        Each sequence (the cells of one ``batch_key`` value, cut at ``max_cells`` cells) runs
        through the encoder and the latent layer (the most likely mixture component, or a draw
        with ``sample``); the NB decoder, given the ``decoder_batch_key`` ids or no batch at
        all, gives each cell's expected counts. Genes the model does not know are NaN
        (with ``posterior``: their observed counts).

        Parameters
        ----------
        adata
            Cells, raw counts.
        layer, gene_key, batch_key, max_cells, sample, random_state
            As in :meth:`get_latent_representation`.
        {random_stream}
            With ``sample=True`` only (``"official"``: one stream over the sequences in order,
            as the official model's forward pass after ``torch.manual_seed``).
        decoder_batch_key
            ``obs`` column with integer ids into the decoder's batch table (the batches it
            learned in pretraining); ``None`` decodes without a batch effect.
        rescale
            Scale the means of the known genes to the cell's observed total over them (the
            official denoising output).
        posterior
            Return, instead of the decoder's means, the expected expression given both the
            means and the cell's observed counts: ``mu * (x + theta) / (mu + theta)``, the
            posterior mean under the decoder's negative binomial (a gamma prior of mean ``mu``
            and shape ``theta`` around which ``x`` is a Poisson draw), as SAVER combines its
            prior with the observed counts. Genes the model does not know keep their observed
            counts (the posterior mean with no prior) instead of NaN. Needs ``rescale`` (the
            means at the cell's depth).

        Returns
        -------
        ``(denoised (n_obs, n_vars) float32, {{"dispersion": per-gene NB dispersion (NaN where
        unknown)}}, the run's record)``.
        """
        if self.module.decoder is None:
            raise ValueError(
                f"{self.model_name} is fine-tuned for cell-type annotation: its head took the "
                "decoder's place, so it cannot reconstruct expression. Use the pretrained model."
            )
        if not getattr(self, "has_decoder_", True):
            raise ValueError(
                f"the checkpoint {self.model_name} has no decoder weights (an embedder-only "
                "checkpoint), so it cannot reconstruct expression."
            )
        if posterior and not rescale:
            raise ValueError(
                "posterior=True compares the decoder's means with the observed counts, so it "
                "needs them at the cell's depth: leave rescale=True."
            )
        _, rows_list = self._sequences(adata, batch_key, max_cells)
        covariate = decoder_batch_ids(adata, decoder_batch_key, self.module.config["batch_num"])
        match = self.match_genes(adata, gene_key)
        layer = self.registry_["setup_args"].get("layer") if layer is None else layer
        seed = resolve_seed(random_state) if sample else None
        denoised, disp = denoise_sequences(
            self.module,
            get_matrix(adata, layer),
            rows_list,
            match,
            covariate=covariate,
            sample=sample,
            draws=sample_draws(self.module, seed, random_stream, sample=sample, pipeline=False),
            rescale=rescale,
            device=as_device(self.device),
        )
        cols = np.flatnonzero(match.matched)
        out = np.full(adata.shape, np.nan, dtype=np.float32)
        if posterior:
            posterior_mean(out, denoised, get_matrix(adata, layer), cols, disp)
        else:
            out[:, cols] = denoised
        dispersion = np.full(adata.n_vars, np.nan, dtype=np.float32)
        dispersion[cols] = disp
        params = {
            "n_genes_matched": int(match.n_matched),
            "batch_key": batch_key,
            "decoder_batch_key": decoder_batch_key,
            "max_cells": max_cells,
            "n_sequences": len(rows_list),
            "sample": bool(sample),
            "random_state": seed,
            "random_stream": random_stream if sample else None,
            "rescale": bool(rescale),
            "posterior": bool(posterior),
        }
        return out, {"dispersion": dispersion}, params

    def predict_proba(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        layer: str | None = None,
        gene_key: str | None = None,
        batch_key: str | None = None,
        batch_size: int | None = None,
    ) -> pd.DataFrame:
        """Class probabilities of each cell (annotation head), cells x classes.

        The cells are read as at fine-tuning: the cells of one sample (``batch_key``) form a
        sequence and attend to each other, so a cell's probabilities depend on the other cells
        of its sequence (as in the official ``CellTypeAnnotationPipeline.predict``, which reads
        each ``obs['batch']`` value, or all cells, as one sequence), not on their order. The
        latent is deterministic.

        Parameters
        ----------
        adata
            Cells to annotate, raw counts (``None``: the model's AnnData); genes are matched to
            the model's (Ensembl IDs or symbols), unmatched ones dropped.
        indices
            Cells to annotate; ``None``: all.
        layer
            Layer with the counts (``None``: the registered layer, else ``X``).
        gene_key
            ``adata.var`` column with gene symbols or Ensembl IDs (``None``: ``var_names``).
        batch_key
            ``obs`` column naming the samples (one sequence each); ``None``: the column the
            model was fine-tuned with (registered, or recorded in an exported checkpoint), or
            all cells in one sequence when there was none.
        batch_size
            Most cells per sequence (longer samples are cut into consecutive chunks); ``None``
            keeps each sample whole (the official setting).

        Returns
        -------
        A DataFrame indexed by ``obs_names``, one column per class, rows summing to 1.
        """
        if self.classes is None:
            raise ValueError(
                f"{self.model_name} is a pretrained CellPLM model without an annotation head: "
                "fine-tune it first (fine_tune_classifier, or sft.tl.annotate with a labelled "
                "reference=)."
            )
        adata = self._cells(adata, indices)
        layer = self.registry_["setup_args"].get("layer") if layer is None else layer
        check_counts(adata, layer)
        _, rows = self._sequences(adata, batch_key, batch_size)
        proba = class_probabilities(
            self.module,
            get_matrix(adata, layer),
            rows,
            self.match_genes(adata, gene_key),
            device=as_device(self.device),
        )
        return pd.DataFrame(proba, index=adata.obs_names.copy(), columns=list(self.classes))

    def embed_var_genes(self, adata: AnnData, *, gene_key: str | None = None) -> GeneEmbeddings:
        """Embed the genes of ``adata`` (``sft.tl.embed_genes``): rows of the gene table.

        CellPLM embeds a cell as ``log1p(counts) @ E`` with a genes x ``d`` table ``E``; its
        rows are the model's gene embeddings. Its tokens are cells, not genes, so there are no
        context-aware gene embeddings.

        Parameters
        ----------
        adata
            Its genes are matched to the model's.
        gene_key
            ``adata.var`` column with gene symbols or Ensembl IDs (``None``: ``var_names``).

        Returns
        -------
        The embeddings on ``var`` (NaN rows for genes without one), the match mask and the
        run's record.
        """
        match = self.match_genes(adata, gene_key)
        params: dict[str, Any] = {"n_genes_matched": int(match.n_matched), "table": "embedder"}
        table = self.module.embedder.feat_enc.emb
        return GeneEmbeddings(token_table_rows(table, match), match.matched.copy(), None, params)
