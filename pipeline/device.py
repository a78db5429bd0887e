"""Pick the torch device (CUDA when present unless the user says otherwise) and the float32 matmul precision."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from pipeline.errors import ConfigError

# torch.set_float32_matmul_precision levels: "highest" keeps float32 products; "high" lets them use TF32 (NVIDIA GPUs
# from Ampere on); "medium" lets them use bfloat16 (such GPUs, and CPUs with bfloat16 matrix units such as AMX)
MATMUL_PRECISIONS = ("highest", "high", "medium")


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


@contextmanager
def matmul_precision(level: str) -> Iterator[None]:
    """Run the block with float32 matrix products at torch's precision `level` (one of MATMUL_PRECISIONS), then
    restore the previous level, also when the block raises."""
    if level not in MATMUL_PRECISIONS:
        raise ConfigError(f"--matmul-precision {level!r} is unknown; use {', '.join(MATMUL_PRECISIONS)}")
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(level)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)
