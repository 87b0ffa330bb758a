"""What each ``scfm-tools`` subcommand does: read IN, run the ``sft.tl`` function, write OUT.

OUT is written under a temporary name and renamed when complete, so a failed or interrupted
run leaves no partial file, and an existing OUT is replaced only with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._h5ad import atomic_path, check_output_path, write_h5ad

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["COMMANDS", "UsageError", "read_input"]

logger = logging.getLogger("scfm_tools")


class UsageError(Exception):
    """A bad argument or input file found by the command itself (exit status 2)."""


def read_input(path: str, *, backed: bool = False) -> AnnData:
    """Read an ``.h5ad`` file (``backed``: only its metadata; the matrix stays on disk)."""
    import anndata
    import h5py

    file = Path(path).expanduser()
    if not file.exists():
        raise UsageError(f"input file {path} does not exist.")
    if file.is_dir():
        raise UsageError(f"{path} is a folder, not an .h5ad file.")
    if not h5py.is_hdf5(file):
        raise UsageError(
            f"{path} is not an .h5ad file (not HDF5); convert it first, e.g. with scanpy: "
            "`sc.read_10x_mtx(folder).write_h5ad('counts.h5ad')`."
        )
    try:
        return anndata.read_h5ad(file, backed="r" if backed else None)
    except Exception as err:
        raise UsageError(f"{path} could not be read as an .h5ad file: {err}") from err


def _value(text: str) -> Any:
    """Parse an option value as JSON (numbers, true/false, lists), else keep the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _model_options(items: list[str]) -> dict[str, Any]:
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--model-option takes KEY=VALUE, got {item!r}.")
        options[key.strip()] = _value(value)
    return options


def _given(**kwargs: Any) -> dict[str, Any]:
    """Keep the options set on the command line (the functions' defaults apply otherwise)."""
    return {k: v for k, v in kwargs.items() if v is not None}


def _say(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(f"scfm-tools {args.command}: {message}", file=sys.stderr)


def _new_keys(adata: AnnData, before: dict[str, set]) -> str:
    added = [
        f"{slot}[{key!r}]"
        for slot, keys in before.items()
        for key in getattr(adata, slot).keys()
        if key not in keys
    ]
    return ", ".join(added) or "the results"


def _keys(adata: AnnData) -> dict[str, set]:
    return {slot: set(getattr(adata, slot).keys()) for slot in ("obs", "obsm", "layers", "uns")}


def _run_and_write(
    args: argparse.Namespace, task: Callable[[AnnData], None], *, backed: bool
) -> int:
    """Read IN, run ``task`` on it, write IN plus the results to OUT."""
    check_output_path(args.output, overwrite=args.overwrite)  # before any work
    adata = read_input(args.input, backed=backed)
    before = _keys(adata)
    started = time.perf_counter()
    task(adata)
    with atomic_path(args.output, overwrite=args.overwrite) as tmp:
        write_h5ad(adata, tmp)
    _say(
        args,
        f"{adata.n_obs} cells in {time.perf_counter() - started:.1f} s; wrote "
        f"{_new_keys(adata, before)} to {args.output}",
    )
    return 0


# embed --------------------------------------------------------------------------------------------
def embed(args: argparse.Namespace) -> int:
    """``scfm-tools embed``: :func:`sft.tl.embed_cells` -> ``obsm['X_<family>']``."""
    from ..tl import embed_cells

    options = _given(
        layer=args.layer,
        gene_key=args.gene_key,
        key_added=args.key_added,
        batch_size=args.batch_size,
        max_length=args.max_length,
        device=args.device,
        chunk_size=args.chunk_size,
        fine_tune=args.fine_tune,
    )
    # CellPLM's option: passed only when given, so that other families do not refuse it.
    extra = _given(batch_key=args.batch_key)
    extra.update(_model_options(args.model_option))

    def task(adata: AnnData) -> None:
        embed_cells(adata, args.model, random_state=args.seed, **options, **extra)

    return _run_and_write(args, task, backed=args.backed)


# impute -------------------------------------------------------------------------------------------
def impute(args: argparse.Namespace) -> int:
    """``scfm-tools impute``: :func:`sft.tl.impute`, written chunk by chunk into OUT."""
    from ..tl import impute as impute_fn

    check_output_path(args.output, overwrite=args.overwrite)
    options = _given(
        layer=args.layer,
        gene_key=args.gene_key,
        key_added=args.key_added,
        device=args.device,
        chunk_size=args.chunk_size,
        fine_tune=args.fine_tune,
    )
    # Options of one family or the other: passed only when given, so that the other family
    # does not refuse them.
    extra = _given(
        target_depth=None if args.target_depth is None else _value(args.target_depth),
        batch_key=args.batch_key,
        max_cells=args.max_cells,
        batch_size=args.batch_size,
    )
    extra.update(_model_options(args.model_option))
    adata = read_input(args.input, backed=args.backed)
    started = time.perf_counter()
    with atomic_path(args.output, overwrite=args.overwrite) as tmp:
        tmp.unlink()  # impute writes the file itself, and refuses an existing one
        impute_fn(adata, args.model, random_state=args.seed, out=tmp, **options, **extra)
    _say(
        args,
        f"{adata.n_obs} cells in {time.perf_counter() - started:.1f} s; wrote {args.output}",
    )
    return 0


# annotate -----------------------------------------------------------------------------------------
def annotate(args: argparse.Namespace) -> int:
    """``scfm-tools annotate``: :func:`sft.tl.annotate` -> ``obs['<key>_label']`` ..."""
    from ..tl import annotate as annotate_fn

    options = _given(
        label_key=args.label_key,
        layer=args.layer,
        reference_layer=args.reference_layer,
        gene_key=args.gene_key,
        key_added=args.key_added,
        threshold=args.threshold,
        majority_voting=args.majority_voting,
        over_clustering=args.over_clustering,
        min_prop=args.min_prop,
        batch_size=args.batch_size,
        max_epochs=args.max_epochs,
        device=args.device,
        method=args.method,
        chunk_size=args.chunk_size,
    )
    options.update(_model_options(args.model_option))
    check_output_path(args.output, overwrite=args.overwrite)  # before reading anything
    reference = None if args.reference is None else read_input(args.reference)

    def task(adata: AnnData) -> None:
        annotate_fn(adata, args.model, reference=reference, random_state=args.seed, **options)

    return _run_and_write(args, task, backed=args.backed)


# pretrain -----------------------------------------------------------------------------------------
_SIZE_FLAGS = {
    "d_model": "--d-model",
    "n_layers": "--n-layers",
    "n_heads": "--n-heads",
    "d_hid": "--d-hid",
}


def _accelerator(device: str | None) -> tuple[str, Any]:
    """Lightning ``(accelerator, devices)`` for a ``--device`` value."""
    if device is None or device == "auto":
        return "auto", "auto"
    kind, _, index = device.partition(":")
    if kind in ("cuda", "gpu"):
        return "gpu", [int(index)] if index else "auto"
    return kind, "auto"


def _check_model_dir(folder: Path, overwrite: bool) -> None:
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--save-model {folder} is a file; give a folder path.")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise UsageError(
            f"--save-model {folder} exists and is not empty; choose another folder or pass "
            "--overwrite."
        )
    if not folder.parent.is_dir():
        raise UsageError(f"the folder {folder.parent} of --save-model does not exist.")


def _export(model, folder: Path, overwrite: bool) -> None:
    """Write the model folder complete, or not at all (unless replacing one)."""
    if folder.is_dir() and any(folder.iterdir()):
        model.export_folder(folder, overwrite=overwrite)
        return
    with tempfile.TemporaryDirectory(prefix=f".{folder.name}.", dir=folder.parent) as tmp:
        staged = Path(tmp) / "model"
        model.export_folder(staged)
        if folder.is_dir():
            folder.rmdir()  # empty, checked above
        shutil.move(staged, folder)


def pretrain(args: argparse.Namespace) -> int:
    """``scfm-tools pretrain``: train an scGPT model on IN's cells and save it."""
    from ..models import SCGPT
    from ..tl import embed_cells

    folder = Path(args.save_model).expanduser()
    _check_model_dir(folder, args.overwrite)
    if args.output is not None:
        check_output_path(args.output, overwrite=args.overwrite)
    if args.gene_key is not None:
        raise UsageError("pretrain reads the genes from var_names; --gene-key does not apply.")
    size = {k: getattr(args, k) for k in _SIZE_FLAGS if getattr(args, k) is not None}
    if args.model is not None and size:
        flags = ", ".join(_SIZE_FLAGS[k] for k in size)
        raise UsageError(f"{flags} set the size of a new model; drop them with --model.")
    adata = read_input(args.input)
    SCGPT.setup_anndata(adata, layer=args.layer, batch_key=args.batch_key)
    if args.model is not None:
        model = SCGPT.from_pretrained(args.model, adata, max_seq_len=args.max_seq_len)
    else:
        model = SCGPT(adata, **size, **_given(max_seq_len=args.max_seq_len))
    accelerator, devices = _accelerator(args.device)
    started = time.perf_counter()
    model.train(
        max_epochs=args.max_epochs,
        accelerator=accelerator,
        devices=devices,
        batch_size=args.batch_size,
        plan_kwargs={"lr": args.lr, "random_state": args.seed},
    )
    _export(model, folder, args.overwrite)
    _say(
        args,
        f"trained on {adata.n_obs} cells in {time.perf_counter() - started:.1f} s; "
        f"saved the model to {folder}",
    )
    if args.output is not None:
        for key in ("_scvi_uuid", "_scvi_manager_uuid"):  # the training registration
            adata.uns.pop(key, None)
        embed_cells(adata, folder, layer=args.layer, random_state=args.seed, device=args.device)
        with atomic_path(args.output, overwrite=args.overwrite) as tmp:
            write_h5ad(adata, tmp)
        _say(args, f"wrote the cells' embeddings with it to {args.output}")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "embed": embed,
    "impute": impute,
    "annotate": annotate,
    "pretrain": pretrain,
}
