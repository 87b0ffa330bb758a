"""Model cards, verified downloads and checkpoint resolution: ``sft.hub``.

Every pretrained model has a :class:`ModelCard` in one registry: the official scGPT, scFoundation,
scBERT and CellPLM checkpoints, models embedded in the package, and cards users
:func:`register`. :func:`list_models` shows them; :func:`get_card` returns one.

:func:`fetch` puts a model's files in ``<sft.settings.cache_dir>/<name>/`` (env
``SCFM_TOOLS_CACHE``): files with a direct link are downloaded by :func:`fetch_file`, the shared
downloader (pooch transfer, sha256 checked before an atomic rename, a file lock against concurrent
processes, nothing partial ever left at the final path); files without a link (most official
checkpoints are behind Google Drive, SharePoint, WeChat Drive or Dropbox pages) are placed there
by hand, and the error says exactly where. Mirrors: ``base_url=`` or env ``SCFM_TOOLS_MIRROR``.

:func:`load` turns a name, or a local checkpoint file or folder, into a :class:`ResolvedModel`
(family, files by role, sha256 of the weights) for the family loaders in :mod:`scfm_tools.models`.

Embedding a model in the package: put its files and a ``card.json``
(:meth:`ModelCard.to_dict`) in ``src/scfm_tools/data/models/<name>/``; it is registered on first
use and resolved through :mod:`importlib.resources`, with no download.
"""

from __future__ import annotations

from ._card import FAMILIES, CardFile, Family, ModelCard
from ._errors import ChecksumError, DownloadError, ManualDownloadError, UnknownModelError
from ._fetch import MIRROR_ENV, fetch, fetch_file, file_sha256, model_dir
from ._load import ResolvedModel, load
from ._registry import get_card, list_models, register

__all__ = [
    "FAMILIES",
    "MIRROR_ENV",
    "CardFile",
    "ChecksumError",
    "DownloadError",
    "Family",
    "ManualDownloadError",
    "ModelCard",
    "ResolvedModel",
    "UnknownModelError",
    "fetch",
    "fetch_file",
    "file_sha256",
    "get_card",
    "list_models",
    "load",
    "model_dir",
    "register",
]
