"""What happened to each key when a checkpoint's state dict was loaded into a module.

Family loaders compare the checkpoint with the module, load what matches, and never drop a key
silently: the report lists the rest and is logged as a WARNING when not clean.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from ..train import forked_torch_streams

__all__ = ["LoadReport", "build_without_moving_rng", "load_matching"]

logger = logging.getLogger("scfm_tools")

T = TypeVar("T")


def build_without_moving_rng(build: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Construct a module (or model) whose weights a checkpoint is about to overwrite.

    Its random initialisation draws from a forked stream, so that loading a model leaves the
    caller's random state (CPU and CUDA) as it was: a user's seeded analysis must give the
    same numbers whether or not a model was loaded in between.
    """
    with forked_torch_streams():
        return build(*args, **kwargs)


@dataclass(frozen=True)
class LoadReport:
    """What happened to each checkpoint key.

    Attributes
    ----------
    source
        The checkpoint file or folder.
    family
        Model family label used in messages (e.g. ``"scBERT"``).
    loaded
        Model keys filled from the checkpoint.
    renamed
        Checkpoint key -> model key, for keys that were translated.
    missing
        Model keys the checkpoint has no value for (they keep their initialisation).
    unexpected
        Checkpoint keys the model has no place for (ignored).
    mismatched
        Keys present in both with different shapes: key -> (checkpoint shape, model shape);
        the model keeps its initialisation there.
    """

    source: str
    family: str
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
        lines = [f"{self.family} checkpoint {self.source}: {len(self.loaded)} tensors loaded"]
        if self.renamed:
            lines.append(f"  renamed: {len(self.renamed)}")
        if self.missing:
            lines.append(f"  missing (left at initialisation): {list(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected (ignored): {list(self.unexpected)}")
        for key, (ckpt, model) in self.mismatched.items():
            lines.append(
                f"  shape mismatch (left at initialisation): {key} checkpoint {ckpt} vs "
                f"model {model}"
            )
        return "\n".join(lines)


def load_matching(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    source: str,
    family: str,
    renamed: Mapping[str, str] | None = None,
    strict: bool = False,
    level: int = logging.WARNING,
) -> LoadReport:
    """Load every tensor of ``state`` whose key and shape match ``module``; report the rest.

    Values are copied in the module's dtype for each key. A report that is not clean is
    logged at ``level`` (WARNING), or raised with ``strict=True`` (before anything is loaded).

    Parameters
    ----------
    module
        The module to fill.
    state
        The checkpoint's state dict (keys already translated to the module's names).
    source
        Where the checkpoint came from, for messages.
    family
        Family label for messages.
    renamed
        Checkpoint key -> module key translations that were applied, for the report.
    strict
        Raise :class:`ValueError` instead of warning when the report is not clean.
    level
        Logging level of a report that is not clean (e.g. ``logging.INFO`` when the caller
        builds new parts on purpose, as fine-tuning for another task does).

    Returns
    -------
    The :class:`LoadReport`.
    """
    own = module.state_dict()
    usable = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    report = LoadReport(
        source=source,
        family=family,
        loaded=tuple(usable),
        renamed=dict(renamed or {}),
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
        logger.log(level, "%s", report)
    module.load_state_dict(usable, strict=False)
    return report
