"""The AnnData-facing scBERT model: setup, pretraining, fine-tuning, embedding, annotation."""

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

from ..._anndata import DEFAULT_CHUNK_SIZE, get_matrix, resolve_seed, row_blocks
from ..._docs import doc_params
from ..._validation import check_counts, check_unique_names
from ...pp._match_genes import GeneMatch, match_adata_genes
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
    Head,
    check_labels_key,
    labelled_reference,
    proba_frame,
    registered_classes,
    resolve_classes,
)
from .._gene_embeddings import GeneEmbeddings, token_table_rows
from .._safetensors import write_safetensors
from ..base import PretrainedMixin, unbound_registry
from ._checkpoint import GENE_LIST_FILE, load_scbert_checkpoint, read_gene_list
from ._embed import embed_matrix, iter_probabilities
from ._module import SCBERTModule
from ._tokenizer import SCBERTTokenizer
from ._training_plan import SCBERTTrainingPlan

if TYPE_CHECKING:
    from anndata import AnnData
    from lightning.pytorch.strategies import Strategy

    from ...hub import ResolvedModel

__all__ = ["CLASSES_FILE", "SCBERT", "compute_class_weights"]

logger = logging.getLogger("scfm_tools")

CLASSES_FILE = "classes.txt"
# The official fine-tuning learning rate, for the published model's width.
OFFICIAL_LR = 1e-4
OFFICIAL_DIM = 200
Trainable = Literal["official", "all", "head"]


def _gene2vec_table(gene2vec, n_genes: int, dim: int) -> torch.Tensor | None:
    if gene2vec is None or gene2vec is False or gene2vec is True:
        return None
    table = np.load(gene2vec) if isinstance(gene2vec, str | os.PathLike) else np.asarray(gene2vec)
    if table.shape != (n_genes, dim):
        raise ValueError(
            f"the gene2vec table has shape {table.shape}, but the model needs ({n_genes}, {dim}) "
            "(one row per gene, in gene-list order, of the model's width)."
        )
    return torch.from_numpy(table.astype(np.float64))


def _checkpoint_classes(path: Path, n_classes: int, required: bool) -> list[str] | None:
    """Read a fine-tuned checkpoint's cell types (``classes.txt``); None when absent."""
    if not path.is_file():
        if not required:
            return None
        raise FileNotFoundError(
            f"the fine-tuned scBERT checkpoint in {path.parent} has no {CLASSES_FILE}: write its "
            f"{n_classes} cell-type names there, one per line, in the order of the classifier "
            "outputs (the official label_dict order, i.e. sorted), or fine-tune from a "
            "reference with reference= and label_key=."
        )
    classes = read_gene_list(path)
    if len(classes) != n_classes:
        raise ValueError(
            f"{path} lists {len(classes)} cell types, but the checkpoint's classifier has "
            f"{n_classes} outputs."
        )
    return classes


class SCBERT(ClassifierMixin, PretrainedMixin, TrainingMixin, BaseModelClass):
    """scBERT (Yang et al. 2022) as an scvi-tools model: pretrain, fine-tune, embed, annotate.

    Every cell is read on the model's gene list (16,906 genes for the published model; genes
    of ``adata`` are matched to it by symbol, missing ones are zero), depth-normalised,
    ``log2(1 + x)``-binned into tokens and encoded by a Performer. With the pretraining head
    (``head="pretrain"``) :meth:`train` runs the published masked-bin objective; with the
    classifier head (``head="classifier"``, cell types from ``labels_key``) it fine-tunes for
    annotation, and :meth:`predict` labels cells.

    Call :meth:`setup_anndata` first. Start from scratch with this constructor, or from a
    checkpoint (official or exported here) with :meth:`from_pretrained`, which needs no
    AnnData for embedding or prediction.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`; ``None`` builds an unbound model for
        inference only (then ``genes`` is needed, and ``classes`` for the classifier head).
    genes
        The model's gene list; ``None`` uses ``adata.var_names``.
    head
        ``"pretrain"`` (masked-bin logits) or ``"classifier"`` (the official fine-tuning head,
        one class per category of the registered ``labels_key``).
    classes
        Class names of the classifier head; ``None`` takes the registered label categories.
        When labels are registered they must be these, in this order.
    gene2vec
        Gene embedding added to every token: ``None`` for none (official
        ``g2v_position_emb=False``), a path to a ``.npy`` table or an array of shape
        ``(n_genes, dim)`` (e.g. ``gene2vec_16906.npy``), or ``True`` for a table to be filled
        from a checkpoint.
    num_tokens
        Token classes, ``bin_num + 2`` (7 in the published model).
    dim, depth, heads, dim_head
        Performer size (published: 200, 6, 10, 64).
    **module_kwargs
        Passed to :class:`~scfm_tools.models.scbert.SCBERTModule` (``nb_features``,
        ``ff_mult``, dropout rates, ``head_hidden``, ``feature_redraw_interval``,
        ``key_max``, ``chunk_size`` ...).

    Examples
    --------
    >>> sft.models.SCBERT.setup_anndata(ref, labels_key="cell_type")
    >>> model = sft.models.SCBERT.from_pretrained("panglao_pretrain.pth", ref, head="classifier")
    >>> model.train(max_epochs=10, class_weights="official")
    >>> model.predict(query, threshold=0.5)
    """

    _module_cls = SCBERTModule
    _training_plan_cls = SCBERTTrainingPlan
    family = "scbert"
    values_needed = "counts"

    def __init__(
        self,
        adata: AnnData | None = None,
        *,
        genes: Sequence[str] | None = None,
        head: Head = "pretrain",
        classes: Sequence[str] | None = None,
        gene2vec: str | os.PathLike | np.ndarray | bool | None = None,
        num_tokens: int = 7,
        dim: int = 200,
        depth: int = 6,
        heads: int = 10,
        dim_head: int = 64,
        **module_kwargs: Any,
    ) -> None:
        super().__init__(adata, registry=None if adata is not None else unbound_registry("SCBERT"))
        if head not in ("pretrain", "classifier"):
            raise ValueError(f"head must be 'pretrain' or 'classifier', got {head!r}.")
        if adata is None and genes is None:
            raise ValueError("an SCBERT model built without adata needs its genes.")
        genes = [str(g) for g in (adata.var_names if genes is None else genes)]
        check_unique_names(pd.Index(genes), what="genes")
        self.genes = genes
        self.gene_match = (
            None if adata is None else match_adata_genes(adata, genes, caller="SCBERT")
        )
        self.classes = resolve_classes(
            head, classes, registered_classes(self.adata_manager), model="SCBERT"
        )
        self.module = self._module_cls(
            len(genes),
            num_tokens=num_tokens,
            dim=dim,
            depth=depth,
            heads=heads,
            dim_head=dim_head,
            gene2vec=gene2vec is not None and gene2vec is not False,
            gene2vec_weight=_gene2vec_table(gene2vec, len(genes), dim),
            n_classes=None if self.classes is None else len(self.classes),
            **module_kwargs,
        )
        in_adata = "no AnnData" if adata is None else f"{self.gene_match.n_matched:,} in adata"
        self._model_summary_string = (
            f"SCBERT model: {len(genes):,} genes ({in_adata}), "
            f"dim {dim}, {depth} blocks, {heads} heads of {dim_head}, {num_tokens} tokens, "
            + (
                "pretraining head"
                if self.classes is None
                else f"classifier head ({len(self.classes)} classes)"
            )
        )
        self.init_params_ = self._get_init_params(locals())

    # setup ---------------------------------------------------------------------------------------
    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        layer: str | None = None,
        labels_key: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Register an AnnData for :class:`SCBERT`.

        The matrix must hold raw counts (scBERT normalises and bins them itself), with unique
        gene names. Nothing is written to ``adata`` when a check fails.

        Parameters
        ----------
        adata
            Cells x genes; gene symbols in ``var_names``.
        layer
            Layer holding the counts; ``None`` uses ``adata.X``.
        labels_key
            Column of ``adata.obs`` with cell types, for the classifier head.
        **kwargs
            Passed to :meth:`scvi.data.AnnDataManager.register_fields`.
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        check_counts(adata, layer)
        check_unique_names(adata.var_names)
        check_labels_key(adata, labels_key)
        anndata_fields = [
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=True),
            CategoricalObsField(REGISTRY_KEYS.LABELS_KEY, labels_key),
        ]
        adata_manager = AnnDataManager(fields=anndata_fields, setup_method_args=setup_method_args)
        adata_manager.register_fields(adata, **kwargs)
        cls.register_manager(adata_manager)

    # pretrained weights --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike | ResolvedModel,
        adata: AnnData | None = None,
        *,
        gene_list: str | os.PathLike | Sequence[str] | None = None,
        head: Head | None = None,
        trainable: Trainable = "official",
        **module_kwargs: Any,
    ) -> SCBERT:
        """Load a checkpoint, for embedding, prediction, fine-tuning or more pretraining.

        Parameters
        ----------
        name_or_path
            A registered model name (``"scbert"``, ``"scbert-default"``), or a local ``.pth``
            (official layout) or ``.safetensors`` written by :meth:`export_checkpoint` (or their
            folder).
        adata
            AnnData registered with :meth:`setup_anndata` (with ``labels_key`` to fine-tune);
            ``None`` for inference on any AnnData.
        gene_list
            The checkpoint's gene list; ``None`` reads ``gene_list.txt`` beside it.
        head
            ``"classifier"`` to fine-tune for cell types (a fresh head when the checkpoint is a
            pretrained one), ``"pretrain"`` for the masked-bin head; ``None`` keeps the
            checkpoint's head.
        trainable
            With a new classifier head, what fine-tuning updates: ``"official"`` (the head, the
            final norm and the second-to-last Performer block, as scBERT's finetune.py),
            ``"head"`` or ``"all"``. Change it later with :meth:`set_trainable`.
        **module_kwargs
            Runtime options of :class:`~scfm_tools.models.scbert.SCBERTModule` (``key_max``,
            ``chunk_size``, dropout rates ...).

        Returns
        -------
        An :class:`SCBERT` holding the checkpoint's weights; ``pretrained_`` records the
        source, the weights' sha256 and the load report.
        """
        resolved = cls.locate(name_or_path)
        genes_src = gene_list if gene_list is not None else resolved.files.get("gene_list")
        if genes_src is None:
            raise FileNotFoundError(
                f"the scBERT checkpoint {resolved.weights.name} has no gene list beside it: pass "
                f"gene_list= or put {GENE_LIST_FILE} (the model's gene symbols, one per line, in "
                f"checkpoint order) in {resolved.path}. For the published model, see "
                "`sft.hub.get_card('scbert').manual_download`."
            )
        pretrained, genes, report = load_scbert_checkpoint(resolved.weights, gene_list=genes_src)
        classes = None
        classes_file = resolved.path / CLASSES_FILE
        if pretrained.is_classifier and head != "pretrain":
            classes = _checkpoint_classes(classes_file, pretrained.n_classes, adata is None)
        model = cls._around(
            pretrained, genes, adata, head, classes, trainable=trainable, **module_kwargs
        )
        model._set_pretrained(resolved, report)
        return model

    @classmethod
    def _around(
        cls,
        pretrained: SCBERTModule,
        genes: list[str],
        adata: AnnData | None,
        head: Head | None,
        classes: list[str] | None,
        *,
        trainable: Trainable = "official",
        **module_kwargs: Any,
    ) -> SCBERT:
        """Build a model holding ``pretrained``'s weights (a new head where the head changes)."""
        cfg = pretrained.config
        ckpt_head: Head = "classifier" if pretrained.is_classifier else "pretrain"
        head = ckpt_head if head is None else head
        model = cls._build(
            adata,
            genes=genes,
            head=head,
            classes=classes if head == ckpt_head == "classifier" else None,
            gene2vec=True if cfg["gene2vec"] else None,
            num_tokens=cfg["num_tokens"],
            dim=cfg["dim"],
            depth=cfg["depth"],
            heads=cfg["heads"],
            dim_head=cfg["dim_head"],
            nb_features=cfg["nb_features"],
            ff_mult=cfg["ff_mult"],
            qkv_bias=cfg["qkv_bias"],
            head_hidden=cfg["head_hidden"],
            **module_kwargs,
        )
        state = pretrained.state_dict()
        if head != ckpt_head or model.module.n_classes != pretrained.n_classes:
            state = {k: v for k, v in state.items() if not k.startswith("to_out.")}
            logger.info("from_pretrained: %s head initialised afresh", head)
        # Same architecture by construction: only a replaced head may be left out.
        missing, unexpected = model.module.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("to_out.") for k in missing):
            raise RuntimeError(f"internal error: keys {missing + unexpected} did not carry over.")
        if head == "classifier" and head != ckpt_head:
            model.set_trainable(trainable)
        model.module.eval()
        return model

    def fine_tune_classifier(
        self,
        reference: AnnData,
        labels_key: str,
        *,
        max_epochs: int = 20,
        batch_size: int = 8,
        class_weights: ClassWeights = "official",
        trainable: Trainable = "all",
        validation_size: float = 0.1,
        patience: int = 3,
        random_state: int | None = 0,
        train_kwargs: Mapping[str, Any] | None = None,
    ) -> SCBERT:
        """Fine-tune a copy of this model for the cell types of a labelled reference.

        As the official ``finetune.py``: a new classifier head for the reference's cell types,
        trained with class weights against imbalance, at the official learning rate scaled to
        the model's width (1e-4 for the published 200-wide model, ``1e-4 * 200 / dim`` otherwise,
        as Adam learning rates scale with width). As the official script keeps the epoch of the
        best validation accuracy, a stratified part of the reference (``validation_size``) is
        held out: training stops when its loss has not improved for ``patience`` epochs, and
        the weights of its best epoch are kept. This model is left as it is.

        Parameters
        ----------
        reference
            Raw counts of labelled cells. Registered with :meth:`setup_anndata`
            ``(labels_key=...)``, it is trained on as it is; otherwise its counts, labels (cells
            without one are left out) and genes are read into a new AnnData, and ``reference``
            is not modified.
        labels_key
            Column of ``reference.obs`` with the cell types.
        max_epochs
            Most passes over the training cells.
        batch_size
            Cells per minibatch (the official value is 3 with 60-step gradient accumulation).
        class_weights
            See :meth:`train`.
        trainable
            ``"all"`` (default) trains every layer but gene2vec; ``"official"`` only the head,
            the final norm and the second-to-last Performer block, as the official script;
            ``"head"`` the head alone. On the shipped ``scbert-default`` (32 wide, 2 blocks)
            ``"official"`` could not reach logistic regression: macro-F1 0.713 against 0.861
            with ``"all"`` (logistic regression 0.825), 800 reference cells of pbmc8k's
            benchmark training part scored on 800 others.
        validation_size
            Share of each cell type held out to watch (early stopping, best weights); ``0``
            trains on every cell for ``max_epochs`` epochs.
        patience
            Epochs without a lower validation loss before training stops.
        random_state
            Seed of the new head, the split, the data order, masks and dropout (``None``:
            ``sft.settings.seed``); the caller's global torch random state is left alone.
        train_kwargs
            Passed to :meth:`train`: ``plan_kwargs`` (``lr`` ...), ``accelerator``,
            ``devices``, ``precision``, ``enable_progress_bar`` ...

        Returns
        -------
        The fine-tuned :class:`SCBERT` (:attr:`classes`, :attr:`history`), bound to the
        registered reference.
        """
        if isinstance(patience, bool) or int(patience) < 1:
            raise ValueError(f"patience must be a positive integer, got {patience!r}.")
        seed = resolve_seed(random_state)
        ref = labelled_reference(type(self), reference, labels_key)
        train_kwargs = dict(train_kwargs or {})
        plan = {
            "random_state": seed,
            "lr": OFFICIAL_LR * OFFICIAL_DIM / self.module.config["dim"],
            **(train_kwargs.pop("plan_kwargs", None) or {}),
        }
        with seeded_torch(seed):
            model = type(self)._around(
                self.module, self.genes, ref, "classifier", None, trainable=trainable
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

    def set_trainable(self, trainable: Trainable = "official") -> None:
        """Choose which parameters training updates (gene2vec is always frozen).

        Parameters
        ----------
        trainable
            ``"official"``: the head, the final norm and the second-to-last Performer block
            (scBERT's finetune.py); ``"head"``: the head only; ``"all"``: everything.
        """
        if trainable not in ("official", "head", "all"):
            raise ValueError(f"trainable must be 'official', 'head' or 'all', got {trainable!r}.")
        module = self.module
        for param in module.parameters():
            param.requires_grad_(trainable == "all")
        parts: list[torch.nn.Module] = [module.to_out]
        if trainable == "official":
            parts += [
                module.norm,
                module.performer.net.layers[-2 if module.config["depth"] > 1 else -1],
            ]
        for part in parts:
            for param in part.parameters():
                param.requires_grad_(True)
        if module.pos_emb is not None:
            module.pos_emb.emb.weight.requires_grad_(False)

    def export_checkpoint(
        self,
        path: str | os.PathLike,
        *,
        name: str = "scbert",
        overwrite: bool = False,
        weights: Literal["pth", "safetensors"] = "pth",
    ) -> Path:
        """Write the model as an scBERT checkpoint folder (official layout, or safetensors).

        The folder gets the weights, ``gene_list.txt`` and, for a classifier, ``classes.txt``;
        :meth:`from_pretrained`, ``sft.tl.embed_cells`` and ``sft.tl.annotate`` read it back.
        The weights are ``<name>.pth`` (``{'model_state_dict': ...}``, the layout of the
        official checkpoints, readable with ``torch.load(weights_only=True)``) or
        ``<name>.safetensors`` (the same state dict, tensors only: the package's own format,
        which the official code does not read).

        Parameters
        ----------
        path
            Folder to write (created when absent).
        name
            File name of the weights, without its suffix.
        overwrite
            Replace the files of an existing checkpoint.
        weights
            ``"pth"`` (the official format) or ``"safetensors"``.

        Returns
        -------
        The path of the weights file.
        """
        if weights not in ("pth", "safetensors"):
            raise ValueError(f"weights must be 'pth' or 'safetensors', got {weights!r}.")
        folder = Path(path).expanduser()
        files = {
            "weights": folder / f"{name}.{weights}",
            "genes": folder / GENE_LIST_FILE,
            "classes": folder / CLASSES_FILE,
        }
        existing = [p.name for p in files.values() if p.exists()]
        if existing and not overwrite:
            raise FileExistsError(f"{folder} already holds {existing}; pass overwrite=True.")
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
        if weights == "pth":
            torch.save({"model_state_dict": state}, files["weights"])
        else:
            write_safetensors(files["weights"], state)
        files["genes"].write_text("\n".join(self.genes), encoding="utf-8")
        if self.classes is not None:
            files["classes"].write_text("\n".join(self.classes), encoding="utf-8")
        else:
            files["classes"].unlink(missing_ok=True)
        return files["weights"]

    # training ------------------------------------------------------------------------------------
    @doc_params(scale=DOC_TRAIN_SCALE)
    def train(
        self,
        max_epochs: int = 10,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        batch_size: int = 8,
        class_weights: ClassWeights = None,
        plan_kwargs: dict[str, Any] | None = None,
        *,
        strategy: str | Strategy = "auto",
        num_nodes: int = 1,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_kwargs: dict[str, Any] | None = None,
        resume: bool | str | os.PathLike = False,
        **kwargs: Any,
    ):
        """Pretrain (masked bins) or fine-tune (cell types), through Lightning.

        Parameters
        ----------
        max_epochs
            Passes over the training cells (counting those done before a resume).
        accelerator
            Lightning accelerator (``"auto"``, ``"cpu"``, ``"gpu"`` ...).
        devices
            Devices (processes) per node: a number, a list of GPU indices, or ``"auto"`` (one).
        batch_size
            Cells per minibatch and process (the official scripts use 3, with 60-step gradient
            accumulation: ``accumulate_grad_batches=60`` in ``kwargs``).
        class_weights
            Classifier only: loss weights for imbalanced cell types, ``"official"``
            (``(1 - n_c / N)^2``), ``"balanced"``, explicit weights or ``None``; see
            :func:`compute_class_weights`.
        plan_kwargs
            Passed to :class:`~scfm_tools.models.scbert.SCBERTTrainingPlan`: ``lr`` (1e-4),
            ``mask_prob`` (0.15), ``replace_prob`` (0.9), ``random_state`` (seed of the data order,
            masks and dropout; default ``sft.settings.seed``), ``weight_decay`` ...
        {scale}
        **kwargs
            Passed to :meth:`scvi.model.base.UnsupervisedTrainingMixin.train` (``train_size``,
            ``early_stopping``, ``datasplitter_kwargs`` ...) and on to the Lightning trainer.

        Returns
        -------
        What scvi-tools' training runner returns; losses per epoch are in ``history``.
        """
        plan = dict(plan_kwargs or {})
        if "gene_index" in plan:
            raise ValueError("plan_kwargs['gene_index'] is set by the model itself.")
        if self.module.is_classifier:
            codes = self.adata_manager.get_from_registry(REGISTRY_KEYS.LABELS_KEY)
            counts = np.bincount(np.asarray(codes).ravel().astype(int), minlength=len(self.classes))
            self.module.class_weights = compute_class_weights(counts, class_weights)
        elif class_weights is not None:
            raise ValueError("class_weights apply to the classifier head only.")
        plan.setdefault("random_state", resolve_seed(None))
        plan["gene_index"] = self.gene_match.index
        # Lightning keeps the modules' mode; feature redraws and dropout need training mode.
        self.module.train()
        return super().train(
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            batch_size=batch_size,
            plan_kwargs=plan,
            strategy=strategy,
            num_nodes=num_nodes,
            checkpoint_dir=checkpoint_dir,
            checkpoint_kwargs=checkpoint_kwargs,
            resume=resume,
            **kwargs,
        )

    # outputs -------------------------------------------------------------------------------------
    def _model_genes(self) -> Any:
        return self.genes

    @property
    def _layer(self) -> str | None:
        return self.registry_["setup_args"].get("layer")

    def _query(
        self, adata: AnnData | None, indices: Sequence[int] | None, layer: str | None
    ) -> AnnData:
        adata = self._cells(adata, indices)
        check_counts(adata, layer)
        return adata

    def _tokenizer(self, match: GeneMatch) -> SCBERTTokenizer:
        return SCBERTTokenizer.from_match(
            match, self.module.n_genes, bin_num=self.module.num_tokens - 2
        )

    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        layer: str | None = None,
        gene_key: str | None = None,
        batch_size: int = 8,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        key_max: Literal["sample", "batch"] = "sample",
        return_info: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, dict[str, Any]]:
        """Cell embeddings: the mean of the final encodings over the model's genes.

        scBERT is deterministic and always reads all of its genes (no ``max_length``, no
        random draws). A classifier (fine-tuned) model embeds with its encoder.

        Parameters
        ----------
        adata
            Cells to embed, raw counts (``None``: the AnnData of the model); genes are matched
            to the model's by name, missing ones read as zero.
        indices
            Rows of ``adata`` to embed (``None``: all).
        layer
            Layer with the counts (``None``: the registered layer, else ``X``).
        gene_key
            ``adata.var`` column with gene symbols (``None``: ``var_names``).
        batch_size
            Most cells per forward pass.
        chunk_size
            Cells read and tokenized at a time.
        key_max
            The FAVOR+ key stabiliser's extent: ``"sample"`` embeds every cell as if alone, as
            the official ``predict.py``; ``"batch"`` shares it across each forward pass, as the
            official ``PerformerLM.forward`` on a batch (results then depend on the batch).
        return_info
            Also return what to record about the run.

        Returns
        -------
        ``(n_cells, dim)`` float32 array (and the run's record with ``return_info=True``).
        """
        if key_max not in ("sample", "batch"):
            raise ValueError(f"key_max must be 'sample' or 'batch', got {key_max!r}.")
        layer = self._layer if layer is None else layer
        adata = self._query(adata, indices, layer)
        match = self.match_genes(adata, gene_key)
        emb = embed_matrix(
            self.module,
            get_matrix(adata, layer),
            match,
            batch_size=batch_size,
            device=self.device,
            chunk_size=chunk_size,
            key_max=key_max,
        )
        if not return_info:
            return emb
        info = {
            "n_genes_matched": int(match.n_matched),
            "n_genes_model": self.module.n_genes,
            "pooling": "mean over genes",
            "key_max": key_max,
        }
        return emb, info

    def embed_var_genes(self, adata: AnnData, *, gene_key: str | None = None) -> GeneEmbeddings:
        """Embed the genes of ``adata`` (``sft.tl.embed_genes``): rows of the gene2vec table.

        scBERT adds a frozen gene2vec vector to each gene's token; that table is its
        context-free gene embedding. There is no context mode: every cell reads all ~17k
        genes, so a per-gene average over cells would cost a full forward pass per cell with
        little to gain over the token embeddings.

        Parameters
        ----------
        adata
            Its genes are matched to the model's.
        gene_key
            ``adata.var`` column with gene symbols (``None``: ``var_names``).

        Returns
        -------
        The embeddings on ``var`` (NaN rows for genes without one), the match mask and the
        run's record.
        """
        if self.module.gene2vec is None:
            raise NotImplementedError(
                f"the scBERT model {self.model_name} has no gene2vec table "
                "(g2v_position_emb=False), so it has no gene embeddings."
            )
        match = self.match_genes(adata, gene_key)
        params: dict[str, Any] = {"n_genes_matched": int(match.n_matched), "table": "gene2vec"}
        return GeneEmbeddings(
            token_table_rows(self.module.gene2vec, match), match.matched.copy(), None, params
        )

    def predict_proba(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        layer: str | None = None,
        gene_key: str | None = None,
        batch_size: int = 8,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> pd.DataFrame:
        """Class probabilities of each cell (classifier head), cells x classes.

        Parameters are those of :meth:`get_latent_representation`.

        Returns
        -------
        A DataFrame indexed by ``obs_names``, one column per class.
        """
        if self.classes is None:
            raise ValueError(
                "this SCBERT model has the pretraining head; build it with head='classifier' "
                "and fine-tune it (or pass a labelled reference to sft.tl.annotate) before "
                "predicting cell types."
            )
        layer = self._layer if layer is None else layer
        adata = self._query(adata, indices, layer)
        chunks = iter_probabilities(
            self.module,
            self._tokenizer(self.match_genes(adata, gene_key)),
            row_blocks(get_matrix(adata, layer), chunk_size=chunk_size),
            batch_size=batch_size,
            device=self.device,
            n_cells=adata.n_obs,
        )
        parts = list(chunks)
        return proba_frame(parts, adata.obs_names, self.classes)
