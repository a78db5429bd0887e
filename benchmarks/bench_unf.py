"""UNF layer benchmark: one `UNFLinear` forward+backward on one pinned core (batch 32, 16 -> 16 channels).

1. Against the `nfn` package on the same weight spaces and inputs: fixed_axes="permutable" vs `NPLinear` and
   fixed_axes="exact" vs `HNPLinear`, on an MLP 64-64-64-10 and a CNN 1-16-16-16 (3x3 kernels) + linear head to 10.
   Goals: permutable <= 0.5x NPLinear, exact <= 0.7x HNPLinear, permutable CNN no slower than exact CNN. The
   backward starts from sum(outputs) by default; `--grad dense` starts it from fixed random output gradients instead
   (as a training step's are; UNF compares worse there). Each layer's arithmetic is printed beside its time: MFLOP
   of one forward+backward (matrix products and convolutions, torch.utils.flop_counter) and the FLOP rate.
2. Absolute milliseconds for MLP 64-64-64-10, GRU seq2seq (vocab 14, embed 8, hidden 16) and the CNN, both modes
   (to set against other implementations).
3. `torch.compile` (inductor) of the layer: compile seconds and compiled speed-up over eager (a training step's
   backward, from dense output gradients; from sum(outputs) too, printed).
4. Time vs number of basis terms (1-3 layer GRU seq2seq), grouped layer against a per-term loop over the same basis.
5. `--fold-widths 16 32 64`: the permutable CNN layer's kernel-folded groups as dense matmuls vs by their structure vs
   the layer's per-group choice, at those channel widths. Goal: the choice no slower than dense.

Calls are interleaved (order alternates every repetition); medians; the load average is printed with each figure.

Run: `.venv/bin/python benchmarks/bench_unf.py [--quick] [--compile SHAPE ...] [--vs-reference] [--skip-terms]
[--fold-widths N ...] [--grad sum|dense]` (`--compile` with no shape skips compiling).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import unf_models as um
from unf_models.basis import pair_terms
from unf_models.layers import UNFLinear, _apply_write, _Output, _read, _write_plan

BATCH, CHANNELS = 32, 16


def _load() -> str:
    return "load %.2f %.2f %.2f" % os.getloadavg()


def _time_calls(fns: dict[str, Callable[[], None]], reps: int, warmup: int = 2
                ) -> tuple[dict[str, float], dict[str, float]]:
    """Median CPU seconds (all threads of this process: other jobs on the core do not count) and wall seconds per
    call; calls interleaved (order alternates every repetition)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    wall: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(reps):
        for k in names if r % 2 == 0 else names[::-1]:
            c0, w0 = time.process_time(), time.perf_counter()
            fns[k]()
            cpu[k].append(time.process_time() - c0)
            wall[k].append(time.perf_counter() - w0)
    return {k: statistics.median(v) for k, v in cpu.items()}, {k: statistics.median(v) for k, v in wall.items()}


def _timeit(fns: dict[str, Callable[[], None]], reps: int, warmup: int = 2) -> dict[str, float]:
    """Median wall seconds per call; calls interleaved (order alternates every repetition)."""
    return _time_calls(fns, reps, warmup)[1]


def _bench(name: str, value: float, op: str, goal: float, metric: str = "ratio") -> None:
    ok = value <= goal if op == "<=" else value >= goal
    print(f"BENCH {name} {metric}={value:.2f} goal={op}{goal:g} {'PASS' if ok else 'MISS'}", flush=True)


class _Seq2Seq(nn.Module):
    """GRU seq2seq (Tiny RNN Zoo shape): embedding, GRU encoder -> GRU decoder, output projection."""

    def __init__(self, layers: int = 1, vocab: int = 14, emb: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.enc = nn.GRU(emb, hidden, layers, batch_first=True)
        self.dec = nn.GRU(emb, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        _, h = self.enc(self.emb(src))
        out, _ = self.dec(self.emb(tgt), h)
        return self.head(out)


def mlp_net() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def cnn_net(in_channels: int = 1, kernel: int = 3) -> nn.Module:
    conv = dict(kernel_size=kernel, padding=kernel // 2)
    return nn.Sequential(nn.Conv2d(in_channels, 16, **conv), nn.ReLU(), nn.Conv2d(16, 16, **conv), nn.ReLU(),
                         nn.Conv2d(16, 16, **conv), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 10))


SHAPES: dict[str, Callable[[], um.WeightSpec]] = {
    "mlp": lambda: um.WeightSpec.from_module(mlp_net()),
    "gru": lambda: um.WeightSpec.from_module(_Seq2Seq()),
    "cnn": lambda: um.WeightSpec.from_module(cnn_net(), torch.zeros(1, 1, 8, 8)),
}
LABELS = {"mlp": "MLP 64-64-64-10", "gru": "GRU seq2seq (vocab 14, embed 8, hidden 16)",
          "cnn": "CNN 1-16-16-16 3x3 + linear head to 10"}


def _inputs(spec: um.WeightSpec) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(BATCH, CHANNELS, *s, generator=g) for k, s in spec.shapes.items()}


def _ours_step(layer: nn.Module, x: dict[str, torch.Tensor], grads: list[torch.Tensor] | None = None
               ) -> Callable[[], None]:
    """One forward + backward of ``layer`` on ``x``, from sum(outputs) or from the output gradients ``grads``."""
    def run() -> None:
        _backward(list(layer(x).values()), grads)
    return run


def _flops(run: Callable[[], None]) -> int:
    """Floating-point operations of one call of `run` (torch.utils.flop_counter: matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def _backward(outputs: list[torch.Tensor], grads: list[torch.Tensor] | None) -> None:
    """Backward from sum(outputs) (every output gradient an expanded stride-0 tensor), or from dense `grads`."""
    if grads is None:
        sum(v.sum() for v in outputs).backward()
    else:
        torch.autograd.backward(outputs, grads)


def bench_vs_nfn(shape: str, reps: int, grad: str = "sum") -> dict[str, float]:
    """ours/nfn time ratios for one shape (weights then biases of each layer, as nfn wants them). `grad`: the
    backward starts from the sum of the outputs ("sum") or from fixed random output gradients ("dense", as a
    training step's are)."""
    from nfn.common import WeightSpaceFeatures, network_spec_from_wsfeat
    from nfn.layers import HNPLinear, NPLinear

    spec = SHAPES[shape]()
    x = _inputs(spec)
    names = list(spec.names)
    wsfeat = WeightSpaceFeatures([x[n] for n in names[0::2]], [x[n] for n in names[1::2]])
    torch.manual_seed(0)
    nfn_spec = network_spec_from_wsfeat(wsfeat)
    layers = {"permutable": UNFLinear(spec, CHANNELS, CHANNELS, fixed_axes="permutable"),
              "exact": UNFLinear(spec, CHANNELS, CHANNELS, fixed_axes="exact"),
              "NPLinear": NPLinear(nfn_spec, CHANNELS, CHANNELS), "HNPLinear": HNPLinear(nfn_spec, CHANNELS, CHANNELS)}

    def outputs(layer: nn.Module) -> list[torch.Tensor]:
        if isinstance(layer, UNFLinear):
            return list(layer(x).values())
        y = layer(wsfeat)
        return [*y.weights, *y.biases]

    g = torch.Generator().manual_seed(1)
    grads = {k: [torch.randn(o.shape, generator=g) for o in outputs(v)] if grad == "dense" else None
             for k, v in layers.items()}

    def step(name: str) -> Callable[[], None]:
        def run() -> None:
            _backward(outputs(layers[name]), grads[name])
        return run

    t = _timeit({k: step(k) for k in layers}, reps)
    params = {k: sum(p.numel() for p in v.parameters()) for k, v in layers.items()}
    flops = {k: _flops(step(k)) for k in layers}
    print(f"{LABELS[shape]} (batch {BATCH}, {CHANNELS}->{CHANNELS}, forward+backward from {grad} output gradients, "
          f"median, {_load()}; MFLOP: matrix products and convolutions, torch.utils.flop_counter):")
    for k in layers:
        print(f"  {k:10s} {t[k] * 1e3:8.2f} ms  {params[k]:9d} parameters  {flops[k] / 1e6:8.1f} MFLOP  "
              f"{flops[k] / t[k] / 1e9:6.1f} GFLOP/s")
    return {"perm_vs_np": t["permutable"] / t["NPLinear"], "exact_vs_hnp": t["exact"] / t["HNPLinear"],
            "perm_vs_exact": t["permutable"] / t["exact"]}


def bench_absolute(reps: int) -> None:
    print(f"absolute ms, one UNFLinear forward+backward, batch {BATCH}, {CHANNELS}->{CHANNELS} channels, "
          f"{torch.get_num_threads()} thread(s):")
    for shape in SHAPES:
        spec = SHAPES[shape]()
        x = _inputs(spec)
        torch.manual_seed(0)
        fns = {mode: _ours_step(UNFLinear(spec, CHANNELS, CHANNELS, fixed_axes=mode), x)
               for mode in ("permutable", "exact")}
        t = _timeit(fns, reps)
        print(f"  {LABELS[shape]:42s} permutable {t['permutable'] * 1e3:7.2f} ms   exact {t['exact'] * 1e3:7.2f} ms"
              f"   ({_load()})", flush=True)


def bench_fold_widths(widths: list[int], reps: int) -> None:
    """The permutable CNN layer's folded (kernel-axes) groups as dense assembled-weight matmuls vs by their structure
    vs the layer's per-group choice, at several channel widths (batch 512 / width: about the same work per call)."""
    spec = SHAPES["cnn"]()
    print("permutable CNN layer, folded groups dense vs structured vs chosen (forward+backward median):")
    for c in widths:
        batch = max(1, 128 * 4 // c)
        g = torch.Generator().manual_seed(0)
        x = {k: torch.randn(batch, c, *s, generator=g) for k, s in spec.shapes.items()}
        layers = {}
        for name, forced in (("dense", False), ("structured", True), ("chosen", None), ("exact", None)):
            UNFLinear._fold_structured = forced
            torch.manual_seed(0)
            layers[name] = UNFLinear(spec, c, c, fixed_axes="exact" if name == "exact" else "permutable")
            if name != "exact":
                layers[name].load_state_dict(layers["dense"].state_dict())
        UNFLinear._fold_structured = None
        plan = "".join("S" if f.dense is None else "D" for f in layers["chosen"]._folded.plan)
        t = _timeit({k: _ours_step(v, x) for k, v in layers.items()}, reps)
        print(f"  {c:3d} channels, batch {batch:3d}: dense {t['dense'] * 1e3:7.2f} ms, structured "
              f"{t['structured'] * 1e3:7.2f} ms, chosen ({plan}) {t['chosen'] * 1e3:7.2f} ms, exact "
              f"{t['exact'] * 1e3:7.2f} ms ({_load()})", flush=True)
        _bench(f"unf_cnn_perm_chosen_vs_dense_c{c}", t["chosen"] / t["dense"], "<=", 1.0)


def bench_vs_reference(reps: int) -> None:
    """Current layer against the frozen pre-optimization layer (tests/_unf_layers_ref.py), same parameters."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import _unf_layers_ref as ref

    for shape in SHAPES:
        spec = SHAPES[shape]()
        x = _inputs(spec)
        for mode in ("permutable", "exact"):
            torch.manual_seed(0)
            new = UNFLinear(spec, CHANNELS, CHANNELS, fixed_axes=mode)
            old = ref.UNFLinear(spec, CHANNELS, CHANNELS, fixed_axes=mode)
            old.load_state_dict(new.state_dict())
            t = _timeit({"old": _ours_step(old, x), "new": _ours_step(new, x)}, reps)
            print(f"  {shape} {mode:10s}: reference {t['old'] * 1e3:7.2f} ms, now {t['new'] * 1e3:7.2f} ms, "
                  f"ratio {t['new'] / t['old']:.2f} ({_load()})", flush=True)


def bench_compile(shapes: list[str], reps: int) -> None:
    """Inductor compile of one layer (forward+backward): seconds to compile and compiled / eager time.

    The speed-up is that of a training step's backward, from dense output gradients. From sum(outputs) the compiled
    graph is handed stride-0 gradients that AOTAutograd first copies into contiguous tensors (one full-size copy per
    output piece, which eager code never makes and no training step has); that speed-up is printed too.

    Each layer is compiled from a reset dynamo state (`torch._dynamo.reset()`), as in a process that compiles that
    one model: compiled after layers of other weight spaces (dynamo recompiling the same functions for them), the
    later graphs ran slower (the CNN's permutable layer after the MLP's and GRU's: 0.88x eager; alone: 1.15x)."""
    for shape in shapes:
        spec = SHAPES[shape]()
        x = _inputs(spec)
        for mode in ("permutable", "exact"):
            torch._dynamo.reset()
            torch.manual_seed(0)
            layer = UNFLinear(spec, CHANNELS, CHANNELS, fixed_axes=mode)
            compiled = torch.compile(layer)
            g = torch.Generator().manual_seed(1)
            dense = [torch.randn(o.shape, generator=g) for o in layer(x).values()]
            t0 = time.perf_counter()
            _ours_step(compiled, x, dense)()
            seconds = time.perf_counter() - t0
            t = _timeit({"eager": _ours_step(layer, x, dense), "compiled": _ours_step(compiled, x, dense),
                         "eager sum": _ours_step(layer, x), "compiled sum": _ours_step(compiled, x)}, reps)
            speedup = t["eager"] / t["compiled"]
            print(f"  compile {shape} {mode}: {seconds:.1f} s; dense output gradients: eager {t['eager'] * 1e3:.2f} "
                  f"ms, compiled {t['compiled'] * 1e3:.2f} ms; from sum(outputs): eager {t['eager sum'] * 1e3:.2f} "
                  f"ms, compiled {t['compiled sum'] * 1e3:.2f} ms (speed-up {t['eager sum'] / t['compiled sum']:.2f}) "
                  f"({_load()})", flush=True)
            _bench(f"unf_compile_{shape}_{mode}", speedup, ">=", 1.0, metric="speedup")


class _PerTermLoop(nn.Module):
    """Baseline: the same basis evaluated one term at a time (own read, own matmul, own write)."""

    def __init__(self, layer: UNFLinear) -> None:
        super().__init__()
        pieces = layer._layout.pieces
        self.terms = []
        weights = []
        for po, p_out in enumerate(pieces):
            for pi, p_in in enumerate(pieces):
                for term in pair_terms(p_out.labels, p_in.labels):
                    k_in, k_out = layer.in_channels * p_in.fold, layer.out_channels * p_out.fold
                    out = _Output(po, term.write, k_out, tuple(range(len(term.write.kept))))
                    self.terms.append((pi, term, out.piece, _write_plan(out, (0, k_out), len(p_out.labels))))
                    weights.append(nn.Parameter(torch.randn(k_in, k_out) / k_in ** 0.5))
        self.weights = nn.ParameterList(weights)

    def forward(self, h: list[torch.Tensor]) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = [None] * len(h)
        for (pi, term, po, plan), w in zip(self.terms, self.weights):
            r = _read(h[pi], term.read)  # (B, K_in, *kept)
            r = r.permute(0, 1, *(2 + m for m in term.match))  # kept dims in output order
            y = _apply_write(torch.einsum("bk...,ko->ob...", r, w), plan, h[po]).transpose(0, 1)
            out[po] = y if out[po] is None else out[po] + y
        return out


def bench_gru_terms(batch: int, channels: int, reps: int, layer_counts: list[int]) -> list[tuple]:
    rows = []
    for layers in layer_counts:
        spec = um.WeightSpec.from_module(_Seq2Seq(layers))
        for mode in ("exact", "permutable"):
            torch.manual_seed(0)
            layer = UNFLinear(spec, channels, channels, fixed_axes=mode)
            x = {k: torch.randn(batch, channels, *s) for k, s in spec.shapes.items()}
            sizes = layer._layout.sizes(x, 2)
            h = layer._layout.to_internal(x, sizes)
            naive = _PerTermLoop(layer)

            def grouped() -> None:
                sum(t.sum() for t in layer.forward_internal(h)).backward()

            def per_term() -> None:
                sum(t.sum() for t in naive(h) if t is not None).backward()

            t = _timeit({"grouped": grouped, "loop": per_term}, reps, warmup=1)
            rows.append((layers, mode, layer.num_terms, t["grouped"], t["loop"]))
            print(f"  GRU seq2seq {layers} layer(s), {mode:10s}: {layer.num_terms:5d} terms, "
                  f"{len(layer._groups):3d} matmuls, {len(layer._fwd.read_order):4d} reads: grouped "
                  f"{t['grouped'] * 1e3:7.1f} ms   per-term loop {t['loop'] * 1e3:8.1f} ms "
                  f"({t['loop'] / t['grouped']:.1f}x) ({_load()})", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and sizes (a smoke run)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: one pinned core)")
    parser.add_argument("--compile", nargs="*", default=list(SHAPES), choices=list(SHAPES),
                        help="shapes to compile with inductor (default: all three; ~1 minute with a cold cache)")
    parser.add_argument("--skip-terms", action="store_true", help="skip the time-vs-terms table")
    parser.add_argument("--fold-widths", nargs="*", type=int, default=[],
                        help="also time the permutable CNN layer's folded groups dense vs by structure at these "
                             "channel widths (e.g. 16 32 64)")
    parser.add_argument("--grad", choices=("sum", "dense"), default="sum",
                        help="nfn comparison: backward from sum(outputs) (default; stride-0 output gradients, as in "
                             "every earlier figure) or from fixed random dense output gradients (as in training)")
    parser.add_argument("--vs-reference", action="store_true",
                        help="also time the frozen pre-optimization layer (tests/_unf_layers_ref.py) side by side")
    args = parser.parse_args()
    from pipeline.allocator import allocator_report

    print(allocator_report())
    torch.set_num_threads(args.threads)
    reps = 5 if args.quick else 15
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {_load()}")
    ratios = {shape: bench_vs_nfn(shape, reps, args.grad) for shape in ("mlp", "cnn")}
    for shape, r in ratios.items():
        _bench(f"unf_perm_vs_nplinear_{shape}", r["perm_vs_np"], "<=", 0.5)
        _bench(f"unf_exact_vs_hnplinear_{shape}", r["exact_vs_hnp"], "<=", 0.7)
    _bench("unf_cnn_perm_vs_exact", ratios["cnn"]["perm_vs_exact"], "<=", 1.0)
    bench_absolute(reps)
    if args.fold_widths:
        bench_fold_widths(args.fold_widths, reps)
    if args.vs_reference:
        print("against the layer before the speed work (same parameters, interleaved):")
        bench_vs_reference(reps)
    if args.compile:
        bench_compile(args.compile, reps)
    if not args.skip_terms:
        print("time vs terms, one UNF layer forward+backward, batch 10, 16->16 channels (vocab 14, emb 8, hidden 16):")
        rows = bench_gru_terms(batch=10, channels=16, reps=3, layer_counts=[1, 2] if args.quick else [1, 2, 3])
        largest = max(rows, key=lambda r: r[2])
        _bench("unf_gru_terms", largest[4] / largest[3], ">=", 2.0, metric="speedup_vs_per_term")


if __name__ == "__main__":
    main()
