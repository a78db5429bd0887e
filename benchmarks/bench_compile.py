"""Compiled UNF training steps with inductor's parallel-depth choice as torch ships it vs corrected (pipeline.compile).

torch 2.13's CPU code generator counts a vectorized loop narrower than one SIMD vector as zero iterations and then
opens OpenMP parallel regions inside serial outer loops (`pipeline/compile.py` has the story). This times one
training step of the UNF predictor (batch 10 of prepared inputs, forward, BCE, backward, fused Adam) eager,
compiled as torch ships and compiled with `pipeline.compile.compile_step` (what `unfzoo train --compile` runs),
interleaved, wall ms per step, median of `--reps` x 10 steps, on three weight spaces: the cnn-digits member at width
8 (the narrow case), at its default width 16 (a control the correction should leave alone) and the gru-arith member.
With one thread inductor emits no parallel regions, so the default is two threads (this machine's cores).

    python benchmarks/bench_compile.py [--threads 2] [--reps 5]

Goal: the corrected compile is nowhere slower than the shipped one (speed-up >= 0.95 on every weight space: step
times move by about 5% between repetitions on this shared machine).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_predict import cnn_spec, gru_spec, training_stepper  # noqa: E402
from pipeline.compile import compile_step, fix_inductor_parallel_depth  # noqa: E402
from pipeline.zoo.members import build_member, with_width  # noqa: E402
from unf_models import WeightSpec  # noqa: E402

GOAL = 0.95  # no slower anywhere, within the +-5% step times move between repetitions here
VARIANTS = ("eager", "shipped", "corrected")


def cnn_width_spec(width: int) -> WeightSpec:
    arch = with_width({"name": "cnn", "in_channels": 1, "num_classes": 10}, width)
    return WeightSpec.from_module(build_member(arch), torch.zeros(2, 1, 8, 8))


CASES: dict[str, Callable[[], WeightSpec]] = {
    "cnn_w8": lambda: cnn_width_spec(8),
    "cnn_w16": cnn_spec,
    "gru": gru_spec,
}


@contextmanager
def shipped_heuristic():
    """Inductor's own `max_parallel_depth` for the block (the compiles it triggers), the correction after it."""
    from torch._inductor.codegen import cpp

    fixed = cpp.LoopNest.max_parallel_depth
    cpp.LoopNest.max_parallel_depth = fixed.__wrapped__
    try:
        yield
    finally:
        cpp.LoopNest.max_parallel_depth = fixed


def stepper(spec: WeightSpec, variant: str, members: int = 300) -> Callable[[], None]:
    """One UNF training step on a synthetic zoo of `spec`, its forward eager or compiled per `variant`."""
    compile_fn = {"eager": None,
                  "shipped": lambda fn: torch.compile(fn, dynamic=False),  # no marker in its cache keys
                  "corrected": compile_step}[variant]
    return training_stepper(spec, "unf", members, compile_fn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (inductor's parallel regions need 2+)")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not fix_inductor_parallel_depth():
        print("this torch has no inductor parallel-depth heuristic to correct: nothing to compare")
        return
    torch._dynamo.config.recompile_limit = 64  # one compiled forward per case and variant, same code object
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), load %.2f %.2f %.2f" % os.getloadavg())
    steps: dict[tuple[str, str], Callable[[], None]] = {}
    for case, make_spec in CASES.items():
        spec = make_spec()
        for variant in VARIANTS:
            step = stepper(spec, variant)
            t0 = time.perf_counter()
            if variant == "shipped":
                with shipped_heuristic():  # the compile happens in the first forward and backward
                    step()
                    step()
            else:
                step()
                step()
            print(f"  {case} {variant}: first two steps {time.perf_counter() - t0:.1f} s", flush=True)
            steps[(case, variant)] = step
    times: dict[tuple[str, str], list[float]] = {k: [] for k in steps}
    for _ in range(args.reps):
        for key, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(10):
                step()
            times[key].append((time.perf_counter() - t0) / 10)
    print(f"ms per training step (median of {args.reps} x 10, wall; load %.2f %.2f %.2f)" % os.getloadavg())
    print(f"  {'weight space':14s} {'eager':>8s} {'shipped':>8s} {'corrected':>9s}  corrected/shipped speed-up")
    for case in CASES:
        med = {v: statistics.median(times[(case, v)]) * 1e3 for v in VARIANTS}
        print(f"  {case:14s} {med['eager']:8.2f} {med['shipped']:8.2f} {med['corrected']:9.2f}  "
              f"{med['shipped'] / med['corrected']:.2f} (eager/compiled: shipped {med['eager'] / med['shipped']:.2f}, "
              f"corrected {med['eager'] / med['corrected']:.2f})")
    for case in CASES:
        speedup = statistics.median(times[(case, "shipped")]) / statistics.median(times[(case, "corrected")])
        print(f"BENCH compile_parallel_depth_{case} speedup={speedup:.2f} goal=>={GOAL:g} "
              f"{'PASS' if speedup >= GOAL else 'MISS'}")


if __name__ == "__main__":
    main()
