"""Predictor training throughput (members/s) of UNF vs the STATNN, Deep Sets, flat and probe models.

Same synthetic zoo for all, on the weight space of a zoo's members (`--zoo cnn`: the cnn-digits member, 3 conv 3x3
16 ch stride 2 + GAP + dense 10; `--zoo gru`: the gru-arith member, GRU encoder-decoder embed 16, hidden 32), the real
training code (`pipeline.predict.train.fit_run`, default TrainConfig: raw+log features, batch 10), interleaved
repetitions, median. Torch models: training members per second over an epoch (validation pass included); STATNN:
training members per second of the whole fit (features + every candidate regressor). Honours --device (the lead runs
it once on a GPU). Goal: UNF trains at least as many members/s as Deep Sets on both zoos.

    python benchmarks/bench_predict.py [--zoo cnn gru] [--models unf deepsets] [--device auto|cpu|cuda]
                                       [--members 500] [--reps 3] [--threads 1] [--clock wall|cpu]
    python benchmarks/bench_predict.py --compile-step --zoo cnn --models unf deepsets   # eager vs torch.compile
    python benchmarks/bench_predict.py --breakdown --models unf deepsets   # one eager step's time, op by op
    python benchmarks/bench_predict.py --models unf deepsets --matmul-precision highest medium
    python benchmarks/bench_predict.py --models unf unf-perm deepsets --epochs 3 --matmul-precision highest
        # eager and compiled steps only, two timed compiled epochs

`--matmul-precision P [P ...]` is `unfzoo train --matmul-precision`: the training steps' float32 matrix products at
torch's "highest" (float32), "high" (TF32 on NVIDIA GPUs) or "medium" (bfloat16 products). Every model trains at the
first; UNF and Deep Sets also at the others, interleaved with the rest, their lines ending in `_<precision>` (the same
goal, both models at that precision), plus UNF's own speed-up over the first. Default: "highest", and "medium" too on
a CPU with native bfloat16 support (AVX512-BF16 / AMX); "highest", "high" and "medium" on a GPU.

Beside members/s the table gives each torch model's arithmetic, machine-independent: MFLOP per training member of
an epoch (matrix products and convolutions of its training steps, forward and backward, and of the validation pass,
counted by torch.utils.flop_counter), and the FLOP rate that implies; then how many times Deep Sets' FLOPs UNF does
per member, which is the FLOP rate over Deep Sets' that training as many members/s takes.

UNF, the tied UNF (`unf-perm`) and Deep Sets also train with compiled steps (`unfzoo train --compile`; off with
`--no-compile`), interleaved with the rest at the first precision: rates from the epochs after the first (which
compiles; `--epochs 3` times two), lines ending in `_compiled`, plus UNF's speed-up over eager steps.

`--clock cpu` times the epochs in CPU seconds of this process (`time.process_time`) instead of wall seconds: on a
shared machine the wall clock also counts the time other jobs hold the core, which moved single ratios by +-0.15;
CPU time does not (memory-bandwidth contention still does). CPU device only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.device import MATMUL_PRECISIONS, bf16_matmul_native, resolve_device  # noqa: E402
from pipeline.zoo.members import build_member  # noqa: E402
from pipeline.predict.config import MODEL_KINDS, TrainConfig  # noqa: E402
from pipeline.predict.data import PredictData  # noqa: E402
from pipeline.predict.train import fit_run  # noqa: E402
from unf_models import WeightSpec  # noqa: E402

MODELS = ("unf", "unf-perm", "unf-hybrid", "unf-probe", "probe", "statnn", "deepsets", "flat")
# cnn only: they run the member network (the gru-arith member has no probe forward)
PROBE_MODELS = ("unf-probe", "probe")
GOAL_UNF_CPU = 100.0  # members/s: keeps `make train` (~800 training members x <=40 epochs x 3 seeds) in minutes
GOAL_UNF_GPU = 500.0
GOAL_RATIO = 0.05  # UNF training may cost up to 20x a flat MLP per member
CLOCK = time.perf_counter  # --clock cpu: time.process_time
COMPILED = "compiled"  # the setting of compiled training steps (at the first matmul precision)
STEP_MODELS = ("unf", "unf-perm", "deepsets", "flat")  # the models --compile-step and --breakdown take a step of


def cnn_spec() -> WeightSpec:
    """The cnn-digits member's weight space."""
    return WeightSpec.from_module(build_member({"name": "cnn", "in_channels": 1, "num_classes": 10}),
                                  torch.zeros(2, 1, 8, 8))


def gru_spec() -> WeightSpec:
    """The gru-arith member's weight space (vocabulary of 2-digit addition: 15 tokens)."""
    return WeightSpec.from_module(build_member({"name": "gru_seq2seq", "vocab_size": 15, "pad_id": 0, "bos_id": 1}))


SPECS = {"cnn": cnn_spec, "gru": gru_spec}


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


def run_zoo(zoo: str, entries: tuple[tuple[str, str], ...], first: str, args: argparse.Namespace,
            device: torch.device) -> dict[tuple[str, str], float]:
    """Median training members/s of each (model, setting) entry on one zoo's weight space, all entries interleaved.
    A setting is a matmul precision, or COMPILED: compiled steps at the `first` precision, timed after epoch 1."""
    spec = SPECS[zoo]()
    data = synthetic_data(spec, args.members)
    if zoo == "cnn":  # what `unfzoo train` records for a digits CNN zoo (pipeline.predict.probe.probe_setup)
        data.info["probe_setup"] = {"arch": {"name": "cnn", "stride": 2, "padding": 1, "num_classes": 10},
                                    "input_shape": [1, 8, 8], "activations": ["relu", "tanh"], "n_probes": 64}
    else:
        entries = tuple(e for e in entries if e[0] not in PROBE_MODELS)
    n_train = len(data.rows["train"])
    configs = {p: TrainConfig(models=tuple(dict.fromkeys(m for m, q in entries if q == p)), epochs=args.epochs,
                              patience=args.epochs, device=str(device), matmul_precision=first if p == COMPILED else p,
                              compile=p == COMPILED)
               for p in dict.fromkeys(p for _, p in entries)}
    print(f"zoo {zoo}: {args.members} members ({n_train} train), "
          f"{sum(int(np.prod(s)) for s in spec.shapes.values())} params/member, {_load()}")
    # warm-up (imports, allocator, first Adam step) so the first timed model is not penalized
    with tempfile.TemporaryDirectory() as tmp:
        fit_run(entries[0][0], data, TrainConfig(models=entries[0][:1], epochs=1, device=str(device),
                                                 matmul_precision=first), spec, 0, Path(tmp) / "warm", {}, device)
    rates: dict[tuple[str, str], list[float]] = {e: [] for e in entries}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for model, setting in entries if rep % 2 == 0 else entries[::-1]:  # interleaved, order alternating
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = CLOCK()
                run = fit_run(model, data, configs[setting], spec, rep, Path(tmp) / f"{model}-{setting}-{rep}",
                              {}, device)
                if run.history:  # epoch seconds include the .item() syncs of the validation pass
                    epochs = run.history[1:] if setting == COMPILED else run.history  # whose 1st epoch compiles
                    rates[(model, setting)].append(n_train / statistics.median(h["seconds"] for h in epochs))
                else:
                    rates[(model, setting)].append(n_train / (CLOCK() - t0))
    med = {e: statistics.median(r) for e, r in rates.items()}
    flops = {m: epoch_flops(m, spec, data.info, device) for m in dict.fromkeys(m for m, _ in entries)}
    print(f"{'model':10s} {'steps':8s} {'members/s (median)':>20s} {'MFLOP/member':>13s} {'GFLOP/s':>8s}  "
          f"all reps ({_load()})")
    for (m, p), r in rates.items():
        arithmetic = (f"{flops[m] / 1e6:13.1f} {flops[m] * med[(m, p)] / 1e9:8.1f}" if flops[m]
                      else f"{'-':>13s} {'-':>8s}")
        print(f"{m:10s} {p:8s} {med[(m, p)]:20.1f} {arithmetic}  {', '.join(f'{x:.1f}' for x in r)}")
    if flops.get("unf") and flops.get("deepsets") and ("deepsets", first) in med:
        need, rate = flops["unf"] / flops["deepsets"], med[("unf", first)] / med[("deepsets", first)]
        print(f"arithmetic ({zoo}, {first}): UNF does {need:.2f}x Deep Sets' FLOPs per training member, so training "
              f"as many members/s needs {need:.2f}x its FLOP rate; it ran at {need * rate:.2f}x")
    return med


def epoch_flops(model: str, spec: WeightSpec, info: dict, device: torch.device, members: int = 100) -> float:
    """Floating-point operations per training member of one epoch (training steps, forward and backward, plus the
    validation pass), as `run_zoo` times it: torch.utils.flop_counter's count (matrix products and convolutions)
    of a 2-epoch run minus a 1-epoch one on a small zoo of the same split fractions. 0 for STATNN (not torch)."""
    from torch.utils.flop_counter import FlopCounterMode

    if MODEL_KINDS[model] == "statnn":
        return 0.0
    data = synthetic_data(spec, members)
    data.info.update(info)
    counts = []
    with tempfile.TemporaryDirectory() as tmp:
        for epochs in (1, 2):
            config = TrainConfig(models=(model,), epochs=epochs, patience=epochs, device=str(device))
            with FlopCounterMode(display=False) as counter:
                fit_run(model, data, config, spec, 0, Path(tmp) / f"e{epochs}", {}, device)
            counts.append(counter.get_total_flops())
    return (counts[1] - counts[0]) / len(data.rows["train"])


def _load() -> str:
    return "load %.2f %.2f %.2f" % os.getloadavg()


def _line(name: str, metric: str, value: float, goal: float) -> None:
    print(f"BENCH {name} {metric}={value:.3f} goal=>={goal:g} {'PASS' if value >= goal else 'MISS'}")


def training_stepper(spec: WeightSpec, model: str, members: int,
                     compile_fn: Callable[[Callable[..., Any]], Callable[..., Any]] | None = None) -> Callable[[], None]:
    """One training step of `model` on a synthetic zoo of `spec` (batch 10 of prepared inputs, forward, BCE,
    backward, fused Adam), the forward passed through `compile_fn` when given."""
    from pipeline.predict.data import normalization_stats
    from pipeline.predict.models import TensorNormalizer, build_net
    from pipeline.predict.train import _hyperparameters

    data = synthetic_data(spec, members)
    parts = data.take(data.rows["train"])
    norm = normalization_stats([w for _, _, w in parts], data.names)
    weights, y = parts[0][2], torch.rand(len(data.rows["train"]))
    torch.manual_seed(0)
    config = TrainConfig(models=(model,), device="cpu")
    net = build_net(MODEL_KINDS[model], spec, _hyperparameters(model, config), TensorNormalizer(data.names, *norm))
    prepared = net.prepare(weights)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)
    forward = net.forward_prepared if compile_fn is None else compile_fn(net.forward_prepared)
    gen, loss_fn = torch.Generator().manual_seed(0), torch.nn.BCEWithLogitsLoss()

    def step() -> None:
        idx = torch.randint(0, len(y), (10,), generator=gen)
        loss = loss_fn(forward(net.select(prepared, idx)), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def compile_step(zoo: str, models: tuple[str, ...], members: int, reps: int = 7) -> None:
    """One training step (`training_stepper`), eager against `torch.compile` (inductor, as `unfzoo train --compile`
    runs it) of the model's forward: seconds of the first two steps (the compile) and thread CPU ms per step,
    interleaved, median of `reps` x 10 steps; then the eager step's top ops (torch.profiler)."""
    from pipeline.compile import compile_step as compiled_forward

    spec = SPECS[zoo]()

    def stepper(model: str, compiled: bool) -> Callable[[], None]:
        return training_stepper(spec, model, members, compiled_forward if compiled else None)

    steps = {}
    for model in models:
        for compiled in (False, True):
            step = stepper(model, compiled)
            t0 = time.perf_counter()
            step()
            step()
            what = "compiled" if compiled else "eager"
            print(f"  {zoo} {model} {what}: first two steps {time.perf_counter() - t0:.1f} s", flush=True)
            steps[(model, compiled)] = step
    times: dict[tuple[str, bool], list[float]] = {k: [] for k in steps}
    for _ in range(reps):
        for key, step in steps.items():
            t0 = time.thread_time()
            for _ in range(10):
                step()
            times[key].append((time.thread_time() - t0) / 10)
    for model in models:
        eager, compiled = (statistics.median(times[(model, c)]) for c in (False, True))
        print(f"{zoo} {model}: training step eager {eager * 1e3:.1f} ms, compiled {compiled * 1e3:.1f} ms "
              f"(speed-up {eager / compiled:.2f}, thread CPU time, {_load()})")
    for model in models:  # where an eager step goes
        op_breakdown(f"{zoo} {model}", steps[(model, False)])


def op_breakdown(label: str, step: Callable[[], None], steps: int = 10, top: int = 12) -> None:
    """Where one step's time goes: every aten op it dispatches (forward, backward, optimizer) timed around its own
    kernel (a TorchDispatchMode), summed per op and per (op, input shapes), ms per step. Unlike torch.profiler with
    input shapes, whose per-op overhead inflated small ops 2-5x here, these times add up to about the plain step's
    (both printed; each op's time also holds a few microseconds of dispatch, which shows on many small ops)."""
    from collections import defaultdict

    from torch.utils._python_dispatch import TorchDispatchMode

    times: dict[tuple[str, str], list[float]] = defaultdict(list)

    class _Timer(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            out = func(*args, **(kwargs or {}))
            elapsed = time.perf_counter() - t0  # the op alone, not the naming below
            shapes = str([tuple(a.shape) for a in args if isinstance(a, torch.Tensor)])
            times[(func.overloadpacket.__name__, shapes)].append(elapsed)
            return out

    for _ in range(3):
        step()
    plain = []
    for _ in range(steps):
        t0 = time.thread_time()
        step()
        plain.append(time.thread_time() - t0)
    with _Timer():
        for _ in range(steps):
            step()
    per_op: dict[str, float] = defaultdict(float)
    for (op, _), ts in times.items():
        per_op[op] += sum(ts)
    total = sum(per_op.values()) / steps
    print(f"{label}: eager step {statistics.median(plain) * 1e3:.2f} ms (thread CPU), its ops {total * 1e3:.2f} ms "
          f"({_load()}); ms per step by op: " + ", ".join(f"{op} {t / steps * 1e3:.2f}" for op, t in
                                                          sorted(per_op.items(), key=lambda kv: -kv[1])[:8]))
    for (op, shapes), ts in sorted(times.items(), key=lambda kv: -sum(kv[1]))[:top]:
        print(f"  {op:24s} {sum(ts) / steps * 1e3:6.2f} ms {len(ts) / steps:5.1f} calls  {shapes}")


def breakdown(zoo: str, models: tuple[str, ...], members: int) -> None:
    """`op_breakdown` of one eager training step (`training_stepper`) per model, on one zoo's weight space."""
    spec = SPECS[zoo]()
    for model in models:
        op_breakdown(f"{zoo} {model}", training_stepper(spec, model, members))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", nargs="+", default=["cnn", "gru"], choices=list(SPECS))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--members", type=int, default=500)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 by default: on a shared 2-core machine more threads oversubscribe)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="time epochs in wall seconds (default) or in this process's CPU seconds (cpu device)")
    parser.add_argument("--matmul-precision", nargs="+", choices=MATMUL_PRECISIONS, default=None,
                        help="float32 matmul precision(s) of the training steps: every model at the first, unf and "
                             "deepsets at the others, all interleaved (default: highest, plus medium on a bfloat16 "
                             "CPU, plus high and medium on a GPU)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also train unf, unf-perm and deepsets with compiled steps (`unfzoo train --compile`), "
                             "interleaved with the rest; rates from the epochs after the first (which compiles), "
                             "lines ending in _compiled (default: on)")
    parser.add_argument("--breakdown", action="store_true",
                        help="instead: where one eager training step's time goes, op by op (unf, unf-perm, "
                             "deepsets, flat; seconds)")
    parser.add_argument("--compile-step", action="store_true",
                        help="instead: one training step eager vs torch.compile'd (inductor; minutes to compile) "
                             "and the eager step's time op by op (as --breakdown)")
    args = parser.parse_args()
    from pipeline.allocator import allocator_report

    print(allocator_report())
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.clock == "cpu":
        if device.type != "cpu":
            parser.error("--clock cpu needs --device cpu (a GPU's work is not CPU time)")
        import pipeline.predict.train as train  # the epoch timer of fit_run, read as CPU seconds

        train.time = types.SimpleNamespace(perf_counter=time.process_time)  # type: ignore[attr-defined]
        global CLOCK
        CLOCK = time.process_time
    if args.breakdown:
        for zoo in args.zoo:
            breakdown(zoo, tuple(m for m in args.models if m in STEP_MODELS), args.members)
        return
    if args.compile_step:
        for zoo in args.zoo:
            compile_step(zoo, tuple(m for m in args.models if m in STEP_MODELS),
                         args.members)
        return
    if args.compile and args.epochs < 2:
        parser.error("--compile needs --epochs 2 or more (the first epoch compiles and is not timed)")
    tag = "gpu" if device.type == "cuda" else "cpu"
    models = tuple(args.models)
    precisions = list(dict.fromkeys(args.matmul_precision or _default_precisions(device)))
    settings = precisions + ([COMPILED] if args.compile else [])
    print(f"device {device}, torch threads {torch.get_num_threads()}, clock {args.clock}, "
          f"bfloat16 matmul hardware {bf16_matmul_native(device)}, matmul precisions {', '.join(precisions)}, "
          f"compiled steps {'too' if args.compile else 'no'}")
    # every model at the first precision; at the others only UNF and Deep Sets (the goal's pair); compiled: those
    # and the tied UNF (which compiling gains most)
    others = {COMPILED: ("unf", "unf-perm", "deepsets")}
    entries = tuple((m, p) for i, p in enumerate(settings) for m in models
                    if i == 0 or m in others.get(p, ("unf", "deepsets")))
    for zoo in args.zoo:
        med = run_zoo(zoo, entries, precisions[0], args, device)
        for p in settings:
            _report(zoo, {m: r for (m, q), r in med.items() if q == p}, tag + ("" if p == "highest" else f"_{p}"),
                    device)
        for p in settings[1:]:
            if ("unf", p) in med and ("unf", settings[0]) in med:  # UNF's own gain from the setting
                _line(f"predict_unf_{p}_vs_{settings[0]}_{zoo}_{tag}", "speedup",
                      med[("unf", p)] / med[("unf", settings[0])], 1.0)


def _default_precisions(device: torch.device) -> list[str]:
    """highest, plus what the hardware accelerates: high (TF32) and medium on a GPU, medium on a bfloat16 CPU."""
    if device.type == "cuda":
        return ["highest", "high", "medium"]
    return ["highest", "medium"] if bf16_matmul_native(device) else ["highest"]


def _report(zoo: str, med: dict[str, float], tag: str, device: torch.device) -> None:
    """The BENCH lines of one zoo's rates (tag: cpu / gpu, then _<setting> when not highest)."""
    suffix = f"{tag}" if zoo == "cnn" else f"{zoo}_{tag}"
    if "unf" in med and zoo == "cnn" and tag in ("cpu", "gpu", f"cpu_{COMPILED}", f"gpu_{COMPILED}"):
        goal = GOAL_UNF_GPU if device.type == "cuda" else GOAL_UNF_CPU
        _line(f"predict_unf_train_{tag}", "throughput", med["unf"], goal)
    if "unf" in med:
        for base in ("flat", "statnn"):
            if base in med:
                _line(f"predict_unf_vs_{base}_{suffix}", "throughput_ratio", med["unf"] / med[base], GOAL_RATIO)
        if "deepsets" in med:
            _line(f"predict_unf_vs_deepsets_{zoo}_{tag}", "throughput_ratio", med["unf"] / med["deepsets"], 1.0)
        if "unf-perm" in med:
            _line(f"predict_unf_exact_vs_perm_{suffix}", "throughput_ratio", med["unf"] / med["unf-perm"], 0.5)
    if "unf-perm" in med and "deepsets" in med:  # the same goal for the tied form, which does fewer FLOPs on a GRU
        _line(f"predict_unf_perm_vs_deepsets_{zoo}_{tag}", "throughput_ratio", med["unf-perm"] / med["deepsets"], 1.0)
    if "unf-probe" in med and "unf" in med:  # the probe readout's extra cost: every member run on 64 inputs x 2
        _line(f"predict_unf_probe_vs_unf_{suffix}", "throughput_ratio", med["unf-probe"] / med["unf"], 0.5)
    if "unf-hybrid" in med and "unf" in med:  # the hybrid's extra cost: STATNN statistics per batch
        _line(f"predict_hybrid_vs_unf_{suffix}", "throughput_ratio", med["unf-hybrid"] / med["unf"], 0.5)


if __name__ == "__main__":
    main()
