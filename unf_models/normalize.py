"""Weight-space normalization: one mean and one std per tensor, estimated from a sample of a zoo.

A scalar per tensor commutes with every permutation, so normalizing keeps UNF models exactly invariant/equivariant.
Non-finite entries (diverged members) are ignored when estimating. Statistics are JSON-able for predictor artifacts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from unf_models.errors import SpecError, SpecMismatchError

__all__ = ["WeightStats"]


@dataclass(frozen=True)
class WeightStats:
    """Per-tensor ``mean`` and ``std`` (``{name: float}``); ``apply`` maps weights to ~zero mean, unit std."""

    mean: dict[str, float]
    std: dict[str, float]

    @classmethod
    def estimate(cls, samples: Mapping[str, Tensor] | Iterable[Mapping[str, Tensor]], eps: float = 1e-8
                 ) -> WeightStats:
        """From stacked weights ``{name: (members, *shape)}`` or an iterable of such dicts / single state dicts."""
        if isinstance(samples, Mapping):
            samples = [samples]
        total: dict[str, list[float]] = {}  # name -> [count, sum, sum of squares]
        for sample in samples:
            for name, value in sample.items():
                v = value.detach().to(torch.float64).reshape(-1)
                v = v[torch.isfinite(v)]
                acc = total.setdefault(name, [0.0, 0.0, 0.0])
                acc[0] += v.numel()
                acc[1] += float(v.sum())
                acc[2] += float((v * v).sum())
        if not total:
            raise SpecError("WeightStats.estimate got no tensors")
        mean, std = {}, {}
        for name, (count, s, sq) in total.items():
            if count == 0:
                raise SpecError(f"tensor '{name}' has no finite entries in the sample; cannot estimate its statistics")
            m = s / count
            mean[name] = m
            std[name] = max((max(sq / count - m * m, 0.0)) ** 0.5, eps)
        return cls(mean, std)

    def _check(self, tensors: Mapping[str, Tensor]) -> None:
        missing = [n for n in tensors if n not in self.mean]
        if missing:
            raise SpecMismatchError(f"no normalization statistics for tensor(s) {missing} (have {list(self.mean)})")

    def apply(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """(w - mean) / std per tensor."""
        self._check(tensors)
        return {n: (t - self.mean[n]) / self.std[n] for n, t in tensors.items()}

    def invert(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """w * std + mean per tensor (inverse of ``apply``)."""
        self._check(tensors)
        return {n: t * self.std[n] + self.mean[n] for n, t in tensors.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"mean": dict(self.mean), "std": dict(self.std)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WeightStats:
        try:
            mean = {str(k): float(v) for k, v in data["mean"].items()}
            std = {str(k): float(v) for k, v in data["std"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise SpecError(f"malformed WeightStats dict: {err!r}; expected {{'mean': {{name: float}}, "
                            f"'std': {{name: float}}}}") from err
        if set(mean) != set(std):
            raise SpecError(f"WeightStats dict has mean and std for different tensors: {sorted(set(mean) ^ set(std))}")
        return cls(mean, std)
