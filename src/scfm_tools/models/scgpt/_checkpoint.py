"""Read and write scGPT checkpoint folders (``args.json``, ``vocab.json`` and the weights).

The official layout keeps the weights in ``best_model.pt`` (a pickled state dict, read with
``torch.load(weights_only=True)``); the project's own models keep them in ``model.safetensors``,
which cannot run code when read. :func:`load_scgpt_checkpoint` reads either, and
:func:`write_scgpt_checkpoint` writes the safetensors layout.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .._load_report import LoadReport, build_without_moving_rng, load_matching
from .._safetensors import read_safetensors
from ._module import SCGPTModule

__all__ = [
    "SPECIAL_TOKENS",
    "LoadReport",
    "add_special_tokens",
    "load_scgpt_checkpoint",
    "read_vocab",
    "write_scgpt_checkpoint",
]

logger = logging.getLogger("scfm_tools")

WEIGHTS_FILE = "best_model.pt"
SAFETENSORS_FILE = "model.safetensors"
# Looked for in this order: the safe format wins when a folder holds both.
WEIGHTS_FILES = (SAFETENSORS_FILE, WEIGHTS_FILE)
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


def _require_file(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        raise FileNotFoundError(
            f"{name} is missing from the scGPT checkpoint folder {folder} (found: {present}); "
            f"an scGPT folder holds {ARGS_FILE}, {VOCAB_FILE} and the weights "
            f"({WEIGHTS_FILE} or {SAFETENSORS_FILE})."
        )
    return path


def _weights_file(folder: Path) -> Path:
    for name in WEIGHTS_FILES:
        if (folder / name).is_file():
            return folder / name
    return _require_file(folder, WEIGHTS_FILE)


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
    if len(set(raw.values())) != len(raw):
        raise ValueError(f"{path}: several tokens share the same id.")
    return add_special_tokens(raw)


def add_special_tokens(vocab: Mapping[str, int]) -> dict[str, int]:
    """Return a copy of ``vocab`` with ``<pad>``, ``<cls>``, ``<eoc>`` appended when absent.

    Each missing token takes the next free id (one more than the largest), in that order, as the
    official ``embed_data`` and ``pretrain.py`` do.

    Parameters
    ----------
    vocab
        Token -> id mapping.

    Returns
    -------
    The completed token -> id mapping.
    """
    out = dict(vocab)
    for token in SPECIAL_TOKENS:
        if token not in out:
            out[token] = max(out.values(), default=-1) + 1
    return out


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        obj = read_safetensors(path)
    else:
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
            f"{list(obj)[:5]}, but scGPT weights have 'encoder.embedding.weight' and "
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


def load_scgpt_checkpoint(
    path: str | os.PathLike, *, strict: bool = False
) -> tuple[SCGPTModule, dict[str, int], dict[str, Any], LoadReport]:
    """Load an scGPT checkpoint folder: an official one, or one written by this package.

    Reads ``args.json`` (model size and token values), ``vocab.json`` (``<pad>``, ``<cls>``,
    ``<eoc>`` appended when absent) and the weights: ``model.safetensors`` when present (the
    project's own models, :func:`write_scgpt_checkpoint`), else ``best_model.pt`` (the official
    layout, a bare state dict read with ``torch.load(weights_only=True)``). It translates
    flash-attn key names (``self_attn.Wqkv.*``, ``self_attn._impl.Wqkv.*``) to the torch names,
    and loads every tensor whose key and shape match. Keys that do not match are never dropped
    silently: they are listed in the returned report and in a WARNING.

    Parameters
    ----------
    path
        Folder holding ``args.json``, ``vocab.json`` and ``model.safetensors`` or
        ``best_model.pt``.
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
    weights_path = _weights_file(folder)

    args = _check_args(_read_json(args_path), args_path)
    vocab = read_vocab(vocab_path)
    state, renamed = _rename(_read_state_dict(weights_path))
    module = build_without_moving_rng(SCGPTModule, **_module_config(args, vocab, state))

    report = load_matching(
        module, state, source=str(folder), family="scGPT", renamed=renamed, strict=strict
    )
    module.eval()
    return module, vocab, args, report


def _write_atomic(path: Path, write) -> None:
    # A half-written file must never sit at the final name, where a loader would find it.
    tmp = path.with_name(f".{path.name}.part")
    try:
        write(tmp)
        # safetensors creates its file private (0600); shipped weights must be readable by all
        # users of an installation, as any file written with the process umask is.
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_scgpt_checkpoint(
    path: str | os.PathLike,
    module: SCGPTModule,
    vocab: Mapping[str, int],
    args: Mapping[str, Any],
    *,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write a module as an scGPT checkpoint folder that :func:`load_scgpt_checkpoint` reads back.

    The folder gets the official ``args.json`` and ``vocab.json`` and the weights as
    ``model.safetensors`` (instead of the official pickled ``best_model.pt``).

    Parameters
    ----------
    path
        Folder to write (created when absent).
    module
        The module whose state dict to save.
    vocab
        Token -> id vocabulary, special tokens included.
    args
        The ``args.json`` content (official keys: ``embsize``, ``nheads``, ``d_hid``,
        ``nlayers``, ``pad_token``, ``pad_value``, ``mask_value``, ``n_bins``,
        ``max_seq_len`` ...).
    overwrite
        Replace the files of an existing checkpoint folder.

    Returns
    -------
    File role (``"weights"``, ``"args"``, ``"vocab"``) -> path written.
    """
    from safetensors.torch import save_file

    folder = Path(path).expanduser()
    args = _check_args(dict(args), folder / ARGS_FILE)
    names = (SAFETENSORS_FILE, WEIGHTS_FILE, ARGS_FILE, VOCAB_FILE)
    existing = [n for n in names if (folder / n).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{folder} already holds {existing}; pass overwrite=True to replace them, or choose "
            "another folder."
        )
    pad_token = args.get("pad_token", "<pad>")
    if pad_token not in vocab or "<cls>" not in vocab:
        raise ValueError(f"the vocabulary needs the tokens {pad_token!r} and '<cls>'.")
    folder.mkdir(parents=True, exist_ok=True)
    # An old pickle beside the new weights would be shadowed but confusing: remove it.
    if overwrite and (folder / WEIGHTS_FILE).exists():
        (folder / WEIGHTS_FILE).unlink()
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    vocab_out = {str(k): int(v) for k, v in sorted(vocab.items(), key=lambda kv: kv[1])}
    files = {
        "weights": folder / SAFETENSORS_FILE,
        "args": folder / ARGS_FILE,
        "vocab": folder / VOCAB_FILE,
    }
    _write_atomic(files["weights"], lambda p: save_file(state, p, metadata={"format": "pt"}))
    for role, content in (("args", dict(args)), ("vocab", vocab_out)):
        text = json.dumps(content, indent=1 if role == "args" else None)
        _write_atomic(files[role], lambda p, t=text: p.write_text(t + "\n", encoding="utf-8"))
    return files
