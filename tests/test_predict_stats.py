"""pipeline.predict.stats: the statistics written to metrics.json / comparison.md."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import kendalltau, spearmanr

from pipeline.predict.stats import (chance_threshold, noise_ceiling_tau, paired_tau_difference, pairwise_differences,
                                    split_statistics, tau_interval)


def _data(n: int = 200, seed: int = 0):
    rng = np.random.default_rng(seed)
    true = np.clip(rng.uniform(0.0, 1.0, n), 0, 1)
    good = true + rng.normal(0, 0.05, n)  # ranks well
    bad = true + rng.normal(0, 0.5, n)  # ranks poorly
    return true, good, bad


def test_split_statistics_match_scipy_and_definitions() -> None:
    true, good, _ = _data()
    s = split_statistics(good, true, threshold=0.6)
    assert s["n"] == 200
    assert s["tau"] == pytest.approx(kendalltau(good, true).statistic, abs=1e-12)
    assert s["spearman"] == pytest.approx(spearmanr(good, true).statistic, abs=1e-12)
    assert s["mae"] == pytest.approx(np.abs(good - true).mean())
    assert s["bias"] == pytest.approx((good - true).mean())
    above = true > 0.6
    assert s["n_above"] == above.sum() and s["threshold"] == 0.6
    assert s["tau_above"] == pytest.approx(kendalltau(good[above], true[above]).statistic)
    assert 0.9 < s["auc"] <= 1.0 and s["r2"] > 0.9
    shifted = split_statistics(true + 0.1, true)
    assert shifted["bias"] == pytest.approx(0.1) and shifted["tau"] == pytest.approx(1.0)
    assert shifted["threshold"] is None and np.isnan(shifted["auc"]) and np.isnan(shifted["tau_above"])


def test_undefined_statistics_are_nan_not_zero() -> None:
    s = split_statistics(np.full(5, 0.3), np.linspace(0, 1, 5), threshold=2.0)  # constant prediction, none above
    assert np.isnan(s["tau"]) and s["n_above"] == 0 and np.isnan(s["auc"])
    assert all(np.isnan(v) for v in tau_interval(np.full(5, 0.3), np.linspace(0, 1, 5)))


def test_chance_threshold() -> None:
    assert chance_threshold("test_acc", 10) == pytest.approx(0.15)
    assert chance_threshold("test_acc", 10, margin=0.4) == pytest.approx(0.5)
    assert chance_threshold("train_loss", 10) is None and chance_threshold("test_acc", None) is None


def test_tau_interval_covers_the_estimate_and_narrows_with_n() -> None:
    true, good, _ = _data(400)
    lo, hi = tau_interval(good, true)
    t = kendalltau(good, true).statistic
    assert lo < t < hi
    lo_small, hi_small = tau_interval(good[:40], true[:40])
    assert hi_small - lo_small > hi - lo
    assert tau_interval(good, true) == (lo, hi)  # seeded: deterministic


def test_paired_difference_separates_a_better_model_and_not_equal_ones() -> None:
    true, good, bad = _data(300)
    d = paired_tau_difference([good], [bad], true)
    assert d["diff"] == pytest.approx(kendalltau(good, true).statistic - kendalltau(bad, true).statistic)
    assert 0 < d["low"] < d["diff"] < d["high"]
    same = paired_tau_difference([good], [good], true)
    assert same["diff"] == 0 and same["low"] == 0 and same["high"] == 0  # paired: identical models never differ
    rng = np.random.default_rng(5)
    seeds_a = [good + rng.normal(0, 0.01, len(true)) for _ in range(3)]
    multi = paired_tau_difference(seeds_a, [bad], true)
    assert multi["low"] > 0
    pairs = pairwise_differences({"a": [good], "b": [bad], "c": [true]}, true, n_resamples=200)
    assert [(p["a"], p["b"]) for p in pairs] == [("a", "b"), ("a", "c"), ("b", "c")]
    assert pairs[1]["high"] < 0  # a perfect ranker beats the good one


def test_noise_ceiling_falls_with_fewer_test_samples() -> None:
    """Accuracies measured on few test samples cap the tau any predictor can reach: the ceiling is near 1 for a huge
    test set, lower for 360 samples, lower still for 20, and a mix of sizes per row is allowed."""
    acc = np.random.default_rng(1).uniform(0.8, 0.95, 300)
    huge, digits, tiny = (noise_ceiling_tau(acc, n) for n in (10**6, 360, 20))
    assert huge > 0.97 and 0.6 < digits < 0.9 and tiny < digits - 0.2
    mixed = noise_ceiling_tau(acc, np.where(np.arange(300) < 150, 20, 10**6))
    assert tiny < mixed < huge
    assert noise_ceiling_tau(acc, 360) == noise_ceiling_tau(acc, 360)  # seeded
    assert np.isnan(noise_ceiling_tau(acc[:1], 360))
