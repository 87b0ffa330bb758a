"""Progress bars over the cells or genes of long loops, switched by ``settings.progress_bar``."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ._settings import logger, settings

if TYPE_CHECKING:
    from tqdm import tqdm

__all__ = ["progress_bar"]

# A loop that ends sooner than this never draws a bar (input checks, small data, tests).
_DELAY_S = 2.0


@contextlib.contextmanager
def progress_bar(total: int | None, *, desc: str, unit: str = "cells") -> Iterator[tqdm]:
    """Open a tqdm bar on stderr for a loop; ``bar.update(n)`` after each ``n`` items done.

    The bar is disabled (updates cost nothing) when ``sft.settings.progress_bar`` is ``False``.
    While it is open, the ``scfm_tools`` logger writes through :meth:`tqdm.write`, so log lines
    do not break the bar.

    Parameters
    ----------
    total
        Number of items the loop will go through (``None`` when unknown: the bar counts only).
    desc
        What the loop does, shown before the bar.
    unit
        What an item is (``"cells"``, ``"genes"``).
    """
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    bar = tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        delay=_DELAY_S,
        leave=False,
        dynamic_ncols=True,
        disable=not settings.progress_bar,
    )
    with bar, logging_redirect_tqdm(loggers=[logger], tqdm_class=tqdm):
        yield bar
