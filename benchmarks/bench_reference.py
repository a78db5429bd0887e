"""UNF layer against the authors' formulation of it in JAX (jit), same weight space, same terms, same parameters.

The UNF paper's code (JAX/Flax) builds a layer as a sum over basis terms: for each pair of tensors and each valid
partition it takes the input's diagonals (`jnp.diagonal`), averages the reduced axes, embeds diagonal writes into a
zero tensor, transposes and broadcasts to the output's axes, multiplies the term by its own (C_in, C_out) weight
(channels last) and adds it to the output; the terms are vmapped over channels and the layer over the batch, and
the whole is jitted. `ReferenceFormLayer` below is our own code in that form, for our basis enumeration, so both
layers span the same maps with the same parameter count (terms x C_in x C_out + one bias per tensor); before
timing, each weight space checks that it computes what a per-term loop over `unf_models`' own term reads and writes
computes with the same weights.

Timed: one training step's layer work, forward + backward from fixed dense output gradients (JAX: `jax.vjp`
returning the outputs and every parameter's gradient, jitted; ours: `UNFLinear` forward, then backward from the same
gradients). Not from sum(outputs): the layer is linear, so the parameter gradients of sum(outputs) do not depend on
the outputs and XLA drops the forward's products altogether (eager torch computes them). Batch 32, 16 -> 16
channels, the process pinned to one core (torch one thread; XLA's thread pool shares that core), calls interleaved,
medians of CPU time (all threads; other jobs on the core do not count), wall time printed beside it. Ours is
`UNFLinear(fixed_axes="permutable")`, the mode with the reference's symmetry group (every axis permuted); exact mode
is printed beside it. Weight spaces: the MLP 64-64-64-10, GRU seq2seq (vocab 14, embed 8, hidden 16) and CNN
1-16-16-16 3x3 + linear head of `bench_unf.py` (the CNN is also the cnn-digits member's weight space), and the
shipped gru-arith, mlp-digits and transformer-modadd members; on request (`--spaces`) that CNN with 3 input channels
(`cnn_rgb`) or 5x5 kernels (`cnn_5x5`). Our layer compiled (`pipeline.compile.compile_step`, as `unfzoo train
--compile`) is timed too unless `--no-compile`.

Goal: UNF at or below half the reference's time on every weight space: `unf_vs_reference_jax_<space>` ratio
(ours / reference, CPU time) <= 0.5; `unf_compiled_vs_reference_jax_<space>` holds the compiled layer to it.

Needs JAX: `make bench` installs it (the `bench` extra, `pip install -e ".[bench]"`); without it this script says
so and exits 0.

    python benchmarks/bench_reference.py [--quick] [--no-compile] [--spaces mlp gru cnn ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

if __name__ == "__main__":  # before numpy, torch or XLA start threads: every later thread inherits the one core
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

GOAL = 0.5


class ReferenceFormLayer:
    """The reference implementation's layer in JAX: one computed term per basis element, each times its own weight.

    ``labels`` holds each input/output piece's axis labels (channels excluded), ``shapes`` their sizes. Inputs are
    one array per piece, ``(B, *dims, C)`` (channels last, as in the reference). Terms are enumerated per (output,
    input) pair in `unf_models.basis.pair_terms` order, the order of `_PerTermLoop` in `bench_unf.py`.
    """

    def __init__(self, labels: Sequence[tuple[str, ...]], shapes: Sequence[tuple[int, ...]]) -> None:
        from unf_models.basis import pair_terms

        self.labels, self.shapes = list(labels), list(shapes)
        self.terms = [[(j, term) for j, lab_in in enumerate(self.labels) for term in pair_terms(lab_out, lab_in)]
                      for lab_out in self.labels]

    @property
    def num_terms(self) -> int:
        return sum(len(t) for t in self.terms)

    def init(self, c_in: int, c_out: int, seed: int = 0) -> dict[str, list]:
        rng = np.random.default_rng(seed)
        theta = [rng.standard_normal((len(t), c_in, c_out), dtype=np.float32) / np.sqrt(c_in * len(t))
                 for t in self.terms]
        bias = [np.zeros(c_out, dtype=np.float32) for _ in self.terms]
        return {"theta": theta, "bias": bias}

    def apply(self, params: dict[str, list], xs: Sequence) -> list:
        """Batched forward: the per-member layer vmapped over the batch (the reference's `nn.vmap`)."""
        import jax

        return jax.vmap(self._apply_one, in_axes=(None, 0))(params, list(xs))

    def _apply_one(self, params: dict[str, list], xs: Sequence) -> list:
        import jax

        outs = []
        for i, terms in enumerate(self.terms):
            out = 0.0
            for k, (j, term) in enumerate(terms):
                basis = jax.vmap(lambda x, j=j, term=term, i=i: _term(x, term, self.shapes[i]),
                                 in_axes=-1, out_axes=-1)(xs[j])  # broadcastable to (*dims_i, C_in)
                out = out + basis @ params["theta"][i][k]
            outs.append(out + params["bias"][i])
        return outs


def _term(x, term, out_shape: tuple[int, ...]):
    """One basis term of one channel of one member: ``x`` has the input piece's dims; the result broadcasts to
    ``out_shape`` (size-1 axes where the term broadcasts)."""
    import jax.numpy as jnp

    ids = [0] * x.ndim  # read block of each axis of x
    for b, block in enumerate(term.read.blocks):
        for pos in block:
            ids[pos] = b
    for b, block in enumerate(term.read.blocks):  # diagonals over tied input axes, each new axis last
        while ids.count(b) > 1:
            first, second = [a for a, v in enumerate(ids) if v == b][:2]
            x = jnp.diagonal(x, axis1=first, axis2=second)
            ids = [v for a, v in enumerate(ids) if a not in (first, second)] + [b]
    reduced = tuple(a for a, v in enumerate(ids) if v not in term.read.kept)
    if reduced:
        x = jnp.mean(x, axis=reduced)
        ids = [v for v in ids if v in term.read.kept]
    to_out = {term.read.kept[m]: term.write.kept[j] for j, m in enumerate(term.match)}
    ids = [to_out[v] for v in ids]  # now output block of each axis
    for b, block in enumerate(term.write.blocks):  # diagonal writes: embed into a zero tensor
        if len(block) < 2:
            continue
        n = out_shape[block[0]]
        if b in ids:  # a kept axis written on the diagonal: move it last
            x = jnp.moveaxis(x, ids.index(b), -1)
            ids.remove(b)
        else:  # a broadcast written on the diagonal
            x = x[..., None]
        diag = (slice(None),) * (x.ndim - 1) + (jnp.arange(n),) * len(block)
        x = jnp.zeros(x.shape[:-1] + (n,) * len(block), x.dtype).at[diag].add(x)
        ids = ids + [b] * len(block)
    out_ids = [0] * len(out_shape)  # output block of each output axis
    for b, block in enumerate(term.write.blocks):
        for pos in block:
            out_ids[pos] = b
    order: list[int] = []
    for v in out_ids:  # present axes in output order
        if v in ids:
            order.append(next(a for a, w in enumerate(ids) if w == v and a not in order))
    x = jnp.transpose(x, order)
    missing = tuple(pos for pos, v in enumerate(out_ids) if v not in ids)  # broadcast axes
    return jnp.expand_dims(x, missing) if missing else x


DEFAULT_SPACES = ("mlp", "gru", "cnn", "gru_arith", "mlp_digits", "transformer_modadd")


def _spaces() -> dict[str, tuple[str, Callable]]:
    """Weight spaces by name: (description, spec builder). The default ones, then two CNNs whose conv tensors have
    more single-axis fixed labels than a permutable layer folds (see unf.md): 3 input channels, 5x5 kernels."""
    import bench_predict
    import bench_unf

    return {
        "mlp": (bench_unf.LABELS["mlp"], bench_unf.SHAPES["mlp"]),
        "gru": (bench_unf.LABELS["gru"], bench_unf.SHAPES["gru"]),
        "cnn": (bench_unf.LABELS["cnn"], bench_unf.SHAPES["cnn"]),
        "gru_arith": ("gru-arith member", bench_predict.gru_spec),
        "mlp_digits": ("mlp-digits member", lambda: _recipe_spec("mlp-digits")),
        "transformer_modadd": ("transformer-modadd member", lambda: _recipe_spec("transformer-modadd")),
        "cnn_rgb": ("CNN 3-16-16-16 3x3 + linear head to 10", lambda: _cnn_spec(3, 3)),
        "cnn_5x5": ("CNN 1-16-16-16 5x5 + linear head to 10", lambda: _cnn_spec(1, 5)),
    }


def _cnn_spec(in_channels: int, kernel: int):
    """bench_unf's CNN with other input channels or kernel size (8x8 inputs, same padding)."""
    import torch
    from bench_unf import cnn_net

    from unf_models import WeightSpec

    return WeightSpec.from_module(cnn_net(in_channels, kernel), torch.zeros(1, in_channels, 8, 8))


def _recipe_spec(name: str):
    """The weight space of a shipped recipe's member, traced on two of its task's inputs (as `unfzoo zoo` does)."""
    from pipeline.zoo.build import _example_input, _load_task
    from pipeline.zoo.members import build_member, resolve_arch
    from pipeline.zoo.recipe import load_recipe
    from unf_models import WeightSpec

    recipe = load_recipe(name)
    task = _load_task(recipe)
    return WeightSpec.from_module(build_member(resolve_arch(recipe.arch, task)), example_input=_example_input(task))


def check_same_maps(space: str, layer, h: list, ref: ReferenceFormLayer) -> float:
    """Max |difference| / max |output| between the reference-form layer and a per-term torch loop over
    `unf_models`' own reads and writes (`bench_unf._PerTermLoop`), with the same per-term weights and zero biases, on
    ``layer``'s internal pieces ``h`` ((B, C, *dims) each)."""
    import jax.numpy as jnp
    import torch
    from bench_unf import _PerTermLoop

    torch.manual_seed(1)
    loop = _PerTermLoop(layer)
    params = ref.init(layer.in_channels, layer.out_channels)
    weights = iter(loop.weights)
    params["theta"] = [np.stack([next(weights).detach().numpy() for _ in terms]) for terms in ref.terms]
    with torch.no_grad():
        want = [y.movedim(1, -1).numpy() for y in loop(h)]
    got = ref.apply(params, [jnp.asarray(v.movedim(1, -1).numpy()) for v in h])
    scale = max(float(np.abs(w).max()) for w in want)
    err = max(float(np.abs(np.broadcast_to(np.asarray(g), w.shape) - w).max()) for g, w in zip(got, want)) / scale
    if err > 1e-4:
        raise SystemExit(f"{space}: the reference-form layer and unf_models' per-term loop differ "
                         f"(max relative difference {err:.2e}); not timing different maps")
    return err


def bench_space(space: str, label: str, spec_fn: Callable, reps: int, compile_ours: bool = True) -> dict[str, float]:
    """Times ours (permutable eager and, with ``compile_ours``, compiled by inductor; exact eager) and the reference
    form on one weight space; returns ours / reference per variant ("eager", "compiled")."""
    import bench_unf
    import jax
    import jax.numpy as jnp
    import torch

    from unf_models.layers import UNFLinear

    spec = spec_fn()
    c = bench_unf.CHANNELS
    x = bench_unf._inputs(spec)
    torch.manual_seed(0)
    ours = {mode: UNFLinear(spec, c, c, fixed_axes=mode) for mode in ("permutable", "exact")}
    layer = ours["permutable"]
    sizes = layer._layout.sizes(x, 2)
    h = layer._layout.to_internal(x, sizes)
    ref = ReferenceFormLayer([p.labels for p in layer._layout.pieces], [tuple(v.shape[2:]) for v in h])
    if ref.num_terms != layer.num_terms:
        raise SystemExit(f"{space}: {ref.num_terms} reference terms against {layer.num_terms} in UNFLinear")
    err = check_same_maps(space, layer, h, ref)
    params = jax.tree_util.tree_map(jnp.asarray, ref.init(c, c))
    xs = [jnp.asarray(v.movedim(1, -1).contiguous().numpy()) for v in h]  # (B, *dims, C), its own layout

    g = torch.Generator().manual_seed(1)
    dense = [torch.randn(o.shape, generator=g) for o in layer(x).values()]  # output gradients, public layout
    cotangents = [jnp.asarray(v.movedim(1, -1).contiguous().numpy())
                  for v in layer._layout.to_internal(dict(zip(spec.names, dense)), sizes)]

    @jax.jit
    def step(p, inputs, cots):
        """Outputs and parameter gradients: the forward stays (returned), the backward gets dense gradients."""
        outputs, pullback = jax.vjp(lambda q: ref.apply(q, inputs), p)
        return outputs, pullback([jnp.broadcast_to(c, o.shape) for c, o in zip(cots, outputs)])

    t0 = time.perf_counter()
    jax.block_until_ready(step(params, xs, cotangents))
    compile_s = time.perf_counter() - t0

    def reference() -> None:
        jax.block_until_ready(step(params, xs, cotangents))

    fns = {"permutable": bench_unf._ours_step(ours["permutable"], x, dense),
           "exact": bench_unf._ours_step(ours["exact"], x, dense), "reference": reference}
    compiled_note = ""
    if compile_ours:  # as `unfzoo train --compile` compiles (pipeline.compile), in a fresh dynamo state
        from pipeline.compile import compile_step

        torch._dynamo.reset()
        fns["compiled"] = bench_unf._ours_step(compile_step(layer), x, dense)
        t0 = time.perf_counter()
        fns["compiled"]()
        compiled_note = f"; inductor {time.perf_counter() - t0:.1f} s"
    t, wall = bench_unf._time_calls(fns, reps)
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(params))
    print(f"{label} ({ref.num_terms} terms, {n_params} parameters both; same maps: max relative difference "
          f"{err:.1e}; jit {compile_s:.1f} s{compiled_note}), CPU ms (wall ms): UNF permutable "
          f"{t['permutable'] * 1e3:.2f} ({wall['permutable'] * 1e3:.2f})"
          + (f", compiled {t['compiled'] * 1e3:.2f} ({wall['compiled'] * 1e3:.2f})" if compile_ours else "")
          + f", UNF exact {t['exact'] * 1e3:.2f} ({wall['exact'] * 1e3:.2f}), reference form (JAX) "
          f"{t['reference'] * 1e3:.2f} ({wall['reference'] * 1e3:.2f}) ({bench_unf._load()})", flush=True)
    return {k: t[name] / t["reference"] for k, name in (("eager", "permutable"), ("compiled", "compiled")) if name in t}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    parser.add_argument("--spaces", nargs="*", default=None,
                        help=f"weight spaces to time (default: {' '.join(DEFAULT_SPACES)}; also cnn_rgb, cnn_5x5)")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip our inductor-compiled layer (~1.5 minutes of compiling with a cold cache)")
    args = parser.parse_args()
    try:
        import jax
    except ImportError:
        print("bench_reference: JAX is not installed; `pip install -e '.[bench]'` (make bench does) to run it")
        return
    import torch

    from pipeline.allocator import allocator_report

    print(allocator_report())  # as the unfzoo commands run (bench_unf.py too)
    torch.set_num_threads(1)
    spaces = _spaces()
    chosen = args.spaces or list(DEFAULT_SPACES)
    unknown = sorted(set(chosen) - set(spaces))
    if unknown:
        parser.error(f"unknown weight space(s) {', '.join(unknown)}; choose from {', '.join(spaces)}")
    reps = 5 if args.quick else 15
    print(f"torch {torch.__version__}, jax {jax.__version__}, one core ({sorted(os.sched_getaffinity(0))}), "
          f"batch 32, 16 -> 16 channels, forward + backward from dense output gradients, medians of {reps}")
    ratios = {space: bench_space(space, *spaces[space], reps, not args.no_compile) for space in chosen}
    for variant, prefix in (("eager", "unf_vs_reference_jax"), ("compiled", "unf_compiled_vs_reference_jax")):
        for space, r in ratios.items():
            if variant in r:
                ok = r[variant] <= GOAL
                print(f"BENCH {prefix}_{space} ratio={r[variant]:.2f} goal=<={GOAL:g} {'PASS' if ok else 'MISS'}")


if __name__ == "__main__":
    main()
