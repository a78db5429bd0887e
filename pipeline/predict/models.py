"""The torch predictors: UNF (invariant, exact on fixed axes by default), Deep Sets (per-parameter network pooled per
tensor) and a flat MLP (not invariant: the control that shows why symmetry matters).

Every model takes raw weights {name: (B, *shape)}, normalizes each tensor with scalar statistics from the training
split (kept as buffers, so they travel with the state dict) and returns one raw output per member (B,): a logit for
BCE targets, a standardized value for MSE targets.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from pipeline.predict.config import FEATURES, NORMALIZE
from unf_models.activation import ReLU

__all__ = ["TensorNormalizer", "UNFNet", "UNFHybridNet", "UNFProbeNet", "ProbeNet", "DeepSetsNet", "FlatNet",
           "build_net", "pointwise_features", "WIDTH_AGNOSTIC", "FEATURES"]

WIDTH_AGNOSTIC = {"unf": True, "hybrid": True, "unf-probe": True, "probe": True, "statnn": True, "deepsets": True,
                  "flat": False}


def n_channels(features: str, normalize: str = "tensor") -> int:
    """Input channels per weight of the torch models for these `--features` / `--normalize` choices."""
    return FEATURES[features] + NORMALIZE[normalize]


def pointwise_features(x: torch.Tensor, features: str) -> torch.Tensor:
    """(B, *shape) normalized weights -> (B, C, *shape). "raw+log" adds log|w| (floored at 1e-3 of the tensor's
    training std), which turns the orders of magnitude between members' weight scales (init std, lr, weight decay)
    into additive offsets. Pointwise, so it keeps every permutation symmetry exactly."""
    if features == "raw":
        return x.unsqueeze(1)
    channels = [x, torch.log(x.abs() + 1e-3) / 3.0]
    if features == "raw+log+size":  # log10(entries per member) / 3: the width, as one constant per tensor
        channels.append(torch.full_like(x, math.log10(max(x[0].numel(), 1)) / 3.0))
    return torch.stack(channels, dim=1)


def _mlp(sizes: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(ReLU())
    return nn.Sequential(*layers)


class TensorNormalizer(nn.Module):
    """(w - mean_t) / std_t with one scalar pair per tensor t: invariant to permutations and to width.

    mode "member" (scale-aware): w / rms_m,t (each member's own tensor RMS) instead, and `channels` adds a constant
    channel log10(rms_m,t / std_t): the scale is kept, but as one explicit number per tensor rather than spread over
    every weight. Both are per-tensor statistics, so permutation invariance and width-agnosticism hold."""

    def __init__(self, names: Sequence[str], mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 mode: str = "tensor"):
        super().__init__()
        self.names = list(names)
        self.mode = mode
        self.register_buffer("mean", torch.tensor(mean if mean is not None else [0.0] * len(names)))  # (T,)
        self.register_buffer("std", torch.tensor(std if std is not None else [1.0] * len(names)))  # (T,)

    def forward(self, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.mode == "tensor":
            return {n: (weights[n].to(self.mean.dtype) - self.mean[i]) / self.std[i] for i, n in enumerate(self.names)}
        # "member" and "fanin" divide by the member's own RMS
        return {n: weights[n].to(self.mean.dtype) / self._rms(weights[n]) for n in self.names}

    def _rms(self, w: torch.Tensor) -> torch.Tensor:
        """(B, *shape) -> (B, 1, ..., 1) RMS per member, floored so an all-zero tensor stays finite."""
        flat = w.to(self.mean.dtype).reshape(w.shape[0], -1)
        return flat.pow(2).mean(dim=1).sqrt().clamp_min(1e-8).reshape(-1, *[1] * (w.dim() - 1))

    def channels(self, weights: Mapping[str, torch.Tensor], features: str) -> dict[str, torch.Tensor]:
        """{name: (B, *shape)} -> {name: (B, C, *shape)}: normalized weights, pointwise features and (modes "member",
        "fanin") the log-scale channel."""
        if self.mode == "tensor":
            x = self(weights)
            return {n: pointwise_features(x[n], features) for n in self.names}
        out = {}
        for i, n in enumerate(self.names):
            w = weights[n].to(self.mean.dtype)
            rms = self._rms(w)  # (B, 1, ..., 1), once per tensor: it divides the weights and makes the scale channel
            c = pointwise_features(w / rms, features)  # (B, F, *shape)
            if self.mode == "member":
                scale = torch.log10(rms / self.std[i])
            else:  # "fanin": RMS * sqrt(fan_in), fan_in counted as torch's inits do (dims after the first)
                fan_in = w[0].numel() // w.shape[1] if w.dim() > 2 else 1
                scale = torch.log10(rms * fan_in ** 0.5)
            out[n] = torch.cat([c, scale.unsqueeze(1).expand(-1, 1, *w.shape[1:])], dim=1)
        return out


class _Preparable(nn.Module):
    """A predictor whose forward splits into a parameter-free `prepare` (normalization, pointwise features, layout)
    and `forward_prepared`, so training computes a fixed training set's inputs once and takes each batch with
    `select` instead of recomputing them every batch (pipeline.predict.train): the same numbers, computed once."""

    preparable = True
    prepared_dim = 0  # the member dim of the prepared tensors

    def forward(self, weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.forward_prepared(self.prepare(weights))  # type: ignore[attr-defined]  # (B,)

    def select(self, prepared: list[torch.Tensor], index: torch.Tensor) -> list[torch.Tensor]:
        """The members `index` of prepared inputs."""
        return [t.index_select(self.prepared_dim, index) for t in prepared]


class UNFNet(_Preparable):
    """Normalizer -> `unf_models.UNFPredictor` (UNF layers -> invariant pooling -> MLP head) -> (B,).

    `keep_fixed` (tied mode only): these fixed labels stay fixed and every other fixed label is tied, by running the
    exact layer on a spec where only they are fixed."""

    def __init__(self, spec: Any, hidden: Sequence[int], head: Sequence[int], fixed_axes: str = "exact",
                 normalizer: TensorNormalizer | None = None, features: str = "raw", pos_embed: bool = False,
                 keep_fixed: Sequence[str] = ()):
        super().__init__()
        from unf_models import UNFPredictor

        if keep_fixed and fixed_axes == "permutable":
            spec, fixed_axes = spec.with_fixed(keep_fixed), "exact"
        self.norm = normalizer or TensorNormalizer(spec.names)
        self.features = features
        self.channels = n_channels(features, self.norm.mode)
        self.unf = UNFPredictor(spec, hidden=tuple(hidden), head=tuple(head), fixed_axes=fixed_axes,
                                in_channels=self.channels, pos_embed=pos_embed)

    def _inputs(self, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.channels == 1:
            return self.norm(weights)  # {name: (B, *shape)}
        return self.norm.channels(weights, self.features)  # {name: (B, C, *shape)}

    prepared_dim = 1  # UNFPredictor.prepare's pieces are channel-major (K, B, ...)

    def prepare(self, weights: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        return self.unf.prepare(self._inputs(weights))

    def _head_beside_pool(self, n_extra: int, head: Sequence[int]) -> nn.Sequential:
        """For the hybrids: the UNF part returns its pooled features (B, n_pool) instead of a prediction, and the
        returned MLP head reads them beside `n_extra` more features."""
        n_pool = self.unf.pool.num_features
        self.unf.head = nn.Identity()
        return _mlp([n_pool + n_extra, *head, 1])

    def forward_prepared(self, prepared: list[torch.Tensor]) -> torch.Tensor:
        return self.unf.forward_prepared(prepared).reshape(-1)  # (B,)


class UNFHybridNet(UNFNet):
    """UNF layers -> invariant pooling, concatenated with the standardized STATNN statistics of the raw weights ->
    MLP head -> (B,). The statistics' mean/std are buffers set from the training rows (`set_stat_scaling`)."""

    def __init__(self, spec: Any, hidden: Sequence[int], head: Sequence[int], fixed_axes: str = "exact",
                 normalizer: TensorNormalizer | None = None, features: str = "raw", pos_embed: bool = False,
                 keep_fixed: Sequence[str] = ()):
        super().__init__(spec, hidden, (), fixed_axes, normalizer, features, pos_embed, keep_fixed)
        n_stats = 7 * len(spec.names)
        self.register_buffer("stat_mean", torch.zeros(n_stats))
        self.register_buffer("stat_std", torch.ones(n_stats))
        self.head = self._head_beside_pool(n_stats, head)
        self.names = list(spec.names)

    preparable = False  # its head also reads statistics of the raw weights

    def set_stat_scaling(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.stat_mean.copy_(mean)
        self.stat_std.copy_(torch.where(std > 1e-12, std, torch.ones_like(std)))

    def forward(self, weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
        from pipeline.predict.features import statnn_features

        pooled = self.unf(self._inputs(weights))  # (B, n_pool)
        stats = statnn_features(weights, self.names).to(pooled.dtype)  # (B, 7T)
        stats = (stats - self.stat_mean) / self.stat_std
        return self.head(torch.cat([pooled, stats], dim=1)).reshape(-1)  # (B,)


class ProbeNet(nn.Module):
    """Learned probe inputs -> the member's outputs on them (`pipeline.predict.probe.ProbeFeatures`) -> MLP -> (B,).
    Invariant to every hidden-unit permutation by construction (it reads the function), fixed axes included."""

    def __init__(self, setup: Mapping[str, Any], head: Sequence[int]):
        super().__init__()
        from pipeline.predict.probe import ProbeFeatures

        self.probe = ProbeFeatures(setup)
        self.head = _mlp([self.probe.num_features, *head, 1])

    def forward(self, weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.probe(weights)).reshape(-1)  # (B,)


class UNFProbeNet(UNFNet):
    """UNF layers -> invariant pooling, concatenated with the member's outputs on learned probe inputs -> MLP head ->
    (B,): the weights' structure and the function they compute, side by side. The UNF part is prepared once per run
    like `UNFNet`; the probe part reads the raw weights every batch (the probes are learned)."""

    def __init__(self, spec: Any, hidden: Sequence[int], head: Sequence[int], setup: Mapping[str, Any],
                 fixed_axes: str = "exact", normalizer: TensorNormalizer | None = None, features: str = "raw",
                 pos_embed: bool = False, keep_fixed: Sequence[str] = ()):
        super().__init__(spec, hidden, (), fixed_axes, normalizer, features, pos_embed, keep_fixed)
        from pipeline.predict.probe import ProbeFeatures

        self.probe = ProbeFeatures(setup)
        self.head = self._head_beside_pool(self.probe.num_features, head)
        self.names = list(spec.names)

    def prepare(self, weights: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        # UNF pieces, then the raw weights with the member dim moved to prepared_dim (1) like the UNF pieces
        return [*super().prepare(weights), *(weights[n].movedim(0, 1) for n in self.names)]

    def forward_prepared(self, prepared: list[torch.Tensor]) -> torch.Tensor:
        n_unf = len(prepared) - len(self.names)
        pooled = self.unf.forward_prepared(prepared[:n_unf])  # (B, n_pool)
        raw = {n: t.movedim(1, 0) for n, t in zip(self.names, prepared[n_unf:])}  # {name: (B, *shape)}
        probed = self.probe(raw)  # (B, n_probe_features)
        return self.head(torch.cat([pooled, probed.to(pooled.dtype)], dim=1)).reshape(-1)  # (B,)


class DeepSetsNet(_Preparable):
    """Each scalar weight is a set element: phi([w, embedding of its tensor]) -> mean over the tensor's entries ->
    concatenate tensors -> rho MLP. Invariant to every permutation within a tensor (a superset of the true group)."""

    def __init__(self, names: Sequence[str], hidden: int = 32, head: Sequence[int] = (512,),
                 normalizer: TensorNormalizer | None = None, features: str = "raw"):
        super().__init__()
        self.names = list(names)
        self.norm = normalizer or TensorNormalizer(names)
        self.features = features
        self.inp = nn.Linear(n_channels(features, self.norm.mode), hidden)
        self.tensor_embedding = nn.Parameter(torch.zeros(len(names), hidden))  # (T, H)
        self.phi = nn.Sequential(ReLU(), nn.Linear(hidden, hidden), ReLU(), nn.Linear(hidden, hidden))
        self.rho = _mlp([len(names) * hidden, *head, 1])

    def prepare(self, weights: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        x = self.norm.channels(weights, self.features)  # {name: (B, C, *shape)}
        return [x[n].reshape(x[n].shape[0], x[n].shape[1], -1).transpose(1, 2) for n in self.names]  # (B, n, C)

    def forward_prepared(self, prepared: list[torch.Tensor]) -> torch.Tensor:
        pooled = []
        for i, w in enumerate(prepared):  # (B, n, C) per tensor
            h = self.phi(self.inp(w) + self.tensor_embedding[i])  # (B, n, H)
            pooled.append(h.mean(dim=1))  # (B, H)
        return self.rho(torch.cat(pooled, dim=1)).reshape(-1)  # (B,)


class FlatNet(_Preparable):
    """Concatenate every normalized weight into one vector -> MLP. Tied to the zoo's exact shapes and ordering;
    narrower members (a zoo with several widths) are zero-padded to those shapes first, which is the same network
    (the extra units have zero weights in and out)."""

    def __init__(self, names: Sequence[str], n_inputs: int, hidden: Sequence[int] = (512, 512),
                 normalizer: TensorNormalizer | None = None, features: str = "raw",
                 shapes: Mapping[str, Sequence[int]] | None = None):
        super().__init__()
        self.names = list(names)
        self.norm = normalizer or TensorNormalizer(names)
        self.features = features
        self.shapes = {n: tuple(shapes[n]) for n in self.names} if shapes is not None else None
        self.mlp = _mlp([n_inputs * n_channels(features, self.norm.mode), *hidden, 1])

    def _pad(self, weights: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        if self.shapes is None:
            return weights
        out = {}
        for n in self.names:
            w, target = weights[n], self.shapes[n]
            pad = [p for have, want in zip(reversed(w.shape[1:]), reversed(target)) for p in (0, want - have)]
            out[n] = torch.nn.functional.pad(w, pad) if any(pad) else w
        return out

    def prepare(self, weights: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        x = self.norm.channels(self._pad(weights), self.features)  # {name: (B, C, *shape)}
        return [torch.cat([x[n].reshape(x[n].shape[0], x[n].shape[1], -1).flatten(1)
                           for n in self.names], dim=1)]  # (B, C * P)

    def forward_prepared(self, prepared: list[torch.Tensor]) -> torch.Tensor:
        return self.mlp(prepared[0]).reshape(-1)  # (B,)


def build_net(kind: str, spec: Any, params: Mapping[str, Any], normalizer: TensorNormalizer | None = None) -> nn.Module:
    """Build a torch predictor from its JSON-able hyperparameters (the same dict is saved with the artifact)."""
    names = list(spec.names)
    features = params.get("features", "raw")
    normalizer = normalizer or TensorNormalizer(names)
    normalizer.mode = params.get("normalize", "tensor")
    if kind == "unf":
        return UNFNet(spec, params["hidden"], params["head"], params.get("fixed_axes", "exact"), normalizer, features,
                      bool(params.get("pos_embed", False)), tuple(params.get("keep_fixed", ())))
    if kind == "hybrid":
        return UNFHybridNet(spec, params["hidden"], params["head"], params.get("fixed_axes", "exact"), normalizer,
                            features, bool(params.get("pos_embed", False)), tuple(params.get("keep_fixed", ())))
    if kind == "unf-probe":
        return UNFProbeNet(spec, params["hidden"], params["head"], params["probe"], params.get("fixed_axes", "exact"),
                           normalizer, features, bool(params.get("pos_embed", False)),
                           tuple(params.get("keep_fixed", ())))
    if kind == "probe":
        return ProbeNet(params["probe"], params["head"])
    if kind == "deepsets":
        return DeepSetsNet(names, params["hidden"], params["head"], normalizer, features)
    if kind == "flat":
        n_inputs = sum(int(torch.Size(spec.shapes[n]).numel()) for n in names)
        return FlatNet(names, n_inputs, params["hidden"], normalizer, features, spec.shapes)
    raise ValueError(f"no torch predictor of kind {kind!r}")
