"""Small hand-built inner problems for the learned-optimizer tests: MLPs on a synthetic teacher task."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.lopt.inner import InnerProblem


def teacher_data(n: int, d_in: int, classes: int, seed: int, dtype: torch.dtype = torch.float32, scale: float = 1.0):
    """Gaussian inputs labelled by a random linear teacher (learnable, not trivially)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen, dtype=dtype) * scale
    w = torch.randn(d_in, classes, generator=gen, dtype=dtype)
    return x, (x @ w).argmax(1)


def mlp_problem(
    seed: int = 0,
    widths: tuple[int, ...] = (8, 12, 4),
    n: int = 192,
    batch_size: int = 32,
    dtype: torch.dtype = torch.float32,
    scale: float = 1.0,
    member: int | None = None,
) -> InnerProblem:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers).to(dtype)
    x, y = teacher_data(n + 64, widths[0], widths[-1], seed=1000, dtype=dtype, scale=scale)
    return InnerProblem(
        model=model,
        init={k: v.detach().clone() for k, v in model.named_parameters()},
        x_train=x[:n],
        y_train=y[:n],
        x_test=x[n:],
        y_test=y[n:],
        batch_size=batch_size,
        name=f"mlp{seed}",
        member=member if member is not None else seed,
    )
