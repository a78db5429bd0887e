"""GPU check (run where CUDA is present; skipped elsewhere): the engine trains the same chunk on CUDA and on CPU.

Prints members x epochs per second on each device, side by side in one run, and how close the CUDA result is to the
CPU one (different kernels, so equal to float tolerance, not bit for bit). Not part of `make bench` on CPU machines.

    python benchmarks/gpu_check.py --members 512
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from pipeline.zoo.population import ChunkJob, member_seed, train_population
from pipeline.zoo.tasks import load_task


def _hparams(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "lr": np.exp(rng.uniform(np.log(1e-3), np.log(5e-2), n)),
        "weight_decay": np.exp(rng.uniform(np.log(1e-8), np.log(1e-3), n)),
        "init_std": rng.uniform(0.05, 0.3, n),
        "dropout": np.zeros(n),
        "train_fraction": np.ones(n),
    }


def _time(job: ChunkJob, members: int, device: str, total: int) -> tuple[float, dict]:
    """Train the first `members` of a population of `total` (same draws whatever `members` is)."""
    hp = {k: v[:members] for k, v in _hparams(total).items()}
    seeds = np.array([member_seed(0, i) for i in range(members)], dtype=np.int64)
    train_population(job, {k: v[:8] for k, v in hp.items()}, seeds[:8], device=device)  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = train_population(job, hp, seeds, device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0, result.metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--cpu-members", type=int, default=64,
                        help="members timed on the CPU (compute-bound there, so its rate per member-epoch holds)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("GPU check skipped: torch sees no CUDA device")
        return
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, cpu threads {torch.get_num_threads()}")
    cases = {
        "cnn_digits": ChunkJob(arch={"name": "cnn", "activation": "relu"}, task=load_task("digits"),
                               optimizer="adam", batch_size=64, epochs=args.epochs),
        "gru_arith": ChunkJob(arch={"name": "gru_seq2seq", "activation": "tanh"}, task=load_task("arith"),
                              optimizer="adam", batch_size=128, epochs=max(1, args.epochs // 3)),
    }
    for name, job in cases.items():
        t_gpu, m_gpu = _time(job, args.members, "cuda", args.members)
        n_cpu = min(args.cpu_members, args.members)
        t_cpu, m_cpu = _time(job, n_cpu, "cpu", args.members)
        rate_gpu = args.members * job.epochs / t_gpu
        rate_cpu = n_cpu * job.epochs / t_cpu
        gap = float(np.nanmax(np.abs(m_gpu["test_acc"][:n_cpu] - m_cpu["test_acc"])))
        print(f"{name}: cuda {rate_gpu:.1f} member-epochs/s, cpu {rate_cpu:.1f} member-epochs/s, "
              f"max |test_acc cuda - cpu| = {gap:.3f}")
        print(f"BENCH gpu_population_{name} speedup_vs_cpu={rate_gpu / rate_cpu:.2f} goal=>=1.0 "
              f"{'PASS' if rate_gpu >= rate_cpu else 'MISS'}")


if __name__ == "__main__":
    main()
