"""Models that ship inside the package, under ``scfm_tools/data/models/<name>/``.

To embed a model, put its files in ``src/scfm_tools/data/models/<name>/`` together with a
``card.json`` (the output of :meth:`ModelCard.to_dict <scfm_tools.hub.ModelCard.to_dict>`, with
``"embedded": true`` or left out): the registry picks the folder up on first use, no code needed.
Alternatively register a :class:`~scfm_tools.hub.ModelCard` with ``embedded=True`` from code.
Either way the files are read from the installed package through :mod:`importlib.resources`.
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from .._settings import logger, settings
from ._card import ModelCard

__all__ = ["CARD_JSON", "discover_embedded_cards", "embedded_model_dir"]

CARD_JSON = "card.json"
_PACKAGE = "scfm_tools"


def _resource_root() -> Traversable:
    """Folder of the embedded models inside the installed package (tests monkeypatch this)."""
    return resources.files(_PACKAGE) / "data" / "models"


def embedded_model_dir(name: str) -> Path:
    """Real filesystem folder holding the embedded model ``name``.

    A normal installation keeps package data as plain files, which are used in place. Where the
    package is imported from an archive (zipapp, zipped egg) the files are copied once into
    ``<cache_dir>/_embedded/<name>/`` so that loaders can open them by path.
    """
    folder = _resource_root() / name
    if isinstance(folder, Path):
        return folder
    if not folder.is_dir():
        raise FileNotFoundError(f"The package has no embedded model folder data/models/{name}/.")
    target = settings.cache_dir / "_embedded" / name
    target.mkdir(parents=True, exist_ok=True)
    for item in folder.iterdir():
        dest = target / item.name
        if item.is_file() and not dest.exists():
            tmp = dest.with_name(f".{dest.name}.part")
            with item.open("rb") as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out)
            tmp.replace(dest)
    return target


def discover_embedded_cards() -> list[ModelCard]:
    """Cards of the model folders under ``data/models/`` that hold a ``card.json``."""
    root = _resource_root()
    if not root.is_dir():
        return []
    cards = []
    for folder in sorted(root.iterdir(), key=lambda t: t.name):
        card_file = folder / CARD_JSON
        if not (folder.is_dir() and card_file.is_file()):
            continue
        try:
            data = json.loads(card_file.read_text(encoding="utf-8"))
            data["embedded"] = True
            card = ModelCard.from_dict(data)
        except (ValueError, TypeError) as err:
            # One broken card must not make the whole registry unusable.
            logger.warning("Ignoring embedded model data/models/%s/: %s", folder.name, err)
            continue
        if card.name != folder.name:
            logger.warning(
                "Ignoring embedded model data/models/%s/: its card.json names it %r; the folder "
                "and the card name must match.",
                folder.name,
                card.name,
            )
            continue
        cards.append(card)
    return cards
