"""From a zoo to a predictor dataset: targets, checkpoint selection, the member split, weights as tensors.

Rows are (zoo, member, checkpoint) triples from one or several training zoos (one architecture family, any widths,
each split on its own) and from eval zoos (each its own split). The split is over members (or configurations, or
held-out hyperparameter groups): every checkpoint of a member is on one side, and `PredictData.check_disjoint`
proves it. Diverged and unfinished members are excluded by default and
counted. Nothing here looks at test targets to make a choice: the loss (BCE vs MSE) and the target scaling come from
train (+ val) rows only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pathlib import Path

import numpy as np
import torch

from pipeline.errors import ConfigError
from pipeline.predict.config import TrainConfig
from pipeline.zoo.members import crop_to_shapes
from pipeline.zoo.splits import GroupSplit, assign_group_split, group_sizes, parse_split

__all__ = ["SPLITS", "PredictData", "available_targets", "target_values", "select_checkpoints", "build_data",
           "normalization_stats", "zoo_width", "n_classes", "n_test_samples"]

SPLITS = ("train", "val", "test")
_DONE, _DIVERGED = 1, 2  # pipeline.zoo.store status codes


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


def _zoo_name(zoo: Any) -> str:
    return Path(str(zoo.url).rstrip("/")).stem


def zoo_width(spec: Any, shapes: Mapping[str, Sequence[int]]) -> str:
    """A readable width label of a zoo: the sizes of the spec's permutable axes at these shapes ('16' when they
    are all equal, else e.g. '16,32')."""
    sizes = spec.infer_sizes({k: tuple(v) for k, v in shapes.items()}, allow_other_widths=True)
    values = [int(sizes[label]) for label in spec.permutable_labels]
    return str(values[0]) if values and len(set(values)) == 1 else ",".join(map(str, values))


def _task_info(zoo: Any) -> dict[str, Any]:
    """The `info` a recipe zoo records about its task ({} for zoos without one, e.g. imports)."""
    return (getattr(zoo, "attrs", {}).get("task") or {}).get("info") or {}


def n_classes(zoo: Any) -> int | None:
    """The zoo task's number of classes (recipe zoos record it), else the architecture's `num_classes`."""
    value = _task_info(zoo).get("num_classes") or (zoo.arch or {}).get("num_classes")
    return int(value) if value else None


def n_test_samples(zoo: Any) -> int | None:
    """How many test samples the zoo task scored each member's test metrics on (recipe zoos record it), else None."""
    value = _task_info(zoo).get("n_test")
    return int(value) if value else None


@dataclass
class PredictData:
    """Rows (zoo, member, checkpoint) with weights, targets and split membership; weights stay on the CPU.

    Weights live in `blocks`, one per zoo ({name: (rows of that zoo, *shape)}), since zoos may differ in width; row
    r is `blocks[block[r]][name][pos[r]]`. Splits: "train", "val", "test" (from the training zoos, each split on its
    own) and "eval:<zoo name>" per `--eval-zoo` (never used for selection or early stopping).
    """

    blocks: list[dict[str, torch.Tensor]]
    block: np.ndarray  # (R,) index into blocks (= index into zoos)
    pos: np.ndarray  # (R,) row inside its block
    y: np.ndarray  # (R,) float64, target units
    member: np.ndarray  # (R,) member index in its zoo
    epoch: np.ndarray  # (R,) checkpoint epoch
    rows: dict[str, np.ndarray]  # split -> row indices
    target: str
    loss: str  # "bce" | "mse"
    y_mean: float  # target scaling for MSE, from train rows (0/1 for BCE)
    y_std: float
    names: tuple[str, ...]
    excluded: dict[str, int] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    zoos: list[dict[str, Any]] = field(default_factory=list)  # per block: name, url, role, width, n_classes, ...
    threshold: float | None = None  # chance threshold of the target (accuracy > threshold = trained), recorded
    groups: dict[str, np.ndarray] = field(default_factory=dict)  # `--bias-by` hparam -> (R,) value of each row, as text

    @classmethod
    def single(cls, weights: dict[str, torch.Tensor], **kwargs: Any) -> PredictData:
        """One block (one zoo): `weights` {name: (R, *shape)} with rows in order."""
        n = next(iter(weights.values())).shape[0]
        return cls(blocks=[weights], block=np.zeros(n, dtype=np.int64), pos=np.arange(n), **kwargs)

    def __len__(self) -> int:
        return len(self.y)

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        """{name: (R, *shape)} when every row has the same shapes (one block)."""
        if len(self.blocks) != 1:
            raise ValueError("rows come from several zoos; use PredictData.take(rows)")
        return self.blocks[0]

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.rows)

    @property
    def eval_splits(self) -> tuple[str, ...]:
        return tuple(s for s in self.rows if s not in SPLITS)

    def take(self, rows: np.ndarray) -> list[tuple[np.ndarray, int, dict[str, torch.Tensor]]]:
        """`rows` grouped by block: [(positions within `rows`, block index, {name: (n, *shape)})]."""
        rows = np.asarray(rows, dtype=np.int64)
        out = []
        for b in np.unique(self.block[rows]):
            where = np.flatnonzero(self.block[rows] == b)
            idx = torch.from_numpy(self.pos[rows[where]])
            out.append((where, int(b), {n: w.index_select(0, idx) for n, w in self.blocks[b].items()}))
        return out

    def scaled_y(self) -> np.ndarray:
        """Targets as the torch models learn them: raw for BCE, standardized with train statistics for MSE."""
        return (self.y - self.y_mean) / self.y_std

    def width(self) -> np.ndarray:
        """(R,) width label of every row's zoo."""
        labels = np.asarray([z.get("width", "") for z in self.zoos] or [""], dtype=object)
        return labels[self.block] if len(self.zoos) else np.full(len(self), "", dtype=object)

    def _member_key(self) -> np.ndarray:
        """(R,) one integer per (zoo, member)."""
        zoo = np.asarray([z.get("zoo", i) for i, z in enumerate(self.zoos)] or [0], dtype=np.int64)
        return zoo[self.block] * (1 << 40) + self.member.astype(np.int64)

    def check_disjoint(self) -> None:
        """Raise if any member (hence any of its checkpoints) sits on two sides of the split."""
        key = self._member_key()
        sides = {s: set(key[r].tolist()) for s, r in self.rows.items()}
        names = list(sides)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                both = sides[a] & sides[b]
                if both:
                    raise AssertionError(f"members {sorted(both)[:5]} are in both {a} and {b}")

    def counts(self) -> dict[str, dict[str, int]]:
        key = self._member_key()
        return {s: {"members": int(len(np.unique(key[r]))), "rows": int(len(r))} for s, r in self.rows.items()}


def _check_family(spec: Any, first: Any, zoo: Any, role: str) -> None:
    names = list(spec.names)
    keys = list(zoo.weight_keys)
    problem = None
    if zoo.spec is None:
        problem = "records no weight-space spec"
    elif sorted(keys) != sorted(names):
        problem = f"has tensors {keys[:4]}{'...' if len(keys) > 4 else ''}, not {names[:4]}{'...' if len(names) > 4 else ''}"
    else:
        try:
            spec.infer_sizes(zoo.weight_shapes, allow_other_widths=True)
        except Exception as err:  # SpecMismatchError
            problem = f"is not the same architecture family at another width ({err})"
    if problem:
        arch = (zoo.arch or {}).get("name")
        first_arch = (first.arch or {}).get("name")
        raise ConfigError(f"{role} {zoo.url} ({arch}) {problem}; it cannot be mixed with {first.url} ({first_arch}): "
                          "pass zoos of one architecture family")


def _usable(zoo: Any, config: TrainConfig, limit: int) -> tuple[np.ndarray, dict[str, int]]:
    status = np.asarray(zoo.status)[:limit]
    excluded = {"pending": int((status == 0).sum()), "diverged": 0, "non_finite": 0}
    keep = status == _DONE
    if config.include_diverged:
        keep |= status == _DIVERGED
    else:
        excluded["diverged"] = int((status == _DIVERGED).sum())
    if not keep.any():
        raise ConfigError(
            f"zoo {zoo.url} has no usable members: {excluded['pending']} pending, {int((status == _DIVERGED).sum())} "
            f"diverged of {len(status)}; finish building it (`unfzoo zoo` with the same recipe and --out)"
            + ("" if config.include_diverged else " or pass --include-diverged"))
    return keep, excluded


def _categorical_values(zoo: Any, keep: np.ndarray) -> dict[str, np.ndarray]:
    return {name: np.asarray(zoo.hparam(name), dtype=object)[: len(keep)][keep] for name in zoo.layout.categorical}


BIAS_BY_MAX_VALUES = 20  # a --bias-by hyperparameter with more distinct values (a learning rate) is refused


def _hparam_names(zoo: Any) -> tuple[str, ...]:
    layout = zoo.layout
    return (*layout.categorical, *layout.continuous)


def _hparam_text(zoo: Any, name: str) -> np.ndarray:
    """(M,) a hyperparameter of every member as text (numbers as %g); "-" for a zoo without it (e.g. an eval zoo
    whose recipe fixes it)."""
    if name not in _hparam_names(zoo):
        return np.full(zoo.n_members, "-", dtype=object)
    return np.asarray([f"{v:g}" if isinstance(v, (float, np.floating)) else str(v) for v in zoo.hparam(name)],
                      dtype=object)


def _check_bias_by(zoo: Any, name: str) -> None:
    """ConfigError unless `name` is a hyperparameter of `zoo` with at most BIAS_BY_MAX_VALUES distinct values."""
    names = _hparam_names(zoo)
    count = len(set(_hparam_text(zoo, name).tolist())) if name in names else None
    if count is None or count > BIAS_BY_MAX_VALUES:
        counts = {n: len(set(_hparam_text(zoo, n).tolist())) for n in names}
        few = [f"{n} ({c})" for n, c in counts.items() if c <= BIAS_BY_MAX_VALUES]
        what = (f"has {count} distinct values (at most {BIAS_BY_MAX_VALUES})" if count is not None
                else "is not a hyperparameter")
        raise ConfigError(f"--bias-by {name!r} {what} of {zoo.url}; use one of (distinct values): "
                          f"{', '.join(few) or 'none'}")


def _group_held_out(zoos: Sequence[Any], keeps: Sequence[np.ndarray], group: GroupSplit, seed: int) -> tuple[str, ...]:
    """Validate a group split against the training zoos; return the held-out values (as text)."""
    values = []
    for zoo, keep in zip(zoos, keeps):
        cats = _categorical_values(zoo, keep)
        if group.hparam not in cats:
            raise ConfigError(f"--split {group}: {group.hparam!r} is not a categorical hyperparameter of {zoo.url}; "
                              f"valid (usable members per value): {group_sizes(cats)}")
        values.append(np.asarray([str(v) for v in cats[group.hparam]], dtype=object))
    allv = np.concatenate(values)
    uniq, counts = np.unique(allv, return_counts=True)
    sizes = ", ".join(f"{u} {c}" for u, c in zip(uniq, counts))
    if group.values is None:
        if len(uniq) < 2:
            raise ConfigError(f"--split {group}: {group.hparam} has one value among usable members ({sizes}); "
                              "a leave-group-out split needs at least two")
        held = (str(uniq[seed % len(uniq)]),)
    else:
        unknown = [v for v in group.values if v not in set(uniq.tolist())]
        if unknown:
            raise ConfigError(f"--split {group}: no usable member has {group.hparam} = {', '.join(unknown)}; "
                              f"values and sizes: {sizes}")
        held = tuple(group.values)
    n_test = int(np.isin(allv, np.asarray(held, dtype=object)).sum())
    if n_test < 2 or len(allv) - n_test < 4:
        raise ConfigError(f"--split {group}: held-out {group.hparam} = {','.join(held)} leaves {n_test} test and "
                          f"{len(allv) - n_test} train+val members; too small to split (values and sizes: {sizes})")
    return held


def build_data(zoos: Any, config: TrainConfig, eval_zoos: Sequence[Any] = ()) -> PredictData:
    """Load the rows for `config` from one zoo or a list of zoos (one architecture family, any widths; each split on
    its own) and from `eval_zoos` (every usable member in its own "eval:<name>" split) into memory."""
    train_zoos = list(zoos) if isinstance(zoos, (list, tuple)) else [zoos]
    eval_zoos = list(eval_zoos)
    if not train_zoos:
        raise ConfigError("no training zoo given")
    first = train_zoos[0]
    spec = first.spec
    names = tuple(spec.names) if spec is not None else tuple(first.weight_keys)
    if spec is not None:
        for role, zs in (("zoo", train_zoos[1:]), ("eval zoo", eval_zoos)):
            for z in zs:
                _check_family(spec, first, z, role)
    train_urls = {str(z.url) for z in train_zoos}
    both = [str(z.url) for z in eval_zoos if str(z.url) in train_urls]
    if both:
        raise ConfigError(f"--eval-zoo {both[0]} is also a training zoo; an eval zoo must be one the predictor never "
                          "trains on")
    split = parse_split(config.split)
    all_zoos = [(z, "train") for z in train_zoos] + [(z, "eval") for z in eval_zoos]
    usable = []
    for zoo, role in all_zoos:
        limit = zoo.n_members if config.max_members is None or role == "eval" else min(zoo.n_members,
                                                                                      int(config.max_members))
        usable.append((*_usable(zoo, config, limit), limit))
    held = (_group_held_out(train_zoos, [u[0] for u in usable[: len(train_zoos)]], split, config.split_seed)
            if isinstance(split, GroupSplit) else None)

    for name in config.bias_by:
        _check_bias_by(train_zoos[0], name)

    seen: dict[tuple[str, str], int] = {}
    blocks, parts, zoo_info = [], [], []
    split_names = list(SPLITS)
    excluded_total = {"pending": 0, "diverged": 0, "non_finite": 0}
    for zi, ((zoo, role), (keep, excluded, limit)) in enumerate(zip(all_zoos, usable)):
        name = _zoo_name(zoo)
        seen[(role, name)] = seen.get((role, name), 0) + 1
        name = name if seen[(role, name)] == 1 else f"{name}-{seen[(role, name)]}"
        eval_c = select_checkpoints(zoo, config.checkpoints)
        train_c = eval_c if role == "eval" or config.train_checkpoints == "same" else \
            select_checkpoints(zoo, config.train_checkpoints)
        c_idx = np.union1d(eval_c, train_c)
        y_all = target_values(zoo, config.target)  # (M, C)
        side = np.full(zoo.n_members, -1, dtype=np.int64)
        if role == "eval":
            split_names.append(f"eval:{name}")
            side[:limit] = len(split_names) - 1
        elif isinstance(split, GroupSplit):
            values = np.asarray(zoo.hparam(split.hparam), dtype=object)[:limit]
            side[:limit] = assign_group_split(values, held, config.split_seed, config.fractions)
        else:
            sp = zoo.split(kind=split, seed=config.split_seed, fractions=config.fractions)
            for code, s in enumerate(SPLITS):
                side[np.asarray(sp[s], dtype=np.int64)] = code
        members = np.flatnonzero(keep & (side[:limit] >= 0))
        raw = zoo.read_weights(members, c_idx)
        y = y_all[members][:, c_idx]  # (m, c)
        finite = np.isfinite(y)
        for key in names:
            finite &= np.isfinite(raw[key]).reshape(len(members), len(c_idx), -1).all(axis=2)
        epochs_c = np.asarray(zoo.checkpoint_epochs)[c_idx]
        is_train = side[members][:, None] == 0
        wanted = np.where(is_train, np.isin(c_idx, train_c)[None, :], np.isin(c_idx, eval_c)[None, :])
        excluded["non_finite"] = int((~finite & wanted).sum())  # rows (member, checkpoint) with a NaN/inf
        m_rows, c_rows = np.nonzero(finite & wanted)
        for k in excluded_total:
            excluded_total[k] += excluded[k]
        info = {"name": name, "url": str(zoo.url), "role": role, "fingerprint": zoo.fingerprint, "zoo": zi,
                "n_classes": n_classes(zoo), "n_test": n_test_samples(zoo), "members": int(zoo.n_members),
                "excluded": excluded,
                "checkpoint_epochs": [int(e) for e in np.asarray(zoo.checkpoint_epochs)[eval_c]],
                "train_checkpoint_epochs": [int(e) for e in np.asarray(zoo.checkpoint_epochs)[train_c]]}
        # one block per member width: narrower members of a zoo with a `width` hyperparameter are stored zero-padded
        # to the widest; they are cropped back to their own shapes (the same function, without the padding)
        member_shapes = [tuple(s.items()) for s in zoo.member_shapes(members[m_rows])]  # hashable
        group_text = {g: _hparam_text(zoo, g) for g in config.bias_by}  # (M,) per --bias-by hyperparameter
        for shapes in dict.fromkeys(member_shapes):
            sel = np.flatnonzero(np.asarray([s == shapes for s in member_shapes], dtype=bool))
            cropped = crop_to_shapes({k: raw[k] for k in names}, dict(shapes))  # views; the row selection copies
            blocks.append({k: torch.from_numpy(v[m_rows[sel], c_rows[sel]]) for k, v in cropped.items()})
            parts.append({"member": members[m_rows[sel]], "epoch": epochs_c[c_rows[sel]],
                          "y": y[m_rows[sel], c_rows[sel]], "side": side[members[m_rows[sel]]],
                          "groups": {g: text[members[m_rows[sel]]] for g, text in group_text.items()}})
            zoo_info.append({**info, "width": zoo_width(spec, dict(shapes)) if spec is not None else ""})
        if not len(m_rows):
            zoo_info.append({**info, "width": zoo_width(spec, zoo.weight_shapes) if spec is not None else ""})
            blocks.append({k: torch.zeros((0, *zoo.weight_shapes[k])) for k in names})
            parts.append({"member": members[:0], "epoch": epochs_c[:0], "y": np.zeros(0), "side": side[:0],
                          "groups": {g: np.zeros(0, dtype=object) for g in config.bias_by}})

    block = np.concatenate([np.full(len(p["y"]), i, dtype=np.int64) for i, p in enumerate(parts)])
    pos = np.concatenate([np.arange(len(p["y"])) for p in parts])
    member = np.concatenate([p["member"] for p in parts])
    epoch = np.concatenate([p["epoch"] for p in parts])
    y_rows = np.concatenate([p["y"] for p in parts]).astype(np.float64)
    side_rows = np.concatenate([p["side"] for p in parts])
    rows = {s: np.flatnonzero(side_rows == code) for code, s in enumerate(split_names)}

    empty = [s for s in split_names if len(rows[s]) == 0]
    if empty:
        n_usable = len(np.unique(np.asarray([z["zoo"] for z in zoo_info])[block] * (1 << 40) + member))
        raise ConfigError(
            f"the {' and '.join(empty)} split{'s are' if len(empty) > 1 else ' is'} empty for "
            f"{', '.join(str(z.url) for z in train_zoos)}: {n_usable} usable members (excluded: {excluded_total}) "
            f"with --split {config.split} and fractions {list(config.fractions)}; build more members or pick other "
            "--fractions" + (" or --split run" if config.split == "config" else ""))

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
    from pipeline.predict.stats import chance_threshold

    threshold = chance_threshold(config.target, zoo_info[0]["n_classes"], config.chance_margin)
    data = PredictData(
        blocks=blocks, block=block, pos=pos, y=y_rows, member=member, epoch=epoch, rows=rows, target=config.target,
        loss=loss, y_mean=y_mean, y_std=y_std, names=names, excluded=excluded_total, zoos=zoo_info,
        threshold=threshold, groups={g: np.concatenate([p["groups"][g] for p in parts]) for g in config.bias_by},
        info={"members_total": int(sum(z.n_members for z in train_zoos)),
              "checkpoint_epochs": zoo_info[0]["checkpoint_epochs"],
              "train_checkpoint_epochs": zoo_info[0]["train_checkpoint_epochs"],
              "held_out": list(held) if held else None},
    )
    data.check_disjoint()
    return data


def normalization_stats(weights: Mapping[str, torch.Tensor] | Sequence[Mapping[str, torch.Tensor]],
                        names: tuple[str, ...]) -> tuple[list[float], list[float]]:
    """Per-tensor scalar mean and std over every entry of the given (training) rows, one dict or one per block
    (`unf_models.normalize`); a constant tensor keeps std 1 so unseen values stay finite."""
    from unf_models.normalize import WeightStats

    samples = [weights] if isinstance(weights, Mapping) else list(weights)
    stats = WeightStats.estimate([{n: w[n] for n in names} for w in samples])
    return [stats.mean[n] for n in names], [stats.std[n] if stats.std[n] > 1e-6 else 1.0 for n in names]
