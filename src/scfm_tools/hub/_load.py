"""Resolve a model name or a local checkpoint path into its family and files.

Nothing here unpickles a checkpoint: families are told apart by file names, which is why
``family=`` exists for files named otherwise. The conventions (those of the official releases):

========================  ==============================================================
family                    files
========================  ==============================================================
``"scgpt"``               a folder with ``best_model.pt`` (or the project's own
                          ``model.safetensors``), ``args.json``, ``vocab.json``
``"cellplm"``             ``<prefix>.best.ckpt`` beside ``<prefix>.config.json``
``"scfoundation"``        ``models.ckpt`` (or one other ``*.ckpt``), or the project's own
                          ``models.safetensors`` with ``config.json`` beside it
``"scbert"``              one ``*.pth`` (e.g. ``panglao_pretrain.pth``), optionally with
                          ``gene_list.txt`` beside it; or the project's own
                          ``<name>.safetensors`` with ``gene_list.txt`` beside it
========================  ==============================================================
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._card import FAMILIES, Family, ModelCard
from ._errors import UnknownModelError
from ._fetch import fetch, file_sha256
from ._registry import get_card

__all__ = ["ResolvedModel", "load"]

_LABELS = {
    "scgpt": "scGPT",
    "scfoundation": "scFoundation",
    "scbert": "scBERT",
    "cellplm": "CellPLM",
}
_NEEDS = {
    "scgpt": "best_model.pt (or model.safetensors), args.json and vocab.json in one folder",
    "cellplm": "<prefix>.best.ckpt (or .safetensors) and <prefix>.config.json in one folder",
    "scfoundation": "models.ckpt, or models.safetensors with config.json",
    "scbert": (
        "a .pth checkpoint such as panglao_pretrain.pth (optionally gene_list.txt), or "
        "<name>.safetensors with gene_list.txt"
    ),
}
_SCGPT_FILES = {"weights": "best_model.pt", "args": "args.json", "vocab": "vocab.json"}
# The project's own scGPT folders keep the weights as safetensors; preferred when both exist,
# as the scGPT loader does.
_SCGPT_WEIGHTS = ("model.safetensors", "best_model.pt")
_CELLPLM_SUFFIXES = {"weights": ".best.ckpt", "config": ".config.json"}
# The project's own CellPLM weights (<prefix>.safetensors); preferred to a .best.ckpt beside it.
_CELLPLM_SAFETENSORS = ".safetensors"
_SCBERT_GENE_LIST = "gene_list.txt"
# The project's own scFoundation weights and their config; preferred to a models.ckpt beside.
_SCFOUNDATION_OWN = {"weights": "models.safetensors", "config": "config.json"}


@dataclass(frozen=True)
class ResolvedModel:
    """A model located on disk, ready for a family's loader.

    Attributes
    ----------
    name
        Registry name, or the file/folder name for a local path.
    family
        ``"scgpt"``, ``"scfoundation"``, ``"scbert"`` or ``"cellplm"``.
    files
        Role -> path: always ``"weights"``; also ``"args"`` and ``"vocab"`` (scGPT),
        ``"config"`` (CellPLM; scFoundation's own layout), ``"gene_list"`` (scBERT, when
        present).
    sha256
        sha256 of the weights file (for ``adata.uns[key]["params"]``).
    path
        Folder holding the files.
    card
        The model card, or ``None`` for a local path.
    """

    name: str
    family: Family
    files: Mapping[str, Path] = field(hash=False)
    sha256: str
    path: Path
    card: ModelCard | None = None

    @property
    def weights(self) -> Path:
        """Path of the main checkpoint file."""
        return self.files["weights"]

    @property
    def config(self) -> dict[str, Any]:
        """The card's published hyper-parameters (empty for a local path)."""
        return dict(self.card.config) if self.card is not None else {}

    def params(self) -> dict[str, str]:
        """Return what to record about the model in ``adata.uns[key]["params"]``."""
        return {"model": self.name, "family": self.family, "weights_sha256": self.sha256}


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _one(candidates: list[Path], folder: Path, what: str) -> Path | None:
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates)
        raise ValueError(
            f"The folder {folder} holds several {what} ({names}); pass the path of the one to use."
        )
    return candidates[0] if candidates else None


def _scgpt_files(path: Path) -> tuple[Path, dict[str, Path], dict[str, str]]:
    folder = path if path.is_dir() else path.parent
    found: dict[str, Path] = {}
    if path.is_file() and path.name not in {"args.json", "vocab.json"}:
        found["weights"] = path
    else:
        weights = [folder / n for n in _SCGPT_WEIGHTS if (folder / n).is_file()]
        if weights:
            found["weights"] = weights[0]
    for role, fname in _SCGPT_FILES.items():
        if role not in found and (folder / fname).is_file():
            found[role] = folder / fname
    missing = {role: fname for role, fname in _SCGPT_FILES.items() if role not in found}
    return folder, found, missing


def _cellplm_prefix(name: str) -> str | None:
    if name in _SCGPT_WEIGHTS:  # scGPT's model.safetensors is not a CellPLM prefix
        return None
    for suffix in (*_CELLPLM_SUFFIXES.values(), _CELLPLM_SAFETENSORS):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def _is_cellplm_file(path: Path) -> bool:
    """Tell a CellPLM checkpoint file by its name (``<prefix>.safetensors``: config beside)."""
    prefix = _cellplm_prefix(path.name)
    if prefix is None:
        return False
    if path.name.endswith(_CELLPLM_SAFETENSORS):  # a name other families' weights may have too
        return (path.parent / f"{prefix}{_CELLPLM_SUFFIXES['config']}").is_file()
    return True


def _cellplm_signs(folder: Path) -> list[str]:
    """Names of the CellPLM checkpoint files in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.is_file() and _is_cellplm_file(p))


def _cellplm_files(path: Path) -> tuple[Path, dict[str, Path], dict[str, str]]:
    folder = path if path.is_dir() else path.parent
    if path.is_file() and _cellplm_prefix(path.name) is None:
        # A weights file named otherwise (family= given): take the one config beside it.
        config = _one(sorted(folder.glob("*.config.json")), folder, "CellPLM config files")
        found = {"weights": path} | ({"config": config} if config else {})
        return folder, found, {} if config else {"config": "<prefix>.config.json"}
    if path.is_file():
        prefix = _cellplm_prefix(path.name)
    else:
        prefixes = sorted({_cellplm_prefix(n) for n in _cellplm_signs(folder)} - {None})
        if len(prefixes) > 1:
            raise ValueError(
                f"The folder {folder} holds several CellPLM checkpoints ({', '.join(prefixes)}); "
                "pass the path of one <prefix>.best.ckpt file."
            )
        prefix = prefixes[0] if prefixes else "<prefix>"
    expected = {role: f"{prefix}{suffix}" for role, suffix in _CELLPLM_SUFFIXES.items()}
    if (folder / f"{prefix}{_CELLPLM_SAFETENSORS}").is_file():
        expected["weights"] = f"{prefix}{_CELLPLM_SAFETENSORS}"
    if path.is_file() and not path.name.endswith(_CELLPLM_SUFFIXES["config"]):
        expected["weights"] = path.name
    found = {role: folder / n for role, n in expected.items() if (folder / n).is_file()}
    missing = {role: n for role, n in expected.items() if role not in found}
    return folder, found, missing


def _scfoundation_files(path: Path) -> tuple[Path, dict[str, Path], dict[str, str]]:
    folder = path if path.is_dir() else path.parent
    if path.name == _SCFOUNDATION_OWN["weights"] or (
        path.is_dir() and (path / _SCFOUNDATION_OWN["weights"]).is_file()
    ):
        found = {r: folder / n for r, n in _SCFOUNDATION_OWN.items() if (folder / n).is_file()}
        missing = {r: n for r, n in _SCFOUNDATION_OWN.items() if r not in found}
        return folder, found, missing
    if path.is_file():
        return path.parent, {"weights": path}, {}
    if (path / "models.ckpt").is_file():
        return path, {"weights": path / "models.ckpt"}, {}
    ckpts = [p for p in sorted(path.glob("*.ckpt")) if not p.name.endswith(".best.ckpt")]
    weights = _one(ckpts, path, "scFoundation checkpoints")
    return (
        path,
        ({"weights": weights} if weights else {}),
        ({} if weights else {"weights": "models.ckpt"}),
    )


def _scbert_signs(folder: Path) -> list[str]:
    """Name the scBERT weights files in ``folder``.

    ``*.pth``, else the project's own ``*.safetensors`` where a gene list is beside them (not
    scGPT's ``model.safetensors``).
    """
    pth = sorted(p.name for p in folder.glob("*.pth"))
    if pth or not (folder / _SCBERT_GENE_LIST).is_file():
        return pth
    return sorted(p.name for p in folder.glob("*.safetensors") if p.name not in _SCGPT_WEIGHTS)


def _scbert_files(path: Path) -> tuple[Path, dict[str, Path], dict[str, str]]:
    folder = path if path.is_dir() else path.parent
    weights = (
        path
        if path.is_file()
        else _one([folder / n for n in _scbert_signs(folder)], folder, "scBERT checkpoints")
    )
    found = {"weights": weights} if weights else {}
    if (folder / _SCBERT_GENE_LIST).is_file():
        found["gene_list"] = folder / _SCBERT_GENE_LIST
    return folder, found, {} if weights else {"weights": "panglao_pretrain.pth (any *.pth)"}


_LAYOUTS: dict[str, Callable[[Path], tuple[Path, dict[str, Path], dict[str, str]]]] = {
    "scgpt": _scgpt_files,
    "cellplm": _cellplm_files,
    "scfoundation": _scfoundation_files,
    "scbert": _scbert_files,
}


def _family_of_file(path: Path) -> Family:
    name = path.name
    if name in _SCGPT_WEIGHTS:
        return "scgpt"
    if _is_cellplm_file(path):
        return "cellplm"
    if name.endswith(".ckpt") or name == _SCFOUNDATION_OWN["weights"]:
        return "scfoundation"
    if name.endswith(".pth") or name in _scbert_signs(path.parent):
        return "scbert"
    if name.endswith(".pt") or name in {"args.json", "vocab.json", *_SCGPT_WEIGHTS}:
        return "scgpt"
    raise ValueError(
        f"Cannot tell the model family of {path} from its name; pass family= (one of "
        f"{list(FAMILIES)}). Name conventions: scGPT best_model.pt (*.pt) or "
        "model.safetensors, CellPLM <prefix>.best.ckpt or <prefix>.safetensors, scFoundation "
        "models.ckpt (*.ckpt) or models.safetensors, scBERT *.pth."
    )


def _family_of_folder(folder: Path) -> Family:
    signs = {
        "scgpt": [n for n in {*_SCGPT_FILES.values(), *_SCGPT_WEIGHTS} if (folder / n).is_file()],
        "cellplm": _cellplm_signs(folder),
        "scfoundation": sorted(
            p.name
            for p in folder.glob("*")
            if (p.suffix == ".ckpt" and not p.name.endswith(".best.ckpt"))
            or p.name == _SCFOUNDATION_OWN["weights"]
        ),
        "scbert": _scbert_signs(folder),
    }
    hits = {fam: names for fam, names in signs.items() if names}
    if len(hits) == 1:
        return next(iter(hits))  # type: ignore[return-value]
    expected = "; ".join(f"{_LABELS[f]}: {_NEEDS[f]}" for f in FAMILIES)
    if not hits:
        raise FileNotFoundError(
            f"The folder {folder} holds no checkpoint of a known model family. Expected {expected}."
        )
    seen = "; ".join(f"{_LABELS[f]} ({', '.join(n)})" for f, n in hits.items())
    raise ValueError(
        f"The folder {folder} looks like more than one model family: {seen}. Pass family= to "
        "choose, or the path of the checkpoint file itself."
    )


def _load_path(path: Path, family: Family | None) -> ResolvedModel:
    if family is None:
        family = _family_of_folder(path) if path.is_dir() else _family_of_file(path)
    folder, found, missing = _LAYOUTS[family](path)
    if missing:
        label = _LABELS[family]
        present = [p.name for p in found.values()]
        absent = list(missing.values())
        has = (
            f"has {_join(present)} but no {_join(absent)}" if present else f"has no {_join(absent)}"
        )
        raise FileNotFoundError(
            f"The {label} folder {folder} {has}. A {label} checkpoint needs {_NEEDS[family]}."
        )
    return ResolvedModel(
        name=path.name,
        family=family,
        files=found,
        sha256=file_sha256(found["weights"]),
        path=folder,
    )


def load(
    name_or_path: str | os.PathLike | ModelCard,
    *,
    family: Family | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
    base_url: str | None = None,
    allow_unverified: bool = False,
) -> ResolvedModel:
    """Locate a model's files: a registered name (fetched if needed) or a local checkpoint.

    Parameters
    ----------
    name_or_path
        A registered model name (:func:`list_models`; a string is looked up in the registry
        first), a :class:`ModelCard`, or a local path: a checkpoint folder (e.g. the official
        scGPT folder) or a single checkpoint file (its companion files are looked up beside it).
    family
        The model family of a local path, for files that do not follow the official names
        (see the module notes); for a registered model it must match the card.
    cache_dir
        Root of the download cache; ``None`` uses ``sft.settings.cache_dir``.
    progress
        Show download progress bars.
    base_url
        Mirror folder URL to download the model's files from (see :func:`fetch`).
    allow_unverified
        Download files that have a link but no known sha256 (see :func:`fetch`).

    Returns
    -------
    A :class:`ResolvedModel` with ``family``, ``files`` (role -> path), ``sha256`` of the
    weights and ``card`` (``None`` for local paths).

    Raises
    ------
    UnknownModelError
        A string that is neither a registered name nor an existing path.
    FileNotFoundError
        A local checkpoint lacks files of its family (the message says which), or a model's files
        must be downloaded by hand (:class:`ManualDownloadError`, with instructions).
    ValueError
        The family of a local path is ambiguous or cannot be told from the file names.
    """
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family must be one of {list(FAMILIES)} or None, got {family!r}.")
    card: ModelCard | None = None
    if isinstance(name_or_path, ModelCard):
        card = name_or_path
    elif isinstance(name_or_path, str):
        try:
            card = get_card(name_or_path)
        except UnknownModelError as err:
            if not Path(name_or_path).expanduser().exists():
                raise UnknownModelError(
                    f"{err} {name_or_path!r} is not an existing file or folder either."
                ) from None
    if card is None:
        path = Path(name_or_path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"No model checkpoint at {path}: the path does not exist.")
        return _load_path(path, family)
    if family is not None and family != card.family:
        raise ValueError(f"Model {card.name!r} is a {card.family} model, not {family}.")
    folder = fetch(
        card,
        cache_dir=cache_dir,
        progress=progress,
        base_url=base_url,
        allow_unverified=allow_unverified,
    )
    weights = card.weights
    return ResolvedModel(
        name=card.name,
        family=card.family,
        files={f.role: folder / f.name for f in card.files},
        # fetch has verified a known hash, so only unknown ones are computed.
        sha256=weights.sha256 or file_sha256(folder / weights.name),
        path=folder,
        card=card,
    )
