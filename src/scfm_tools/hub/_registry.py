"""The registry of model cards: official checkpoints, embedded models and user cards."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._card import ModelCard
from ._embedded import discover_embedded_cards
from ._errors import UnknownModelError
from ._official import OFFICIAL_CARDS

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["get_card", "list_models", "register"]

_REGISTRY: dict[str, ModelCard] = {}
_loaded = False


def _cards() -> dict[str, ModelCard]:
    # Filled on first use so that importing sft.hub never touches the filesystem.
    global _loaded
    if not _loaded:
        _loaded = True
        for card in (*discover_embedded_cards(), *OFFICIAL_CARDS):
            _REGISTRY.setdefault(card.name, card)
    return _REGISTRY


def register(card: ModelCard, *, overwrite: bool = False) -> ModelCard:
    """Add a model card to the registry, so that its name works everywhere a model is asked for.

    Parameters
    ----------
    card
        The card; its ``name`` becomes the registry key and the cache folder name.
    overwrite
        Replace a card already registered under the same name (e.g. to point an official model at
        a mirror with known hashes). Without it a duplicate name is refused.

    Returns
    -------
    The registered card.
    """
    if not isinstance(card, ModelCard):
        raise TypeError(f"register() takes a ModelCard, got {type(card).__name__}.")
    cards = _cards()
    if card.name in cards and not overwrite:
        raise ValueError(
            f"A model card named {card.name!r} is already registered; pass overwrite=True to "
            "replace it, or choose another name."
        )
    cards[card.name] = card
    return card


def get_card(name: str) -> ModelCard:
    """Return the registered model card called ``name``.

    Parameters
    ----------
    name
        Registry name, e.g. ``"scgpt-human"``; :func:`list_models` shows them all.

    Returns
    -------
    The :class:`ModelCard`.

    Raises
    ------
    UnknownModelError
        (a :class:`KeyError`) when no card has that name; the message lists the known names.
    """
    cards = _cards()
    if not isinstance(name, str) or name not in cards:
        raise UnknownModelError(
            f"No model card named {name!r}. Known models: {', '.join(cards)}. "
            "Register your own with sft.hub.register(ModelCard(...)), or pass a local checkpoint "
            "path to sft.hub.load()."
        )
    return cards[name]


def list_models() -> pd.DataFrame:
    """All registered model cards, one row each.

    Returns
    -------
    A :class:`pandas.DataFrame` indexed by nothing (plain ``RangeIndex``) with columns ``name``,
    ``family``, ``description``, ``files`` (comma-separated file names), ``download``
    (``"embedded"``, ``"automatic"`` or ``"manual"``), ``verifiable`` (every file has a known
    sha256), ``license``, ``homepage``.
    """
    import pandas as pd

    rows = [
        {
            "name": c.name,
            "family": c.family,
            "description": c.description,
            "files": ", ".join(f.name for f in c.files),
            "download": c.download,
            "verifiable": c.verifiable,
            "license": c.license,
            "homepage": c.homepage,
        }
        for c in _cards().values()
    ]
    columns = ["name", "family", "description", "files", "download", "verifiable", "license"]
    return pd.DataFrame(rows, columns=[*columns, "homepage"])
