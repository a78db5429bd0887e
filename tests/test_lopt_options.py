"""Learned-optimizer options of issue 16: Adam nominal term, norm features, log meta-loss, horizon curriculum,
meta-seeds with two-way bootstrap intervals, evaluation past the horizon, and the resume identity of older runs."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
import torch
from rich.console import Console
from torch import nn
from torch.func import grad

from pipeline.errors import ConfigError
from pipeline.lopt.es import ESConfig
from pipeline.lopt.evaluate import EvalConfig, cluster_bootstrap, evaluate_optimizers, format_table, save_report
from pipeline.lopt.meta_train import MetaTrainConfig, _EpisodePlan, _run_digest, meta_train
from pipeline.lopt.optimizers import LOptConfig, ResidualLOpt
from _lopt_problems import mlp_problem


@pytest.mark.parametrize("kind", ["sgdm", "perparam"])
def test_adam_nominal_with_f_zero_is_torch_adam(kind: str) -> None:
    """nominal "adam" and f = 0: the trajectory is torch.optim.Adam(lr = alpha, betas = (gamma0, 0.999)), float64."""
    problem = mlp_problem(dtype=torch.float64)
    lopt = ResidualLOpt(LOptConfig(kind=kind, nominal="adam"))
    meta = {k: v.double() for k, v in lopt.init_meta(0).items()}  # head starts at zero: f = 0
    meta["log_alpha"] = torch.tensor(math.log(0.01), dtype=torch.float64)
    gamma = float(torch.sigmoid(meta["logit_gamma0"]))
    params = {k: v.clone() for k, v in problem.init.items()}
    state = lopt.init(params)
    model = mlp_problem(dtype=torch.float64).model
    adam = torch.optim.Adam(model.parameters(), lr=0.01, betas=(gamma, 0.999))
    for t in range(10):
        xb, yb = problem.x_train[16 * t : 16 * t + 16], problem.y_train[16 * t : 16 * t + 16]
        params, state = lopt.update(meta, state, params, grad(problem.loss)(params, xb, yb))
        adam.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        adam.step()
    ref = dict(model.named_parameters())
    assert max(float((params[k] - ref[k].detach()).abs().max()) for k in params) < 1e-10
    assert float((params["0.weight"] - problem.init["0.weight"]).abs().max()) > 1e-2


def test_norm_features_reach_f_and_are_bounded() -> None:
    """With norm_features f has 2 more input channels; scaling the gradients changes the step's f-part."""
    problem = mlp_problem(dtype=torch.float64)
    lopt = ResidualLOpt(LOptConfig(kind="perparam", head_scale=1.0, norm_features=True))
    meta = {k: v.double() for k, v in lopt.init_meta(2).items()}
    assert meta["f.pointwise.0.weight"].shape[1] == 21
    from pipeline.lopt.features import add_norm_features

    params = dict(problem.init)
    g = grad(problem.loss)(params, problem.x_train[:16], problem.y_train[:16])
    feats = add_norm_features({k: torch.zeros(8, *v.shape, dtype=v.dtype) for k, v in params.items()}, params, {k: v * 1e-30 for k, v in g.items()})
    assert all(float(f[8].min()) == -2.0 and float(f[9].abs().max()) <= 2 for f in feats.values())  # clipped
    steps = []
    for scale in (1.0, 1e-3):
        gs = {k: v * scale for k, v in g.items()}
        new, _ = lopt.update(meta, lopt.init(params), params, gs)
        sgdm, _ = ResidualLOpt(LOptConfig(kind="sgdm")).update(meta, lopt.init(params), params, gs)
        steps.append(new["0.weight"] - sgdm["0.weight"])  # -alpha beta f: the normalized features alone are scale-free
    assert float((steps[0] - steps[1]).abs().max()) > 1e-6


def test_option_errors() -> None:
    with pytest.raises(ConfigError, match="sgdm or adam"):
        LOptConfig(nominal="rmsprop")
    with pytest.raises(ConfigError, match="ratio or log"):
        MetaTrainConfig(meta_loss="mse")
    with pytest.raises(ConfigError, match="curriculum"):
        MetaTrainConfig(curriculum=-1)
    with pytest.raises(ConfigError, match="each multiple >= 1"):
        EvalConfig(multiples=(4, 0))


def _config(steps: int = 6, **kw) -> MetaTrainConfig:
    opt = kw.pop("optimizer", LOptConfig(kind="perparam", hidden=8, layers=1))
    return MetaTrainConfig(optimizer=opt, es=ESConfig(pairs=2), outer_steps=steps, horizon=6, truncation=2, checkpoint_every=2, **kw)


def test_curriculum_plan_grows_the_horizon_then_holds() -> None:
    plan = _EpisodePlan(_config(curriculum=12))
    located = [plan.locate(s) for s in range(20)]
    horizons = [h for e, w, h in located if w == 0]
    assert horizons[0] == 2 and horizons == sorted(horizons) and horizons[-1] == 6
    assert all(0 <= w < h // 2 for _e, w, h in located)
    assert [e for e, *_ in located] == sorted(e for e, *_ in located)
    assert _EpisodePlan(_config()).locate(7) == (2, 1, 6)  # off: fixed horizon, 3 windows per episode


@pytest.mark.parametrize("options", [{"curriculum": 8}, {"meta_loss": "log"}])
def test_options_train_and_resume_exactly(tmp_path, options) -> None:
    problems = [mlp_problem(seed=s) for s in range(2)]
    straight = meta_train(problems, _config(7, **options), tmp_path / "a")
    meta_train(problems, _config(7, **options), tmp_path / "b", stop_after=3)
    resumed = meta_train(problems, _config(7, **options), tmp_path / "b")
    assert [h["meta_loss"] for h in resumed.history] == [h["meta_loss"] for h in straight.history]
    assert all(torch.equal(resumed.meta[k], straight.meta[k]) for k in straight.meta)
    losses = [h["meta_loss"] for h in straight.history]
    assert all(math.isfinite(x) for x in losses)
    if options.get("meta_loss") == "log":
        assert max(losses) <= math.log(2.0) + 1e-6 and min(losses) < 0  # log of a ratio that falls below 1


def test_runs_written_before_the_new_options_keep_their_identity() -> None:
    """A config.json without the options added later (at their defaults) resumes: same run digest."""
    stored = {"meta_train": _config().to_dict(), "spec": None, "source": None}
    old = json.loads(json.dumps(stored))
    for key in ("meta_loss", "curriculum"):
        old["meta_train"].pop(key)
    for key in ("nominal", "norm_features"):
        old["meta_train"]["optimizer"].pop(key)
    assert _run_digest(old) == _run_digest(stored)
    assert _run_digest(stored) != _run_digest({**stored, "meta_train": _config(meta_loss="log").to_dict()})


def test_cluster_bootstrap() -> None:
    flat = cluster_bootstrap(np.full((3, 5), 0.25))
    assert flat["mean"] == flat["lo"] == flat["hi"] == 0.25
    rng = np.random.default_rng(0)
    members = rng.normal(0, 1, size=(1, 40))
    one = cluster_bootstrap(members)
    assert one["lo"] < one["mean"] < one["hi"] and one["seeds"] == 1
    assert one["hi"] - one["lo"] == pytest.approx(2 * 1.96 / math.sqrt(40) * members.std(), rel=0.25)  # ~ normal
    spread = cluster_bootstrap(members + np.array([[-1.0], [0.0], [1.0]]))  # 3 seeds that disagree
    assert spread["hi"] - spread["lo"] > 2 * (one["hi"] - one["lo"])  # seed spread widens the interval


def test_evaluation_over_seeds_past_the_horizon(tmp_path) -> None:
    """Two meta-seeds of sgdm; a deliberately unstable optimizer is flagged as rising past the horizon."""
    sgdm = ResidualLOpt(LOptConfig(kind="sgdm"))
    seeds = [meta_train([mlp_problem(seed=0)], _config(2, optimizer=LOptConfig(kind="sgdm"), seed=s)).meta for s in (0, 1)]
    unstable = sgdm.init_meta(0)
    unstable["log_alpha"] = torch.tensor(math.log(30.0))  # blows up given time
    test, val = [mlp_problem(seed=s) for s in (1, 2, 3)], [mlp_problem(seed=s) for s in (4, 5)]
    cfg = EvalConfig(multiples=(2, 5), adam_lrs=(1e-2,), bootstrap=200)
    report = evaluate_optimizers({"sgdm": [(sgdm, m) for m in seeds], "hot": (sgdm, unstable)}, test, val, horizon=4, config=cfg)
    assert report["eval_at"] == [4, 8, 20]
    row = report["rows"]["sgdm"]
    assert row["seeds"] == 2 and len(row["per_seed_train_loss"]["20"]) == 2
    ci = row["train_loss_ci"]["4"]
    assert ci["lo"] <= row["train_loss"]["4"] <= ci["hi"] and ci["seeds"] == 2
    assert row["rises"] is False and report["rows"]["hot"]["rises"] is True
    d = row["vs_adam"]["train_loss@20"]
    assert d["lo"] <= d["mean"] <= d["hi"]
    save_report(report, tmp_path)
    lines = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert len(lines) == 3 * 3 and {ln["multiple"] for ln in lines} == {"1", "2", "5"}
    hot = [ln for ln in lines if ln["optimizer"] == "hot"]
    assert all(ln["rises"] == "1" for ln in hot) and float(hot[-1]["train_loss"]) > float(hot[0]["train_loss"])
    table = format_table(report)
    assert table.row_count == 3 and any("rises" in c.header for c in table.columns)
    console = Console(file=io.StringIO(), width=400)
    console.print(table)
    assert "[lo, hi] = 95% bootstrap" in console.file.getvalue()  # the title's legend is not eaten as rich markup


def test_paired_bootstrap_pairs_by_member_and_resamples_both_seed_sets() -> None:
    """Against one run (tuned Adam) it is cluster_bootstrap of the difference; pairing removes the member spread; the
    other side's seed spread widens the interval."""
    from pipeline.lopt.evaluate import paired_bootstrap

    rng = np.random.default_rng(1)
    b = rng.lognormal(0, 1, size=(1, 30))  # members of very different difficulty
    a = b + 0.1 + rng.normal(0, 0.01, size=(3, 30))  # 3 seeds, each 0.1 worse on every member
    one = paired_bootstrap(a, b, resamples=500, seed=3)
    ref = cluster_bootstrap(a - b, resamples=500, seed=3)
    assert one["mean"] == pytest.approx(0.1, abs=0.01)
    assert (one["lo"], one["hi"]) == pytest.approx((ref["lo"], ref["hi"]), abs=1e-12)
    assert 0.08 < one["lo"] < 0.1 < one["hi"] < 0.12  # the members' lognormal spread cancels in the pairs
    b3 = b + np.array([[-0.2], [0.0], [0.2]])  # the other optimizer's 3 meta-seeds disagree
    three = paired_bootstrap(a, b3, resamples=500, seed=3)
    assert three["mean"] == pytest.approx(one["mean"]) and three["seeds_versus"] == 3
    assert three["hi"] - three["lo"] > 5 * (one["hi"] - one["lo"])
    with pytest.raises(ConfigError, match="same members"):
        paired_bootstrap(a, b[:, :5])


def test_collapsed_runs_are_those_that_lose_their_progress() -> None:
    """Back near the initial loss after progress at the horizon: collapsed; never trained, diverged or still
    improving: not."""
    from pipeline.lopt.evaluate import collapsed_runs

    initial = np.array([2.3, 2.3, 2.3, 2.3, 2.3])
    at_h = np.array([[0.2, 0.2, 2.25, 0.2, 0.2]])
    final = np.array([[2.30, 0.01, 2.30, 9.0, np.nan]])
    assert collapsed_runs(at_h, final, initial).tolist() == [[True, False, False, False, False]]
    assert collapsed_runs(at_h, final, initial, collapse=1.01).tolist() == [[False] * 5]


def test_evaluation_versus_another_optimizer(tmp_path) -> None:
    """Every row but sgdm's gets a paired difference against sgdm (table, results.json, results.csv); an unknown
    --versus is refused before any training."""
    sgdm = ResidualLOpt(LOptConfig(kind="sgdm"))
    meta = sgdm.init_meta(0)
    slow = sgdm.init_meta(0)
    slow["log_alpha"] = torch.tensor(math.log(0.01))
    test, val = [mlp_problem(seed=s) for s in (1, 2, 3)], [mlp_problem(seed=s) for s in (4, 5)]
    cfg = EvalConfig(multiples=(2,), adam_lrs=(1e-2,), bootstrap=200)
    report = evaluate_optimizers({"sgdm": (sgdm, meta), "slow": (sgdm, slow)}, test, val, horizon=4, config=cfg)
    assert report["versus"] == "sgdm" and "vs_versus" not in report["rows"]["sgdm"]
    d = report["rows"]["slow"]["vs_versus"]["train_loss@4"]
    rows = report["rows"]
    assert d["mean"] == pytest.approx(rows["slow"]["train_loss"]["4"] - rows["sgdm"]["train_loss"]["4"]) and d["mean"] > 0
    assert d["lo"] <= d["mean"] <= d["hi"]
    adam = next(k for k in rows if k.startswith("adam"))
    assert "vs_versus" in rows[adam] and all(0 <= r["collapsed"] <= 1 for r in rows.values())
    save_report(report, tmp_path)
    lines = list(csv.DictReader((tmp_path / "results.csv").open()))
    slow4 = next(ln for ln in lines if ln["optimizer"] == "slow" and ln["step"] == "4")
    assert slow4["versus"] == "sgdm" and float(slow4["vs_versus"]) == pytest.approx(d["mean"])
    assert json.loads((tmp_path / "results.json").read_text())["versus"] == "sgdm"
    headers = [c.header for c in format_table(report).columns]
    assert "Δloss@4 vs sgdm" in headers and "Δloss@8 vs sgdm" in headers and "collapsed by 8" in headers
    off = evaluate_optimizers({"slow": (sgdm, slow)}, test, val, horizon=4, config=cfg)
    assert off["versus"] is None and "vs_versus" not in off["rows"]["slow"]
    assert not any("vs" in c.header and "adam" not in c.header for c in format_table(off).columns)
    with pytest.raises(ConfigError, match="--versus 'perparam'"):
        evaluate_optimizers({"slow": (sgdm, slow)}, test, val, horizon=4, config=EvalConfig(versus="perparam"))
