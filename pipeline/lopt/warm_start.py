"""Warm start of a learned optimizer's nominal term at the tuned baseline (`--init-from tuned`).

With f's head at zero a fresh residual learned optimizer *is* its nominal optimizer (SGDM with step alpha and momentum
gamma0, or Adam with learning rate alpha and first-moment decay gamma0). Started at a fixed alpha = 0.1 it begins far
from what a tuned baseline reaches (on mlp-digits-lopt Adam at 0.1 scores 0.22-0.35 on meta-validation, Adam at
the tuned 0.03 about 0.03), and ES spends its steps on the step size instead of on f. Here the start is chosen on a
grid by the meta-validation score itself (`validation_score`: same val members, same batches, same metric), so step 0
of meta-training is the best grid point and, since step 0 is a meta-validation candidate, the selected optimizer
scores at least as well as the tuned baseline on meta-validation by construction.

Grids: for the Adam nominal term, the learning rates of the evaluation's tuned Adam (`DEFAULT_ADAM_LRS`) with
gamma0 = 0.9 (Adam's beta1), so step 0 is the same Adam as the evaluation's baseline; for the SGDM nominal term,
step sizes x momenta around what meta-tuned SGDM reaches on the digits zoos (alpha 1.1-2.2, gamma0 0.76-0.89).
"""

from __future__ import annotations

from collections.abc import Sequence
import time
from dataclasses import replace
from typing import Any

from pipeline.errors import ConfigError
from pipeline.lopt.evaluate import DEFAULT_ADAM_LRS
from pipeline.lopt.inner import InnerProblem
from pipeline.lopt.optimizers import LOptConfig, ResidualLOpt

__all__ = ["ADAM_GRID", "INIT_FROM", "SGDM_GRID", "nominal_grid", "tune_nominal", "warm_started"]

INIT_FROM = ("default", "tuned")
ADAM_GRID = tuple((lr, 0.9) for lr in DEFAULT_ADAM_LRS)  # (alpha, gamma0): the evaluation's tuned-Adam grid
SGDM_GRID = tuple((a, g) for a in (0.1, 0.2, 0.5, 1.0, 2.0, 5.0) for g in (0.5, 0.8, 0.9))


def nominal_grid(nominal: str) -> tuple[tuple[float, float], ...]:
    """The (alpha, gamma0) candidates for a nominal term ("adam" or "sgdm")."""
    return ADAM_GRID if nominal == "adam" else SGDM_GRID


def tune_nominal(val_problems: Sequence[InnerProblem], optimizer: LOptConfig, horizon: int, seed: int, cap: float
                 ) -> tuple[float, float, dict[str, float]]:
    """(alpha, gamma0, scores): the grid point of `optimizer.nominal` with the best meta-validation score on
    `val_problems` (ties keep the earlier point); scores maps "alpha/gamma0" to the score of every point."""
    from pipeline.lopt.meta_train import validation_score

    if not val_problems:
        raise ConfigError("--init-from tuned chooses the start on val-split members: it needs --validate-every > 0 and a val split")
    scores: dict[str, float] = {}
    for alpha, gamma0 in nominal_grid(optimizer.nominal):
        nominal = ResidualLOpt(LOptConfig(kind="sgdm", alpha=alpha, gamma0=gamma0, nominal=optimizer.nominal))
        scores[f"{alpha:g}/{gamma0:g}"] = validation_score(val_problems, nominal, nominal.init_meta(seed), horizon, seed, cap)
    alpha, gamma0 = min(nominal_grid(optimizer.nominal), key=lambda point: scores[f"{point[0]:g}/{point[1]:g}"])
    return alpha, gamma0, scores


def warm_started(config: Any, val_problems: Sequence[InnerProblem], stored: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any] | None]:
    """(config with the tuned initial alpha and gamma0, the warm-start record for config.json: the choice, every grid
    point's score and the tuning's wall seconds) for a `MetaTrainConfig` with `init_from` "tuned"; the config unchanged
    and None otherwise. `stored` is a resumed run's config.json: its recorded choice is reused (not re-tuned), so a
    resume never depends on re-running the grid bit for bit."""
    if config.init_from != "tuned":
        return config, None
    if config.optimizer.head_scale != 0:
        raise ConfigError(f"--init-from tuned needs --head-scale 0 (f starts at zero, so step 0 is the tuned baseline), got {config.optimizer.head_scale:g}")
    record = (stored or {}).get("warm_start")
    if isinstance(record, dict) and {"alpha", "gamma0", "grid"} <= set(record):
        alpha, gamma0 = float(record["alpha"]), float(record["gamma0"])
    else:
        t0 = time.perf_counter()
        alpha, gamma0, grid = tune_nominal(val_problems, config.optimizer, config.horizon, config.seed, config.loss_cap)
        record = {"alpha": alpha, "gamma0": gamma0, "nominal": config.optimizer.nominal, "grid": grid,
                  "seconds": round(time.perf_counter() - t0, 1)}
    return replace(config, optimizer=replace(config.optimizer, alpha=alpha, gamma0=gamma0)), record
