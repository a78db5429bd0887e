"""From a zoo to a predictor dataset: targets, checkpoint selection, the member split, weights as tensors.

Rows are (member, checkpoint) pairs. The split is over members (or configurations): every checkpoint of a member is
on one side, and `PredictData.check_disjoint` proves it. Diverged and unfinished members are excluded by default and
counted. Nothing here looks at test targets to make a choice: the loss (BCE vs MSE) and the target scaling come from
train (+ val) rows only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.errors import ConfigError
from pipeline.predict.config import TrainConfig

__all__ = ["SPLITS", "PredictData", "available_targets", "target_values", "select_checkpoints", "build_data",
           "normalization_stats"]

SPLITS = ("train", "val", "test")
_DONE, _DIVERGED = 1, 2  # pipeline.store status codes


def _numeric_hparams(zoo: Any) -> list[str]:
    names = list(zoo.layout.continuous)
    for name, cats in zoo.layout.categorical.items():
        if cats and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in cats):
            names.append(name)
    return names


def available_targets(zoo: Any) -> list[str]:
    """Every target `unfzoo train` accepts for this zoo: metrics, `gen_gap`, numeric hyperparameters and their logs."""
    targets = list(zoo.metric_names)
    if {"train_acc", "test_acc"} <= set(targets):
        targets.append("gen_gap")
    for name in _numeric_hparams(zoo):
        targets.append(name)
        values = np.asarray(zoo.hparam(name), dtype=float)
        done = zoo.status > 0
        if done.any() and np.all(values[done] > 0):
            targets.append(f"log_{name}")
    return targets


def target_values(zoo: Any, target: str) -> np.ndarray:
    """(members, checkpoints) float64 target values; hyperparameters repeat along checkpoints."""
    n, c = zoo.n_members, len(zoo.checkpoint_epochs)
    if target in zoo.metric_names:
        return zoo.metric(target).astype(np.float64)
    if target == "gen_gap" and {"train_acc", "test_acc"} <= set(zoo.metric_names):
        return zoo.metric("train_acc").astype(np.float64) - zoo.metric("test_acc").astype(np.float64)
    hparams = _numeric_hparams(zoo)
    base, log = (target[4:], True) if target.startswith("log_") and target[4:] in hparams else (target, False)
    if base in hparams:
        values = np.asarray(zoo.hparam(base), dtype=np.float64)
        if log:
            with np.errstate(divide="ignore", invalid="ignore"):
                values = np.log10(values)
        return np.broadcast_to(values[:, None], (n, c)).copy()
    raise ConfigError(f"unknown target {target!r} for zoo {zoo.url}; available: {', '.join(available_targets(zoo))}")


def select_checkpoints(zoo: Any, checkpoints: str | tuple[int, ...]) -> np.ndarray:
    """Checkpoint indices for 'final', 'all' or a tuple of epochs (each must be a stored checkpoint epoch)."""
    epochs = list(zoo.checkpoint_epochs)
    if checkpoints == "final":
        return np.asarray([len(epochs) - 1])
    if checkpoints == "all":
        return np.arange(len(epochs))
    missing = [e for e in checkpoints if e not in epochs]
    if missing:
        raise ConfigError(f"--checkpoints {','.join(map(str, missing))}: not stored in {zoo.url}; "
                          f"its checkpoint epochs are {','.join(map(str, epochs))}")
    return np.asarray(sorted({epochs.index(e) for e in checkpoints}))


@dataclass
class PredictData:
    """Rows (member, checkpoint) with weights, targets and split membership; weights stay on the CPU."""

    weights: dict[str, torch.Tensor]  # name -> (R, *shape) float32
    y: np.ndarray  # (R,) float64, target units
    member: np.ndarray  # (R,) member index in the zoo
    epoch: np.ndarray  # (R,) checkpoint epoch
    rows: dict[str, np.ndarray]  # split -> row indices
    target: str
    loss: str  # "bce" | "mse"
    y_mean: float  # target scaling for MSE, from train rows (0/1 for BCE)
    y_std: float
    names: tuple[str, ...]
    excluded: dict[str, int] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, split: str) -> dict[str, torch.Tensor]:
        idx = torch.from_numpy(self.rows[split])
        return {n: w.index_select(0, idx) for n, w in self.weights.items()}

    def scaled_y(self) -> np.ndarray:
        """Targets as the torch models learn them: raw for BCE, standardized with train statistics for MSE."""
        return (self.y - self.y_mean) / self.y_std

    def check_disjoint(self) -> None:
        """Raise if any member (hence any of its checkpoints) sits on two sides of the split."""
        sides = {s: set(self.member[r].tolist()) for s, r in self.rows.items()}
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            both = sides[a] & sides[b]
            if both:
                raise AssertionError(f"members {sorted(both)[:5]} are in both {a} and {b}")

    def counts(self) -> dict[str, dict[str, int]]:
        return {s: {"members": int(len(np.unique(self.member[r]))), "rows": int(len(r))} for s, r in self.rows.items()}


def build_data(zoo: Any, config: TrainConfig) -> PredictData:
    """Load the rows for `config` from `zoo` into memory (weights as float32 tensors)."""
    spec = zoo.spec
    names = tuple(spec.names) if spec is not None else tuple(zoo.weight_keys)
    c_idx = select_checkpoints(zoo, config.checkpoints)
    y_all = target_values(zoo, config.target)  # (M, C)
    n = zoo.n_members
    limit = n if config.max_members is None else min(n, int(config.max_members))
    status = np.asarray(zoo.status)[:limit]

    excluded = {"pending": int((status == 0).sum()), "diverged": 0, "non_finite": 0}
    keep = status == _DONE
    if config.include_diverged:
        keep |= status == _DIVERGED
    else:
        excluded["diverged"] = int((status == _DIVERGED).sum())
    split = zoo.split(kind=config.split, seed=config.split_seed, fractions=config.fractions)
    side = np.full(n, -1, dtype=np.int64)
    for code, name in enumerate(SPLITS):
        side[np.asarray(split[name], dtype=np.int64)] = code
    members = np.flatnonzero(keep & (side[:limit] >= 0))

    raw = zoo.read_weights(members, c_idx) if len(members) else {k: np.zeros((0, len(c_idx), *s), np.float32)
                                                                  for k, s in zoo.weight_shapes.items()}
    y = y_all[members][:, c_idx]  # (m, c)
    finite = np.isfinite(y)
    for key in names:
        finite &= np.isfinite(raw[key]).reshape(len(members), len(c_idx), -1).all(axis=2)
    excluded["non_finite"] = int((~finite).sum())  # rows (member, checkpoint) with a NaN/inf target or weight
    m_rows, c_rows = np.nonzero(finite)
    weights = {k: torch.from_numpy(np.ascontiguousarray(raw[k][m_rows, c_rows])) for k in names}
    member = members[m_rows]
    epoch = np.asarray(zoo.checkpoint_epochs)[c_idx][c_rows]
    y_rows = y[m_rows, c_rows]
    rows = {name: np.flatnonzero(side[member] == code) for code, name in enumerate(SPLITS)}

    empty = [s for s in SPLITS if len(rows[s]) == 0]
    if empty:
        raise ConfigError(
            f"the {' and '.join(empty)} split{'s are' if len(empty) > 1 else ' is'} empty for zoo {zoo.url}: "
            f"{len(np.unique(member))} usable members (excluded: {excluded}) with --split {config.split} and fractions "
            f"{list(config.fractions)}; build more members or pick other --fractions"
            + (" or --split run" if config.split == "config" else "")
        )

    fit_rows = np.concatenate([rows["train"], rows["val"]])
    loss = config.loss
    if loss == "auto":
        in_unit = np.all((y_rows[fit_rows] >= 0) & (y_rows[fit_rows] <= 1))
        loss = "bce" if in_unit else "mse"
    if loss == "bce":
        y_mean, y_std = 0.0, 1.0
    else:
        y_mean = float(y_rows[rows["train"]].mean())
        y_std = float(y_rows[rows["train"]].std()) or 1.0
    data = PredictData(
        weights=weights, y=y_rows, member=member, epoch=epoch, rows=rows, target=config.target, loss=loss,
        y_mean=y_mean, y_std=y_std, names=names, excluded=excluded,
        info={"members_total": n, "checkpoint_epochs": [int(e) for e in np.asarray(zoo.checkpoint_epochs)[c_idx]]},
    )
    data.check_disjoint()
    return data


def normalization_stats(weights: Mapping[str, torch.Tensor], names: tuple[str, ...]) -> tuple[list[float], list[float]]:
    """Per-tensor scalar mean and std over every entry of the given (training) rows (`unf_models.normalize`); a
    constant tensor keeps std 1 so unseen values stay finite."""
    from unf_models.normalize import WeightStats

    stats = WeightStats.estimate({n: weights[n] for n in names})
    return [stats.mean[n] for n in names], [stats.std[n] if stats.std[n] > 1e-6 else 1.0 for n in names]
