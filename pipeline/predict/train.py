"""`train_predictor`: fit every requested model kind for every seed on one zoo split, select on validation only,
evaluate test once at the end, write artifacts and reports. Interrupted runs resume from their last epoch."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.stats import kendalltau

from pipeline.compile import compile_step, recompile_room
from pipeline.device import flush_denormals, matmul_precision
from pipeline.errors import ConfigError
from pipeline.predict.artifacts import CONFIG_FILE, STATE_FILE, Predictor, save_ensemble, save_predictor
from pipeline.predict.config import ALL_MODELS, MODEL_KINDS, PROBE_MODELS, TrainConfig
from pipeline.predict.data import PredictData, build_data, normalization_stats, zoo_width
from pipeline.predict.features import statnn_features
from pipeline.predict.models import WIDTH_AGNOSTIC, TensorNormalizer, build_net
from pipeline.predict.statnn import fit_statnn
from pipeline.predict.stats import split_statistics

__all__ = ["RunResult", "TrainResult", "train_predictor", "fit_run", "split_metrics", "kendall_tau"]

# progress(model, seed, epoch, total_epochs, info) is called after every epoch (once for STATNN).
ProgressFn = Callable[[str, int, int, int, dict[str, Any]], None]
RESULT_FILE, RESUME_FILE, PRED_FILE, HISTORY_FILE = "result.json", "resume.pt", "predictions.csv", "history.csv"
SELECTION_FILE = "selection.json"
ENSEMBLE_RULE = ("with 2+ seeds, the seed ensemble (mean prediction over seeds) when its validation tau is at least "
                 "the best seed's, else the best-validation seed (never test or an eval zoo)")


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` via a temporary file and os.replace: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_csv(frame: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


def kendall_tau(pred: np.ndarray, true: np.ndarray) -> float:
    """Kendall's tau-b; NaN (e.g. constant predictions) counts as -1 so it never wins a selection."""
    if len(pred) < 2:
        return -1.0
    t = kendalltau(pred, true).statistic
    return float(t) if np.isfinite(t) else -1.0


def split_metrics(pred: np.ndarray, true: np.ndarray, threshold: float | None = None) -> dict[str, Any]:
    """Every statistic of `pipeline.predict.stats.split_statistics` over the rows with a prediction (a fixed-width
    model has none on a zoo of another width: then the split reports n 0 and NaN)."""
    ok = np.isfinite(pred)
    return split_statistics(pred[ok], true[ok], threshold)


@dataclass
class RunResult:
    """One (model, seed) run: metrics per split, the validation curve, predictions for every row."""

    model: str
    kind: str
    seed: int
    metrics: dict[str, dict[str, float]]
    history: list[dict[str, Any]]
    best_epoch: int | None
    seconds: float
    directory: Path
    predictions: pd.DataFrame
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def val_tau(self) -> float:
        """Validation Kendall tau, -1 when it is missing or not finite (so such a run is never selected)."""
        t = self.metrics["val"]["tau"]
        return float(t) if t is not None and np.isfinite(t) else -1.0

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "kind": self.kind, "seed": self.seed, "metrics": self.metrics,
                "history": self.history, "best_epoch": self.best_epoch, "seconds": self.seconds, "extra": self.extra}


@dataclass
class TrainResult:
    """Everything `train_predictor` produced; the same content is written under `out_dir`."""

    out_dir: Path
    config: TrainConfig
    runs: list[RunResult]
    summary: pd.DataFrame  # one row per model: test/val tau mean and std over seeds, R^2, MAE, best seed
    data_info: dict[str, Any]
    statistics: list[dict[str, Any]] | None = None  # per model and split (see pipeline.predict.report)
    bias_by_width: list[dict[str, Any]] | None = None
    pairs: list[dict[str, Any]] | None = None  # paired bootstrap of tau differences

    def predictor_dir(self, model: str) -> Path:
        return self.out_dir / model


def _hyperparameters(model: str, config: TrainConfig, probe: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON-able hyperparameters `build_net` rebuilds a model from; `probe` is `probe_setup`'s description of the
    training zoo (the probe models need it)."""
    kind = MODEL_KINDS[model]
    norm = {"normalize": config.normalize} if config.normalize != "tensor" else {}
    if kind in ("probe", "unf-probe") and probe is None:
        raise ValueError(f"model {model!r} needs the training zoo's probe setup (pipeline.predict.probe.probe_setup)")
    if kind == "probe":
        return {"head": list(config.probe_head), "probe": probe}
    if kind in ("unf", "hybrid", "unf-probe"):
        axes = "permutable" if model == "unf-perm" else "exact"
        return {"hidden": list(config.unf_hidden), "head": list(config.unf_head), "fixed_axes": axes,
                "features": config.features, **config.tied_form_options(model), **norm,
                **({"probe": probe} if kind == "unf-probe" else {})}
    if kind == "deepsets":
        return {"hidden": config.deepsets_hidden, "head": list(config.deepsets_head), "features": config.features,
                **norm}
    if kind == "flat":
        return {"hidden": list(config.flat_hidden), "features": config.features, **norm}
    return {}


def _zoo_info(zoo: Any) -> dict[str, Any]:
    import hashlib

    recipe_text = getattr(zoo, "attrs", {}).get("recipe_text") or ""
    return {
        "url": str(zoo.url),
        "fingerprint": zoo.fingerprint,
        "recipe_sha256": hashlib.sha256(recipe_text.encode()).hexdigest() if recipe_text else None,
        "task": zoo.task_name,
        "task_params": zoo.task_params,
        "members": int(zoo.n_members),
        "checkpoint_epochs": [int(e) for e in zoo.checkpoint_epochs],
        "arch": zoo.arch,
    }


def _predictor_config(model: str, data: PredictData, config: TrainConfig, spec: Any, zoo_info: dict[str, Any],
                      params: dict[str, Any], norm: tuple[list[float], list[float]], seed: int) -> dict[str, Any]:
    from pipeline import __version__

    return {
        "kind": MODEL_KINDS[model],
        "model": model,
        "target": data.target,
        "loss": data.loss,
        "output": {"transform": "sigmoid" if data.loss == "bce" else "affine", "y_mean": data.y_mean,
                   "y_std": data.y_std, "clip": _clip_range(data)},
        "spec": spec.to_dict(),
        "normalization": {"names": list(data.names), "mean": norm[0], "std": norm[1]},
        "hyperparameters": params,
        "zoo": zoo_info,
        "training": {"seed": seed, "split": config.split, "split_seed": config.split_seed,
                     "fractions": list(config.fractions), "checkpoints": data.info["checkpoint_epochs"],
                     "train_config": config.to_dict()},
        "eval_batch_size": config.eval_batch_size,
        "package_version": __version__,
    }


def _clip_range(data: PredictData) -> list[float] | None:
    """The target's range, which every prediction is clipped to: [0, 1] for targets in the unit interval (BCE:
    accuracies), else none (targets such as log_lr have no natural bound)."""
    return [0.0, 1.0] if data.loss == "bce" else None


def _predictions_frame(model: str, seed: int, data: PredictData, pred: np.ndarray) -> pd.DataFrame:
    split = np.empty(len(data), dtype=object)
    for s, r in data.rows.items():
        split[r] = s
    zoo = np.asarray([z.get("name", "") for z in data.zoos] or [""], dtype=object)[data.block] if data.zoos else ""
    return pd.DataFrame({"model": model, "seed": seed, "split": split, "zoo": zoo, "width": data.width(),
                         "member": data.member, "epoch": data.epoch, "target": data.y, "prediction": pred})


def _metrics(data: PredictData, pred: np.ndarray) -> dict[str, dict[str, Any]]:
    return {s: split_metrics(pred[r], data.y[r], data.threshold) for s, r in data.rows.items()}


def _fits(spec: Any, kind: str, weights: dict[str, torch.Tensor]) -> bool:
    """Whether a model of `kind` (trained on `spec`) can read these weights: always for width-agnostic kinds; flat
    reads members up to the spec's widths (narrower ones zero-padded)."""
    return WIDTH_AGNOSTIC[kind] or all(a <= b for n in spec.names
                                       for a, b in zip(weights[n].shape[1:], spec.shapes[n]))  # flat pads narrower


@torch.no_grad()
def _raw_outputs(net: torch.nn.Module, data: PredictData, rows: np.ndarray, batch_size: int, device: torch.device,
                 spec: Any = None, kind: str = "unf") -> torch.Tensor:
    """(len(rows),) raw outputs in `rows` order; NaN for rows a fixed-width model cannot read."""
    net.eval()
    out = torch.full((len(rows),), float("nan"), dtype=torch.float64)
    for where, _, weights in data.take(rows):
        if spec is not None and not _fits(spec, kind, weights):
            continue
        n = len(where)
        outs = [net({k: v[i:i + batch_size].to(device) for k, v in weights.items()}) for i in range(0, n, batch_size)]
        if outs:
            out[torch.from_numpy(where)] = torch.cat(outs).double().cpu()
    return out


def _to_target(raw: torch.Tensor, data: PredictData) -> np.ndarray:
    pred = (torch.sigmoid(raw) if data.loss == "bce" else raw * data.y_std + data.y_mean).numpy()
    clip = _clip_range(data)
    return np.clip(pred, *clip) if clip else pred


def _tensorboard_writer(run_dir: Path) -> Any:
    """A TensorBoard SummaryWriter logging into `run_dir` when tensorboard is installed (optional), else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(run_dir))


def _write_history(path: Path, history: list[dict[str, Any]]) -> None:
    atomic_write_csv(pd.DataFrame(history, columns=["epoch", "train_loss", "val_tau", "best_val_tau", "seconds"]),
                     path)


def _save_resume(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def pairwise_rank_loss(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """RankNet loss: mean of softplus(-(s_i - s_j)) over the pairs (i, j) of the batch with target_i > target_j."""
    diff = scores[:, None] - scores[None, :]  # (b, b): s_i - s_j
    above = targets[:, None] > targets[None, :]  # (b, b): pairs ordered i over j
    if not bool(above.any()):
        return scores.sum() * 0.0
    return torch.nn.functional.softplus(-diff[above]).mean()


# a training set's inputs are prepared once (normalized, features, layout) up to this size, else per batch
PREPARED_BYTES_MAX = 1 << 30


@torch.no_grad()
def _prepared_inputs(net: torch.nn.Module, parts: list[tuple[dict[str, torch.Tensor], torch.Tensor, Any]],
                     chunk: int) -> list[list[torch.Tensor]] | None:
    """Per training part, `net.prepare` of all its members (computed in chunks of `chunk` members): the per-member
    inputs every epoch would otherwise recompute for each batch. None when the model has no such split or the
    result would exceed PREPARED_BYTES_MAX (estimated from the first chunk)."""
    if not getattr(net, "preparable", False):
        return None
    members = sum(len(y) for _, y, _ in parts)
    out = []
    for x_part, y_part, _ in parts:
        chunks = []
        for i in range(0, len(y_part), chunk):
            chunks.append(net.prepare({k: v[i:i + chunk] for k, v in x_part.items()}))
            if not out and i == 0:
                per_member = sum(t.numel() * t.element_size() for t in chunks[0]) / min(chunk, len(y_part))
                if per_member * members > PREPARED_BYTES_MAX:
                    return None
        dim = net.prepared_dim
        out.append([c[0] if len(chunks) == 1 else torch.cat(c, dim=dim) for c in zip(*chunks)])
    return out


def _fit_torch(model: str, data: PredictData, config: TrainConfig, spec: Any, seed: int, device: torch.device,
               run_dir: Path, run_key: str, progress: ProgressFn | None
               ) -> tuple[torch.nn.Module, list[dict[str, Any]], int, tuple[list[float], list[float]]]:
    kind = MODEL_KINDS[model]
    params = _hyperparameters(model, config, data.info.get("probe_setup"))
    train_rows = data.rows["train"]
    parts = data.take(train_rows)  # [(positions in train_rows, block, {name: (n_b, *shape_b)})]
    norm = normalization_stats([w for _, _, w in parts], data.names)  # training rows only
    torch.manual_seed(seed)
    net = build_net(kind, spec, params, TensorNormalizer(data.names, *norm)).to(device)
    if kind == "hybrid":
        feats = torch.from_numpy(_features(data, device, config.eval_batch_size, train_rows))  # (n_train, 7T)
        net.set_stat_scaling(feats.mean(dim=0).to(device, torch.float32), feats.std(dim=0).to(device, torch.float32))
    # fused: one kernel over every parameter per step instead of a loop of small ops per tensor (UNF layers hold
    # many parameter blocks, so the per-tensor loop was a fifth of a training step on CPU)
    opt = torch.optim.Adam(net.parameters(), lr=config.lr, fused=device.type in ("cpu", "cuda"))
    y_scaled = torch.as_tensor(data.scaled_y(), dtype=torch.float32)
    train_parts = [({k: v.to(device) for k, v in w.items()}, y_scaled[train_rows[where]].to(device),
                    spec.infer_sizes({k: tuple(v.shape[1:]) for k, v in w.items()}))
                   for where, _, w in parts]
    # the training inputs prepared once (not with augmentation: every batch is then permuted anew)
    prepared = None if config.augment else _prepared_inputs(net, train_parts, config.eval_batch_size)
    val_rows = data.rows["val"]
    val_y = data.y[val_rows]
    # the training steps' forwards: compiled (validation and test predictions stay eager), one graph per batch shape
    forward_prepared, forward = getattr(net, "forward_prepared", None), net  # the former where `prepared` is set
    if config.compile:
        forward = compile_step(net)
        if forward_prepared is not None:
            forward_prepared = compile_step(forward_prepared)
    loss_fn = torch.nn.BCEWithLogitsLoss() if data.loss == "bce" else torch.nn.MSELoss()

    history: list[dict[str, Any]] = []
    best_tau, best_epoch, best_state = -np.inf, 0, {k: v.detach().clone() for k, v in net.state_dict().items()}
    start = 0
    resume_path = run_dir / RESUME_FILE
    if resume_path.is_file():
        st = torch.load(resume_path, map_location=device, weights_only=True)
        if st.get("run_key") == run_key:
            net.load_state_dict(st["net"])
            opt.load_state_dict(st["opt"])
            best_state = st["best_state"]
            best_tau, best_epoch, history, start = st["best_tau"], st["best_epoch"], st["history"], st["epoch"]
    stopped = start > 0 and start - best_epoch >= config.patience
    board = None if stopped else _tensorboard_writer(run_dir)
    for epoch in range(start, config.epochs):
        if stopped:
            break
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)  # batch order depends on (seed, epoch) only
        batches = []  # (part, row indices within the part): a batch never mixes widths
        for p, (_, y_part, _) in enumerate(train_parts):
            order = torch.randperm(len(y_part), generator=gen)
            batches += [(p, order[i:i + config.batch_size]) for i in range(0, len(y_part), config.batch_size)]
        if len(train_parts) > 1:
            batches = [batches[int(i)] for i in torch.randperm(len(batches), generator=gen)]
        net.train()
        total, count = torch.zeros((), device=device), 0
        # the training steps only: every prediction is at "highest"; subnormals (decaying Adam moments) as zero; room
        # for a compiled graph per model, width and batch size
        with matmul_precision(config.matmul_precision), flush_denormals(), \
                recompile_room() if config.compile else nullcontext():
            for p, idx in batches:
                x_part, y_part, sizes = train_parts[p]
                idx = idx.to(device)
                if prepared is not None:
                    scores = forward_prepared(net.select(prepared[p], idx))  # (b,) raw outputs
                else:
                    batch = {k: v.index_select(0, idx) for k, v in x_part.items()}  # {name: (b, *shape)}
                    if config.augment:
                        batch = spec.permute(batch, spec.random_permutation(gen, sizes=sizes, device=device))
                    scores = forward(batch)  # (b,) raw outputs
                loss = loss_fn(scores, y_part[idx])
                if config.rank_weight:
                    loss = loss + config.rank_weight * pairwise_rank_loss(scores, y_part[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, count = total + loss.detach() * len(idx), count + len(idx)  # no host sync per step
        val_pred = _to_target(_raw_outputs(net, data, val_rows, config.eval_batch_size, device), data)
        val_tau = kendall_tau(val_pred, val_y)
        if val_tau > best_tau:
            best_tau, best_epoch = val_tau, epoch + 1
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        history.append({"epoch": epoch + 1, "train_loss": float(total) / max(count, 1), "val_tau": val_tau,
                        "best_val_tau": float(best_tau), "seconds": time.perf_counter() - t0})
        _save_resume(resume_path, {"run_key": run_key, "epoch": epoch + 1, "net": net.state_dict(),
                                   "opt": opt.state_dict(), "best_state": best_state, "best_tau": float(best_tau),
                                   "best_epoch": best_epoch, "history": history})
        _write_history(run_dir / HISTORY_FILE, history)
        if board is not None:
            for key in ("train_loss", "val_tau", "best_val_tau"):
                board.add_scalar(key, history[-1][key], epoch + 1)
            board.flush()
        if progress is not None:
            progress(model, seed, epoch + 1, config.epochs, {"val_tau": val_tau, "best_tau": float(best_tau),
                                                             "train_loss": history[-1]["train_loss"]})
        stopped = epoch + 1 - best_epoch >= config.patience
    if board is not None:
        board.close()
    net.load_state_dict(best_state)
    return net, history, best_epoch, norm


def fit_run(model: str, data: PredictData, config: TrainConfig, spec: Any, seed: int, run_dir: Path,
            zoo_info: dict[str, Any], device: torch.device | None = None, progress: ProgressFn | None = None,
            features: np.ndarray | None = None) -> RunResult:
    """Train one model for one seed, save its predictor into `run_dir`, return its metrics and predictions.

    Selection (early stopping, STATNN candidate choice) reads train and validation rows only; test rows are
    predicted once, after selection. Resumes from `run_dir` when an unfinished run with the same config is there,
    and returns the stored result when the run is already complete.
    """
    from pipeline.device import resolve_device

    device = device or resolve_device(config.device)
    run_dir.mkdir(parents=True, exist_ok=True)
    run_key = config.run_key(model) + f"-seed{seed}"
    done = _load_done(run_dir, run_key, data, device)
    if done is not None:
        return done
    t0 = time.perf_counter()
    kind = MODEL_KINDS[model]
    params = _hyperparameters(model, config, data.info.get("probe_setup"))
    extra: dict[str, Any] = {}
    if kind == "statnn":
        x = features if features is not None else _features(data, device, config.eval_batch_size)
        tr, va = data.rows["train"], data.rows["val"]
        statnn_model, val_taus, _ = fit_statnn(x[tr], data.y[tr], x[va], data.y[va], seed,
                                                config.statnn_candidates, clip=_clip_range(data))
        params = {"family": statnn_model.family, "name": statnn_model.name}
        extra["candidates_val_tau"] = val_taus
        pred = statnn_model.predict(x)
        norm = ([0.0] * len(data.names), [1.0] * len(data.names))  # STATNN standardizes its features itself
        predictor_cfg = _predictor_config(model, data, config, spec, zoo_info, params, norm, seed)
        predictor = Predictor(spec, predictor_cfg, statnn=statnn_model, device=device)
        history, best_epoch = [], None
        _write_history(run_dir / HISTORY_FILE, [{"epoch": 1, "train_loss": None,
                                                 "val_tau": val_taus[statnn_model.name],
                                                 "best_val_tau": val_taus[statnn_model.name],
                                                 "seconds": time.perf_counter() - t0}])
        if progress is not None:
            progress(model, seed, 1, 1, {"val_tau": val_taus[statnn_model.name]})
    else:
        net, history, best_epoch, norm = _fit_torch(model, data, config, spec, seed, device, run_dir, run_key,
                                                     progress)
        pred = _to_target(_raw_outputs(net, data, np.arange(len(data)), config.eval_batch_size, device, spec, kind),
                          data)
        predictor_cfg = _predictor_config(model, data, config, spec, zoo_info, params, norm, seed)
        predictor = Predictor(spec, predictor_cfg, net=net, device=device)
    metrics = _metrics(data, pred)
    predictor.config["training"].update({"best_epoch": best_epoch, "val_tau": metrics["val"]["tau"]})
    save_predictor(predictor, run_dir)
    result = RunResult(model=model, kind=kind, seed=seed, metrics=metrics, history=history, best_epoch=best_epoch,
                       seconds=time.perf_counter() - t0, directory=run_dir,
                       predictions=_predictions_frame(model, seed, data, pred), extra=extra)
    atomic_write_csv(result.predictions, run_dir / PRED_FILE)
    from pipeline.predict.report import clean_json

    atomic_write_text(run_dir / RESULT_FILE, json.dumps(clean_json({"run_key": run_key, **result.to_json()}), indent=2))
    (run_dir / RESUME_FILE).unlink(missing_ok=True)
    return result


def _load_done(run_dir: Path, run_key: str, data: PredictData, device: torch.device) -> RunResult | None:
    """The stored result of a finished run with this key, or None. Rows the run has not predicted yet (an
    `--eval-zoo` added later) are predicted with the saved predictor and the result is rewritten."""
    path = run_dir / RESULT_FILE
    if not (path.is_file() and (run_dir / CONFIG_FILE).is_file() and (run_dir / STATE_FILE).is_file()
            and (run_dir / PRED_FILE).is_file()):
        return None
    try:
        stored = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is damaged ({err}); delete that file (or its folder) to retrain this run") from err
    if not isinstance(stored, dict) or stored.get("run_key") != run_key:
        return None
    result = RunResult(model=stored["model"], kind=stored["kind"], seed=stored["seed"], metrics=stored["metrics"],
                       history=stored["history"], best_epoch=stored["best_epoch"], seconds=stored["seconds"],
                       directory=run_dir, predictions=pd.read_csv(run_dir / PRED_FILE), extra=stored.get("extra", {}))
    have = result.predictions
    if len(have) == len(data) and set(have["split"]) == set(data.rows) and set(stored["metrics"]) == set(data.rows):
        return result
    pred = _predict_saved(run_dir, data, device)
    result.metrics = _metrics(data, pred)
    result.predictions = _predictions_frame(result.model, result.seed, data, pred)
    from pipeline.predict.report import clean_json

    atomic_write_csv(result.predictions, run_dir / PRED_FILE)
    atomic_write_text(path, json.dumps(clean_json({"run_key": run_key, **result.to_json()}), indent=2))
    return result


def _predict_saved(run_dir: Path, data: PredictData, device: torch.device) -> np.ndarray:
    """Predictions of the predictor saved in `run_dir` for every row (NaN where it cannot read the width)."""
    from pipeline.predict.artifacts import load_predictor

    predictor = load_predictor(run_dir, device=str(device))
    out = np.full(len(data), np.nan)
    for where, _, weights in data.take(np.arange(len(data))):
        if _fits(predictor.spec, predictor.kind, weights):
            out[where] = predictor.predict(weights)
    return out


def _features(data: PredictData, device: torch.device, batch_size: int, rows: np.ndarray | None = None) -> np.ndarray:
    """(len(rows), 7T) STATNN features of `rows` (default: every row), in row order."""
    rows = np.arange(len(data)) if rows is None else rows
    out = np.zeros((len(rows), 7 * len(data.names)))
    for where, _, weights in data.take(rows):
        n = len(where)
        chunks = [statnn_features({k: v[i:i + batch_size].to(device) for k, v in weights.items()}, data.names)
                  .cpu().numpy() for i in range(0, n, batch_size)]
        out[where] = np.concatenate(chunks)
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is damaged ({err}); delete it (or use another --out) and run again") from err


def _check_out_dir(out_dir: Path, config: TrainConfig, zoos: list[str]) -> None:
    """Refuse a path that is a file, and refuse to mix runs of a different data setup into one folder (other models,
    seeds or eval zoos may be added)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is an existing file, not a folder; pass a folder path")
    path = out_dir / "train_config.json"
    if not path.is_file():
        return
    old = _read_json(path)
    keys = ("target", "checkpoints", "train_checkpoints", "split", "fractions", "split_seed", "include_diverged",
            "max_members", "loss", "zoos")
    defaults = {"train_checkpoints": "same", "zoos": zoos}  # folders written before these keys existed
    new = {**config.to_dict(), "zoos": zoos}
    diff = [k for k in keys if old.get(k, defaults.get(k)) != new.get(k)]
    if diff:
        was = ", ".join(f"{k}={old.get(k, defaults.get(k))!r}" for k in diff)
        raise ConfigError(f"{out_dir} holds runs with different {', '.join(diff)} ({was}); "
                          "use another --out or delete that folder")


def check_keep_fixed(zoo: Any, labels: tuple[str, ...]) -> None:
    """Raise ConfigError when a `--keep-fixed` label is not a fixed label of `zoo`'s spec (checked before any weights
    are read, so a typo fails at once)."""
    unknown = sorted(set(labels) - set(zoo.spec.fixed_labels))
    if unknown:
        raise ConfigError(f"--keep-fixed {','.join(unknown)}: not a fixed label of {zoo.url}; its fixed labels are "
                          f"{','.join(zoo.spec.fixed_labels)} (`unfzoo inspect` lists them)")


def _open(zoo: Any) -> Any:
    if isinstance(zoo, (str, os.PathLike)):
        from pipeline.zoo.store import Zoo

        return Zoo.open(zoo)
    return zoo


def plan_probe_models(zoos: list[Any], config: TrainConfig) -> tuple[TrainConfig, dict[str, Any] | None, str | None]:
    """(config, probe setup, note): the probe setup when probe models are asked for; with `--model all` on a zoo they
    cannot read (another architecture, an import), the config without them and a note saying why; an explicit
    probe model on such a zoo raises the ConfigError."""
    import dataclasses

    wanted = [m for m in config.models if m in PROBE_MODELS]
    if not wanted:
        return config, None, None
    try:
        return config, training_probe_setup(zoos, config), None
    except ConfigError as err:
        if not set(ALL_MODELS) <= set(config.models):
            raise
        kept = tuple(m for m in config.models if m not in wanted)
        return dataclasses.replace(config, models=kept), None, f"--model all: left out {', '.join(wanted)} ({err})"


def training_probe_setup(zoos: list[Any], config: TrainConfig) -> dict[str, Any]:
    """`probe_setup` of the first training zoo, with the activations of every training zoo; ConfigError naming the
    zoo when the probe models cannot read it (checked before any weights load)."""
    from pipeline.predict.probe import check_probe_names, probe_setup

    setups = [probe_setup(z, config.probes) for z in zoos]
    setup = setups[0]
    setup["activations"] = list(dict.fromkeys(a for s in setups for a in s["activations"]))
    check_probe_names(zoos[0].spec.names, setup["arch"])
    return setup


def _copy_predictor(source: Path, dest: Path) -> None:
    """Copy a saved single predictor (state, then config) into `dest`, each file atomically."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in (STATE_FILE, CONFIG_FILE):
        tmp = dest / (name + ".tmp")
        shutil.copyfile(source / name, tmp)
        os.replace(tmp, dest / name)


def _copy_saved(source: Path, dest: Path) -> None:
    """Copy what `source` holds (a single predictor, or a seed ensemble with its member folders: config and state
    only) into the new folder `dest`."""
    config = json.loads((source / CONFIG_FILE).read_text())
    if config.get("kind") != "ensemble":
        _copy_predictor(source, dest)
        return
    for member in config["members"]:
        _copy_predictor(source / member, dest / member)
    shutil.copyfile(source / CONFIG_FILE, dest / CONFIG_FILE)


def _replace_folder(built: Path, dest: Path) -> None:
    """Put the folder `built` at `dest`, replacing an older one (renamed aside first, removed last)."""
    old = dest.with_name(dest.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.replace(dest, old)
    os.replace(built, dest)
    shutil.rmtree(old, ignore_errors=True)


def _save_model_predictor(dest: Path, runs: list[RunResult]) -> dict[str, Any]:
    """Make `dest` (`<out>/<model>/`, holding the runs' `seed<k>/` folders) the model's default predictor: the seed
    ensemble of every run when it is at least as good as the best seed on validation (`model_choice`), else the best
    seed; with 2+ seeds, `selection.json` says which and both validation taus. Returns the choice."""
    from pipeline.predict.report import clean_json, model_choice

    choice = model_choice(runs, runs[0].model)
    best = next(r for r in runs if r.seed == choice["seed"])
    if choice["predictor"] == "ensemble":
        save_ensemble(dest, [r.directory.relative_to(dest).as_posix() for r in runs],
                      {"val_tau": choice["ensemble_val_tau"], "best_seed_val_tau": choice["best_seed_val_tau"]})
    else:
        _copy_predictor(best.directory, dest)
    if len(runs) >= 2:
        atomic_write_text(dest / SELECTION_FILE, json.dumps(clean_json({
            "model": runs[0].model, **choice, "rule": ENSEMBLE_RULE}), indent=2))
    else:
        (dest / SELECTION_FILE).unlink(missing_ok=True)
    return choice


def _write_selected_unf(out_dir: Path, runs: list[RunResult]) -> None:
    """With two or more UNF forms trained, save the validation-selected one as `<out>/unf-val/` (the predictor of the
    report's "unf-val" row: a copy of what `<out>/<form>/` holds, the better form's seed ensemble or best seed, member
    folders included) with a `selection.json` saying what was chosen and why."""
    from pipeline.predict.report import SELECTED_UNF, clean_json, model_choice, selected_unf_form, unf_form_val_taus

    chosen = selected_unf_form(runs)
    if chosen is None:
        return
    dest = out_dir / SELECTED_UNF
    built = out_dir / (SELECTED_UNF + ".tmp")
    shutil.rmtree(built, ignore_errors=True)
    built.mkdir()
    _copy_saved(out_dir / chosen, built)
    atomic_write_text(built / SELECTION_FILE, json.dumps(clean_json({
        "form": chosen, "mean_val_tau": unf_form_val_taus(runs), **model_choice(runs, chosen),
        "rule": "of the UNF forms trained, the one with the higher mean validation tau over seeds (never test or an "
                "eval zoo); then what <out>/<form>/ holds: " + ENSEMBLE_RULE,
    }), indent=2))
    _replace_folder(built, dest)


def train_predictor(zoo: Any, config: TrainConfig, out_dir: str | os.PathLike[str],
                    progress: ProgressFn | None = None, data: PredictData | None = None,
                    eval_zoos: list[Any] | tuple[Any, ...] = ()) -> TrainResult:
    """Train `config.models` x `config.seeds` predictors on `zoo` (a `Zoo`, a store path, or a list of them: one
    architecture family, any widths, each split on its own) and write `out_dir`:

    `<model>/seed<k>/` (predictor, result.json, history.csv, predictions of each run), `<model>/` (loadable with
    `load_predictor`: with 2+ seeds the seed ensemble when its validation tau is at least the best seed's, else the
    best-validation seed; `selection.json` says which), `unf-val/` (with two or more UNF forms: a copy of the one
    with the better validation tau), `metrics.json`, `predictions.csv`, `comparison.csv/.md`,
    `pairs.csv` and PNG plots. `eval_zoos` are predicted and reported as their own splits ("eval:<name>"), never
    used for selection. Passing `data` (from `build_data`) skips loading the zoos' weights again.
    """
    from pipeline.device import resolve_device
    from pipeline.predict.report import clean_json, summarize, write_report

    zoos = [_open(z) for z in (zoo if isinstance(zoo, (list, tuple)) else [zoo])]
    eval_zoos = [_open(z) for z in eval_zoos]
    for z in (*zoos, *eval_zoos):
        if z.spec is None:
            raise ConfigError(f"zoo {z.url} records no weight-space spec; predictors need one (rebuild or re-import it)")
    check_keep_fixed(zoos[0], config.unf_keep_fixed)
    config, probe, note = plan_probe_models(zoos, config)
    if note is not None:
        import warnings

        warnings.warn(note, stacklevel=2)
    out_dir = Path(out_dir)
    urls = [str(z.url) for z in zoos]
    _check_out_dir(out_dir, config, urls)
    device = resolve_device(config.device)
    data = data if data is not None else build_data(zoos, config, eval_zoos)
    fixed = [m for m in config.models if not WIDTH_AGNOSTIC[MODEL_KINDS[m]]]
    wider = sorted({z["width"] for b, z in enumerate(data.zoos) if z["role"] == "train"
                    and not _fits(zoos[0].spec, "flat", data.blocks[b])})
    if fixed and wider:
        raise ConfigError(f"--model {','.join(fixed)} reads the widths of {zoos[0].url} (at most "
                          f"{zoo_width(zoos[0].spec, zoos[0].weight_shapes)}) and a training zoo has width "
                          f"{', '.join(wider)}; drop {','.join(fixed)} or list the widest zoo first")
    if probe is not None:
        data.info["probe_setup"] = probe
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "train_config.json", json.dumps(
        clean_json({**config.to_dict(), "zoos": urls, "eval_zoos": [str(z.url) for z in eval_zoos]}), indent=2))
    zoo_info = _zoo_info(zoos[0])
    if len(zoos) > 1:
        zoo_info["zoos"] = [_zoo_info(z) for z in zoos]
    spec = zoos[0].spec
    features = None
    runs: list[RunResult] = []
    for model in config.models:
        if MODEL_KINDS[model] == "statnn" and features is None:
            features = _features(data, device, config.eval_batch_size)
        for seed in range(config.seeds):
            runs.append(fit_run(model, data, config, spec, seed, out_dir / model / f"seed{seed}", zoo_info, device,
                                progress, features))
        # the model's default predictor, chosen on validation only: its seed ensemble or its best seed
        _save_model_predictor(out_dir / model, [r for r in runs if r.model == model])
    _write_selected_unf(out_dir, runs)
    data_info = {"target": data.target, "loss": data.loss, "excluded": data.excluded, "counts": data.counts(),
                 "checkpoint_epochs": data.info["checkpoint_epochs"],
                 "train_checkpoint_epochs": data.info.get("train_checkpoint_epochs"),
                 "held_out": data.info.get("held_out"), "threshold": data.threshold,
                 "chance_margin": config.chance_margin, "zoos": data.zoos, "zoo": zoo_info,
                 "clip": _clip_range(data)}
    result = TrainResult(out_dir=out_dir, config=config, runs=runs, summary=summarize(runs, data, config.ensemble),
                         data_info=data_info)
    result.statistics, result.bias_by_width, result.pairs = write_report(result, data)
    return result
