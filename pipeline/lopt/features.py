"""Per-parameter input features of the learned optimizers: weight, gradient, momenta, time.

Every function is pure and works on dicts of tensors keyed by parameter name, so it can run under `torch.func.vmap`
(a leading population axis is invisible to it). The layout follows the UNF paper's residual optimizer (App. C) and
Metz et al.'s `learned_optimization`: 1 weight + 1 gradient + 6 momenta channels, clipped and rescaled per tensor
and per channel to unit second moment, then 11 `tanh` time features broadcast over the tensor, 19 channels in all.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = [
    "MOMENTUM_DECAYS",
    "N_ENTRY_FEATURES",
    "N_FEATURES",
    "N_NORM_FEATURES",
    "TIME_SCALES",
    "add_norm_features",
    "build_features",
    "init_momenta",
    "time_features",
    "update_momenta",
]

MOMENTUM_DECAYS: tuple[float, ...] = (0.1, 0.5, 0.9, 0.99, 0.999, 0.9999)
TIME_SCALES: tuple[float, ...] = (1, 3, 10, 30, 100, 300, 1_000, 3_000, 10_000, 30_000, 100_000)
N_ENTRY_FEATURES = 2 + len(MOMENTUM_DECAYS)  # 8: weight, gradient, momenta
N_FEATURES = N_ENTRY_FEATURES + len(TIME_SCALES)  # 19
N_NORM_FEATURES = 2  # optional per-tensor channels: log gradient RMS, log weight RMS
_EPS = 1e-8


def init_momenta(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Zero momenta, one channel per decay: {name: (K, *shape)}."""
    return {k: p.new_zeros((len(MOMENTUM_DECAYS), *p.shape)) for k, p in params.items()}


def update_momenta(momenta: Mapping[str, Tensor], grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Exponential moving averages m <- d m + (1 - d) g for every decay d (non-finite gradients count as 0)."""
    out = {}
    for k, m in momenta.items():
        g = torch.nan_to_num(grads[k], nan=0.0, posinf=0.0, neginf=0.0)
        d = torch.tensor(MOMENTUM_DECAYS, dtype=m.dtype, device=m.device).view(-1, *([1] * g.dim()))  # (K, 1, ..)
        out[k] = d * m + (1 - d) * g.unsqueeze(0)  # (K, *shape)
    return out


def time_features(step: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """`tanh(step / s - 1)` for the 11 time scales s: (11,). `step` is a 0-d tensor (the inner iteration)."""
    scales = torch.tensor(TIME_SCALES, dtype=dtype, device=step.device)
    return torch.tanh(step.to(dtype) / scales - 1.0)


def _normalize(x: Tensor, clip: float) -> Tensor:
    """Clip to [-clip, clip], then divide each channel by its root mean square over the tensor: x is (C, *shape)."""
    x = torch.nan_to_num(x, nan=0.0, posinf=clip, neginf=-clip).clamp(-clip, clip)
    dims = tuple(range(1, x.dim()))
    rms = x.square().mean(dim=dims, keepdim=True).add(_EPS).rsqrt()  # (C, 1, ...)
    return x * rms


def build_features(
    params: Mapping[str, Tensor],
    grads: Mapping[str, Tensor],
    momenta: Mapping[str, Tensor],
    clip: float = 1.0,
) -> dict[str, Tensor]:
    """Stack the 8 per-entry feature channels of every tensor: {name: (8, *shape)}.

    Channels: weight, gradient, and the already-updated momenta (as `update_momenta` returns), each clipped to
    `[-clip, clip]` (non-finite values mapped to 0 or the bound) and normalized per tensor and channel. The 11 time
    features (`time_features`) are the same for every entry and are kept separate, which spares f a (11, N) copy: its
    first layer adds their contribution once per step.
    """
    return {
        k: _normalize(torch.cat([p.unsqueeze(0), grads[k].unsqueeze(0), momenta[k]], dim=0), clip)  # (8, *shape)
        for k, p in params.items()
    }


def add_norm_features(feats: Mapping[str, Tensor], params: Mapping[str, Tensor], grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Append 2 channels constant over each tensor: log10 RMS of its gradient and of its weights, / 4, clipped to
    [-2, 2] (an RMS of 1e-8 gives -2). They carry the scale that per-tensor normalization removes."""
    out = {}
    for k, f in feats.items():
        g = torch.nan_to_num(grads[k], nan=0.0, posinf=0.0, neginf=0.0)
        logs = torch.stack([g.square().mean(), params[k].square().mean()]).add(1e-16).log10().mul(0.125).clamp(-2.0, 2.0)
        chans = logs.view(N_NORM_FEATURES, *([1] * params[k].dim())).expand(N_NORM_FEATURES, *params[k].shape)
        out[k] = torch.cat([f, chans.to(f.dtype)], dim=0)
    return out
