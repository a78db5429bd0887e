"""Zoo-level runs: meta-train on a zoo's train split, evaluate on its test split (Adam tuned on its val split).

These are the functions behind `unfzoo lopt meta-train` and `unfzoo lopt eval`; they open the store, turn members
into inner problems and hand them to `meta_train` / `evaluate_optimizers`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import CheckpointError, ConfigError, StoreError
from pipeline.lopt.evaluate import EvalConfig, evaluate_optimizers, save_report
from pipeline.lopt.inner import InnerProblem, problems_from_zoo
from pipeline.lopt.meta_train import CONFIG_FILE, PROGRESS_FILE, MetaTrainConfig, MetaTrainResult, load_optimizer, meta_train
from pipeline.lopt.optimizers import ResidualLOpt

__all__ = ["evaluate_zoo", "find_optimizer_dirs", "find_optimizer_runs", "meta_train_seeds", "meta_train_zoo", "split_members"]


def _open(zoo_path: str | Path) -> Any:
    from pipeline.zoo.store import Zoo

    path = str(zoo_path)
    if "://" not in path and not Path(path).exists():
        raise StoreError(f"zoo {path} does not exist; build it first, e.g. `unfzoo zoo mlp-digits --out {path}`")
    return Zoo.open(path)


def split_members(zoo: Any, split: str, limit: int = 0, seed: int = 0) -> list[int]:
    """Members of the run split `split` ("train" | "val" | "test") with stored weights, sorted, at most `limit`."""
    from pipeline.zoo.store import STATUS_NAMES

    idx = np.sort(np.asarray(zoo.split("run", seed=seed)[split], dtype=np.int64))
    status = np.asarray(zoo.status)
    pending = STATUS_NAMES.index("pending")
    idx = idx[status[idx] != pending]
    if limit:
        idx = idx[:limit]
    if not len(idx):
        raise StoreError(f"zoo {zoo.url} has no finished members in its {split} split; build more members")
    return [int(i) for i in idx]


def _spec_for(zoo: Any, problem: InnerProblem) -> Any:
    """The member network's spec as derived from its module (inputs as one flat axis), else the zoo's stored spec.

    The store's spec may view an input axis as several fixed labels (e.g. 64 = 1 x 8 x 8); the UNF head treats fixed
    labels as permutable, so each extra label multiplies its basis terms: on the digits MLP the stored spec makes the
    update 2.2x slower for no symmetry the optimizer can use.
    """
    from unf_models import WeightSpec
    from unf_models.errors import UNFError

    try:
        spec = WeightSpec.from_module(problem.model)
    except UNFError:
        spec = zoo.spec
    if spec is None or list(spec.names) != list(problem.init):
        raise StoreError(f"zoo {zoo.url}: cannot derive a weight-space spec that names the member's parameters")
    return spec


def meta_train_zoo(
    zoo_path: str | Path,
    config: MetaTrainConfig,
    out: str | Path,
    device: str = "auto",
    max_members: int = 0,
    progress: bool = False,
) -> MetaTrainResult:
    """Meta-train on the zoo's train-split members (stored initializations, their batch sizes), selecting the
    meta-parameters on the first `config.val_members` val-split members (never test members)."""
    from pipeline.device import resolve_device

    dev = resolve_device(device)
    zoo = _open(zoo_path)
    members = split_members(zoo, "train", max_members)
    problems = problems_from_zoo(zoo, members, dev)
    spec = _spec_for(zoo, problems[0]) if config.optimizer.kind == "unf" else None
    val_members = split_members(zoo, "val", config.val_members) if config.validate_every else []
    val = problems_from_zoo(zoo, val_members, dev)
    source = {"fingerprint": zoo.fingerprint, "task": zoo.task_name, "arch": zoo.arch, "members": members, "val_members": val_members}
    return meta_train(problems, config, out, spec=spec, source=source, device=dev, progress=progress, val_problems=val)


def meta_train_seeds(
    zoo_path: str | Path,
    config: MetaTrainConfig,
    out: str | Path,
    seeds: int,
    device: str = "auto",
    max_members: int = 0,
    progress: bool = False,
) -> list[MetaTrainResult]:
    """`seeds` meta-training runs with seeds config.seed, config.seed + 1, ... into OUT/seed<k>/ (each resumable)."""
    from dataclasses import replace

    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    return [meta_train_zoo(zoo_path, replace(config, seed=config.seed + k), Path(out) / f"seed{config.seed + k}", device, max_members, progress)
            for k in range(seeds)]


def _is_run(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file()


def _seed_runs(path: Path) -> list[Path]:
    """A run folder's meta-training seeds: `path` itself if it is a run, else its seed<k>/ sub-folders that are."""
    if _is_run(path):
        return [path]
    runs = [p for p in path.iterdir() if p.name.startswith("seed") and p.name[4:].isdigit() and _is_run(p)] if path.is_dir() else []
    return sorted(runs, key=lambda p: int(p.name[4:]))


def find_optimizer_runs(directory: str | Path) -> dict[str, list[Path]]:
    """Optimizer name -> its meta-training runs (one per seed). `directory` is one run, one optimizer's folder of
    seed<k>/ runs, or a folder of those (one sub-folder per optimizer, named after it)."""
    directory = Path(directory)
    own = _seed_runs(directory)
    if own:
        return {directory.name: own}
    found = {p.name: _seed_runs(p) for p in sorted(directory.iterdir()) if p.is_dir()} if directory.is_dir() else {}
    found = {k: v for k, v in found.items() if v}
    if not found:
        raise CheckpointError(f"{directory} holds no meta-trained optimizer ({CONFIG_FILE}); run `unfzoo lopt meta-train ZOO --out {directory}/unf` first")
    return found


def find_optimizer_dirs(directory: str | Path) -> list[Path]:
    """Every meta-training run under `directory` (see `find_optimizer_runs`), flattened."""
    return [p for runs in find_optimizer_runs(directory).values() for p in runs]


def _reference_row(zoo: Any, members: Sequence[int], problems: Sequence[InnerProblem], horizon: int, long: int) -> dict[str, Any] | None:
    """The zoo's own recorded curve for these members at the checkpoints nearest to `horizon` and `long` steps."""
    names = set(zoo.metric_names)
    if not {"train_loss", "test_acc"} <= names:
        return None
    epochs = np.asarray(zoo.checkpoint_epochs, dtype=np.float64)
    loss, acc = zoo.metric("train_loss")[members], zoo.metric("test_acc")[members]  # (M, C)
    out: dict[str, Any] = {"name": "zoo record (own optimizer)"}
    picks = []
    for key, steps in (("horizon", horizon), ("long", long)):
        cols = []
        for i, p in enumerate(problems):
            ep = steps * min(p.batch_size, len(p.x_train)) / len(p.x_train)
            cols.append(int(np.abs(epochs - ep).argmin()))
        rows = np.arange(len(members))
        out[f"train_loss@{key}"] = float(np.nanmean(loss[rows, cols]))
        out[f"test_acc@{key}"] = float(np.nanmean(acc[rows, cols]))
        picks.append(float(np.median(epochs[cols])))
    out["note"] = f"epochs {picks[0]:g}/{picks[1]:g}"
    out["epochs"] = picks
    return out


def evaluate_zoo(
    directory: str | Path,
    zoo_path: str | Path,
    config: EvalConfig = EvalConfig(),
    out: str | Path | None = None,
    device: str = "auto",
) -> tuple[dict[str, Any], Path]:
    """Evaluate every meta-trained optimizer under `directory` on the zoo's test members; write the report."""
    from pipeline.device import resolve_device

    dev = resolve_device(device)
    groups = find_optimizer_runs(directory)
    zoo = _open(zoo_path)
    loaded: dict[str, list[tuple[ResidualLOpt, dict[str, Any], dict[str, Any], dict[str, Any], Path]]] = {}
    horizons = set()
    for name, dirs in groups.items():
        for d in dirs:
            lopt, meta, stored = load_optimizer(d, dev)
            progress = json.loads((d / PROGRESS_FILE).read_text()) if (d / PROGRESS_FILE).is_file() else {}
            horizons.add(int(stored["meta_train"]["horizon"]))
            loaded.setdefault(name, []).append((lopt, meta, stored, progress, d))
    horizon = config.horizon or max(horizons)
    test_members = split_members(zoo, "test", config.members)
    val_members = split_members(zoo, "val", config.val_members)
    test = problems_from_zoo(zoo, test_members, dev)
    val = problems_from_zoo(zoo, val_members, dev)
    for name, runs in loaded.items():
        _check_applicable(name, runs[0][0], test[0])
    extra = {name: _extra(runs) for name, runs in loaded.items()}
    optimizers = {name: [(r[0], r[1]) for r in runs] for name, runs in loaded.items()}
    report = evaluate_optimizers(optimizers, test, val, horizon, config, extra=extra)
    report["reference"] = _reference_row(zoo, test_members, test, horizon, report["eval_at"][-1])
    report["zoo"] = {"path": str(zoo_path), "fingerprint": zoo.fingerprint, "task": zoo.task_name}
    report["meta_train_horizons"] = sorted(horizons)
    out_dir = Path(out) if out is not None else Path(directory) / "eval"
    path = save_report(report, out_dir)
    return report, path


def _extra(runs: Sequence[tuple[ResidualLOpt, dict[str, Any], dict[str, Any], dict[str, Any], Path]]) -> dict[str, Any]:
    """Per optimizer: meta-training wall time (mean per seed), selected steps, start (`init_from`), hyperparameters
    (mean), folders."""
    walls = [p.get("elapsed_s") for *_x, p, _d in runs if p.get("elapsed_s") is not None]
    selected = [(p.get("selected") or {}) for *_x, p, _d in runs]
    hps = [ResidualLOpt.hyperparameters(meta) for _o, meta, *_x in runs]
    return {
        "meta_train_wall_s": float(np.mean(walls)) if walls else None,
        "outer_steps": [p.get("step") for *_x, p, _d in runs],
        # of the wall time: seconds in ES steps and in meta-validation (mean per seed; absent for older runs)
        **{f"meta_train_{k}": float(np.mean(v)) for k in ("es_s", "val_s")
           if (v := [p["timing"][k] for *_x, p, _d in runs if k in (p.get("timing") or {})])},
        "selected_step": selected[0].get("step") if len(runs) == 1 else None,
        "selected_steps": [s.get("step") for s in selected],
        "selected_val_loss": [s.get("val_loss") for s in selected],
        "nominal": runs[0][0].config.nominal,
        # how each seed's alpha/gamma0 started: "tuned" (--init-from tuned: at the tuned baseline) or "default"
        "init_from": sorted({(stored.get("meta_train") or {}).get("init_from", "default") for _o, _m, stored, *_x in runs}),
        "directories": [str(d) for *_x, d in runs],
        **{k: float(np.mean([h[k] for h in hps])) for k in hps[0]},
    }


def _check_applicable(name: str, lopt: ResidualLOpt, problem: InnerProblem) -> None:
    if lopt.spec is None:
        return
    try:
        lopt.spec.check({k: v for k, v in problem.init.items()}, allow_other_widths=True)
    except Exception as err:
        raise ConfigError(f"optimizer {name!r} was meta-trained for another architecture: {err}") from err

