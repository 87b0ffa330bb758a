"""Read the project's own weights files (safetensors: tensors only, no pickle)."""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["read_safetensors"]


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Read the tensors of a ``.safetensors`` file onto the CPU; a damaged file is a ValueError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} could not be read as a safetensors file: {err}") from err
