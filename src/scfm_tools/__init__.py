"""Single-cell foundation models behind a scanpy-shaped API.

``import scfm_tools as sft`` gives :mod:`sft.pp <scfm_tools.pp>`, :mod:`sft.tl <scfm_tools.tl>`,
:mod:`sft.pl <scfm_tools.pl>`, :mod:`sft.models <scfm_tools.models>`,
:mod:`sft.hub <scfm_tools.hub>`, :mod:`sft.datasets <scfm_tools.datasets>`,
:mod:`sft.train <scfm_tools.train>`, :mod:`sft.dataloaders <scfm_tools.dataloaders>` and
:data:`sft.settings <scfm_tools.settings>`. Importing the package is cheap: torch, scvi-tools
and Lightning are imported only when a function needs them.
"""

from __future__ import annotations

import importlib
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

# OpenMP worker threads spin at each barrier before they sleep, up to 300,000 turns in
# libgomp. On a shared machine a descheduled worker then keeps the spinning ones busy at every
# kernel: published-size scBERT (thousands of small kernels per cell) ran 2x slower beside two
# busy processes. 10,000 turns (GOMP_SPINCOUNT) kept the quiet-machine speed and gained what
# sleeping at once (OMP_WAIT_POLICY=PASSIVE, 40% slower when quiet) gains under load
# (benchmarks/results/thread_policy.md). libgomp reads this once, when torch loads, so it is
# set here, before any torch import, and only if the user has not chosen a policy.
if "torch" not in sys.modules and "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from ._settings import settings

try:
    __version__ = version("scfm-tools")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

_SUBMODULES = ("pp", "tl", "pl", "models", "hub", "datasets", "nn", "train", "dataloaders")

if TYPE_CHECKING:
    from . import dataloaders, datasets, hub, models, nn, pl, pp, tl, train


def __getattr__(name: str):
    # Submodules load on first access so that `import scfm_tools` stays fast.
    if name in _SUBMODULES:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'scfm_tools' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_SUBMODULES])


__all__ = [
    "__version__",
    "dataloaders",
    "datasets",
    "hub",
    "models",
    "nn",
    "pl",
    "pp",
    "settings",
    "tl",
    "train",
]
