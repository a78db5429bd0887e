"""Meta-training of the residual learned optimizers with ES over truncated inner unrolls, with checkpoint/resume.

One outer step = one truncation window of `truncation` inner steps for a vmapped population of 2 * pairs particles
(antithetic pairs), then an Adam step on the flat meta-parameter vector with the clipped ES gradient. An inner run
("episode") lasts `horizon` inner steps on one inner problem (a zoo member of the meta-train split, drawn per
episode); within a pair both particles see the same problem, initialization and batches. All randomness derives
from (seed, outer step) or (seed, episode), so a resumed run continues exactly where it stopped.

Meta-validation: every `validate_every` outer steps (and at step 0 and the last step) the current meta-parameters,
unperturbed, train a fixed set of validation problems (the zoo's val-split members) from their initializations for
the horizon with fixed batches, through the evaluation's inner loop; the score is the mean training loss at the horizon
relative to the initial loss (NaN or above `loss_cap` -> `loss_cap`). The best-scoring meta-parameters are the
selected optimizer (ES can drift late in a run, and the final step is not necessarily the best one).

Output directory: `config.json` (resolved config, optimizer architecture, spec, source), `meta.safetensors` (the
selected meta-parameters by name: best on validation, or the last ones without validation), `meta_last.safetensors`
(the last ones), `checkpoint.safetensors` + `progress.json` (outer state, population state, best-so-far, history,
validation curve, selected step).

Resume: `checkpoint.safetensors` is the one atomic unit (written to a temporary file, then renamed). Its metadata
holds the outer step, history, validation curve and selection together with the tensors of that same step, and the
digest of the run's resume-relevant config. `progress.json`, `meta.safetensors` and `meta_last.safetensors` are
derived from it after each save and rebuilt from it on resume, so a kill between any two writes resumes exactly. A
checkpoint without that record (older format) or of another run is refused, never guessed at.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.func import grad_and_value, vmap

from pipeline.errors import CheckpointError, ConfigError
from pipeline.lopt.es import ESConfig, clip_by_norm, es_step, sanitize_losses
from pipeline.lopt.inner import InnerProblem
from pipeline.lopt.optimizers import Adam, LOptConfig, ResidualLOpt, flatten_meta, unflatten_meta
from pipeline.lopt.warm_start import INIT_FROM, warm_started

__all__ = [
    "MetaTrainConfig",
    "MetaTrainResult",
    "PopulationUnroll",
    "load_optimizer",
    "meta_train",
    "seeded_generator",
    "validation_score",
]

CONFIG_FILE = "config.json"
META_FILE = "meta.safetensors"
META_LAST_FILE = "meta_last.safetensors"
CKPT_FILE = "checkpoint.safetensors"
PROGRESS_FILE = "progress.json"
_RESUME_FREE = ("outer_steps", "checkpoint_every")  # may change between a run and its resume
# options added after runs were first written, with the defaults that reproduce those runs
_LATER_DEFAULTS: dict[str, Any] = {"meta_loss": "ratio", "curriculum": 0, "init_from": "default", "optimizer.nominal": "sgdm",
                                   "optimizer.norm_features": False}
_CKPT_FORMAT = "unfzoo-lopt-checkpoint/2"  # metadata "format" of a checkpoint that records its own step


@dataclass(frozen=True)
class MetaTrainConfig:
    """Everything that defines a meta-training run (stored resolved in config.json)."""

    optimizer: LOptConfig = field(default_factory=LOptConfig)
    es: ESConfig = field(default_factory=ESConfig)
    outer_steps: int = 500  # CPU-sized (`make lopt`: 3 seeds x 3 optimizers); the CLI's --help lists GPU-sized settings
    horizon: int = 100  # inner steps per episode: the meta-training horizon
    truncation: int = 10  # inner steps per outer step
    outer_lr: float = 3e-3  # Adam on f's weights
    # Adam on log_alpha, log_beta, logit_gamma0. Adam moves each coordinate by about its learning rate per step, so at
    # outer_lr a step size could change by e^(0.003 * 300) = 2.5x in a 300-step run at most: too little to find
    # alpha ~ 1 from 0.1, or to grow beta until f matters. These three scalars get their own, larger rate.
    hp_lr: float = 3e-2
    grad_clip: float = 1.0  # L2 norm bound of the ES gradient
    loss_cap: float = 2.0  # per-step meta-loss is loss / initial loss, clipped here; NaN counts as the cap
    seed: int = 0
    checkpoint_every: int = 25
    validate_every: int = 50  # outer steps between meta-validations (0 = off: the last meta-parameters are kept)
    val_members: int = 8  # validation-split members scored at each meta-validation
    # Meta-loss per inner step: "ratio" = loss / initial loss (clipped at loss_cap), "log" = its logarithm, which
    # weighs a late fall from 0.02 to 0.01 as much as an early one from 1 to 0.5 (Metz et al. 2019 train on log loss).
    meta_loss: str = "ratio"
    # Horizon curriculum: over the first `curriculum` outer steps the episodes' horizon grows linearly from one
    # truncation to `horizon` (0 = off: every episode lasts `horizon`). Meta-validation always uses `horizon`.
    curriculum: int = 0
    # Initial alpha and gamma0: "default" = the optimizer config's; "tuned" = the best point of a grid of the nominal
    # optimizer alone (f = 0), scored on the meta-validation members (`pipeline.lopt.warm_start`), so step 0 of
    # meta-training is the tuned baseline and meta-validation's selection can only improve on it.
    init_from: str = "default"

    def __post_init__(self) -> None:
        if self.horizon < 1 or self.truncation < 1 or self.horizon % self.truncation:
            raise ConfigError(f"horizon ({self.horizon}) must be a positive multiple of truncation ({self.truncation})")
        if self.outer_steps < 0 or self.checkpoint_every < 1:
            raise ConfigError("outer_steps must be >= 0 and checkpoint_every >= 1")
        if self.validate_every < 0 or self.val_members < 1:
            raise ConfigError(f"validate_every must be >= 0 and val_members >= 1, got {self.validate_every} and {self.val_members}")
        if self.meta_loss not in ("ratio", "log"):
            raise ConfigError(f"meta_loss {self.meta_loss!r} is unknown; use ratio or log")
        if self.init_from not in INIT_FROM:
            raise ConfigError(f"init_from {self.init_from!r} is unknown; use {' or '.join(INIT_FROM)}")
        if self.curriculum < 0:
            raise ConfigError(f"curriculum must be >= 0 outer steps, got {self.curriculum}")
        if not (self.outer_lr > 0 and self.hp_lr > 0 and self.grad_clip > 0 and self.loss_cap > 1):
            raise ConfigError("need outer_lr > 0, hp_lr > 0, grad_clip > 0 and loss_cap > 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MetaTrainConfig:
        d = dict(d)
        return cls(optimizer=LOptConfig(**d.pop("optimizer")), es=ESConfig(**d.pop("es")), **d)


@dataclass
class MetaTrainResult:
    meta: dict[str, Tensor]  # the selected meta-parameters (best on validation; the last ones without validation)
    history: list[dict[str, float]]
    wall_time_s: float
    out: Path | None
    meta_last: dict[str, Tensor] = field(default_factory=dict)
    validation: list[dict[str, float]] = field(default_factory=list)  # [{"step", "val_loss"}]
    selected_step: int | None = None  # outer step of `meta` (None without validation)
    selected_val_loss: float | None = None
    warm_start: dict[str, Any] | None = None  # --init-from tuned: the chosen start and its grid (as in config.json)


def validation_score(problems: Sequence[InnerProblem], lopt: ResidualLOpt, meta: Mapping[str, Tensor], horizon: int, seed: int, cap: float) -> float:
    """Mean over `problems` of the whole-train-split loss after `horizon` steps of (lopt, meta) from each problem's
    initialization, relative to its initial loss; non-finite or above `cap` counts as `cap`. Deterministic: the
    evaluation's inner loop with its per-member data order."""
    from pipeline.lopt.evaluate import run_optimizer

    res = run_optimizer(problems, lopt, meta, horizon, (horizon,), seed)
    rel = res.train_loss[:, 0] / res.initial_loss
    rel = np.where(np.isfinite(rel), np.minimum(rel, cap), cap)
    return float(rel.mean())


def seeded_generator(*keys: int | str) -> torch.Generator:
    """A CPU generator seeded from `keys` by a stable hash (independent streams per (seed, step), (seed, episode))."""
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


class PopulationUnroll:
    """The inner loops of a population of learned optimizers on one problem, vmapped over particles.

    State: {"params": {name: (P, *shape)}, "opt": optimizer state batched over P, "t": (P,) inner iteration}.
    Particle p reads the batches of data stream `p % pairs` (`order`: (pairs, horizon, B) indices), so the two
    members of an antithetic pair share them.
    """

    def __init__(self, lopt: ResidualLOpt, template: Mapping[str, Tensor], problem: InnerProblem, order: Tensor, cap: float, truncation: int,
                 log_loss: bool = False):
        self.lopt, self.template, self.problem = lopt, dict(template), problem
        self.order = order.to(problem.device)  # (pairs, T, B)
        self.cap, self.truncation, self.log_loss = cap, truncation, log_loss
        self.scale = problem.initial_loss()

        def step(meta, opt_state, params, x, y):
            grads, loss = grad_and_value(problem.loss)(params, x, y)
            params, opt_state = lopt.update(meta, opt_state, params, grads)
            return params, opt_state, loss

        self._vstep = vmap(step)

    def init_state(self, n: int) -> dict[str, Any]:
        """n particles at the problem's initialization."""
        params = {k: v.unsqueeze(0).expand(n, *v.shape).clone() for k, v in self.problem.init.items()}
        opt = vmap(self.lopt.init)(params)
        return {"params": params, "opt": opt, "t": torch.zeros(n, dtype=torch.long, device=self.problem.device)}

    def replicate(self, state: Mapping[str, Any], n: int) -> dict[str, Any]:
        return _tree_map(lambda v: v.expand(n, *v.shape[1:]).clone(), state)

    def advance(self, thetas: Tensor, state: Mapping[str, Any]) -> tuple[dict[str, Any], Tensor]:
        meta = unflatten_meta(thetas, self.template)  # {name: (P, ...)}
        n = thetas.shape[0]
        stream = torch.arange(n, device=thetas.device) % self.order.shape[0]  # (P,)
        params, opt, t = state["params"], state["opt"], state["t"]
        total = torch.zeros(n, dtype=thetas.dtype, device=thetas.device)
        for _ in range(self.truncation):
            idx = self.order[stream, t.clamp(max=self.order.shape[1] - 1)]  # (P, B)
            x, y = self.problem.x_train[idx], self.problem.y_train[idx]  # (P, B, ...)
            params, opt, loss = self._vstep(meta, opt, params, x, y)
            ratio = sanitize_losses(loss.detach().to(total.dtype) / self.scale, self.cap)
            total = total + (ratio.clamp(min=1e-6).log() if self.log_loss else ratio)
            t = t + 1
        return {"params": params, "opt": opt, "t": t}, total / self.truncation


def _tree_map(fn: Callable[[Tensor], Tensor], tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _tree_map(fn, v) for k, v in tree.items()}
    return fn(tree)


def _flatten_tree(tree: Any, prefix: str) -> dict[str, Tensor]:
    if isinstance(tree, Mapping):
        out: dict[str, Tensor] = {}
        for k, v in tree.items():
            out.update(_flatten_tree(v, f"{prefix}/{k}"))
        return out
    return {prefix: tree.detach().contiguous().cpu()}


def _unflatten_tree(flat: Mapping[str, Tensor], prefix: str, device: torch.device) -> Any:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        if not key.startswith(prefix + "/"):
            continue
        parts = key[len(prefix) + 1 :].split("/")
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value.to(device)
    return tree


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _save_tensors(tensors: Mapping[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors file written whole or not at all (temporary file, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _identity(meta_train: Mapping[str, Any]) -> dict[str, Any]:
    """The resume-relevant part of a stored meta-train config: less the options free to change, and less options
    added later while at their defaults (so a run written before they existed still resumes)."""
    ident = {k: v for k, v in dict(meta_train).items() if k not in _RESUME_FREE and _LATER_DEFAULTS.get(k, ()) != v}
    if isinstance(ident.get("optimizer"), Mapping):
        ident["optimizer"] = {k: v for k, v in ident["optimizer"].items() if _LATER_DEFAULTS.get(f"optimizer.{k}", ()) != v}
    return ident


def _run_digest(stored: Mapping[str, Any]) -> str:
    """sha256 of what identifies a run for resuming: config.json's content less the options free to change."""
    ident = dict(stored)
    ident["meta_train"] = _identity(stored.get("meta_train") or {})
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def _stored_config(out: Path | None) -> dict[str, Any] | None:
    """An existing run's config.json (None if absent or unreadable: `_try_resume` reports that)."""
    try:
        data = json.loads((out / CONFIG_FILE).read_text()) if out is not None else None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _spec_dict(spec: Any) -> Any:
    return None if spec is None else spec.to_dict()


def load_optimizer(directory: str | Path, device: torch.device | str = "cpu") -> tuple[ResidualLOpt, dict[str, Tensor], dict[str, Any]]:
    """Load a meta-trained optimizer: (functional optimizer, meta-parameters, stored config.json)."""
    directory = Path(directory)
    cfg_path, meta_path = directory / CONFIG_FILE, directory / META_FILE
    if not cfg_path.is_file() or not meta_path.is_file():
        raise CheckpointError(f"{directory}: not a meta-trained optimizer (needs {CONFIG_FILE} and {META_FILE}); run `unfzoo lopt meta-train` first")
    try:
        stored = json.loads(cfg_path.read_text())
        config = MetaTrainConfig.from_dict(stored["meta_train"])
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{cfg_path}: unreadable or from another version ({err})") from err
    spec = None
    if stored.get("spec") is not None:
        from unf_models import WeightSpec

        spec = WeightSpec.from_dict(stored["spec"])
    lopt = ResidualLOpt(config.optimizer, spec)
    meta = {k: v.to(device) for k, v in load_file(str(meta_path)).items()}
    expected = lopt.init_meta(0)
    if set(meta) != set(expected) or any(meta[k].shape != expected[k].shape for k in expected):
        raise CheckpointError(f"{meta_path}: meta-parameters do not match the optimizer described in {cfg_path}")
    return lopt, {k: meta[k] for k in expected}, stored


def meta_train(
    problems: Sequence[InnerProblem],
    config: MetaTrainConfig,
    out: str | Path | None = None,
    spec: Any = None,
    source: Mapping[str, Any] | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    stop_after: int | None = None,
    val_problems: Sequence[InnerProblem] | None = None,
) -> MetaTrainResult:
    """Meta-train `config.optimizer` on `problems` (inner problems of the meta-train split).

    With `val_problems` (validation-split problems, never test ones) and `config.validate_every` > 0, the
    meta-parameters are scored on them at step 0, every `validate_every` steps and at `outer_steps`
    (`validation_score`), and the best-scoring ones are returned as `meta` and saved as the optimizer.

    With `out`, checkpoints every `checkpoint_every` outer steps and resumes from an existing compatible run there
    (raising `ConfigError` if the directory holds a different run). `spec` is the inner network's WeightSpec (kind
    "unf" only); `source` (e.g. zoo path and fingerprint) is stored and must match on resume. `stop_after` ends the
    call after that many outer steps of this call (for tests and time-boxed runs; the run stays resumable).
    """
    if not problems:
        raise ConfigError("meta-training needs at least one inner problem (is the zoo's train split empty?)")
    device = torch.device(device)
    problems = [p.to(device) for p in problems]
    val = [p.to(device) for p in val_problems or []] if config.validate_every else []
    out_dir = Path(out) if out is not None else None
    config, warm = warm_started(config, val, _stored_config(out_dir))
    lopt = ResidualLOpt(config.optimizer, spec)
    template = lopt.init_meta(config.seed)
    theta = flatten_meta(template).to(device)
    outer = Adam()
    outer_state = outer.init({"theta": theta})
    outer_lr = _outer_lrs(template, config).to(device)
    stored = {
        "meta_train": config.to_dict(),
        "spec": _spec_dict(spec),
        "source": dict(source or {}),
        "meta_parameters": int(theta.numel()),
    }
    if warm is not None:  # the tuned start and its grid (part of the run's identity: a resume reuses it)
        stored["warm_start"] = warm
    start, elapsed, history = 0, 0.0, []
    state: Any = None
    accum: Tensor | None = None
    best = _Best()
    timing = {"es_s": 0.0, "val_s": 0.0}  # wall seconds in ES steps and in meta-validation (where a run's time goes)
    run = _run_digest(stored)
    if out_dir is not None:
        resumed = _try_resume(out_dir, stored, run, device)
        if resumed is not None:
            start, elapsed, history, theta, outer_state, state, accum, best, timing = resumed
            # the derived files may lag the checkpoint (a kill between writes): rebuild them from it
            _save_meta(out_dir, *_last_and_selected(template, theta, best))
            _write_json(out_dir / PROGRESS_FILE, _progress(start, elapsed, history, best, timing))
        else:
            out_dir.mkdir(parents=True, exist_ok=True)
        _write_json(out_dir / CONFIG_FILE, stored)

    plan = _EpisodePlan(config)
    unroll: PopulationUnroll | None = None
    end = config.outer_steps if stop_after is None else min(config.outer_steps, start + stop_after)
    bar = _progress_bar(progress, start, config.outer_steps)
    t0 = time.perf_counter()

    def validate(done: int) -> None:
        meta = unflatten_meta(theta, template)
        best.record(done, validation_score(val, lopt, meta, config.horizon, config.seed, config.loss_cap), theta)

    with torch.no_grad():
        if val and start == 0 and not best.curve:
            validate(0)
        for step in range(start, end):
            episode, window, ep_horizon = plan.locate(step)
            if unroll is None or window == 0:
                unroll = _episode_unroll(lopt, template, problems, config, episode, ep_horizon)
                if window == 0 or state is None:  # a new episode (a resumed one keeps its saved population)
                    state = unroll.init_state(2 * config.es.pairs if config.es.estimator == "pes" else 1)
                    accum = None
            gen = seeded_generator(config.seed, "outer", step)
            t_step = time.perf_counter()
            res = es_step(unroll, theta, state, accum, config.es, gen)
            grad = clip_by_norm(res.grad, config.grad_clip)
            new, outer_state = outer.update({"lr": outer_lr}, outer_state, {"theta": theta}, {"theta": grad})
            theta = new["theta"]
            state, accum = res.state, res.accum
            hp = ResidualLOpt.hyperparameters(unflatten_meta(theta.cpu(), template))
            history.append({"step": step + 1, "meta_loss": res.loss, "grad_norm": float(res.grad.norm()), **hp})
            timing["es_s"] += time.perf_counter() - t_step
            done = step + 1
            if val and (done % config.validate_every == 0 or done == config.outer_steps):
                t_val = time.perf_counter()
                validate(done)
                timing["val_s"] += time.perf_counter() - t_val
            if bar is not None:
                bar[0].update(bar[1], advance=1, description=f"meta-train {config.optimizer.kind} loss {res.loss:.3f}{best.describe()}")
            if out_dir is not None and (done % config.checkpoint_every == 0 or done == end):
                _save(out_dir, run, template, theta, outer_state, state, accum, done, elapsed + time.perf_counter() - t0, history, best, timing)
    if bar is not None:
        bar[0].stop()
    last, meta = _last_and_selected(template, theta, best)
    wall = elapsed + time.perf_counter() - t0
    if out_dir is not None:
        _save_meta(out_dir, last, meta)
    return MetaTrainResult(meta=meta, history=history, wall_time_s=wall, out=out_dir, meta_last=last, validation=list(best.curve),
                           selected_step=best.step, selected_val_loss=best.score, warm_start=warm)


@dataclass
class _Best:
    """Best-so-far meta-parameters on validation and the validation curve (the step 0 point included)."""

    curve: list[dict[str, float]] = field(default_factory=list)
    step: int | None = None
    score: float | None = None
    theta: Tensor | None = None

    def record(self, step: int, score: float, theta: Tensor) -> None:
        self.curve.append({"step": step, "val_loss": score})
        if self.score is None or score < self.score:  # ties keep the earlier step
            self.step, self.score, self.theta = step, score, theta.detach().clone()

    def describe(self) -> str:
        if not self.curve:
            return ""
        return f" | val {self.curve[-1]['val_loss']:.3f} (best {self.score:.3f} @ {self.step})"

    def progress(self) -> dict[str, Any]:
        return {"validation": self.curve, "selected": None if self.step is None else {"step": self.step, "val_loss": self.score}}


def _outer_lrs(template: Mapping[str, Tensor], config: MetaTrainConfig) -> Tensor:
    """Per-coordinate Adam learning rates of the flat meta-parameter vector: `hp_lr` for the scalar
    hyperparameters (log_alpha, log_beta, logit_gamma0), `outer_lr` for f's weights."""
    parts = [torch.full((v.numel(),), config.outer_lr if k.startswith("f.") else config.hp_lr) for k, v in template.items()]
    return torch.cat(parts)


class _EpisodePlan:
    """Where outer step `step` falls: (episode, window within it, the episode's horizon), with the curriculum."""

    def __init__(self, config: MetaTrainConfig):
        self.config = config
        self.starts: list[int] = [0]  # first outer step of each episode planned so far
        self.horizons: list[int] = [self.horizon_at(0)]

    def horizon_at(self, step: int) -> int:
        c = self.config
        if not c.curriculum or step >= c.curriculum:
            return c.horizon
        windows = c.horizon // c.truncation
        return c.truncation * max(1, min(windows, round(windows * step / c.curriculum)))

    def locate(self, step: int) -> tuple[int, int, int]:
        c = self.config
        if not c.curriculum:
            episode, window = divmod(step, c.horizon // c.truncation)
            return episode, window, c.horizon
        while self.starts[-1] + self.horizons[-1] // c.truncation <= step:
            nxt = self.starts[-1] + self.horizons[-1] // c.truncation
            self.starts.append(nxt)
            self.horizons.append(self.horizon_at(nxt))
        episode = next(e for e in range(len(self.starts) - 1, -1, -1) if self.starts[e] <= step)
        return episode, step - self.starts[episode], self.horizons[episode]


def _episode_unroll(lopt: ResidualLOpt, template: Mapping[str, Tensor], problems: Sequence[InnerProblem], config: MetaTrainConfig, episode: int,
                    horizon: int | None = None) -> PopulationUnroll:
    gen = seeded_generator(config.seed, "episode", episode)
    problem = problems[int(torch.randint(len(problems), (1,), generator=gen))]
    seeds = torch.randint(1 << 31, (config.es.pairs,), generator=gen).tolist()
    order = torch.stack([problem.data_order(horizon or config.horizon, s) for s in seeds])  # (pairs, T, B)
    return PopulationUnroll(lopt, template, problem, order, config.loss_cap, config.truncation, config.meta_loss == "log")


def _last_and_selected(template: Mapping[str, Tensor], theta: Tensor, best: _Best
                       ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(last, selected) meta-parameters by name on the CPU; selected = best on validation, else the last ones."""
    last = unflatten_meta(theta.detach().cpu(), template)
    selected = unflatten_meta(best.theta.detach().cpu(), template) if best.theta is not None else last
    return last, selected


def _save_meta(out: Path, last: Mapping[str, Tensor], selected: Mapping[str, Tensor]) -> None:
    """meta_last.safetensors = the last meta-parameters; meta.safetensors = the selected ones."""
    _save_tensors(last, out / META_LAST_FILE)
    _save_tensors(selected, out / META_FILE)


def _progress(step: int, elapsed: float, history: list[dict[str, float]], best: _Best, timing: Mapping[str, float] | None = None) -> dict[str, Any]:
    return {"step": step, "elapsed_s": elapsed, "history": history, **best.progress(), "timing": dict(timing or {})}


def _save(out: Path, run: str, template: Mapping[str, Tensor], theta: Tensor, outer_state: Any, state: Any, accum: Tensor | None, step: int, elapsed: float, history: list[dict[str, float]], best: _Best,
          timing: Mapping[str, float] | None = None) -> None:
    """The checkpoint (tensors + its step's progress in the metadata, one atomic file), then the derived files."""
    tensors = {"theta": theta.detach().cpu().contiguous()}
    if best.theta is not None:
        tensors["best_theta"] = best.theta.detach().cpu().contiguous()
    tensors.update(_flatten_tree(outer_state, "outer"))
    if state is not None:
        tensors.update(_flatten_tree(state, "population"))
    if accum is not None:
        tensors["accum"] = accum.detach().cpu().contiguous()
    progress = _progress(step, elapsed, history, best, timing)
    _save_tensors(tensors, out / CKPT_FILE, {"format": _CKPT_FORMAT, "run": run, "progress": json.dumps(progress)})
    _save_meta(out, *_last_and_selected(template, theta, best))
    _write_json(out / PROGRESS_FILE, progress)


def _read_checkpoint(path: Path, run: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, progress) of a checkpoint, checked to be whole, of this run and self-consistent."""
    restart = f"delete {path} to restart the meta-training from step 0"
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            flat = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise CheckpointError(f"{path}: checkpoint unreadable ({err}); {restart}") from err
    if metadata.get("format") != _CKPT_FORMAT or "progress" not in metadata:
        raise CheckpointError(f"{path}: checkpoint does not record its own outer step (older format), so resuming "
                              f"it could pair its parameters with another step's progress; {restart}")
    if metadata.get("run") != run:
        raise CheckpointError(f"{path}: checkpoint belongs to another meta-training run than {path.parent / CONFIG_FILE}; {restart}")
    try:
        progress = json.loads(metadata["progress"])
        step, history = int(progress["step"]), list(progress["history"])
        consistent = len(history) == step and (step == 0 or int(history[-1]["step"]) == step) and "theta" in flat
        float(progress["elapsed_s"])
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: checkpoint's progress record is damaged ({err}); {restart}") from err
    if not consistent:
        raise CheckpointError(f"{path}: checkpoint's step {step} disagrees with its history or tensors; {restart}")
    return flat, progress


def _try_resume(out: Path, stored: Mapping[str, Any], run: str, device: torch.device) -> tuple[Any, ...] | None:
    cfg_path = out / CONFIG_FILE
    if not cfg_path.exists():
        if out.exists() and any(out.iterdir()):
            raise ConfigError(f"--out {out} exists and is not a meta-training directory; choose an empty or new directory")
        return None
    try:
        old = json.loads(cfg_path.read_text())
    except ValueError as err:
        raise CheckpointError(f"{cfg_path} is not valid JSON; delete {out} to start over") from err
    for key in ("meta_train", "spec", "source"):
        a, b = old.get(key), stored.get(key)
        if key == "meta_train" and isinstance(a, dict) and isinstance(b, dict):
            a, b = _identity(a), _identity(b)
        if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
            raise ConfigError(f"--out {out} holds a meta-training run with a different {key.replace('_', '-')}; use another --out, or delete it to start over")
    if not (out / CKPT_FILE).exists():  # killed before the first checkpoint: start over (progress.json is derived)
        return None
    flat, progress = _read_checkpoint(out / CKPT_FILE, run)
    theta = flat["theta"].to(device)
    outer_state = _unflatten_tree(flat, "outer", device)
    state = _unflatten_tree(flat, "population", device) or None
    accum = flat["accum"].to(device) if "accum" in flat else None
    best = _Best(curve=list(progress.get("validation") or []))
    selected = progress.get("selected")
    if selected is not None:
        if "best_theta" not in flat:
            raise CheckpointError(f"{out / CKPT_FILE}: progress names a selected step but the checkpoint lacks its meta-parameters; delete {out} to start over")
        best.step, best.score, best.theta = int(selected["step"]), float(selected["val_loss"]), flat["best_theta"].to(device)
    timing = {"es_s": 0.0, "val_s": 0.0, **{k: float(v) for k, v in dict(progress.get("timing") or {}).items()}}
    return int(progress["step"]), float(progress["elapsed_s"]), list(progress["history"]), theta, outer_state, state, accum, best, timing


def _progress_bar(enabled: bool, start: int, total: int) -> tuple[Any, Any] | None:
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    task = bar.add_task("meta-train", total=total, completed=start)
    bar.start()
    return bar, task

