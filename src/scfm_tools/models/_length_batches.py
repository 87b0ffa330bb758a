"""Group cells of different sequence lengths into forward passes with little padding."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

#: Largest share of a pass's tokens that may be padding. Past about 1,000 tokens a pass of one
#: cell already keeps the matrix products efficient, so padding is wasted compute; in a large
#: block, length-sorted neighbours differ by a few tokens and the cap seldom binds.
MAX_PADDING = 0.1


def length_batches(
    lengths: np.ndarray,
    batch_size: int,
    *,
    fits: Callable[[int, int], bool] | None = None,
    max_padding: float = MAX_PADDING,
) -> Iterator[np.ndarray]:
    """Yield row groups, cells sorted by length, each as large as the limits allow.

    A group grows (in length order) while it has fewer than ``batch_size`` cells, ``fits(n,
    longest)`` accepts ``n`` cells whose longest has ``longest`` tokens, and padding to the
    longest stays within ``max_padding`` of the group's tokens. A group holds at least one cell.

    Parameters
    ----------
    lengths
        ``(n_cells,)`` sequence length of each cell.
    batch_size
        Most cells per group.
    fits
        Extra limit (e.g. tokens or attention scores per pass); ``None``: none.
    max_padding
        Largest padding share ``1 - sum(lengths) / (n * longest)`` of a group.

    Yields
    ------
    Row indices into ``lengths``, one array per group; groups come shortest first.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(lengths, kind="stable")
    start = 0
    while start < len(order):
        stop = start + 1
        total = int(lengths[order[start]])
        while stop < len(order) and stop - start < batch_size:
            n, longest = stop - start + 1, int(lengths[order[stop]])
            if n * longest * (1.0 - max_padding) > total + longest:
                break
            if fits is not None and not fits(n, longest):
                break
            total += longest
            stop += 1
        yield order[start:stop]
        start = stop
