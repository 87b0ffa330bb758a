"""What every ``sft.pl`` function does last: save the figure and/or show it, scanpy-style."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["DOC_PLOT", "as_list", "finish_figure"]

T = TypeVar("T")

DOC_PLOT = """\
ax
    Axes to draw into; ``None`` makes a new figure.
show
    Show the figure; ``None`` shows it when the function made the figure and nothing is saved.
save
    Write the figure to this path; ``True`` writes ``<name>.png`` into
    ``scanpy.settings.figdir``."""


def finish_figure(
    result: T,
    figure: Figure,
    *,
    own_figure: bool,
    show: bool | None,
    save: str | os.PathLike | bool | None,
    name: str,
) -> T | None:
    """Save ``figure`` if asked, show it if asked (or by default), and return ``result``.

    Parameters
    ----------
    result
        What the plotting function returns when the figure is not shown (Axes or list of them).
    figure
        The figure drawn into.
    own_figure
        Whether the plotting function created the figure (no ``ax=`` given).
    show
        Show the figure; ``None``: show when ``own_figure`` and nothing is saved.
    save
        ``True`` for ``<scanpy figdir>/<name>.png``, or a path.
    name
        File stem for ``save=True``.

    Returns
    -------
    ``result``, or ``None`` when the figure was shown.
    """
    import matplotlib.pyplot as plt

    if save:
        if save is True:
            import scanpy as sc

            path = Path(sc.settings.figdir) / f"{name}.png"
        else:
            path = Path(save)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, bbox_inches="tight")
    if show is None:
        show = own_figure and not save
    if show:
        plt.show()
        return None
    return result


def as_list(value: Any) -> list:
    """``value`` as a list (a string or scalar becomes a one-element list)."""
    if value is None:
        return []
    if isinstance(value, str) or not hasattr(value, "__iter__"):
        return [value]
    return list(value)
