"""Grouping cells of different lengths into forward passes (models/_length_batches.py)."""

from __future__ import annotations

import numpy as np
import pytest

from scfm_tools.models._length_batches import length_batches


def _groups(lengths, batch_size, **kwargs):
    return [list(g) for g in length_batches(np.asarray(lengths), batch_size, **kwargs)]


def test_every_row_once_shortest_first():
    lengths = np.random.default_rng(0).integers(50, 1200, size=97)
    groups = _groups(lengths, 8)
    rows = np.concatenate(groups)
    assert sorted(rows) == list(range(97))
    assert np.all(np.diff(lengths[rows]) >= 0)
    assert max(len(g) for g in groups) <= 8


def test_padding_share_is_capped():
    lengths = np.random.default_rng(1).integers(10, 2000, size=200)
    for cap in (0.0, 0.1, 0.3):
        for group in _groups(lengths, 16, max_padding=cap):
            sizes = lengths[group]
            padding = 1 - sizes.sum() / (len(sizes) * sizes.max())
            assert len(group) == 1 or padding <= cap + 1e-12


def test_equal_lengths_fill_batches_and_cap_splits_outliers():
    assert _groups([5] * 10, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    # 100 then 1000 tokens: padding the short cell to 1000 would waste 45% of the pass.
    assert _groups([1000, 100], 8) == [[1], [0]]
    assert _groups([1000, 100], 8, max_padding=0.5) == [[1, 0]]


def test_fits_limits_groups():
    groups = _groups([10] * 9, 8, fits=lambda n, longest: n * longest <= 30)
    assert [len(g) for g in groups] == [3, 3, 3]


def test_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        list(length_batches(np.array([1, 2]), 0))
