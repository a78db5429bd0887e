"""`torch.compile` of the UNF layers: one graph (fullgraph) per layer/predictor on tiny specs, same values and
gradients as eager. aot_eager traces forward and backward like inductor does, without its slow code generation
(the inductor compile is timed in benchmarks/bench_unf.py)."""

from __future__ import annotations

import pytest
import torch

import unf_models as um
from _unf_archs import ARCHS, ZOO_ARCHS
from unf_models.activation import relu

SPECS = {
    "mlp": um.WeightSpec({"w1": ("h1", "in"), "b1": ("h1",), "w2": ("out", "h1"), "b2": ("out",)},
                         sizes={"in": 3, "h1": 4, "out": 2}, fixed=("in", "out")),
    "gru": um.WeightSpec({"w_ih": ("gate", "h", "e"), "w_hh": ("gate", "h", "h"), "b": ("gate", "h"),
                          "emb": ("vocab", "e")}, sizes={"gate": 3, "h": 4, "e": 3, "vocab": 5},
                         fixed=("gate", "vocab")),
}


def _spec(name: str) -> um.WeightSpec:
    if name in SPECS:
        return SPECS[name]
    make = next(m for n, m, _ in ARCHS if n == name)
    torch.manual_seed(0)
    return um.WeightSpec.from_module(make())


def _inputs(spec: um.WeightSpec, lead: tuple[int, ...]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(*lead, *s, generator=g, requires_grad=True) for n, s in spec.shapes.items()}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name,mode,backend,structured", [("gru", "permutable", "aot_eager", None),
                                                           ("gru_seq2seq", "exact", "eager", None),
                                                           ("cnn", "permutable", "aot_eager", True),
                                                           ("gru", "exact", "aot_eager", "batch-major"),
                                                           ("cnn", "permutable", "aot_eager", "batch-major")])
def test_linear_compiles_in_one_graph(name: str, mode: str, backend: str, structured: bool | str | None,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Tied labels (diagonal reads and writes), parts split from one tensor, folded fixed axes (assembled dense
    weights, or computed by their structure), every contiguous piece mixed batch-major (as large ones are): one
    graph, the eager values and gradients."""
    if structured == "batch-major":
        import unf_models.layers as layers

        monkeypatch.setattr(layers, "_BATCH_MAJOR_MIN", 0)
        structured = None
    monkeypatch.setattr(um.UNFLinear, "_fold_structured", structured)
    spec = _spec(name)
    torch.manual_seed(0)
    layer = um.UNFLinear(spec, 2, 3, fixed_axes=mode)
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    x = _inputs(spec, (2, 2))
    eager, got = layer(x), compiled(x)
    assert set(got) == set(spec.names)
    assert max(float((eager[n] - got[n]).detach().abs().max()) for n in eager) < 1e-5
    wrt = [*x.values(), *(p for p in layer.parameters() if p.numel())]
    g_eager = torch.autograd.grad(sum(v.square().sum() for v in eager.values()), wrt)
    g_got = torch.autograd.grad(sum(v.square().sum() for v in got.values()), wrt)
    assert max(float((a - b).abs().max()) for a, b in zip(g_eager, g_got)) < 1e-4


def test_predictor_compiles_and_recompiles_once_for_a_new_width() -> None:
    """A second call at the same shapes reuses the graph; another width of a permutable axis compiles once more
    (shape-generic), never a recompile per call."""
    spec = SPECS["gru"]
    torch.manual_seed(0)
    model = um.UNFPredictor(spec, hidden=(3, 3), head=(4,))
    counts = torch._dynamo.utils.counters
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = {n: v.detach() for n, v in _inputs(spec, (2,)).items()}
    for _ in range(3):
        assert float((compiled(x) - model(x)).detach().abs().max()) < 1e-5
    frames = counts["stats"]["unique_graphs"]
    wide = spec.resize({"h": 6})
    w = {n: v.detach() for n, v in _inputs(wide, (2,)).items()}
    assert float((compiled(w) - model(w)).detach().abs().max()) < 1e-5
    compiled(w)
    assert counts["stats"]["unique_graphs"] - frames <= 1


@pytest.mark.parametrize("mode", ["exact", "permutable"])
@pytest.mark.parametrize("name", [n for n, _, _ in ZOO_ARCHS])
def test_predictor_on_every_zoo_member_spec_compiles_in_one_graph(name: str, mode: str) -> None:
    """Every weight space `unfzoo zoo` builds (cnn, mlp, gru_seq2seq, transformer), in both modes: the whole
    predictor (layers, pool, head) traces into one forward+backward graph that gives eager's values and gradients."""
    from pipeline.zoo.members import build_member

    arch = next(a for n, a, _ in ZOO_ARCHS if n == name)
    torch.manual_seed(0)
    spec = um.WeightSpec.from_module(build_member(arch))
    model = um.UNFPredictor(spec, hidden=(3,), head=(4,), fixed_axes=mode)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = {n: v.detach() for n, v in _inputs(spec, (2,)).items()}
    eager, got = model(x), compiled(x)
    assert float((eager - got).detach().abs().max()) < 1e-5
    params = list(model.parameters())
    g_eager = torch.autograd.grad(eager.square().sum(), params)
    g_got = torch.autograd.grad(got.square().sum(), params)
    assert max(float((a - b).abs().max()) for a, b in zip(g_eager, g_got)) < 1e-4


def _saved_dtypes(fn, *args) -> set[torch.dtype]:
    """Dtypes of the tensors a compiled `fn` saves for its backward, traced as inductor traces (its decompositions,
    its min-cut partitioner) but run without code generation: the forward graph's outputs beyond its result."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table

    saved: set[torch.dtype] = set()

    def forward(gm, inputs):
        outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        saved.update(o.meta["val"].dtype for o in outputs[1:] if hasattr(o, "meta") and "val" in o.meta)
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=forward, bw_compiler=lambda gm, _: make_boxed_func(gm.forward),
                           partition_fn=min_cut_rematerialization_partition, decompositions=select_decomp_table())
    torch.compile(fn, backend=backend, fullgraph=True)(*args).sum().backward()
    return saved


def test_relu_compiles_without_a_stored_mask() -> None:
    """`unf_models.ReLU`: compiled, its backward keeps the float output instead of a boolean mask (which inductor's
    CPU code writes ~20x slower than eager computes it); the same values and gradients as `nn.ReLU`, eager and
    compiled. The control, `nn.ReLU` followed by a product, does store a mask."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g, requires_grad=True)
    w = torch.randn(8, 8, generator=g)

    def net(act):
        return lambda t: act(t) @ w

    assert torch.bool in _saved_dtypes(net(torch.nn.ReLU()), x)
    assert torch.bool not in _saved_dtypes(net(um.ReLU()), x)
    assert torch.bool not in _saved_dtypes(net(relu), x)
    x0 = torch.tensor([-1.0, 0.0, 2.0, -0.0], requires_grad=True)  # zeros: gradient 0, as torch.relu's
    for act in (um.ReLU(), torch.compile(um.ReLU(), backend="aot_eager", fullgraph=True)):
        xs = [x.detach().clone().requires_grad_(), x0.detach().clone().requires_grad_()]
        ref = [x.detach().clone().requires_grad_(), x0.detach().clone().requires_grad_()]
        for a, b in zip(xs, ref):
            out, want = act(a), torch.relu(b)
            assert torch.equal(out, want)
            (out * torch.arange(out.numel()).view_as(out)).sum().backward()
            (want * torch.arange(want.numel()).view_as(want)).sum().backward()
            assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("mode", ["exact", "permutable"])
def test_compiled_predictor_stores_no_mask(mode: str) -> None:
    """The whole default predictor (its layers' activations, the head's) traced as inductor would: no boolean tensor
    is kept for the backward, so a compiled training step pays no mask stores."""
    spec = SPECS["gru"]
    torch.manual_seed(0)
    model = um.UNFPredictor(spec, hidden=(3, 3), head=(4,), fixed_axes=mode)
    x = {n: v.detach() for n, v in _inputs(spec, (2,)).items()}
    assert torch.bool not in _saved_dtypes(model, x)
