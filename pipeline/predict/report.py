"""Reports of a `train_predictor` call: metrics.json, predictions.csv, comparison.csv/.md, pairs.csv and PNG plots.

Every figure comes from `pipeline.predict.stats`: per model and split (test, val and each `eval:<zoo>`) the mean over
model seeds of Kendall tau, Spearman, tau among members above chance, R^2, MAE, bias and AUC, a 90% bootstrap interval
of tau over members, the seed spread (only with 2+ seeds), the bias per width, and for every pair of models the
paired bootstrap interval of their tau difference over the same members.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipeline.predict.config import SELECTED_UNF, UNF_FORMS
from pipeline.predict.stats import (CONFIDENCE, noise_ceiling_tau, pairwise_differences, split_statistics,
                                    tau_interval)

if TYPE_CHECKING:
    from pipeline.predict.data import PredictData
    from pipeline.predict.train import RunResult, TrainResult

__all__ = ["summarize", "statistics_table", "selected_unf_form", "unf_form_val_taus", "seed_or_ensemble",
           "model_choice", "SELECTED_UNF", "comparison_markdown", "write_report", "plot_test_scatter",
           "plot_val_tau", "clean_json", "model_predictions"]

_STATS = ("tau", "spearman", "tau_above", "r2", "mae", "bias", "auc")


def _spread(values: list[float]) -> float:
    v = [x for x in values if x is not None and np.isfinite(x)]
    return float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")


def _mean(values: list[Any]) -> float:
    v = [x for x in values if x is not None and np.isfinite(x)]
    return float(np.mean(v)) if v else float("nan")


def unf_form_val_taus(runs: list[RunResult]) -> dict[str, float]:
    """{form: mean validation tau over its seeds} of the UNF forms among `runs` (a non-finite tau counts as -1)."""
    return {m: _mean([r.val_tau for r in runs_of(runs, m)]) for m in UNF_FORMS if runs_of(runs, m)}


def selected_unf_form(runs: list[RunResult]) -> str | None:
    """When two or more UNF forms were trained: the one with the higher mean validation tau over seeds (never test).
    Neither fixed-axes form wins on every zoo (the tied one on cnn-digits, the exact one on the MLP zoos), and
    validation picked the form that won the held-out groups in every comparison measured (docs/results.md); None
    otherwise."""
    taus = unf_form_val_taus(runs)
    return max(taus, key=taus.__getitem__) if len(taus) >= 2 else None


def seed_or_ensemble(seed_preds: Mapping[int, np.ndarray], true: np.ndarray) -> dict[str, Any]:
    """The validation-only choice of a model's saved predictor from its seeds' validation predictions
    ({seed: (n_val,)}) and targets: "ensemble" (the mean prediction over seeds) when there are 2+ seeds and its
    Kendall tau is at least the best seed's, else "seed" (the best seed). Returns what was chosen and every tau."""
    from pipeline.predict.train import kendall_tau

    taus = {int(s): kendall_tau(np.asarray(p, dtype=np.float64), true) for s, p in seed_preds.items()}
    best = max(taus, key=taus.__getitem__)
    ens = kendall_tau(np.mean(list(seed_preds.values()), axis=0), true) if len(taus) >= 2 else None
    return {"predictor": "ensemble" if ens is not None and ens >= taus[best] else "seed", "seed": best,
            "seeds": list(taus), "best_seed_val_tau": taus[best], "ensemble_val_tau": ens, "seed_val_tau": taus}


def model_choice(runs: list[RunResult], model: str) -> dict[str, Any]:
    """`seed_or_ensemble` of `model`'s runs on the validation rows: what `<out>/<model>/` holds."""
    mine = runs_of(runs, model)
    val = (mine[0].predictions["split"] == "val").to_numpy()
    true = mine[0].predictions["target"].to_numpy(dtype=np.float64)[val]
    return seed_or_ensemble({r.seed: r.predictions["prediction"].to_numpy(dtype=np.float64)[val] for r in mine}, true)


def _selected_unf(runs: list[RunResult]) -> tuple[str | None, bool]:
    """(the UNF form "unf-val" stands for or None, whether its saved predictor is the seed ensemble)."""
    chosen = selected_unf_form(runs)
    return chosen, chosen is not None and model_choice(runs, chosen)["predictor"] == "ensemble"


def model_predictions(runs: list[RunResult], ensemble: bool = False) -> dict[str, list[np.ndarray]]:
    """{model: [(R,) predictions of each seed]} in data row order; with `ensemble`, also "<model>-ens": the mean
    prediction over seeds (models with 2+ seeds); with two or more UNF forms, also "unf-val": what `<out>/unf-val/`
    holds, the form with the better validation tau (`selected_unf_form`): its seeds, or its mean prediction over
    seeds (one entry) when its saved predictor is the seed ensemble (`model_choice`)."""
    preds: dict[str, list[np.ndarray]] = {}
    for r in runs:
        preds.setdefault(r.model, []).append(r.predictions["prediction"].to_numpy(dtype=np.float64))
    if ensemble:
        for model in list(preds):
            if len(preds[model]) > 1:
                preds[f"{model}-ens"] = [np.mean(preds[model], axis=0)]
    chosen, as_ensemble = _selected_unf(runs)
    if chosen is not None:
        preds[SELECTED_UNF] = [np.mean(preds[chosen], axis=0)] if as_ensemble else list(preds[chosen])
    return preds


def summarize(runs: list[RunResult], data: PredictData | None = None, ensemble: bool = False) -> pd.DataFrame:
    """One row per model: mean and spread (sample std over seeds; NaN with one seed) of test/val tau, test R^2 and
    MAE, the best-validation seed; with `data`, also Spearman, tau above chance, bias, AUC on test and tau per eval
    split, and "<model>-ens" rows when `ensemble`."""
    rows = []
    preds = model_predictions(runs, ensemble) if data is not None else {}
    chosen, as_ensemble = _selected_unf(runs)
    for model in dict.fromkeys([*(r.model for r in runs), *preds]):
        base = chosen if model == SELECTED_UNF else model[:-4] if model.endswith("-ens") else model
        mine = [] if model.endswith("-ens") or (model == SELECTED_UNF and as_ensemble) else runs_of(runs, base)
        if mine:
            metrics = [r.metrics for r in mine]
            best_seed, seconds = int(mine[int(np.argmax([r.val_tau for r in mine]))].seed), sum(r.seconds for r in mine)
            seconds = 0.0 if model == SELECTED_UNF else seconds  # its runs are counted under their own name
        else:  # a seed ensemble: statistics of the mean prediction
            assert data is not None
            metrics = [{s: split_statistics(preds[model][0][idx][np.isfinite(preds[model][0][idx])],
                                            data.y[idx][np.isfinite(preds[model][0][idx])], data.threshold)
                        for s, idx in data.rows.items()}]
            best_seed, seconds = -1, 0.0
        row: dict[str, Any] = {"model": model, "seeds": len(mine) or len(runs_of(runs, base))}
        for split in ("test", "val"):
            for stat in ("tau",):
                vals = [m[split][stat] for m in metrics]
                row[f"{split}_{stat}_mean"], row[f"{split}_{stat}_std"] = _mean(vals), _spread(vals)
        for stat in ("r2", "mae", "spearman", "tau_above", "bias", "auc"):
            row[f"test_{stat}_mean"] = _mean([m["test"].get(stat) for m in metrics])
        for split in metrics[0]:
            if split.startswith("eval:"):
                row[f"{split}_tau_mean"] = _mean([m[split]["tau"] for m in metrics])
                row[f"{split}_bias_mean"] = _mean([m[split].get("bias") for m in metrics])
        row["best_seed"], row["seconds"] = best_seed, float(seconds)
        rows.append(row)
    return pd.DataFrame(rows)


def runs_of(runs: list[RunResult], model: str) -> list[RunResult]:
    return [r for r in runs if r.model == model]


def statistics_table(preds: dict[str, list[np.ndarray]], data: PredictData, n_resamples: int = 1000
                     ) -> list[dict[str, Any]]:
    """Per model and split: every statistic averaged over seeds, its seed spread, and the bootstrap interval of tau."""
    out = []
    for split, idx in data.rows.items():
        true = data.y[idx]
        ceiling, n_test = _noise_ceiling(data, idx) if split != "train" else (float("nan"), None)
        for model, seeds in preds.items():
            ok = np.all([np.isfinite(p[idx]) for p in seeds], axis=0)
            if not ok.any():
                out.append({"model": model, "split": split, "n": 0, "note": "no prediction (fixed width)"})
                continue
            per_seed = [split_statistics(p[idx][ok], true[ok], data.threshold) for p in seeds]
            row: dict[str, Any] = {"model": model, "split": split, "seeds": len(seeds), "n": int(ok.sum()),
                                   "threshold": data.threshold, "n_above": per_seed[0]["n_above"],
                                   "tau_ceiling": ceiling, "n_test_samples": n_test}
            for stat in _STATS:
                row[stat] = _mean([s[stat] for s in per_seed])
                row[f"{stat}_sd"] = _spread([s[stat] for s in per_seed])
            row["tau_low"], row["tau_high"] = (tau_interval([p[idx][ok] for p in seeds], true[ok],
                                                            n_resamples=n_resamples) if split != "train"
                                               else (float("nan"), float("nan")))
            out.append(row)
    return out


def _noise_ceiling(data: PredictData, idx: np.ndarray) -> tuple[float, str | None]:
    """`stats.noise_ceiling_tau` of a split's test accuracies, each scored on its zoo's test-set size, and those sizes
    ("360" or "360,1000"); (NaN, None) for other targets or when a zoo does not record its size."""
    if data.target != "test_acc" or len(idx) < 2:
        return float("nan"), None
    rows_n = [data.zoos[b].get("n_test") for b in data.block[idx]]
    if any(n is None for n in rows_n):
        return float("nan"), None
    return noise_ceiling_tau(data.y[idx], np.asarray(rows_n)), ",".join(map(str, sorted(set(rows_n))))


def _mean_errors(preds: dict[str, list[np.ndarray]], data: PredictData, labels: np.ndarray, value_key: str,
                 key: dict[str, Any]) -> list[dict[str, Any]]:
    """Mean error (prediction - target) and MAE per model, split (test and eval) and value of the per-row `labels`,
    averaged over seeds; each row also carries `key` and the value under `value_key`."""
    out = []
    for split, idx in data.rows.items():
        if split in ("train", "val"):
            continue
        for value in sorted(set(labels[idx].tolist())):
            sel = idx[labels[idx] == value]
            for model, seeds in preds.items():
                errs = [p[sel] - data.y[sel] for p in seeds]
                if not np.isfinite(errs[0]).any():
                    continue
                out.append({"model": model, "split": split, **key, value_key: value, "n": int(len(sel)),
                            "bias": _mean([float(np.nanmean(e)) for e in errs]),
                            "mae": _mean([float(np.nanmean(np.abs(e))) for e in errs])})
    return out


def bias_by_width(preds: dict[str, list[np.ndarray]], data: PredictData) -> list[dict[str, Any]]:
    """Mean error (prediction - target) and MAE per model, split (test and eval) and width, averaged over seeds."""
    return _mean_errors(preds, data, data.width(), "width", {})


def pair_table(preds: dict[str, list[np.ndarray]], data: PredictData, n_resamples: int = 1000,
               selected: str | None = None) -> list[dict[str, Any]]:
    """Paired bootstrap interval of tau(a) - tau(b) for every pair of models, on test and on every eval split,
    over the members both models predict. `selected`: the row "unf-val" repeats (a UNF form, or "<form>-ens" for
    a seed ensemble); its pairs that are 0 or already listed under that row are left out."""
    out = []
    for split, idx in data.rows.items():
        if split in ("train", "val"):
            continue
        usable = {m: s for m, s in preds.items() if np.all([np.isfinite(p[idx]) for p in s])}
        true = data.y[idx]
        for pair in pairwise_differences({m: [p[idx] for p in s] for m, s in usable.items()}, true,
                                         n_resamples=n_resamples):
            other = pair["b"] if pair["a"] == SELECTED_UNF else pair["a"] if pair["b"] == SELECTED_UNF else None
            if other is not None and (other == selected or (selected in usable and _is_unf_row(other))):
                continue  # unf-val repeats `selected`: its difference to it is 0, to the other UNF rows listed
            out.append({"split": split, **pair})
    return out


def _is_unf_row(model: str) -> bool:
    return model in UNF_FORMS or (model.endswith("-ens") and model[:-4] in UNF_FORMS)


def _f(x: Any, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def comparison_markdown(summary: pd.DataFrame, stats: list[dict[str, Any]] | None = None,
                        widths: list[dict[str, Any]] | None = None, pairs: list[dict[str, Any]] | None = None,
                        threshold: float | None = None, selected: str | None = None,
                        choice: dict[str, Any] | None = None, groups: list[dict[str, Any]] | None = None) -> str:
    """The comparison as Markdown: per split, tau with its 90% bootstrap interval over members (and the spread over
    seeds when there are 2+), the other statistics; bias per width (and per `--bias-by` value: `groups`); paired
    differences of tau. `selected`: the UNF form the "unf-val" row stands for (`selected_unf_form`), named in a line;
    `choice`: that form's `model_choice` (the line then says whether unf-val is its seed ensemble or its best seed)."""
    if stats is None:  # summary only (old callers)
        lines = ["| model | test tau | val tau | test R^2 | test MAE | seeds |", "|---|---|---|---|---|---|"]
        for r in summary.itertuples():
            lines.append(f"| {r.model} | {_f(r.test_tau_mean)} | {_f(r.val_tau_mean)} | {_f(r.test_r2_mean)} | "
                         f"{_f(r.test_mae_mean, 4)} | {r.seeds} |")
        return "\n".join(lines) + "\n"
    pct = int(CONFIDENCE * 100)
    lines = []
    thr = f"target > {threshold:.3f} (1/classes + margin)" if threshold is not None else "no threshold (not an accuracy)"
    for split in dict.fromkeys(s["split"] for s in stats):
        if split == "train":
            continue
        lines += [f"### {split}", "",
                  f"| model | tau [{pct}% CI] | seed sd | Spearman | tau above chance (n) | R^2 | MAE | bias | AUC | n |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for s in (s for s in stats if s["split"] == split):
            if s["n"] == 0:
                lines.append(f"| {s['model']} | {s.get('note', '-')} | | | | | | | | 0 |")
                continue
            ci = f"{_f(s['tau'])} [{_f(s['tau_low'])}, {_f(s['tau_high'])}]"
            sd = _f(s["tau_sd"]) if s["seeds"] > 1 else "1 seed"
            above = f"{_f(s['tau_above'])} ({s['n_above']})" if s["n_above"] is not None else "-"
            lines.append(f"| {s['model']} | {ci} | {sd} | {_f(s['spearman'])} | {above} | {_f(s['r2'])} | "
                         f"{_f(s['mae'], 4)} | {_f(s['bias'], 4)} | {_f(s['auc'])} | {s['n']} |")
        first = next(s for s in stats if s["split"] == split)
        if first.get("n_test_samples") and np.isfinite(first.get("tau_ceiling", float("nan"))):
            lines += ["", f"Noise ceiling of tau: {_f(first['tau_ceiling'])}, what a perfect predictor of each "
                      f"network's expected accuracy would reach against accuracies measured on "
                      f"{first['n_test_samples']} test samples."]
        lines.append("")
    lines.append(f"Chance threshold: {thr}. Intervals: percentile bootstrap over members, {pct}%.")
    if selected is not None:
        val = summary.set_index("model")["val_tau_mean"]
        forms = [m for m in UNF_FORMS if m in val.index]
        ens = choice is not None and choice["predictor"] == "ensemble"
        how = ""
        if choice is not None and choice["ensemble_val_tau"] is not None:
            saved = "seed ensemble" if ens else f"best seed (seed {choice['seed']})"
            how = (f" Saved as its {saved}: validation tau of the mean over seeds {_f(choice['ensemble_val_tau'])} "
                   f"vs best seed {_f(choice['best_seed_val_tau'])}.")
        lines.append(f"{SELECTED_UNF} = {selected}{' (seed ensemble)' if ens else ''}: of the UNF forms trained, the "
                     f"one with the better validation tau ({' vs '.join(f'{m} {_f(val.get(m))}' for m in forms)}); "
                     f"chosen on validation only.{how}")
    lines.append("")
    if widths:
        lines += ["### Mean error (prediction - target) per width", "", "| split | width | model | n | bias | MAE |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {w['split']} | {w['width']} | {w['model']} | {w['n']} | {_f(w['bias'], 4)} | {_f(w['mae'], 4)} |"
                  for w in widths]
        lines.append("")
    if groups:
        lines += ["### Mean error (prediction - target) per hyperparameter value", "",
                  "| split | hyperparameter | value | model | n | bias | MAE |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {g['split']} | {g['hparam']} | {g['value']} | {g['model']} | {g['n']} | {_f(g['bias'], 4)} | "
                  f"{_f(g['mae'], 4)} |" for g in groups]
        lines.append("")
    if pairs:
        lines += [f"### Paired differences of tau (a - b), {pct}% paired bootstrap over the same members", "",
                  "| split | a | b | tau(a) - tau(b) | interval | n |", "|---|---|---|---|---|---|"]
        lines += [f"| {p['split']} | {p['a']} | {p['b']} | {_f(p['diff'])} | [{_f(p['low'])}, {_f(p['high'])}] | "
                  f"{p['n']} |" for p in pairs]
        lines.append("")
    return "\n".join(lines)


def clean_json(obj: Any) -> Any:
    """JSON without NaN: non-finite floats become null; numpy scalars become Python numbers."""
    if isinstance(obj, (np.floating, np.integer)):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    return obj


_clean = clean_json  # old name


def plot_test_scatter(runs: list[RunResult], path: Any, target: str) -> None:
    """Predicted vs true on the test split, one panel per model (its best-validation seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.model for r in runs))
    fig, axes = plt.subplots(1, len(models), figsize=(3.6 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        best = max((r for r in runs if r.model == model), key=lambda r: r.val_tau)
        test = best.predictions[best.predictions["split"] == "test"]
        ax.scatter(test["target"], test["prediction"], s=6, alpha=0.5)
        lo = float(np.nanmin([test["target"].min(), test["prediction"].min()]))
        hi = float(np.nanmax([test["target"].max(), test["prediction"].max()]))
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8)
        ax.set_title(f"{model} (seed {best.seed}): tau {_f(best.metrics['test']['tau'])}", fontsize=9)
        ax.set_xlabel(f"true {target}")
        ax.set_ylabel("predicted")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
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
            ax.axhline(r.val_tau, color=colors[r.model], ls="--", alpha=0.8, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation Kendall tau")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def _atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def bias_by_hparam(preds: dict[str, list[np.ndarray]], data: PredictData) -> list[dict[str, Any]]:
    """Mean error and MAE per model, split (test and eval), `--bias-by` hyperparameter and value, averaged over
    seeds: where a predictor misreads a training recipe."""
    return [row for name, values in data.groups.items()
            for row in _mean_errors(preds, data, values, "value", {"hparam": name})]


def write_report(result: TrainResult, data: PredictData | None = None) -> tuple[Any, Any, Any]:
    """Write metrics.json, predictions.csv, comparison.csv/.md, pairs.csv, test_scatter.png and val_tau.png into the
    out dir, each atomically (temporary file, then rename); return (statistics, bias by width, pairs)."""
    out = result.out_dir
    n_boot = int(result.config.bootstrap)
    stats = widths = pairs = groups = None
    chosen, as_ensemble = _selected_unf(result.runs) if data is not None else (None, False)
    if data is not None:
        preds = model_predictions(result.runs, result.config.ensemble)
        stats = statistics_table(preds, data, n_boot)
        widths = bias_by_width(preds, data)
        groups = bias_by_hparam(preds, data)
        pairs = pair_table(preds, data, n_boot, f"{chosen}-ens" if as_ensemble else chosen)
    metrics = {
        "config": result.config.to_dict(),
        "data": result.data_info,
        "summary": result.summary.to_dict(orient="records"),
        "statistics": stats,
        "bias_by_width": widths,
        "bias_by_hparam": groups,
        "pairs": pairs,
        "bootstrap": {"resamples": n_boot, "confidence": CONFIDENCE, "method": "percentile, paired over members"},
        "runs": [r.to_json() for r in result.runs],
    }
    _atomic(out / "metrics.json", lambda p: p.write_text(json.dumps(clean_json(metrics), indent=2)))
    frame = pd.concat([r.predictions for r in result.runs], ignore_index=True)
    _atomic(out / "predictions.csv", lambda p: frame.to_csv(p, index=False))
    _atomic(out / "comparison.csv", lambda p: result.summary.to_csv(p, index=False))
    if pairs is not None:
        _atomic(out / "pairs.csv", lambda p: pd.DataFrame(pairs).to_csv(p, index=False))
    threshold = data.threshold if data is not None else None
    _atomic(out / "comparison.md", lambda p: p.write_text(
        comparison_markdown(result.summary, stats, widths, pairs, threshold, chosen,
                            model_choice(result.runs, chosen) if chosen is not None else None, groups)))
    _atomic(out / "test_scatter.png", lambda p: plot_test_scatter(result.runs, p, result.data_info["target"]))
    _atomic(out / "val_tau.png", lambda p: plot_val_tau(result.runs, p))
    return stats, widths, pairs
