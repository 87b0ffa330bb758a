"""Load official scGPT checkpoint folders (``best_model.pt``, ``args.json``, ``vocab.json``)."""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._module import SCGPTModule

__all__ = ["SPECIAL_TOKENS", "LoadReport", "load_scgpt_folder", "read_vocab"]

logger = logging.getLogger("scfm_tools")

WEIGHTS_FILE = "best_model.pt"
ARGS_FILE = "args.json"
VOCAB_FILE = "vocab.json"
# Appended in this order when absent, as the official embed_data does.
SPECIAL_TOKENS = ("<pad>", "<cls>", "<eoc>")
REQUIRED_ARGS = ("embsize", "nheads", "d_hid", "nlayers")

# Checkpoints trained with flash-attn (the published ones) name the packed QKV projection
# `Wqkv`; the torch layer calls it `in_proj_`. The same renaming as scgpt.utils.load_pretrained.
_RENAMES = (
    (re.compile(r"self_attn\._impl\.Wqkv\."), "self_attn.in_proj_"),
    (re.compile(r"self_attn\.Wqkv\."), "self_attn.in_proj_"),
    (re.compile(r"self_attn\._impl\.out_proj\."), "self_attn.out_proj."),
)


@dataclass(frozen=True)
class LoadReport:
    """What happened to each checkpoint key when a folder was loaded.

    Attributes
    ----------
    folder
        The checkpoint folder.
    loaded
        Model keys filled from the checkpoint.
    renamed
        Checkpoint key -> model key, for the flash-attn names that were translated.
    missing
        Model keys the checkpoint has no value for (they keep their random initialisation).
    unexpected
        Checkpoint keys the model has no place for (ignored).
    mismatched
        Keys present in both with different shapes: key -> (checkpoint shape, model shape);
        the model keeps its random initialisation there.
    """

    folder: str
    loaded: tuple[str, ...] = ()
    renamed: dict[str, str] = field(default_factory=dict)
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        """``True`` when every model key was loaded and every checkpoint key was used."""
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        lines = [f"scGPT checkpoint {self.folder}: {len(self.loaded)} tensors loaded"]
        if self.renamed:
            lines.append(f"  renamed (flash-attn -> torch names): {len(self.renamed)}")
        if self.missing:
            lines.append(f"  missing (left at random init): {list(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected (ignored): {list(self.unexpected)}")
        for key, (ckpt, model) in self.mismatched.items():
            lines.append(
                f"  shape mismatch (left at random init): {key} checkpoint {ckpt} vs model {model}"
            )
        return "\n".join(lines)


def _require_file(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        raise FileNotFoundError(
            f"{name} is missing from the scGPT checkpoint folder {folder} (found: {present}); "
            f"an scGPT folder holds {WEIGHTS_FILE}, {ARGS_FILE} and {VOCAB_FILE}."
        )
    return path


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}).") from err


def read_vocab(path: str | os.PathLike) -> dict[str, int]:
    """Read an scGPT ``vocab.json`` (token -> id) and append missing special tokens.

    ``<pad>``, ``<cls>`` and ``<eoc>`` are appended, in that order, with the next free ids when
    absent, as the official ``embed_data`` does.

    Parameters
    ----------
    path
        The ``vocab.json`` file.

    Returns
    -------
    Token -> id mapping.
    """
    raw = _read_json(Path(path))
    if not isinstance(raw, dict) or not raw:
        raise ValueError(
            f"{path} must hold a JSON object mapping gene names to integer ids; "
            f"got {type(raw).__name__}."
        )
    bad = [k for k, v in raw.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0]
    if bad:
        raise ValueError(f"{path}: ids must be non-negative integers; offending tokens: {bad[:5]}.")
    vocab = dict(raw)
    if len(set(vocab.values())) != len(vocab):
        raise ValueError(f"{path}: several tokens share the same id.")
    for token in SPECIAL_TOKENS:
        if token not in vocab:
            vocab[token] = max(vocab.values()) + 1
    return vocab


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ValueError(
            f"{path} could not be read as a torch checkpoint with weights_only=True (which "
            f"refuses files that would run code on load): {err}"
        ) from err
    if isinstance(obj, Mapping) and "model_state_dict" in obj:
        obj = obj["model_state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = list(obj)[:5] if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(
            f"this does not look like an scGPT checkpoint: {path} does not hold a state dict of "
            f"tensors (top level: {keys})."
        )
    if "encoder.embedding.weight" not in obj or not any(
        k.startswith("transformer_encoder.layers.") for k in obj
    ):
        raise ValueError(
            f"this does not look like an scGPT checkpoint: {path} has keys such as "
            f"{list(obj)[:5]}, but an scGPT best_model.pt has 'encoder.embedding.weight' and "
            "'transformer_encoder.layers.N.*'."
        )
    return dict(obj)


def _rename(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    out, renamed = {}, {}
    for key, value in state.items():
        new = key
        for pattern, repl in _RENAMES:
            new = pattern.sub(repl, new)
        if new != key:
            renamed[key] = new
        out[new] = value
    return out, renamed


def _check_args(args: Any, path: Path) -> dict[str, Any]:
    if not isinstance(args, dict):
        raise ValueError(
            f"this does not look like an scGPT args.json: {path} is not a JSON object."
        )
    missing = [k for k in REQUIRED_ARGS if k not in args]
    if missing:
        raise ValueError(
            f"this does not look like an scGPT args.json: {path} lacks {missing} (an scGPT "
            f"args.json has {list(REQUIRED_ARGS)}); found keys {sorted(args)[:10]}."
        )
    return args


def _module_config(args: dict[str, Any], vocab: dict[str, int], state: dict) -> dict[str, Any]:
    style = args.get("input_emb_style", "continuous")
    if style != "continuous":
        raise NotImplementedError(
            f"input_emb_style={style!r} is not supported; only the 'continuous' value encoder "
            "of the published scGPT models is."
        )
    if args.get("cell_emb_style", "cls") != "cls":
        raise NotImplementedError("only cell_emb_style='cls' (the published setting) is supported.")
    if args.get("DSBN") or args.get("domain_spec_batchnorm"):
        logger.warning(
            "args.json asks for domain-specific batch norm (DSBN), which is not implemented; "
            "its weights will be listed as unexpected and the outputs will differ."
        )
    pad_token = args.get("pad_token", "<pad>")
    if pad_token not in vocab:
        raise ValueError(f"pad_token {pad_token!r} from args.json is not in vocab.json.")
    # The heads' presence and sizes are read off the weights, as there is no args key for them
    # in the published folders.
    n_cls = (
        state["cls_decoder.out_layer.weight"].shape[0]
        if "cls_decoder.out_layer.weight" in state
        else 1
    )
    batch = state.get("batch_encoder.embedding.weight")
    return {
        "n_tokens": max(vocab.values()) + 1,
        "d_model": int(args["embsize"]),
        "n_heads": int(args["nheads"]),
        "d_hid": int(args["d_hid"]),
        "n_layers": int(args["nlayers"]),
        "pad_token_id": vocab[pad_token],
        "n_layers_cls": int(args.get("n_layers_cls", 3)),
        "n_cls": int(n_cls),
        "dropout": float(args.get("dropout", 0.2)),
        "pad_value": float(args.get("pad_value", -2)),
        "mask_value": float(args.get("mask_value", -1)),
        "do_mvc": any(k.startswith("mvc_decoder.") for k in state),
        "explicit_zero_prob": any(k.startswith("decoder.zero_logit.") for k in state),
        "use_batch_labels": batch is not None,
        "n_batch_labels": None if batch is None else int(batch.shape[0]),
        "norm_first": bool(args.get("pre_norm", False)),
    }


def load_scgpt_folder(
    path: str | os.PathLike, *, strict: bool = False
) -> tuple[SCGPTModule, dict[str, int], dict[str, Any], LoadReport]:
    """Load an official scGPT checkpoint folder.

    Reads ``args.json`` (model size and token values), ``vocab.json`` (``<pad>``, ``<cls>``,
    ``<eoc>`` appended when absent) and ``best_model.pt`` (a bare state dict, read with
    ``torch.load(weights_only=True)``), translates flash-attn key names (``self_attn.Wqkv.*``,
    ``self_attn._impl.Wqkv.*``) to the torch names, and loads every tensor whose key and shape
    match. Keys that do not match are never dropped silently: they are listed in the returned
    report and in a WARNING.

    Parameters
    ----------
    path
        Folder holding ``best_model.pt``, ``args.json`` and ``vocab.json``.
    strict
        Raise instead of warning when any key is missing, unexpected or of the wrong shape.

    Returns
    -------
    ``(module, vocab, args, report)``: the :class:`SCGPTModule` in eval mode on CPU, the
    token -> id vocabulary, the ``args.json`` dict and a :class:`LoadReport`.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"scGPT checkpoint folder {folder} does not exist (or is a file).")
    args_path = _require_file(folder, ARGS_FILE)
    vocab_path = _require_file(folder, VOCAB_FILE)
    weights_path = _require_file(folder, WEIGHTS_FILE)

    args = _check_args(_read_json(args_path), args_path)
    vocab = read_vocab(vocab_path)
    state, renamed = _rename(_read_state_dict(weights_path))
    module = SCGPTModule(**_module_config(args, vocab, state))

    own = module.state_dict()
    usable = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    report = LoadReport(
        folder=str(folder),
        loaded=tuple(usable),
        renamed=renamed,
        missing=tuple(k for k in own if k not in state),
        unexpected=tuple(k for k in state if k not in own),
        mismatched={
            k: (tuple(v.shape), tuple(own[k].shape))
            for k, v in state.items()
            if k in own and v.shape != own[k].shape
        },
    )
    if not report.clean:
        if strict:
            raise ValueError(f"checkpoint does not match the model (strict=True):\n{report}")
        logger.warning("%s", report)
    module.load_state_dict(usable, strict=False)
    module.eval()
    return module, vocab, args, report
