"""The torch predictors: UNF (invariant, exact on fixed axes by default), Deep Sets (per-parameter network pooled per
tensor) and a flat MLP (not invariant: the control that shows why symmetry matters).

Every model takes raw weights {name: (B, *shape)}, normalizes each tensor with scalar statistics from the training
split (kept as buffers, so they travel with the state dict) and returns one raw output per member (B,): a logit for
BCE targets, a standardized value for MSE targets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from pipeline.predict.config import FEATURES

__all__ = ["TensorNormalizer", "UNFNet", "DeepSetsNet", "FlatNet", "build_net", "pointwise_features", "WIDTH_AGNOSTIC",
           "FEATURES"]

WIDTH_AGNOSTIC = {"unf": True, "statnn": True, "deepsets": True, "flat": False}


def pointwise_features(x: torch.Tensor, features: str) -> torch.Tensor:
    """(B, *shape) normalized weights -> (B, C, *shape). "raw+log" adds log|w| (floored at 1e-3 of the tensor's
    training std), which turns the orders of magnitude between members' weight scales (init std, lr, weight decay)
    into additive offsets. Pointwise, so it keeps every permutation symmetry exactly."""
    if features == "raw":
        return x.unsqueeze(1)
    return torch.stack([x, torch.log(x.abs() + 1e-3) / 3.0], dim=1)


def _mlp(sizes: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class TensorNormalizer(nn.Module):
    """(w - mean_t) / std_t with one scalar pair per tensor t: invariant to permutations and to width."""

    def __init__(self, names: Sequence[str], mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__()
        self.names = list(names)
        self.register_buffer("mean", torch.tensor(mean if mean is not None else [0.0] * len(names)))  # (T,)
        self.register_buffer("std", torch.tensor(std if std is not None else [1.0] * len(names)))  # (T,)

    def forward(self, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: (weights[n].to(self.mean.dtype) - self.mean[i]) / self.std[i] for i, n in enumerate(self.names)}


class UNFNet(nn.Module):
    """Normalizer -> `unf_models.UNFPredictor` (UNF layers -> invariant pooling -> MLP head) -> (B,)."""

    def __init__(self, spec: Any, hidden: Sequence[int], head: Sequence[int], fixed_axes: str = "exact",
                 normalizer: TensorNormalizer | None = None, features: str = "raw"):
        super().__init__()
        from unf_models import UNFPredictor

        self.norm = normalizer or TensorNormalizer(spec.names)
        self.features = features
        self.unf = UNFPredictor(spec, hidden=tuple(hidden), head=tuple(head), fixed_axes=fixed_axes,
                                in_channels=FEATURES[features])

    def forward(self, weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
        x = self.norm(weights)
        if self.features != "raw":
            x = {n: pointwise_features(v, self.features) for n, v in x.items()}  # {name: (B, C, *shape)}
        return self.unf(x).reshape(-1)  # (B,)


class DeepSetsNet(nn.Module):
    """Each scalar weight is a set element: phi([w, embedding of its tensor]) -> mean over the tensor's entries ->
    concatenate tensors -> rho MLP. Invariant to every permutation within a tensor (a superset of the true group)."""

    def __init__(self, names: Sequence[str], hidden: int = 32, head: Sequence[int] = (512,),
                 normalizer: TensorNormalizer | None = None, features: str = "raw"):
        super().__init__()
        self.names = list(names)
        self.norm = normalizer or TensorNormalizer(names)
        self.features = features
        self.inp = nn.Linear(FEATURES[features], hidden)
        self.tensor_embedding = nn.Parameter(torch.zeros(len(names), hidden))  # (T, H)
        self.phi = nn.Sequential(nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.rho = _mlp([len(names) * hidden, *head, 1])

    def forward(self, weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
        x = self.norm(weights)
        pooled = []
        for i, name in enumerate(self.names):
            w = pointwise_features(x[name].reshape(x[name].shape[0], -1), self.features).transpose(1, 2)  # (B, n, C)
            h = self.phi(self.inp(w) + self.tensor_embedding[i])  # (B, n, H)
            pooled.append(h.mean(dim=1))  # (B, H)
        return self.rho(torch.cat(pooled, dim=1)).reshape(-1)  # (B,)


class FlatNet(nn.Module):
    """Concatenate every normalized weight into one vector -> MLP. Tied to the zoo's exact shapes and ordering."""

    def __init__(self, names: Sequence[str], n_inputs: int, hidden: Sequence[int] = (512, 512),
                 normalizer: TensorNormalizer | None = None, features: str = "raw"):
        super().__init__()
        self.names = list(names)
        self.norm = normalizer or TensorNormalizer(names)
        self.features = features
        self.mlp = _mlp([n_inputs * FEATURES[features], *hidden, 1])

    def forward(self, weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
        x = self.norm(weights)
        flat = torch.cat([pointwise_features(x[n].reshape(x[n].shape[0], -1), self.features).flatten(1)
                          for n in self.names], dim=1)  # (B, C * P)
        return self.mlp(flat).reshape(-1)  # (B,)


def build_net(kind: str, spec: Any, params: Mapping[str, Any], normalizer: TensorNormalizer | None = None) -> nn.Module:
    """Build a torch predictor from its JSON-able hyperparameters (the same dict is saved with the artifact)."""
    names = list(spec.names)
    features = params.get("features", "raw")
    if kind == "unf":
        return UNFNet(spec, params["hidden"], params["head"], params.get("fixed_axes", "exact"), normalizer, features)
    if kind == "deepsets":
        return DeepSetsNet(names, params["hidden"], params["head"], normalizer, features)
    if kind == "flat":
        n_inputs = sum(int(torch.Size(spec.shapes[n]).numel()) for n in names)
        return FlatNet(names, n_inputs, params["hidden"], normalizer, features)
    raise ValueError(f"no torch predictor of kind {kind!r}")
