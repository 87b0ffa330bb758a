"""Errors raised by :mod:`scfm_tools.hub`."""

from __future__ import annotations

__all__ = ["ChecksumError", "DownloadError", "ManualDownloadError", "UnknownModelError"]


class UnknownModelError(KeyError):
    """A model name that is not in the registry (the message lists the known names)."""

    def __str__(self) -> str:
        # KeyError would show the repr of the message, quotes and escaped newlines included.
        return str(self.args[0]) if self.args else ""


class DownloadError(OSError):
    """A download failed (no connection, HTTP error, connection broken off mid-way)."""


class ChecksumError(ValueError):
    """A file's sha256 (or size) is not the one its model card or caller expects."""


class ManualDownloadError(FileNotFoundError):
    """Files a model needs are missing and cannot be downloaded automatically.

    The message names the exact folder and file names to put there by hand.
    """
