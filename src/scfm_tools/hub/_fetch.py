"""Verified downloads into the cache: :func:`fetch_file` (one file) and :func:`fetch` (a model).

:func:`fetch_file` is the one downloader of the package; :mod:`scfm_tools.datasets` uses it too.
What it guarantees, beyond :func:`pooch.retrieve`:

- the final path only ever holds a complete, verified file: the download goes to a hidden
  ``.<name>.<random>.part`` file in the same folder, its sha256 is computed while streaming and
  checked, and only then is it renamed into place (:func:`os.replace` is atomic on one file
  system). A hash mismatch, an HTTP error or a connection broken off mid-way (``requests``
  refuses a body shorter than its ``Content-Length``) deletes the part file and raises;
- a per-file lock (:mod:`filelock`, ``.<name>.lock`` beside the file) serialises processes that
  fetch the same file at once: the second waits, then finds the verified file and does not
  download it again;
- a file already present with the right hash is used as is (no request at all).

pooch provides the transfer itself (HTTP(S) via ``requests``, FTP, DOI repositories, progress
bars); ``file://`` URLs are copied, which serves local mirrors.
"""

from __future__ import annotations

import contextlib
import ftplib
import hashlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote, unquote, urlparse
from urllib.request import url2pathname

from .._settings import logger, settings
from ._card import CardFile, ModelCard, normalize_sha256
from ._embedded import embedded_model_dir
from ._errors import ChecksumError, DownloadError, ManualDownloadError
from ._registry import get_card

__all__ = ["MIRROR_ENV", "fetch", "fetch_file", "file_sha256", "model_dir"]

MIRROR_ENV = "SCFM_TOOLS_MIRROR"
_CHUNK = 1 << 20
_TIMEOUT = 60

# sha256 of files already hashed in this process, keyed by (path, size, mtime): hashing a
# checkpoint of a few GB takes seconds, and fetch/load look at the same files repeatedly.
_HASHES: dict[tuple[str, int, int], str] = {}
_WARNED: set[str] = set()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file (remembered for the process while the file is unchanged).

    Parameters
    ----------
    path
        The file.

    Returns
    -------
    64 lower-case hex digits.
    """
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(_CHUNK), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def _mismatch(path: Path, *, sha256: str | None, size: int | None) -> str | None:
    """``None`` when ``path`` has the expected size and sha256, else how it differs."""
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        return f"it has {actual_size} bytes, expected {size}"
    if sha256 is not None:
        got = file_sha256(path)
        if got != sha256:
            return f"its sha256 is {got}, expected {sha256}"
    return None


def _warn_unverified(path: Path) -> None:
    if str(path) not in _WARNED:
        _WARNED.add(str(path))
        logger.warning(
            "Using %s without verifying it: no sha256 is known for this file. Make sure it is "
            "the original, complete file.",
            path,
        )


class _HashingSink:
    """File-like object for pooch downloaders that hashes and counts what it writes."""

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._digest.update(data)
        self.size += len(data)
        return self._fh.write(data)

    def flush(self) -> None:
        self._fh.flush()

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def _copy_local(url: str, sink: _HashingSink) -> None:
    source = Path(url2pathname(unquote(urlparse(url).path)))
    with open(source, "rb") as fh:
        shutil.copyfileobj(fh, sink, _CHUNK)


def _transfer(url: str, sink: _HashingSink, *, progress: bool) -> None:
    scheme = urlparse(url).scheme.lower()
    if scheme == "file":
        _copy_local(url, sink)
        return
    import pooch

    if scheme in {"http", "https"}:
        downloader = pooch.HTTPDownloader(progressbar=progress, chunk_size=_CHUNK, timeout=_TIMEOUT)
    else:
        downloader = pooch.choose_downloader(url, progressbar=progress)
    downloader(url, sink, None)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    from filelock import FileLock, Timeout

    lock = FileLock(str(path.parent / f".{path.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("Another process is fetching %s; waiting for it to finish.", path)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _download(
    url: str, path: Path, *, sha256: str | None, size: int | None, progress: bool
) -> None:
    # Not tempfile.mkstemp: its 0600 mode would stay on the final file and lock other users of a
    # shared cache out; open(..., "x") follows the umask and still never reuses a name.
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.part"
    try:
        with open(tmp, "xb") as fh:
            sink = _HashingSink(fh)
            logger.info("Downloading %s to %s", url, path)
            try:
                _transfer(url, sink, progress=progress)
            except (OSError, EOFError, ftplib.Error) as err:
                # requests' exceptions are OSErrors: refused connection, HTTP status, a body
                # cut short of its Content-Length.
                raise DownloadError(f"Downloading {url} to {path} failed: {err}") from err
            fh.flush()
            os.fsync(fh.fileno())
        got = sink.hexdigest()
        if sha256 is not None and got != sha256:
            raise ChecksumError(
                f"The file downloaded from {url} has sha256 {got} ({sink.size} bytes), but "
                f"sha256 {sha256} was expected; it was not saved to {path}. The source may have "
                "changed or be corrupted: check the URL, or the sha256 you passed."
            )
        if size is not None and sink.size != size:
            raise ChecksumError(
                f"The file downloaded from {url} has {sink.size} bytes, but {size} were expected; "
                f"it was not saved to {path}."
            )
        if sha256 is None:
            logger.warning(
                "Downloaded %s without verifying it (no sha256 given); its sha256 is %s.", path, got
            )
        os.replace(tmp, path)
        stat = path.stat()
        _HASHES[(str(path.resolve()), stat.st_size, stat.st_mtime_ns)] = got
    finally:
        tmp.unlink(missing_ok=True)


def fetch_file(
    url: str,
    *,
    sha256: str | None,
    path: str | os.PathLike,
    progress: bool = False,
    size: int | None = None,
    allow_unverified: bool = False,
) -> Path:
    """Download ``url`` to ``path`` unless a verified copy is already there.

    The shared downloader of :mod:`scfm_tools` (model weights and datasets): safe against
    interrupted downloads, corrupted transfers and concurrent processes (see the module notes).

    Parameters
    ----------
    url
        ``http(s)://``, ``ftp://``, ``doi:`` (anything pooch downloads) or ``file://`` (a local
        mirror).
    sha256
        Expected sha256 hex digest (an optional ``"sha256:"`` prefix is accepted). ``None`` is
        refused unless ``allow_unverified=True``.
    path
        Destination file; its folder is created if needed.
    progress
        Show a progress bar (tqdm) while downloading.
    size
        Expected size in bytes, checked as well when given.
    allow_unverified
        Accept ``sha256=None``: the file is downloaded (or a present copy used) without
        verification, and a warning logs what was not checked.

    Returns
    -------
    ``path`` as a :class:`~pathlib.Path`, holding the verified file.

    Raises
    ------
    DownloadError
        The transfer failed (no connection, HTTP error, connection broken off); nothing is left
        at ``path`` or beside it.
    ChecksumError
        The downloaded bytes do not have the expected sha256 (the message gives both) or size;
        nothing is left at ``path`` or beside it.
    """
    sha256 = normalize_sha256(sha256)
    if sha256 is None and not allow_unverified:
        raise ValueError(
            f"fetch_file({url!r}) needs the file's sha256 to verify the download; pass "
            "allow_unverified=True to download it without any check."
        )
    path = Path(path).expanduser()
    # First look without the lock: a verified file needs no write access to its folder.
    if path.is_file() and _mismatch(path, sha256=sha256, size=size) is None:
        if sha256 is None:
            _warn_unverified(path)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(path):
        if path.is_file():
            problem = _mismatch(path, sha256=sha256, size=size)
            if problem is None:  # another process finished it while we waited
                if sha256 is None:
                    _warn_unverified(path)
                return path
            logger.warning("%s is present but %s; downloading it again.", path, problem)
        _download(url, path, sha256=sha256, size=size, progress=progress)
    return path


def model_dir(name: str | ModelCard, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder where the files of a model live (or must be put by hand).

    Parameters
    ----------
    name
        Registered model name or a :class:`ModelCard`.
    cache_dir
        Root of the cache; ``None`` uses ``sft.settings.cache_dir``.

    Returns
    -------
    ``<cache_dir>/<name>/``, or the package folder of an embedded model. It may not exist yet.
    """
    card = name if isinstance(name, ModelCard) else get_card(name)
    if card.embedded:
        return embedded_model_dir(card.name)
    root = Path(cache_dir).expanduser() if cache_dir is not None else settings.cache_dir
    return root / card.name


def _mirror_url(card: ModelCard, f: CardFile, base_url: str | None) -> str | None:
    if base_url is None and os.environ.get(MIRROR_ENV):
        base_url = f"{os.environ[MIRROR_ENV].rstrip('/')}/{card.name}"
    if base_url is not None:
        return f"{base_url.rstrip('/')}/{quote(f.name)}"
    return f.url


def _check_embedded(card: ModelCard) -> Path:
    folder = model_dir(card)
    for f in card.files:
        path = folder / f.name
        if not path.is_file():
            raise FileNotFoundError(
                f"The embedded model {card.name!r} should ship {f.name} at {path}, but it is not "
                "there: the installation of scfm_tools is incomplete; reinstall it."
            )
        problem = _mismatch(path, sha256=f.sha256, size=f.size)
        if problem:
            raise ChecksumError(
                f"The embedded file {path} of model {card.name!r} is damaged: {problem}. "
                "Reinstall scfm_tools."
            )
    return folder


def _accept_by_hand(path: Path, card: ModelCard, f: CardFile) -> None:
    problem = _mismatch(path, sha256=f.sha256, size=f.size)
    if problem:
        raise ChecksumError(
            f"{path} is not the expected {f.name} of model {card.name!r}: {problem}. Replace it "
            f"with the original file (source: {card.source_url or card.homepage}) or delete it."
        )
    if f.sha256 is None:
        _warn_unverified(path)


def _instructions(
    card: ModelCard,
    folder: Path,
    manual: list[CardFile],
    unverified: list[CardFile],
    failed: list[str],
) -> str:
    lines = [f"Model {card.name!r} is incomplete in {folder}."]
    missing = [*manual, *unverified]
    if failed:
        lines.append("These downloads failed:")
        lines += [f"  {msg}" for msg in failed]
    if missing:
        lines.append("Put these files there by hand, with exactly these names:")
        for f in missing:
            lines.append(f"  {folder / f.name}" + (f"  - {f.description}" if f.description else ""))
        if unverified:
            names = ", ".join(f.name for f in unverified)
            lines.append(
                f"  ({names}: a link is known but no sha256, so it is not downloaded unless you "
                "pass allow_unverified=True.)"
            )
    if card.manual_download:
        lines.append(f"How to get them: {card.manual_download}")
    if card.source_url:
        lines.append(f"Source: {card.source_url}")
    if card.homepage:
        lines.append(f"Homepage: {card.homepage}")
    lines.append(
        "Files placed by hand are checked against their sha256 where one is known and otherwise "
        f"used with a warning. Then call sft.hub.fetch({card.name!r}) or sft.hub.load("
        f"{card.name!r}) again. To download from a mirror instead, pass base_url=<folder URL> or "
        f"set {MIRROR_ENV} (files at <mirror>/{card.name}/<file name>)."
    )
    return "\n".join(lines)


def fetch(
    name: str | ModelCard,
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
    base_url: str | None = None,
    allow_unverified: bool = False,
) -> Path:
    """Make every file of a model available locally and return its folder.

    Files go to ``<cache_dir>/<name>/`` under their card names. A file already there with the
    right sha256 is used without any request; files with a direct link are downloaded with
    :func:`fetch_file` (verified, atomic, locked); files without one must be placed there by hand,
    and the error raised when they are missing says exactly where and how. Embedded models are
    returned from the package folder.

    Parameters
    ----------
    name
        Registered model name (see :func:`list_models`) or a :class:`ModelCard`.
    cache_dir
        Root of the cache; ``None`` uses ``sft.settings.cache_dir`` (env ``SCFM_TOOLS_CACHE``).
    progress
        Show download progress bars.
    base_url
        Download every file from ``<base_url>/<file name>`` instead of the card's links (a mirror
        of this model's folder; ``file://`` works for local folders). Without it, the environment
        variable ``SCFM_TOOLS_MIRROR`` (if set) gives a root holding ``<name>/<file name>``.
    allow_unverified
        Also download files that have a link but no known sha256 (logged as unverified).

    Returns
    -------
    The folder holding the model's files.

    Raises
    ------
    ManualDownloadError
        (a :class:`FileNotFoundError`) files without a usable link are missing; the message lists
        the exact paths to create, the card's instructions and the source link.
    DownloadError
        A download failed (e.g. offline); the message says what to place where by hand instead.
    ChecksumError
        A downloaded or hand-placed file has the wrong sha256 or size.
    UnknownModelError
        ``name`` is not registered.
    """
    card = name if isinstance(name, ModelCard) else get_card(name)
    if card.embedded:
        return _check_embedded(card)
    folder = model_dir(card, cache_dir=cache_dir)
    manual: list[CardFile] = []
    unverified: list[CardFile] = []
    failed: list[str] = []
    for f in card.files:
        dest = folder / f.name
        url = _mirror_url(card, f, base_url)
        if url is None or (f.sha256 is None and not allow_unverified):
            if dest.is_file():
                _accept_by_hand(dest, card, f)
            else:
                (manual if url is None else unverified).append(f)
            continue
        try:
            fetch_file(
                url,
                sha256=f.sha256,
                path=dest,
                progress=progress,
                size=f.size,
                allow_unverified=allow_unverified,
            )
        except DownloadError as err:
            failed.append(f"{f.name} from {url}: {err.__cause__ or err}")
            manual.append(f)
    if manual or unverified:
        message = _instructions(card, folder, manual, unverified, failed)
        raise (DownloadError if failed else ManualDownloadError)(message)
    return folder
