"""Evolution strategies over truncated unrolls: antithetic pairs, PES or truncated ES, clipped losses.

The estimators here know nothing about neural networks: an `Unroll` object owns the inner state of a population of
P = 2 * pairs particles and advances it by one truncation window for given meta-parameter vectors. Particles `i` and
`i + pairs` form an antithetic pair (perturbations +eps and -eps) and must see the same inner problem, initialization
and data (common random numbers), so their loss difference carries only the effect of the perturbation.

Estimators:
- "pes" (Persistent ES, Vicol et al. 2021, the UNF paper's choice): every particle keeps its own inner trajectory for
  the whole inner run and the gradient uses the perturbations accumulated since the run began. Unbiased for the
  full-horizon objective (no short-horizon bias), at the price of variance that grows with the number of windows.
- "tes" (truncated ES): the particles restart each window from one unperturbed trajectory, which advances separately.
  Lower variance, but greedy: it optimizes each window's loss and so favours over-aggressive step sizes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from pipeline.errors import ConfigError

__all__ = [
    "ESConfig",
    "ESStep",
    "Unroll",
    "antithetic_gradient",
    "clip_by_norm",
    "es_gradient",
    "es_step",
    "sanitize_losses",
]

ESTIMATORS = ("pes", "tes")


@dataclass(frozen=True)
class ESConfig:
    """Population size and noise of the estimator."""

    estimator: str = "pes"
    pairs: int = 8  # antithetic pairs: the population is 2 * pairs particles
    sigma: float = 0.01  # standard deviation of the perturbation of each meta-parameter

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ConfigError(f"estimator {self.estimator!r} is unknown; use pes or tes")
        if self.pairs < 1 or not self.sigma > 0:
            raise ConfigError(f"need pairs >= 1 and sigma > 0, got pairs={self.pairs}, sigma={self.sigma}")


class Unroll(Protocol):
    """A population of inner trajectories: what the ES estimators drive."""

    def advance(self, thetas: Tensor, state: Any) -> tuple[Any, Tensor]:
        """Run one truncation window with meta-parameters `thetas` (P, D) from `state` (batched over P);
        return the new state and each particle's (already clipped, finite) meta-loss (P,)."""
        ...

    def replicate(self, state: Any, n: int) -> Any:
        """A population of `n` copies of a single-particle state (for truncated ES)."""
        ...


def sanitize_losses(losses: Tensor, cap: float) -> Tensor:
    """Clip meta-losses at `cap` and map NaN/inf to `cap`, so one diverging particle cannot poison the estimate."""
    return torch.nan_to_num(losses, nan=cap, posinf=cap, neginf=-cap).clamp(max=cap)


def antithetic_gradient(losses: Tensor, directions: Tensor, sigma: float) -> tuple[Tensor, Tensor]:
    """Gradient estimate and its standard error from antithetic pairs.

    `losses` (2N,): first N particles used +direction, last N used -direction; `directions` (N, D) are the
    perturbations (or, for PES, the perturbations accumulated over the inner run). Returns (grad (D,), stderr (D,)).
    """
    n = directions.shape[0]
    diffs = losses[:n] - losses[n:]  # (N,)
    per_pair = directions * diffs.unsqueeze(1) / (2 * sigma**2)  # (N, D)
    grad = per_pair.mean(0)
    stderr = per_pair.std(0) / n**0.5 if n > 1 else torch.full_like(grad, float("inf"))
    return grad, stderr


def es_gradient(
    loss_fn: Callable[[Tensor], Tensor], theta: Tensor, pairs: int, sigma: float, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Antithetic ES estimate of the gradient of E[loss_fn(theta + sigma z)]; `loss_fn` maps (P, D) -> (P,)."""
    eps = sigma * torch.randn(pairs, theta.numel(), generator=generator, dtype=theta.dtype).to(theta.device)
    thetas = theta.unsqueeze(0) + torch.cat([eps, -eps])  # (2N, D)
    return antithetic_gradient(loss_fn(thetas), eps, sigma)


def clip_by_norm(grad: Tensor, max_norm: float) -> Tensor:
    """Scale `grad` down to L2 norm `max_norm` if it is longer (non-finite entries become 0 first)."""
    grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
    norm = grad.norm()
    return grad * (max_norm / norm) if norm > max_norm else grad


@dataclass
class ESStep:
    """Result of one ES step: gradient, its standard error, the population's state and losses."""

    grad: Tensor  # (D,)
    stderr: Tensor  # (D,)
    state: Any  # population state (PES) or the unperturbed trajectory's state (TES)
    accum: Tensor | None  # accumulated perturbations (pairs, D) for PES
    losses: Tensor  # (2N,) meta-losses of the particles
    loss: float  # PES: mean particle loss; TES: loss of the unperturbed trajectory


def es_step(
    unroll: Unroll,
    theta: Tensor,
    state: Any,
    accum: Tensor | None,
    config: ESConfig,
    generator: torch.Generator,
) -> ESStep:
    """One truncation window of PES or truncated ES.

    PES: `state` is the population's state (P particles) and `accum` the perturbations accumulated since the inner
    run began (zeros, or None, at a reset). TES: `state` is one unperturbed trajectory's state; `accum` is unused.
    Perturbations are drawn on the CPU from `generator` so a run is reproducible across devices and resumes.
    """
    n, dim = config.pairs, theta.numel()
    eps = (config.sigma * torch.randn(n, dim, generator=generator, dtype=theta.dtype)).to(theta.device)  # (N, D)
    thetas = theta.unsqueeze(0) + torch.cat([eps, -eps])  # (2N, D)
    if config.estimator == "pes":
        accum = eps if accum is None else accum + eps
        new_state, losses = unroll.advance(thetas, state)
        grad, stderr = antithetic_gradient(losses, accum, config.sigma)
        return ESStep(grad, stderr, new_state, accum, losses, float(losses.mean()))
    _, losses = unroll.advance(thetas, unroll.replicate(state, 2 * n))
    new_state, mean_loss = unroll.advance(theta.unsqueeze(0), state)
    grad, stderr = antithetic_gradient(losses, eps, config.sigma)
    return ESStep(grad, stderr, new_state, None, losses, float(mean_loss[0]))
