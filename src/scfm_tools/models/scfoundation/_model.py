"""The AnnData-facing scFoundation model: setup, RDA pretraining, embeddings, export."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.data.fields import LayerField
from scvi.model.base import BaseModelClass

from ..._anndata import get_matrix, resolve_seed
from ..._docs import doc_params
from ..._validation import InputError, check_counts, check_nonempty, check_unique_names
from ...pp._match_genes import match_adata_genes
from ...train import DOC_TRAIN_SCALE, TrainingMixin
from ._checkpoint import Entry, load_scfoundation_checkpoint, official_entry
from ._embed import embed_matrix
from ._module import Pool, SCFoundationModule
from ._preprocess import TargetDepth
from ._training_plan import RDA_KEY, SCFoundationTrainingPlan

if TYPE_CHECKING:
    from anndata import AnnData
    from lightning.pytorch.strategies import Strategy

__all__ = ["SCFoundation"]

logger = logging.getLogger("scfm_tools")

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


class SCFoundation(TrainingMixin, BaseModelClass):
    """scFoundation (xTrimoGene, Hao et al. 2024) as an scvi-tools model: RDA pretraining.

    Every cell is read on the model's genes (genes of ``adata`` matched by symbol; model genes
    the data lacks are zero), ``log1p``-normalised to counts per 10,000, and given its two
    depth tokens. Training is the published read-depth-aware objective: the input is a
    downsampled copy of the cell (``sft.pp.downsample_rda``, registered as ``rda_layer``; its
    total count is ``S``), the target the original cell (total count ``T``); a share of the
    input's values is selected (30% of the non-zero, 3% of the zero ones; of those, as published,
    80% are masked, 10% given a random value and 10% left visible), and the model predicts
    the original values there, knowing ``T`` and ``S`` (mean squared error). The encoder sees
    only the expressed, unmasked genes; the Performer decoder the whole gene sequence.

    Call :meth:`setup_anndata` first. Start from scratch with this constructor, or from a
    checkpoint (official ``models.ckpt`` or :meth:`export`-ed) with :meth:`from_pretrained`.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    gene_list
        The model's genes; ``None`` uses ``adata.var_names``.
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
    """

    _module_cls = SCFoundationModule
    _training_plan_cls = SCFoundationTrainingPlan

    def __init__(
        self,
        adata: AnnData,
        *,
        gene_list: Sequence[str] | None = None,
        **module_kwargs: Any,
    ) -> None:
        super().__init__(adata)
        genes = [str(g) for g in (adata.var_names if gene_list is None else gene_list)]
        check_unique_names(pd.Index(genes), what="gene_list")
        self.gene_list = genes
        self.gene_match = match_adata_genes(adata, genes, caller="SCFoundation")
        kwargs = {**DEFAULT_ARCHITECTURE, **module_kwargs}
        self.module = self._module_cls(len(genes), **kwargs)
        cfg = self.module.config
        self._model_summary_string = (
            f"SCFoundation model: {len(genes):,} genes ({self.gene_match.n_matched:,} in adata), "
            f"encoder {cfg['enc_dim']} x {cfg['enc_depth']} layers, Performer decoder "
            f"{cfg['dec_dim']} x {cfg['dec_depth']} blocks"
        )
        self.init_params_ = self._get_init_params(locals())

    # setup -------------------------------------------------------------------------------------
    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        layer: str | None = None,
        rda_layer: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Register an AnnData for :class:`SCFoundation`.

        Both matrices must hold raw counts of the same cells and genes, with unique gene names
        and no empty cell. Nothing is written to ``adata`` when a check fails.

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
        **kwargs
            Passed to :meth:`scvi.data.AnnDataManager.register_fields`.
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        check_counts(adata, layer)
        check_nonempty(adata, layer)
        check_unique_names(adata.var_names)
        fields = [LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=True)]
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
        name_or_path: str | os.PathLike,
        adata: AnnData,
        *,
        entry: Entry = "gene",
        **module_kwargs: Any,
    ) -> SCFoundation:
        """Build the model around a checkpoint, for embedding or continued pretraining.

        Parameters
        ----------
        name_or_path
            A registered model name (``"scfoundation"``) or a local ``models.ckpt`` (official
            layout, or written by :meth:`export`).
        adata
            AnnData registered with :meth:`setup_anndata`.
        entry
            Which ``models.ckpt`` entry to start from (``"gene"``, ``"cell"`` or ``"rde"``).
        **module_kwargs
            Runtime options of :class:`~scfm_tools.models.scfoundation.SCFoundationModule`
            (``dropout``, ``feature_redraw_interval``, ``key_max``, ``chunk_size``).

        Returns
        -------
        An :class:`SCFoundation` holding the checkpoint's weights; ``pretrained_`` records the
        source, the entry and the load report.
        """
        pretrained, genes, _, report = load_scfoundation_checkpoint(
            name_or_path, entry, **module_kwargs
        )
        kwargs = dict(pretrained.config)
        kwargs.pop("n_genes")
        kwargs.update(module_kwargs)
        model = cls(adata, gene_list=genes, **kwargs)
        model.module.load_state_dict(pretrained.state_dict())
        model.module.eval()
        model.pretrained_ = {
            "source": str(name_or_path),
            "entry": entry,
            "clean": report.clean,
            "report": str(report),
        }
        return model

    def export(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the model as an official ``models.ckpt`` (same weights in all three entries).

        The file is read by :func:`~scfm_tools.models.scfoundation.load_scfoundation_checkpoint`,
        :meth:`from_pretrained`, ``sft.tl`` functions and the official ``load_model_frommmf``;
        when the model's genes are not the official 19,264, its gene list is written beside it
        as ``OS_scRNA_gene_index.19264.tsv`` (the file name the loaders look for).

        Parameters
        ----------
        path
            File to write (e.g. ``"models/models.ckpt"``) or a folder to write it in.
        overwrite
            Replace an existing file.

        Returns
        -------
        Path of the checkpoint.
        """
        from ._checkpoint import GENE_INDEX_FILE, read_gene_index

        path = Path(path).expanduser()
        if path.is_dir() or not path.suffix:
            path = path / "models.ckpt"
        genes_path = path.parent / GENE_INDEX_FILE
        existing = [p.name for p in (path, genes_path) if p.exists()]
        if existing and not overwrite:
            raise FileExistsError(f"{existing} exist in {path.parent}; pass overwrite=True.")
        path.parent.mkdir(parents=True, exist_ok=True)
        entry = official_entry(self.module)
        torch.save({"cell": entry, "gene": entry, "rde": entry}, path)
        if self.gene_list != read_gene_index():
            table = pd.DataFrame({"gene_name": self.gene_list, "index": range(len(self.gene_list))})
            table.to_csv(genes_path, sep="\t", index=False)
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
        strategy: str | Strategy = "auto",
        num_nodes: int = 1,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_kwargs: dict[str, Any] | None = None,
        resume: bool | str | os.PathLike = False,
        **kwargs: Any,
    ):
        """Pretrain with the RDA objective, through Lightning (CPU, GPU, several GPUs).

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
            "gene_index": self.gene_match.index,
            "random_state": resolve_seed(random_state),
            **(plan_kwargs or {}),
        }
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

    # outputs -----------------------------------------------------------------------------------
    def _outputs(self, adata, indices, output, **kwargs) -> np.ndarray:
        adata = self._validate_anndata(adata)
        if indices is not None:
            adata = adata[np.asarray(indices)]
        layer = self.registry_["setup_args"].get("layer")
        if adata.var_names.equals(self.adata.var_names):
            match = self.gene_match
        else:
            match = match_adata_genes(adata, self.gene_list, caller="SCFoundation")
        if output != "cell" and self.gene_match.n_matched == 0:
            raise InputError("no gene of adata is in the model's gene list.")
        return embed_matrix(
            self.module,
            get_matrix(adata, layer),
            match,
            output=output,
            obs_names=adata.obs_names,
            **kwargs,
        )

    @torch.inference_mode()
    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        pool: Pool = "all",
        target_depth: TargetDepth = "t4",
        batch_size: int = 8,
        device: str | None = None,
    ) -> np.ndarray:
        """Cell embeddings (the official ``get_embedding.py --output_type cell``).

        Parameters
        ----------
        adata
            AnnData with the registered genes (raw counts); ``None`` uses the model's.
        indices
            Cells to embed; ``None`` embeds all.
        pool
            ``"all"`` (``[S, T, max, mean]``, ``4 * enc_dim``) or ``"max"``.
        target_depth
            The ``T`` token (see :func:`~scfm_tools.models.scfoundation.parse_target_depth`).
        batch_size
            Most cells per forward pass.
        device
            Where to run (``None``: ``sft.settings.device``).

        Returns
        -------
        ``(n_cells, 4 * enc_dim)`` or ``(n_cells, enc_dim)`` float32 array.
        """
        return self._outputs(
            adata,
            indices,
            "cell",
            pool=pool,
            target_depth=target_depth,
            batch_size=batch_size,
            device=device,
        )

    @torch.inference_mode()
    def get_gene_expression(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        target_depth: TargetDepth = "t4",
        output: Literal["gene_expression", "gene"] = "gene_expression",
        batch_size: int = 8,
        device: str | None = None,
    ) -> np.ndarray:
        """Predicted expression (or the decoder's gene embeddings) at a target depth.

        Parameters
        ----------
        adata
            AnnData with the registered genes (raw counts); ``None`` uses the model's.
        indices
            Cells to run; ``None`` runs all.
        target_depth
            The depth to predict at (see
            :func:`~scfm_tools.models.scfoundation.parse_target_depth`).
        output
            ``"gene_expression"``: ``log1p`` counts per 10,000, ``(n_cells, n_genes)``;
            ``"gene"``: the decoder's gene embeddings ``(n_cells, n_genes, dec_dim)``.
        batch_size
            Most cells per forward pass.
        device
            Where to run (``None``: ``sft.settings.device``).

        Returns
        -------
        float32 array, genes in the model's order (:attr:`gene_list`).
        """
        return self._outputs(
            adata,
            indices,
            output,
            target_depth=target_depth,
            batch_size=batch_size,
            device=device,
        )
