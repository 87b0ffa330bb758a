"""Global settings, in the spirit of :data:`scanpy.settings`."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

__all__ = ["SftSettings", "settings"]

logger = logging.getLogger("scfm_tools")

_VERBOSITY_LEVELS = {
    0: logging.ERROR,
    1: logging.WARNING,
    2: logging.INFO,
    3: logging.DEBUG,
}
_LEVEL_NAMES = {"error": 0, "warning": 1, "info": 2, "debug": 3}

DeviceName = Literal["auto", "cpu", "cuda", "mps"] | str


def _default_cache_dir() -> Path:
    env = os.environ.get("SCFM_TOOLS_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("scfm_tools"))


def _default_data_dir() -> Path | None:
    env = os.environ.get("SCFM_TOOLS_DATA")
    return Path(env).expanduser() if env else None


class SftSettings:
    """Package-wide settings, available as ``sft.settings``.

    Attributes
    ----------
    device
        Where models run: ``"auto"`` picks CUDA, then Apple MPS, then CPU, and logs what it picked;
        or any string :class:`torch.device` accepts (``"cpu"``, ``"cuda:1"``).
    cache_dir
        Where downloaded model weights and datasets are kept. Defaults to the environment variable
        ``SCFM_TOOLS_CACHE``, else the platform's user cache folder.
    data_dir
        A local mirror of the public datasets (env ``SCFM_TOOLS_DATA``): :mod:`scfm_tools.datasets`
        reads files from it before trying to download them.
    n_threads
        CPU threads torch may use (``None`` leaves torch's default).
    cpu_bf16
        Run inference on a CPU under bfloat16 autocast (matrix products in bf16, attention
        sums and reductions in float32), as it always runs on CUDA. Off by default: results
        then differ from the exact float32 path by bf16 rounding. Measured for scBERT at the
        published size on a CPU with AVX512-BF16: max abs difference 6e-3 on embeddings of
        magnitude ~2, cosine above 0.99999, ``sft.tl.embed_cells`` 1.27x faster
        (``benchmarks/results/vs_official_bf16.md``). CPUs without native bf16 gain nothing.
        The ``params`` of a result made with it record ``cpu_bf16``.
    verbosity
        0 errors, 1 warnings (default), 2 info, 3 debug; or one of ``"error"``, ``"warning"``,
        ``"info"``, ``"debug"``. Messages go through :mod:`logging` (logger ``"scfm_tools"``).
    seed
        Global seed used by every random step whose ``random_state`` is left at ``None``.
    progress_bar
        Show tqdm progress bars (on stderr) over the cells or genes of long loops, and
        Lightning's bar while a model trains (default ``True``).
    """

    def __init__(self) -> None:
        self._device: str = "auto"
        self._cache_dir: Path | None = None
        self._data_dir: Path | None = None
        self._n_threads: int | None = None
        self._cpu_bf16: bool = False
        self._verbosity: int = 1
        self._seed: int = 0
        self._progress_bar: bool = True
        self._handler: logging.Handler | None = None
        self.verbosity = 1

    # device ------------------------------------------------------------------------------------
    @property
    def device(self) -> str:
        return self._device

    @device.setter
    def device(self, value: str) -> None:
        if not isinstance(value, str) or not value:
            raise TypeError(
                f"settings.device must be a string such as 'auto', 'cpu' or 'cuda', got {value!r}."
            )
        self._device = value

    def resolve_device(self, device: str | None = None) -> torch.device:
        """Turn ``device`` (or :attr:`device` when ``None``) into a :class:`torch.device`.

        ``"auto"`` picks CUDA when available, then MPS, then CPU, and logs the choice.
        """
        import torch

        name = self._device if device is None else device
        if name != "auto":
            dev = torch.device(name)
            if dev.type == "cuda" and not torch.cuda.is_available():
                raise RuntimeError(
                    f"device={name!r} was asked for but CUDA is not available here; "
                    "use device='cpu' or device='auto'."
                )
            return dev
        if torch.cuda.is_available():
            dev = torch.device("cuda")
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            dev = torch.device("mps")
        else:
            dev = torch.device("cpu")
        logger.info("device='auto' picked %s", dev)
        return dev

    # folders -----------------------------------------------------------------------------------
    @property
    def cache_dir(self) -> Path:
        return self._cache_dir if self._cache_dir is not None else _default_cache_dir()

    @cache_dir.setter
    def cache_dir(self, value: str | os.PathLike | None) -> None:
        self._cache_dir = None if value is None else Path(value).expanduser()

    @property
    def data_dir(self) -> Path | None:
        return self._data_dir if self._data_dir is not None else _default_data_dir()

    @data_dir.setter
    def data_dir(self, value: str | os.PathLike | None) -> None:
        self._data_dir = None if value is None else Path(value).expanduser()

    # threads -----------------------------------------------------------------------------------
    @property
    def n_threads(self) -> int | None:
        return self._n_threads

    @n_threads.setter
    def n_threads(self, value: int | None) -> None:
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(
                f"settings.n_threads must be a positive integer or None, got {value!r}."
            )
        self._n_threads = value
        if value is not None and "torch" in sys.modules:
            self.apply_threads()

    def apply_threads(self) -> None:
        """Pass :attr:`n_threads` on to torch (called before a model runs)."""
        if self._n_threads is not None:
            import torch

            torch.set_num_threads(self._n_threads)

    # verbosity ---------------------------------------------------------------------------------
    @property
    def verbosity(self) -> int:
        return self._verbosity

    @verbosity.setter
    def verbosity(self, value: int | str) -> None:
        if isinstance(value, str):
            if value.lower() not in _LEVEL_NAMES:
                raise ValueError(
                    f"settings.verbosity must be 0-3 or one of {list(_LEVEL_NAMES)}, got {value!r}."
                )
            value = _LEVEL_NAMES[value.lower()]
        if not isinstance(value, int) or value not in _VERBOSITY_LEVELS:
            raise ValueError(f"settings.verbosity must be 0, 1, 2 or 3, got {value!r}.")
        self._verbosity = value
        logger.setLevel(_VERBOSITY_LEVELS[value])
        if self._handler is None:
            self._handler = logging.StreamHandler()
            self._handler.setFormatter(logging.Formatter("%(levelname)s (scfm_tools): %(message)s"))
            logger.addHandler(self._handler)
            logger.propagate = False

    # seed --------------------------------------------------------------------------------------
    @property
    def seed(self) -> int:
        return self._seed

    @seed.setter
    def seed(self, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"settings.seed must be a non-negative integer, got {value!r}.")
        self._seed = value

    # progress bars -----------------------------------------------------------------------------
    @property
    def progress_bar(self) -> bool:
        return self._progress_bar

    @progress_bar.setter
    def progress_bar(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"settings.progress_bar must be True or False, got {value!r}.")
        self._progress_bar = value

    @property
    def cpu_bf16(self) -> bool:
        return self._cpu_bf16

    @cpu_bf16.setter
    def cpu_bf16(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"settings.cpu_bf16 must be True or False, got {value!r}.")
        self._cpu_bf16 = value

    def __repr__(self) -> str:
        fields = (
            "device",
            "cache_dir",
            "data_dir",
            "n_threads",
            "cpu_bf16",
            "verbosity",
            "seed",
            "progress_bar",
        )
        body = ", ".join(f"{f}={getattr(self, f)!r}" for f in fields)
        return f"SftSettings({body})"


settings = SftSettings()
