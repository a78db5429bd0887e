"""UNF core benchmark.

1. Forward+backward time of `UNFLinear` (fixed_axes="permutable") against the `nfn` package's `NPLinear` on the same
   MLP weight space with every axis permutable, where the two layer families coincide (same basis); interleaved
   repetitions, median. Goal: ours / nfn <= 1.0.
2. Time vs number of basis terms for GRU seq2seq specs (1-3 layer GRU encoder/decoder, exact and permutable fixed
   axes; up to ~2,500 terms per layer), grouped layer against a per-term loop over the same basis.

Run: `.venv/bin/python benchmarks/bench_unf.py [--quick]`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import unf_models as um
from unf_models.basis import pair_terms
from unf_models.layers import _Output, _read, UNFLinear


def _timeit(fns: dict[str, Callable[[], None]], reps: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call; calls interleaved (order alternates every repetition)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(reps):
        for k in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_vs_nfn(widths: list[int], batch: int, channels: int, reps: int) -> float:
    from nfn.common import WeightSpaceFeatures, network_spec_from_wsfeat
    from nfn.layers import NPLinear

    n = len(widths) - 1
    axes: dict[str, tuple[str, ...]] = {}
    for i in range(n):
        axes[f"w{i}"] = (f"n{i + 1}", f"n{i}")
        axes[f"b{i}"] = (f"n{i + 1}",)
    spec = um.WeightSpec(axes, sizes={f"n{i}": w for i, w in enumerate(widths)}, fixed=("n0", f"n{n}"))
    torch.manual_seed(0)
    ours = UNFLinear(spec, channels, channels, fixed_axes="permutable")
    x = {k: torch.randn(batch, channels, *s) for k, s in spec.shapes.items()}
    wsfeat = WeightSpaceFeatures([x[f"w{i}"] for i in range(n)], [x[f"b{i}"] for i in range(n)])
    theirs = NPLinear(network_spec_from_wsfeat(wsfeat), channels, channels)
    p_ours = sum(p.numel() for p in ours.parameters())
    p_nfn = sum(p.numel() for p in theirs.parameters())

    def run_ours() -> None:
        y = ours(x)
        sum(v.sum() for v in y.values()).backward()

    def run_nfn() -> None:
        y = theirs(wsfeat)
        (sum(w.sum() for w in y.weights) + sum(b.sum() for b in y.biases)).backward()

    t = _timeit({"ours": run_ours, "nfn": run_nfn}, reps)
    ratio = t["ours"] / t["nfn"]
    print(f"MLP {widths}, batch {batch}, {channels}->{channels} channels: {ours.num_terms} terms; parameters "
          f"ours {p_ours} vs nfn {p_nfn} (same basis; biases differ)")
    print(f"  forward+backward median: UNFLinear {t['ours'] * 1e3:.2f} ms   nfn NPLinear {t['nfn'] * 1e3:.2f} ms   "
          f"ratio {ratio:.2f}")
    return ratio


class _Seq2Seq(nn.Module):
    """GRU seq2seq (Tiny RNN Zoo shape): embedding, GRU encoder -> GRU decoder, output projection."""

    def __init__(self, layers: int, vocab: int = 14, emb: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.enc = nn.GRU(emb, hidden, layers, batch_first=True)
        self.dec = nn.GRU(emb, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        _, h = self.enc(self.emb(src))
        out, _ = self.dec(self.emb(tgt), h)
        return self.head(out)


class _PerTermLoop(nn.Module):
    """Baseline: the same basis evaluated one term at a time (own read, own matmul, own write)."""

    def __init__(self, layer: UNFLinear) -> None:
        super().__init__()
        self.layer = layer
        pieces = layer._layout.pieces
        self.terms = []
        weights = []
        for po, p_out in enumerate(pieces):
            for pi, p_in in enumerate(pieces):
                for term in pair_terms(p_out.labels, p_in.labels):
                    k_in, k_out = layer.in_channels * p_in.fold, layer.out_channels * p_out.fold
                    out = _Output(po, term.write, k_out, tuple(range(len(term.write.kept))))
                    self.terms.append((pi, term, out))
                    weights.append(nn.Parameter(torch.randn(k_in, k_out) / k_in ** 0.5))
        self.weights = nn.ParameterList(weights)

    def forward(self, h: list[torch.Tensor]) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = [None] * len(h)
        for (pi, term, o), w in zip(self.terms, self.weights):
            r = _read(h[pi], term.read)  # (B, K_in, *kept)
            r = r.permute(0, 1, *(2 + m for m in term.match))  # kept dims in output order
            y = UNFLinear._write(torch.einsum("bk...,ko->bo...", r, w), o, h[o.piece])
            out[o.piece] = y if out[o.piece] is None else out[o.piece] + y
        return out


def bench_gru_terms(batch: int, channels: int, reps: int, layer_counts: list[int], loop: bool) -> list[tuple]:
    rows = []
    for layers in layer_counts:
        spec = um.WeightSpec.from_module(_Seq2Seq(layers))
        for mode in ("exact", "permutable"):
            torch.manual_seed(0)
            layer = UNFLinear(spec, channels, channels, fixed_axes=mode)
            x = {k: torch.randn(batch, channels, *s) for k, s in spec.shapes.items()}
            sizes = layer._layout.sizes(x, 2)
            h = layer._layout.to_internal(x, sizes)

            def grouped() -> None:
                sum(t.sum() for t in layer.forward_internal(h)).backward()

            fns = {"grouped": grouped}
            if loop:
                naive = _PerTermLoop(layer)

                def per_term() -> None:
                    sum(t.sum() for t in naive(h) if t is not None).backward()

                fns["loop"] = per_term
            t = _timeit(fns, reps, warmup=1)
            rows.append((layers, mode, layer.num_terms, len(layer._groups), len(layer._reads), t["grouped"],
                         t.get("loop")))
            loop_txt = f"   per-term loop {t['loop'] * 1e3:8.1f} ms ({t['loop'] / t['grouped']:.1f}x)" if loop else ""
            print(f"  GRU seq2seq {layers} layer(s), {mode:10s}: {layer.num_terms:5d} terms, "
                  f"{len(layer._groups):3d} matmuls, {len(layer._reads):4d} reads: grouped "
                  f"{t['grouped'] * 1e3:7.1f} ms{loop_txt}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and sizes (a smoke run)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = 5 if args.quick else 21
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    ratio = bench_vs_nfn([64, 64, 64, 10], batch=32, channels=16, reps=reps)
    print(f"BENCH unf_vs_nfn ratio={ratio:.2f} goal=<=1.0 {'PASS' if ratio <= 1.0 else 'MISS'}")
    print("time vs terms, one UNF layer forward+backward, batch 10, 16->16 channels (vocab 14, emb 8, hidden 16):")
    rows = bench_gru_terms(batch=10, channels=16, reps=3,
                           layer_counts=[1, 2] if args.quick else [1, 2, 3], loop=True)
    largest = max(rows, key=lambda r: r[2])
    speedup = largest[6] / largest[5]
    print(f"BENCH unf_gru_terms terms={largest[2]} ms={largest[5] * 1e3:.1f} speedup_vs_per_term={speedup:.1f} "
          f"goal=>=2.0 {'PASS' if speedup >= 2.0 else 'MISS'}")


if __name__ == "__main__":
    main()
