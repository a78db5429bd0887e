"""Zoo store benchmarks, each against its baseline in the same run (interleaved repetitions, medians).

(a) loader throughput (samples/s) vs batches gathered from an in-memory numpy array of the same weights: the default
    (in-memory) mode per epoch once loaded, the same over a whole predictor-training run of `unfzoo train`'s default
    length including its load from the store, and the chunk-streaming mode (for zoos larger than RAM);
(b) store write throughput (whole chunks, status last) vs `np.save` of the same arrays;
(c) peak memory (RSS of the whole process tree) of `unfzoo zoo` on a trivially cheap recipe, 1k vs 10k members.

Run: .venv/bin/python benchmarks/bench_store.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.predict.config import TrainConfig  # noqa: E402
from pipeline.zoo.store import MemberBlock, StoreLayout, Zoo, create_store, write_members, write_splits  # noqa: E402

# The Small-CNN-Zoo network: 3 conv 3x3 (16 ch) + dense 10 = 4,970 parameters.
SHAPES = {
    "conv1.weight": (16, 1, 3, 3), "conv1.bias": (16,),
    "conv2.weight": (16, 16, 3, 3), "conv2.bias": (16,),
    "conv3.weight": (16, 16, 3, 3), "conv3.bias": (16,),
    "head.weight": (10, 16), "head.bias": (10,),
}


def _bench_line(name: str, metric: str, value: float, op: str, goal: float) -> str:
    ok = value >= goal if op == ">=" else value <= goal
    return f"BENCH {name} {metric}={value:.3g} goal={op}{goal:g} {'PASS' if ok else 'MISS'}"


def _synthetic(members: int, checkpoints: int, k: int) -> list[MemberBlock]:
    rng = np.random.default_rng(0)
    blocks = []
    for start in range(0, members, k):
        m = min(k, members - start)
        blocks.append(MemberBlock(
            weights={n: (0.1 * rng.standard_normal((m, checkpoints, *s))).astype(np.float32) for n, s in SHAPES.items()},
            metrics={"test_acc": rng.random((m, checkpoints)).astype(np.float32)},
            hparams={}, seed=np.arange(start, start + m), config=np.arange(start, start + m),
            diverged=np.zeros(m, bool), diverged_epoch=np.full(m, -1, np.int32),
        ))
    return blocks


def _layout(checkpoints: int, k: int) -> StoreLayout:
    return StoreLayout(weight_shapes=SHAPES, metric_names=("test_acc",), checkpoint_epochs=tuple(range(checkpoints)),
                       members_per_chunk=k)


def bench_write(tmp: Path, blocks: list[MemberBlock], layout: StoreLayout, members: int, reps: int) -> str:
    """(b) write every chunk through the store vs np.save of the same arrays (one .npy per tensor per chunk)."""
    nbytes = sum(v.nbytes for b in blocks for v in b.weights.values())
    store_t, npy_t = [], []
    for r in range(reps):
        url = tmp / f"w{r}.zarr"
        t = time.perf_counter()
        create_store(str(url), layout, {"kind": "bench"}, members)
        start = 0
        for b in blocks:
            write_members(str(url), start, b)
            start += len(b)
        store_t.append(time.perf_counter() - t)
        folder = tmp / f"npy{r}"
        folder.mkdir()
        t = time.perf_counter()
        for i, b in enumerate(blocks):
            for key, v in b.weights.items():
                np.save(folder / f"{key}.{i}.npy", v)
        npy_t.append(time.perf_counter() - t)
        shutil.rmtree(url)
        shutil.rmtree(folder)
    s, n = statistics.median(store_t), statistics.median(npy_t)
    print(f"(b) write {nbytes / 1e6:.0f} MB: store {nbytes / s / 1e6:.0f} MB/s, np.save {nbytes / n / 1e6:.0f} MB/s")
    # Goal 0.25: zarr's own chunk writes (codec pipeline, temp file + rename per chunk) reach about a third of
    # np.save here; the store's bookkeeping (metadata opens, metrics, status written last) may cost a quarter more.
    return _bench_line("store_write", "ratio_vs_npsave", n / s, ">=", 0.25)


def _numpy_epochs(flat: np.ndarray, views: dict[str, tuple[int, int, tuple[int, ...]]], batch: int, seed: int,
                  epochs: int) -> int:
    """The baseline: batches gathered from one in-memory (pairs, params) numpy array, split into tensors."""
    n = 0
    for e in range(epochs):
        order = np.random.default_rng([seed, e]).permutation(len(flat))
        for i in range(0, len(order), batch):
            rows = torch.from_numpy(flat[order[i : i + batch]])  # (B, P)
            weights = {k: rows[:, a:b].reshape(-1, *s) for k, (a, b, s) in views.items()}
            n += len(weights["head.bias"])
    return n


def _loader_epochs(url: str, batch: int, seed: int, budget: int | None, epochs: int) -> int:
    """Our loader on a freshly opened zoo: the in-memory mode pays its load from the store inside the timing."""
    loader = Zoo.open(url).loader(batch_size=batch, shuffle=True, seed=seed, max_memory_bytes=budget)
    n = 0
    for _ in range(epochs):
        for weights, m, c in loader:
            n += len(m)
    return n


def bench_loader(url: str, members: int, checkpoints: int, batch: int, reps: int, epochs: int) -> list[str]:
    """(a) samples/s over a short predictor-training run of `epochs` epochs: the loader (memory mode including its
    load from the store; chunk-streaming mode) vs the same weights already in an in-memory numpy array."""
    zoo = Zoo.open(url)
    data = zoo.read_weights()
    flat = np.concatenate([data[k].reshape(members * checkpoints, -1) for k in SHAPES], axis=1)  # (pairs, P)
    views, off = {}, 0
    for k, s in SHAPES.items():
        size = int(np.prod(s))
        views[k] = (off, off + size, s)
        off += size
    rates: dict[str, list[float]] = {"numpy": [], "memory": [], "chunks": []}
    loads, steady = [], []
    for r in range(reps):  # interleaved
        for name in rates:
            t = time.perf_counter()
            if name == "numpy":
                n = _numpy_epochs(flat, views, batch, r, epochs)
            else:
                n = _loader_epochs(url, batch, r, None if name == "memory" else 0, epochs)
            rates[name].append(n / (time.perf_counter() - t))
        loader = Zoo.open(url).loader(batch_size=batch, seed=r)
        t = time.perf_counter()
        loader._load()
        loads.append(time.perf_counter() - t)
        t = time.perf_counter()
        n = sum(len(m) for _, m, _ in loader)
        steady.append(n / (time.perf_counter() - t))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"(a) loader, {members} members x {checkpoints} checkpoints ({flat.nbytes / 1e6:.0f} MB), batch {batch}, "
          f"{epochs} epochs: " + ", ".join(f"{k} {v:,.0f} samples/s" for k, v in med.items()))
    print(f"    memory mode: load {statistics.median(loads):.2f} s once, then {statistics.median(steady):,.0f} samples/s "
          "per epoch; chunk mode re-reads every chunk each epoch")
    numpy_rate = med["numpy"]
    return [
        _bench_line("store_loader_memory_steady", "ratio_vs_numpy", statistics.median(steady) / numpy_rate, ">=", 0.5),
        _bench_line("store_loader_memory", "ratio_vs_numpy", med["memory"] / med["numpy"], ">=", 0.5),
        _bench_line("store_loader_chunks", "ratio_vs_numpy", med["chunks"] / med["numpy"], ">=", 0.5),
    ]


RECIPE = """
name = "bench-tiny"
members = {members}
members_per_chunk = 256
seed = 0
epochs = 1
checkpoint_epochs = [0, 1]
[task]
name = "digits"
[arch]
name = "mlp"
hidden = [8]
[hparams]
optimizer = "sgd"
batch_size = 256
lr = {{ log_uniform = [1e-3, 1e-1] }}
"""


def _peak_rss(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS of the process tree in MB, wall seconds) of a command."""
    import psutil

    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            tree = [ps, *ps.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()[-2000:]}")
    return peak / 2**20, time.perf_counter() - t


def bench_zoo_memory(tmp: Path, sizes: tuple[int, int], workers: int) -> str:
    """(c) peak RSS of `unfzoo zoo` for a cheap recipe at two member counts."""
    exe = str(Path(sys.executable).with_name("unfzoo"))
    peaks = []
    for members in sizes:
        recipe = tmp / f"tiny{members}.toml"
        recipe.write_text(textwrap.dedent(RECIPE.format(members=members)))
        out = tmp / f"tiny{members}.zarr"
        peak, wall = _peak_rss([exe, "zoo", str(recipe), "--out", str(out), "--workers", str(workers), "--no-progress"])
        print(f"(c) unfzoo zoo, {members} members, --workers {workers}: peak RSS {peak:.0f} MB, {wall:.0f} s")
        peaks.append(peak)
        shutil.rmtree(out)
    return _bench_line("store_zoo_peak_rss", "ratio_10k_vs_1k", peaks[1] / peaks[0], "<=", 1.25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    args = parser.parse_args()
    members, checkpoints, k = (512, 2, 64) if args.quick else (2048, 4, 64)
    reps = 3 if args.quick else 5
    tmp = Path(tempfile.mkdtemp(prefix="bench_store_"))
    lines = []
    try:
        layout = _layout(checkpoints, k)
        blocks = _synthetic(members, checkpoints, k)
        lines.append(bench_write(tmp, blocks, layout, members, reps))
        url = str(tmp / "zoo.zarr")
        create_store(url, layout, {"kind": "bench"}, members)
        start = 0
        for b in blocks:
            write_members(url, start, b)
            start += len(b)
        write_splits(url)
        del blocks
        # a run as long as `unfzoo train`'s default (early stopping may end it sooner; then the load weighs more)
        epochs = 5 if args.quick else TrainConfig().epochs
        lines += bench_loader(url, members, checkpoints, 128, reps=3, epochs=epochs)
        sizes = (500, 2000) if args.quick else (1000, 10000)
        lines.append(bench_zoo_memory(tmp, sizes, workers=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for line in lines:
        print(line)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
