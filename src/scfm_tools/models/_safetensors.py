"""Read and write the project's own weights files (safetensors: tensors only, no pickle)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

__all__ = ["read_safetensors", "write_safetensors"]


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Read the tensors of a ``.safetensors`` file onto the CPU; a damaged file is a ValueError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} could not be read as a safetensors file: {err}") from err


def write_safetensors(path: Path, state: Mapping[str, torch.Tensor]) -> None:
    """Write a state dict (copied to CPU) to ``path``, atomically and readable by all users.

    The file is written under a temporary name and renamed, so a loader never finds a
    half-written file; safetensors creates files private (0600), so the process umask is
    applied instead, as for any other file written.
    """
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    tmp = path.with_name(f".{path.name}.part")
    try:
        save_file(tensors, str(tmp))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
