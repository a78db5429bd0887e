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


def bf16_matmul_native(device: torch.device) -> bool:
    """Whether float32 products at "medium" run on bfloat16 hardware: a GPU, or a CPU with AVX512-BF16 / AMX (elsewhere
    oneDNN may emulate bfloat16, which is slower than float32)."""
    if device.type == "cuda":
        return True
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


def precision_note(level: str, device: torch.device) -> str | None:
    """A line for the user when `level` cannot speed up training on `device`, else None."""
    if level == "medium" and not bf16_matmul_native(device):
        return ("--matmul-precision medium: this CPU has no bfloat16 matrix units (AVX512-BF16 / AMX), so the "
                "products may run slower than at highest")
    if level == "high" and device.type != "cuda":
        return "--matmul-precision high: TF32 products are a GPU feature; on a CPU expect no speed-up"
    return None


def check_matmul_precision(level: str) -> None:
    """Raise ConfigError unless `level` is one of MATMUL_PRECISIONS."""
    if level not in MATMUL_PRECISIONS:
        raise ConfigError(f"--matmul-precision {level!r} is unknown; use {', '.join(MATMUL_PRECISIONS)}")


@contextmanager
def matmul_precision(level: str) -> Iterator[None]:
    """Run the block with float32 matrix products at torch's precision `level` (one of MATMUL_PRECISIONS), then
    restore the previous level, also when the block raises."""
    check_matmul_precision(level)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(level)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def flushing_denormals() -> bool:
    """Whether this thread's CPU float arithmetic treats subnormal numbers as zero (torch has no getter: a probe)."""
    return float(torch.mul(torch.full((1,), 1e-39), 1.0)) == 0.0


@contextmanager
def flush_denormals() -> Iterator[None]:
    """Run the block with subnormal floats flushed to zero on the CPU (x86 FTZ/DAZ, `torch.set_flush_denormal`),
    then restore the previous mode, also when the block raises.

    Training drives values into the subnormal range (below 1.2e-38 in float32): Adam's moment estimates of a
    parameter whose gradient stays zero (a dead ReLU unit) decay by 0.9 per step into it after a few hundred steps,
    and x86 CPUs compute on subnormals many times slower: predictor epochs on a cnn-digits zoo took 1.3x as long from the
    fourth epoch on (docs/benchmarks.md). Values that small are zero for training's purposes."""
    previous = flushing_denormals()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(previous)
