"""Reports of a `train_predictor` call: metrics.json, predictions.csv, the comparison table and PNG plots."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from pipeline.predict.train import RunResult, TrainResult

__all__ = ["summarize", "comparison_markdown", "write_report", "plot_test_scatter", "plot_val_tau"]


def _spread(values: list[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarize(runs: list[RunResult]) -> pd.DataFrame:
    """One row per model: mean and spread (sample std over seeds) of test/val tau, test R^2 and MAE."""
    rows = []
    for model in dict.fromkeys(r.model for r in runs):
        mine = [r for r in runs if r.model == model]
        test_tau = [r.metrics["test"]["tau"] for r in mine]
        val_tau = [r.metrics["val"]["tau"] for r in mine]
        rows.append({
            "model": model,
            "seeds": len(mine),
            "test_tau_mean": float(np.mean(test_tau)),
            "test_tau_std": _spread(test_tau),
            "val_tau_mean": float(np.mean(val_tau)),
            "val_tau_std": _spread(val_tau),
            "test_r2_mean": float(np.mean([r.metrics["test"]["r2"] for r in mine])),
            "test_mae_mean": float(np.mean([r.metrics["test"]["mae"] for r in mine])),
            "best_seed": int(mine[int(np.argmax(val_tau))].seed),
            "seconds": float(sum(r.seconds for r in mine)),
        })
    return pd.DataFrame(rows)


def _pm(mean: float, std: float) -> str:
    return f"{mean:.3f} ± {std:.3f}"


def comparison_markdown(summary: pd.DataFrame) -> str:
    """The comparison as a Markdown table (mean ± sample std over seeds)."""
    lines = ["| model | test tau | val tau | test R^2 | test MAE | seeds |", "|---|---|---|---|---|---|"]
    for r in summary.itertuples():
        lines.append(f"| {r.model} | {_pm(r.test_tau_mean, r.test_tau_std)} | {_pm(r.val_tau_mean, r.val_tau_std)} | "
                     f"{r.test_r2_mean:.3f} | {r.test_mae_mean:.4f} | {r.seeds} |")
    return "\n".join(lines) + "\n"


def _clean(obj: Any) -> Any:
    """JSON without NaN: non-finite floats become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def plot_test_scatter(runs: list[RunResult], path: Any, target: str) -> None:
    """Predicted vs true on the test split, one panel per model (its best-validation seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.model for r in runs))
    fig, axes = plt.subplots(1, len(models), figsize=(3.6 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        best = max((r for r in runs if r.model == model), key=lambda r: r.metrics["val"]["tau"])
        test = best.predictions[best.predictions["split"] == "test"]
        ax.scatter(test["target"], test["prediction"], s=6, alpha=0.5)
        lo = float(np.nanmin([test["target"].min(), test["prediction"].min()]))
        hi = float(np.nanmax([test["target"].max(), test["prediction"].max()]))
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8)
        ax.set_title(f"{model} (seed {best.seed}): tau {best.metrics['test']['tau']:.3f}", fontsize=9)
        ax.set_xlabel(f"true {target}")
        ax.set_ylabel("predicted")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_val_tau(runs: list[RunResult], path: Any) -> None:
    """Validation tau per epoch for every torch run (STATNN has no epochs: drawn as a horizontal line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    models = list(dict.fromkeys(r.model for r in runs))
    colors = {m: f"C{i}" for i, m in enumerate(models)}
    for r in runs:
        label = r.model if r.seed == min(x.seed for x in runs if x.model == r.model) else None
        if r.history:
            ax.plot([h["epoch"] for h in r.history], [h["val_tau"] for h in r.history], color=colors[r.model],
                    alpha=0.8, label=label)
        else:
            ax.axhline(r.metrics["val"]["tau"], color=colors[r.model], ls="--", alpha=0.8, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation Kendall tau")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(result: TrainResult) -> None:
    """Write metrics.json, predictions.csv, comparison.csv/.md, test_scatter.png and val_tau.png into the out dir."""
    out = result.out_dir
    metrics = {
        "config": result.config.to_dict(),
        "data": result.data_info,
        "summary": result.summary.to_dict(orient="records"),
        "runs": [r.to_json() for r in result.runs],
    }
    (out / "metrics.json").write_text(json.dumps(_clean(metrics), indent=2))
    pd.concat([r.predictions for r in result.runs], ignore_index=True).to_csv(out / "predictions.csv", index=False)
    result.summary.to_csv(out / "comparison.csv", index=False)
    (out / "comparison.md").write_text(comparison_markdown(result.summary))
    plot_test_scatter(result.runs, out / "test_scatter.png", result.data_info["target"])
    plot_val_tau(result.runs, out / "val_tau.png")
