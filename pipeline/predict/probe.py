"""Learned probe inputs: read a network through its function as well as its weights.

A probe model owns a few learned inputs (probes) and runs every member network on them, from its weights alone, with
the zoo's architecture. The member's outputs on the probes (log-softmax over classes, plus the log-sum-exp as a scale)
are features no hidden-unit permutation can change, and they cannot over-claim a symmetry: the network's own function
is read, fixed axes (pixels, classes) included. Nothing of the task's data is used; the probes are parameters learned
from weights and targets only, like every other predictor parameter (plain learned probing, the baseline of Kahana et
al., ICLR 2025, without their probe generator).

Supported: zoos whose members are `cnn` or `mlp` networks built by `unfzoo zoo` (the zoo records the architecture).
The member's activation is not in its weights; a probe model runs each member under every activation its training
zoo used and reads all of them, so scoring a checkpoint needs no activation either.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ConfigError
from unf_models.activation import relu

__all__ = ["PROBE_ARCHS", "probe_setup", "member_logits", "member_logits_under", "ProbeFeatures", "check_probe_names"]

PROBE_ARCHS: tuple[str, ...] = ("cnn", "mlp")
_ACTIVATIONS = {"relu": relu, "tanh": torch.tanh, "gelu": F.gelu, "silu": F.silu, "sigmoid": torch.sigmoid,
                "leaky_relu": F.leaky_relu}
_CLAMP = 30.0  # features are clamped to +-this: a member with huge weights must not blow up the head


def probe_setup(zoo: Any, n_probes: int) -> dict[str, Any]:
    """The JSON-able description a probe model needs (architecture, input shape, activations, probe count), read
    from a zoo built by `unfzoo zoo`; ConfigError naming the zoo when it cannot be probed."""
    arch = zoo.arch
    name = (arch or {}).get("name")
    if name not in PROBE_ARCHS:
        what = f"its members are {name!r} networks" if name else "it records no architecture (an import)"
        raise ConfigError(f"{zoo.url}: probe models (probe, unf-probe) need a zoo of {' or '.join(PROBE_ARCHS)} "
                          f"members built by `unfzoo zoo`; {what}. Use --model unf,statnn,deepsets instead")
    info = (getattr(zoo, "attrs", {}).get("task") or {}).get("info") or {}
    input_shape = list(info.get("input_shape") or ([arch["in_features"]] if name == "mlp" else []))
    if not input_shape:
        raise ConfigError(f"{zoo.url}: the zoo's task records no input_shape, which probe models need")
    categories = getattr(getattr(zoo, "layout", None), "categorical", {}).get("activation")
    activations = [str(a) for a in categories] if categories else [str(arch.get("activation", "relu"))]
    unknown = [a for a in activations if a not in _ACTIVATIONS]
    if unknown:
        raise ConfigError(f"{zoo.url}: activation {unknown[0]!r} has no probe forward; known: "
                          f"{', '.join(_ACTIVATIONS)}")
    keep = ("name", "stride", "padding", "num_classes")
    return {"arch": {k: arch[k] for k in keep if k in arch}, "input_shape": input_shape,
            "activations": activations, "n_probes": int(n_probes)}


def _layer_names(weights: Mapping[str, torch.Tensor], prefix: str) -> list[str]:
    n = 0
    while f"{prefix}.{n}.weight" in weights:
        n += 1
    return [f"{prefix}.{i}" for i in range(n)]


def member_logits(arch: Mapping[str, Any], weights: Mapping[str, torch.Tensor], x: torch.Tensor,
                  activation: str) -> torch.Tensor:
    """Run a batch of member networks, given by their weights {name: (B, *shape)}, on shared inputs x (P, *input)
    -> logits (B, P, classes). Any width: the shapes are read from the weights (zero-padded units are inert)."""
    return member_logits_under(arch, weights, x, [activation])[0]


def member_logits_under(arch: Mapping[str, Any], weights: Mapping[str, torch.Tensor], x: torch.Tensor,
                        activations: Sequence[str]) -> torch.Tensor:
    """`member_logits` under each of several activations at once -> (A, B, P, classes). The first layer's
    pre-activation does not depend on the activation and is computed once; the later layers run all activations
    as one batch of A * P inputs (one grouped convolution or einsum per layer, not one per activation)."""
    acts = [_ACTIVATIONS[a] for a in activations]
    n_act, n_probe = len(acts), x.shape[0]

    def activate(pre: torch.Tensor) -> torch.Tensor:  # (A' * P, ...) -> (A * P, ...), activation a on slice a
        # the first layer's pre-activation (P rows) is shared by every activation; later layers hold A slices
        parts = [pre] * n_act if pre.shape[0] == n_probe else pre.split(n_probe)
        out = [act(part) for act, part in zip(acts, parts)]
        return out[0] if n_act == 1 else torch.cat(out)

    head_w, head_b = weights["head.weight"], weights["head.bias"]  # (B, K, C), (B, K)
    b = head_w.shape[0]
    if arch["name"] == "cnn":
        h = x.repeat(1, b, 1, 1)  # (P, B * C_in, H, W): members side by side as groups of one convolution
        for layer in _layer_names(weights, "convs"):
            k, bias = weights[f"{layer}.weight"], weights[f"{layer}.bias"]  # (B, C_out, C_in, kh, kw), (B, C_out)
            h = activate(F.conv2d(h, k.reshape(-1, *k.shape[2:]), bias.reshape(-1), stride=arch.get("stride", 1),
                                  padding=arch.get("padding", 0), groups=b))  # (A * P, B * C_out, H', W')
        pooled = h.mean(dim=(-2, -1)).reshape(h.shape[0], b, -1)  # (A * P, B, C)
    else:  # mlp
        pooled = x.reshape(n_probe, -1).unsqueeze(1).expand(-1, b, -1)  # (P, B, D)
        for layer in _layer_names(weights, "layers"):
            w, bias = weights[f"{layer}.weight"], weights[f"{layer}.bias"]  # (B, O, I), (B, O)
            pooled = activate(torch.einsum("pbi,boi->pbo", pooled, w) + bias)  # (A * P, B, O)
    if pooled.shape[0] == n_probe and n_act > 1:  # no hidden layer: every activation gives the same logits
        pooled = pooled.repeat(n_act, 1, 1)
    logits = torch.einsum("pbc,bkc->bpk", pooled, head_w) + head_b[:, None, :]  # (B, A * P, K)
    return logits.unflatten(1, (n_act, n_probe)).transpose(0, 1)  # (A, B, P, K)


class ProbeFeatures(nn.Module):
    """Learned probes -> each member's outputs on them under each candidate activation -> (B, num_features)."""

    def __init__(self, setup: Mapping[str, Any]):
        super().__init__()
        self.arch = dict(setup["arch"])
        self.activations = list(setup["activations"])
        n = int(setup["n_probes"])
        # inputs of the zoos' tasks are scaled to [0, 1] (digits) or standardized; uniform [0, 1) starts the probes
        # inside the range the members saw
        self.probes = nn.Parameter(torch.rand(n, *setup["input_shape"]))  # (P, *input_shape)
        self.n_classes = int(self.arch.get("num_classes") or 0)

    @property
    def num_features(self) -> int:
        return len(self.activations) * self.probes.shape[0] * (self.n_classes + 1)

    def forward(self, weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
        z = member_logits_under(self.arch, weights, self.probes, self.activations).float()  # (A, B, P, K)
        lse = torch.logsumexp(z, dim=-1)  # (A, B, P); z - lse is log_softmax (which runs ~6x slower over K ~ 10)
        feats = [(z - lse[..., None]).flatten(2), lse / self.n_classes]  # (A, B, .)
        out = torch.cat(feats, dim=2).transpose(0, 1).flatten(1)  # (B, num_features), activation-major
        return torch.nan_to_num(out, nan=0.0, posinf=_CLAMP, neginf=-_CLAMP).clamp(-_CLAMP, _CLAMP)


def check_probe_names(names: Sequence[str], arch: Mapping[str, Any]) -> None:
    """Raise ConfigError when a weight space lacks the tensors the probe forward of `arch` reads."""
    prefix = "convs" if arch["name"] == "cnn" else "layers"
    need = ["head.weight", "head.bias", f"{prefix}.0.weight", f"{prefix}.0.bias"]
    missing = [n for n in need if n not in names]
    if missing:
        raise ConfigError(f"probe models read a {arch['name']} member's tensors by name; {missing[0]!r} is missing "
                          f"from this weight space ({', '.join(names)})")
