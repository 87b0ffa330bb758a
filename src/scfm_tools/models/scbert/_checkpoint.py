"""Read official scBERT checkpoints (``panglao_pretrain.pth`` and fine-tuned ``*.pth``).

An official checkpoint is a ``torch.save`` dict whose ``model_state_dict`` holds the weights of
``PerformerLM`` (fine-tuned ones with the classifier head under ``to_out.*``); it is read with
``torch.load(weights_only=True)``, so a file cannot run code when loaded. The package's own
weights (``<name>.safetensors``, the same state dict as tensors only, e.g. the shipped
``scbert-default``) are read as they are. Everything about the architecture is read off the
tensor shapes.

The gene list is not part of any official file: it is the ``var_names`` of
``panglao_10000.h5ad`` from the scBERT data download (see the ``scbert`` model card,
``sft.hub.get_card("scbert")``), given here as a text file with one symbol per line, in the
checkpoint's order. Its length must equal the rows of the checkpoint's gene2vec table minus
its padding row. The gene2vec table itself needs no file: the checkpoint stores it
(``pos_emb.emb.weight``), see :func:`read_gene2vec`.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..._validation import check_unique_names
from .._load_report import LoadReport, build_without_moving_rng, load_matching
from .._safetensors import read_safetensors
from ._module import SCBERTModule

__all__ = [
    "GENE_LIST_FILE",
    "load_scbert_checkpoint",
    "read_gene2vec",
    "read_gene_list",
    "read_scbert_state",
]

logger = logging.getLogger("scfm_tools")

GENE_LIST_FILE = "gene_list.txt"
_PREFIX = "performer.net.layers."
_REQUIRED = (
    "token_emb.weight",
    "performer.net.layers.0.0.fn.fast_attention.projection_matrix",
    "performer.net.layers.0.0.fn.to_q.weight",
    "performer.net.layers.0.1.fn.fn.w1.weight",
    "norm.weight",
)
_HOW_TO_GET = (
    "the official list is the var_names of panglao_10000.h5ad from the scBERT data download, "
    "one per line (see `sft.hub.get_card('scbert').manual_download`)"
)


def read_gene_list(path: str | os.PathLike) -> list[str]:
    """Read a gene list: one gene symbol per line, in the model's order.

    Surrounding whitespace is stripped and a trailing empty line is allowed; blank lines
    elsewhere and duplicated names are refused.

    Parameters
    ----------
    path
        The text file (e.g. ``gene_list.txt`` beside the checkpoint).

    Returns
    -------
    The gene symbols, in file order.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"gene list {path} does not exist; {_HOW_TO_GET}.")
    text = path.read_text(encoding="utf-8")
    genes = [line.strip() for line in text.splitlines()]
    while genes and not genes[-1]:
        genes.pop()
    blank = [i + 1 for i, g in enumerate(genes) if not g]
    if blank:
        raise ValueError(
            f"gene list {path} has blank lines (line {blank[0]} first); it must hold one gene "
            "symbol per line."
        )
    if not genes:
        raise ValueError(f"gene list {path} is empty; {_HOW_TO_GET}.")
    check_unique_names(pd.Index(genes), what=f"the gene list {path.name}")
    return genes


def _other_family(obj: Any) -> str | None:
    """Name the family of a checkpoint that is not scBERT's, from its keys."""
    if not isinstance(obj, Mapping):
        return None
    inner = obj.get("state_dict")
    if {"gene", "cell"} <= set(obj) or (
        isinstance(inner, Mapping) and any(str(k).startswith("model.") for k in inner)
    ):
        return "scFoundation"
    keys = [str(k) for k in obj]
    if any(k.startswith(("encoder.embedding.", "transformer_encoder.")) for k in keys):
        return "scGPT"
    if any(k.startswith("embedder.") for k in keys):
        return "CellPLM"
    if any(k.startswith(("decoder.performer.", "encoder.transformer_encoder.")) for k in keys):
        return "scFoundation"
    return None


def read_scbert_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read the state dict of an scBERT checkpoint file, safely.

    Accepts the official ``{'model_state_dict': ...}`` dict (extra entries such as the
    optimizer state are ignored), a bare state dict, or the package's own ``.safetensors``
    file; a ``module.`` prefix left by ``DistributedDataParallel`` is removed.

    Parameters
    ----------
    path
        The ``.pth`` (or ``.safetensors``) file.

    Returns
    -------
    ``(state, renamed)``: the state dict and the keys whose prefix was removed.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"scBERT checkpoint {path} does not exist.")
    if path.suffix == ".safetensors":  # the package's own weights (no pickle)
        obj = read_safetensors(path)
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
            raise ValueError(
                f"{path} could not be read as a torch checkpoint with weights_only=True (which "
                f"refuses files that would run code on load): {err}"
            ) from err
    state = obj.get("model_state_dict", obj) if isinstance(obj, Mapping) else obj
    other = _other_family(obj) or _other_family(state)
    if other is not None:
        raise ValueError(
            f"this is not an scBERT checkpoint: {path} looks like a {other} checkpoint. Load it "
            f"with the {other} family (e.g. `sft.hub.load(path, family=...)`)."
        )
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        top = list(obj)[:5] if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(
            f"this does not look like an scBERT checkpoint: {path} holds no state dict of "
            f"tensors under 'model_state_dict' (top level: {top})."
        )
    renamed: dict[str, str] = {}
    if state and all(str(k).startswith("module.") for k in state):
        renamed = {k: k[len("module.") :] for k in state}
        state = {renamed[k]: v for k, v in state.items()}
    lacking = [k for k in _REQUIRED if k not in state]
    if lacking:
        raise ValueError(
            f"this does not look like an scBERT checkpoint: {path} lacks {lacking} (found keys "
            f"such as {list(state)[:5]})."
        )
    return dict(state), renamed


def read_gene2vec(path: str | os.PathLike) -> np.ndarray:
    """Rebuild the gene2vec table (``gene2vec_16906.npy`` for the published model).

    The official model stores ``[gene2vec ; zeros]`` as ``pos_emb.emb.weight``; the table is
    that without its last (padding) row.

    Parameters
    ----------
    path
        An scBERT checkpoint.

    Returns
    -------
    ``(n_genes, dim)`` float64 array.
    """
    state, _ = read_scbert_state(path)
    if "pos_emb.emb.weight" not in state:
        raise ValueError(
            f"{path} has no gene2vec table (pos_emb.emb.weight): it was trained without "
            "gene2vec (g2v_position_emb=False)."
        )
    return state["pos_emb.emb.weight"][:-1].double().numpy()


def _config(state: Mapping[str, torch.Tensor], n_genes_hint: int | None) -> dict[str, Any]:
    num_tokens, dim = state["token_emb.weight"].shape
    depth = 1 + max(int(k[len(_PREFIX) :].split(".")[0]) for k in state if k.startswith(_PREFIX))
    nb_features, dim_head = state[
        "performer.net.layers.0.0.fn.fast_attention.projection_matrix"
    ].shape
    inner = state["performer.net.layers.0.0.fn.to_q.weight"].shape[0]
    hidden = state["performer.net.layers.0.1.fn.fn.w1.weight"].shape[0]
    if inner % dim_head or hidden % dim:
        raise ValueError(
            f"inconsistent scBERT weights: q/k/v width {inner} is not a multiple of the head "
            f"dimension {dim_head}, or feed-forward width {hidden} not a multiple of {dim}."
        )
    if "pos_emb.emb.weight" in state:
        seq_len = state["pos_emb.emb.weight"].shape[0]
    elif "to_out.fc1.weight" in state:
        seq_len = state["to_out.fc1.weight"].shape[1]
    elif n_genes_hint is not None:
        seq_len = n_genes_hint + 1
    else:
        raise ValueError(
            "this scBERT checkpoint has neither a gene2vec table nor a classifier head, so its "
            "number of genes is unknown: pass gene_list."
        )
    classifier = "to_out.fc3.weight" in state
    return {
        "n_genes": int(seq_len) - 1,
        "num_tokens": int(num_tokens),
        "dim": int(dim),
        "depth": int(depth),
        "heads": int(inner // dim_head),
        "dim_head": int(dim_head),
        "nb_features": int(nb_features),
        "ff_mult": int(hidden // dim),
        "qkv_bias": "performer.net.layers.0.0.fn.to_q.bias" in state,
        "gene2vec": "pos_emb.emb.weight" in state,
        "n_classes": int(state["to_out.fc3.weight"].shape[0]) if classifier else None,
        "head_hidden": int(state["to_out.fc2.weight"].shape[0]) if classifier else 128,
    }


def _genes(gene_list: str | os.PathLike | Sequence[str] | None) -> list[str] | None:
    if gene_list is None:
        return None
    if isinstance(gene_list, str | os.PathLike):
        return read_gene_list(gene_list)
    genes = [str(g) for g in gene_list]
    check_unique_names(pd.Index(genes), what="gene_list")
    return genes


def load_scbert_checkpoint(
    path: str | os.PathLike,
    *,
    gene_list: str | os.PathLike | Sequence[str] | None = None,
    strict: bool = False,
    **module_kwargs: Any,
) -> tuple[SCBERTModule, list[str] | None, LoadReport]:
    """Load an official scBERT checkpoint (pretrained or fine-tuned) into :class:`SCBERTModule`.

    The architecture (width, depth, heads, random features, number of genes, classifier head)
    is read off the tensor shapes; every tensor whose key and shape match is loaded, and
    anything else is listed in the returned report and in a WARNING, never dropped silently.

    Parameters
    ----------
    path
        The ``.pth`` file (``panglao_pretrain.pth`` or a fine-tuned ``*_best.pth``), or the
        package's own ``.safetensors``.
    gene_list
        The model's genes in checkpoint order: a text file with one symbol per line, or a
        sequence of symbols. Needed to put cells on the model's genes; its length must be the
        checkpoint's number of genes (16,906 for the published model). ``None`` loads the
        weights only.
    strict
        Raise instead of warning when a key is missing, unexpected or of the wrong shape.
    **module_kwargs
        Runtime options of :class:`SCBERTModule` (``key_max``, ``chunk_size``,
        ``feature_redraw_interval``, dropout rates, ``class_weights``).

    Returns
    -------
    ``(module, genes, report)``: the module in eval mode on CPU, the gene list (or ``None``),
    and the :class:`~scfm_tools.models._load_report.LoadReport`.

    Raises
    ------
    ValueError
        Not an scBERT checkpoint (another family's is named as such), or a gene list whose
        length does not match the checkpoint.
    """
    state, renamed = read_scbert_state(path)
    genes = _genes(gene_list)
    config = _config(state, None if genes is None else len(genes))
    if genes is not None and len(genes) != config["n_genes"]:
        raise ValueError(
            f"the gene list has {len(genes):,} genes, but the checkpoint {Path(path).name} was "
            f"trained on {config['n_genes']:,} (its gene2vec table has {config['n_genes'] + 1:,} "
            f"rows: one per gene plus a padding row). Pass the list the checkpoint was trained "
            f"with; {_HOW_TO_GET}."
        )
    fixed = set(config) & set(module_kwargs)
    if fixed:
        raise TypeError(
            f"{sorted(fixed)} are read from the checkpoint and cannot be overridden here."
        )
    module = build_without_moving_rng(SCBERTModule, **config, **module_kwargs)
    report = load_matching(
        module, state, source=str(path), family="scBERT", renamed=renamed, strict=strict
    )
    module.eval()
    return module, genes, report
