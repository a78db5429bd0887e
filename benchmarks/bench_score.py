"""Scoring throughput: `score_checkpoints` on 10,000 small CNN checkpoint files against a plain loop that only
`torch.load`s the same files (weights_only=True), side by side, interleaved repetitions, medians.

Files: state dicts of the Small-CNN-Zoo network (3 conv 3x3, 16 channels + dense 10 = 4,970 parameters), ~22 KB
each, written to a temporary folder. Predictors are trained briefly on a tiny zoo of the same network (their
throughput, not their accuracy, matters here). The pipeline itself (safe loading, matching, stacking, batching) is
measured with the flat MLP predictor, whose forward pass is ~free: default reading path (in-process or a
LocalCluster, see `pipeline.score.local_cluster_pays_off`) and a forced LocalCluster, each repeated and interleaved
with the bare loop. Then, once each: the STATNN predictor (per-tensor quantiles) on all files, and the UNF predictor
(hidden (16, 16), head 512) on a subset, where on a CPU its forward pass, not I/O, sets the pace.

Goal: scoring time <= 1.5x the bare-load time on 2 cores (scoring nearly free on top of I/O).

Run: .venv/bin/python benchmarks/bench_score.py [--files N] [--reps R] [--unf-files N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL = 1.5


def _cnn(width: int = 16):
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, width, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10),
    )


def _tiny_zoo(url: str, members: int = 60):
    """A zoo of random CNNs whose test_acc falls with their weight scale (enough to train predictors on)."""
    import numpy as np
    import torch

    from pipeline.zoo.store import MemberBlock, StoreLayout, Zoo, create_store, write_members, write_splits
    from unf_models import WeightSpec

    spec = WeightSpec.from_module(_cnn(), torch.zeros(1, 1, 8, 8))
    layout = StoreLayout(weight_shapes=spec.shapes, metric_names=("test_acc",), checkpoint_epochs=(1,),
                         members_per_chunk=members, continuous=(), categorical={})
    create_store(url, layout, {"spec": spec.to_dict(), "name": "bench-score", "task": {"name": "digits"}}, members)
    rng = np.random.default_rng(0)
    scale = rng.uniform(0.05, 0.5, size=(members, 1))
    weights = {n: (rng.standard_normal((members, 1, *s)) * scale.reshape(members, 1, *[1] * len(s))).astype(np.float32)
               for n, s in spec.shapes.items()}
    write_members(url, 0, MemberBlock(
        weights=weights, metrics={"test_acc": (1 - scale).astype(np.float32)}, hparams={},
        seed=np.arange(members), config=np.arange(members), diverged=np.zeros(members, bool),
        diverged_epoch=np.full(members, -1, np.int32)))
    write_splits(url)
    return Zoo.open(url)


def _write_files(zoo, folder: Path, n: int) -> list[Path]:
    """n state dicts: zoo members plus a little noise, one .pt file each."""
    import numpy as np
    import torch

    base = zoo.weights(np.arange(zoo.n_members), -1)
    gen = torch.Generator().manual_seed(0)
    paths = []
    for i in range(n):
        m = i % zoo.n_members
        state = {k: v[m] + 0.01 * torch.randn(v.shape[1:], generator=gen) for k, v in base.items()}
        path = folder / f"run{i // 1000:02d}" / f"ckpt{i:05d}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)
        paths.append(path)
    return paths


def _bare_load(paths: list[Path]) -> None:
    import torch

    for path in paths:
        torch.load(path, map_location="cpu", weights_only=True)


def _line(name: str, ratio: float) -> str:
    return f"BENCH {name} time_ratio={ratio:.2f} goal=<={GOAL:g} {'PASS' if ratio <= GOAL else 'MISS'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--unf-files", type=int, default=500, help="files scored by the UNF predictor (CPU-bound)")
    args = parser.parse_args()
    from pipeline.allocator import allocator_report

    print(allocator_report())

    sys.path.insert(0, str(ROOT))
    from pipeline.predict import TrainConfig, load_predictor, train_predictor
    from pipeline.score import _default_workers, local_cluster_pays_off, score_checkpoints

    tmp = Path(tempfile.mkdtemp(prefix="bench_score_"))
    try:
        t0 = time.perf_counter()
        zoo = _tiny_zoo(str(tmp / "zoo.zarr"))
        config = TrainConfig(models=("flat", "statnn", "unf"), epochs=1, fractions=(0.6, 0.2, 0.2), device="cpu")
        out = train_predictor(zoo, config, tmp / "predictors").out_dir
        flat, statnn, unf = (load_predictor(out / kind, device="cpu") for kind in ("flat", "statnn", "unf"))
        folder = tmp / "files"
        paths = _write_files(zoo, folder, args.files)
        workers = _default_workers()
        default = f"LocalCluster of {workers} workers" if local_cluster_pays_off(len(paths), workers) else "in-process"
        print(f"setup {time.perf_counter() - t0:.0f}s: {len(paths)} files of {paths[0].stat().st_size / 1024:.0f} KB, "
              f"{os.cpu_count()} cores; default reading path for {len(paths)} files: {default}", flush=True)

        def score(predictor, inputs, n: int, **kw) -> None:
            frame = score_checkpoints(predictor, inputs, **kw)
            assert len(frame) == n and (frame["status"] == "ok").all(), frame["error"].unique()[:3]

        runs = {  # the flat MLP's forward pass is ~free: these measure the scoring pipeline itself
            "bare_load": lambda: _bare_load(paths),
            "score_default": lambda: score(flat, [folder], len(paths)),
            "score_local_cluster": lambda: score(flat, [folder], len(paths), workers=workers),
        }
        times: dict[str, list[float]] = {k: [] for k in runs}
        for rep in range(args.reps):
            for name in list(runs) if rep % 2 == 0 else list(runs)[::-1]:
                start = time.perf_counter()
                runs[name]()
                times[name].append(time.perf_counter() - start)
            print(f"rep {rep}: " + ", ".join(f"{k} {times[k][-1]:.1f}s" for k in runs), flush=True)
        med = {k: statistics.median(v) for k, v in times.items()}

        start = time.perf_counter()  # STATNN: once, default path (its features are quantiles of every tensor)
        score(statnn, [folder], len(paths))
        statnn_s = time.perf_counter() - start
        subset = paths[: args.unf_files]  # UNF on a CPU: the forward pass, not I/O, sets the pace
        start = time.perf_counter()
        score(unf, subset, len(subset), workers=0)
        unf_s = time.perf_counter() - start
        start = time.perf_counter()
        _bare_load(subset)
        unf_bare_s = time.perf_counter() - start

        n = len(paths)
        print(f"{'bare torch.load loop':34s} {med['bare_load']:6.1f}s {n / med['bare_load']:6.0f} files/s")
        print(f"{'score, flat predictor, ' + default:34s} {med['score_default']:6.1f}s "
              f"{n / med['score_default']:6.0f} checkpoints/s")
        print(f"{'score, flat, LocalCluster':34s} {med['score_local_cluster']:6.1f}s "
              f"{n / med['score_local_cluster']:6.0f} checkpoints/s  ({workers} workers, incl. start and close)")
        print(f"{'score, STATNN predictor':34s} {statnn_s:6.1f}s {n / statnn_s:6.0f} checkpoints/s  (one run)")
        print(f"{'score, UNF predictor, CPU':34s} {unf_s:6.1f}s {len(subset) / unf_s:6.0f} checkpoints/s  "
              f"({len(subset)} files; bare load of them {unf_bare_s:.1f}s)")
        print(_line("score_10k_files", med["score_default"] / med["bare_load"]))
        print(_line("score_10k_files_local_cluster", med["score_local_cluster"] / med["bare_load"]))
        print(_line("score_10k_files_statnn", statnn_s / med["bare_load"]))
        print(_line("score_unf_cpu", unf_s / unf_bare_s))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
