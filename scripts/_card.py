"""The file entries of a shipped default's ``card.json``: name, sha256, size, role, description."""

from __future__ import annotations

from pathlib import Path


def card_files(folder: Path, described: dict[str, tuple[str, str]]) -> tuple:
    """Return :class:`~scfm_tools.hub.CardFile` entries for ``{file name: (role, description)}``."""
    from scfm_tools.hub import CardFile, file_sha256

    return tuple(
        CardFile(
            name,
            sha256=file_sha256(folder / name),
            size=(folder / name).stat().st_size,
            description=text,
            role=role,
        )
        for name, (role, text) in described.items()
    )
