"""glibc defaults vs `pipeline.allocator.tune_allocator`: page faults and CPU time of the work they matter for.

malloc settings are process-wide, so each measurement runs in a fresh interpreter, once with `UNFZOO_MALLOC=default`
(glibc as it is) and once tuned, alternated over `--rounds` rounds (default, tuned, default, tuned, ...):

- `layer`: one `UNFLinear` forward+backward, batch 32, 16 -> 16 channels (benchmarks/bench_unf.py's step), MLP
  64-64-64-10 permutable and CNN 1-16-16-16 exact: minor page faults and thread CPU ms per call (median of 15);
- `engine`: one 64-member `cnn` chunk on digits, 2 epochs (`train_population`): process CPU seconds, system seconds
  and minor faults per chunk (median of 3 chunks).

One thread. Goal: tuned no slower than glibc's defaults (ratio of the medians over rounds <= 1).

    python benchmarks/bench_allocator.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, resource, statistics, sys, time
sys.path[:0] = [{bench!r}, {root!r}]
import torch
torch.set_num_threads(1)
from pipeline.allocator import tune_allocator
tuned = tune_allocator()


def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


out = {{"tuned": tuned}}
if {what!r} == "layer":
    import bench_unf as bu
    for shape, mode in (("mlp", "permutable"), ("cnn", "exact")):
        spec = bu.SHAPES[shape]()
        torch.manual_seed(0)
        step = bu._ours_step(bu.UNFLinear(spec, 16, 16, fixed_axes=mode), bu._inputs(spec))
        for _ in range(3):
            step()
        ms, flt = [], []
        for _ in range(15):
            f0, t0 = faults(), time.thread_time()
            step()
            ms.append((time.thread_time() - t0) * 1e3)
            flt.append(faults() - f0)
        out[f"{{shape}}_{{mode}}"] = {{"ms": round(statistics.median(ms), 2), "faults": statistics.median(flt)}}
else:
    import numpy as np
    from pipeline.zoo.population import ChunkJob, member_seed, train_population
    from pipeline.zoo.tasks import load_task
    job = ChunkJob({{"name": "cnn"}}, load_task("digits"), "adam", 32, 2)
    rng = np.random.default_rng(0)
    hp = {{"lr": 10 ** rng.uniform(-3, -2, 64)}}
    seeds = np.array([member_seed(1, i) for i in range(64)])
    train_population(job, {{k: v[:2] for k, v in hp.items()}}, seeds[:2], device="cpu")  # warm-up
    cpu, sys_s, flt = [], [], []
    for _ in range(3):
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        train_population(job, hp, seeds, device="cpu")
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu.append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
        sys_s.append(r1.ru_stime - r0.ru_stime)
        flt.append(r1.ru_minflt - r0.ru_minflt)
    out["engine"] = {{"cpu_s": round(statistics.median(cpu), 3), "sys_s": round(statistics.median(sys_s), 3),
                      "faults": statistics.median(flt)}}
print("RESULT " + json.dumps(out))
"""


def _child(what: str, mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(UNFZOO_MALLOC=mode, OMP_NUM_THREADS="1")
    code = _CHILD.format(bench=str(ROOT / "benchmarks"), root=str(ROOT), what=what)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    line = next(x for x in run.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _load() -> str:
    return "load %.2f %.2f %.2f" % os.getloadavg()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="alternations of glibc defaults and tuned")
    args = parser.parse_args()
    results: dict[str, dict[str, list[dict]]] = {"layer": {"default": [], "tuned": []},
                                                 "engine": {"default": [], "tuned": []}}
    for r in range(args.rounds):
        for what in results:
            for mode in ("default", "tuned"):
                got = _child(what, mode)
                if (mode == "tuned") != got.pop("tuned"):
                    print(f"{mode}: the allocator setting did not take effect here (not glibc?); nothing to compare")
                    return
                results[what][mode].append(got)
                print(f"round {r} {what:6s} {mode:7s} {json.dumps(got)} ({_load()})", flush=True)

    def median(what: str, mode: str, key: str, field: str) -> float:
        return statistics.median(run[key][field] for run in results[what][mode])

    for key in ("mlp_permutable", "cnn_exact"):
        d, t = median("layer", "default", key, "ms"), median("layer", "tuned", key, "ms")
        fd, ft = median("layer", "default", key, "faults"), median("layer", "tuned", key, "faults")
        print(f"UNF layer {key}: {d:.1f} -> {t:.1f} ms per call, {fd:.0f} -> {ft:.0f} minor faults (glibc -> tuned)")
        print(f"BENCH allocator_unf_layer_{key} ratio={t / d:.2f} goal=<=1 {'PASS' if t <= d else 'MISS'}")
    d, t = median("engine", "default", "engine", "cpu_s"), median("engine", "tuned", "engine", "cpu_s")
    print(f"engine chunk: {d:.2f} -> {t:.2f} s CPU, system {median('engine', 'default', 'engine', 'sys_s'):.2f} -> "
          f"{median('engine', 'tuned', 'engine', 'sys_s'):.2f} s, "
          f"{median('engine', 'default', 'engine', 'faults'):.0f} -> "
          f"{median('engine', 'tuned', 'engine', 'faults'):.0f} minor faults (glibc -> tuned)")
    print(f"BENCH allocator_engine_cpu ratio={t / d:.2f} goal=<=1 {'PASS' if t <= d else 'MISS'}")


if __name__ == "__main__":
    main()
