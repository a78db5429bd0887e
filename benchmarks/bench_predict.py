"""Predictor training throughput (members/s) of UNF vs the STATNN, Deep Sets and flat baselines.

Same synthetic zoo for all (a Small-CNN-Zoo-style CNN weight space: 3 conv 3x3 16 ch + GAP + dense 10), the real
training code (`pipeline.predict.train.fit_run`), interleaved repetitions, median. Torch models: training members
per second over an epoch (batch 10, validation pass included); STATNN: training members per second of the whole fit
(features + every candidate regressor). Honours --device (the lead runs it once on a GPU).

    python benchmarks/bench_predict.py [--device auto|cpu|cuda] [--members 500] [--reps 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.device import resolve_device  # noqa: E402
from pipeline.predict.config import TrainConfig  # noqa: E402
from pipeline.predict.data import PredictData  # noqa: E402
from pipeline.predict.train import fit_run  # noqa: E402
from unf_models import WeightSpec  # noqa: E402

MODELS = ("unf", "unf-perm", "unf-hybrid", "statnn", "deepsets", "flat")
GOAL_UNF_CPU = 100.0  # members/s: keeps `make train` (~800 training members x <=40 epochs x 3 seeds) in minutes
GOAL_UNF_GPU = 500.0
GOAL_RATIO = 0.05  # UNF training may cost up to 20x a flat MLP per member


def cnn_spec() -> WeightSpec:
    conv = dict(kernel_size=3, stride=2, padding=1)
    net = nn.Sequential(nn.Conv2d(1, 16, **conv), nn.ReLU(), nn.Conv2d(16, 16, **conv), nn.ReLU(),
                        nn.Conv2d(16, 16, **conv), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    return WeightSpec.from_module(net, torch.zeros(1, 1, 8, 8))


def synthetic_data(spec: WeightSpec, members: int, seed: int = 0) -> PredictData:
    gen = torch.Generator().manual_seed(seed)
    scale = torch.rand(members, generator=gen) + 0.2  # (N,)
    weights = {n: torch.randn(members, *s, generator=gen) * scale.view(-1, *[1] * len(s))
               for n, s in spec.shapes.items()}
    y = torch.sigmoid(3 * (scale - 0.7) + 0.1 * torch.randn(members, generator=gen)).double().numpy()
    order = np.random.default_rng(seed).permutation(members)
    n_tr, n_va = int(0.8 * members), int(0.1 * members)
    rows = {"train": np.sort(order[:n_tr]), "val": np.sort(order[n_tr:n_tr + n_va]),
            "test": np.sort(order[n_tr + n_va:])}
    return PredictData.single(weights, y=y, member=np.arange(members), epoch=np.zeros(members, int), rows=rows,
                       target="test_acc", loss="bce", y_mean=0.0, y_std=1.0, names=tuple(spec.names),
                       info={"checkpoint_epochs": [0]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--members", type=int, default=500)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 by default: on a shared 2-core machine more threads oversubscribe)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    spec = cnn_spec()
    data = synthetic_data(spec, args.members)
    n_train = len(data.rows["train"])
    config = TrainConfig(models=MODELS, epochs=args.epochs, patience=args.epochs, device=str(device))
    print(f"device {device}, torch threads {torch.get_num_threads()}, {args.members} members ({n_train} train), "
          f"{sum(int(np.prod(s)) for s in spec.shapes.values())} params/member")
    # warm-up (imports, allocator, first Adam step) so the first timed model is not penalized
    with tempfile.TemporaryDirectory() as tmp:
        fit_run("flat", data, TrainConfig(models=("flat",), epochs=1, device=str(device)), spec, 0,
                Path(tmp) / "warm", {}, device)
    rates: dict[str, list[float]] = {m: [] for m in MODELS}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for model in MODELS:  # interleaved
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                run = fit_run(model, data, config, spec, rep, Path(tmp) / f"{model}-{rep}", {}, device)
                if run.history:  # epoch seconds include the .item() syncs of the validation pass
                    rates[model].append(n_train / statistics.median(h["seconds"] for h in run.history))
                else:
                    rates[model].append(n_train / (time.perf_counter() - t0))
    med = {m: statistics.median(r) for m, r in rates.items()}
    print(f"{'model':10s} {'members/s (median)':>20s}  all reps")
    for m in MODELS:
        print(f"{m:10s} {med[m]:20.1f}  {', '.join(f'{r:.1f}' for r in rates[m])}")
    tag = "gpu" if device.type == "cuda" else "cpu"
    goal = GOAL_UNF_GPU if device.type == "cuda" else GOAL_UNF_CPU
    print(f"BENCH predict_unf_train_{tag} throughput={med['unf']:.1f} goal=>={goal:g} "
          f"{'PASS' if med['unf'] >= goal else 'MISS'}")
    for base in ("flat", "statnn", "deepsets"):
        ratio = med["unf"] / med[base]
        print(f"BENCH predict_unf_vs_{base}_{tag} throughput_ratio={ratio:.3f} goal=>={GOAL_RATIO:g} "
              f"{'PASS' if ratio >= GOAL_RATIO else 'MISS'}")
    ratio = med["unf-hybrid"] / med["unf"]  # the hybrid's extra cost: STATNN statistics (quantiles) per batch
    print(f"BENCH predict_hybrid_vs_unf_{tag} throughput_ratio={ratio:.3f} goal=>=0.5 "
          f"{'PASS' if ratio >= 0.5 else 'MISS'}")
    ratio = med["unf"] / med["unf-perm"]
    print(f"BENCH predict_unf_exact_vs_perm_{tag} throughput_ratio={ratio:.3f} goal=>=0.5 "
          f"{'PASS' if ratio >= 0.5 else 'MISS'}")


if __name__ == "__main__":
    main()
