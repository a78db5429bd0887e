"""Optimizers as pure `init`/`update` pairs with explicit state, plus a `torch.optim` wrapper.

Every optimizer here has the same functional interface (optax-like), so a population of them vmaps with
`torch.func.vmap` over (meta, state, params, grads):

    state = opt.init(params)
    params, state = opt.update(meta, state, params, grads)

`meta` holds the optimizer's own (meta-learned) parameters as a dict of tensors: for the residual learned optimizers
of the UNF paper (App. C) the step is

    W <- W - alpha * (m_gamma0 + beta * f(features(W, grad, momenta, t)))

with `alpha`, `beta`, `gamma0` stored as `log_alpha`, `log_beta`, `logit_gamma0` and `m_gamma0` the gradient's EMA
with decay `gamma0`. `f` is pointwise layers over the 19 feature channels then a final `UNFLinear` over the inner
network's weight space ("unf"), or pointwise layers only ("perparam", the Deep Set / per-parameter baseline).
"sgdm" drops `f` (beta = 0): meta-tuned SGD with momentum. By default f's head starts at zero (a fresh learned
optimizer is SGDM) and f's output is centred per tensor (no uniform drift); see `LOptConfig`. `Adam` is the
hand-designed baseline, with `meta = {"lr": tensor}` so a grid of learning rates vmaps like a population.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.func import functional_call

from pipeline.errors import ConfigError
from pipeline.lopt.features import (
    N_FEATURES,
    N_NORM_FEATURES,
    add_norm_features,
    build_features,
    init_momenta,
    time_features,
    update_momenta,
)

__all__ = [
    "KINDS",
    "Adam",
    "FunctionalOptimizer",
    "LOptConfig",
    "LearnedOptimizer",
    "ResidualLOpt",
    "UpdateNet",
    "flatten_meta",
    "unflatten_meta",
]

KINDS = ("unf", "perparam", "sgdm")
NOMINALS = ("sgdm", "adam")
State = dict[str, Any]
_ADAM_B2, _ADAM_EPS = 0.999, 1e-8  # the Adam nominal term's fixed second-moment decay and epsilon
Params = dict[str, Tensor]


class FunctionalOptimizer(Protocol):
    """What every optimizer of this module offers: explicit state, pure update, vmappable."""

    def init(self, params: Mapping[str, Tensor]) -> State: ...

    def update(
        self, meta: Mapping[str, Tensor], state: State, params: Mapping[str, Tensor], grads: Mapping[str, Tensor]
    ) -> tuple[Params, State]: ...


@dataclass(frozen=True)
class LOptConfig:
    """Architecture and initial hyperparameters of a residual learned optimizer (defaults: UNF paper App. C)."""

    kind: str = "unf"
    hidden: int = 32  # channels of the pointwise layers
    layers: int = 3  # pointwise layers (each Linear + ReLU) before the head
    alpha: float = 0.1  # initial step size
    beta: float = 1e-3  # initial scale of f's output
    gamma0: float = 0.9  # initial decay of the nominal momentum
    clip: float = 1.0  # raw features are clipped to [-clip, clip] before per-tensor normalization
    # Scale of f's head at initialization: 0 (default) zeroes it, so a fresh learned optimizer is exactly SGDM and ES
    # grows f only where it helps; 1 keeps PyTorch's random init, whose f adds noise that ES first answers by
    # shrinking beta (seen on mlp-digits: beta 1e-3 -> 4e-4 in 150 steps), which in turn mutes f's gradient.
    head_scale: float = 0.0
    # Subtract each tensor's mean from f's output. A constant part of f moves every entry of a tensor the same way at
    # every step; ES noise random-walks f's biases to ~0.1 in 1,000 outer steps, and on mlp-digits that drift doubled
    # the loss from step 100 to 400 (perparam and unf, uncentred). The mean is permutation invariant, so the UNF update
    # stays equivariant, and f = 0 still gives SGDM.
    center: bool = True
    # UNF head: "permutable" treats fixed axes (inputs, classes) as permutable, as the paper's code does; "exact" folds
    # them into channels, which is the maximal layer but has ~400k head parameters on a 64-input MLP: too many for ES.
    fixed_axes: str = "permutable"
    # The nominal term the learned part f is added to: "sgdm" (the gradient's EMA with decay gamma0, the UNF paper's
    # choice) or "adam" (Adam's bias-corrected direction m_hat / (sqrt(v_hat) + eps), first-moment decay gamma0,
    # second-moment decay 0.999): W <- W - alpha (adam_dir + beta f). With kind "sgdm" and nominal "adam" the
    # optimizer is meta-tuned Adam (learned step size and first-moment decay).
    nominal: str = "sgdm"
    # Two more per-tensor input channels for f: log10 of the tensor's gradient RMS and of its weight RMS (scaled by
    # 1/4, clipped to [-2, 2]). The per-tensor normalization of the other channels hides the gradient's scale, which
    # is what tells f that training has converged or is blowing up (Metz et al. 2022, "VeLO").
    norm_features: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"optimizer kind {self.kind!r} is unknown; use one of {', '.join(KINDS)}")
        if not (self.alpha > 0 and self.beta > 0 and 0 < self.gamma0 < 1):
            raise ConfigError(f"need alpha > 0, beta > 0 and 0 < gamma0 < 1, got {self.alpha}, {self.beta}, {self.gamma0}")
        if self.nominal not in NOMINALS:
            raise ConfigError(f"nominal term {self.nominal!r} is unknown; use sgdm or adam")
        if self.fixed_axes not in ("permutable", "exact"):
            raise ConfigError(f"fixed_axes must be permutable or exact, got {self.fixed_axes!r}")
        if self.hidden < 1 or self.layers < 1 or self.clip <= 0:
            raise ConfigError("hidden, layers and clip must be positive")
        if not self.head_scale >= 0:
            raise ConfigError(f"head_scale must be >= 0, got {self.head_scale}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class UpdateNet(nn.Module):
    """f: a shared pointwise MLP over the feature channels, then a UNFLinear head (equivariant) or a pointwise head.

    `forward(feats, tfeat)`: per-entry features {name: (B, 8, *shape)} and the step's time features (11,), together
    the 19 input channels; output {name: (B, *shape)}. The pointwise layers run channels-first on all entries of all
    tensors as one (C, B*N) matrix; the time features enter the first layer as a bias (the same result as broadcasting
    them to every entry, without the copy).
    """

    def __init__(
        self,
        kind: str,
        spec: Any = None,
        in_ch: int = N_FEATURES,
        hidden: int = 32,
        layers: int = 3,
        fixed_axes: str = "permutable",
    ):
        super().__init__()
        self.pointwise = nn.ModuleList(nn.Linear(in_ch if i == 0 else hidden, hidden) for i in range(layers))
        self.kind = kind
        if kind == "unf":
            if spec is None:
                raise ConfigError("the unf optimizer needs the inner network's WeightSpec")
            from unf_models import UNFLinear

            self.head: nn.Module = UNFLinear(spec, hidden, 1, fixed_axes=fixed_axes)  # type: ignore[arg-type]
        elif kind == "perparam":
            self.head = nn.Linear(hidden, 1)
        else:
            raise ConfigError(f"UpdateNet kind must be unf or perparam, got {kind!r}")

    def forward(self, feats: Mapping[str, Tensor], tfeat: Tensor) -> dict[str, Tensor]:
        names = list(feats)
        batch, chans = feats[names[0]].shape[:2]
        sizes = [feats[k][0, 0].numel() for k in names]
        h = torch.cat([feats[k].reshape(batch, chans, -1) for k in names], dim=2)  # (B, 8, N)
        h = h.transpose(0, 1).reshape(chans, -1)  # (8, B*N)
        first = self.pointwise[0]
        bias = first.bias + first.weight[:, chans:] @ tfeat  # (hidden,)
        h = torch.addmm(bias.unsqueeze(-1), first.weight[:, :chans], h).relu()  # (hidden, B*N)
        for lin in self.pointwise[1:]:
            h = torch.addmm(lin.bias.unsqueeze(-1), lin.weight, h).relu()  # (hidden, B*N)
        if self.kind == "perparam":
            out = torch.addmm(self.head.bias.unsqueeze(-1), self.head.weight, h).reshape(batch, -1)  # (B, N)
            return {k: o.reshape(batch, *feats[k].shape[2:]) for k, o in zip(names, out.split(sizes, dim=1))}
        h = h.reshape(-1, batch, h.shape[-1] // batch).transpose(0, 1)  # (B, hidden, N)
        per_tensor = {k: o.reshape(batch, -1, *feats[k].shape[2:]) for k, o in zip(names, h.split(sizes, dim=2))}
        return {k: v.squeeze(1) for k, v in self.head(per_tensor).items()}  # (B, *shape)


class ResidualLOpt:
    """The residual learned optimizer `W <- W - alpha (m_gamma0 + beta f)` in functional form.

    `spec` (a `unf_models.WeightSpec` of the inner network) is needed for kind "unf" only. The UNF head is
    width-agnostic along permutable axes, so one set of meta-parameters serves inner networks of any width with the
    same spec labels; the per-parameter and SGDM kinds serve any network.
    """

    def __init__(self, config: LOptConfig, spec: Any = None):
        self.config = config
        self.spec = spec
        self.kind = config.kind
        self.net: UpdateNet | None = None
        if config.kind != "sgdm":
            self.net = UpdateNet(config.kind, spec, self.in_channels, config.hidden, config.layers, config.fixed_axes)

    @property
    def in_channels(self) -> int:
        """Input channels of f: 8 per-entry + (2 per-tensor norm features) + 11 time features."""
        return N_FEATURES + (N_NORM_FEATURES if self.config.norm_features else 0)

    # -- meta-parameters -------------------------------------------------------------------------------------------
    def init_meta(self, seed: int = 0) -> dict[str, Tensor]:
        """Initial meta-parameters (float32, CPU): log/logit hyperparameters and f's weights (seeded init)."""
        c = self.config
        meta = {
            "log_alpha": torch.tensor(math.log(c.alpha)),
            "logit_gamma0": torch.tensor(math.log(c.gamma0 / (1 - c.gamma0))),
        }
        if self.net is not None:
            meta["log_beta"] = torch.tensor(math.log(c.beta))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                fresh = UpdateNet(c.kind, self.spec, self.in_channels, c.hidden, c.layers, c.fixed_axes)
            for k, v in fresh.named_parameters():
                scale = c.head_scale if k.startswith("head.") else 1.0
                meta[f"f.{k}"] = (v.detach().float() * scale).clone()
        return meta

    @staticmethod
    def hyperparameters(meta: Mapping[str, Tensor]) -> dict[str, float]:
        """alpha, beta (0 for sgdm) and gamma0 as plain floats, for logs and reports."""
        out = {
            "alpha": float(meta["log_alpha"].exp()),
            "gamma0": float(torch.sigmoid(meta["logit_gamma0"])),
            "beta": float(meta["log_beta"].exp()) if "log_beta" in meta else 0.0,
        }
        return out

    # -- functional optimizer ----------------------------------------------------------------------------------------
    def init(self, params: Mapping[str, Tensor]) -> State:
        """Zero nominal momentum (and feature momenta when f is used), iteration 0."""
        state: State = {
            "step": torch.zeros((), dtype=torch.long, device=next(iter(params.values())).device),
            "nominal": {k: torch.zeros_like(p) for k, p in params.items()},
        }
        if self.config.nominal == "adam":
            state["second"] = {k: torch.zeros_like(p) for k, p in params.items()}
        if self.net is not None:
            state["momenta"] = init_momenta(params)
        return state

    def update(
        self, meta: Mapping[str, Tensor], state: State, params: Mapping[str, Tensor], grads: Mapping[str, Tensor]
    ) -> tuple[Params, State]:
        """One step; pure (no in-place change of its inputs), so it vmaps over a population of (meta, state)."""
        alpha = meta["log_alpha"].exp()
        gamma = torch.sigmoid(meta["logit_gamma0"])
        first = {k: gamma * m + (1 - gamma) * grads[k] for k, m in state["nominal"].items()}
        new_state: State = {"step": state["step"] + 1, "nominal": first}
        if self.config.nominal == "adam":
            second = {k: _ADAM_B2 * v + (1 - _ADAM_B2) * grads[k].square() for k, v in state["second"].items()}
            new_state["second"] = second
            t = new_state["step"].to(alpha.dtype)
            bc1, bc2_sqrt = 1 - gamma**t, (1 - _ADAM_B2**t).sqrt()
            nominal = {k: (m / bc1) / (second[k].sqrt() / bc2_sqrt + _ADAM_EPS) for k, m in first.items()}
        else:
            nominal = first
        if self.net is None:
            return {k: p - alpha * nominal[k] for k, p in params.items()}, new_state
        momenta = update_momenta(state["momenta"], grads)
        feats = build_features(params, grads, momenta, self.config.clip)
        if self.config.norm_features:
            feats = add_norm_features(feats, params, grads)
        tfeat = time_features(state["step"], alpha.dtype)  # (11,)
        f_params = {k[2:]: v for k, v in meta.items() if k.startswith("f.")}
        batched = {k: v.unsqueeze(0) for k, v in feats.items()}  # (1, 8, *shape)
        out = functional_call(self.net, f_params, (batched, tfeat))
        beta = meta["log_beta"].exp()
        new_state["momenta"] = momenta
        f = {k: v[0] - v[0].mean() if self.config.center else v[0] for k, v in out.items()}
        return {k: p - alpha * (nominal[k] + beta * f[k]) for k, p in params.items()}, new_state


class Adam:
    """Adam (Kingma & Ba) as a functional optimizer, numerically the same as `torch.optim.Adam` defaults.

    `meta = {"lr": tensor}` so a grid of learning rates vmaps as a population.
    """

    kind = "adam"

    def __init__(self, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
        self.b1, self.b2, self.eps = b1, b2, eps

    @staticmethod
    def init_meta(lr: float) -> dict[str, Tensor]:
        return {"lr": torch.tensor(float(lr))}

    def init(self, params: Mapping[str, Tensor]) -> State:
        return {
            "step": torch.zeros((), dtype=torch.long, device=next(iter(params.values())).device),
            "m": {k: torch.zeros_like(p) for k, p in params.items()},
            "v": {k: torch.zeros_like(p) for k, p in params.items()},
        }

    def update(
        self, meta: Mapping[str, Tensor], state: State, params: Mapping[str, Tensor], grads: Mapping[str, Tensor]
    ) -> tuple[Params, State]:
        step = state["step"] + 1
        t = step.to(next(iter(params.values())).dtype)
        bc1 = 1 - self.b1**t
        bc2_sqrt = (1 - self.b2**t).sqrt()
        m = {k: self.b1 * v + (1 - self.b1) * grads[k] for k, v in state["m"].items()}
        v = {k: self.b2 * s + (1 - self.b2) * grads[k].square() for k, s in state["v"].items()}
        lr = meta["lr"]
        new = {k: p - (lr / bc1) * m[k] / (v[k].sqrt() / bc2_sqrt + self.eps) for k, p in params.items()}
        return new, {"step": step, "m": m, "v": v}


# -- flat meta-parameter vectors (what ES perturbs) --------------------------------------------------------------------
def flatten_meta(meta: Mapping[str, Tensor]) -> Tensor:
    """Concatenate the meta-parameters (in key order) into one vector (D,)."""
    return torch.cat([v.reshape(-1) for v in meta.values()])


def unflatten_meta(vec: Tensor, template: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of `flatten_meta` for a vector shaped (D,) (vmappable: works on a slice of a population)."""
    sizes = [v.numel() for v in template.values()]
    parts = vec.split(sizes, dim=-1)
    return {k: p.reshape((*vec.shape[:-1], *v.shape)) for (k, v), p in zip(template.items(), parts)}


class LearnedOptimizer(torch.optim.Optimizer):
    """`torch.optim`-style wrapper around a functional optimizer and its meta-parameters.

    `params` is an `nn.Module` or an iterable of `(name, parameter)` pairs; names must be the ones the optimizer's
    spec uses (a module's `named_parameters()` for a spec derived with `WeightSpec.from_module`).
    """

    def __init__(
        self,
        params: nn.Module | Iterable[tuple[str, Tensor]],
        optimizer: FunctionalOptimizer,
        meta: Mapping[str, Tensor],
    ):
        named = list(params.named_parameters()) if isinstance(params, nn.Module) else list(params)
        if not named:
            raise ConfigError("LearnedOptimizer got no parameters")
        super().__init__([p for _, p in named], defaults={})
        self._named = named
        self._fopt = optimizer
        ref = named[0][1]
        self._meta = {k: v.detach().to(device=ref.device, dtype=ref.dtype) for k, v in meta.items()}
        self._fstate = optimizer.init({n: p.detach() for n, p in named})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = {n: p.detach() for n, p in self._named}
        grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in self._named}
        new, self._fstate = self._fopt.update(self._meta, self._fstate, params, grads)
        for n, p in self._named:
            p.copy_(new[n])
        return loss
