"""Writing results to ``.h5ad`` files: never half-written, and in bounded memory for backed data.

A result file is written under a temporary name beside its destination and renamed into place
only when complete, so a failed run leaves no file (and never a truncated one); it is
gzip-compressed and gets the permissions of any new file (the umask's). A backed
AnnData's matrix is copied on disk, not loaded: anndata's own ``write_h5ad`` reads a backed
sparse matrix's arrays whole.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import h5py
    from anndata import AnnData

__all__ = ["atomic_path", "check_output_path", "create_dense_layer", "write_h5ad"]

# Everything of an AnnData held in memory when it is backed (``X`` and ``raw`` stay on disk).
_IN_MEMORY = ("obs", "var", "obsm", "varm", "obsp", "varp", "layers", "uns")
# Results files are compressed: count matrices and embeddings shrink several fold.
_COMPRESSION = "gzip"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``, renamed to ``path`` when the block succeeds.

    The path is checked first with :func:`check_output_path`.
    """
    path = check_output_path(path, overwrite=overwrite)
    # the temporary name ends in .h5ad too, as every output name must
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".part.h5ad", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes the file private (0600); give it the mode of any new file (umask).
        tmp_path.chmod(0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it back at once
    os.umask(mask)
    return mask


def check_output_path(path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Refuse an output path that exists (unless ``overwrite``), is a folder or not ``.h5ad``.

    An output whose folder does not exist is refused too.

    Raises
    ------
    FileExistsError, IsADirectoryError, FileNotFoundError, ValueError
        With what to do.
    """
    path = Path(path).expanduser()
    if path.suffix != ".h5ad":
        raise ValueError(
            f"the output {path.name!r} does not end in .h5ad; results are written as an h5ad "
            f"file, so name it e.g. {path.stem or 'results'}.h5ad."
        )
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; the output must be a file path.")
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{path} exists already; choose another output path or remove it first "
            "(the command line takes --overwrite)."
        )
    if not path.parent.is_dir():
        raise FileNotFoundError(f"the output folder {path.parent} does not exist; create it first.")
    return path


def write_h5ad(adata: AnnData, path: str | os.PathLike) -> None:
    """Write ``adata`` to ``path``; a backed AnnData's ``X`` (and ``raw``) is copied on disk.

    For a backed AnnData (not a view), the file it reads is copied as is and the parts held in
    memory (``obs``, ``var``, ``obsm``, ``layers``, ``uns`` ...), which may have been changed
    since it was opened, are written over the copy's.
    """
    from anndata.io import write_elem

    if not (adata.isbacked and not adata.is_view):
        adata.write_h5ad(path, compression=_COMPRESSION)
        return
    import h5py

    source = Path(adata.filename)
    if source.resolve() == Path(path).resolve():
        raise ValueError(f"cannot write {source} onto itself; choose another output path.")
    shutil.copyfile(source, path)
    with h5py.File(path, "r+") as f:
        for name in _IN_MEMORY:
            elem = getattr(adata, name)
            if name in f:
                del f[name]
            write_elem(
                f,
                name,
                elem if name in ("obs", "var", "uns") else dict(elem),
                dataset_kwargs={"compression": _COMPRESSION},
            )


def create_dense_layer(f: h5py.File, key: str, shape: tuple[int, int]) -> h5py.Dataset:
    """Create ``layers/<key>`` in an open h5ad file: float32, NaN until written, chunked.

    The caller fills it block by block (``dataset[start:stop] = block``); anndata reads it back
    as a dense layer.
    """
    from anndata.io import write_elem

    if "layers" not in f:
        write_elem(f, "layers", {})
    layers = f["layers"]
    if key in layers:
        del layers[key]
    dataset = layers.create_dataset(
        key,
        shape=shape,
        dtype=np.float32,
        chunks=True,
        fillvalue=np.float32(np.nan),
        compression=_COMPRESSION,
    )
    dataset.attrs["encoding-type"] = "array"
    dataset.attrs["encoding-version"] = "0.2.0"
    return dataset
