"""Pick the torch device: CUDA when present unless the user says otherwise."""

from __future__ import annotations

import torch

from pipeline.errors import ConfigError


def resolve_device(name: str | None = "auto") -> torch.device:
    """Return the device for `name`: 'auto' (CUDA if available, else CPU), 'cpu', 'cuda' or 'cuda:N'."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"--device {name!r} is not a torch device; use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name!r} asks for CUDA but torch sees no GPU; use --device cpu or auto")
    return device
