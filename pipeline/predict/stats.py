"""Statistics of a predictor's ranking, computed by the tool (metrics.json, comparison.md), never by hand.

Per model and split: Kendall tau-b, Spearman rho, tau among members above chance, R^2, MAE, mean error (bias), AUC of
"trained vs untrained" (members above the chance threshold are the positives, the prediction is the score), and a
percentile bootstrap interval of tau over members. Per pair of models: a paired bootstrap interval of the tau
difference over the same members (`scipy.stats.bootstrap(..., paired=True)`). Undefined values are NaN (null in
JSON), never a made-up 0.
"""

from __future__ import annotations

import warnings

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.stats import bootstrap, kendalltau, spearmanr

__all__ = ["CONFIDENCE", "N_RESAMPLES", "DEFAULT_CHANCE_MARGIN", "tau", "chance_threshold", "split_statistics",
           "noise_ceiling_tau", "tau_interval", "paired_tau_difference", "pairwise_differences"]

CONFIDENCE = 0.90
N_RESAMPLES = 1000
DEFAULT_CHANCE_MARGIN = 0.05  # "trained" = accuracy above 1/n_classes + this margin


def tau(pred: np.ndarray, true: np.ndarray) -> float:
    """Kendall's tau-b; NaN when undefined (fewer than 2 rows, constant predictions or targets)."""
    pred, true = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    if len(pred) < 2:
        return float("nan")
    return float(kendalltau(pred, true).statistic)


def chance_threshold(target: str, n_classes: int | None, margin: float = DEFAULT_CHANCE_MARGIN) -> float | None:
    """The accuracy above which a member counts as trained: 1/n_classes + margin; None for non-accuracy targets or
    when the number of classes is unknown."""
    if not target.endswith("acc") or not n_classes or n_classes < 2:
        return None
    return 1.0 / n_classes + margin


def noise_ceiling_tau(accuracy: np.ndarray, n_eval: np.ndarray | int, draws: int = 200, seed: int = 0) -> float:
    """The Kendall tau that a perfect predictor of each network's expected accuracy would reach against accuracies
    measured on `n_eval` test samples: the mean tau between `accuracy` (standing in for the expected accuracies) and
    binomial redraws of it on as many samples. Test-set noise caps every predictor near this value; NaN when
    undefined."""
    acc = np.clip(np.asarray(accuracy, dtype=np.float64), 0.0, 1.0)
    n = np.broadcast_to(np.asarray(n_eval, dtype=np.int64), acc.shape)
    if len(acc) < 2 or (n < 1).any():
        return float("nan")
    rng = np.random.default_rng(seed)
    return float(np.nanmean([tau(rng.binomial(n, acc) / n, acc) for _ in range(draws)]))


def _r2(pred: np.ndarray, true: np.ndarray) -> float:
    if len(true) < 2:
        return float("nan")
    ss_tot = float(((true - true.mean()) ** 2).sum())
    return 1.0 - float(((true - pred) ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan")


def split_statistics(pred: np.ndarray, true: np.ndarray, threshold: float | None = None) -> dict[str, float]:
    """Every per-split statistic of predictions `pred` against targets `true` (1-d, same length, finite)."""
    from sklearn.metrics import roc_auc_score

    pred, true = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    n = len(true)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant inputs: the statistic is NaN, which is what we report
        return _split_statistics(pred, true, n, threshold, roc_auc_score)


def _split_statistics(pred: np.ndarray, true: np.ndarray, n: int, threshold: float | None, roc_auc_score: Any
                      ) -> dict[str, Any]:
    out: dict[str, Any] = {
        "n": int(n),
        "tau": tau(pred, true),
        "spearman": float(spearmanr(pred, true).statistic) if n > 1 else float("nan"),
        "r2": _r2(pred, true),
        "mae": float(np.abs(pred - true).mean()) if n else float("nan"),
        "bias": float((pred - true).mean()) if n else float("nan"),  # mean error: > 0 over-predicts
        "threshold": threshold,
        "n_above": None, "tau_above": float("nan"), "auc": float("nan"),
    }
    if threshold is not None:
        above = true > threshold
        out["n_above"] = int(above.sum())
        out["tau_above"] = tau(pred[above], true[above])
        if 0 < above.sum() < n:
            out["auc"] = float(roc_auc_score(above, pred))
    return out


def _tau_stat(pred: np.ndarray, true: np.ndarray) -> float:
    t = kendalltau(pred, true).statistic
    return float(t) if np.isfinite(t) else 0.0


def tau_interval(pred: np.ndarray | Sequence[np.ndarray], true: np.ndarray, seed: int = 0,
                 n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile bootstrap interval of Kendall tau over members (rows resampled with replacement). `pred` may be a
    list of (N,) predictions, one per model seed: then the statistic is their mean tau, every seed on the same
    resampled members."""
    preds = [np.asarray(p, dtype=np.float64) for p in ([pred] if np.ndim(pred) == 1 else pred)]
    true = np.asarray(true, dtype=np.float64)
    if len(true) < 3 or np.ptp(true) == 0 or all(np.ptp(p) == 0 for p in preds):
        return float("nan"), float("nan")

    def stat(t: np.ndarray, *p: np.ndarray) -> float:
        return float(np.mean([_tau_stat(x, t) for x in p]))

    res = bootstrap((true, *preds), stat, paired=True, vectorized=False, n_resamples=n_resamples,
                    confidence_level=confidence, method="percentile", random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def paired_tau_difference(preds_a: Sequence[np.ndarray], preds_b: Sequence[np.ndarray], true: np.ndarray,
                          seed: int = 0, n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE
                          ) -> dict[str, float]:
    """Mean over seeds of tau(a) minus mean over seeds of tau(b), with a paired percentile bootstrap interval: every
    resample draws the same members for both models (and all their seeds). `preds_a`/`preds_b`: one (N,) array per
    seed, rows aligned with `true`."""
    true = np.asarray(true, dtype=np.float64)
    a = [np.asarray(p, dtype=np.float64) for p in preds_a]
    b = [np.asarray(p, dtype=np.float64) for p in preds_b]

    ka = len(a)

    def stat(t: np.ndarray, *p: np.ndarray) -> float:
        return float(np.mean([_tau_stat(x, t) for x in p[:ka]]) - np.mean([_tau_stat(x, t) for x in p[ka:]]))

    diff = stat(true, *a, *b)
    if len(true) < 3:
        return {"diff": diff, "low": float("nan"), "high": float("nan"), "n": int(len(true))}
    res = bootstrap((true, *a, *b), stat, paired=True, vectorized=False, n_resamples=n_resamples,
                    confidence_level=confidence, method="percentile", random_state=np.random.default_rng(seed))
    return {"diff": diff, "low": float(res.confidence_interval.low), "high": float(res.confidence_interval.high),
            "n": int(len(true))}

def pairwise_differences(preds: Mapping[str, Sequence[np.ndarray]], true: np.ndarray, seed: int = 0,
                         n_resamples: int = N_RESAMPLES) -> list[dict[str, Any]]:
    """`paired_tau_difference` for every pair (a before b in `preds` order)."""
    names = list(preds)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            out.append({"a": a, "b": b, **paired_tau_difference(preds[a], preds[b], true, seed, n_resamples)})
    return out
