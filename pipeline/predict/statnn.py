"""The STATNN regressors: scikit-learn gradient boosting and MLP on standardized STATNN features, picked on
validation Kendall tau, exported to plain arrays (safetensors) and evaluated with numpy, so a saved predictor never
needs unpickling."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import kendalltau

__all__ = ["StatNNModel", "STATNN_CANDIDATES", "fit_statnn"]

# (name, family, parameters): small grid, picked on the validation split only.
STATNN_CANDIDATES: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("gbr-d3", "gbr", {"n_estimators": 300, "max_depth": 3, "learning_rate": 0.05, "subsample": 0.8}),
    ("gbr-d5", "gbr", {"n_estimators": 200, "max_depth": 5, "learning_rate": 0.05, "subsample": 0.8}),
    ("mlp-a1e-3", "mlp", {"hidden_layer_sizes": (256, 256), "alpha": 1e-3}),
    ("mlp-a1e-1", "mlp", {"hidden_layer_sizes": (256, 256), "alpha": 1e-1}),
)


def _tau(a: np.ndarray, b: np.ndarray) -> float:
    t = kendalltau(a, b).statistic
    return float(t) if np.isfinite(t) else -1.0


@dataclass
class StatNNModel:
    """A fitted STATNN regressor as arrays: x -> (x - x_mean) / x_scale -> gbr or mlp -> y * y_std + y_mean, clipped
    to `y_clip` (the target's range, e.g. [0, 1] for accuracies) when present."""

    family: str  # "gbr" | "mlp"
    name: str
    arrays: dict[str, np.ndarray]

    def predict(self, features: np.ndarray) -> np.ndarray:
        """(N, F) features -> (N,) predictions in target units."""
        a = self.arrays
        x = (np.asarray(features, dtype=np.float64) - a["x_mean"]) / a["x_scale"]  # (N, F)
        raw = _predict_gbr(a, x) if self.family == "gbr" else _predict_mlp(a, x)
        y = raw * float(a["y_std"][0]) + float(a["y_mean"][0])
        return np.clip(y, a["y_clip"][0], a["y_clip"][1]) if "y_clip" in a else y  # stay in the target's range

    def tensors(self) -> dict[str, np.ndarray]:
        return dict(self.arrays)

    @classmethod
    def from_tensors(cls, family: str, name: str, arrays: dict[str, np.ndarray]) -> StatNNModel:
        return cls(family=family, name=name, arrays={k: np.asarray(v) for k, v in arrays.items()})


def _predict_mlp(a: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    n_layers = int(a["mlp_layers"][0])
    h = x
    for i in range(n_layers):
        h = h @ a[f"mlp_w{i}"] + a[f"mlp_b{i}"]
        if i < n_layers - 1:
            h = np.maximum(h, 0.0)  # relu (sklearn's default activation)
    return h[:, 0]


def _predict_gbr(a: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    # Every tree at once: node index per (sample, tree), walked down until all are at leaves. sklearn's trees compare
    # float32 features with float64 thresholds; do the same so predictions agree exactly.
    x32 = x.astype(np.float32).astype(np.float64)
    left, right, feature, threshold, value = (a["gbr_left"], a["gbr_right"], a["gbr_feature"], a["gbr_threshold"],
                                             a["gbr_value"])
    node = np.broadcast_to(a["gbr_roots"], (x.shape[0], a["gbr_roots"].shape[0])).copy()  # (N, T)
    rows = np.arange(x.shape[0])[:, None]
    while True:
        is_leaf = left[node] < 0
        if is_leaf.all():
            break
        go_left = x32[rows, np.maximum(feature[node], 0)] <= threshold[node]
        node = np.where(is_leaf, node, np.where(go_left, left[node], right[node]))
    return float(a["gbr_init"][0]) + float(a["gbr_lr"][0]) * value[node].sum(axis=1)


def _export_gbr(model: Any) -> dict[str, np.ndarray]:
    lefts, rights, feats, thrs, vals, roots = [], [], [], [], [], []
    offset = 0
    for est in model.estimators_[:, 0]:
        t = est.tree_
        roots.append(offset)
        lefts.append(np.where(t.children_left >= 0, t.children_left + offset, -1))
        rights.append(np.where(t.children_right >= 0, t.children_right + offset, -1))
        feats.append(t.feature.astype(np.int64))
        thrs.append(t.threshold.astype(np.float64))
        vals.append(t.value[:, 0, 0].astype(np.float64))
        offset += t.node_count
    init = float(np.asarray(model.init_.constant_).reshape(-1)[0])
    return {
        "gbr_left": np.concatenate(lefts).astype(np.int64),
        "gbr_right": np.concatenate(rights).astype(np.int64),
        "gbr_feature": np.concatenate(feats),
        "gbr_threshold": np.concatenate(thrs),
        "gbr_value": np.concatenate(vals),
        "gbr_roots": np.asarray(roots, dtype=np.int64),
        "gbr_init": np.asarray([init]),
        "gbr_lr": np.asarray([float(model.learning_rate)]),
    }


def _export_mlp(model: Any) -> dict[str, np.ndarray]:
    if model.activation != "relu" or model.out_activation_ != "identity":  # what _predict_mlp evaluates
        raise ValueError(f"STATNN exports relu MLP regressors only, got activation {model.activation!r}")
    out: dict[str, np.ndarray] = {"mlp_layers": np.asarray([len(model.coefs_)], dtype=np.int64)}
    for i, (w, b) in enumerate(zip(model.coefs_, model.intercepts_)):
        out[f"mlp_w{i}"] = np.asarray(w, dtype=np.float64)
        out[f"mlp_b{i}"] = np.asarray(b, dtype=np.float64)
    return out


def fit_statnn(
    x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, seed: int,
    candidates: tuple[str, ...] | None = None, clip: list[float] | None = None,
) -> tuple[StatNNModel, dict[str, float], Any]:
    """Fit every candidate on train and keep the best validation tau (test is never seen here).

    Returns (exported model, {candidate: validation tau}, the winner's scikit-learn estimator, which takes
    standardized features and predicts standardized targets). `clip` [lo, hi]: the saved model clips its
    predictions to it (the target's range)."""
    from sklearn.ensemble import GradientBoostingRegressor
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPRegressor

    x_mean = x_train.mean(axis=0)
    x_scale = x_train.std(axis=0)
    x_scale = np.where(x_scale > 1e-12, x_scale, 1.0)
    y_mean, y_std = float(y_train.mean()), float(y_train.std()) or 1.0
    xs_train = (x_train - x_mean) / x_scale
    ys_train = (y_train - y_mean) / y_std
    common = {"x_mean": x_mean, "x_scale": x_scale, "y_mean": np.asarray([y_mean]), "y_std": np.asarray([y_std])}
    if clip is not None:
        common["y_clip"] = np.asarray(clip, dtype=np.float64)

    best: tuple[float, StatNNModel, Any] | None = None
    val_taus: dict[str, float] = {}
    for name, family, params in STATNN_CANDIDATES:
        if candidates is not None and name not in candidates:
            continue
        if family == "gbr":
            est = GradientBoostingRegressor(random_state=seed, **params)
        else:
            est = MLPRegressor(random_state=seed, max_iter=300, early_stopping=True, **params)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            est.fit(xs_train, ys_train)
        arrays = {**common, **(_export_gbr(est) if family == "gbr" else _export_mlp(est))}
        model = StatNNModel(family=family, name=name, arrays=arrays)
        val_taus[name] = _tau(model.predict(x_val), y_val)
        if best is None or val_taus[name] > best[0]:
            best = (val_taus[name], model, est)
    assert best is not None
    return best[1], val_taus, best[2]
