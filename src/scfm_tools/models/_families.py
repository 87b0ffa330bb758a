"""Which model families can do what: the tl functions look up a family's implementation here."""

from __future__ import annotations

import importlib
from collections.abc import Callable

# family -> task -> "module:function"; imported only when a task runs.
_TASKS: dict[str, dict[str, str]] = {
    "scgpt": {"embed_cells": "scfm_tools.models.scgpt._embed:embed_resolved"},
}

# Where the families that are not implemented yet are tracked, for the error message.
_PLANNED = {
    "scfoundation": "the scFoundation family",
    "scbert": "the scBERT family",
    "cellplm": "the CellPLM family",
}


def family_task(family: str, task: str) -> Callable:
    """Return the function implementing ``task`` for ``family``, or raise a clear error."""
    target = _TASKS.get(family, {}).get(task)
    if target is None:
        able = sorted(f for f, tasks in _TASKS.items() if task in tasks)
        later = f" ({_PLANNED[family]} is not implemented yet)" if family in _PLANNED else ""
        raise NotImplementedError(
            f"{task} is not available for {family} models{later}; families that can: {able}."
        )
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)
