"""The AnnData-facing scFoundation model: setup, RDA pretraining, fine-tuning, outputs, export."""

from __future__ import annotations

import logging
import os
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

from ..._anndata import DEFAULT_CHUNK_SIZE, get_matrix, resolve_seed
from ..._docs import doc_params
from ..._validation import InputError, check_counts, check_nonempty, check_unique_names
from ...pp._match_genes import match_adata_genes
from ...train import (
    DOC_TRAIN_SCALE,
    ClassWeights,
    TrainingMixin,
    compute_class_weights,
    early_stopping_split,
    seeded_torch,
)
from .._classifier import (
    ClassifierMixin,
    check_labels_key,
    labelled_reference,
    proba_frame,
    registered_classes,
    resolve_classes,
    variable_genes,
)
from .._gene_embeddings import GeneEmbeddings, rows_on_var, token_table_rows
from ..base import PretrainedMixin, unbound_registry
from ._checkpoint import (
    Entry,
    entry_for,
    load_scfoundation_checkpoint,
    official_entry,
    write_gene_index,
    write_scfoundation_safetensors,
)
from ._embed import embed_matrix, iter_outputs, prepare_blocks, prepare_options
from ._gene_embed import context_gene_embeddings, token_gene_embeddings
from ._module import Pool, SCFoundationModule
from ._preprocess import (
    GeneReindexer,
    InputType,
    PreNormalized,
    TargetDepth,
    check_options,
    parse_target_depth,
)
from ._training_plan import CLASSIFIER_TARGET_DEPTH, RDA_KEY, SCFoundationTrainingPlan

if TYPE_CHECKING:
    from anndata import AnnData
    from lightning.pytorch.strategies import Strategy

    from ...hub import ResolvedModel
    from .._load_report import LoadReport

__all__ = ["SCFoundation"]

logger = logging.getLogger("scfm_tools")

Trainable = Literal["official", "head", "all"]
#: How the classifier reads cells (recorded with an exported classifier).
CLASSIFIER_INPUT = {
    "values": "raw counts, log1p of counts per 10,000 (official pre_normalized='F')",
    "target_depth": CLASSIFIER_TARGET_DEPTH,
    "pool": "max of the encoder outputs over the gene tokens",
}

#: Learning rate of fine_tune_classifier (the head starts from random weights).
FINE_TUNE_LR = 1e-3
#: Genes of a cell the fine-tuned head reads by default (its most expressed).
MAX_GENES = 2048

# A small architecture for training from scratch; from_pretrained takes the checkpoint's.
DEFAULT_ARCHITECTURE = {
    "enc_dim": 64,
    "enc_depth": 2,
    "enc_heads": 4,
    "dec_dim": 32,
    "dec_depth": 2,
    "dec_heads": 4,
    "dec_dim_head": 8,
}


class SCFoundation(ClassifierMixin, PretrainedMixin, TrainingMixin, BaseModelClass):
    """scFoundation (xTrimoGene, Hao et al. 2024) as an scvi-tools model: pretrain, fine-tune.

    Every cell is read on the model's genes (genes of ``adata`` matched by symbol; model genes
    the data lacks are zero), ``log1p``-normalised to counts per 10,000, and given its two
    depth tokens. Training is the published read-depth-aware objective: the input is a
    downsampled copy of the cell (``sft.pp.downsample_rda``, registered as ``rda_layer``; its
    total count is ``S``), the target the original cell (total count ``T``); a share of the
    input's values is selected (30% of the non-zero, 3% of the zero ones; of those, as published,
    80% are masked, 10% given a random value and 10% left visible), and the model predicts
    the original values there, knowing ``T`` and ``S`` (mean squared error). The encoder sees
    only the expressed, unmasked genes; the Performer decoder the whole gene sequence.

    With cell types (``classes``, or ``labels_key`` registered by :meth:`setup_anndata`) the
    model gets the cell-type head of the official fine-tuning example (``finetune_model.py``:
    the encoder outputs max-pooled over the genes, ``BatchNorm1d`` and an MLP), and
    :meth:`train` fine-tunes it with the official freezing (``trainable``) and a weighted
    cross-entropy; :meth:`fine_tune_classifier` does all of that from a labelled reference,
    and :meth:`predict` labels cells.

    Call :meth:`setup_anndata` first. Start from scratch with this constructor, or from a
    checkpoint (official ``models.ckpt`` or :meth:`export`-ed) with :meth:`from_pretrained`,
    which needs no AnnData for inference.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`; ``None`` builds an unbound model for
        inference only (then ``gene_list`` is needed).
    gene_list
        The model's genes; ``None`` uses ``adata.var_names``.
    classes
        Cell types of a classifier head, in output order; ``None`` takes the categories of the
        registered ``labels_key``, or builds no head when none is registered. When labels are
        registered they must be these, in this order.
    trainable
        With a classifier head, what training updates (see :meth:`set_trainable`).
    **module_kwargs
        Architecture, passed to :class:`~scfm_tools.models.scfoundation.SCFoundationModule`
        (defaults: ``enc_dim=64``, ``enc_depth=2``, ``enc_heads=4``, ``dec_dim=32``,
        ``dec_depth=2``, ``dec_heads=4``, ``dec_dim_head=8``; the published model is 768/12/12
        and 512/6/8/64 on 19,264 genes).

    Examples
    --------
    >>> sft.pp.downsample_rda(adata)  # -> adata.layers["rda_counts"]
    >>> sft.models.SCFoundation.setup_anndata(adata, rda_layer="rda_counts")
    >>> model = sft.models.SCFoundation(adata)
    >>> model.train(max_epochs=10, plan_kwargs={"lr": 1e-3})
    >>> adata.obsm["X_scfoundation"] = model.get_latent_representation()
    >>> classifier = model.fine_tune_classifier(ref, "cell_type")
    >>> classifier.predict(query, threshold=0.5)
    """

    _module_cls = SCFoundationModule
    _training_plan_cls = SCFoundationTrainingPlan
    family = "scfoundation"
    # CellBench CEL-seq2 -> Drop-seq with scfoundation-default: macro-F1 0.977 in one run
    # (0.023 below logistic regression), 0.981 / 0.991 / 0.991 with seeds 0-2 on another machine,
    # 1.000 for the three averaged. Each copy took ~4 minutes there on 2 CPU cores.
    fine_tune_ensemble = 3
    # Raw counts or normalised values, as its pre_normalized option says: checked per call.
    values_needed = "own"

    def __init__(
        self,
        adata: AnnData | None = None,
        *,
        gene_list: Sequence[str] | None = None,
        classes: Sequence[str] | None = None,
        trainable: Trainable = "official",
        **module_kwargs: Any,
    ) -> None:
        unbound = None if adata is not None else unbound_registry("SCFoundation")
        super().__init__(adata, registry=unbound)
        if adata is None and gene_list is None:
            raise ValueError("an SCFoundation model built without adata needs its gene_list.")
        genes = [str(g) for g in (adata.var_names if gene_list is None else gene_list)]
        check_unique_names(pd.Index(genes), what="gene_list")
        self.gene_list = genes
        self.gene_match = (
            None if adata is None else match_adata_genes(adata, genes, caller="SCFoundation")
        )
        self._load_report: LoadReport | None = None
        self.classes = self._resolve_classes(classes)
        kwargs = {**DEFAULT_ARCHITECTURE, **module_kwargs}
        kwargs["n_classes"] = None if self.classes is None else len(self.classes)
        self.module = self._module_cls(len(genes), **kwargs)
        if self.classes is not None:
            self.set_trainable(trainable)
        cfg = self.module.config
        in_adata = "no AnnData" if adata is None else f"{self.gene_match.n_matched:,} in adata"
        head = "" if self.classes is None else f", cell-type head ({len(self.classes)} classes)"
        self._model_summary_string = (
            f"SCFoundation model: {len(genes):,} genes ({in_adata}), "
            f"encoder {cfg['enc_dim']} x {cfg['enc_depth']} layers, Performer decoder "
            f"{cfg['dec_dim']} x {cfg['dec_depth']} blocks{head}"
        )
        self.init_params_ = self._get_init_params(locals())

    def _resolve_classes(self, classes: Sequence[str] | None) -> list[str] | None:
        """Return the head's cell types: given, or registered; ``None``: no head."""
        registered = registered_classes(self.adata_manager)
        head = "pretrain" if classes is None and registered is None else "classifier"
        return resolve_classes(head, classes, registered, model="SCFoundation")

    # setup -------------------------------------------------------------------------------------
    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        layer: str | None = None,
        rda_layer: str | None = None,
        labels_key: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Register an AnnData for :class:`SCFoundation`.

        Both matrices must hold raw counts of the same cells and genes, with unique gene names
        and no empty cell. Nothing is written to ``adata`` when a check fails. With
        ``labels_key``, a model built on ``adata`` gets a cell-type head and :meth:`train`
        fine-tunes it.

        Parameters
        ----------
        adata
            Cells x genes raw counts; gene symbols in ``var_names``.
        layer
            Layer holding the original counts (the training target); ``None`` uses ``adata.X``.
        rda_layer
            Layer holding the downsampled counts the model reads in training, e.g.
            ``"rda_counts"`` from :func:`scfm_tools.pp.downsample_rda`; ``None`` trains on
            undownsampled input (``S = T``).
        labels_key
            Column of ``adata.obs`` with cell types (at least two, no missing value), for the
            classifier head.
        **kwargs
            Passed to :meth:`scvi.data.AnnDataManager.register_fields`.
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        check_counts(adata, layer)
        check_nonempty(adata, layer)
        check_unique_names(adata.var_names)
        fields = [LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=True)]
        if labels_key is not None:
            if rda_layer is not None:
                raise ValueError(
                    "labels_key= (fine-tuning for cell types) and rda_layer= (RDA pretraining) "
                    "do not go together; register one or the other."
                )
            check_labels_key(adata, labels_key)
            fields.append(CategoricalObsField(REGISTRY_KEYS.LABELS_KEY, labels_key))
        if rda_layer is not None:
            check_counts(adata, rda_layer)
            check_nonempty(adata, rda_layer)
            fields.append(LayerField(RDA_KEY, rda_layer, is_count_data=True))
        adata_manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        adata_manager.register_fields(adata, **kwargs)
        cls.register_manager(adata_manager)

    # pretrained weights ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike | ResolvedModel,
        adata: AnnData | None = None,
        *,
        entry: Entry = "gene",
        trainable: Trainable = "official",
        **module_kwargs: Any,
    ) -> SCFoundation:
        """Load one set of weights of a checkpoint, for inference, pretraining or fine-tuning.

        An official ``models.ckpt`` holds three: ``"cell"`` (the official cell embeddings),
        ``"rde"`` (read-depth enhancement, also for cell embeddings with ``--version rde``) and
        ``"gene"`` (gene embeddings and expression; the one the official fine-tuning example
        loads). ``sft.tl`` functions given a name or path pick the one the official scripts use
        for their task. The package's own layout (``models.safetensors``, see :meth:`export`)
        holds one, with the cell types of a fine-tuned classifier.

        Parameters
        ----------
        name_or_path
            A registered model name (``"scfoundation"``) or a local checkpoint: ``models.ckpt``
            (official layout) or a folder written by :meth:`export`.
        adata
            AnnData registered with :meth:`setup_anndata`, to train on; with ``labels_key``
            the model gets a cell-type head for its labels (the checkpoint's own when it has
            the same cell types, else a new one); ``None`` for inference on any AnnData.
        entry
            Which ``models.ckpt`` entry to load (``"gene"``, ``"cell"`` or ``"rde"``); the
            package's layout has one set of weights and ignores it.
        trainable
            With a cell-type head, what training updates (see :meth:`set_trainable`).
        **module_kwargs
            Runtime options of :class:`~scfm_tools.models.scfoundation.SCFoundationModule`
            (``dropout``, ``feature_redraw_interval``, ``key_max``, ``chunk_size``).

        Returns
        -------
        An :class:`SCFoundation` holding the checkpoint's weights; ``pretrained_`` records the
        source, the entry, the weights' sha256 and the load report.
        """
        resolved = cls.locate(name_or_path)
        pretrained, genes, config, report = load_scfoundation_checkpoint(
            resolved, entry, **module_kwargs
        )
        own = resolved.weights.suffix == ".safetensors"
        classes = config.get("classes") if own else None
        model = cls._around(pretrained, genes, adata, classes, trainable=trainable, **module_kwargs)
        model._load_report = report
        model._set_pretrained(resolved, report, entry=None if own else entry)
        return model

    @classmethod
    def _around(
        cls,
        pretrained: SCFoundationModule,
        genes: list[str],
        adata: AnnData | None,
        classes: list[str] | None,
        *,
        trainable: Trainable = "official",
        **module_kwargs: Any,
    ) -> SCFoundation:
        """Build a model holding ``pretrained``'s weights (a new head for other cell types)."""
        kwargs = dict(pretrained.config)
        for key in ("n_genes", "n_classes"):
            kwargs.pop(key)
        kwargs.update(module_kwargs)
        manager = None if adata is None else cls._get_most_recent_anndata_manager(adata)
        labelled = manager is not None and manager.registry["setup_args"].get("labels_key")
        model = cls._build(
            adata,
            gene_list=genes,
            classes=None if labelled else classes,
            trainable=trainable,
            **kwargs,
        )
        state = pretrained.state_dict()
        if model.classes is None or model.classes != classes:
            state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
            if model.classes is not None:
                logger.info("new cell-type head for %d classes", len(model.classes))
        # Same architecture by construction: only a replaced head may be left out.
        missing, unexpected = model.module.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("classifier.") for k in missing):
            raise RuntimeError(f"internal error: keys {missing + unexpected} did not carry over.")
        model.module.eval()
        return model

    @classmethod
    def pretrained_options(
        cls, task: str, options: Mapping[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Pick the ``models.ckpt`` entry the official scripts use for ``task``.

        Cell embeddings use ``"cell"`` (or ``"rde"`` with the option ``version="rde"``);
        imputation ``"gene"`` (or the option ``entry``); gene embeddings ``"gene"``.

        Parameters
        ----------
        task
            The method that will run.
        options
            The family options given to the tl function.

        Returns
        -------
        ``({"entry": ...}, options left for the method)``.
        """
        options = dict(options)
        if task == "get_latent_representation":
            return {"entry": entry_for("cell", options.pop("version", "ce"))}, options
        if task == "get_imputed_expression":
            entry = options.pop("entry", "gene")
            if entry not in ("gene", "rde"):
                raise ValueError(f"entry must be 'gene' or 'rde', got {entry!r}.")
            return {"entry": entry}, options
        return {"entry": entry_for("gene")}, options

    def export(
        self,
        path: str | os.PathLike,
        *,
        overwrite: bool = False,
        weights: Literal["ckpt", "safetensors"] | None = None,
    ) -> Path:
        """Write the model as a checkpoint that :meth:`from_pretrained` and ``sft.tl`` read.

        ``weights="ckpt"``: an official ``models.ckpt`` (same weights in all three entries),
        also read by the official ``load_model_frommmf``. ``"safetensors"``: the package's own
        layout, a folder with ``models.safetensors`` (tensors only, nothing to unpickle) and
        ``config.json`` (``"architecture"``: the module's arguments; ``"classes"``: the cell
        types of a classifier in the order of its outputs, else null; ``"classifier_input"``:
        how the classifier reads cells). Either way, when the model's genes are not the
        official 19,264, its gene list is written beside as ``OS_scRNA_gene_index.19264.tsv``
        (the file name the loaders look for).

        Parameters
        ----------
        path
            ``"ckpt"``: the file to write (e.g. ``"models/models.ckpt"``) or a folder to write
            it in; ``"safetensors"``: the folder.
        overwrite
            Replace existing files.
        weights
            ``"ckpt"`` or ``"safetensors"``; ``None``: ``"safetensors"`` for a model with a
            cell-type head (``models.ckpt`` has no place for its cell types), else ``"ckpt"``.

        Returns
        -------
        Path of the weights file.
        """
        from ._checkpoint import GENE_INDEX_FILE

        if weights is None:
            weights = "ckpt" if self.classes is None else "safetensors"
        if weights not in ("ckpt", "safetensors"):
            raise ValueError(f"weights must be 'ckpt', 'safetensors' or None, got {weights!r}.")
        path = Path(path).expanduser()
        if weights == "safetensors":
            return write_scfoundation_safetensors(
                path,
                self.module,
                self.gene_list,
                classes=self.classes,
                classifier_input=None if self.classes is None else CLASSIFIER_INPUT,
                overwrite=overwrite,
            )
        if self.classes is not None:
            raise ValueError(
                "a model with a cell-type head cannot be written as models.ckpt (the official "
                "format has no place for its cell types): use weights='safetensors'."
            )
        if path.is_dir() or not path.suffix:
            path = path / "models.ckpt"
        genes_path = path.parent / GENE_INDEX_FILE
        existing = [p.name for p in (path, genes_path) if p.exists()]
        if existing and not overwrite:
            raise FileExistsError(f"{existing} exist in {path.parent}; pass overwrite=True.")
        path.parent.mkdir(parents=True, exist_ok=True)
        entry = official_entry(self.module)
        torch.save({"cell": entry, "gene": entry, "rde": entry}, path)
        write_gene_index(path.parent, self.gene_list)
        return path

    # training ----------------------------------------------------------------------------------
    @doc_params(scale=DOC_TRAIN_SCALE)
    def train(
        self,
        max_epochs: int = 10,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        train_size: float | None = None,
        validation_size: float | None = None,
        batch_size: int = 32,
        random_state: int | None = None,
        plan_kwargs: dict[str, Any] | None = None,
        *,
        class_weights: ClassWeights = "official",
        strategy: str | Strategy = "auto",
        num_nodes: int = 1,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_kwargs: dict[str, Any] | None = None,
        resume: bool | str | os.PathLike = False,
        **kwargs: Any,
    ):
        """Pretrain with the RDA objective, or fine-tune the cell-type head, through Lightning.

        A model with a cell-type head trains it on the registered labels, updating what
        :meth:`set_trainable` left trainable (by default the official choice), with a weighted
        cross-entropy; :meth:`fine_tune_classifier` adds a stratified validation split, early
        stopping and the best epoch's weights.

        Parameters
        ----------
        max_epochs
            Passes over the training cells (counting those done before a resume).
        accelerator
            Lightning accelerator (``"auto"``, ``"cpu"``, ``"gpu"`` ...).
        devices
            Devices (processes) per node: a number, a list of GPU indices, or ``"auto"`` (one).
        train_size
            Fraction of cells for training (scvi-tools default 0.9).
        validation_size
            Fraction of cells for validation (default: the rest).
        batch_size
            Cells per minibatch and process.
        random_state
            Seed of the split, the data order, the masks and the dropout (``None``:
            ``sft.settings.seed``).
        plan_kwargs
            Passed to :class:`~scfm_tools.models.scfoundation.SCFoundationTrainingPlan`:
            ``lr`` (1e-4), ``value_mask_prob`` (0.3), ``zero_mask_prob`` (0.03),
            ``replace_prob`` (0.8), ``random_token_prob`` (0.1), ``weight_decay``, ``eps``
            (1e-8) ...
        class_weights
            Cell-type head only (RDA pretraining ignores it): loss weights against imbalanced
            cell types, from the training cells of each type: ``"official"`` (``(1 - n_c /
            N)^2``, the weighting of scBERT's official fine-tuning; scFoundation's example sets
            none), ``"balanced"`` (``N / (K n_c)``), explicit weights, or ``None``; see
            :func:`~scfm_tools.train.compute_class_weights`. ``"balanced"`` gives a cell type
            of one or two reference cells a weight of 50-150 and can make the head call many
            cells by it (pbmc8k, 1,000/1,000 cells, scfoundation-default, three seeds:
            macro-F1 0.695-0.877 balanced, 0.860-0.876 official, 0.870-0.885 none).
        {scale}
        **kwargs
            Passed to :meth:`scvi.model.base.UnsupervisedTrainingMixin.train` and on to the
            Lightning trainer (``check_val_every_n_epoch``, ``early_stopping``,
            ``precision`` ...).

        Returns
        -------
        What scvi-tools' training runner returns; losses per epoch are in ``history``
        (``train_loss_epoch``, ``validation_loss`` ...).
        """
        plan = {
            "gene_index": (
                self.module.classifier_index(self.gene_match.index)
                if self.module.is_classifier
                else self.gene_match.index
            ),
            "random_state": resolve_seed(random_state),
            **(plan_kwargs or {}),
        }
        if self.module.is_classifier:
            self._prepare_classifier_training(class_weights)
        return super().train(
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            train_size=train_size,
            validation_size=validation_size,
            batch_size=batch_size,
            plan_kwargs=plan,
            strategy=strategy,
            num_nodes=num_nodes,
            checkpoint_dir=checkpoint_dir,
            checkpoint_kwargs=checkpoint_kwargs,
            resume=resume,
            **kwargs,
        )

    def _prepare_classifier_training(self, class_weights: ClassWeights) -> None:
        """Check the labels and cells, set the class weights and the training mode."""
        if registered_classes(self.adata_manager) is None:
            raise ValueError(
                "this model has a cell-type head, but its AnnData has no labels registered: call "
                "SCFoundation.setup_anndata(adata, labels_key=...) and build the model on it, or "
                "use fine_tune_classifier(reference, labels_key)."
            )
        if self.registry_["setup_args"].get("rda_layer") is not None:
            raise ValueError("a cell-type head is trained on the counts; rda_layer= is not used.")
        adata = self.adata
        X = get_matrix(adata, self._layer(None))
        columns = np.flatnonzero(self.gene_match.matched)
        empty = np.flatnonzero(np.asarray((X[:, columns] != 0).sum(axis=1)).ravel() == 0)
        if empty.size:
            raise InputError(
                f"{empty.size} cells (e.g. {list(adata.obs_names[empty[:3]])}) express none of "
                "the model's genes, so the classifier cannot read them; drop them first."
            )
        codes = self.adata_manager.get_from_registry(REGISTRY_KEYS.LABELS_KEY)
        counts = np.bincount(np.asarray(codes).ravel().astype(int), minlength=len(self.classes))
        self.module.class_weights = compute_class_weights(counts, class_weights)
        # Lightning keeps the module's mode; dropout and the head's batch statistics need training.
        self.module.train()

    def set_trainable(self, trainable: Trainable = "official") -> None:
        """Choose which parameters training updates (with a cell-type head).

        Parameters
        ----------
        trainable
            ``"official"``: the head and the second-to-last encoder layer (the last one when
            there is one layer), everything else frozen, token and position embeddings
            included, as the official ``finetune_model.py``; ``"head"``: the head only;
            ``"all"``: everything.
        """
        if trainable not in ("official", "head", "all"):
            raise ValueError(f"trainable must be 'official', 'head' or 'all', got {trainable!r}.")
        if not self.module.is_classifier:
            raise ValueError("set_trainable applies to a model with a cell-type head.")
        for param in self.module.parameters():
            param.requires_grad_(trainable == "all")
        parts: list[torch.nn.Module] = [self.module.classifier]
        if trainable == "official":
            layers = self.module.encoder.transformer_encoder
            parts.append(layers[-2 if len(layers) > 1 else -1])
        for part in parts:
            for param in part.parameters():
                param.requires_grad_(True)
        self.trainable_ = trainable

    def fine_tune_classifier(
        self,
        reference: AnnData,
        labels_key: str,
        *,
        layer: str | None = None,
        gene_key: str | None = None,
        max_epochs: int = 20,
        batch_size: int = 32,
        class_weights: ClassWeights = "official",
        trainable: Trainable = "official",
        validation_size: float = 0.1,
        patience: int = 3,
        dropout: float | None = 0.0,
        max_genes: int | None = MAX_GENES,
        n_top_genes: int | None = MAX_GENES,
        random_state: int | None = 0,
        train_kwargs: Mapping[str, Any] | None = None,
    ) -> SCFoundation:
        """Fine-tune a copy of this model for the cell types of a labelled reference.

        As the official fine-tuning example (``finetune_model.py``): a cell-type head on the
        encoder outputs max-pooled over the genes, trained with the second-to-last encoder
        layer while the rest stays frozen (``trainable``), here with a weighted cross-entropy
        against imbalanced cell types and no dropout (see ``dropout``). A stratified share of
        the reference (``validation_size``) is held out: training stops when its loss has not
        improved for ``patience`` epochs, and the weights of its best epoch are kept. This
        model is left as it is.

        Parameters
        ----------
        reference
            Raw counts of labelled cells. Registered with :meth:`setup_anndata`
            ``(labels_key=...)``, it is trained on as it is; otherwise its counts, labels (cells
            without one are left out) and genes are read into a new AnnData, and ``reference``
            is not modified.
        labels_key
            Column of ``reference.obs`` with the cell types.
        layer
            Layer of ``reference`` with the counts (an unregistered reference; ``None``: ``X``).
        gene_key
            ``reference.var`` column with gene symbols (an unregistered reference; ``None``:
            ``var_names``).
        max_epochs
            Most passes over the training cells.
        batch_size
            Cells per minibatch.
        class_weights
            See :meth:`train`.
        trainable
            See :meth:`set_trainable`.
        validation_size
            Share of each cell type held out to watch (early stopping, best weights); ``0``
            trains on every cell for ``max_epochs`` epochs.
        patience
            Epochs without a lower validation loss before training stops.
        dropout
            Dropout of the encoder layers while fine-tuning; ``None``: this model's (0.1 in
            the published one, as torch's default, which the official example keeps). On CPU
            PyTorch runs attention with dropout without its fused kernel, holding every cell's
            full attention matrix: 4 CellBench cells (~7,700 tokens) took 13.8 GB with dropout
            and 0.9 GB without. Without dropout pbmc8k annotation lost nothing (macro-F1 0.870
            vs 0.862 with 0.1, class_weights=None, scfoundation-default).
        max_genes
            The head reads at most this many genes of a cell, its most expressed, in training
            and in prediction (kept with the model); ``None``: every expressed gene, as the
            official example. Attention cost grows with the square of a cell's genes: one
            deep CellBench cell (~7,700 genes) costs as much as ~14 cells capped at 2,048, and
            fine-tuning 240 of them uncapped had not finished in 18 minutes on 2 CPU cores.
            Droplet cells (a few hundred to ~2,000 genes) are rarely capped.
        n_top_genes
            The head reads only the reference's most variable genes (scanpy's
            ``highly_variable_genes(flavor="seurat")`` on its counts per 10,000, ``log1p``,
            among the genes the model knows), in training and in prediction (kept with the
            model): every cell, reference or query, is read and normalised over the same gene
            panel, whatever its protocol's depth and gene detection. ``None``: every gene, as
            the official example. Measured with ``scfoundation-default``
            (``benchmarks/bench_annotation.py``), macro-F1 across CellBench's protocols
            (logistic regression 1.000 both ways): CEL-seq2 -> Drop-seq 0.958 on every gene,
            0.977 on 2,048 HVGs; Drop-seq -> CEL-seq2 0.963 and 0.996; train + predict 258 and
            221 s on every gene, 144 and 93 s on the panel. pbmc8k (200 genes) is unchanged.
        random_state
            Seed of the new head, the split, the data order and the dropout (``None``:
            ``sft.settings.seed``); the caller's global torch random state is left alone.
        train_kwargs
            Passed to :meth:`train`: ``plan_kwargs`` (``lr``, default 1e-3, ``weight_decay``
            ...), ``accelerator``, ``devices``, ``precision``, ``enable_progress_bar`` ...

        Returns
        -------
        The fine-tuned :class:`SCFoundation` (:attr:`classes`, :attr:`history`).
        """
        if isinstance(patience, bool) or int(patience) < 1:
            raise ValueError(f"patience must be a positive integer, got {patience!r}.")
        seed = resolve_seed(random_state)
        ref = labelled_reference(type(self), reference, labels_key, layer, gene_key)
        train_kwargs = dict(train_kwargs or {})
        plan = {
            "random_state": seed,
            "lr": FINE_TUNE_LR,
            **(train_kwargs.pop("plan_kwargs", None) or {}),
        }
        with seeded_torch(seed):
            options = {
                "classifier_max_genes": max_genes,
                "classifier_genes": self._variable_reference_genes(ref, n_top_genes),
            }
            if dropout is not None:
                options["dropout"] = float(dropout)
            model = type(self)._around(
                self.module, self.gene_list, ref, self.classes, trainable=trainable, **options
            )
            codes = model.adata_manager.get_from_registry(REGISTRY_KEYS.LABELS_KEY)
            train, validation = early_stopping_split(
                codes, validation_size, seed, patience, train_kwargs
            )
            model.train(
                max_epochs=max_epochs,
                batch_size=batch_size,
                class_weights=class_weights,
                plan_kwargs=plan,
                datasplitter_kwargs={"external_indexing": [train, validation, np.empty(0, int)]},
                **train_kwargs,
            )
        model.pretrained_ = {**getattr(self, "pretrained_", {}), "fine_tuned": True}
        return model

    def _variable_reference_genes(self, ref: AnnData, n_top: int | None) -> list[int] | None:
        """Model gene positions of the registered reference's ``n_top`` most variable genes."""
        if n_top is None:
            return None
        if isinstance(n_top, bool) or int(n_top) < 1:
            raise ValueError(f"n_top_genes must be a positive integer or None, got {n_top!r}.")
        layer = type(self)._get_most_recent_anndata_manager(ref).registry["setup_args"]["layer"]
        match = match_adata_genes(ref, self.gene_list, caller="SCFoundation")
        return variable_genes(get_matrix(ref, layer), match, int(n_top))

    # outputs -----------------------------------------------------------------------------------
    def _model_genes(self) -> Any:
        return self.gene_list

    def _layer(self, layer: str | None) -> str | None:
        return self.registry_["setup_args"].get("layer") if layer is None else layer

    @property
    def _entry(self) -> str | None:
        """The ``models.ckpt`` entry the weights came from (``None``: not from a checkpoint)."""
        return getattr(self, "pretrained_", {}).get("entry")

    def _require(self, prefixes: tuple[str, ...], what: str) -> None:
        """Refuse weights the checkpoint lacked (they would be a random initialisation)."""
        report = self._load_report
        if report is not None and any(k.startswith(prefixes) for k in report.missing):
            raise ValueError(
                f"the checkpoint {self.model_name} [{self._entry!r}] lacks the {what} weights, so "
                "it cannot give this output."
            )

    @torch.inference_mode()
    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        layer: str | None = None,
        gene_key: str | None = None,
        batch_size: int = 8,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        target_depth: TargetDepth = "t4",
        pool: Pool = "all",
        pre_normalized: PreNormalized = "F",
        input_type: InputType = "singlecell",
        total_counts_key: str | None = None,
        return_info: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, dict[str, Any]]:
        """Cell embeddings (the official ``get_embedding.py --output_type cell``).

        scFoundation is deterministic and its encoder reads every expressed gene (no
        ``max_length``, no random draws).

        Parameters
        ----------
        adata
            Cells to embed (``None``: the model's AnnData); genes are matched to the model's.
        indices
            Cells to embed; ``None`` embeds all.
        layer
            Layer with the values (``None``: the registered layer, else ``X``).
        gene_key
            ``adata.var`` column with gene symbols (``None``: ``var_names``).
        batch_size
            Most cells per forward pass.
        chunk_size
            Cells read and prepared at a time.
        target_depth
            The ``T`` token (``--tgthighres``): ``"tX"`` sets ``T = X`` (a total count of
            ``10**X``); ``"fX"``: ``X`` times the cell's own total count; ``"aX"``: ``log10`` of
            its total count plus ``X``; or a total count such as ``1e4``.
        pool
            ``"all"`` (``[S, T, max, mean]``, ``4 * enc_dim``) or ``"max"``.
        pre_normalized
            ``"F"``: raw counts; ``"T"``: ``log1p`` of counts per 10,000 already (the source
            depth is then the sum of the given values, as officially); ``"A"``: such values with
            each cell's total count in ``adata.obs[total_counts_key]``.
        input_type
            ``"singlecell"`` or ``"bulk"`` (samples normalised to the median total, ``T = S``).
        total_counts_key
            ``adata.obs`` column with total counts (``pre_normalized="A"``).
        return_info
            Also return what to record about the run.

        Returns
        -------
        ``(n_cells, 4 * enc_dim)`` or ``(n_cells, enc_dim)`` float32 array (and the run's
        record with ``return_info=True``).
        """
        adata = self._cells(adata, indices)
        layer = self._layer(layer)
        depth, totals, options = prepare_options(
            adata,
            layer,
            target_depth=target_depth,
            pre_normalized=pre_normalized,
            input_type=input_type,
            total_counts_key=total_counts_key,
        )
        match = self.match_genes(adata, gene_key)
        emb = embed_matrix(
            self.module,
            get_matrix(adata, layer),
            match,
            output="cell",
            pool=pool,
            target_depth=depth,
            pre_normalized=pre_normalized,
            input_type=input_type,
            total_counts=totals,
            batch_size=batch_size,
            device=self.device,
            chunk_size=chunk_size,
            obs_names=adata.obs_names,
        )
        if not return_info:
            return emb
        info = {
            "n_genes_matched": int(match.n_matched),
            "n_genes_model": self.module.n_genes,
            "entry": self._entry,
            "pool": pool,
            **options,
        }
        return emb, info

    @torch.inference_mode()
    def get_gene_expression(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        target_depth: TargetDepth = "t4",
        output: Literal["gene_expression", "gene"] = "gene_expression",
        layer: str | None = None,
        gene_key: str | None = None,
        batch_size: int = 8,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> np.ndarray:
        """Predicted expression (or the decoder's gene embeddings) at a target depth.

        Parameters
        ----------
        adata
            Cells to run, raw counts (``None``: the model's AnnData).
        indices
            Cells to run; ``None`` runs all.
        target_depth
            The depth to predict at (see
            :func:`~scfm_tools.models.scfoundation.parse_target_depth`).
        output
            ``"gene_expression"``: ``log1p`` counts per 10,000, ``(n_cells, n_genes)``;
            ``"gene"``: the decoder's gene embeddings ``(n_cells, n_genes, dec_dim)``.
        layer, gene_key, batch_size, chunk_size
            As in :meth:`get_latent_representation`.

        Returns
        -------
        float32 array, genes in the model's order (:attr:`gene_list`).
        """
        adata = self._cells(adata, indices)
        match = self.match_genes(adata, gene_key)
        if match.n_matched == 0:
            raise InputError("no gene of adata is in the model's gene list.")
        return embed_matrix(
            self.module,
            get_matrix(adata, self._layer(layer)),
            match,
            output=output,
            target_depth=target_depth,
            batch_size=batch_size,
            device=self.device,
            chunk_size=chunk_size,
            obs_names=adata.obs_names,
        )

    @torch.inference_mode()
    def get_imputed_expression(
        self,
        adata: AnnData,
        *,
        layer: str | None = None,
        gene_key: str | None = None,
        batch_size: int = 8,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        target_depth: TargetDepth = "t4",
        clip_negative: bool = True,
    ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, Any]]:
        """Each cell's expression as if sequenced at ``target_depth`` (``sft.tl.impute``).

        Each cell (raw counts, normalised as the official ``pre_normalized="F"``) is encoded
        from its expressed genes and its ``S`` (observed depth) and ``T`` (``target_depth``)
        tokens; the decoder and regression head predict every model gene's
        ``log1p``-normalised expression (natural log of counts per 10,000), the official
        ``--output_type gene_expression`` output. Genes the model does not know are NaN.

        Parameters
        ----------
        adata
            Cells, raw counts.
        layer, gene_key, batch_size, chunk_size
            As in :meth:`get_latent_representation`.
        target_depth
            The depth to predict at (see :meth:`get_latent_representation`).
        clip_negative
            Set predictions below 0 (impossible for ``log1p`` values) to 0.

        Returns
        -------
        ``(imputed (n_obs, n_vars) float32, var columns (none), the run's record)``.
        """
        depth = parse_target_depth(target_depth)
        self._require(("decoder.", "to_final."), "decoder or regression-head")
        match = self.match_genes(adata, gene_key)
        cols = np.flatnonzero(match.matched)
        model_cols = match.index[cols]
        out = np.full(adata.shape, np.nan, dtype=np.float32)
        blocks = prepare_blocks(
            get_matrix(adata, self._layer(layer)),
            GeneReindexer(match.index, self.module.n_genes),
            pre_normalized="F",
            input_type="singlecell",
            depth=depth,
            total_counts=None,
            chunk_size=chunk_size,
            obs_names=adata.obs_names,
        )
        start = 0
        outputs = iter_outputs(
            self.module,
            blocks,
            output="gene_expression",
            batch_size=batch_size,
            device=self.device,
            n_cells=adata.n_obs,
        )
        for predicted in outputs:
            if clip_negative:
                np.maximum(predicted, 0.0, out=predicted)
            stop = start + predicted.shape[0]
            out[start:stop, cols] = predicted[:, model_cols]
            start = stop
        params = {
            "n_genes_matched": int(match.n_matched),
            "entry": self._entry,
            "target_depth": depth.text,
            "clip_negative": bool(clip_negative),
            "values": "log1p(counts per 10,000) at the target depth",
        }
        return out, {}, params

    def embed_var_genes(
        self,
        adata: AnnData,
        *,
        mode: Literal["token", "context"] = "token",
        layer: str | None = None,
        gene_key: str | None = None,
        batch_size: int = 64,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        target_depth: TargetDepth = "t4",
        pre_normalized: PreNormalized = "F",
        input_type: InputType = "singlecell",
        total_counts_key: str | None = None,
    ) -> GeneEmbeddings:
        """Embed the genes of ``adata`` (``sft.tl.embed_genes``), one row per ``var`` entry.

        ``mode="token"``: the gene's row of the position embedding ``pos_emb`` (``enc_dim``
        wide); no value is read, and the preparation options play no role (they are still
        checked). ``mode="context"``: each cell prepared as by
        :meth:`get_latent_representation`, run through encoder and decoder, and each gene's
        decoder output (official ``output_type="gene"``, ``dec_dim`` wide) averaged over
        **all** cells, since the decoder reads every gene of every cell. The returned
        ``n_cells`` counts, per gene, the cells that express it (whose encoder read it).

        Parameters
        ----------
        adata
            Its genes are matched to the model's; context mode also reads its cells.
        mode
            ``"token"`` or ``"context"``.
        layer, gene_key, batch_size, chunk_size, target_depth, pre_normalized, input_type, total_counts_key
            As in :meth:`get_latent_representation`.

        Returns
        -------
        The embeddings on ``var`` (NaN rows for genes without one), the match mask, the
        expressing cells per gene (context mode) and the run's record.
        """  # noqa: E501
        if mode not in ("token", "context"):
            raise ValueError(f"mode must be 'token' or 'context', got {mode!r}.")
        if mode == "token":
            check_options(pre_normalized, input_type)
            parse_target_depth(target_depth)
            self._require(("pos_emb.",), "gene (position) embedding")
            match = self.match_genes(adata, gene_key)
            rows = token_table_rows(token_gene_embeddings(self.module), match)
            params = {
                "n_genes_matched": int(match.n_matched),
                "entry": self._entry,
                "table": "pos_emb",
            }
            return GeneEmbeddings(rows, match.matched.copy(), None, params)
        layer = self._layer(layer)
        depth, totals, options = prepare_options(
            adata,
            layer,
            target_depth=target_depth,
            pre_normalized=pre_normalized,
            input_type=input_type,
            total_counts_key=total_counts_key,
        )
        self._require(("decoder.", "decoder_embed.", "norm."), "decoder")
        match = self.match_genes(adata, gene_key)
        blocks = prepare_blocks(
            get_matrix(adata, layer),
            GeneReindexer(match.index, self.module.n_genes),
            pre_normalized=pre_normalized,
            input_type=input_type,
            depth=depth,
            total_counts=totals,
            chunk_size=chunk_size,
            obs_names=adata.obs_names,
        )
        means, expressed = context_gene_embeddings(
            self.module, blocks, batch_size=batch_size, device=self.device, n_cells=adata.n_obs
        )
        cols = match.index[match.matched]
        n_cells = np.zeros(match.n_genes, dtype=np.int64)
        n_cells[match.matched] = expressed[cols]
        params: dict[str, Any] = {
            "n_genes_matched": int(match.n_matched),
            "entry": self._entry,
            "output": "decoder gene embeddings, mean over all cells",
            "n_cells_counts": "cells expressing the gene",
            **options,
        }
        return GeneEmbeddings(
            rows_on_var(means[cols], match), match.matched.copy(), n_cells, params
        )

    @torch.inference_mode()
    def predict_proba(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        layer: str | None = None,
        gene_key: str | None = None,
        batch_size: int = 32,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> pd.DataFrame:
        """Cell-type probabilities of each cell (cell-type head), cells x classes.

        Each cell is read as in fine-tuning (raw counts, ``log1p`` of counts per 10,000; its
        expressed genes without the ``T`` and ``S`` depth tokens, as the official example),
        encoded, max-pooled over its genes and classified.

        Parameters
        ----------
        adata
            Cells, raw counts (``None``: the model's AnnData); genes are matched to the model's.
        indices
            Cells to run; ``None`` runs all.
        layer
            Layer with the counts (``None``: the registered layer, else ``X``).
        gene_key
            ``adata.var`` column with gene symbols (``None``: ``var_names``).
        batch_size
            Most cells per forward pass.
        chunk_size
            Cells read and prepared at a time.

        Returns
        -------
        A DataFrame indexed by ``obs_names``, one column per class (:attr:`classes`).
        """
        if self.classes is None:
            raise ValueError(
                "this SCFoundation model has no cell-type head: fine-tune it first with "
                "fine_tune_classifier(reference, labels_key) (or pass a labelled reference to "
                "sft.tl.annotate)."
            )
        adata = self._cells(adata, indices)
        layer = self._layer(layer)
        check_counts(adata, layer)
        match = self.match_genes(adata, gene_key)
        blocks = prepare_blocks(
            get_matrix(adata, layer),
            GeneReindexer(self.module.classifier_index(match.index), self.module.n_genes),
            pre_normalized="F",
            input_type="singlecell",
            depth=parse_target_depth(CLASSIFIER_TARGET_DEPTH),
            total_counts=None,
            chunk_size=chunk_size,
            obs_names=adata.obs_names,
        )
        parts = list(
            iter_outputs(
                self.module,
                blocks,
                output="proba",
                batch_size=batch_size,
                device=self.device,
                n_cells=adata.n_obs,
            )
        )
        return proba_frame(parts, adata.obs_names, self.classes)
