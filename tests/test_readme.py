"""The README's "What is in the box" table names every public function of sft.pp, tl and pl."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import scfm_tools as sft

README = Path(__file__).resolve().parents[1] / "README.md"


def _row(namespace: str) -> str:
    text = README.read_text(encoding="utf-8")
    box = text[text.index("## What is in the box") :]
    (row,) = [line for line in box.splitlines() if line.startswith(f"| `sft.{namespace}` |")]
    return row


@pytest.mark.parametrize("namespace", ["pp", "tl", "pl"])
def test_readme_lists_the_public_api(namespace):
    row = _row(namespace)
    public = set(getattr(sft, namespace).__all__)
    named = set(re.findall(r"`(\w+)`", row))
    assert public <= named, f"README's sft.{namespace} row misses {sorted(public - named)}"
    # what the row presents as a function of the namespace ("`name` (what it does)") exists
    described = set(re.findall(r"`(\w+)` \(", row))
    assert described <= public, f"README's sft.{namespace} row names {sorted(described - public)}"
