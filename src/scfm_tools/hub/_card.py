"""Model cards: what a pretrained model is, which files it needs and where they come from."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

__all__ = ["FAMILIES", "CardFile", "Family", "ModelCard"]

Family = Literal["scgpt", "scfoundation", "scbert", "cellplm"]
FAMILIES: tuple[str, ...] = get_args(Family)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Card names become folder names in the cache: keep them to a safe, portable alphabet.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def normalize_sha256(value: str | None, *, what: str = "sha256") -> str | None:
    """Lower-case a sha256 hex digest (an optional ``"sha256:"`` prefix is dropped) and check it."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string of 64 hex digits or None, got {value!r}.")
    digest = value.strip().lower().removeprefix("sha256:")
    if not _SHA256.match(digest):
        raise ValueError(f"{what} must be 64 hex digits (a sha256 digest), got {value!r}.")
    return digest


@dataclass(frozen=True)
class CardFile:
    """One file of a model card.

    Parameters
    ----------
    name
        File name inside the model folder (no directories), e.g. ``"best_model.pt"``.
    url
        Direct download link, or ``None`` when there is none (the file must then be placed by
        hand, following the card's ``manual_download`` instructions).
    sha256
        Expected sha256 hex digest, or ``None`` when unknown: such a file cannot be verified, so it
        is never downloaded unless the caller asks for it (``allow_unverified=True``), and a copy
        placed by hand is accepted with a warning.
    size
        Expected size in bytes, or ``None`` when unknown.
    description
        What the file holds.
    role
        Key of the file in :attr:`ResolvedModel.files <scfm_tools.hub.ResolvedModel.files>`
        (``"weights"``, ``"vocab"``, ``"config"`` ...); defaults to ``name``. The main checkpoint
        has the role ``"weights"``.
    """

    name: str
    url: str | None = None
    sha256: str | None = None
    size: int | None = None
    description: str = ""
    role: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or self.name in {".", ".."}:
            raise ValueError(f"CardFile.name must be a file name, got {self.name!r}.")
        if "/" in self.name or "\\" in self.name:
            raise ValueError(
                f"CardFile.name must be a bare file name without folders, got {self.name!r}."
            )
        if self.url is not None and (not isinstance(self.url, str) or not self.url):
            raise ValueError(f"CardFile.url must be a non-empty string or None, got {self.url!r}.")
        object.__setattr__(
            self, "sha256", normalize_sha256(self.sha256, what=f"{self.name}: sha256")
        )
        if self.size is not None and (
            not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 0
        ):
            raise ValueError(
                f"{self.name}: size must be a non-negative int or None, got {self.size!r}."
            )
        if not self.role:
            object.__setattr__(self, "role", self.name)


@dataclass(frozen=True)
class ModelCard:
    """Everything :mod:`scfm_tools` knows about one pretrained model.

    Parameters
    ----------
    name
        Registry name, also the folder name in the cache (``<cache_dir>/<name>/``).
    family
        Architecture family: one of ``"scgpt"``, ``"scfoundation"``, ``"scbert"``, ``"cellplm"``.
    description
        One or two sentences: what was pretrained on what.
    files
        The files of the model (:class:`CardFile`), all needed.
    config
        Architecture hyper-parameters as published (informative; the loaders read the checkpoint's
        own config file where the family has one).
    license
        License of the weights (and of the code they come with).
    citation
        The paper to cite.
    homepage
        The official repository or project page.
    source_url
        Where the files can be obtained by hand (a shared folder, a data portal).
    manual_download
        Step-by-step instructions for files without a direct link; ``None`` when every file has one.
    embedded
        The files ship inside the package under ``scfm_tools/data/models/<name>/`` (found through
        :mod:`importlib.resources`), so the model works offline on a fresh install.
    """

    name: str
    family: Family
    description: str
    files: tuple[CardFile, ...]
    config: dict[str, Any] = field(default_factory=dict, hash=False)
    license: str = ""
    citation: str = ""
    homepage: str = ""
    source_url: str | None = None
    manual_download: str | None = None
    embedded: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(
                f"ModelCard.name must start with a letter or digit and hold only letters, digits, "
                f"'.', '_' or '-' (it names a folder), got {self.name!r}."
            )
        if self.family not in FAMILIES:
            raise ValueError(
                f"Model card {self.name!r}: family must be one of {list(FAMILIES)}, "
                f"got {self.family!r}."
            )
        files = tuple(self.files)
        if not files or not all(isinstance(f, CardFile) for f in files):
            raise ValueError(
                f"Model card {self.name!r}: files must be a non-empty list of CardFile."
            )
        for attr in ("name", "role"):
            seen = [getattr(f, attr) for f in files]
            dupes = sorted({v for v in seen if seen.count(v) > 1})
            if dupes:
                raise ValueError(f"Model card {self.name!r}: duplicate file {attr}s {dupes}.")
        object.__setattr__(self, "files", files)
        object.__setattr__(self, "config", dict(self.config))

    @property
    def weights(self) -> CardFile:
        """The main checkpoint file (role ``"weights"``; the first file when none has that role)."""
        for f in self.files:
            if f.role == "weights":
                return f
        return self.files[0]

    @property
    def download(self) -> Literal["embedded", "automatic", "manual"]:
        """How the files are obtained: shipped in the package, all by direct link, or by hand."""
        if self.embedded:
            return "embedded"
        return "automatic" if all(f.url for f in self.files) else "manual"

    @property
    def verifiable(self) -> bool:
        """Whether every file has a known sha256."""
        return all(f.sha256 for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serializable form (the format of an embedded model's ``card.json``)."""
        out = asdict(self)
        out["files"] = [asdict(f) for f in self.files]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        """Build a card from :meth:`to_dict` output (unknown keys are refused)."""
        data = dict(data)
        files = data.pop("files", None)
        if not isinstance(files, list | tuple):
            raise ValueError("A model card needs a 'files' list.")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"Unknown model card fields {sorted(unknown)}.")
        return cls(files=tuple(CardFile(**f) for f in files), **data)
