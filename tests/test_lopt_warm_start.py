"""`--init-from tuned`: the learned optimizer starts at the nominal optimizer's best grid point on meta-validation, so
step 0 of meta-training is the tuned baseline and the selected optimizer scores at least as well on meta-validation."""

from __future__ import annotations

import json

import pytest
import torch
from torch.func import grad
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import ConfigError
from pipeline.lopt.es import ESConfig
from pipeline.lopt.meta_train import MetaTrainConfig, _run_digest, meta_train
from pipeline.lopt.optimizers import Adam, LOptConfig, ResidualLOpt
from pipeline.lopt.warm_start import ADAM_GRID, SGDM_GRID, tune_nominal, warm_started
from _lopt_problems import mlp_problem


def _config(steps: int = 4, nominal: str = "adam", **kw) -> MetaTrainConfig:
    opt = kw.pop("optimizer", LOptConfig(kind="perparam", hidden=8, layers=1, nominal=nominal))
    return MetaTrainConfig(optimizer=opt, es=ESConfig(pairs=2), outer_steps=steps, horizon=6, truncation=2, checkpoint_every=2,
                           validate_every=2, val_members=2, init_from="tuned", **kw)


def _problems() -> tuple[list, list]:
    return [mlp_problem(seed=s) for s in range(2)], [mlp_problem(seed=10 + s, member=10 + s) for s in range(2)]


@pytest.mark.parametrize("nominal", ["adam", "sgdm"])
def test_step_zero_is_the_best_grid_point_on_meta_validation(tmp_path, nominal: str) -> None:
    train, val = _problems()
    result = meta_train(train, _config(4, nominal), tmp_path / "run", val_problems=val)
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    warm = stored["warm_start"]
    grid = warm["grid"]
    assert len(grid) == len(ADAM_GRID if nominal == "adam" else SGDM_GRID)
    best = min(grid, key=grid.__getitem__)
    assert best == f"{warm['alpha']:g}/{warm['gamma0']:g}"
    assert stored["meta_train"]["optimizer"]["alpha"] == warm["alpha"]
    assert stored["meta_train"]["optimizer"]["gamma0"] == warm["gamma0"]
    # step 0 of meta-training is that grid point (f = 0), scored as such, and selection can only improve on it
    assert result.validation[0]["step"] == 0
    assert result.validation[0]["val_loss"] == pytest.approx(grid[best], rel=1e-6)
    assert result.selected_val_loss <= grid[best] + 1e-9
    assert len({round(v, 6) for v in grid.values()}) > 1  # the grid's points differ: the choice means something


def test_warm_started_adam_step_zero_is_the_tuned_adam_update() -> None:
    """The warm-started learned optimizer's initial meta-parameters give tuned Adam's updates (f = 0)."""
    _, val = _problems()
    config, warm = warm_started(_config(0, "adam"), val)
    assert warm is not None and (warm["alpha"], warm["gamma0"]) in ADAM_GRID
    lopt = ResidualLOpt(config.optimizer)
    meta = lopt.init_meta(config.seed)
    adam, adam_meta = Adam(), Adam.init_meta(warm["alpha"])
    problem = mlp_problem(seed=3)
    params = ref = {k: v.clone() for k, v in problem.init.items()}
    state, ref_state = lopt.init(params), adam.init(ref)
    for t in range(5):
        xb, yb = problem.x_train[32 * t : 32 * t + 32], problem.y_train[32 * t : 32 * t + 32]
        params, state = lopt.update(meta, state, params, grad(problem.loss)(params, xb, yb))
        ref, ref_state = adam.update(adam_meta, ref_state, ref, grad(problem.loss)(ref, xb, yb))
    moved = max(float((ref[k] - problem.init[k]).abs().max()) for k in ref)
    assert moved > 1e-3
    assert max(float((params[k] - ref[k]).abs().max()) for k in ref) < 1e-5 * max(moved, 1.0)


def test_tuned_run_resumes_exactly_and_refuses_another_start(tmp_path) -> None:
    train, val = _problems()
    straight = meta_train(train, _config(6), tmp_path / "a", val_problems=val)
    meta_train(train, _config(6), tmp_path / "b", val_problems=val, stop_after=3)
    resumed = meta_train(train, _config(6), tmp_path / "b", val_problems=val)
    assert [h["meta_loss"] for h in resumed.history] == [h["meta_loss"] for h in straight.history]
    assert all(torch.equal(resumed.meta[k], straight.meta[k]) for k in straight.meta)
    default = MetaTrainConfig(**{**_config(6).__dict__, "init_from": "default"})
    with pytest.raises(ConfigError, match="different meta-train"):
        meta_train(train, default, tmp_path / "b", val_problems=val)


def test_warm_start_errors_and_old_runs_keep_their_identity() -> None:
    _, val = _problems()
    with pytest.raises(ConfigError, match="default or tuned"):
        MetaTrainConfig(init_from="best")
    with pytest.raises(ConfigError, match="head-scale 0"):
        warm_started(_config(optimizer=LOptConfig(kind="perparam", head_scale=1.0)), val)
    with pytest.raises(ConfigError, match="val-split members"):
        tune_nominal([], LOptConfig(), 6, 0, 2.0)
    cfg = MetaTrainConfig().to_dict()
    old = {k: v for k, v in cfg.items() if k != "init_from"}
    assert _run_digest({"meta_train": cfg, "spec": None, "source": None}) == _run_digest({"meta_train": old, "spec": None, "source": None})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--init-from", "best"], "default or tuned"),
        (["--init-from", "tuned", "--alpha", "0.1"], "pass one of them"),
    ],
)
def test_cli_bad_init_from_exits_2(tmp_path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["lopt", "meta-train", str(tmp_path / "no-zoo.zarr"), "--out", str(tmp_path / "o"), *args])
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_eval_table_says_which_runs_started_tuned(tmp_path) -> None:
    """`lopt eval`'s meta-train column names the tuned start, read from each run's config.json (the default start
    adds nothing), so a table says which rows began at the tuned baseline."""
    from pipeline.lopt.evaluate import _meta_train_cell
    from pipeline.lopt.meta_train import load_optimizer
    from pipeline.lopt.runs import _extra

    train, val = _problems()
    rows = {}
    for start in ("tuned", "default"):
        config = MetaTrainConfig(**{**_config(2).__dict__, "init_from": start})
        meta_train(train, config, tmp_path / start, val_problems=val)
        lopt, meta, stored = load_optimizer(tmp_path / start, "cpu")
        progress = json.loads((tmp_path / start / "progress.json").read_text())
        rows[start] = _extra([(lopt, meta, stored, progress, tmp_path / start)])
    assert rows["tuned"]["init_from"] == ["tuned"] and rows["default"]["init_from"] == ["default"]
    assert _meta_train_cell(rows["tuned"]).endswith(", tuned start")
    assert "tuned" not in _meta_train_cell(rows["default"])
