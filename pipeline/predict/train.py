"""`train_predictor`: fit every requested model kind for every seed on one zoo split, select on validation only,
evaluate test once at the end, write artifacts and reports. Interrupted runs resume from their last epoch."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.stats import kendalltau
from sklearn.metrics import mean_absolute_error, r2_score

from pipeline.errors import ConfigError
from pipeline.predict.artifacts import CONFIG_FILE, STATE_FILE, Predictor, save_predictor
from pipeline.predict.config import MODEL_KINDS, TrainConfig
from pipeline.predict.data import SPLITS, PredictData, build_data, normalization_stats
from pipeline.predict.features import statnn_features
from pipeline.predict.models import TensorNormalizer, build_net
from pipeline.predict.statnn import fit_statnn

__all__ = ["RunResult", "TrainResult", "train_predictor", "fit_run", "split_metrics", "kendall_tau"]

# progress(model, seed, epoch, total_epochs, info) is called after every epoch (once for STATNN).
ProgressFn = Callable[[str, int, int, int, dict[str, Any]], None]
RESULT_FILE, RESUME_FILE, PRED_FILE = "result.json", "resume.pt", "predictions.csv"


def kendall_tau(pred: np.ndarray, true: np.ndarray) -> float:
    """Kendall's tau-b; NaN (e.g. constant predictions) counts as -1 so it never wins a selection."""
    if len(pred) < 2:
        return -1.0
    t = kendalltau(pred, true).statistic
    return float(t) if np.isfinite(t) else -1.0


def split_metrics(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """tau, R^2 and MAE of predictions against targets."""
    return {
        "tau": kendall_tau(pred, true),
        "r2": float(r2_score(true, pred)) if len(true) > 1 else float("nan"),
        "mae": float(mean_absolute_error(true, pred)),
        "n": int(len(true)),
    }


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

    def predictor_dir(self, model: str) -> Path:
        return self.out_dir / model


def _hyperparameters(model: str, config: TrainConfig) -> dict[str, Any]:
    kind = MODEL_KINDS[model]
    if kind == "unf":
        return {"hidden": list(config.unf_hidden), "head": list(config.unf_head),
                "fixed_axes": "permutable" if model == "unf-perm" else "exact", "features": config.features}
    if kind == "deepsets":
        return {"hidden": config.deepsets_hidden, "head": list(config.deepsets_head), "features": config.features}
    if kind == "flat":
        return {"hidden": list(config.flat_hidden), "features": config.features}
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
                   "y_std": data.y_std},
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


def _predictions_frame(model: str, seed: int, data: PredictData, pred: np.ndarray) -> pd.DataFrame:
    split = np.empty(len(data), dtype=object)
    for s in SPLITS:
        split[data.rows[s]] = s
    return pd.DataFrame({"model": model, "seed": seed, "split": split, "member": data.member, "epoch": data.epoch,
                         "target": data.y, "prediction": pred})


def _metrics(data: PredictData, pred: np.ndarray) -> dict[str, dict[str, float]]:
    return {s: split_metrics(pred[data.rows[s]], data.y[data.rows[s]]) for s in SPLITS}


@torch.no_grad()
def _raw_outputs(net: torch.nn.Module, weights: dict[str, torch.Tensor], batch_size: int,
                 device: torch.device) -> torch.Tensor:
    net.eval()
    n = next(iter(weights.values())).shape[0]
    outs = [net({k: v[i:i + batch_size].to(device) for k, v in weights.items()}) for i in range(0, n, batch_size)]
    return torch.cat(outs).double().cpu() if outs else torch.zeros(0, dtype=torch.float64)


def _to_target(raw: torch.Tensor, data: PredictData) -> np.ndarray:
    return (torch.sigmoid(raw) if data.loss == "bce" else raw * data.y_std + data.y_mean).numpy()


def _save_resume(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _fit_torch(model: str, data: PredictData, config: TrainConfig, spec: Any, seed: int, device: torch.device,
               run_dir: Path, run_key: str, progress: ProgressFn | None
               ) -> tuple[torch.nn.Module, list[dict[str, Any]], int, tuple[list[float], list[float]]]:
    kind = MODEL_KINDS[model]
    params = _hyperparameters(model, config)
    train_w = data.subset("train")
    norm = normalization_stats(train_w, data.names)  # training rows only
    torch.manual_seed(seed)
    net = build_net(kind, spec, params, TensorNormalizer(data.names, *norm)).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    y_scaled = torch.as_tensor(data.scaled_y(), dtype=torch.float32)
    train_x = {k: v.to(device) for k, v in train_w.items()}
    train_y = y_scaled[data.rows["train"]].to(device)  # (n_train,)
    val_x = {k: v.to(device) for k, v in data.subset("val").items()}
    val_y = data.y[data.rows["val"]]
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
    n_train = len(data.rows["train"])
    stopped = start > 0 and start - best_epoch >= config.patience
    for epoch in range(start, config.epochs):
        if stopped:
            break
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)  # batch order depends on (seed, epoch) only
        order = torch.randperm(n_train, generator=gen)
        net.train()
        total, count = torch.zeros((), device=device), 0
        for i in range(0, n_train, config.batch_size):
            idx = order[i:i + config.batch_size].to(device)
            batch = {k: v.index_select(0, idx) for k, v in train_x.items()}  # {name: (b, *shape)}
            if config.augment:
                batch = spec.permute(batch, spec.random_permutation(gen, device=device))
            loss = loss_fn(net(batch), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, count = total + loss.detach() * len(idx), count + len(idx)  # no host sync per step
        val_pred = _to_target(_raw_outputs(net, val_x, config.eval_batch_size, device), data)
        val_tau = kendall_tau(val_pred, val_y)
        if val_tau > best_tau:
            best_tau, best_epoch = val_tau, epoch + 1
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        history.append({"epoch": epoch + 1, "train_loss": float(total) / max(count, 1), "val_tau": val_tau,
                        "seconds": time.perf_counter() - t0})
        _save_resume(resume_path, {"run_key": run_key, "epoch": epoch + 1, "net": net.state_dict(),
                                   "opt": opt.state_dict(), "best_state": best_state, "best_tau": float(best_tau),
                                   "best_epoch": best_epoch, "history": history})
        if progress is not None:
            progress(model, seed, epoch + 1, config.epochs, {"val_tau": val_tau, "best_tau": float(best_tau)})
        stopped = epoch + 1 - best_epoch >= config.patience
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
    done = _load_done(run_dir, run_key)
    if done is not None:
        return done
    t0 = time.perf_counter()
    kind = MODEL_KINDS[model]
    params = _hyperparameters(model, config)
    extra: dict[str, Any] = {}
    if kind == "statnn":
        x = features if features is not None else _features(data, device, config.eval_batch_size)
        tr, va = data.rows["train"], data.rows["val"]
        statnn_model, val_taus, _ = fit_statnn(x[tr], data.y[tr], x[va], data.y[va], seed,
                                                config.statnn_candidates)
        params = {"family": statnn_model.family, "name": statnn_model.name}
        extra["candidates_val_tau"] = val_taus
        pred = statnn_model.predict(x)
        norm = ([0.0] * len(data.names), [1.0] * len(data.names))  # STATNN standardizes its features itself
        predictor_cfg = _predictor_config(model, data, config, spec, zoo_info, params, norm, seed)
        predictor = Predictor(spec, predictor_cfg, statnn=statnn_model, device=device)
        history, best_epoch = [], None
        if progress is not None:
            progress(model, seed, 1, 1, {"val_tau": val_taus[statnn_model.name]})
    else:
        net, history, best_epoch, norm = _fit_torch(model, data, config, spec, seed, device, run_dir, run_key,
                                                     progress)
        pred = _to_target(_raw_outputs(net, data.weights, config.eval_batch_size, device), data)
        predictor_cfg = _predictor_config(model, data, config, spec, zoo_info, params, norm, seed)
        predictor = Predictor(spec, predictor_cfg, net=net, device=device)
    metrics = _metrics(data, pred)
    predictor.config["training"].update({"best_epoch": best_epoch, "val_tau": metrics["val"]["tau"]})
    save_predictor(predictor, run_dir)
    result = RunResult(model=model, kind=kind, seed=seed, metrics=metrics, history=history, best_epoch=best_epoch,
                       seconds=time.perf_counter() - t0, directory=run_dir,
                       predictions=_predictions_frame(model, seed, data, pred), extra=extra)
    result.predictions.to_csv(run_dir / PRED_FILE, index=False)
    (run_dir / RESULT_FILE).write_text(json.dumps({"run_key": run_key, **result.to_json()}, indent=2))
    (run_dir / RESUME_FILE).unlink(missing_ok=True)
    return result


def _load_done(run_dir: Path, run_key: str) -> RunResult | None:
    path = run_dir / RESULT_FILE
    if not (path.is_file() and (run_dir / CONFIG_FILE).is_file() and (run_dir / STATE_FILE).is_file()
            and (run_dir / PRED_FILE).is_file()):
        return None
    stored = json.loads(path.read_text())
    if stored.get("run_key") != run_key:
        return None
    return RunResult(model=stored["model"], kind=stored["kind"], seed=stored["seed"], metrics=stored["metrics"],
                     history=stored["history"], best_epoch=stored["best_epoch"], seconds=stored["seconds"],
                     directory=run_dir, predictions=pd.read_csv(run_dir / PRED_FILE), extra=stored.get("extra", {}))


def _features(data: PredictData, device: torch.device, batch_size: int) -> np.ndarray:
    n = len(data)
    chunks = [statnn_features({k: v[i:i + batch_size].to(device) for k, v in data.weights.items()}, data.names)
              .cpu().numpy() for i in range(0, n, batch_size)]
    return np.concatenate(chunks) if chunks else np.zeros((0, 7 * len(data.names)))


def _check_out_dir(out_dir: Path, config: TrainConfig) -> None:
    """Refuse to mix runs of a different data setup into one folder (other models/seeds may be added)."""
    path = out_dir / "train_config.json"
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    keys = ("target", "checkpoints", "split", "fractions", "split_seed", "include_diverged", "max_members", "loss")
    new = config.to_dict()
    diff = [k for k in keys if old.get(k) != new.get(k)]
    if diff:
        was = ", ".join(f"{k}={old.get(k)!r}" for k in diff)
        raise ConfigError(f"{out_dir} holds runs with different {', '.join(diff)} ({was}); "
                          "use another --out or delete that folder")


def train_predictor(zoo: Any, config: TrainConfig, out_dir: str | os.PathLike[str],
                    progress: ProgressFn | None = None, data: PredictData | None = None) -> TrainResult:
    """Train `config.models` x `config.seeds` predictors on `zoo` (a `Zoo` or a store path) and write `out_dir`:

    `<model>/seed<k>/` (predictor + result + predictions of each run), `<model>/` (the seed with the best
    validation tau, loadable with `load_predictor`), `metrics.json`, `predictions.csv`, `comparison.csv/.md` and
    PNG plots. Passing `data` (from `build_data`) skips loading the zoo's weights again.
    """
    from pipeline.device import resolve_device
    from pipeline.predict.report import summarize, write_report

    if isinstance(zoo, (str, os.PathLike)):
        from pipeline.store import Zoo

        zoo = Zoo.open(zoo)
    if zoo.spec is None:
        raise ConfigError(f"zoo {zoo.url} records no weight-space spec; predictors need one (rebuild or re-import it)")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, config)
    device = resolve_device(config.device)
    data = data if data is not None else build_data(zoo, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2))
    zoo_info = _zoo_info(zoo)
    spec = zoo.spec
    features = None
    runs: list[RunResult] = []
    for model in config.models:
        if MODEL_KINDS[model] == "statnn" and features is None:
            features = _features(data, device, config.eval_batch_size)
        for seed in range(config.seeds):
            runs.append(fit_run(model, data, config, spec, seed, out_dir / model / f"seed{seed}", zoo_info, device,
                                progress, features))
        # the model's default predictor: the seed with the best validation tau (never test)
        best = max((r for r in runs if r.model == model), key=lambda r: r.metrics["val"]["tau"])
        for name in (CONFIG_FILE, STATE_FILE):
            shutil.copyfile(best.directory / name, out_dir / model / name)
    data_info = {"target": data.target, "loss": data.loss, "excluded": data.excluded, "counts": data.counts(),
                 "checkpoint_epochs": data.info["checkpoint_epochs"], "zoo": zoo_info}
    result = TrainResult(out_dir=out_dir, config=config, runs=runs, summary=summarize(runs), data_info=data_info)
    write_report(result)
    return result
