"""The AnnData-facing scGPT model: setup, pretraining/fine-tuning, embeddings, annotation."""

from __future__ import annotations

import dataclasses
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

from ..._anndata import DEFAULT_CHUNK_SIZE, get_matrix, resolve_seed, row_blocks
from ..._cell_rng import RandomStream
from ..._docs import DOC_RANDOM_STREAM, doc_params
from ..._validation import InputError, check_nonnegative, check_unique_names
from ...pp._match_genes import _SPECIAL, GeneMatch, load_vocab, match_adata_genes
from ...train import (
    DOC_TRAIN_SCALE,
    BindableDataModule,
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
    variable_genes,
)
from .._gene_embeddings import GeneEmbeddings, rows_on_var
from ..base import PretrainedMixin, unbound_registry
from ..base._streaming import gather_blocks, run_minibatches
from ._attention import attention_sums, restrict_gene_index
from ._checkpoint import (
    ARGS_FILE,
    SAFETENSORS_FILE,
    add_special_tokens,
    load_scgpt_checkpoint,
    read_vocab,
    write_scgpt_checkpoint,
)
from ._embed import embed_matrix, iter_token_batches
from ._gene_embed import context_gene_embeddings, token_gene_embeddings
from ._module import SCGPTModule
from ._perturbation import SCGPTPerturbationPredictor
from ._tokenizer import OFFICIAL_N_BINS
from ._training_plan import SCGPTTrainingPlan, TokenizeCells

if TYPE_CHECKING:
    from anndata import AnnData
    from lightning import LightningDataModule
    from lightning.pytorch.strategies import Strategy

    from ...hub import ResolvedModel

__all__ = ["SCGPT"]

logger = logging.getLogger("scfm_tools")

VocabLike = Mapping[str, int] | str | os.PathLike
_TOKENIZER_KEYS = ("gene_index", "cls_id", "pad_id", "max_seq_len", "n_bins")

# The official annotation tutorial (Tutorial_Annotation.ipynb): Adam at lr 1e-4 for the
# published width (embsize 512), StepLR with gamma (schedule_ratio) 0.9 after every epoch, a
# 3-layer classifier head, 10% of the cells held out for validation and the best epoch by
# validation loss kept.
FINE_TUNE_LR = 1e-4
OFFICIAL_D_MODEL = 512
FINE_TUNE_GAMMA = 0.9
OFFICIAL_N_LAYERS_CLS = 3
VALIDATION_SIZE = 0.1
# fine_tune_classifier's defaults, measured (see its docstring).
DEFAULT_FINE_TUNE_EPOCHS = 20
DEFAULT_FINE_TUNE_TOP_GENES = 500
DEFAULT_FINE_TUNE_MAX_LENGTH = 128
#: args.json keys of a fine-tuned model: its class names and the genes it reads.
CLASSES_ARG = "classes"
INPUT_GENES_ARG = "input_genes"
# Parameters the official `freeze` option fixes: names with "encoder" but not
# "transformer_encoder" (the gene, value and batch embeddings).
_EMBEDDING_PARTS = ("encoder", "value_encoder", "batch_encoder")


def _resolve_vocab(vocab: VocabLike | None, var_names: pd.Index) -> dict[str, int]:
    if vocab is None:
        return add_special_tokens({str(g): i for i, g in enumerate(var_names)})
    if isinstance(vocab, str | os.PathLike):
        path = Path(vocab).expanduser()
        # An scGPT vocab.json gets the official treatment; other files the generic reader.
        return read_vocab(path) if path.suffix == ".json" else add_special_tokens(load_vocab(path))
    if isinstance(vocab, Mapping):
        out = {}
        for key, value in vocab.items():
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
                raise TypeError(
                    f"vocab ids must be non-negative integers, got {value!r} for {key!r}."
                )
            out[str(key)] = int(value)
        if len(set(out.values())) != len(out):
            raise ValueError("vocab maps several tokens to the same id.")
        return add_special_tokens(out)
    raise TypeError(
        f"vocab must be None, a {{gene: id}} mapping or a path to a vocab.json, "
        f"got {type(vocab).__name__}."
    )


def _checkpoint_classes(args: Mapping[str, Any], n_cls: int) -> list[str] | None:
    """Read a fine-tuned checkpoint's class names (``args.json`` ``"classes"``); None if none."""
    classes = args.get(CLASSES_ARG)
    if classes is None:
        if n_cls >= 2:
            logger.warning(
                "the checkpoint has a classifier head of %d outputs but no class names (an "
                "args.json %r list, in output order); the head is left out. Add the names to "
                "args.json to predict with it.",
                n_cls,
                CLASSES_ARG,
            )
        return None
    if not isinstance(classes, list) or len(classes) != n_cls:
        raise ValueError(
            f"args.json {CLASSES_ARG!r} must list the {n_cls} cell types of the classifier "
            f"head, in output order; got {classes!r:.200}."
        )
    return [str(c) for c in classes]


class SCGPT(ClassifierMixin, PretrainedMixin, TrainingMixin, BaseModelClass):
    """scGPT (Cui et al., Nature Methods 2024) as an scvi-tools model: pretrain, fine-tune, embed.

    The transformer reads, per cell, the expressed genes as tokens with their per-cell quantile
    bins as values (``<cls>`` first); its ``<cls>`` output is the cell embedding. Training is
    the published objective: masked gene-expression prediction plus MVC on randomly masked bins
    (:class:`~scfm_tools.models.scgpt.SCGPTTrainingPlan`). With the classifier head
    (``head="classifier"``, cell types from ``labels_key``) it is the official annotation
    fine-tuning (cross-entropy on the ``<cls>`` output), and :meth:`predict` labels cells;
    :meth:`fine_tune_classifier` runs the whole recipe on a labelled reference. Cells are
    tokenized on the fly from the registered matrix, so raw counts or log-normalised values
    both work (the bins are ranks).

    Call :meth:`setup_anndata` first. Start from scratch with this constructor, or from a
    pretrained checkpoint (official or exported here) with :meth:`from_pretrained`, which
    needs no AnnData for embedding.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`; ``None`` builds an unbound model for
        inference only (then ``vocab`` is needed).
    vocab
        Gene vocabulary: ``None`` builds one from ``adata.var_names`` (plus ``<pad>``, ``<cls>``,
        ``<eoc>``); or a ``{gene: id}`` mapping or a path to a ``vocab.json``. Genes are matched
        to it by symbol or Ensembl ID (:func:`~scfm_tools.pp.match_to_vocab`); the overlap is
        logged and too small an overlap (fewer than 10 genes or 10%) is refused.
    d_model
        Embedding width (official ``embsize``).
    n_heads
        Attention heads.
    d_hid
        Feed-forward width.
    n_layers
        Transformer layers.
    n_bins
        Value bins, zero bin included (51 in the published models).
    max_seq_len
        Longest token sequence, ``<cls>`` included; cells expressing more genes are subsampled
        at random (for training and for embedding).
    dropout
        Dropout rate.
    use_batch_labels
        Add batch-label embeddings to the decoders (needs ``batch_key`` in
        :meth:`setup_anndata`).
    pad_token
        Name of the padding token.
    head
        ``"pretrain"`` (the published models' heads) or ``"classifier"`` (one output per cell
        type of the registered ``labels_key``, or of ``classes``).
    classes
        Class names of the classifier head; ``None`` takes the registered label categories.
        When labels are registered they must be these, in this order.
    input_genes
        Vocabulary genes the model reads from a cell (a fine-tuned model's highly variable
        genes, see :meth:`fine_tune_classifier`); ``None``: every vocabulary gene.
    **module_kwargs
        Passed to :class:`~scfm_tools.models.scgpt.SCGPTModule` (``n_layers_cls``,
        ``pad_value``, ``mask_value``, ``do_mvc``, ``explicit_zero_prob``, ``norm_first``,
        ``max_value``).

    Examples
    --------
    >>> sft.models.SCGPT.setup_anndata(adata)
    >>> model = sft.models.SCGPT(adata, d_model=64, n_layers=2, max_seq_len=512)
    >>> model.train(max_epochs=10, plan_kwargs={"lr": 1e-3, "mask_ratio": 0.4})
    >>> adata.obsm["X_scgpt"] = model.get_latent_representation()
    >>> tuned = sft.models.SCGPT.from_pretrained("scgpt-default").fine_tune_classifier(
    ...     ref, "cell_type"
    ... )
    >>> tuned.predict(query, threshold=0.5)
    """

    _module_cls = SCGPTModule
    _training_plan_cls = SCGPTTrainingPlan
    # What sft.tl.predict_perturbation(method="finetune") fits: a fine-tuned copy of the model.
    perturbation_predictor_cls = SCGPTPerturbationPredictor
    family = "scgpt"
    # Per-cell rank binning reads log-normalised values nearly as counts.
    values_needed = "counts_or_lognorm"
    # One fine-tuned scgpt-default depends on its seed across protocols: CellBench Drop-seq ->
    # CEL-seq2 macro-F1 0.90-0.99 over seeds 0-9 (mean 0.96); three averaged 0.991-0.992, five
    # 0.991-0.996 (disjoint seed groups). Each copy takes seconds on CPU.
    fine_tune_ensemble = 3

    def __init__(
        self,
        adata: AnnData | None = None,
        *,
        vocab: VocabLike | None = None,
        d_model: int = 64,
        n_heads: int = 4,
        d_hid: int = 128,
        n_layers: int = 2,
        n_bins: int = OFFICIAL_N_BINS,
        max_seq_len: int = 1200,
        dropout: float = 0.2,
        use_batch_labels: bool = False,
        pad_token: str = "<pad>",
        head: Head = "pretrain",
        classes: Sequence[str] | None = None,
        input_genes: Sequence[str] | None = None,
        **module_kwargs: Any,
    ) -> None:
        super().__init__(adata, registry=None if adata is not None else unbound_registry("SCGPT"))
        if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 2:
            raise ValueError(f"n_bins must be an integer of at least 2, got {n_bins!r}.")
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2:
            raise ValueError(f"max_seq_len must be an integer of at least 2, got {max_seq_len!r}.")
        if adata is None and vocab is None:
            raise ValueError("an SCGPT model built without adata needs its vocab.")
        # The resolved mapping, not a path, is what save/load must rebuild the model from.
        vocab = _resolve_vocab(vocab, None if adata is None else adata.var_names)
        if pad_token not in vocab:
            raise ValueError(f"pad_token {pad_token!r} is not in the vocabulary.")
        self.vocab = vocab
        self.gene_match = None if adata is None else match_adata_genes(adata, vocab, caller="SCGPT")
        self.classes = resolve_classes(
            head, classes, registered_classes(self.adata_manager), model="SCGPT"
        )
        self.input_genes = None if input_genes is None else [str(g) for g in input_genes]
        unknown = [g for g in self.input_genes or () if g not in vocab]
        if unknown:
            raise ValueError(f"input_genes {unknown[:5]} are not in the vocabulary.")

        if not use_batch_labels:
            n_batch = None
        elif adata is None:  # unbound: the batch table's size comes with the weights
            n_batch = module_kwargs.get("n_batch_labels")
        else:
            n_batch = self.summary_stats.n_batch
        extra = {k: v for k, v in module_kwargs.items() if k != "n_batch_labels"}
        if self.classes is not None:
            extra["n_cls"] = len(self.classes)
        elif extra.get("n_cls", 1) >= 2:
            raise ValueError(
                "n_cls >= 2 is a cell-type classifier: pass head='classifier' (with classes=, "
                "or labels registered by setup_anndata(labels_key=...))."
            )
        if (
            use_batch_labels
            and adata is not None
            and self.registry_["setup_args"].get("batch_key") is None
        ):
            raise ValueError(
                "use_batch_labels=True needs batch labels: call "
                "SCGPT.setup_anndata(adata, batch_key=...) first."
            )
        self.module = self._module_cls(
            max(vocab.values()) + 1,
            d_model,
            n_heads,
            d_hid,
            n_layers,
            vocab[pad_token],
            dropout=dropout,
            use_batch_labels=use_batch_labels,
            n_batch_labels=n_batch,
            **extra,
        )
        cfg = self.module.config
        self.n_bins = n_bins
        self.max_seq_len = max_seq_len
        # The official args.json keys, so that export_folder writes a folder official code reads.
        self.args: dict[str, Any] = {
            "embsize": d_model,
            "nheads": n_heads,
            "d_hid": d_hid,
            "nlayers": n_layers,
            "n_layers_cls": cfg["n_layers_cls"],
            "dropout": dropout,
            "pad_token": pad_token,
            "pad_value": cfg["pad_value"],
            "mask_value": cfg["mask_value"],
            "n_bins": n_bins,
            "max_seq_len": max_seq_len,
            "input_emb_style": "continuous",
            "cell_emb_style": "cls",
            "pre_norm": cfg["norm_first"],
            "MVC": cfg["do_mvc"],
            "explicit_zero_prob": cfg["explicit_zero_prob"],
            "use_batch_labels": use_batch_labels,
        }
        if self.classes is not None:
            self.args[CLASSES_ARG] = list(self.classes)
        if self.input_genes is not None:
            self.args[INPUT_GENES_ARG] = list(self.input_genes)
        in_vocab = (
            "no AnnData"
            if adata is None
            else f"{self.gene_match.n_matched:,} of {adata.n_vars:,} genes in the vocabulary"
        )
        self._model_summary_string = (
            f"SCGPT model: d_model {d_model}, {n_layers} layers, {n_heads} heads, d_hid {d_hid}, "
            f"{len(vocab):,} tokens; {in_vocab}; n_bins {n_bins}, max_seq_len {max_seq_len}"
            + (f", {n_batch} batch labels" if use_batch_labels else "")
            + ("" if self.classes is None else f"; classifier head ({len(self.classes)} classes)")
            + ("" if self.input_genes is None else f", reads {len(self.input_genes):,} genes")
        )
        self.init_params_ = self._get_init_params(locals())

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
        """Register an AnnData for :class:`SCGPT`.

        The matrix may hold raw counts or log-normalised values (binning is rank based); it
        must be finite and non-negative, with unique gene names. Nothing is written to
        ``adata`` when a check fails.

        Parameters
        ----------
        adata
            Cells x genes; gene symbols (or Ensembl IDs) in ``var_names``.
        layer
            Layer holding the expression values; ``None`` uses ``adata.X``.
        batch_key
            Column of ``adata.obs`` with batch labels (used with ``use_batch_labels=True``).
        labels_key
            Column of ``adata.obs`` with cell types, for the classifier head.
        **kwargs
            Passed to :meth:`scvi.data.AnnDataManager.register_fields`.
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        check_nonnegative(adata, layer)
        check_unique_names(adata.var_names)
        check_labels_key(adata, labels_key)
        anndata_fields = [
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=False),
            CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key),
            CategoricalObsField(REGISTRY_KEYS.LABELS_KEY, labels_key),
        ]
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
        head: Head | None = None,
        dropout: float | None = None,
        max_seq_len: int | None = None,
    ) -> SCGPT:
        """Load a checkpoint, for embedding, prediction, fine-tuning or continued training.

        Parameters
        ----------
        name_or_path
            A registered model name (``"scgpt-default"``, ``"scgpt-human"`` ...; see
            :func:`sft.hub.list_models <scfm_tools.hub.list_models>`) or a local checkpoint
            folder (official ``best_model.pt`` layout, or one written by :meth:`export_folder`,
            fine-tuned classifiers included).
        adata
            AnnData registered with :meth:`setup_anndata`, to train on (with the checkpoint's
            number of batch labels as ``batch_key`` categories, if it has a batch encoder;
            with ``labels_key`` for a classifier); ``None`` for inference on any AnnData.
        head
            ``"classifier"`` for a cell-type head (a new one, for the registered labels, when
            the checkpoint has none), ``"pretrain"`` to leave a classifier head out; ``None``
            keeps the checkpoint's (a classifier when its ``args.json`` names its classes).
        dropout
            Dropout for further training; ``None`` keeps the checkpoint's.
        max_seq_len
            Longest token sequence; ``None`` keeps the checkpoint's ``max_seq_len``.

        Returns
        -------
        An :class:`SCGPT` whose module holds the checkpoint's weights. ``pretrained_`` records
        the source, the weights' sha256 and the load report.
        """
        resolved = cls.locate(name_or_path)
        pretrained, vocab, args, report = load_scgpt_checkpoint(resolved.path)
        model = cls._around(
            pretrained, vocab, args, adata, head=head, dropout=dropout, max_seq_len=max_seq_len
        )
        model._set_pretrained(resolved, report)
        return model

    @classmethod
    def _around(
        cls,
        pretrained: SCGPTModule,
        vocab: dict[str, int],
        args: Mapping[str, Any],
        adata: AnnData | None,
        *,
        head: Head | None = None,
        new_head: bool = False,
        dropout: float | None = None,
        max_seq_len: int | None = None,
        n_layers_cls: int | None = None,
        input_genes: Sequence[str] | bool = True,
    ) -> SCGPT:
        """Build a model holding ``pretrained``'s weights (a new classifier head where needed).

        The classifier head is made afresh when ``new_head``, when the head changes or when
        ``n_layers_cls`` differs from the checkpoint's; everything else carries over.
        ``input_genes``: ``True`` keeps the checkpoint's, ``False`` reads every vocabulary
        gene, a list reads those.
        """
        cfg = pretrained.config
        if cfg["use_batch_labels"] and adata is not None:
            registered = cls._get_most_recent_anndata_manager(adata, required=True)
            n_batch = registered.summary_stats.n_batch
            if n_batch != cfg["n_batch_labels"]:
                raise ValueError(
                    f"the checkpoint has {cfg['n_batch_labels']} batch labels, but adata was set "
                    f"up with {n_batch}; set it up with a batch_key of as many categories."
                )
        ckpt_classes = _checkpoint_classes(args, cfg["n_cls"])
        ckpt_head: Head = "pretrain" if ckpt_classes is None else "classifier"
        head = ckpt_head if head is None else head
        n_layers_cls = cfg["n_layers_cls"] if n_layers_cls is None else int(n_layers_cls)
        keep = (
            head == ckpt_head
            and not new_head
            and n_layers_cls == cfg["n_layers_cls"]
            and (ckpt_classes is not None or cfg["n_cls"] < 2)
        )
        batch_table = {"n_batch_labels": cfg["n_batch_labels"]} if adata is None else {}
        model = cls._build(
            adata,
            vocab=vocab,
            d_model=cfg["d_model"],
            n_heads=cfg["n_heads"],
            d_hid=cfg["d_hid"],
            n_layers=cfg["n_layers"],
            n_bins=int(args.get("n_bins", OFFICIAL_N_BINS)),
            max_seq_len=int(args.get("max_seq_len", 1200)) if max_seq_len is None else max_seq_len,
            dropout=cfg["dropout"] if dropout is None else dropout,
            use_batch_labels=cfg["use_batch_labels"],
            pad_token=args.get("pad_token", "<pad>"),
            head=head,
            classes=ckpt_classes if keep and head == "classifier" else None,
            input_genes=(
                args.get(INPUT_GENES_ARG)
                if input_genes is True
                else None
                if input_genes is False
                else input_genes
            ),
            n_layers_cls=n_layers_cls,
            n_cls=cfg["n_cls"] if keep else 1,
            pad_value=cfg["pad_value"],
            mask_value=cfg["mask_value"],
            do_mvc=cfg["do_mvc"],
            explicit_zero_prob=cfg["explicit_zero_prob"],
            norm_first=cfg["norm_first"],
            max_value=cfg["max_value"],
            **batch_table,
        )
        state = pretrained.state_dict()
        if not keep:
            state = {k: v for k, v in state.items() if not k.startswith("cls_decoder.")}
        # Same architecture by construction: only a replaced classifier head may be left out
        # (keys the checkpoint lacked keep the fresh module's initialisation, as
        # load_scgpt_checkpoint reported).
        missing, unexpected = model.module.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("cls_decoder.") for k in missing):
            raise RuntimeError(f"internal error: keys {missing + unexpected} did not carry over.")
        model.module.eval()
        return model

    def export_folder(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the model as an scGPT checkpoint folder (official layout, safetensors weights).

        The folder holds ``args.json`` and ``vocab.json`` as the official releases do and the
        weights as ``model.safetensors``; :func:`~scfm_tools.models.scgpt.load_scgpt_checkpoint`,
        :meth:`from_pretrained` and ``sft.tl`` read it back. A fine-tuned classifier's cell
        types are in ``args.json`` as ``"classes"`` (in output order) and the genes it reads
        as ``"input_genes"``, so the folder alone annotates cells
        (``sft.tl.annotate(adata, model=folder)``); the official code ignores those keys.

        Parameters
        ----------
        path
            Folder to write (created when absent).
        overwrite
            Replace the checkpoint files of an existing folder.

        Returns
        -------
        The folder.
        """
        files = write_scgpt_checkpoint(
            path, self.module, self.vocab, self.args, overwrite=overwrite
        )
        logger.info("wrote %s, %s and %s to %s", SAFETENSORS_FILE, ARGS_FILE, "vocab.json", path)
        return files["weights"].parent

    def fine_tune_classifier(
        self,
        reference: AnnData,
        labels_key: str,
        *,
        layer: str | None = None,
        max_epochs: int = DEFAULT_FINE_TUNE_EPOCHS,
        batch_size: int = 32,
        class_weights: ClassWeights = None,
        lr: float | None = None,
        dropout: float | None = None,
        freeze: bool = False,
        max_length: int | None = DEFAULT_FINE_TUNE_MAX_LENGTH,
        predict_max_length: int | None = None,
        n_top_genes: int | None = DEFAULT_FINE_TUNE_TOP_GENES,
        n_layers_cls: int = OFFICIAL_N_LAYERS_CLS,
        patience: int = 3,
        random_state: int | None = 0,
        train_kwargs: Mapping[str, Any] | None = None,
    ) -> SCGPT:
        """Fine-tune a copy of this model for the cell types of a labelled reference.

        The official annotation recipe (scGPT's ``Tutorial_Annotation``): a new classifier
        head (``n_layers_cls`` layers) on the ``<cls>`` output for the reference's cell types,
        every weight trained (``freeze=False``) by cross-entropy alone, Adam at the learning
        rate 1e-4 (scaled to the model's width) decayed by 0.9 after each epoch, the cells'
        expressed highly variable genes as tokens (here 500 genes, at most 127 a cell while
        training: a new random subset each epoch), 10% of the cells held out for validation
        (stratified by cell type here) and the weights of the epoch with the lowest
        validation loss kept. Training stops early after ``patience`` epochs without a better
        validation loss. The returned model then reads each cell whole, up to this model's
        ``max_seq_len`` (``predict_max_length``), as the tutorial trains and predicts with
        every expressed gene: the short random subsets are what keeps fine-tuning quick on a
        CPU, and a cell read whole does not depend on which subset was drawn. This model is
        left as it is.

        The defaults were measured with the shipped ``scgpt-default`` (64 wide, 2 layers)
        through ``sft.tl.annotate(method="finetune")``, against logistic regression on
        log-normalised expression of the shared genes: CellBench CEL-seq2 -> Drop-seq
        (240 reference cells expressing ~6,000 genes each) macro-F1 0.990 vs 1.000 (0.99 and
        1.00 with seeds 0 and 1), 112 CPU-seconds; pbmc8k 1,000 -> 1,000 cells 0.863 vs
        0.858, 136 CPU-seconds (stopped after 6 epochs). On CellBench, what they replace
        did worse: the model's 255 random genes of ~6,000 (0.20 after 3 epochs at 1e-4); the
        tutorial's 1e-4 on this small model (0.79 after 10 epochs on 200 genes; 8e-4: 0.97);
        200 genes with every expressed one a token (0.94-0.99 by seed, 10 or 20 epochs);
        ``freeze=True`` (0.93); dropout 0.2 (0.96-0.97). On pbmc8k ``"balanced"`` class
        weights gave 0.718: the two types with 1-2 reference cells were given to query cells.
        Reading cells whole at prediction (``predict_max_length``), measured after the rest
        was chosen: CellBench Drop-seq -> CEL-seq2 (query cells expressing ~230 of the 500
        genes) macro-F1 0.959, 0.983, 0.965 with seeds 0-2, against 0.920, 0.956, 0.915 when
        the query was read in 127-gene subsets as in training; CEL-seq2 -> Drop-seq and pbmc8k
        changed by at most 0.005.

        Parameters
        ----------
        reference
            Labelled cells: raw counts (or log-normalised values) and gene names. Registered
            with :meth:`setup_anndata` ``(labels_key=...)``, it is trained on as it is;
            otherwise its values, labels (cells without one are left out) and genes are read
            into a new AnnData, and ``reference`` is not modified.
        labels_key
            Column of ``reference.obs`` with the cell types (at least two types).
        layer
            Layer of ``reference`` with the values; ``None`` reads ``reference.X``.
        max_epochs
            Most passes over the training cells.
        batch_size
            Cells per minibatch (official 32).
        class_weights
            Loss weights against imbalanced cell types: ``None`` (the tutorial's unweighted
            cross-entropy), ``"balanced"`` (``N / (K n_c)``), ``"official"`` (scBERT's
            ``(1 - n_c / N)^2``) or explicit weights; see
            :func:`~scfm_tools.train.compute_class_weights`. ``"balanced"`` lets a type with a
            cell or two in the reference weigh a hundred times more, and the model then gives
            that type to a few query cells.
        lr
            Learning rate; ``None``: the tutorial's 1e-4 scaled by the published width over
            this model's (``512 / d_model``, as Adam learning rates scale with width), so 1e-4
            for the published models and 8e-4 for the shipped ``scgpt-default``.
        dropout
            Dropout rate while fine-tuning (the tutorial's is 0.2); ``None`` keeps this
            model's.
        freeze
            Fix the gene, value and batch embeddings (the official ``freeze`` option);
            the transformer and the head are trained either way.
        max_length
            Longest token sequence, ``<cls>`` included, while training; cells expressing more
            of the genes read are subsampled at random (a new subset each epoch); ``None``:
            this model's ``max_seq_len``.
        predict_max_length
            Longest token sequence of the returned model, its ``max_seq_len`` for prediction
            and embedding (longer cells get a fixed random subset per cell); ``None``: this
            model's ``max_seq_len``, at least ``max_length``.
        n_top_genes
            Read the reference's most variable genes only (the tutorials' highly variable
            genes, scanpy's ``flavor="seurat"`` on log-normalised counts, among the genes in
            the vocabulary), later for the query too; ``None`` reads every vocabulary gene.
        n_layers_cls
            Layers of the classifier head (official 3).
        patience
            Validation epochs without a lower validation loss before training stops.
        random_state
            Seed of the new head, the validation split, the data order, subsampling and
            dropout (``None``: ``sft.settings.seed``); the caller's global torch random state
            is left alone.
        train_kwargs
            Passed to :meth:`train` (``plan_kwargs`` such as ``{"lr": 1e-4}``,
            ``accelerator``, ``devices``, ``precision`` ...).

        Returns
        -------
        The fine-tuned :class:`SCGPT` (``classes``, ``history``), bound to the registered
        reference.
        """
        if predict_max_length is not None and int(predict_max_length) < 2:
            raise ValueError(
                f"predict_max_length must be at least 2 (<cls> and one gene), got "
                f"{predict_max_length}."
            )
        seed = resolve_seed(random_state)
        cells = labelled_reference(type(self), reference, labels_key, layer)
        setup = type(self)._get_most_recent_anndata_manager(cells).registry["setup_args"]
        genes: Sequence[str] | bool = False
        if n_top_genes is not None:
            counts = get_matrix(cells, setup.get("layer"))
            ids = variable_genes(counts, self.match_genes(cells), int(n_top_genes))
            names = {i: token for token, i in self.vocab.items()}
            genes = [names[i] for i in ids]
        train_kwargs = dict(train_kwargs or {})
        plan = dict(train_kwargs.pop("plan_kwargs", None) or {})
        plan.setdefault("random_state", seed)
        if lr is not None:
            plan["lr"] = float(lr)
        codes = np.asarray(cells.obs[setup["labels_key"]].astype("category").cat.codes)
        train_idx, validation_idx = early_stopping_split(
            codes, VALIDATION_SIZE, seed, patience, train_kwargs
        )
        splitter = dict(train_kwargs.pop("datasplitter_kwargs", None) or {})
        splitter.setdefault("external_indexing", [train_idx, validation_idx])
        # Training seeds every device's stream (dropout); the caller's streams are restored.
        with seeded_torch(seed):
            model = type(self)._around(
                self.module,
                self.vocab,
                self.args,
                cells,
                head="classifier",
                new_head=True,
                dropout=dropout,
                max_seq_len=max_length,
                n_layers_cls=n_layers_cls,
                input_genes=genes,
            )
            model.set_trainable(freeze=freeze)
            model.train(
                max_epochs=max_epochs,
                batch_size=batch_size,
                class_weights=class_weights,
                plan_kwargs=plan,
                datasplitter_kwargs=splitter,
                **train_kwargs,
            )
        model.module.eval()
        model.pretrained_ = {**getattr(self, "pretrained_", {}), "fine_tuned": True}
        model._set_max_seq_len(
            max(self.max_seq_len, model.max_seq_len)
            if predict_max_length is None
            else int(predict_max_length)
        )
        return model

    def _set_max_seq_len(self, max_seq_len: int) -> None:
        """Change the longest token sequence, everywhere save and load read it."""
        self._model_summary_string = self._model_summary_string.replace(
            f"max_seq_len {self.max_seq_len}", f"max_seq_len {max_seq_len}"
        )
        self.max_seq_len = max_seq_len
        self.args["max_seq_len"] = max_seq_len
        self.init_params_["non_kwargs"]["max_seq_len"] = max_seq_len

    def set_trainable(self, *, freeze: bool = False) -> None:
        """Choose which parameters training updates.

        Parameters
        ----------
        freeze
            Fix the gene, value and batch embeddings (the official ``freeze`` option: every
            parameter named ``*encoder*`` but not ``transformer_encoder``); ``False``: train
            everything (the official default).
        """
        for name, param in self.module.named_parameters():
            param.requires_grad_(not (freeze and name.split(".")[0] in _EMBEDDING_PARTS))

    # training ----------------------------------------------------------------------------------
    def _restrict(self, match: GeneMatch) -> GeneMatch:
        """Leave out of ``match`` the genes the model does not read (``input_genes``)."""
        if self.input_genes is None:
            return match
        allowed = np.fromiter((self.vocab[g] for g in self.input_genes), dtype=np.int64)
        keep = match.matched & np.isin(match.index, allowed)
        n_kept = int(keep.sum())
        return dataclasses.replace(
            match,
            index=np.where(keep, match.index, -1),
            matched=keep,
            method=np.where(keep, match.method, ""),
            n_matched=n_kept,
            fraction=n_kept / max(match.n_genes, 1),
        )

    def _tokenizer_kwargs(self) -> dict[str, Any]:
        return {
            "gene_index": self._restrict(self.gene_match).index,
            "cls_id": self.vocab["<cls>"],
            "pad_id": self.module.pad_token_id,
            "max_seq_len": self.max_seq_len,
            "n_bins": self.n_bins,
        }

    @doc_params(scale=DOC_TRAIN_SCALE)
    def train(
        self,
        max_epochs: int = 10,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        batch_size: int = 64,
        plan_kwargs: dict[str, Any] | None = None,
        *,
        class_weights: ClassWeights = None,
        strategy: str | Strategy = "auto",
        num_nodes: int = 1,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_kwargs: dict[str, Any] | None = None,
        resume: bool | str | os.PathLike = False,
        datamodule: LightningDataModule | None = None,
        **kwargs: Any,
    ):
        """Pretrain or fine-tune, through Lightning.

        With the pretraining head: masked gene-expression prediction + MVC. With the
        classifier head: cross-entropy against the registered cell types on unmasked cells,
        by default at the annotation tutorial's learning rate scaled to the model's width
        (``1e-4 * 512 / d_model``; times 0.9 after each epoch); :meth:`fine_tune_classifier`
        adds the validation split and early stopping.

        Parameters
        ----------
        max_epochs
            Passes over the training cells (counting those done before a resume).
        accelerator
            Lightning accelerator (``"auto"``, ``"cpu"``, ``"gpu"`` ...).
        devices
            Devices (processes) per node: a number, a list of GPU indices, or ``"auto"`` (one).
        batch_size
            Cells per minibatch and process (with ``datamodule``: set on the data module).
        plan_kwargs
            Passed to :class:`~scfm_tools.models.scgpt.SCGPTTrainingPlan`: ``lr`` (1e-3;
            classifier ``1e-4 * 512 / d_model``), ``mask_ratio`` (0.4), ``random_state`` (seed
            of the data order, masks and dropout; default ``sft.settings.seed``),
            ``weight_decay``, ``lr_schedule`` (``"constant"``, ``"cosine"`` with warm-up, or
            ``"step"``, the classifier's default) ...
        class_weights
            Classifier only: loss weights for imbalanced cell types, ``"balanced"``,
            ``"official"``, explicit weights or ``None`` (equal); see
            :func:`~scfm_tools.train.compute_class_weights`.
        {scale}
        datamodule
            Train on this Lightning data module instead of the model's AnnData. A
            :class:`~scfm_tools.dataloaders.MultiFileDataModule` (many ``.h5ad`` files, read
            lazily) is bound to the model: its files' genes are matched to the vocabulary and its
            workers tokenize and mask the cells (:class:`~scfm_tools.models.scgpt.TokenizeCells`).
            Another data module must yield the model's AnnData rows (``"X"``) or tokenized
            minibatches.
        **kwargs
            Passed to :meth:`scvi.model.base.UnsupervisedTrainingMixin.train` (``train_size``,
            ``check_val_every_n_epoch``, ``early_stopping``, ``datasplitter_kwargs`` ...) and on
            to the Lightning trainer (``precision="bf16-mixed"``, ``callbacks`` ...).

        Returns
        -------
        What scvi-tools' training runner returns; the losses per epoch are in ``history``
        (``train_loss_epoch``, ``gep_loss_train``, ``mvc_loss_train`` ...).
        """
        plan = dict(plan_kwargs or {})
        clash = sorted(set(plan) & set(_TOKENIZER_KEYS))
        if clash:
            raise ValueError(
                f"plan_kwargs {clash} are set by the model itself (its vocabulary, max_seq_len "
                "and n_bins); change them on the model instead."
            )
        if self.module.is_classifier:
            if datamodule is not None or registered_classes(self.adata_manager) is None:
                raise ValueError(
                    "a classifier trains on the cell types of its AnnData: register them with "
                    "SCGPT.setup_anndata(adata, labels_key=...) and build the model on it "
                    "(datamodule= is for pretraining)."
                )
            counts = np.bincount(
                np.asarray(self.adata_manager.get_from_registry(REGISTRY_KEYS.LABELS_KEY))
                .ravel()
                .astype(int),
                minlength=len(self.classes),
            )
            self.module.class_weights = compute_class_weights(counts, class_weights)
            plan.setdefault("lr", FINE_TUNE_LR * OFFICIAL_D_MODEL / self.module.d_model)
            plan.setdefault("lr_schedule", "step")
            plan.setdefault("lr_gamma", FINE_TUNE_GAMMA)
        elif class_weights is not None:
            raise ValueError("class_weights apply to the classifier head only.")
        plan.setdefault("random_state", resolve_seed(None))
        plan.update(self._tokenizer_kwargs())
        if datamodule is not None:
            self._bind_datamodule(datamodule, plan)
        # Lightning keeps the modules' mode, and a loaded model is in eval mode; dropout
        # needs training mode.
        self.module.train()
        with warnings.catch_warnings():
            # Lightning notes that the plan's hook takes precedence over the data module's;
            # that is the design here (the data module has none).
            warnings.filterwarnings("ignore", message=".*overridden `on_before_batch_transfer`")
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
                datamodule=datamodule,
                **kwargs,
            )

    def _bind_datamodule(self, datamodule: LightningDataModule, plan: dict[str, Any]) -> None:
        """Put a bindable data module on the vocabulary and give it the tokenizer.

        :class:`~scfm_tools.dataloaders.MultiFileDataModule` is one; it is recognised by its
        ``bind`` (:class:`~scfm_tools.train.BindableDataModule`), since models do not import
        the data loaders.
        """
        if not isinstance(datamodule, BindableDataModule):
            return
        if self.module.use_batch_labels:
            raise ValueError(
                "a model with use_batch_labels=True needs batch labels, which a data module "
                "bound to the vocabulary (such as MultiFileDataModule) does not provide; build "
                "the model without them."
            )
        from ._training_plan import DEFAULT_MASK_RATIO

        specials = [i for token, i in self.vocab.items() if _SPECIAL.match(token)]
        collate = TokenizeCells(
            max(self.vocab.values()) + 1,
            special_ids=specials,
            cls_id=self.vocab["<cls>"],
            pad_id=self.module.pad_token_id,
            pad_value=self.module.pad_value,
            mask_value=self.module.mask_value,
            max_seq_len=self.max_seq_len,
            n_bins=self.n_bins,
            mask_ratio=plan.get("mask_ratio", DEFAULT_MASK_RATIO),
        )
        datamodule.bind(self.vocab, collate)

    # outputs -----------------------------------------------------------------------------------
    def _model_genes(self) -> Any:
        return self.vocab

    @property
    def _layer(self) -> str | None:
        return self.registry_["setup_args"].get("layer")

    def _query(
        self,
        adata: AnnData | None,
        indices: Sequence[int] | None,
        layer: str | None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> AnnData:
        adata = self._cells(adata, indices)
        check_nonnegative(adata, layer, chunk_size=chunk_size)
        return adata

    def _max_length(self, max_length: int | None) -> int:
        return self.max_seq_len if max_length is None else int(max_length)

    @torch.inference_mode()
    @doc_params(random_stream=DOC_RANDOM_STREAM)
    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        layer: str | None = None,
        gene_key: str | None = None,
        batch_size: int = 64,
        max_length: int | None = None,
        random_state: int | None = 0,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        random_stream: RandomStream = "cell",
        return_info: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, dict[str, Any]]:
        """Cell embeddings: the L2-normalised ``<cls>`` output (the zero-shot scGPT embedding).

        The official ``embed_data`` path (:func:`~scfm_tools.models.scgpt.embed_matrix`): per
        cell the expressed vocabulary genes with ``<cls>`` first, per-cell quantile binning,
        random subsampling above ``max_length`` genes. Cells are streamed ``chunk_size`` at a
        time (backed AnnData included) and sorted by length into minibatches; the result does
        not depend on ``batch_size`` or ``chunk_size``. With the default
        ``random_stream="cell"`` it does not depend on the other cells either, so embedding a
        subset (``indices``), or the data split in two files, gives the same vectors;
        ``random_stream="official"`` draws from one stream over the cells in order, as the
        official code, and a subset then gets its own draws. A model that reads chosen genes
        only (``input_genes``, e.g. fine-tuned on highly variable genes) embeds with those.

        Parameters
        ----------
        adata
            Cells to embed (``None``: the AnnData of the model). Its genes are matched to the
            vocabulary by name, so another gene set than the training one works.
        indices
            Rows of ``adata`` to embed (``None``: all).
        layer
            Layer with the expression values (``None``: the registered layer, else ``X``).
        gene_key
            ``adata.var`` column with gene symbols or Ensembl IDs (``None``: ``var_names``).
        batch_size
            Cells per forward pass.
        max_length
            Longest token sequence, ``<cls>`` included (``None``: the model's ``max_seq_len``).
        random_state
            Seed of the binning tie-breaks and of the subsampling of long cells (``None``:
            ``sft.settings.seed``).
        chunk_size
            Cells read and tokenized at a time.
        {random_stream}
        return_info
            Also return what to record about the run (genes matched, ``max_length``, seed).

        Returns
        -------
        ``(n_cells, d_model)`` float32 array of unit-norm embeddings (and the run's record with
        ``return_info=True``).
        """
        layer = self._layer if layer is None else layer
        adata = self._query(adata, indices, layer, chunk_size)
        match = self._restrict(self.match_genes(adata, gene_key))
        seed = resolve_seed(random_state)
        length = self._max_length(max_length)
        emb = embed_matrix(
            self.module,
            self.vocab,
            self.args,
            get_matrix(adata, layer),
            match,
            batch_size=batch_size,
            max_length=length,
            n_bins=self.n_bins,
            random_state=seed,
            random_stream=random_stream,
            device=self.device,
            chunk_size=chunk_size,
        )
        if not return_info:
            return emb
        info = {
            "n_genes_matched": int(match.n_matched),
            "max_length": length,
            "random_state": seed,
            "random_stream": random_stream,
        }
        return emb, info

    @torch.inference_mode()
    def predict_proba(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        layer: str | None = None,
        gene_key: str | None = None,
        batch_size: int = 64,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        max_length: int | None = None,
        random_state: int | None = 0,
    ) -> pd.DataFrame:
        """Class probabilities of each cell (classifier head), cells x classes.

        Cells are tokenized as by :meth:`get_latent_representation` (the genes the model
        reads, subsampled above ``max_length`` with draws of the cell's own stream), so a
        cell's probabilities do not depend on the other cells, the batch or the chunk, and
        the same call gives the same result.

        Parameters
        ----------
        adata
            Cells to label (``None``: the AnnData of the model); genes are matched to the
            vocabulary by name.
        indices
            Rows of ``adata`` to use (``None``: all).
        layer
            Layer with the expression values (``None``: the registered layer, else ``X``).
        gene_key
            ``adata.var`` column with gene symbols or Ensembl IDs (``None``: ``var_names``).
        batch_size
            Cells per forward pass.
        chunk_size
            Cells read and tokenized at a time.
        max_length
            Longest token sequence (``None``: the model's ``max_seq_len``, the fine-tuning
            one).
        random_state
            Seed of the binning tie-breaks and of the subsampling of long cells.

        Returns
        -------
        A DataFrame indexed by ``obs_names``, one column per class, rows summing to 1.
        """
        if self.classes is None:
            raise ValueError(
                "this SCGPT model has no classifier head; fine-tune it with "
                "fine_tune_classifier(reference, labels_key) (or pass a labelled reference to "
                "sft.tl.annotate) before predicting cell types."
            )
        layer = self._layer if layer is None else layer
        adata = self._query(adata, indices, layer, chunk_size)
        match = self._restrict(self.match_genes(adata, gene_key))
        if match.n_matched == 0:
            raise InputError(
                f"none of the {adata.n_vars:,} genes is one the model reads (its "
                f"{len(self.input_genes or self.vocab):,} genes); check that var_names (or "
                "gene_key=) hold gene symbols of the model's species."
            )
        batches = iter_token_batches(
            self.module,
            self.vocab,
            self.args,
            row_blocks(get_matrix(adata, layer), chunk_size=chunk_size),
            match,
            batch_size=batch_size,
            max_length=self._max_length(max_length),
            n_bins=self.n_bins,
            random_state=resolve_seed(random_state),
            device=self.device,
            n_cells=adata.n_obs,
        )
        results = run_minibatches(
            batches,
            lambda inputs: torch.softmax(self.module.class_logits(**inputs), dim=-1),
            device=self.device,
        )
        parts = list(gather_blocks(results, (len(self.classes),)))
        return proba_frame(parts, adata.obs_names, self.classes)

    @torch.inference_mode()
    def get_gene_embeddings(
        self, genes: Sequence[str] | None = None, *, layer_norm: bool = True
    ) -> pd.DataFrame:
        """Gene-token embeddings (the input to gene-module and GRN analyses).

        Parameters
        ----------
        genes
            Vocabulary tokens to return; ``None`` returns the genes of the model's AnnData that
            are in the vocabulary, in ``var`` order, under their ``var_names``.
        layer_norm
            Return the gene encoder's output (embedding row, then its layer norm), as the
            official GRN tutorial uses; ``False`` returns the raw embedding-table rows.

        Returns
        -------
        A DataFrame, genes x ``d_model``.
        """
        if genes is None:
            if self.adata is None:
                raise ValueError("this model has no AnnData attached; pass `genes=`.")
            names = np.asarray(self.adata.var_names)[self.gene_match.matched]
            ids = self.gene_match.index[self.gene_match.matched]
        else:
            genes = [str(g) for g in ([genes] if isinstance(genes, str) else genes)]
            missing = [g for g in genes if g not in self.vocab]
            if missing:
                raise KeyError(
                    f"{len(missing)} genes are not in the model's vocabulary, e.g. {missing[:5]}."
                )
            names, ids = np.asarray(genes, dtype=object), [self.vocab[g] for g in genes]
        encoder = self.module.encoder
        idx = torch.as_tensor(np.asarray(ids, dtype=np.int64), device=self.device)
        emb = encoder(idx) if layer_norm else encoder.embedding(idx)
        return pd.DataFrame(emb.float().cpu().numpy(), index=pd.Index(names, name="gene"))

    def embed_var_genes(
        self,
        adata: AnnData,
        *,
        mode: Literal["token", "context"] = "token",
        layer: str | None = None,
        gene_key: str | None = None,
        batch_size: int = 64,
        max_length: int | None = None,
        random_state: int | None = 0,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        random_stream: RandomStream = "cell",
    ) -> GeneEmbeddings:
        """Embed the genes of ``adata`` (``sft.tl.embed_genes``), one row per ``var`` entry.

        Parameters
        ----------
        adata
            Its genes are matched to the vocabulary; ``mode="context"`` also reads its cells.
        mode
            ``"token"``: the gene encoder's output, independent of any cell (the official GRN
            tutorial's gene embeddings; no expression is read). ``"context"``: the last
            layer's output at each gene's token, averaged over the cells in which it is one
            (cells tokenized as by :meth:`get_latent_representation`).
        layer, gene_key, batch_size, max_length, random_state, chunk_size, random_stream
            As in :meth:`get_latent_representation` (context mode only, except ``gene_key``).

        Returns
        -------
        The embeddings on ``var`` (NaN rows for genes without one), the vocabulary mask, the
        cells per gene (context mode) and the run's record.
        """
        if mode not in ("token", "context"):
            raise ValueError(f"mode must be 'token' or 'context', got {mode!r}.")
        match = self.match_genes(adata, gene_key)
        params: dict[str, Any] = {"n_genes_matched": int(match.n_matched)}
        if mode == "token":
            self.module.eval()
            rows = token_gene_embeddings(self.module, match.index[match.matched])
            return GeneEmbeddings(rows_on_var(rows, match), match.matched.copy(), None, params)
        seed = resolve_seed(random_state)
        length = self._max_length(max_length)
        rows, counts = context_gene_embeddings(
            self.module,
            self.vocab,
            self.args,
            get_matrix(adata, self._layer if layer is None else layer),
            match,
            batch_size=batch_size,
            max_length=length,
            random_state=seed,
            random_stream=random_stream,
            device=self.device,
            chunk_size=chunk_size,
        )
        n_cells = np.zeros(match.n_genes, dtype=np.int64)
        n_cells[match.matched] = counts
        params.update(
            max_length=length,
            random_state=seed,
            random_stream=random_stream,
            n_genes_embedded=int((counts > 0).sum()),
        )
        return GeneEmbeddings(rows_on_var(rows, match), match.matched.copy(), n_cells, params)

    def get_attention_sums(
        self,
        adata: AnnData,
        *,
        layer: str | None = None,
        genes: Sequence[str] | None = None,
        groups: np.ndarray | None = None,
        n_groups: int = 1,
        attention_layer: int = -1,
        batch_size: int = 16,
        max_length: int | None = None,
        random_state: int | None = 0,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        random_stream: RandomStream = "cell",
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Gene x gene attention summed over cells, per group of cells (``sft.tl.grn``).

        Cells are tokenized as by :meth:`get_latent_representation`; see
        :func:`~scfm_tools.models.scgpt._attention.attention_sums`.

        Parameters
        ----------
        adata
            Cells to run.
        layer
            Layer with the expression values (``None``: the registered layer, else ``X``).
        genes
            Genes (``var_names``) to keep as tokens; ``None``: every vocabulary gene (at most
            5,000).
        groups
            Group code of each cell (``None``: one group).
        n_groups
            Number of groups.
        attention_layer
            Transformer layer (negative counts from the last).
        batch_size, max_length, random_state, chunk_size, random_stream
            As in :meth:`get_latent_representation`.

        Returns
        -------
        ``(sums, counts, columns, params)``: attention sums and the number of cells adding to
        each entry, ``(n_groups, n, n)``; the ``var`` positions of the ``n`` genes; the run's
        record.
        """
        match = self.match_genes(adata)
        index = restrict_gene_index(match.index, adata.var_names, genes)
        seed = resolve_seed(random_state)
        length = self._max_length(max_length)
        matrix = get_matrix(adata, self._layer if layer is None else layer)
        sums, counts, columns = attention_sums(
            self.module,
            row_blocks(matrix, chunk_size=chunk_size),
            index,
            cls_id=self.vocab["<cls>"],
            layer=attention_layer,
            groups=groups,
            n_groups=n_groups,
            batch_size=batch_size,
            max_length=length,
            n_bins=self.n_bins,
            random_state=seed,
            random_stream=random_stream,
            device=self.device,
            n_cells=adata.n_obs,
        )
        n_layers = len(self.module.transformer_encoder.layers)
        params = {
            "n_genes_matched": int(match.n_matched),
            "attention_layer": int(attention_layer % n_layers),
            "max_length": length,
            "random_state": seed,
            "random_stream": random_stream,
        }
        return sums, counts, columns, params

    @doc_params(random_stream=DOC_RANDOM_STREAM)
    def get_attention(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        layer: int = -1,
        genes: Sequence[str] | None = None,
        batch_size: int = 16,
        max_length: int | None = None,
        random_state: int | None = 0,
        random_stream: RandomStream = "cell",
    ) -> pd.DataFrame:
        """Gene x gene attention of one layer, heads averaged, averaged over cells.

        Cells are tokenized as for embedding (expressed vocabulary genes, ``<cls>`` first);
        entry ``(g, h)`` is the attention that query gene ``g`` pays to key gene ``h``, averaged
        over the heads and over the cells in which both are tokens (0 where they never are).
        ``<cls>`` is left out. Restricting ``genes`` (e.g. to highly variable genes) keeps the
        sequences short and the matrix small. The same computation as
        ``sft.tl.grn(method="attention")``, which turns it into a network.

        Parameters
        ----------
        adata
            Cells to run (``None``: the AnnData of the model).
        indices
            Rows of ``adata`` to use (``None``: all).
        layer
            Transformer layer (negative counts from the last).
        genes
            Genes (``var_names`` of ``adata``) to keep as tokens; ``None``: every gene in the
            vocabulary (at most 5,000).
        batch_size
            Cells per forward pass.
        max_length
            Longest token sequence (``None``: the model's ``max_seq_len``).
        random_state
            Seed of the binning tie-breaks and of the subsampling.
        {random_stream}

        Returns
        -------
        A genes x genes DataFrame (query genes as rows, key genes as columns).
        """
        adata = self._query(adata, indices, self._layer)
        sums, counts, columns, _ = self.get_attention_sums(
            adata,
            genes=genes,
            attention_layer=layer,
            batch_size=batch_size,
            max_length=max_length,
            random_state=random_state,
            random_stream=random_stream,
        )
        mean = np.divide(sums[0], counts[0], out=np.zeros_like(sums[0]), where=counts[0] > 0)
        names = pd.Index(np.asarray(adata.var_names, dtype=object)[columns], name="gene")
        return pd.DataFrame(mean.astype(np.float32), index=names, columns=names)
