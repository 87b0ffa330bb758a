"""Read official scFoundation checkpoints (``models.ckpt``) and the model's gene list.

``models.ckpt`` is a pickled dict with up to three entries, ``"cell"`` (cell embeddings),
``"gene"`` (gene-context embeddings and expression) and ``"rde"`` (read-depth enhancement),
each an MMF/Lightning-style ``{"config": {...}, "state_dict": {"model.<param>": tensor}}``.
It is read with ``torch.load(weights_only=True)``, so a downloaded file cannot run code. The
official ``get_embedding.py`` picks the entry from its options (see :func:`entry_for`).

The gene list is not in the checkpoint: it is ``OS_scRNA_gene_index.19264.tsv`` of the official
repository (Apache-2.0), which ships with this package; a copy beside the checkpoint is
preferred when present.

The package's own layout (:func:`write_scfoundation_safetensors`; fine-tuned classifiers are
always written so, since ``models.ckpt`` has no place for cell types) is a folder with

- ``models.safetensors``: the module's state dict (keys without the ``model.`` prefix, the
  classifier head under ``classifier.*``), tensors only;
- ``config.json``: ``{"format": "scfm_tools.scfoundation", "format_version": 1,
  "architecture": {SCFoundationModule arguments}, "classes": [cell types, in the order of the
  head's outputs] or null, "classifier_input": {how cells are read for the head} or null}``;
- ``OS_scRNA_gene_index.19264.tsv`` when the model's genes are not the official 19,264 (the
  same file name the official layout uses).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pickle
from collections.abc import Mapping, Sequence
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd
import torch

from ..._validation import check_unique_names
from .._load_report import LoadReport, build_without_moving_rng, load_matching
from .._safetensors import read_safetensors, write_safetensors
from ._module import SCFoundationModule

if TYPE_CHECKING:
    from ...hub import ResolvedModel

__all__ = [
    "CONFIG_FILE",
    "ENTRIES",
    "GENE_INDEX_FILE",
    "SAFETENSORS_FILE",
    "entry_for",
    "load_scfoundation_checkpoint",
    "module_config",
    "official_entry",
    "read_gene_index",
    "read_scfoundation_config",
    "read_scfoundation_entry",
    "write_gene_index",
    "write_scfoundation_safetensors",
]

logger = logging.getLogger("scfm_tools")

Entry = Literal["cell", "gene", "rde"]
ENTRIES: tuple[Entry, ...] = ("cell", "gene", "rde")
#: File name of the official gene list (19,264 gene symbols; column ``gene_name``).
GENE_INDEX_FILE = "OS_scRNA_gene_index.19264.tsv"
_PACKAGED_GENE_INDEX = GENE_INDEX_FILE + ".gz"
#: The package's own layout: weights file and its config.
SAFETENSORS_FILE = "models.safetensors"
CONFIG_FILE = "config.json"
_FORMAT = "scfm_tools.scfoundation"
_FORMAT_VERSION = 1
# Module arguments that are run options, not architecture: left to the loader's caller.
_RUN_OPTIONS = ("dropout", "feature_redraw_interval")
_PREFIX = "model."
_ENC = "encoder.transformer_encoder."
_DEC = "decoder.performer.net.layers."


def entry_for(output: str, version: str = "ce") -> Entry:
    """Return the ``models.ckpt`` entry the official ``get_embedding.py`` uses.

    Parameters
    ----------
    output
        ``"cell"``, ``"gene"`` or ``"gene_expression"`` (official ``--output_type``).
    version
        ``"ce"`` or ``"rde"`` (official ``--version``; only used for cell embeddings).

    Returns
    -------
    ``"cell"`` (cell embeddings, ``version="ce"``), ``"rde"`` (cell embeddings,
    ``version="rde"``) or ``"gene"`` (gene embeddings and expression).
    """
    if output == "cell":
        if version not in ("ce", "rde"):
            raise ValueError(f"version must be 'ce' or 'rde', got {version!r}.")
        return "cell" if version == "ce" else "rde"
    if output in ("gene", "gene_expression"):
        return "gene"
    raise ValueError(f"output must be 'cell', 'gene' or 'gene_expression', got {output!r}.")


def _parse_gene_index(fh, *, compression: str | None, name: str) -> list[str]:
    table = pd.read_csv(fh, sep="\t", compression=compression, dtype=str, keep_default_na=False)
    if "gene_name" not in table.columns:
        raise ValueError(
            f"{name} is not an scFoundation gene list: it has no 'gene_name' column "
            f"(columns: {list(table.columns)})."
        )
    genes = table["gene_name"].str.strip().tolist()
    if not genes or any(not g for g in genes):
        raise ValueError(f"{name} has empty gene names.")
    check_unique_names(pd.Index(genes), what=f"the gene list {name}")
    return genes


@functools.cache
def _packaged_gene_index() -> tuple[str, ...]:
    with files("scfm_tools").joinpath("data", _PACKAGED_GENE_INDEX).open("rb") as fh:
        return tuple(_parse_gene_index(fh, compression="gzip", name=_PACKAGED_GENE_INDEX))


def read_gene_index(path: str | os.PathLike | None = None) -> list[str]:
    """Read the scFoundation gene list (official ``OS_scRNA_gene_index.19264.tsv``).

    Parameters
    ----------
    path
        The tab-separated file with a ``gene_name`` column (gzip accepted); ``None`` reads the
        copy shipped with the package.

    Returns
    -------
    The gene symbols, in model order.
    """
    if path is None:
        return list(_packaged_gene_index())
    path = Path(path).expanduser()
    with open(path, "rb") as fh:
        return _parse_gene_index(
            fh, compression="gzip" if path.suffix == ".gz" else None, name=path.name
        )


def write_gene_index(folder: Path, genes: Sequence[str]) -> Path | None:
    """Write ``genes`` beside a checkpoint unless they are the official list (shipped here).

    Returns the file written, or ``None`` (an old copy beside the checkpoint is removed then).
    """
    path = folder / GENE_INDEX_FILE
    if list(genes) == read_gene_index():
        path.unlink(missing_ok=True)
        return None
    table = pd.DataFrame({"gene_name": list(genes), "index": range(len(genes))})
    table.to_csv(path, sep="\t", index=False)
    return path


def write_scfoundation_safetensors(
    folder: str | os.PathLike,
    module: SCFoundationModule,
    genes: Sequence[str],
    *,
    classes: Sequence[str] | None = None,
    classifier_input: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a module in the package's own layout (see the module notes).

    Parameters
    ----------
    folder
        Folder to write (created when absent).
    module
        The module.
    genes
        The model's genes, in model order.
    classes
        Cell types of the classifier head, in output order (needed when it has one).
    classifier_input
        How cells are read for the head (recorded for readers).
    overwrite
        Replace the files of an existing checkpoint.

    Returns
    -------
    Path of ``models.safetensors``.
    """
    folder = Path(folder).expanduser()
    if module.is_classifier != (classes is not None) or (
        classes is not None and len(classes) != module.n_classes
    ):
        raise ValueError(
            f"classes must name the head's {module.n_classes} outputs (None without a head), "
            f"got {None if classes is None else len(classes)} names."
        )
    weights, config_path = folder / SAFETENSORS_FILE, folder / CONFIG_FILE
    existing = [p.name for p in (weights, config_path, folder / GENE_INDEX_FILE) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{folder} already holds {existing}; pass overwrite=True.")
    folder.mkdir(parents=True, exist_ok=True)
    architecture = {k: v for k, v in module.config.items() if k not in _RUN_OPTIONS}
    config = {
        "format": _FORMAT,
        "format_version": _FORMAT_VERSION,
        "architecture": architecture,
        "classes": None if classes is None else [str(c) for c in classes],
        "classifier_input": None if classifier_input is None else dict(classifier_input),
    }
    write_safetensors(weights, module.state_dict())
    config_path.write_text(json.dumps(config, indent=1), encoding="utf-8")
    write_gene_index(folder, genes)
    return weights


def read_scfoundation_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check the ``config.json`` of the package's own layout.

    Parameters
    ----------
    path
        The ``config.json`` file.

    Returns
    -------
    The config (``architecture``, ``classes``, ``classifier_input``).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"{path.parent} has {SAFETENSORS_FILE} but no {CONFIG_FILE} (the architecture and "
            "cell types of the weights); write both with SCFoundation.export(..., "
            "weights='safetensors')."
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(config, Mapping) or config.get("format") != _FORMAT:
        raise ValueError(
            f"{path} is not the config of an scfm_tools scFoundation checkpoint (its 'format' "
            f"must be {_FORMAT!r})."
        )
    if config.get("format_version", 0) > _FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {config['format_version']}; this version of the package "
            f"reads up to {_FORMAT_VERSION}: update scfm_tools."
        )
    if not isinstance(config.get("architecture"), Mapping):
        raise ValueError(f"{path} has no 'architecture' (the SCFoundationModule arguments).")
    return dict(config)


def _other_family(obj: Any) -> str | None:
    """Name the family of a checkpoint that is not scFoundation's, from its keys."""
    if not isinstance(obj, Mapping):
        return None
    inner = obj.get("model_state_dict", obj)
    keys = [str(k) for k in inner] if isinstance(inner, Mapping) else []
    if any(k.startswith("embedder.") for k in keys):
        return "CellPLM"
    if any(k.startswith("performer.net.layers.") for k in keys) or "token_emb.weight" in keys:
        return "scBERT"
    if any(k.startswith(("encoder.embedding.", "transformer_encoder.layers.")) for k in keys):
        return "scGPT"
    return None


def _flat_config(config: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Flatten an MMF config as the official ``convertconfig``: model then dataset options."""
    model = config.get("model")
    model_config = config.get("model_config")
    if not isinstance(model_config, Mapping) or model not in model_config:
        # Already flat (official load_model layout).
        return dict(config)
    flat = dict(model_config[model])
    rnaseq = config.get("dataset_config", {}).get("rnaseq", {})
    flat.update(rnaseq)
    flat.setdefault("model", model)
    return flat


def read_scfoundation_entry(
    path: str | os.PathLike, entry: Entry = "cell"
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, str]]:
    """Read one entry of an scFoundation checkpoint file, safely.

    Accepts the official ``models.ckpt`` (``{"cell"|"gene"|"rde": {"config", "state_dict"}}``),
    one such entry on its own, or the official ``load_model`` layout (``{"config",
    "model_state_dict"}``).

    Parameters
    ----------
    path
        The checkpoint file.
    entry
        Which entry of ``models.ckpt`` to read (ignored for a single-entry file).

    Returns
    -------
    ``(config, state, renamed)``: the flattened config (official ``convertconfig``), the state
    dict without its ``model.`` prefix, and the original -> stripped key names.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"scFoundation checkpoint {path} does not exist.")
    if entry not in ENTRIES:
        raise ValueError(f"entry must be one of {list(ENTRIES)}, got {entry!r}.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        raise ValueError(
            f"{path} could not be read as a torch checkpoint with weights_only=True (which "
            f"refuses files that would run code on load): {err}"
        ) from err
    other = _other_family(obj)
    if other is not None:
        raise ValueError(
            f"this is not an scFoundation checkpoint: {path} looks like a {other} checkpoint. "
            f"Load it with the {other} family (e.g. `sft.hub.load(path, family=...)`)."
        )
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"this does not look like an scFoundation checkpoint: {path} holds a "
            f"{type(obj).__name__}, not the dict of 'cell'/'gene'/'rde' entries of models.ckpt."
        )
    if any(k in obj for k in ENTRIES):
        if entry not in obj:
            raise ValueError(
                f"the scFoundation checkpoint {path} has no {entry!r} entry (it has "
                f"{[k for k in ENTRIES if k in obj]})."
            )
        obj = obj[entry]
    state = obj.get("state_dict", obj.get("model_state_dict")) if isinstance(obj, Mapping) else None
    config = obj.get("config") if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping) or not isinstance(config, Mapping):
        top = list(obj)[:5] if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(
            f"this does not look like an scFoundation checkpoint: {path} has no 'config' and "
            f"'state_dict' (top level: {top}); models.ckpt holds 'cell', 'gene' and 'rde' "
            "entries with both."
        )
    renamed = {str(k): str(k).removeprefix(_PREFIX) for k in state}
    stripped = {renamed[str(k)]: v for k, v in state.items()}
    if not all(isinstance(v, torch.Tensor) for v in stripped.values()):
        raise ValueError(f"{path}: the state dict holds values that are not tensors.")
    if "token_emb.emb.weight" not in stripped or not any(k.startswith(_ENC) for k in stripped):
        raise ValueError(
            f"this does not look like an scFoundation checkpoint: {path} has keys such as "
            f"{list(stripped)[:5]}, but scFoundation weights have 'model.token_emb.*' and "
            "'model.encoder.transformer_encoder.N.*'."
        )
    return _flat_config(config, str(path)), stripped, {k: v for k, v in renamed.items() if k != v}


def module_config(config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Translate an official (flattened) config into :class:`SCFoundationModule` arguments.

    Shapes the config does not state (feed-forward widths, random features) are read off the
    state dict.

    Parameters
    ----------
    config
        The flattened config (official key names: ``encoder``, ``decoder``, ``seq_len``,
        ``bin_num``, ``pad_token_id``, ...).
    state
        The state dict (``model.`` prefix removed).

    Returns
    -------
    Keyword arguments of :class:`SCFoundationModule`.
    """
    if config.get("model", "mae_autobin") != "mae_autobin":
        raise NotImplementedError(
            f"model={config['model']!r} is not supported; only the published 'mae_autobin' is."
        )
    enc, dec = config.get("encoder"), config.get("decoder")
    if not isinstance(enc, Mapping) or not isinstance(dec, Mapping) or "seq_len" not in config:
        raise ValueError(
            "the scFoundation config lacks 'encoder', 'decoder' or 'seq_len' (found keys "
            f"{sorted(config)[:12]})."
        )
    for name, sub, kind in (("encoder", enc, "transformer"), ("decoder", dec, "performer")):
        if sub.get("module_type", kind) != kind:
            raise NotImplementedError(
                f"{name} module_type={sub['module_type']!r} is not supported; the published "
                f"model has {kind!r}."
            )
    enc_dim = int(enc["hidden_dim"])
    dec_dim = int(dec["hidden_dim"])
    ff_key = _ENC + "0.linear1.weight"
    w1_key = _DEC + "0.1.fn.fn.w1.weight"
    proj_key = _DEC + "0.0.fn.fast_attention.projection_matrix"
    return {
        "n_genes": int(config["seq_len"]) - 2,
        "enc_dim": enc_dim,
        "enc_depth": int(enc["depth"]),
        "enc_heads": int(enc["heads"]),
        "enc_ff_mult": int(state[ff_key].shape[0] // enc_dim) if ff_key in state else 4,
        "dec_dim": dec_dim,
        "dec_depth": int(dec["depth"]),
        "dec_heads": int(dec["heads"]),
        "dec_dim_head": int(dec.get("dim_head", 64)),
        "dec_nb_features": int(state[proj_key].shape[0]) if proj_key in state else None,
        "dec_ff_mult": int(state[w1_key].shape[0] // dec_dim) if w1_key in state else 4,
        "bin_num": int(config.get("bin_num", 100)),
        "bin_alpha": float(config.get("bin_alpha", 1.0)),
        "mask_token_id": int(config.get("mask_token_id", 102)),
        "pad_token_id": int(config.get("pad_token_id", 103)),
        "norm_first": bool(enc.get("norm_first", False)),
        "dec_ff_dropout": float(dec.get("ff_dropout", 0.0)),
        "dec_attn_dropout": float(dec.get("attn_dropout", 0.0)),
    }


def official_entry(module: SCFoundationModule) -> dict[str, Any]:
    """One ``models.ckpt`` entry for ``module``, in the official layout.

    ``{"config": {"model": "mae_autobin", "model_config": {"mae_autobin": {...}},
    "dataset_config": {"rnaseq": {...}}}, "state_dict": {"model.<param>": tensor}}``, which the
    official ``load_model_frommmf`` and :func:`load_scfoundation_checkpoint` read. Save a full
    checkpoint with ``torch.save({"cell": e, "gene": e, "rde": e}, "models.ckpt")``.

    Parameters
    ----------
    module
        The module to export (its weights are copied to CPU).

    Returns
    -------
    The entry.
    """
    c = module.config
    seq_len = module.seq_len
    model_config = {
        "mask_gene_name": False,
        "gene_num": seq_len,
        "seq_len": seq_len,
        "encoder": {
            "hidden_dim": c["enc_dim"],
            "depth": c["enc_depth"],
            "heads": c["enc_heads"],
            "dim_head": c["enc_dim"] // c["enc_heads"],
            "seq_len": seq_len,
            "module_type": "transformer",
            "norm_first": c["norm_first"],
        },
        "decoder": {
            "hidden_dim": c["dec_dim"],
            "depth": c["dec_depth"],
            "heads": c["dec_heads"],
            "dim_head": c["dec_dim_head"],
            "module_type": "performer",
            "seq_len": seq_len,
            "norm_first": False,
        },
        "n_class": c["pad_token_id"] + 1,
        "pad_token_id": c["pad_token_id"],
        "mask_token_id": c["mask_token_id"],
        "bin_num": c["bin_num"],
        "bin_alpha": c["bin_alpha"],
        "rawcount": True,
        "model": "mae_autobin",
    }
    state = {_PREFIX + k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return {
        "config": {
            "model": "mae_autobin",
            "model_config": {"mae_autobin": model_config},
            "dataset_config": {"rnaseq": {"bin_type": "auto_bin", "bin_num": c["bin_num"]}},
        },
        "state_dict": state,
    }


def _gene_list_beside(folder: Path) -> Path | None:
    for name in (GENE_INDEX_FILE, GENE_INDEX_FILE + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def load_scfoundation_checkpoint(
    source: str | os.PathLike | ResolvedModel,
    entry: Entry = "cell",
    *,
    genes: str | os.PathLike | Sequence[str] | None = None,
    strict: bool = False,
    **module_kwargs: Any,
) -> tuple[SCFoundationModule, list[str], dict[str, Any], LoadReport]:
    """Load one entry of an scFoundation checkpoint into :class:`SCFoundationModule`.

    The architecture comes from the entry's config (and tensor shapes); every tensor whose key
    (``model.`` prefix removed) and shape match is loaded, and anything else is listed in the
    returned report and in a WARNING, never dropped silently.

    Parameters
    ----------
    source
        ``models.ckpt`` (or another ``.ckpt`` in the official layout), ``models.safetensors``
        (the package's layout), a folder holding one, a registered model name, or a
        :class:`~scfm_tools.hub.ResolvedModel`.
    entry
        ``"cell"``, ``"gene"`` or ``"rde"`` (see :func:`entry_for`); ignored for the package's
        layout, which holds one set of weights.
    genes
        The model's gene list (a file read by :func:`read_gene_index`, or symbols); ``None``
        uses ``OS_scRNA_gene_index.19264.tsv`` beside the checkpoint if present, else the copy
        shipped with the package.
    strict
        Raise instead of warning when a key is missing, unexpected or of the wrong shape.
    **module_kwargs
        Runtime options of :class:`SCFoundationModule` (``key_max``, ``chunk_size``,
        ``feature_redraw_interval``, ``dropout``).

    Returns
    -------
    ``(module, genes, config, report)``: the module in eval mode on CPU, the gene list (model
    order), the flattened official config (the package's layout: its ``config.json``, with the
    cell types of a classifier under ``"classes"``) and the
    :class:`~scfm_tools.models._load_report.LoadReport`.

    Raises
    ------
    ValueError
        Not an scFoundation checkpoint (another family's is named as such), a missing entry, or
        a gene list whose length does not match the checkpoint.
    """
    from ...hub import ResolvedModel, load

    resolved = source if isinstance(source, ResolvedModel) else load(source, family="scfoundation")
    if resolved.family != "scfoundation":
        raise ValueError(
            f"{resolved.name} is a {resolved.family} model, not an scFoundation one; load it with "
            "its own family's loader (or pass it to sft.tl functions, which dispatch by family)."
        )
    weights = Path(resolved.weights)
    if weights.suffix == ".safetensors":
        # One set of weights: ``entry`` has nothing to choose.
        config = read_scfoundation_config(weights.parent / CONFIG_FILE)
        state, renamed = read_safetensors(weights), {}
        kwargs = dict(config["architecture"])
        source = str(weights)
    else:
        config, state, renamed = read_scfoundation_entry(weights, entry)
        kwargs = module_config(config, state)
        source = f"{weights} [{entry!r}]"
    fixed = set(kwargs) & set(module_kwargs)
    if fixed:
        raise TypeError(f"{sorted(fixed)} are read from the checkpoint and cannot be overridden.")
    if genes is None or isinstance(genes, str | os.PathLike):
        gene_file = genes if genes is not None else _gene_list_beside(weights.parent)
        gene_list = read_gene_index(gene_file)
    else:
        gene_list = [str(g) for g in genes]
        check_unique_names(pd.Index(gene_list), what="genes")
    if len(gene_list) != kwargs["n_genes"]:
        raise ValueError(
            f"the gene list has {len(gene_list):,} genes, but the checkpoint {weights.name} has "
            f"seq_len {kwargs['n_genes'] + 2:,} (its genes plus the T and S tokens), i.e. "
            f"{kwargs['n_genes']:,} genes. Pass the gene list the checkpoint was trained with."
        )
    module = build_without_moving_rng(SCFoundationModule, **kwargs, **module_kwargs)
    report = load_matching(
        module,
        state,
        source=source,
        family="scFoundation",
        renamed=renamed,
        strict=strict,
    )
    module.eval()
    return module, gene_list, config, report
