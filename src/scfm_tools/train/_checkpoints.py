"""Training checkpoints that are complete before they count, and finding one to resume from.

Lightning writes a checkpoint by serializing it in memory and writing the bytes to the final
path (through an fsspec transaction whose temporary file may lie on another file system, so the
final move can be a plain copy). A job killed at that moment leaves a truncated file under a
checkpoint's name. :class:`AtomicModelCheckpoint` writes to a temporary file beside the target,
flushes it to disk and renames it over the target (atomic on POSIX and Windows), so a file with a
checkpoint's name is always whole; :func:`find_resume_checkpoint` skips anything that is not.
"""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from lightning.pytorch.callbacks import ModelCheckpoint

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = [
    "PARTIAL_SUFFIX",
    "AtomicModelCheckpoint",
    "find_resume_checkpoint",
    "is_complete_checkpoint",
    "resolve_resume",
]

logger = logging.getLogger("scfm_tools")

#: Suffix of a checkpoint being written (never a ``.ckpt`` name, so never picked up).
PARTIAL_SUFFIX = ".partial"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders; the rename is durable enough there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicModelCheckpoint(ModelCheckpoint):
    """:class:`~lightning.pytorch.callbacks.ModelCheckpoint` that writes each file atomically.

    The checkpoint is written to ``<name>.partial`` in the same folder, flushed to disk, then
    renamed to ``<name>``; an interrupted write leaves only the ``.partial`` file (removed by the
    next successful write), never a truncated ``.ckpt``. Remote paths (``s3://`` ...) keep
    Lightning's own writing. Parameters are those of ``ModelCheckpoint``.
    """

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        if "://" in str(filepath):
            super()._save_checkpoint(trainer, filepath)
            return
        target = Path(filepath)
        partial = target.with_name(target.name + PARTIAL_SUFFIX)
        # Every rank calls save_checkpoint (it synchronizes); only global rank 0 writes.
        super()._save_checkpoint(trainer, str(partial))
        if trainer.is_global_zero:
            with open(partial, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(partial, target)
            _fsync_dir(target.parent)
        self._last_checkpoint_saved = str(target)
        trainer.strategy.barrier("AtomicModelCheckpoint")


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a whole checkpoint file (not truncated, not a partial write).

    :func:`torch.save` writes a zip archive whose central directory comes last; a truncated
    file has none, which is checked here without reading the tensors.
    """
    path = Path(path)
    if not path.is_file() or path.name.endswith(PARTIAL_SUFFIX):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError):
        return False
    return any(name.endswith("data.pkl") for name in names)


def find_resume_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """Find the most recently written complete ``*.ckpt`` file in ``checkpoint_dir``.

    Files are ordered by modification time (then name); truncated or partial files are skipped
    with a warning, so an interrupted write falls back to the previous checkpoint. ``None`` when
    there is none.
    """
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return None
    candidates = sorted(
        (p for p in folder.glob("*.ckpt") if p.is_file()),
        key=lambda p: (p.stat().st_mtime_ns, p.name),
        reverse=True,
    )
    for path in candidates:
        if is_complete_checkpoint(path):
            return path
        logger.warning("skipping %s: it is not a complete checkpoint (truncated write?)", path)
    return None


def resolve_resume(
    resume: bool | str | os.PathLike, checkpoint_dir: str | os.PathLike | None
) -> str | None:
    """Turn ``train(resume=...)`` into Lightning's ``ckpt_path`` (``None``: start afresh).

    ``True`` takes the latest complete checkpoint in ``checkpoint_dir`` (none there: start
    afresh, so the same command both starts and resumes a job); a path must be a complete
    checkpoint; ``False`` does not resume.
    """
    if resume is False or resume is None:
        return None
    if resume is True:
        if checkpoint_dir is None:
            raise ValueError(
                "resume=True looks for the latest checkpoint in `checkpoint_dir`; pass "
                "checkpoint_dir=..., or resume='path/to/file.ckpt'."
            )
        found = find_resume_checkpoint(checkpoint_dir)
        if found is None:
            logger.info("no complete checkpoint in %s: training starts afresh", checkpoint_dir)
            return None
        logger.info("resuming from %s", found)
        return str(found)
    if not isinstance(resume, str | os.PathLike):
        raise TypeError(f"resume must be True, False or a checkpoint path, got {resume!r}.")
    path = Path(resume).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"resume={str(resume)!r}: no such checkpoint file.")
    if not is_complete_checkpoint(path):
        raise ValueError(
            f"resume={str(resume)!r} is not a complete checkpoint (truncated or partial write); "
            "pass resume=True with checkpoint_dir= to take the latest complete one."
        )
    return str(path)
