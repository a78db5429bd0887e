"""Learned-optimizer benchmarks.

1. ES step cost per optimizer (what meta-training spends its time on): one truncation window of 10 inner steps for
   a population of 16 particles (8 antithetic pairs) on the mlp-digits-lopt MLP (64-32-32-10, batch 64), f 16 wide x 2
   (the `make lopt` defaults), for sgdm, perparam and unf, interleaved, medians. BENCH line: unf's ms per ES step as a
   ratio of perparam's, measured side by side (goal <= 1.5: the UNF head should cost little over the pointwise f).
2. The vmapped ES population against a per-particle loop, same math (digits MLP 64-32-10, 5 inner steps).

Run: .venv/bin/python benchmarks/bench_lopt.py [--reps N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.func import grad

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.lopt.inner import InnerProblem  # noqa: E402
from pipeline.lopt.meta_train import PopulationUnroll  # noqa: E402
from pipeline.lopt.optimizers import LOptConfig, ResidualLOpt, flatten_meta, unflatten_meta  # noqa: E402

PAIRS, WINDOW = 8, 5


def digits_problem() -> InnerProblem:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16
    y = torch.tensor(d.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    init = {k: v.detach().clone() for k, v in model.named_parameters()}
    return InnerProblem(model, init, x[:1437], y[:1437], x[1437:], y[1437:], batch_size=64, name="digits-mlp")


def lopt_mlp_problem() -> InnerProblem:
    """The mlp-digits-lopt member architecture (64-32-32-10, ReLU, batch 64) at a trainable init."""
    base = digits_problem()
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    init = {k: v.detach().clone() for k, v in model.named_parameters()}
    return InnerProblem(model, init, base.x_train, base.y_train, base.x_test, base.y_test, batch_size=64, name="digits-mlp2")


def es_step_costs(reps: int) -> list[str]:
    """ms per ES step (16 particles x 10 inner steps) for sgdm, perparam, unf; BENCH line unf / perparam."""
    from unf_models import WeightSpec

    from pipeline.lopt.es import ESConfig, es_step

    problem = lopt_mlp_problem()
    spec = WeightSpec.from_module(problem.model)
    window = 10
    cases = {}
    for kind in ("sgdm", "perparam", "unf"):
        lopt = ResidualLOpt(LOptConfig(kind=kind, hidden=16, layers=2), spec if kind == "unf" else None)
        template = lopt.init_meta(0)
        order = torch.stack([problem.data_order(window, s) for s in range(PAIRS)])
        unroll = PopulationUnroll(lopt, template, problem, order, cap=2.0, truncation=window)
        cases[kind] = (unroll, flatten_meta(template), unroll.init_state(2 * PAIRS))
    times: dict[str, list[float]] = {k: [] for k in cases}
    cfg = ESConfig(pairs=PAIRS)
    with torch.no_grad():
        for rep in range(reps + 1):
            for kind, (unroll, theta, state) in cases.items():
                t0 = time.perf_counter()
                es_step(unroll, theta, state, None, cfg, torch.Generator().manual_seed(rep))
                if rep:  # the first repetition warms up
                    times[kind].append(time.perf_counter() - t0)
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    for kind, value in ms.items():
        print(f"{kind:8s} ES step (16 particles x {window} inner steps, mlp 64-32-32-10): {value:.1f} ms")
    ratio = ms["unf"] / ms["perparam"]
    return [f"BENCH lopt_es_step_unf ms={ms['unf']:.1f} perparam_ms={ms['perparam']:.1f} ratio={ratio:.2f} goal=<=1.5 "
            f"{'PASS' if ratio <= 1.5 else 'MISS'}"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    from pipeline.allocator import allocator_report

    print(allocator_report())
    lines = es_step_costs(args.reps)
    problem = digits_problem()
    from unf_models import WeightSpec

    spec = WeightSpec.from_module(problem.model)
    for kind in ("unf", "sgdm"):
        lopt = ResidualLOpt(LOptConfig(kind=kind), spec if kind == "unf" else None)
        template = lopt.init_meta(0)
        order = torch.stack([problem.data_order(WINDOW, s) for s in range(PAIRS)])
        unroll = PopulationUnroll(lopt, template, problem, order, cap=2.0, truncation=WINDOW)
        theta = flatten_meta(template)
        gen = torch.Generator().manual_seed(0)
        eps = 0.01 * torch.randn(PAIRS, theta.numel(), generator=gen)
        thetas = theta + torch.cat([eps, -eps])  # (16, D)
        state = unroll.init_state(2 * PAIRS)

        def vmapped() -> None:
            unroll.advance(thetas, state)

        def looped() -> None:
            for p in range(2 * PAIRS):
                meta = unflatten_meta(thetas[p], template)
                params = dict(problem.init)
                st = lopt.init(params)
                for t in range(WINDOW):
                    idx = order[p % PAIRS, t]
                    g = grad(problem.loss)(params, problem.x_train[idx], problem.y_train[idx])
                    params, st = lopt.update(meta, st, params, g)

        with torch.no_grad():
            vmapped(), looped()  # warm-up
            tv, tl = [], []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                vmapped()
                tv.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                looped()
                tl.append(time.perf_counter() - t0)
        mv, ml = statistics.median(tv), statistics.median(tl)
        steps = 2 * PAIRS * WINDOW
        print(f"{kind:5s} population of {2 * PAIRS}, {WINDOW} steps: vmapped {1000 * mv:.1f} ms "
              f"({1000 * mv / steps:.2f} ms per particle-step), loop {1000 * ml:.1f} ms "
              f"({1000 * ml / steps:.2f} ms per particle-step), meta-parameters {theta.numel()}")
        speedup = ml / mv
        goal = 3.0
        lines.append(f"BENCH lopt_population_{kind} speedup={speedup:.2f} goal=>={goal:g} {'PASS' if speedup >= goal else 'MISS'}")
    print("\n".join(lines))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
