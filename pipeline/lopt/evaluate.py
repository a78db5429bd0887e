"""Evaluate meta-trained optimizers on held-out zoo members against Adam tuned on validation members.

Every optimizer (each of its meta-training seeds) trains each test member from its stored initialization for the
largest of `multiples` x the meta-training horizon, with the same batches (data order seeded per member). Reported per
optimizer: training loss (whole train split) at the horizon and at each multiple, with 95% two-way bootstrap intervals
over meta-seeds and members; the paired difference against tuned Adam (same bootstrap); test accuracy; whether the
loss at the last multiple is above the loss at the horizon ("rises"); divergence rate and time per step. Adam's learning
rate is chosen on validation members only, by training loss at the horizon. Non-finite losses count as `loss_cap` x the
member's initial loss in means and differences (and as diverged). With a `versus` optimizer (default: `sgdm` when
evaluated) every other row also gets its paired difference against it, and a run that had made progress at the
horizon but ends back near its initial loss is counted as collapsed (a loss of chance is neither a rise nor a
divergence by the other flags' measure)."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.func import grad_and_value, vmap

from pipeline.errors import ConfigError
from pipeline.lopt.inner import InnerProblem, group_problems
from pipeline.lopt.optimizers import Adam, FunctionalOptimizer

__all__ = ["EvalConfig", "RunResult", "cluster_bootstrap", "collapsed_runs", "evaluate_optimizers", "format_table", "paired_bootstrap",
           "paired_difference", "run_optimizer", "save_report", "tune_adam", "write_csv"]

DEFAULT_ADAM_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate and how."""

    horizon: int = 0  # inner steps of "the horizon"; 0 = the optimizers' meta-training horizon
    multiples: tuple[int, ...] = (4, 10)  # also report at these multiples of the horizon (beyond what meta-training saw)
    members: int = 0  # test members to use (0 = all)
    val_members: int = 8  # validation members for tuning Adam's learning rate (0 = all)
    adam_lrs: tuple[float, ...] = DEFAULT_ADAM_LRS
    loss_cap: float = 2.0  # a final loss above cap x initial loss (or non-finite) counts as diverged
    seed: int = 0
    bootstrap: int = 2000  # resamples of the two-way (meta-seed x member) bootstrap intervals
    # every other optimizer's paired difference against this one: None = "sgdm" when evaluated, "" = none, a name = required
    versus: str | None = None
    # a run below collapse x its initial loss at the horizon that ends at or above it (finite, not diverged) collapsed
    collapse: float = 0.9

    def __post_init__(self) -> None:
        if self.horizon < 0 or self.members < 0 or self.val_members < 0:
            raise ConfigError("horizon, members and val_members must be >= 0")
        if not self.multiples or any(m < 1 for m in self.multiples):
            raise ConfigError(f"horizon multiples must be given and each multiple >= 1, got {self.multiples}")
        if not self.adam_lrs or any(not lr > 0 for lr in self.adam_lrs):
            raise ConfigError(f"adam learning-rate grid must be non-empty and positive, got {self.adam_lrs}")
        if not self.loss_cap > 1:
            raise ConfigError(f"loss_cap must be > 1, got {self.loss_cap}")
        if self.bootstrap < 100:
            raise ConfigError(f"bootstrap needs at least 100 resamples, got {self.bootstrap}")
        if not 0 < self.collapse < self.loss_cap:
            raise ConfigError(f"collapse must be in (0, loss_cap = {self.loss_cap:g}), got {self.collapse}")


@dataclass
class RunResult:
    """Per-member results of one optimizer over a list of problems (rows in problem order)."""

    curve: np.ndarray  # (M, steps) minibatch training loss at every step
    train_loss: np.ndarray  # (M, len(eval_at)) whole-train-split loss after eval_at[j] steps
    test_acc: np.ndarray  # (M, len(eval_at))
    initial_loss: np.ndarray  # (M,)
    eval_at: tuple[int, ...]
    seconds: float  # wall time of the training steps (all members)
    steps: int

    @property
    def ms_per_step(self) -> float:
        """Wall milliseconds per inner step, all members of the run trained together (vmapped)."""
        return 1000 * self.seconds / max(self.steps, 1)


def _member_seed(seed: int, problem: InnerProblem, index: int) -> int:
    key = f"{seed}/{problem.member if problem.member is not None else problem.name or index}"
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=4).digest(), "little")


def run_optimizer(
    problems: Sequence[InnerProblem],
    optimizer: FunctionalOptimizer,
    meta: Mapping[str, Tensor],
    steps: int,
    eval_at: Sequence[int],
    seed: int = 0,
) -> RunResult:
    """Train every problem from its initialization for `steps` steps with (optimizer, meta), vmapped per group.

    The data order of a problem depends only on (seed, member), so every optimizer sees the same batches.
    """
    eval_at = tuple(sorted({int(s) for s in eval_at}))
    if not problems or steps < 1 or not eval_at or eval_at[-1] > steps or eval_at[0] < 1:
        raise ConfigError(f"need problems, steps >= 1 and checkpoints within 1..{steps}, got {eval_at}")
    m = len(problems)
    curve = np.full((m, steps), np.nan, np.float64)
    train_loss = np.full((m, len(eval_at)), np.nan, np.float64)
    test_acc = np.full((m, len(eval_at)), np.nan, np.float64)
    initial = np.array([p.initial_loss() for p in problems])
    seconds = 0.0
    for idx in group_problems(problems):
        group = [problems[i] for i in idx]
        ref = group[0]
        device = ref.device
        params = {k: torch.stack([p.init[k] for p in group]) for k in ref.init}  # (G, *shape)
        order = torch.stack([p.data_order(steps, _member_seed(seed, p, i)) for p, i in zip(group, idx)]).to(device)
        meta_d = {k: v.to(device=device, dtype=next(iter(ref.init.values())).dtype) for k, v in meta.items()}

        def step(state, params, x, y, _ref=ref):
            grads, loss = grad_and_value(_ref.loss)(params, x, y)
            params, state = optimizer.update(meta_d, state, params, grads)
            return state, params, loss

        vstep = vmap(step)
        full_loss = vmap(lambda p, _ref=ref: _ref.full_loss(p, "train"))
        acc = vmap(lambda p, _ref=ref: _ref.accuracy(p, "test"))
        with torch.no_grad():
            state = vmap(optimizer.init)(params)
            losses = []
            j = 0
            for t in range(steps):
                bidx = order[:, t]  # (G, B)
                t0 = time.perf_counter()
                state, params, loss = vstep(state, params, ref.x_train[bidx], ref.y_train[bidx])
                losses.append(loss)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds += time.perf_counter() - t0
                if t + 1 == eval_at[j]:
                    train_loss[idx, j] = full_loss(params).double().cpu().numpy()
                    test_acc[idx, j] = acc(params).double().cpu().numpy()
                    j = min(j + 1, len(eval_at) - 1)
            curve[idx] = torch.stack(losses, 1).double().cpu().numpy()
    return RunResult(curve, train_loss, test_acc, initial, eval_at, seconds, steps)


def _capped(values: np.ndarray, initial: np.ndarray, cap: float) -> np.ndarray:
    """Non-finite or above cap x initial -> cap x initial (per member)."""
    limit = cap * initial.reshape(-1, *([1] * (values.ndim - 1)))
    out = np.where(np.isfinite(values), values, limit)
    return np.minimum(out, limit)


def tune_adam(problems: Sequence[InnerProblem], lrs: Sequence[float], horizon: int, seed: int, cap: float) -> tuple[float, dict[str, float]]:
    """Pick Adam's learning rate by mean (capped) training loss at the horizon on `problems` (validation members)."""
    scores = {}
    for lr in lrs:
        res = run_optimizer(problems, Adam(), Adam.init_meta(lr), horizon, (horizon,), seed)
        scores[f"{lr:g}"] = float(_capped(res.train_loss[:, 0], res.initial_loss, cap).mean())
    best = min(scores, key=scores.__getitem__)
    return float(best), scores


def paired_difference(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Mean of a - b with a 95% t-interval (per-member pairs)."""
    from scipy.special import stdtrit  # the t quantile, without importing all of scipy.stats

    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    n = len(d)
    mean = float(d.mean()) if n else math.nan
    if n < 2:
        return {"mean": mean, "lo": math.nan, "hi": math.nan, "n": n}
    half = float(stdtrit(n - 1, 0.975) * d.std(ddof=1) / math.sqrt(n))
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n}


def cluster_bootstrap(values: np.ndarray, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """Mean of `values` (seeds S x members M) with a two-way bootstrap percentile interval.

    Each resample draws S meta-seeds and M members with replacement (independently) and averages the S x M block:
    both the meta-training run and the held-out member are random draws, so the interval covers a new meta-training
    run on new members. With S = 1 it is the ordinary bootstrap over members (a single run: no meta-seed spread).
    """
    v = np.atleast_2d(np.asarray(values, np.float64))
    s, m = v.shape
    mean = float(v.mean())
    if s * m < 2 or not np.isfinite(mean):
        return {"mean": mean, "lo": math.nan, "hi": math.nan, "n": m, "seeds": s}
    rng = np.random.default_rng(seed)
    si = rng.integers(0, s, size=(resamples, s))
    mi = rng.integers(0, m, size=(resamples, m))
    means = v[si[:, :, None], mi[:, None, :]].mean(axis=(1, 2))
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"mean": mean, "lo": float(lo), "hi": float(hi), "n": m, "seeds": s}


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """Mean of a - b (a: seeds Sa x members M, b: Sb x the same M members) with a two-way bootstrap interval, paired
    by member.

    Each resample draws Sa seeds of `a`, Sb seeds of `b` (independently: two meta-training runs share nothing but the
    members) and M members, the same for both, with replacement, and takes the difference of the two block means.
    With Sb = 1 (tuned Adam) it is `cluster_bootstrap(a - b)` with the same draws.
    """
    a = np.atleast_2d(np.asarray(a, np.float64))
    b = np.atleast_2d(np.asarray(b, np.float64))
    if a.shape[1] != b.shape[1]:
        raise ConfigError(f"paired difference needs the same members on both sides, got {a.shape[1]} and {b.shape[1]}")
    (sa, m), sb = a.shape, b.shape[0]
    mean = float(a.mean() - b.mean())
    if max(sa, sb) * m < 2 or not np.isfinite(mean):
        return {"mean": mean, "lo": math.nan, "hi": math.nan, "n": m, "seeds": sa, "seeds_versus": sb}
    rng = np.random.default_rng(seed)
    si = rng.integers(0, sa, size=(resamples, sa))
    mi = rng.integers(0, m, size=(resamples, m))
    bi = rng.integers(0, sb, size=(resamples, sb))
    means = a[si[:, :, None], mi[:, None, :]].mean(axis=(1, 2)) - b[bi[:, :, None], mi[:, None, :]].mean(axis=(1, 2))
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"mean": mean, "lo": float(lo), "hi": float(hi), "n": m, "seeds": sa, "seeds_versus": sb}


def collapsed_runs(at_horizon: np.ndarray, final: np.ndarray, initial: np.ndarray, collapse: float = 0.9, cap: float = 2.0) -> np.ndarray:
    """(S, M) runs that lost their progress past the horizon: below `collapse` x the member's initial loss at the
    horizon, at or above it at the end (e.g. back at chance level), and finite and within `cap` x initial (beyond
    that a run counts as diverged instead)."""
    limit = np.asarray(initial, np.float64)[None, :]
    final = np.asarray(final, np.float64)
    ok = np.isfinite(final) & (final <= cap * limit)
    return ok & (np.asarray(at_horizon, np.float64) < collapse * limit) & (final >= collapse * limit)


@dataclass
class _Row:
    name: str
    values: dict[str, Any] = field(default_factory=dict)


Entry = tuple[FunctionalOptimizer, Mapping[str, Tensor]]


def _as_runs(value: Entry | Sequence[Entry]) -> list[Entry]:
    """One (optimizer, meta) pair, or one per meta-training seed."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], Mapping):
        return [value]
    return list(value)  # type: ignore[arg-type]


def evaluate_optimizers(
    optimizers: Mapping[str, Entry | Sequence[Entry]],
    test_problems: Sequence[InnerProblem],
    val_problems: Sequence[InnerProblem],
    horizon: int,
    config: EvalConfig = EvalConfig(),
    reference: Mapping[str, Any] | None = None,
    extra: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run every optimizer (each meta-training seed of it) and tuned Adam on `test_problems`; return the report.

    `optimizers` maps a name to one (optimizer, meta) pair or to a list of them, one per meta-training seed. Per
    optimizer the report gives the training loss at the horizon and at each multiple of it (mean and two-way bootstrap
    interval over seeds x members), the difference against tuned Adam on the same members (same bootstrap, paired by
    member), and `rises`: whether the mean loss at the last multiple is above the mean at the horizon (the optimizer
    undoes its own progress past the horizon it was meta-trained for), `collapsed`: the share of runs that ends back near
    its initial loss after progress at the horizon (`collapsed_runs`), and `vs_versus`: the paired difference against
    the `config.versus` optimizer (`paired_bootstrap`; the report's `versus` names it). `reference` is an optional row
    copied into the report; `extra` maps an optimizer name to fields shown with it (e.g. its meta-training wall time).
    """
    if not test_problems:
        raise ConfigError("no test members to evaluate on (is the zoo's test split empty?)")
    if not val_problems:
        raise ConfigError("no validation members to tune Adam on (is the zoo's val split empty?)")
    versus = _versus_name(config.versus, optimizers)
    eval_at = tuple(sorted({horizon, *(horizon * m for m in config.multiples)}))
    long = eval_at[-1]
    best_lr, grid = tune_adam(val_problems, config.adam_lrs, horizon, config.seed, config.loss_cap)
    runs: dict[str, list[RunResult]] = {}
    for name, value in optimizers.items():
        runs[name] = [run_optimizer(test_problems, opt, meta, long, eval_at, config.seed) for opt, meta in _as_runs(value)]
    adam_name = f"adam (lr {best_lr:g})"
    runs[adam_name] = [run_optimizer(test_problems, Adam(), Adam.init_meta(best_lr), long, eval_at, config.seed)]
    adam = runs[adam_name][0]
    boot = {"resamples": config.bootstrap, "seed": config.seed}

    def stacked(rs: Sequence[RunResult]) -> tuple[np.ndarray, np.ndarray]:
        loss = np.stack([_capped(r.train_loss, r.initial_loss, config.loss_cap) for r in rs])  # (S, M, E)
        return loss, np.stack([np.nan_to_num(r.test_acc) for r in rs])  # (S, M, E)

    def versus_row(loss: np.ndarray, acc: np.ndarray, other: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
        return {
            **{f"train_loss@{s}": paired_bootstrap(loss[:, :, j], other[0][:, :, j], **boot) for j, s in enumerate(eval_at)},
            **{f"test_acc@{s}": paired_bootstrap(acc[:, :, j], other[1][:, :, j], **boot) for j, s in enumerate(eval_at)},
        }

    adam_arrays = stacked([adam])
    versus_arrays = stacked(runs[versus]) if versus else None
    rows = {}
    for name, rs in runs.items():
        loss, acc = stacked(rs)
        final = np.stack([r.train_loss[:, -1] for r in rs])
        initial = rs[0].initial_loss
        diverged = ~np.isfinite(final) | (final > config.loss_cap * initial)
        rises = loss[:, :, -1] > loss[:, :, 0]  # (S, M) runs that end above their loss at the horizon
        collapsed = collapsed_runs(loss[:, :, 0], final, initial, config.collapse, config.loss_cap)
        row: dict[str, Any] = {
            "seeds": len(rs),
            "members": len(test_problems),
            "train_loss": {str(s): float(loss[:, :, j].mean()) for j, s in enumerate(eval_at)},
            "train_loss_ci": {str(s): cluster_bootstrap(loss[:, :, j], **boot) for j, s in enumerate(eval_at)},
            "test_acc": {str(s): float(acc[:, :, j].mean()) for j, s in enumerate(eval_at)},
            "per_seed_train_loss": {str(s): [float(x) for x in loss[:, :, j].mean(1)] for j, s in enumerate(eval_at)},
            "rises": bool(loss[:, :, -1].mean() > loss[:, :, 0].mean()),
            "rises_fraction": float(rises.mean()),
            "diverged": float(diverged.mean()),
            "collapsed": float(collapsed.mean()),
            "ms_per_step": float(np.mean([r.ms_per_step for r in rs])),
        }
        if name != adam_name:
            row["vs_adam"] = versus_row(loss, acc, adam_arrays)
        if versus_arrays is not None and name != versus:
            row["vs_versus"] = versus_row(loss, acc, versus_arrays)
        row.update(dict((extra or {}).get(name, {})))
        rows[name] = row
    return {
        "horizon": horizon,
        "eval_at": list(eval_at),
        "config": asdict(config),
        "adam": {"lr": best_lr, "grid": grid, "val_members": len(val_problems)},
        "versus": versus,
        "rows": rows,
        "reference": dict(reference) if reference else None,
        "members": [p.member if p.member is not None else p.name for p in test_problems],
        "curves": {name: np.nanmean(np.stack([_capped(r.curve, r.initial_loss, config.loss_cap) for r in rs]), axis=(0, 1)).tolist()
                   for name, rs in runs.items()},
    }


def _versus_name(requested: str | None, optimizers: Mapping[str, Any]) -> str | None:
    """The optimizer the others are compared with: `requested`, or "sgdm" when evaluated and nothing was requested."""
    if requested is None:
        return "sgdm" if "sgdm" in optimizers else None
    if requested and requested not in optimizers:
        raise ConfigError(f"--versus {requested!r} is not among the evaluated optimizers ({', '.join(optimizers)}); pass one of them or ''")
    return requested or None


def _ci(d: Mapping[str, float] | None, fmt: str = "+.3f") -> str:
    if not d:
        return "-"
    if not math.isfinite(d.get("lo", math.nan)):
        return format(d["mean"], fmt)
    return f"{d['mean']:{fmt}} [{d['lo']:{fmt}}, {d['hi']:{fmt}}]"


def _meta_train_cell(row: Mapping[str, Any]) -> str:
    wall = row.get("meta_train_wall_s")
    text = f"{wall / 60:.1f} min" if wall is not None else "-"
    steps = row.get("selected_steps") or ([row["selected_step"]] if row.get("selected_step") is not None else [])
    if steps:
        text += f", step {'/'.join(str(s) for s in steps)}"
    if "tuned" in row.get("init_from", ()):
        text += ", tuned start"  # --init-from tuned: step 0 was the tuned baseline
    return text


def format_table(report: Mapping[str, Any]) -> Any:
    """A rich Table of the report: one row per optimizer; intervals are 95% two-way bootstrap (seeds x members).
    Names and the title are escaped (rich would read `[...]` in them, e.g. the title's `[lo, hi]`, as markup and drop it)."""
    from rich.markup import escape
    from rich.table import Table

    steps = [str(s) for s in report["eval_at"]]
    h, long = steps[0], steps[-1]
    table = Table(title=escape(f"held-out members: {len(report['members'])}; horizon {h} steps, reported at {', '.join(steps)}; "
                               "[lo, hi] = 95% bootstrap over meta-seeds x members"))
    versus = report.get("versus")
    vs_cols = [f"Δloss@{h} vs {versus}", f"Δloss@{long} vs {versus}"] if versus else []
    cols = ["optimizer", "seeds", f"loss@{h}", *(f"loss@{s}" for s in steps[1:]), f"Δloss@{h} vs adam", f"Δloss@{long} vs adam",
            *vs_cols, f"acc@{long}", f"rises past {h}", "diverged", f"collapsed by {long}", "ms/step", "meta-train (mean per seed)"]
    for col in cols:
        table.add_column(col, justify="left" if col == "optimizer" else "right")
    for name, row in report["rows"].items():
        vs = row.get("vs_adam") or {}
        other = row.get("vs_versus") or {}
        ci = row.get("train_loss_ci") or {}
        rises = "YES" if row.get("rises") else "no"
        collapsed = row.get("collapsed")
        table.add_row(
            escape(name),
            str(row.get("seeds", 1)),
            _ci(ci.get(h), ".4f") if ci else f"{row['train_loss'][h]:.4f}",
            *(f"{row['train_loss'][s]:.4f}" for s in steps[1:]),
            _ci(vs.get(f"train_loss@{h}")),
            _ci(vs.get(f"train_loss@{long}")),
            *([_ci(other.get(f"train_loss@{h}")), _ci(other.get(f"train_loss@{long}"))] if versus else []),
            f"{row['test_acc'][long]:.3f}",
            f"{rises} ({100 * row.get('rises_fraction', 0):.0f}%)",
            f"{100 * row['diverged']:.0f}%",
            "-" if collapsed is None else f"{'YES' if collapsed > 0 else 'no'} ({100 * collapsed:.0f}%)",
            f"{row['ms_per_step']:.1f}",
            _meta_train_cell(row),
        )
    ref = report.get("reference")
    if ref:
        table.add_row(escape(ref.get("name", "zoo record")), "-", _fmt(ref.get("train_loss@horizon")), *(["-"] * (len(steps) - 2)),
                      _fmt(ref.get("train_loss@long")), "-", "-", *(["-"] * len(vs_cols)), _fmt(ref.get("test_acc@long"), ".3f"),
                      "-", "-", "-", "-", escape(ref.get("note", "-")))
    return table


CSV_FIELDS = ("optimizer", "seeds", "members", "step", "multiple", "train_loss", "train_loss_lo", "train_loss_hi",
              "vs_adam", "vs_adam_lo", "vs_adam_hi", "test_acc", "rises", "rises_fraction", "diverged", "ms_per_step",
              "meta_train_s", "versus", "vs_versus", "vs_versus_lo", "vs_versus_hi", "collapsed")


def write_csv(report: Mapping[str, Any], path: str | Path) -> Path:
    """results.csv: one line per (optimizer, evaluation step), with the intervals of the table."""
    import csv

    path = Path(path)
    h = report["eval_at"][0]
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        w.writeheader()
        for name, row in report["rows"].items():
            for s in report["eval_at"]:
                ci = (row.get("train_loss_ci") or {}).get(str(s)) or {}
                vs = (row.get("vs_adam") or {}).get(f"train_loss@{s}") or {}
                other = (row.get("vs_versus") or {}).get(f"train_loss@{s}") or {}
                w.writerow({
                    "optimizer": name, "seeds": row.get("seeds", 1), "members": row.get("members"), "step": s, "multiple": s // h,
                    "train_loss": row["train_loss"][str(s)], "train_loss_lo": ci.get("lo", ""), "train_loss_hi": ci.get("hi", ""),
                    "vs_adam": vs.get("mean", ""), "vs_adam_lo": vs.get("lo", ""), "vs_adam_hi": vs.get("hi", ""),
                    "test_acc": row["test_acc"][str(s)], "rises": int(bool(row.get("rises"))), "rises_fraction": row.get("rises_fraction", ""),
                    "diverged": row["diverged"], "ms_per_step": row["ms_per_step"], "meta_train_s": row.get("meta_train_wall_s") or "",
                    "versus": report.get("versus") or "", "vs_versus": other.get("mean", ""), "vs_versus_lo": other.get("lo", ""),
                    "vs_versus_hi": other.get("hi", ""), "collapsed": row.get("collapsed", ""),
                })
    return path


def _fmt(value: Any, fmt: str = ".4f") -> str:
    return "-" if value is None or not np.isfinite(value) else format(value, fmt)


def plot_curves(report: Mapping[str, Any], path: str | Path) -> Path:
    """PNG of the mean (capped) minibatch training loss per optimizer, smoothed, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for name, curve in report["curves"].items():
        c = np.asarray(curve)
        w = max(1, len(c) // 50)
        smooth = np.convolve(c, np.ones(w) / w, mode="valid")
        ax.plot(np.arange(len(smooth)) + w, smooth, label=name, lw=1.4)
    ax.axvline(report["eval_at"][0], color="grey", ls="--", lw=0.8, label="meta-train horizon")
    for s in report["eval_at"][1:-1]:
        ax.axvline(s, color="grey", ls=":", lw=0.6)
    ax.set_yscale("log")
    ax.set_xlabel("inner step")
    ax.set_ylabel("training loss (minibatch, mean over members)")
    ax.set_title(f"learned optimizers on {len(report['members'])} held-out zoo members")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def save_report(report: Mapping[str, Any], out: str | Path) -> Path:
    """Write results.json, results.csv and curves.png into `out`; return the JSON path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    path.write_text(json.dumps(report, indent=2, default=float))
    write_csv(report, out / "results.csv")
    plot_curves(report, out / "curves.png")
    return path
