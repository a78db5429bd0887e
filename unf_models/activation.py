"""A ReLU that compiles well: `torch.compile`d, its backward reads the saved output instead of a stored mask.

Inductor (torch 2.13, CPU) lowers `relu`'s backward by storing a boolean mask `x <= 0` in the forward, and its CPU
code writes boolean tensors far slower than eager computes them, which made compiled predictor training steps
slower than eager ones. Here the gradient is `grad * sign(output)`: the output is saved anyway (the next layer's
backward needs it), the sign of a ReLU output is exactly 0 or 1, and the product fuses into the backward kernel, so
nothing boolean is stored. Eager calls run `torch.relu` itself, unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ReLU", "relu"]


class _ReLUFromOutput(torch.autograd.Function):
    generate_vmap_rule = True  # usable under functorch transforms too

    @staticmethod
    def forward(x: Tensor) -> Tensor:  # type: ignore[override]
        return torch.relu(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor], output: Tensor) -> None:
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        (output,) = ctx.saved_tensors
        return grad * torch.sign(output)  # 1 where the output is positive, 0 where it was clamped


def relu(x: Tensor) -> Tensor:
    """`torch.relu(x)`; while `torch.compile` traces, the same values with a backward that stores no mask."""
    if torch.compiler.is_compiling():
        return _ReLUFromOutput.apply(x)
    return torch.relu(x)


class ReLU(nn.ReLU):
    """`nn.ReLU` (same eager computation, same state) whose compiled form stores no boolean mask (see `relu`)."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            return _ReLUFromOutput.apply(x)
        return super().forward(x)
