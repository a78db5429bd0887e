"""Batched training of a chunk of zoo members that share an architecture, with per-member hyperparameters.

All members of a chunk train at once: their parameters live in one flat (M, P) tensor, a loss-and-gradient function of
one member is vmapped over members with `torch.func` (`functional_call` + `grad_and_value`; the `cnn` and the
`gru_seq2seq` run on the stacked parameters directly instead, with batched products and plain autograd:
`pipeline.zoo.batched_cnn`, `pipeline.zoo.batched_seq2seq`, the same functions and gradients up to float rounding),
and the optimizer steps
(OPTIMIZERS: sgd, momentum, nesterov, adam, adamw, rmsprop, adagrad, adamax, each as its torch.optim namesake) are
vectorized tensor math on explicit state (`init` / `update` pairs). Categorical choices (optimizer, activation, batch
size, init scheme, lr schedule; a width sets the arch) are fixed per chunk; continuous ones (lr, weight_decay,
init_std, dropout, train_fraction, label_noise, shift, epochs) are per-member tensors.

Semantics (the docs' "Zoo engine" section says the same):
- Randomness: a member's init, training subset, data order, dropout masks, noisy labels and shift offsets derive from
  its seed only (`member_seed(zoo_seed, index)`, one stream each), never from its chunk-mates. Same job + seeds +
  thread settings -> bit-identical results; a member trained in another chunk composition agrees to float rounding.
- Epochs: one epoch is one pass over the member's own subset (round(train_fraction * n_train) samples, at least 1)
  in batches of `batch_size`, the last one partial. Members with fewer steps per epoch simply skip the remaining steps
  of that epoch (internally members are sorted by steps per epoch and each step trains a prefix of them). A member
  with `epochs` below the job's stops after its own last epoch (its lr schedule spans its own run); its later
  checkpoints hold its final weights.
- Init: `init_member_weights` (trunc_normal with init_std by default; torch's Linear/Conv2d default, kaiming, xavier,
  orthogonal).
- Label noise: a share of the member's subset gets a wrong label for the whole run (train_* metrics use those labels).
  Shift: each training image moves by (dy, dx) uniform in [-shift, shift] pixels, zeros shifted in.
- Divergence: a member whose training loss or updated weights are non-finite is frozen (the bad update is not applied)
  and flagged with `diverged_epoch` = the epoch in which it happened (0: at init). Its stored weights and metrics at
  every checkpoint from that epoch on are NaN; earlier checkpoints are kept. It never affects its chunk-mates.
- Metrics per checkpoint (eval mode, no dropout): train_* on the member's own training subset, test_* on the whole
  test set. *_acc is accuracy (classification) or success rate (seq2seq: every answer token right under teacher
  forcing, which equals greedy decoding); *_token_acc is per-token accuracy (equal to *_acc for classification);
  *_loss is mean cross-entropy per sample (per answer token for seq2seq).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from pipeline.device import resolve_device
from pipeline.errors import ConfigError
from pipeline.zoo.batched_cnn import BatchedCNN
from pipeline.zoo.batched_seq2seq import BatchedSeq2Seq
from pipeline.zoo.members import _GOLDEN, _M31, MemberConv2d, MemberDropout, _mix32, build_member, resolve_arch
from pipeline.zoo.tasks import Task

__all__ = [
    "CATEGORICAL_HPARAMS",
    "CONTINUOUS_HPARAMS",
    "HPARAM_DEFAULTS",
    "REQUIRED_HPARAMS",
    "OPTIMIZERS",
    "METRIC_NAMES",
    "HELD_OUT_OPTIMIZERS",
    "INIT_SCHEMES",
    "HELD_OUT_INITS",
    "SCHEDULES",
    "MOMENTUM",
    "ADAM_BETAS",
    "ADAM_EPS",
    "RMSPROP_ALPHA",
    "ADAGRAD_EPS",
    "lr_factors",
    "check_task_options",
    "noisy_labels",
    "shift_offsets",
    "ChunkJob",
    "PopulationResult",
    "MemberDataOrder",
    "member_seed",
    "init_member_weights",
    "dropout_noise_key",
    "train_population",
    "train_member_reference",
]

# One value per chunk. New names go last: a recipe's per-chunk combinations are enumerated in this order.
CATEGORICAL_HPARAMS: tuple[str, ...] = ("optimizer", "activation", "batch_size", "init", "schedule", "width")
# One value per member (each drawn from its own random stream, so adding names leaves earlier draws unchanged).
CONTINUOUS_HPARAMS: tuple[str, ...] = (
    "lr", "weight_decay", "init_std", "dropout", "train_fraction", "label_noise", "shift", "epochs"
)
HPARAM_DEFAULTS: dict[str, float] = {
    "weight_decay": 0.0, "init_std": 0.1, "dropout": 0.0, "train_fraction": 1.0, "label_noise": 0.0, "shift": 0.0
}  # "epochs" defaults to the job's epochs
REQUIRED_HPARAMS: tuple[str, ...] = ("lr", "optimizer", "batch_size")
# sgd/momentum/nesterov/adam/rmsprop/adagrad/adamax: coupled L2 weight decay (as torch.optim's weight_decay);
# adamw: decoupled (p *= 1 - lr * weight_decay, as torch.optim.AdamW).
OPTIMIZERS: tuple[str, ...] = ("sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop", "adagrad", "adamax")
# Families no shipped default recipe uses: kept for "foreign" zoos that test predictors on unseen training recipes.
HELD_OUT_OPTIMIZERS: tuple[str, ...] = ("adagrad", "adamax")
INIT_SCHEMES: tuple[str, ...] = (
    "trunc_normal", "torch", "kaiming_normal", "kaiming_uniform", "xavier_normal", "xavier_uniform", "orthogonal"
)
HELD_OUT_INITS: tuple[str, ...] = ("orthogonal",)
SCHEDULES: tuple[str, ...] = ("constant", "cosine", "step", "warmup")
RMSPROP_ALPHA = 0.99
ADAGRAD_EPS = 1e-10
STEP_DECAY = 0.1  # "step": lr x 0.1 from epoch floor(E/2) on, x 0.01 from floor(3E/4) on (E: the member's epochs)
WARMUP_SHARE = 0.1  # "warmup": linear from lr/W to lr over the first W = max(1, round(0.1 x total steps)) steps
METRIC_NAMES: tuple[str, ...] = ("train_loss", "train_acc", "test_loss", "test_acc", "train_token_acc", "test_token_acc")
MOMENTUM = 0.9
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8

# Domains of the continuous hyperparameters: (low, high, low inclusive, high inclusive).
_RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "lr": (0.0, math.inf, False, False),
    "weight_decay": (0.0, math.inf, True, False),
    "init_std": (0.0, math.inf, False, False),
    "dropout": (0.0, 1.0, True, False),
    "train_fraction": (0.0, 1.0, False, True),
    "label_noise": (0.0, 1.0, True, False),
    "shift": (0.0, math.inf, True, False),
    "epochs": (1.0, math.inf, True, False),
}
_INTEGER_HPARAMS = ("shift", "epochs")  # per-member values that must be whole numbers
_STREAM_INIT, _STREAM_DATA, _STREAM_NOISE, _STREAM_LABELS, _STREAM_SHIFT = 0, 1, 2, 3, 4  # independent streams
_SHIFT_SALT = 0x5A1F  # counter-noise salt of the shift offsets (dropout layers use salts 0, 1, 2, ...)
_EVAL_ROWS = 1 << 13  # members x samples per evaluation call: activations that stay in cache (1 << 16 cost the GRU
# zoo's evaluation ~25% more CPU time), and at least _EVAL_MIN_ROWS samples per call (bounds per-call overhead)
_EVAL_MIN_ROWS = 64


# ------------------------------------------------------------------------------------------------- seeds, data


def member_seed(zoo_seed: int, member_index: int) -> int:
    """The seed of member `member_index` of a zoo with seed `zoo_seed` (a non-negative 63-bit int)."""
    if zoo_seed < 0 or member_index < 0:
        raise ConfigError(f"seeds and member indices must be non-negative; got {zoo_seed}, {member_index}")
    return int(np.random.SeedSequence([int(zoo_seed), int(member_index)]).generate_state(1, np.uint64)[0] >> 1)


def _stream_seed(seed: int, stream: int) -> int:
    return int(np.random.SeedSequence([int(seed), stream]).generate_state(1, np.uint64)[0] >> 1)


class MemberDataOrder:
    """A member's training subset (sorted indices) and, epoch after epoch, its shuffled order, from its seed alone."""

    def __init__(self, seed: int, n_train: int, train_fraction: float) -> None:
        self._rng = np.random.default_rng(_stream_seed(seed, _STREAM_DATA))
        n = min(n_train, max(1, int(math.floor(train_fraction * n_train + 0.5))))
        self.subset = np.sort(self._rng.permutation(n_train)[:n])  # (n,)

    def epoch(self) -> np.ndarray:
        """The next epoch's order of the subset's indices."""
        return self._rng.permutation(self.subset)


def dropout_noise_key(seed: int | torch.Tensor, epoch: int, step: int) -> torch.Tensor:
    """The int32 key of a member's dropout noise at (epoch, step of that epoch); `seed` may be a tensor of seeds'
    noise bases (as the engine holds them) or a member seed."""
    base = seed if isinstance(seed, torch.Tensor) else torch.tensor(_noise_base(int(seed)), dtype=torch.int32)
    when = _mix32(torch.tensor(((epoch * 1_000_003) ^ step) & _M31, dtype=torch.int32, device=base.device))
    return _mix32(base ^ when)


def _noise_base(seed: int) -> int:
    return _stream_seed(seed, _STREAM_NOISE) & _M31


def init_member_weights(
    module: nn.Module, init_std: float, seed: int, scheme: str = "trunc_normal"
) -> dict[str, torch.Tensor]:
    """A member's initial parameters (CPU float32, keyed like named_parameters), drawn from its init stream in
    parameter order. LayerNorm gains are 1. Weights with >= 2 dims (fans as torch.nn.init computes them):

    - trunc_normal (default): init_std * truncated normal in [-2, 2]; every vector 0;
    - torch: nn.Linear / nn.Conv2d's reset_parameters: kaiming_uniform(a=sqrt(5)), and a bias next to its weight
      (`x.bias` / `x.weight`, `bias_ih_l0` / `weight_ih_l0`) ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)); other vectors 0;
    - kaiming_normal, kaiming_uniform (fan_in, ReLU gain), xavier_normal, xavier_uniform, orthogonal: that
      torch.nn.init function (default arguments); vectors 0.

    `init_std` is used by trunc_normal only.
    """
    if scheme not in INIT_SCHEMES:
        raise ConfigError(f"init scheme {scheme!r} is unknown; allowed: {', '.join(INIT_SCHEMES)}")
    gen = torch.Generator().manual_seed(_stream_seed(seed, _STREAM_INIT))
    gains = {f"{name}.weight" if name else "weight" for name, m in module.named_modules() if isinstance(m, nn.LayerNorm)}
    shapes = dict((n, p.shape) for n, p in module.named_parameters())
    init = nn.init
    draw = {
        "kaiming_normal": lambda t: init.kaiming_normal_(t, generator=gen),
        "kaiming_uniform": lambda t: init.kaiming_uniform_(t, generator=gen),
        "xavier_normal": lambda t: init.xavier_normal_(t, generator=gen),
        "xavier_uniform": lambda t: init.xavier_uniform_(t, generator=gen),
        "orthogonal": lambda t: init.orthogonal_(t, generator=gen),
        "torch": lambda t: init.kaiming_uniform_(t, a=math.sqrt(5), generator=gen),
    }
    out = {}
    for name, p in module.named_parameters():
        if name in gains:
            out[name] = torch.ones(p.shape)
        elif p.dim() >= 2:
            if scheme == "trunc_normal":
                t = torch.nn.init.trunc_normal_(torch.empty(p.shape), 0.0, 1.0, -2.0, 2.0, generator=gen)
                out[name] = t * torch.tensor(init_std, dtype=torch.float32)
            else:
                out[name] = draw[scheme](torch.empty(p.shape))
        elif scheme == "torch" and _weight_of(name) in shapes and len(shapes[_weight_of(name)]) >= 2:
            fan_in, _ = init._calculate_fan_in_and_fan_out(torch.empty(shapes[_weight_of(name)]))
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            out[name] = init.uniform_(torch.empty(p.shape), -bound, bound, generator=gen)
        else:
            out[name] = torch.zeros(p.shape)
    return out


def _weight_of(bias_name: str) -> str:
    """The weight next to a bias: `head.bias` -> `head.weight`, `encoder.bias_ih_l0` -> `encoder.weight_ih_l0`."""
    head, _, last = bias_name.rpartition(".")
    last = last.replace("bias", "weight", 1)
    return f"{head}.{last}" if head else last


def lr_factors(schedule: str, epoch: int, step: int | np.ndarray, steps: np.ndarray, epochs: np.ndarray) -> np.ndarray:
    """Per-member learning-rate factors (float64) for the update at `step` (0-based) of `epoch` (1-based), for
    members with `steps` (M,) steps per epoch and `epochs` (M,) epochs in their run:

    constant 1; cosine 0.5 (1 + cos(pi t / T)) with t the member's 0-based update count and T = epochs x steps;
    step 0.1 ** (number of milestones floor(E/2), floor(3E/4) (those > 0) that epoch - 1 has reached);
    warmup min(1, (t + 1) / W), W = max(1, round(0.1 T))."""
    steps, epochs = np.asarray(steps, dtype=np.float64), np.asarray(epochs, dtype=np.float64)
    t = (epoch - 1) * steps + np.asarray(step, dtype=np.float64)
    total = epochs * steps
    if schedule == "constant":
        return np.ones_like(t)
    if schedule == "cosine":
        return 0.5 * (1.0 + np.cos(np.pi * t / total))
    if schedule == "step":
        passed = np.zeros_like(t)
        for share in (0.5, 0.75):
            milestone = np.floor(epochs * share)
            passed += (milestone > 0) & (epoch - 1 >= milestone)
        return STEP_DECAY**passed
    if schedule == "warmup":
        width = np.maximum(1.0, np.round(WARMUP_SHARE * total))
        return np.minimum(1.0, (t + 1.0) / width)
    raise ConfigError(f"schedule {schedule!r} is unknown; allowed: {', '.join(SCHEDULES)}")


def noisy_labels(seed: int, y: torch.Tensor, subset: np.ndarray, share: float, num_classes: int) -> torch.Tensor:
    """A member's training labels with label noise: round(share x |subset|) samples of its subset, drawn from its
    label stream, get a uniformly drawn *other* class. Returns a copy of `y` (n_train,)."""
    out = y.clone()
    n = int(math.floor(share * len(subset) + 0.5))
    if n == 0 or num_classes < 2:
        return out
    rng = np.random.default_rng(_stream_seed(seed, _STREAM_LABELS))
    picked = np.sort(rng.choice(subset, size=n, replace=False))
    offset = rng.integers(1, num_classes, size=n)
    idx = torch.from_numpy(picked)
    out[idx] = (out[idx] + torch.from_numpy(offset).to(out.dtype)) % num_classes
    return out


def shift_offsets(keys: torch.Tensor, shifts: torch.Tensor, batch: int) -> torch.Tensor:
    """Random-shift offsets (k, batch, 2) int64 (dy, dx), each uniform in [-s, s] for a member's max shift s, from
    int32 counter-noise `keys` (k,) (as `dropout_noise_key` of the member's shift base) and `shifts` (k,) int64."""
    idx = torch.arange(batch * 2, device=keys.device, dtype=torch.int32).view(1, batch, 2)
    base = _mix32(keys ^ (_SHIFT_SALT * 0x2545F491 & _M31))[:, None, None]  # (k, 1, 1)
    bits = (_mix32(idx * _GOLDEN ^ base) >> 8) & 0xFFFFFF  # (k, batch, 2), 24 random bits
    span = (2 * shifts + 1)[:, None, None]
    return (bits.to(torch.int64) * span >> 24) - shifts[:, None, None]


def _shift_base(seed: int) -> int:
    return _stream_seed(seed, _STREAM_SHIFT) & _M31


# ---------------------------------------------------------------------------------------------------- job / result


@dataclass(frozen=True)
class ChunkJob:
    """What a chunk trains: resolved arch (incl. activation), task, optimizer, batch size, epochs, checkpoints,
    init scheme (INIT_SCHEMES) and learning-rate schedule (SCHEDULES).

    The arch is resolved against the task on construction; `checkpoint_epochs` is normalized to a sorted tuple that
    contains 0 and `epochs`. `epochs` is the run's length; members may stop earlier (per-member hparam "epochs").
    """

    arch: dict
    task: Task
    optimizer: str
    batch_size: int
    epochs: int
    checkpoint_epochs: tuple[int, ...] = ()
    init: str = "trunc_normal"
    schedule: str = "constant"

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer {self.optimizer!r} is unknown; allowed: {', '.join(OPTIMIZERS)}")
        if self.init not in INIT_SCHEMES:
            raise ConfigError(f"init scheme {self.init!r} is unknown; allowed: {', '.join(INIT_SCHEMES)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule {self.schedule!r} is unknown; allowed: {', '.join(SCHEDULES)}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, (int, np.integer)) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer; got {self.batch_size!r}")
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, (int, np.integer)) or self.epochs < 0:
            raise ConfigError(f"epochs must be a non-negative integer; got {self.epochs!r}")
        bad = [e for e in self.checkpoint_epochs if not 0 <= int(e) <= self.epochs]
        if bad:
            raise ConfigError(f"checkpoint epoch {bad[0]} is outside [0, {self.epochs}] (epochs = {self.epochs})")
        object.__setattr__(self, "arch", resolve_arch(self.arch, self.task))
        object.__setattr__(self, "batch_size", int(self.batch_size))
        object.__setattr__(self, "epochs", int(self.epochs))
        epochs = sorted({0, self.epochs, *(int(e) for e in self.checkpoint_epochs)})
        object.__setattr__(self, "checkpoint_epochs", tuple(epochs))


@dataclass(frozen=True)
class PopulationResult:
    """Per member m and checkpoint c (c indexes job.checkpoint_epochs): weights[key] (M, C, *shape) float32,
    metrics[name] (M, C) float32 (METRIC_NAMES), diverged (M,) bool, diverged_epoch (M,) int32 (-1: never)."""

    weights: dict[str, np.ndarray]
    metrics: dict[str, np.ndarray]
    diverged: np.ndarray
    diverged_epoch: np.ndarray
    checkpoint_epochs: tuple[int, ...] = field(default=())


# ------------------------------------------------------------------------------------------- losses and metrics


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the last dim, per row (F.cross_entropy(reduction="none")'s values): logsumexp minus the
    target's logit. On a CPU, log_softmax over a short last dim (ten classes, fifteen tokens) runs ~6x slower."""
    return logits.logsumexp(-1) - logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _sample_stats(kind: str, out: torch.Tensor, y: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Per-sample (loss sum, tokens, correct tokens, success) as (B, 4) from model outputs and targets."""
    if kind == "seq2seq":
        mask = (y != pad_id).to(out.dtype)  # (B, T)
        tok_loss = _nll(out, y)  # (B, T)
        tokens = mask.sum(1)
        correct = ((out.argmax(-1) == y).to(out.dtype) * mask).sum(1)
        return torch.stack([(tok_loss * mask).sum(1), tokens, correct, (correct == tokens).to(out.dtype)], dim=1)
    loss = _nll(out, y)  # (B,)
    correct = (out.argmax(-1) == y).to(out.dtype)
    return torch.stack([loss, torch.ones_like(loss), correct, correct], dim=1)


def _run_model(model: nn.Module, kind: str, params: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    args = (x, y) if kind == "seq2seq" else (x,)
    return functional_call(model, params, args) if params is not None else model(*args)


def _metrics_from_sums(sums: torch.Tensor, samples: torch.Tensor) -> dict[str, torch.Tensor]:
    """(M, 4) sums of _sample_stats and (M,) sample counts -> loss, acc, token_acc per member."""
    return {"loss": sums[:, 0] / sums[:, 1], "acc": sums[:, 3] / samples, "token_acc": sums[:, 2] / sums[:, 1]}


# ------------------------------------------------------------------------------------- vectorized optimizers


@dataclass(frozen=True)
class _Optimizer:
    """init(flat params (M, P)) -> state; update(p (k, P), g (k, P), state (prefix), hp) -> (new p, new state)."""

    init: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    update: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]


def _decayed(p: torch.Tensor, g: torch.Tensor, hp: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.addcmul(g, hp["weight_decay"], p)  # g + wd * p: coupled L2, as torch.optim's weight_decay (one pass)


def _sgd_update(p, g, state, hp):
    return p + (-hp["lr"]) * _decayed(p, g, hp), state


def _momentum_update(p, g, state, hp):
    buf = state["buf"] * MOMENTUM + _decayed(p, g, hp)  # first step: 0 * 0.9 + g, as torch's clone(g)
    return p + (-hp["lr"]) * buf, {"buf": buf}


def _adam_update(p, g, state, hp):
    return _adam_step(p, _decayed(p, g, hp), state, hp)


def _adam_step(p, g, state, hp):
    """Adam's moment and parameter update for the (decayed) gradient g."""
    b1, b2 = ADAM_BETAS
    m = torch.lerp(state["m"], g, 1 - b1)
    v = state["v"].mul(b2).addcmul_(g, g, value=1 - b2)  # in place on fresh temporaries: same values, fewer passes
    step = state["step"] + 1  # (k,) float64
    neg_step_size = (-hp["lr64"] / (1 - b1**step)).to(p.dtype)[:, None]  # (k, 1)
    denom = v.sqrt().div_(torch.sqrt(1 - b2**step).to(p.dtype)[:, None]).add_(ADAM_EPS)  # (k, P)
    return torch.addcdiv(p, neg_step_size * m, denom), {"m": m, "v": v, "step": step}


def _nesterov_update(p, g, state, hp):
    g = _decayed(p, g, hp)
    buf = state["buf"] * MOMENTUM + g
    return p + (-hp["lr"]) * (g + MOMENTUM * buf), {"buf": buf}


def _adamw_update(p, g, state, hp):
    p = p * (1 - hp["lr"] * hp["weight_decay"])  # decoupled decay, then Adam without L2
    return _adam_step(p, g, state, hp)


def _rmsprop_update(p, g, state, hp):
    g = _decayed(p, g, hp)
    sq = state["sq"].mul(RMSPROP_ALPHA).addcmul(g, g, value=1 - RMSPROP_ALPHA)
    return p + (-hp["lr"]) * g / (sq.sqrt() + ADAM_EPS), {"sq": sq}


def _adagrad_update(p, g, state, hp):
    g = _decayed(p, g, hp)
    acc = state["sum"].addcmul(g, g)
    return p + (-hp["lr"]) * g / (acc.sqrt() + ADAGRAD_EPS), {"sum": acc}


def _adamax_update(p, g, state, hp):
    g = _decayed(p, g, hp)
    b1, b2 = ADAM_BETAS
    m = torch.lerp(state["m"], g, 1 - b1)
    u = torch.maximum(state["u"] * b2, g.abs() + ADAM_EPS)
    step = state["step"] + 1  # (k,) float64
    neg_step_size = (-hp["lr64"] / (1 - b1**step)).to(p.dtype)[:, None]  # (k, 1)
    return p + neg_step_size * m / u, {"m": m, "u": u, "step": step}


def _zeros(*names: str) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """Optimizer state: a zero (M, P) tensor per name and, for names ending in 'step', a (M,) float64 counter."""
    return lambda p: {n: p.new_zeros(len(p), dtype=torch.float64) if n == "step" else torch.zeros_like(p) for n in names}


_OPTIMIZERS: dict[str, _Optimizer] = {
    "sgd": _Optimizer(lambda p: {}, _sgd_update),
    "momentum": _Optimizer(_zeros("buf"), _momentum_update),
    "nesterov": _Optimizer(_zeros("buf"), _nesterov_update),
    "adam": _Optimizer(_zeros("m", "v", "step"), _adam_update),
    "adamw": _Optimizer(_zeros("m", "v", "step"), _adamw_update),
    "rmsprop": _Optimizer(_zeros("sq"), _rmsprop_update),
    "adagrad": _Optimizer(_zeros("sum"), _adagrad_update),
    "adamax": _Optimizer(_zeros("m", "u", "step"), _adamax_update),
}


# ----------------------------------------------------------------------------------------------- the engine


def _check_inputs(hparams: Mapping[str, Any], seeds: Any) -> tuple[dict[str, np.ndarray], np.ndarray]:
    seeds = np.asarray(seeds)
    if seeds.ndim != 1 or len(seeds) == 0 or not np.issubdtype(seeds.dtype, np.integer) or (seeds < 0).any():
        raise ConfigError(f"seeds must be a non-empty 1-d array of non-negative integers; got shape {seeds.shape}")
    unknown = sorted(set(hparams) - set(CONTINUOUS_HPARAMS))
    if unknown:
        raise ConfigError(
            f"hyperparameter {unknown[0]!r} is not a per-member one; allowed: {', '.join(CONTINUOUS_HPARAMS)} "
            "(optimizer, activation and batch size belong to the ChunkJob)"
        )
    if "lr" not in hparams:
        raise ConfigError("hyperparameter 'lr' is required (one value per member)")
    out = {}
    for name in CONTINUOUS_HPARAMS:
        if name not in hparams and name not in HPARAM_DEFAULTS:
            continue  # "epochs": the job's, filled in by the caller
        values = np.asarray(hparams.get(name, HPARAM_DEFAULTS.get(name)), dtype=np.float64)
        values = np.broadcast_to(values, seeds.shape) if values.ndim == 0 else values
        if values.shape != seeds.shape:
            raise ConfigError(f"hyperparameter {name!r} has shape {values.shape}; expected ({len(seeds)},), one per member")
        lo, hi, lo_in, hi_in = _RANGES[name]
        ok = np.isfinite(values) & ((values > lo) | (lo_in & (values == lo))) & ((values < hi) | (hi_in & (values == hi)))
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            interval = f"{'[' if lo_in else '('}{lo}, {hi}{']' if hi_in else ')'}"
            raise ConfigError(f"hyperparameter {name!r} of member {i} is {float(values[i])!r}; must be in {interval}")
        if name in _INTEGER_HPARAMS and (values != np.round(values)).any():
            i = int(np.flatnonzero(values != np.round(values))[0])
            raise ConfigError(f"hyperparameter {name!r} of member {i} is {float(values[i])!r}; must be a whole number")
        out[name] = values
    return out, seeds.astype(np.int64)


def _numpy_dtype(dtype: torch.dtype) -> type:
    if dtype not in (torch.float32, torch.float64):
        raise ConfigError(f"dtype must be torch.float32 or torch.float64; got {dtype}")
    return np.float32 if dtype == torch.float32 else np.float64


def _task_arrays(task: Task, dev: torch.device, dtype: torch.dtype) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """(x, y) of the train and test split on `dev`, float inputs in `dtype` (token inputs stay integers)."""
    cast = lambda t: t.to(dev, dtype) if t.is_floating_point() else t.to(dev)  # noqa: E731
    return (cast(task.x_train), task.y_train.to(dev)), (cast(task.x_test), task.y_test.to(dev))


def _member_options(job: ChunkJob, hp: dict[str, np.ndarray]) -> None:
    """Fill the per-member "epochs" (default: the job's) and check the options the job's task must support."""
    epochs = hp.setdefault("epochs", np.full(len(hp["lr"]), float(job.epochs)))
    if (epochs > max(job.epochs, 1)).any():
        i = int(np.flatnonzero(epochs > job.epochs)[0])
        raise ConfigError(f"hyperparameter 'epochs' of member {i} is {int(epochs[i])}; the run has {job.epochs} epochs")
    check_task_options(job.task, bool((hp["label_noise"] > 0).any()), bool((hp["shift"] > 0).any()))


def check_task_options(task: Task, label_noise: bool, shift: bool) -> None:
    """Raise ConfigError if `task` cannot take label noise (classification only) or random shifts (images only)."""
    if label_noise and task.kind != "classification":
        raise ConfigError(f"label_noise needs a classification task; {task.name!r} is {task.kind}")
    if shift and len(task.info.get("input_shape", ())) != 3:
        raise ConfigError(f"shift (random-shift augmentation) needs an image task (C, H, W); {task.name!r} is not")


def _shifted(padded: torch.Tensor, bidx: torch.Tensor, offsets: torch.Tensor, pad: int) -> torch.Tensor:
    """Images `bidx` (k, B) of `padded` (N, C, H + 2 pad, W + 2 pad) moved by `offsets` (k, B, 2) = (dy, dx)
    pixels, zeros shifted in: out[..., i, j] = image[..., i - dy, j - dx]. Returns (k, B, C, H, W)."""
    n, c, hp, wp = padded.shape
    h, w = hp - 2 * pad, wp - 2 * pad
    rows = torch.arange(h, device=padded.device) + pad - offsets[..., :1]  # (k, B, H)
    cols = torch.arange(w, device=padded.device) + pad - offsets[..., 1:]  # (k, B, W)
    pixel = rows[..., :, None] * wp + cols[..., None, :]  # (k, B, H, W) flat position in a padded channel
    start = bidx[..., None] * (c * hp * wp) + torch.arange(c, device=padded.device) * (hp * wp)  # (k, B, C)
    return padded.take(start[..., None, None] + pixel[..., None, :, :])  # one flat gather, contiguous (k, B, C, H, W)


def _template(job: ChunkJob, device: torch.device, batched: bool, dtype: torch.dtype) -> tuple[nn.Module, list[str]]:
    """The member module used as a functional template, and the names of its dropout modules."""
    model = build_member(job.arch).to(device, dtype)
    drops = []
    for name, m in model.named_modules():
        if isinstance(m, MemberConv2d):
            m.batched_forward = batched
        if isinstance(m, MemberDropout):
            drops.append(name)
    return model, drops


def train_population(
    job: ChunkJob,
    hparams: Mapping[str, np.ndarray],
    seeds: np.ndarray,
    device: str | torch.device = "auto",
    *,
    progress: Callable[[int, int], None] | None = None,
    dtype: torch.dtype = torch.float32,
) -> PopulationResult:
    """Train members with seeds `seeds` (M,) and per-member `hparams` (CONTINUOUS_HPARAMS -> (M,) arrays; all but
    'lr' default to HPARAM_DEFAULTS, 'epochs' to job.epochs) for `job`, all at once on `device`.
    `progress(epoch, epochs)` after each epoch. `dtype` float64 (weights and math; results then float64 too) serves
    exact comparisons with the plain loop."""
    hp, seeds = _check_inputs(hparams, seeds)
    _member_options(job, hp)
    np_dtype = _numpy_dtype(dtype)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    task, kind, bsz = job.task, job.task.kind, job.batch_size
    pad_id = int(task.info.get("pad_id", 0))
    n_mem, n_train = len(seeds), len(task.y_train)
    model, drop_names = _template(job, dev, batched=True, dtype=dtype)
    use_noise = bool((hp["dropout"] > 0).any())
    for name in drop_names:
        model.get_submodule(name).counter_noise = use_noise

    # Data plans; members are sorted by steps per epoch (descending) so every step trains a prefix of them.
    plans = [MemberDataOrder(int(s), n_train, float(f)) for s, f in zip(seeds, hp["train_fraction"])]
    steps = np.array([-(-len(p.subset) // bsz) for p in plans])
    order = np.argsort(-steps, kind="stable")  # internal position -> member
    plans = [plans[i] for i in order]
    steps = steps[order]
    active = [int((steps > s).sum()) for s in range(int(steps.max()))]  # members trained at step s of an epoch
    run_epochs = hp["epochs"][order].astype(np.int64)  # (M,) internal order

    # Flat parameters (M, P) in internal order and their per-tensor views.
    names, shapes = zip(*[(n, tuple(p.shape)) for n, p in model.named_parameters()])
    sizes = [math.prod(s) for s in shapes]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    flat = torch.stack(
        [
            torch.cat(
                [
                    t.reshape(-1)
                    for t in init_member_weights(model, float(hp["init_std"][i]), int(seeds[i]), job.init).values()
                ]
            )
            for i in order
        ]
    ).to(dev, dtype)  # (M, P)

    def views(rows: torch.Tensor) -> dict[str, torch.Tensor]:
        k = rows.shape[0]
        return {n: rows[:, offsets[j] : offsets[j + 1]].view(k, *shapes[j]) for j, n in enumerate(names)}

    (x_train, y_train), (x_test, y_test) = _task_arrays(task, dev, dtype)
    per_member = lambda a: torch.as_tensor(a[order], dtype=dtype, device=dev)  # noqa: E731
    hps = {
        "lr": per_member(hp["lr"])[:, None],
        "lr64": torch.as_tensor(hp["lr"][order], dtype=torch.float64, device=dev),
        "weight_decay": per_member(hp["weight_decay"])[:, None],
    }
    rates = per_member(hp["dropout"])
    noise_base = torch.tensor([_noise_base(int(seeds[i])) for i in order], dtype=torch.int32, device=dev)
    subset_mask = torch.zeros(n_mem, n_train, dtype=torch.bool)
    for r, p in enumerate(plans):
        subset_mask[r, torch.from_numpy(p.subset)] = True
    subset_mask = subset_mask.to(dev)
    # Label noise: per-member training labels (M, n_train), else the shared ones.
    y_member = None
    if (hp["label_noise"] > 0).any():
        n_cls = int(task.info["num_classes"])
        y_member = torch.stack(
            [noisy_labels(int(seeds[i]), task.y_train, plans[r].subset, float(hp["label_noise"][i]), n_cls) for r, i in enumerate(order)]
        ).to(dev)
    # Random-shift augmentation: zero-padded images and per-member max shifts and noise bases.
    max_shift = int(hp["shift"].max())
    if max_shift > 0:
        x_padded = F.pad(x_train, (max_shift,) * 4)
        shifts = torch.as_tensor(hp["shift"][order], dtype=torch.int64, device=dev)
        shift_base = torch.tensor([_shift_base(int(seeds[i])) for i in order], dtype=torch.int32, device=dev)
    scheduled = job.schedule != "constant"

    opt = _OPTIMIZERS[job.optimizer]
    state = opt.init(flat)
    alive = torch.ones(n_mem, dtype=torch.bool, device=dev)
    dead_epoch = torch.full((n_mem,), -1, dtype=torch.int64, device=dev)

    def member_loss(params, rate, key, xb, yb, wb):
        buffers = {f"{d}.{b}": v for d in drop_names for b, v in (("rate", rate), ("noise_key", key))} if use_noise else {}
        stats = _sample_stats(kind, _run_model(model, kind, (params, buffers), xb, yb), yb, pad_id)  # (B, 4)
        return (stats[:, 0] * wb).sum() / (stats[:, 1] * wb).sum()

    step_fn = vmap(grad_and_value(member_loss), randomness="error")
    # The CNN and the GRU seq2seq run on the stacked parameters directly (batched products, no vmap): the same
    # functions, faster (under vmap the GRU's time loop is mostly the batching layer's per-op cost).
    cnn = BatchedCNN(job.arch, tuple(task.info["input_shape"]), dev) if job.arch["name"] == "cnn" else None
    seq2seq = BatchedSeq2Seq(job.arch) if job.arch["name"] == "gru_seq2seq" else None

    # The CNN's first-layer patches of every training image, computed once, and with random shifts of every shifted
    # copy (offset (dy, dx) at rows ((dy + S) * (2S + 1) + dx + S) * n_train); a step gathers its rows. None: no
    # CNN, or too large a table (a step then gathers its patches from its images).
    patch_table = None
    if cnn is not None:
        span = 2 * max_shift + 1
        if max_shift == 0:
            patch_table = cnn.first_patches(x_train)
        elif cnn.fits_patch_table(span * span * n_train, x_train.element_size()):
            every = torch.arange(n_train, device=dev)[None, :]
            copies = [_shifted(x_padded, every, torch.tensor([dy, dx], device=dev).expand(1, n_train, 2), max_shift)[0]
                      for dy in range(-max_shift, max_shift + 1) for dx in range(-max_shift, max_shift + 1)]
            patch_table = cnn.first_patches(torch.cat(copies))

    def batched_step(p: torch.Tensor, rate: torch.Tensor, key: torch.Tensor, xb, yb, wb) -> tuple[torch.Tensor, torch.Tensor]:
        """(grads (k, P), losses (k,)) of the members with flat params `p` (k, P), as step_fn's vmapped loss, on the
        batched CNN or GRU seq2seq."""
        leaves = {n: t.requires_grad_() for n, t in views(p.detach()).items()}  # one leaf per tensor: views, no copy
        noise = (rate, key) if use_noise else ()
        with torch.enable_grad():
            if cnn is not None:
                per = _nll(cnn(leaves, xb, *noise), yb)  # (k, B) cross-entropy
                loss = (per * wb).sum(1) / wb.sum(1)
            else:  # masked token loss sum / token count, as member_loss
                tok = _nll(seq2seq(leaves, xb, yb, *noise), yb)  # (k, B, T)
                mask = (yb != pad_id).to(tok.dtype)
                loss = ((tok * mask).sum(2) * wb).sum(1) / (mask.sum(2) * wb).sum(1)
            grads = torch.autograd.grad(loss.sum(), list(leaves.values()))
        return torch.cat([g.reshape(len(p), -1) for g in grads], dim=1), loss.detach()

    def evaluate(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None, y_rows: torch.Tensor | None = None):
        """Metrics per member on (x, y); `y_rows` (M, n) per-member labels replace y when given. The batched CNN and
        GRU run a block of members at a time (their `eval_members`)."""
        model.eval()
        y_dim = None if y_rows is None else 0
        fast = cnn if cnn is not None else seq2seq
        block = min(n_mem, fast.eval_members or n_mem) if fast is not None else n_mem
        sums = torch.zeros(n_mem, 4, device=dev, dtype=dtype)
        for m0 in range(0, n_mem, block):
            members = slice(m0, min(n_mem, m0 + block))
            km = members.stop - m0
            params = views(flat[members])
            if fast is None:
                fwd = vmap(lambda p, xb, yb: _sample_stats(kind, _run_model(model, kind, p, xb, yb), yb, pad_id),
                           in_dims=(0, None, y_dim))
            else:  # the batched CNN or GRU seq2seq: same stats, no vmap (the CNN's matrices built once)
                outputs_of = fast.evaluator(params)

                def fwd(p, xb, yb, outputs_of=outputs_of, km=km):
                    yb = yb.expand(km, *yb.shape) if y_rows is None else yb  # (k, b[, T]) labels per member
                    logits = outputs_of(xb) if cnn is not None else outputs_of(xb, yb)  # (k, b[, T], outputs)
                    return _sample_stats(kind, logits.flatten(0, 1), yb.flatten(0, 1), pad_id).view(*yb.shape[:2], 4)

            rows = max(1, fast.eval_rows // km) if fast is not None else max(_EVAL_MIN_ROWS, _EVAL_ROWS // km)
            with torch.no_grad():
                for start in range(0, len(y), rows):
                    part = slice(start, start + rows)
                    yb = y[part] if y_rows is None else y_rows[members, part]
                    stats = fwd(params, x[part], yb)  # (k, b, 4)
                    if mask is not None:
                        stats = torch.where(mask[members, part, None], stats, 0.0)
                    sums[members] += stats.sum(1)
        model.train()
        samples = mask.sum(1).to(sums.dtype) if mask is not None else torch.full((n_mem,), float(len(y)), device=dev)
        return _metrics_from_sums(sums, samples)

    n_ck = len(job.checkpoint_epochs)
    weights_out = {n: np.full((n_mem, n_ck, *s), np.nan, dtype=np_dtype) for n, s in zip(names, shapes)}
    metrics_out = {n: np.full((n_mem, n_ck), np.nan, dtype=np_dtype) for n in METRIC_NAMES}

    back = np.argsort(order)  # original member -> internal row

    def checkpoint(c: int, epoch: int) -> None:
        train, test = evaluate(x_train, y_train, subset_mask, y_member), evaluate(x_test, y_test, None)
        finite = torch.isfinite(train["loss"]) & torch.isfinite(test["loss"])
        dead_epoch.masked_fill_(alive & ~finite, epoch)
        alive.logical_and_(finite)
        keep = alive.cpu().numpy()[back]  # (M,) original member order
        host = flat.cpu().numpy()[back]  # (M, P) original member order
        for j, n in enumerate(names):
            weights_out[n][keep, c] = host[keep, offsets[j] : offsets[j + 1]].reshape(-1, *shapes[j])
        for split, res in (("train", train), ("test", test)):
            for metric, values in res.items():
                metrics_out[f"{split}_{metric}"][keep, c] = values.cpu().numpy()[back][keep]

    def train_rows(flat: torch.Tensor, rows: slice | torch.Tensor, where: np.ndarray, epoch: int, s: int,
                   cols: slice) -> torch.Tensor:
        """Step `s` of `epoch` for the members at `rows` of `flat` (positions `where`): their gradients, optimizer
        update and divergence check; returns `flat` with those rows updated (a new tensor when they are all)."""
        k = len(where)
        bidx = idx_t[rows, cols]  # (k, B)
        keys = dropout_noise_key(noise_base[rows], epoch, s)
        moves = None  # (k, B, 2) shift offsets (dy, dx)
        if max_shift > 0:
            moves = shift_offsets(dropout_noise_key(shift_base[rows], epoch, s), shifts[rows], bsz)
        if patch_table is not None:  # (k, B, L*C*K): the (shifted) images' first-layer patches, rows of the table
            sample = bidx
            if moves is not None:  # the row of the shifted copy
                variant = (moves[..., 0] + max_shift) * (2 * max_shift + 1) + moves[..., 1] + max_shift
                sample = variant * n_train + bidx
            xb = patch_table.index_select(0, sample.reshape(-1)).view(*bidx.shape, -1)
        elif moves is not None:
            xb = _shifted(x_padded, bidx, moves, max_shift)
        else:
            xb = x_train[bidx]
        yb = y_train[bidx] if y_member is None else y_member[rows].gather(1, bidx)
        if cnn is not None or seq2seq is not None:
            g, loss = batched_step(flat[rows], rates[rows], keys, xb, yb, valid_t[rows, cols])
        else:
            grads, loss = step_fn(views(flat[rows]), rates[rows], keys, xb, yb, valid_t[rows, cols])
            g = torch.cat([grads[n].reshape(k, -1) for n in names], dim=1)  # (k, P)
        hp_k = {"lr": hps["lr"][rows], "lr64": hps["lr64"][rows], "weight_decay": hps["weight_decay"][rows]}
        if scheduled:
            factor = torch.as_tensor(lr_factors(job.schedule, epoch, s, steps[where], run_epochs[where]), device=dev)
            hp_k["lr64"] = hp_k["lr64"] * factor
            hp_k["lr"] = hp_k["lr64"].to(dtype)[:, None]
        old_p = flat[rows]
        old_state = {n: t[rows] for n, t in state.items()}
        new_p, new_state = opt.update(old_p, g, old_state, hp_k)
        was_alive = alive[rows]
        finite = torch.isfinite(new_p.sum(1))  # a finite sum has only finite terms: one pass, not four
        if not bool(finite.all()):  # some row has a non-finite value, or its sum overflowed: check exactly
            finite = torch.isfinite(new_p).all(dim=1)
        ok = was_alive & torch.isfinite(loss) & finite  # (k,)
        if not bool(ok.all()):  # freeze dead members: keep their last finite weights and optimizer state
            dead_epoch[rows] = torch.where(was_alive & ~ok, epoch, dead_epoch[rows])
            alive[rows] = ok
            new_p = torch.where(ok[:, None], new_p, old_p)
            new_state = {n: torch.where(ok.view(-1, *[1] * (t.dim() - 1)), t, old_state[n])
                         for n, t in new_state.items()}
        if k == n_mem:  # every row updated: the new tensors replace the old (no copy back)
            state.update(new_state)
            return new_p
        flat[rows] = new_p
        for n, t in new_state.items():
            state[n][rows] = t
        return flat

    # Members trained together in one batched step: on a CPU, blocks of the batched model's `step_members` (a
    # whole 256-member CNN chunk per product ran slower than 128-member blocks), elsewhere all of them at once.
    fast_model = cnn if cnn is not None else seq2seq
    step_block = n_mem
    if fast_model is not None and dev.type == "cpu":
        step_block = max(1, min(n_mem, fast_model.step_members(bsz) or n_mem))
    ck_index = {e: c for c, e in enumerate(job.checkpoint_epochs)}
    checkpoint(ck_index[0], 0)
    for epoch in range(1, job.epochs + 1):
        idx = np.zeros((n_mem, len(active) * bsz), dtype=np.int64)  # (M, S*B) sample indices, row = internal member
        valid = np.zeros(idx.shape, dtype=np_dtype)
        for r, p in enumerate(plans):
            seq = p.epoch()
            idx[r, : len(seq)] = seq
            valid[r, : len(seq)] = 1.0
        idx_t, valid_t = torch.from_numpy(idx).to(dev), torch.from_numpy(valid).to(dev)
        # Members whose run is over sit out (their state stays); while all train, each step trains a row prefix.
        running = np.flatnonzero(run_epochs >= epoch)
        everyone = len(running) == n_mem
        for s in range(len(active)):
            if everyone:
                k = active[s]
                blocks = [(slice(b0, min(k, b0 + step_block)), np.arange(b0, min(k, b0 + step_block)))
                          for b0 in range(0, k, step_block)]
            else:
                live = running[steps[running] > s]  # still a prefix of `running` (steps are sorted)
                if len(live) == 0:
                    break
                blocks = [(torch.from_numpy(live[b0 : b0 + step_block]).to(dev), live[b0 : b0 + step_block])
                          for b0 in range(0, len(live), step_block)]
            cols = slice(s * bsz, (s + 1) * bsz)
            for rows, where in blocks:  # rows: a slice or an index tensor of flat's rows; where: them in numpy
                flat = train_rows(flat, rows, where, epoch, s, cols)
        if epoch in ck_index:
            checkpoint(ck_index[epoch], epoch)
        if progress is not None:
            progress(epoch, job.epochs)

    dead = dead_epoch.cpu().numpy()[back].astype(np.int32)
    return PopulationResult(
        weights=weights_out,
        metrics=metrics_out,
        diverged=dead >= 0,
        diverged_epoch=dead,
        checkpoint_epochs=job.checkpoint_epochs,
    )


# -------------------------------------------------------------------------------------------- the reference loop


def _reference_optimizer(name: str, params: list[torch.Tensor], lr: float, wd: float) -> torch.optim.Optimizer:
    """The torch.optim optimizer an engine family stands for, with the engine's constants."""
    optim = torch.optim
    if name in ("sgd", "momentum", "nesterov"):
        momentum = 0.0 if name == "sgd" else MOMENTUM
        return optim.SGD(params, lr=lr, momentum=momentum, nesterov=name == "nesterov", weight_decay=wd)
    if name in ("adam", "adamw"):
        cls = optim.Adam if name == "adam" else optim.AdamW
        return cls(params, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=wd)
    if name == "rmsprop":
        return optim.RMSprop(params, lr=lr, alpha=RMSPROP_ALPHA, eps=ADAM_EPS, weight_decay=wd)
    if name == "adagrad":
        return optim.Adagrad(params, lr=lr, eps=ADAGRAD_EPS, weight_decay=wd)
    return optim.Adamax(params, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=wd)


def _reference_scheduler(name: str, opt: torch.optim.Optimizer, steps: int, epochs: int) -> Any:
    """torch.optim.lr_scheduler equivalent of a schedule, stepped once per update (None for constant)."""
    sched, total = torch.optim.lr_scheduler, steps * epochs
    if name == "cosine":
        return sched.CosineAnnealingLR(opt, T_max=total)
    if name == "step":
        milestones = [int(math.floor(epochs * f)) * steps for f in (0.5, 0.75)]
        return sched.MultiStepLR(opt, milestones=[m for m in milestones if m > 0], gamma=STEP_DECAY)
    if name == "warmup":
        width = max(1, round(WARMUP_SHARE * total))
        return sched.LinearLR(opt, start_factor=1 / width, total_iters=width - 1) if width > 1 else None
    return None


def train_member_reference(
    job: ChunkJob,
    hparams: Mapping[str, float],
    seed: int,
    device: str | torch.device = "cpu",
    *,
    exact_noise: bool = True,
    dtype: torch.dtype = torch.float32,
) -> PopulationResult:
    """Train ONE member with a plain PyTorch loop (nn modules, torch.optim and its lr_scheduler, one step per batch):
    the oracle for train_population and the baseline of its benchmark. Same init, subset, data order, label noise
    and shift offsets; the same dropout masks when `exact_noise`, else standard nn.Dropout with torch's generator
    (a plain loop's usual cost)."""
    hp, seeds = _check_inputs({k: np.asarray([v]) for k, v in hparams.items()}, np.asarray([seed]))
    _member_options(job, hp)
    hp = {k: float(v[0]) for k, v in hp.items()}
    np_dtype = _numpy_dtype(dtype)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    task, kind, bsz = job.task, job.task.kind, job.batch_size
    pad_id = int(task.info.get("pad_id", 0))
    model, drop_names = _template(job, dev, batched=False, dtype=dtype)
    with torch.no_grad():
        for name, t in init_member_weights(model, hp["init_std"], seed, job.init).items():
            model.get_parameter(name).copy_(t)
    drops = [model.get_submodule(n) for n in drop_names]
    for d in drops:
        d.counter_noise = exact_noise and hp["dropout"] > 0
        d.rate.fill_(hp["dropout"])
        d.p = hp["dropout"]
    params = list(model.parameters())
    opt = _reference_optimizer(job.optimizer, params, hp["lr"], hp["weight_decay"])
    data = MemberDataOrder(seed, len(task.y_train), hp["train_fraction"])
    run_epochs = int(hp["epochs"])
    scheduler = _reference_scheduler(job.schedule, opt, -(-len(data.subset) // bsz), run_epochs)
    (x_train, y_train), (x_test, y_test) = _task_arrays(task, dev, dtype)
    if hp["label_noise"] > 0:
        y_train = noisy_labels(seed, task.y_train, data.subset, hp["label_noise"], int(task.info["num_classes"])).to(dev)
    shift = int(hp["shift"])
    base = torch.tensor(_noise_base(seed), dtype=torch.int32, device=dev)
    shift_key = torch.tensor(_shift_base(seed), dtype=torch.int32, device=dev)

    def batch_images(bidx: torch.Tensor, epoch: int, s: int) -> torch.Tensor:
        if shift == 0:
            return x_train[bidx]
        moves = shift_offsets(dropout_noise_key(shift_key, epoch, s)[None], torch.tensor([shift], device=dev), len(bidx))[0]
        h, w = x_train.shape[-2:]
        padded = F.pad(x_train[bidx], (shift,) * 4)  # (B, C, H + 2s, W + 2s)
        out = torch.empty_like(x_train[bidx])
        for dy, dx in torch.unique(moves, dim=0).tolist():  # one slice per distinct offset
            sel = (moves[:, 0] == dy) & (moves[:, 1] == dx)
            out[sel] = padded[sel, :, shift - dy : shift - dy + h, shift - dx : shift - dx + w]
        return out

    def evaluate(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        model.eval()
        with torch.no_grad():
            sums = _sample_stats(kind, _run_model(model, kind, None, x, y), y, pad_id).sum(0, keepdim=True)  # (1, 4)
        model.train()
        return _metrics_from_sums(sums, torch.tensor([float(len(y))], device=dev, dtype=dtype))

    n_ck = len(job.checkpoint_epochs)
    weights = {n: np.full((1, n_ck, *p.shape), np.nan, dtype=np_dtype) for n, p in model.named_parameters()}
    metrics = {n: np.full((1, n_ck), np.nan, dtype=np_dtype) for n in METRIC_NAMES}
    dead_epoch = -1
    subset = torch.from_numpy(data.subset).to(dev)
    for c, target in enumerate(job.checkpoint_epochs):
        epoch = 0 if c == 0 else job.checkpoint_epochs[c - 1]
        while epoch < target and dead_epoch < 0:
            epoch += 1
            seq = torch.from_numpy(data.epoch()).to(dev)
            if epoch > run_epochs:
                continue  # this member's run is over; its weights stay
            for s, start in enumerate(range(0, len(seq), bsz)):
                bidx = seq[start : start + bsz]
                if exact_noise:
                    for d in drops:
                        d.noise_key.copy_(dropout_noise_key(base, epoch, s))
                out = _run_model(model, kind, None, batch_images(bidx, epoch, s), y_train[bidx])
                loss = F.cross_entropy(out.flatten(0, -2), y_train[bidx].flatten(), ignore_index=pad_id if kind == "seq2seq" else -100)
                if not math.isfinite(loss.item()):
                    dead_epoch = epoch
                    break
                opt.zero_grad()
                loss.backward()
                opt.step()
                if scheduler is not None:
                    scheduler.step()
        if dead_epoch < 0:
            train, test = evaluate(x_train[subset], y_train[subset]), evaluate(x_test, y_test)
            finite = all(torch.isfinite(p).all() for p in params) and math.isfinite(float(train["loss"])) and math.isfinite(
                float(test["loss"])
            )
            if not finite:
                dead_epoch = target
        if dead_epoch >= 0:
            continue
        for n, p in model.named_parameters():
            weights[n][0, c] = p.detach().cpu().numpy()
        for split, res in (("train", train), ("test", test)):
            for metric, values in res.items():
                metrics[f"{split}_{metric}"][0, c] = float(values[0])
    return PopulationResult(
        weights=weights,
        metrics=metrics,
        diverged=np.array([dead_epoch >= 0]),
        diverged_epoch=np.array([dead_epoch], dtype=np.int32),
        checkpoint_epochs=job.checkpoint_epochs,
    )
