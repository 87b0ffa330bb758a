"""Read CellPLM checkpoints: ``<prefix>.config.json`` + ``<prefix>.best.ckpt``.

The config holds the hyper-parameters and the gene list (Ensembl IDs, in the order of the
gene-embedding rows and decoder outputs); a model fine-tuned for annotation here also has the
official ``head_type='annotation'``, ``latent_mod='ae'`` and ``out_dim`` (the number of cell
types), and ``classes`` (their names, in the order of the head's outputs). The checkpoint is
a pickled dict whose ``"model_state_dict"`` holds the weights, read with
``torch.load(weights_only=True)`` so that a downloaded file cannot run code. Files are located
by :func:`scfm_tools.hub.load`.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .._load_report import LoadReport, build_without_moving_rng, load_matching
from .._safetensors import read_safetensors
from ._module import CellPLMModule

if TYPE_CHECKING:
    from ...hub import ResolvedModel

__all__ = ["IGNORED_PREFIXES", "load_cellplm_checkpoint", "module_config"]

logger = logging.getLogger("scfm_tools")

REQUIRED_CONFIG = ("gene_list", "enc_hid", "enc_layers", "post_latent_dim", "dec_hid", "dec_layers")
# Weights the official model builds but never uses in its forward pass (an unused norm and the
# spatial positional encoder, whose output is commented out upstream); they are not loaded.
IGNORED_PREFIXES = ("embedder.norm0.", "embedder.pe_enc.")
_SUPPORTED = {"enc_mod": "flowformer", "latent_mod": ("gmvae", "ae"), "dec_mod": ("nbmlp",)}
_HEADS = (None, "annotation")


def _read_config(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            config = json.load(fh)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}).") from err
    if not isinstance(config, dict):
        raise ValueError(f"this does not look like a CellPLM config: {path} is not a JSON object.")
    missing = [k for k in REQUIRED_CONFIG if k not in config]
    if missing:
        raise ValueError(
            f"this does not look like a CellPLM config: {path} lacks {missing} (a CellPLM "
            f"<prefix>.config.json has {list(REQUIRED_CONFIG)}); found keys {sorted(config)[:10]}."
        )
    genes = config["gene_list"]
    if not isinstance(genes, list) or not genes or not all(isinstance(g, str) for g in genes):
        raise ValueError(f"{path}: 'gene_list' must be a non-empty list of gene IDs.")
    if len(set(genes)) != len(genes):
        raise ValueError(f"{path}: 'gene_list' contains duplicated genes.")
    return config


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":  # the project's own weights (no pickle)
        return _check_state_dict(read_safetensors(path), path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        raise ValueError(
            f"{path} could not be read as a torch checkpoint with weights_only=True (which "
            f"refuses files that would run code on load): {err}"
        ) from err
    if isinstance(obj, Mapping) and "model_state_dict" in obj:
        obj = obj["model_state_dict"]
    return _check_state_dict(obj, path)


def _check_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """``obj`` as a CellPLM state dict, or a clear error saying what the file holds."""
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = list(obj)[:5] if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(
            f"this does not look like a CellPLM checkpoint: {path} does not hold a state dict of "
            f"tensors (top level: {keys})."
        )
    if "embedder.feat_enc.emb" not in obj or not any(k.startswith("encoder.layers.") for k in obj):
        raise ValueError(
            f"this does not look like a CellPLM checkpoint: {path} has keys such as "
            f"{list(obj)[:5]}, but CellPLM weights (under 'model_state_dict') have "
            "'embedder.feat_enc.emb' and 'encoder.layers.N.*'. Is it another model family's "
            "checkpoint?"
        )
    return dict(obj)


def module_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Translate an official CellPLM config into :class:`CellPLMModule` arguments.

    Parameters
    ----------
    config
        The content of ``<prefix>.config.json`` (official key names).

    Returns
    -------
    Keyword arguments of :class:`CellPLMModule`.
    """
    head = config.get("head_type")
    if head not in _HEADS:
        raise NotImplementedError(
            f"head_type={head!r} is not supported; only the annotation head (or none) is."
        )
    # A task head takes the decoder's place, so the decoder setting does not apply then.
    checked = {k: v for k, v in _SUPPORTED.items() if not (head and k == "dec_mod")}
    for key, allowed in checked.items():
        allowed = (allowed,) if isinstance(allowed, str) else allowed
        if config.get(key, allowed[0]) not in allowed:
            raise NotImplementedError(
                f"{key}={config[key]!r} is not supported; only the published configuration "
                f"({', '.join(f'{k} in {v!r}' for k, v in checked.items())}) is."
            )
    for flag in ("dsbn", "input_covariate"):
        if config.get(flag):
            raise NotImplementedError(
                f"{flag}=True is not supported (the published model has it off)."
            )
    if config.get("mask_type", "input") != "input":
        raise NotImplementedError("only mask_type='input' (the published setting) is supported.")
    if config.get("cat_pe", False) and config.get("pe_type", "sin") is not None:
        raise NotImplementedError("cat_pe=True is not supported (the published model has it off).")
    if config.get("dar") or config.get("ecs"):
        logger.warning(
            "the CellPLM config asks for an adversarial (dar) or ECS latent layer; these "
            "training-only layers are not implemented and their weights are not loaded."
        )
    n_genes = len(config["gene_list"])
    out_dim = int(config.get("out_dim", n_genes))
    n_classes = None
    if head == "annotation":
        classes = config.get("classes")
        if not isinstance(classes, list) or len(classes) != out_dim:
            raise ValueError(
                f"an annotation config needs 'classes', the {out_dim} (out_dim) cell-type names "
                "in the order of the head's outputs."
            )
        n_classes = out_dim
    elif out_dim != n_genes:
        raise ValueError(
            f"the config's out_dim ({out_dim}) differs from the length of its gene_list "
            f"({n_genes}); the decoder's outputs must be the listed genes."
        )
    return {
        "n_genes": n_genes,
        "enc_hid": int(config["enc_hid"]),
        "enc_layers": int(config["enc_layers"]),
        "enc_heads": int(config.get("enc_head", 8)),
        "post_latent_dim": int(config["post_latent_dim"]),
        "num_clusters": int(config.get("num_clusters", 16)),
        "dec_hid": int(config["dec_hid"]),
        "dec_layers": int(config["dec_layers"]),
        "batch_num": int(config.get("batch_num", 0)),
        "dataset_num": int(config.get("dataset_num", 0)),
        "platform_num": int(config.get("platform_num", 0)),
        "dropout": float(config.get("model_dropout", 0.1)),
        "norm": str(config.get("norm", "layernorm")),
        "lamda": float(config.get("lamda", 0.5)),
        "w_li": float(config.get("w_li", 1.0)),
        "w_en": float(config.get("w_en", 1.0)),
        "dae": bool(config.get("dae", True)),
        "latent_mod": str(config.get("latent_mod", "gmvae")),
        "n_classes": n_classes,
    }


def _files(source: str | os.PathLike | ResolvedModel) -> tuple[Path, Path]:
    from ...hub import ResolvedModel, load

    resolved = source if isinstance(source, ResolvedModel) else load(source, family="cellplm")
    if resolved.family != "cellplm":
        raise ValueError(
            f"{resolved.name} is a {resolved.family} model, not a CellPLM one; load it with its "
            "own family's loader (or pass it to sft.tl functions, which dispatch by family)."
        )
    if "config" not in resolved.files:
        raise FileNotFoundError(
            f"the CellPLM model {resolved.name} has no <prefix>.config.json beside its weights."
        )
    return Path(resolved.files["config"]), Path(resolved.files["weights"])


def load_cellplm_checkpoint(
    source: str | os.PathLike | ResolvedModel, *, strict: bool = False
) -> tuple[CellPLMModule, list[str], dict[str, Any], LoadReport]:
    """Load a CellPLM checkpoint (official layout) into a :class:`CellPLMModule`.

    Reads ``<prefix>.config.json`` (hyper-parameters and the Ensembl gene list) and
    ``<prefix>.best.ckpt`` (``torch.load(weights_only=True)``, weights under
    ``"model_state_dict"``; or ``<prefix>.safetensors``, as the package's own default) and
    loads every tensor whose key and shape match. Unlike the official ``load_pretrain``, nothing
    is dropped silently: missing, unexpected and mismatched keys are listed in the returned
    report and in a WARNING. The weights of submodules the official
    forward pass never uses (``embedder.norm0``, ``embedder.pe_enc``, see
    :data:`IGNORED_PREFIXES`) are not loaded, which is logged at INFO level.

    Parameters
    ----------
    source
        A ``<prefix>.best.ckpt`` file, a folder holding one checkpoint pair, a registered model
        name, or a :class:`~scfm_tools.hub.ResolvedModel` (see :func:`scfm_tools.hub.load`).
    strict
        Raise instead of warning when any key is missing, unexpected or of the wrong shape.

    Returns
    -------
    ``(module, gene_list, config, report)``: the module in eval mode on CPU, the model's genes
    (row order of the gene embedding and of the decoder outputs), the config dict and a
    :class:`~scfm_tools.models._load_report.LoadReport`.
    """
    config_path, weights_path = _files(source)
    config = _read_config(config_path)
    state = _read_state_dict(weights_path)
    module = build_without_moving_rng(CellPLMModule, **module_config(config))

    ignored = [k for k in state if k.startswith(IGNORED_PREFIXES)]
    if ignored:
        logger.info(
            "CellPLM checkpoint %s: %d tensors of submodules the official forward pass never uses "
            "(embedder.norm0, embedder.pe_enc) are not loaded.",
            weights_path,
            len(ignored),
        )
    used = {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIXES)}
    report = load_matching(module, used, source=str(weights_path), family="CellPLM", strict=strict)
    module.eval()
    return module, list(config["gene_list"]), config, report
