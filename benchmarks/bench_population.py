"""Batched population training vs a plain per-member PyTorch loop (same recipe, hyperparameters, data order).

For `cnn` on `digits` (Small-CNN-Zoo options, and the default zoo's: adamw, torch init, cosine schedule, label noise,
random shifts) and `gru_seq2seq` on `arith`: members x epochs per second of `train_population` on a chunk of
members, and of `train_member_reference` (nn modules + torch.optim, one member after the other) on a few of the same
members, scaled honestly (time per member-epoch, evaluation at the recipe's checkpoints included on both sides).
Both sides are warmed up once (untimed); repetitions are interleaved; medians are reported. Both sides run with the same torch thread count (`--threads`,
default: torch's default). The plain loop runs members one after the other with standard nn.Dropout.

Also: the engine's achieved FLOP rate (FLOPs counted analytically: 6 x forward MACs per training sample, 2 x per
evaluated sample) as a fraction of the machine's measured float32 matmul rate.

    python benchmarks/bench_population.py              # a few minutes on 2 cores
    python benchmarks/bench_population.py --threads 1  # on a machine whose cores are shared with other jobs
    python benchmarks/bench_population.py --quick      # smaller chunks, one repetition (goal 10x instead of 20x)
    PYTHONPATH=<other checkout> python benchmarks/bench_population.py --quick --engine-only --reps 5
        # that checkout's engine alone, to set against this one's (no loop, no BENCH lines)
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.zoo.population import ChunkJob, member_seed, train_member_reference, train_population
from pipeline.zoo.tasks import load_task

GOAL, QUICK_GOAL = 20.0, 10.0  # the goals: 20x the plain loop in the full bench, 10x in the quick one


@dataclass(frozen=True)
class Case:
    name: str
    job: ChunkJob
    members: int  # engine chunk size
    loop_members: int  # members timed with the plain loop
    macs: int  # forward multiply-adds per sample


def _hparams(n: int, rng: np.random.Generator, lr: tuple[float, float]) -> dict[str, np.ndarray]:
    """Small-CNN-Zoo-like draws; train_fraction 1 so that every member-epoch is a full pass over the data."""
    return {
        "lr": np.exp(rng.uniform(np.log(lr[0]), np.log(lr[1]), n)),
        "weight_decay": np.exp(rng.uniform(np.log(1e-8), np.log(1e-3), n)),
        "init_std": rng.uniform(0.05, 0.3, n),
        "dropout": rng.uniform(0.0, 0.3, n),
        "train_fraction": np.ones(n),
    }


def _cnn_macs(job: ChunkJob) -> int:
    a, size = job.arch, job.task.info["input_shape"][1]
    widths, macs = [a["in_channels"], *a["channels"]], 0
    for c_in, c_out in zip(widths, widths[1:]):
        size = (size + 2 * a["padding"] - a["kernel_size"]) // a["stride"] + 1
        macs += c_out * c_in * a["kernel_size"] ** 2 * size * size
    return macs + widths[-1] * a["num_classes"]


def _gru_macs(job: ChunkJob) -> int:
    a, info = job.arch, job.task.info
    step = 3 * a["hidden_size"] * (a["embed_dim"] + a["hidden_size"])
    return (info["src_len"] + info["tgt_len"]) * step + info["tgt_len"] * a["hidden_size"] * a["vocab_size"]


def _flops(case: Case, members: int) -> float:
    t = case.job.task
    train = case.job.epochs * len(t.y_train) * 6 * case.macs
    evals = len(case.job.checkpoint_epochs) * (len(t.y_train) + len(t.y_test)) * 2 * case.macs
    return float(members * (train + evals))


def _matmul_gflops(n: int = 1024, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def _time_engine(case: Case, hp: dict[str, np.ndarray], seeds: np.ndarray) -> float:
    t0 = time.perf_counter()
    train_population(case.job, hp, seeds, device="cpu")
    return time.perf_counter() - t0


def _time_loop(case: Case, hp: dict[str, np.ndarray], seeds: np.ndarray) -> float:
    """Seconds per member for the plain loop, over the first `loop_members` members."""
    t0 = time.perf_counter()
    for i in range(case.loop_members):
        one = {k: float(v[i]) for k, v in hp.items()}
        train_member_reference(case.job, one, int(seeds[i]), device="cpu", exact_noise=False)
    return (time.perf_counter() - t0) / case.loop_members


def _case_inputs(case: Case) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The case's per-member hyperparameters and seeds (the same draws every run)."""
    rng = np.random.default_rng(0)
    lr = (1e-3, 1e-2) if case.job.optimizer in ("adam", "adamw") else (1e-2, 1e-1)
    hp = _hparams(case.members, rng, lr)
    if case.name.endswith("_options"):
        hp["label_noise"] = rng.choice([0.0, 0.1, 0.2], case.members)
        hp["shift"] = rng.choice([0.0, 1.0], case.members)
    return hp, np.array([member_seed(1, i) for i in range(case.members)])


def run_case(case: Case, reps: int, peak: float) -> float:
    hp, seeds = _case_inputs(case)
    engine, loop = [], []
    train_population(case.job, {k: v[:2] for k, v in hp.items()}, seeds[:2], device="cpu")  # warm-up
    # The loop's warm-up too: its first torch.optim step pays one-time imports and kernel set-up (~1 s), which the
    # engine's own warm-up no longer does for it now that the CNN runs without torch.func.
    train_member_reference(case.job, {k: float(v[0]) for k, v in hp.items()}, int(seeds[0]), device="cpu", exact_noise=False)
    for r in range(reps):
        engine.append(_time_engine(case, hp, seeds))
        loop.append(_time_loop(case, hp, seeds))
        print(f"  rep {r}: engine {engine[-1]:.1f} s for {case.members} members; plain loop {loop[-1]:.2f} s per member", flush=True)
    epochs = case.job.epochs
    eng = case.members * epochs / statistics.median(engine)
    base = epochs / statistics.median(loop)
    achieved = _flops(case, case.members) / statistics.median(engine) / 1e9
    loop_rate = _flops(case, 1) / statistics.median(loop) / 1e9
    print(
        f"{case.name}: engine {eng:.1f} member-epochs/s ({case.members} members/chunk, {epochs} epochs, checkpoints "
        f"{list(case.job.checkpoint_epochs)}); plain loop {base:.2f} member-epochs/s; speedup {eng / base:.1f}x"
    )
    print(
        f"{case.name}: engine {achieved:.2f} GFLOP/s = {achieved / peak:.1%} of the measured float32 matmul rate "
        f"({peak:.1f} GFLOP/s; {case.macs} forward MACs/sample); plain loop {loop_rate:.2f} GFLOP/s, so an engine "
        f"at 100% of the matmul rate would be {peak / loop_rate:.0f}x faster than the loop"
    )
    return eng / base


def time_engine_only(case: Case, reps: int) -> None:
    """Median wall and process-CPU seconds of one engine chunk (after an untimed warm-up), the members `run_case`
    trains."""
    hp, seeds = _case_inputs(case)
    train_population(case.job, {k: v[:2] for k, v in hp.items()}, seeds[:2], device="cpu")  # warm-up
    wall, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        train_population(case.job, hp, seeds, device="cpu")
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    print(f"{case.name}: engine {case.members} members x {case.job.epochs} epochs: {statistics.median(wall):.2f} s wall, "
          f"{statistics.median(cpu):.2f} s CPU (median of {reps}; {torch.get_num_threads()} threads)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small chunks, one repetition")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both sides (default: torch's)")
    parser.add_argument("--engine-only", action="store_true",
                        help="time only the engine (wall and process CPU seconds per chunk, median of --reps), no loop "
                        "and no BENCH lines: for comparing engine versions (the loop's own swings cancel out)")
    args = parser.parse_args()
    from pipeline.allocator import allocator_report

    print(allocator_report())
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = 1 if args.quick else args.reps
    scale = 4 if args.quick else 1
    digits = load_task("digits")
    arith = load_task("arith", n_train=2000, n_test=500)
    cnn = ChunkJob({"name": "cnn"}, digits, "adam", 32, 2)
    gru = ChunkJob({"name": "gru_seq2seq"}, arith, "adam", 32, 1)
    # The default zoo's kind of chunk: decoupled decay, torch init, cosine schedule, label noise and random shifts.
    diverse = ChunkJob({"name": "cnn"}, digits, "adamw", 32, 2, init="torch", schedule="cosine")
    cases = [
        Case("population_cnn_digits", cnn, 256 // scale, max(1, 3 // scale), _cnn_macs(cnn)),
        Case("population_gru_arith", gru, 128 // scale, max(1, 2 // scale), _gru_macs(gru)),
        Case("population_cnn_digits_options", diverse, 256 // scale, max(1, 3 // scale), _cnn_macs(diverse)),
    ]
    if args.engine_only:
        for case in cases:
            time_engine_only(case, args.reps)
        return
    peak = _matmul_gflops()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32 matmul {peak:.1f} GFLOP/s")
    results = {}
    for case in cases:
        results[case.name] = run_case(case, reps, peak)
    goal = QUICK_GOAL if args.quick else GOAL
    for name, speedup in results.items():
        print(f"BENCH {name} speedup={speedup:.1f} goal=>={goal:g} {'PASS' if speedup >= goal else 'MISS'}")


if __name__ == "__main__":
    main()
