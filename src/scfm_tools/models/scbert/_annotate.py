"""Cell-type annotation with scBERT (``sft.tl.annotate``).

Prediction with a fine-tuned model, or fine-tuning on a labelled reference first and then
prediction (official ``finetune.py`` then ``predict.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from ..._anndata import get_matrix, iter_chunks, resolve_seed
from ..._validation import check_counts, check_nonempty
from ...pp._match_genes import match_adata_genes, match_to_vocab
from ...tl._label_transfer import labels_from_proba, reference_labels
from ._checkpoint import load_scbert_checkpoint, read_gene_list
from ._embed import iter_probabilities
from ._model import CLASSES_FILE, SCBERT, ClassWeights
from ._tokenizer import SCBERTTokenizer

if TYPE_CHECKING:
    from anndata import AnnData

    from ...hub import ResolvedModel

__all__ = ["annotate_resolved"]


def _accelerator(device: torch.device | str | None) -> str:
    kind = torch.device(device).type if device not in (None, "auto") else "auto"
    return {"cuda": "gpu", "cpu": "cpu", "mps": "mps"}.get(kind, "auto")


def _reference_adata(
    reference: AnnData, label_key: str, layer: str | None, gene_key: str | None
) -> AnnData:
    """Copy what training needs from the reference (counts, labels, gene symbols).

    The caller's reference is never registered or modified.
    """
    import anndata as ad

    keep, labels = reference_labels(reference, label_key)
    check_counts(reference, layer)
    check_nonempty(reference, layer)
    names = reference.var_names if gene_key is None else reference.var[gene_key].astype(str)
    X = get_matrix(reference, layer)
    out = ad.AnnData(
        X=X[np.flatnonzero(keep)] if not keep.all() else X.copy(),
        obs=pd.DataFrame(
            {label_key: pd.Categorical(labels)},
            index=reference.obs_names[keep],
        ),
        var=pd.DataFrame(index=pd.Index(np.asarray(names, dtype=str))),
    )
    return out


def _checkpoint_classes(resolved: ResolvedModel, n_classes: int) -> list[str]:
    path = resolved.path / CLASSES_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"the fine-tuned scBERT checkpoint {resolved.weights.name} has no {CLASSES_FILE} "
            f"beside it: write its {n_classes} cell-type names there, one per line, in the "
            "order of the classifier outputs (the official label_dict order, i.e. sorted), or "
            "fine-tune from a reference with reference= and label_key=."
        )
    classes = read_gene_list(path)
    if len(classes) != n_classes:
        raise ValueError(
            f"{path} lists {len(classes)} cell types, but the checkpoint's classifier has "
            f"{n_classes} outputs."
        )
    return classes


def _predict_with_checkpoint(
    resolved: ResolvedModel,
    adata: AnnData,
    *,
    layer: str | None,
    gene_key: str | None,
    batch_size: int,
    device,
    chunk_size: int,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    gene_list = resolved.files.get("gene_list")
    if gene_list is None:
        raise FileNotFoundError(
            f"the scBERT checkpoint {resolved.weights.name} has no gene list beside it: put "
            f"gene_list.txt (the model's gene symbols, one per line, in checkpoint order) in "
            f"{resolved.path}."
        )
    module, genes, _ = load_scbert_checkpoint(resolved.weights, gene_list=gene_list)
    if not module.is_classifier:
        raise ValueError(
            f"{resolved.name} is a pretrained scBERT checkpoint (masked-bin head), not a "
            "fine-tuned one: pass a labelled reference (reference=, label_key=) to fine-tune it "
            "for annotation first."
        )
    classes = _checkpoint_classes(resolved, module.n_classes)
    match = match_adata_genes(adata, genes, gene_key=gene_key, caller="annotate")
    tokenizer = SCBERTTokenizer.from_match(match, module.n_genes, bin_num=module.num_tokens - 2)
    blocks = (block for _, block in iter_chunks(adata, layer, chunk_size=chunk_size))
    parts = list(
        iter_probabilities(
            module, tokenizer, blocks, batch_size=batch_size, device=device, n_cells=adata.n_obs
        )
    )
    proba = pd.DataFrame(np.concatenate(parts), index=adata.obs_names.copy(), columns=classes)
    return proba, {"n_genes_matched": int(match.n_matched), "fine_tuned": "checkpoint"}


def annotate_resolved(
    resolved: ResolvedModel | SCBERT,
    adata: AnnData,
    *,
    layer: str | None = None,
    gene_key: str | None = None,
    reference: AnnData | None = None,
    label_key: str | None = None,
    reference_layer: str | None = None,
    threshold: float | None = None,
    batch_size: int = 8,
    max_epochs: int = 10,
    random_state: int | None = 0,
    device: torch.device | str | None = None,
    chunk_size: int = 10_000,
    class_weights: ClassWeights = "official",
    train_kwargs: dict[str, Any] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Annotate the cells of ``adata`` with scBERT (``sft.tl.annotate``).

    Without a reference, ``resolved`` must be fine-tuned: an :class:`SCBERT` with the
    classifier head, or a fine-tuned checkpoint with ``gene_list.txt`` and ``classes.txt``
    beside it. With a reference, the checkpoint (pretrained or fine-tuned) gets a new
    classifier head for the reference's cell types, fine-tuned as the official ``finetune.py``
    (the head, the final norm and the second-to-last Performer block; ``class_weights`` for
    imbalanced types) for ``max_epochs``, then predicts. ``train_kwargs`` go to
    :meth:`SCBERT.train` (``plan_kwargs={"lr": ...}``, ``train_size`` ...).

    Returns
    -------
    ``(prediction, proba, params)``: labels and scores (``"Unassigned"`` below
    ``threshold``), class probabilities (cells x classes) and what to record in
    ``uns[key]["params"]``.
    """
    seed = resolve_seed(random_state)
    params: dict[str, Any] = {"random_state": seed}
    if reference is not None:
        if isinstance(resolved, SCBERT):
            raise ValueError(
                "with reference=, pass the checkpoint to fine-tune (a model name or path) as "
                "model=; an SCBERT model object is used as it is (fine-tune it with its train())."
            )
        if label_key is None:
            raise ValueError(
                "reference= needs label_key=, the reference's obs column of cell types."
            )
        ref = _reference_adata(reference, label_key, reference_layer, gene_key)
        SCBERT.setup_anndata(ref, labels_key=label_key)
        train = dict(train_kwargs or {})
        plan = dict(train.pop("plan_kwargs", None) or {})
        plan.setdefault("random_state", seed)
        train.setdefault("accelerator", _accelerator(device))
        # The new head's initialisation and the minibatch order follow random_state, without
        # disturbing the caller's global torch random state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = SCBERT.from_pretrained(resolved.weights, ref, head="classifier")
            model.train(
                max_epochs=max_epochs,
                batch_size=batch_size,
                class_weights=class_weights,
                plan_kwargs=plan,
                **train,
            )
        history = getattr(model, "history", None) or {}
        params.update(
            {
                "label_key": label_key,
                "n_reference_cells": int(ref.n_obs),
                "max_epochs": max_epochs,
                "class_weights": class_weights if isinstance(class_weights, str) else "custom",
                "fine_tuned": "reference",
            }
        )
        if "train_loss" in history:
            params["final_train_loss"] = float(np.asarray(history["train_loss"]).ravel()[-1])
        resolved = model
    if isinstance(resolved, SCBERT):
        model = resolved
        if model.classes is None:
            raise ValueError(
                "this SCBERT model has the pretraining head; fine-tune it (head='classifier') "
                "or pass a labelled reference to annotate."
            )
        proba = model.predict_proba(adata, batch_size=batch_size, layer=layer, gene_key=gene_key)
        params.setdefault("fine_tuned", "model")
        names = adata.var_names if gene_key is None else adata.var[gene_key]
        params["n_genes_matched"] = int(match_to_vocab(np.asarray(names), model.genes).n_matched)
    else:
        proba, extra = _predict_with_checkpoint(
            resolved,
            adata,
            layer=layer,
            gene_key=gene_key,
            batch_size=batch_size,
            device=device,
            chunk_size=chunk_size,
        )
        params.update(extra)
    params["classes"] = [str(c) for c in proba.columns]
    return labels_from_proba(proba, threshold), proba, params
