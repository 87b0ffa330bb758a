"""Which model families can do what: the tl functions look up a family's implementation here."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Collection, Mapping
from typing import Any

# family -> task -> "module:function"; imported only when a task runs.
_TASKS: dict[str, dict[str, str]] = {
    "scgpt": {
        "embed_cells": "scfm_tools.models.scgpt._embed:embed_resolved",
        "embed_genes": "scfm_tools.models.scgpt._gene_embed:embed_genes_resolved",
        "attention": "scfm_tools.models.scgpt._attention:attention_resolved",
    },
    "scbert": {
        "embed_cells": "scfm_tools.models.scbert._embed:embed_resolved",
        "embed_genes": "scfm_tools.models.scbert._gene_embed:embed_genes_resolved",
        "annotate": "scfm_tools.models.scbert._annotate:annotate_resolved",
    },
    "cellplm": {
        "embed_cells": "scfm_tools.models.cellplm._embed:embed_resolved",
        "embed_genes": "scfm_tools.models.cellplm._gene_embed:embed_genes_resolved",
        "impute": "scfm_tools.models.cellplm._impute:impute_resolved",
    },
    "scfoundation": {
        "embed_cells": "scfm_tools.models.scfoundation._embed:embed_resolved",
        "embed_genes": "scfm_tools.models.scfoundation._gene_embed:embed_genes_resolved",
        "impute": "scfm_tools.models.scfoundation._impute:impute_resolved",
    },
}

# What values each family's tl functions need: "counts" (raw counts, refused otherwise),
# "counts_or_lognorm" (counts preferred; log-normalised values work, with a warning), or "own"
# (the family checks the values itself, against its own options).
_VALUES: dict[str, str] = {
    "scgpt": "counts_or_lognorm",
    "scbert": "counts",
    "cellplm": "counts",
    "scfoundation": "own",
}


def family_task(family: str, task: str) -> Callable:
    """Return the function implementing ``task`` for ``family``, or raise a clear error."""
    target = _TASKS.get(family, {}).get(task)
    if target is None:
        able = sorted(f for f, tasks in _TASKS.items() if task in tasks)
        raise NotImplementedError(
            f"{task} is not available for {family} models; families that can: {able}."
        )
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def values_needed(family: str) -> str:
    """Return what values ``family`` needs: ``"counts"``, ``"counts_or_lognorm"`` or ``"own"``."""
    return _VALUES.get(family, "counts")


def check_family_options(
    fn: Callable, family: str, task: str, options: Mapping[str, Any], standard: Collection[str]
) -> None:
    """Refuse ``options`` (a tl function's ``**model_kwargs``) that ``fn`` does not take.

    ``standard`` are the arguments the tl function passes itself; the family's own options are
    the other keyword parameters of ``fn``.
    """
    params = inspect.signature(fn).parameters
    own = sorted(p for p in params if p not in standard and p != "resolved" and p != "adata")
    unknown = sorted(k for k in options if k not in own)
    if unknown:
        takes = f"it takes {own}" if own else "it takes no model-specific options"
        raise TypeError(
            f"{task} got option(s) {unknown} that {family} models do not take; {takes}."
        )
