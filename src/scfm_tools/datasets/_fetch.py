"""Find a registered dataset file: local mirror, then cache, then download; sha256-checked."""

from __future__ import annotations

import os
from pathlib import Path

from .._settings import logger, settings
from ..hub._errors import ChecksumError, DownloadError
from ..hub._fetch import fetch_file, file_sha256
from ._registry import DatasetRecord, get_record

__all__ = ["DatasetChecksumError", "DatasetNotFoundError", "fetch"]

DATA_URL_ENV = "SCFM_TOOLS_DATA_URL"
DATA_DIR_ENV = "SCFM_TOOLS_DATA"


class DatasetNotFoundError(FileNotFoundError):
    """A dataset file is in neither the mirror nor the cache, and cannot be downloaded."""


class DatasetChecksumError(ChecksumError):
    """A local copy of a dataset file does not have the registered sha256."""


def _mirror_candidates(record: DatasetRecord, data_dir: Path) -> list[Path]:
    # The mirror may copy the shared layout (tables under prior_knowledge/) or be flat.
    candidates = [data_dir / record.relpath]
    if record.subdir:
        candidates.append(data_dir / record.filename)
    return candidates


def _checksum_error(
    record: DatasetRecord, path: Path, actual: str, fix: str
) -> DatasetChecksumError:
    return DatasetChecksumError(
        f"{path} is not the registered file {record.filename!r}: expected sha256 "
        f"{record.sha256}, got {actual}. The copy is corrupted or a different version; {fix}"
    )


def _not_found_message(record: DatasetRecord, cache_path: Path) -> str:
    data_dir = settings.data_dir
    if data_dir is None:
        mirror = f"no local mirror is set ({DATA_DIR_ENV} is unset)"
    elif not data_dir.is_dir():
        mirror = f"the local mirror {data_dir} ({DATA_DIR_ENV}) is not a folder"
    else:
        looked = ", ".join(str(p) for p in _mirror_candidates(record, data_dir))
        mirror = f"it is not in the local mirror (looked for {looked})"
    return (
        f"dataset file {record.filename!r} (sha256 {record.sha256}, {record.size:,} bytes) was not "
        f"found: {mirror}, it is not in the cache ({cache_path}), and no download URL is set "
        f"({DATA_URL_ENV} is unset). These staged files have no canonical public URL of their own. "
        f"Set {DATA_DIR_ENV} (or `sft.settings.data_dir`) to a folder holding the file"
        + (f" (tables go under {record.subdir}/ or at its top level)" if record.subdir else "")
        + f", or set {DATA_URL_ENV} to a base URL that serves {record.relpath}. "
        f"The original source is {record.repository} @ {record.commit}: {record.source_path}."
    )


def fetch(name: str, *, progress: bool = False) -> Path:
    """Return a local, sha256-verified path to the registered dataset file ``name``.

    Looks in this order:

    1. the local mirror ``sft.settings.data_dir`` (environment variable ``SCFM_TOOLS_DATA``), by
       file name, also under ``prior_knowledge/`` for the tables (the layout of the shared data
       folder); a mirror copy with the wrong sha256 is refused;
    2. the cache, ``sft.settings.cache_dir / "datasets"``;
    3. a download from the base URL in the environment variable ``SCFM_TOOLS_DATA_URL`` (the file
       at ``<base>/<file name>``, or ``<base>/prior_knowledge/<file name>`` for the tables) into
       the cache, verified by sha256.

    The staged files have no canonical public URL of their own, so without a mirror or a base
    URL the call fails, saying which file (and sha256) to put where.

    Parameters
    ----------
    name
        A registry name, as listed by :func:`~scfm_tools.datasets.list_datasets`.
    progress
        Show a progress bar while downloading.

    Returns
    -------
    Path
        Local path of the verified file.

    Raises
    ------
    DatasetChecksumError
        When the mirror copy (or a cached copy, with no URL to re-download from) has the wrong
        sha256; the message gives the expected and the actual checksum.
    DatasetNotFoundError
        When the file is in neither place and no download URL is set.
    scfm_tools.hub.DownloadError
        When the download fails (server unreachable, file missing there).
    scfm_tools.hub.ChecksumError
        When the downloaded bytes do not have the registered sha256; nothing is saved.
    """
    record = get_record(name)

    data_dir = settings.data_dir
    if data_dir is not None:
        for path in _mirror_candidates(record, data_dir):
            if path.is_file():
                actual = file_sha256(path)
                if actual != record.sha256:
                    raise _checksum_error(
                        record,
                        path,
                        actual,
                        f"replace it with the original (see `sft.datasets.list_datasets()`), or "
                        f"unset {DATA_DIR_ENV} to use the cache or a download instead.",
                    )
                logger.info("dataset %r: using mirror copy %s", name, path)
                return path

    cache_path = settings.cache_dir / "datasets" / record.filename
    base_url = os.environ.get(DATA_URL_ENV)
    if cache_path.is_file():
        actual = file_sha256(cache_path)
        if actual == record.sha256:
            logger.info("dataset %r: using cached copy %s", name, cache_path)
            return cache_path
        if not base_url:
            raise _checksum_error(
                record,
                cache_path,
                actual,
                f"delete it, then set {DATA_DIR_ENV} to a folder holding the original file.",
            )
        # fetch_file logs the mismatch and replaces the copy

    if not base_url:
        raise DatasetNotFoundError(_not_found_message(record, cache_path))

    url = f"{base_url.rstrip('/')}/{record.relpath}"
    try:
        return fetch_file(
            url, sha256=record.sha256, size=record.size, path=cache_path, progress=progress
        )
    except DownloadError as err:
        raise DownloadError(
            f"{err}. Check that {DATA_URL_ENV}={base_url!r} serves {record.relpath}, or set "
            f"{DATA_DIR_ENV} to a folder holding {record.filename!r} (sha256 {record.sha256})."
        ) from err
