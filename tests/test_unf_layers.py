"""UNF layers: equivariance / invariance to 1e-10 (c), term counts (d), maximality, width transfer (e), devices."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

import unf_models as um
from _unf_archs import ARCHS, CNN
from unf_models.basis import bell, num_pair_terms, pair_terms, reads

HAND = {
    "mlp": um.WeightSpec({"w1": ("h1", "in"), "b1": ("h1",), "w2": ("h2", "h1"), "b2": ("h2",), "w3": ("out", "h2"),
                          "b3": ("out",)}, sizes={"in": 5, "h1": 4, "h2": 3, "out": 2}, fixed=("in", "out")),
    "recurrent": um.WeightSpec({"w": ("h", "h"), "u": ("h", "in"), "b": ("h",)}, sizes={"h": 5, "in": 3},
                               fixed=("in",)),
    "rank3": um.WeightSpec({"t": ("h", "h", "h"), "b": ("h",)}, sizes={"h": 4}),
    "conv": um.WeightSpec({"k1": ("c1", "in", "k", "k2"), "b1": ("c1",), "k2": ("c2", "c1", "k", "k2"),
                           "b2": ("c2",), "head": ("out", "c2")},
                          sizes={"c1": 3, "c2": 4, "in": 2, "k": 3, "k2": 2, "out": 2}, fixed=("in", "k", "k2", "out")),
    "gru": um.WeightSpec({"w_ih": ("gate", "h", "e"), "w_hh": ("gate", "h", "h"), "b": ("gate", "h"),
                          "emb": ("vocab", "e")}, sizes={"gate": 3, "h": 4, "e": 3, "vocab": 5},
                         fixed=("gate", "vocab")),
    # a conv reading the concatenation of two branches: its input axis is two parts along natural dim 1
    "concat": um.WeightSpec({"a": ("c1", "in"), "b": ("c2", "in"), "bn": [("c1",), ("c2",)],
                             "w": [("out", "c1", "k"), ("out", "c2", "k")], "head": ("cls", "out")},
                            sizes={"c1": 3, "c2": 4, "in": 2, "out": 3, "k": 2, "cls": 2},
                            shapes={"bn": (7,), "w": (3, 7, 2)}, splits={"w": 1}, fixed=("in", "k", "cls")),
}


def _derived(name: str) -> um.WeightSpec:
    make = next(m for n, m, _ in ARCHS if n == name)
    torch.manual_seed(0)
    return um.WeightSpec.from_module(make())


SPECS = {**HAND, **{f"derived_{n}": n for n in ("cnn", "cnn_flatten", "gru_seq2seq", "lstm_gru", "transformer")}}


@pytest.fixture(scope="module", params=list(SPECS), ids=list(SPECS))
def spec(request) -> um.WeightSpec:
    value = SPECS[request.param]
    return _derived(value) if isinstance(value, str) else value


def _features(spec: um.WeightSpec, batch: int, channels: int | None, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lead = (batch,) if channels is None else (batch, channels)
    return {n: torch.randn(*lead, *s, generator=g, dtype=torch.float64) for n, s in spec.shapes.items()}


def _maxdiff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).detach().abs().max()) for k in a)


@pytest.mark.parametrize("mode", ["exact", "permutable"])
def test_linear_is_equivariant(spec: um.WeightSpec, mode: str) -> None:
    """(c) layer(permute(x)) == permute(layer(x)); in permutable mode for permutations of every label."""
    torch.manual_seed(0)
    layer = um.UNFLinear(spec, 2, 3, fixed_axes=mode).double()
    x = _features(spec, 2, 2)
    group = spec if mode == "exact" else spec.with_fixed(())
    perm = group.random_permutation(torch.Generator().manual_seed(1))
    y = layer(x)
    assert all(y[n].shape == (2, 3, *s) for n, s in spec.shapes.items())
    assert _maxdiff(layer(spec.permute(x, perm)), spec.permute(y, perm)) < 1e-10
    # the plan enumerates exactly the terms it claims (one mixing block per term)
    assert sum(len(g.contributions) * len(g.outputs) for g in layer._groups) == layer.num_terms


def test_pool_and_predictor_are_invariant(spec: um.WeightSpec) -> None:
    torch.manual_seed(0)
    perm = spec.random_permutation(torch.Generator().manual_seed(2))
    pool = um.UNFPool(spec, 2).double()
    x = _features(spec, 3, 2)
    assert pool(x).shape == (3, pool.num_features)
    assert float((pool(spec.permute(x, perm)) - pool(x)).detach().abs().max()) < 1e-10
    model = um.UNFPredictor(spec, hidden=(4, 4), head=(8,), out_features=2).double()
    w = _features(spec, 3, None)
    out = model(w)
    assert out.shape == (3, 2)
    assert float((model(spec.permute(w, perm)) - out).detach().abs().max()) < 1e-10


def test_exact_mode_is_not_invariant_to_fixed_axes() -> None:
    """Exact mode keeps fixed axes apart: permuting input features or classes changes the prediction."""
    spec = HAND["mlp"]
    torch.manual_seed(0)
    model = um.UNFPredictor(spec, hidden=(4,), head=(8,)).double()
    w = _features(spec, 3, None)
    for label in ("in", "out"):
        shift = torch.roll(torch.arange(spec.sizes[label]), 1)
        assert float((model(spec.permute(w, {label: shift})) - model(w)).detach().abs().max()) > 1e-6


def test_positional_embedding_breaks_only_the_fake_symmetry() -> None:
    spec = HAND["mlp"]
    torch.manual_seed(0)
    layer = um.UNFLinear(spec, 2, 3, fixed_axes="permutable", pos_embed=True).double()
    x = _features(spec, 2, 2)
    true = spec.random_permutation(torch.Generator().manual_seed(0))
    assert _maxdiff(layer(spec.permute(x, true)), spec.permute(layer(x), true)) < 1e-10
    fake = {"in": torch.roll(torch.arange(5), 1)}
    assert _maxdiff(layer(spec.permute(x, fake)), spec.permute(layer(x), fake)) > 1e-6
    with pytest.raises(um.SpecError, match="pos_embed"):
        um.UNFLinear(spec, 2, 3, fixed_axes="exact", pos_embed=True)


@pytest.mark.parametrize("out_labels, in_labels, expected", [
    (("h", "h"), ("h", "h"), 15),  # recurrent matrix to itself: Bell(4)
    (("h", "h", "h"), ("h", "h", "h"), 203),  # rank-3 tied: Bell(6)
    (("a", "b"), ("a", "b"), 4),  # MLP weight to itself, distinct labels
    (("b", "c"), ("a", "b"), 2),  # consecutive MLP weights
    (("c1", "c0", "k", "k2"), ("c1", "c0", "k", "k2"), 16),  # 4-D conv kernel, all permutable (reference mode)
    (("h",), ("h", "h"), 5),
    ((), ("h", "h"), 2),
])
def test_pair_term_counts(out_labels, in_labels, expected) -> None:
    """(d) prod over labels of Bell(c_out + c_in), and the enumeration yields that many distinct terms."""
    assert num_pair_terms(out_labels, in_labels) == expected
    terms = pair_terms(out_labels, in_labels)
    assert len(terms) == len(set(terms)) == expected


@pytest.mark.parametrize("name", list(HAND))
def test_num_terms_is_sum_of_bell_products(name: str) -> None:
    """(d) layer.num_terms = sum over piece pairs of prod Bell(c_out + c_in) over permutable labels."""
    spec = HAND[name]
    for mode in ("exact", "permutable"):
        group = spec if mode == "exact" else spec.with_fixed(())
        labels = [tuple(a for a in p.axes if not group.is_fixed(a)) for t in group.tensors for p in t.parts]
        expected = 0  # over pieces (tensor parts): a split tensor contributes one piece per part
        for lo in labels:
            for li in labels:
                counts = {a: lo.count(a) + li.count(a) for a in set(lo + li)}
                expected += math.prod(bell(c) for c in counts.values())
        assert um.UNFLinear(spec, 1, 1, fixed_axes=mode).num_terms == expected
    # recurrent (exact): w-w Bell(4); w-u, w-b, u-w, b-w Bell(3); u-u, u-b, b-u, b-b Bell(2)
    assert um.UNFLinear(HAND["recurrent"], 1, 1).num_terms == 15 + 4 * 5 + 4 * 2
    assert um.UNFLinear(HAND["rank3"], 1, 1).num_terms == 203 + 15 + 15 + 2


def test_terms_are_linearly_independent() -> None:
    """Maximality: the basis maps are independent, so the layer spans all num_terms equivariant maps (+ biases)."""
    spec = um.WeightSpec({"w": ("h", "h"), "b": ("h",)}, sizes={"h": 5})
    torch.manual_seed(0)
    layer = um.UNFLinear(spec, 1, 1).double()
    x = _features(spec, 6, 1, seed=3)
    params = dict(layer.named_parameters())

    def outputs(*flat: torch.Tensor) -> torch.Tensor:
        y = torch.func.functional_call(layer, dict(zip(params, flat)), (x,))
        return torch.cat([v.reshape(-1) for v in y.values()])

    jac = torch.autograd.functional.jacobian(outputs, tuple(params.values()))
    matrix = torch.cat([j.reshape(j.shape[0], -1) for j in jac], dim=1)
    n_params = sum(p.numel() for p in params.values())
    assert layer.num_terms == 15 + 5 + 5 + 2 == n_params - 3  # 3 biases: w (full, diagonal), b
    assert int(torch.linalg.matrix_rank(matrix)) == n_params


def test_reads_are_shared_between_terms() -> None:
    """Reductions are computed once per (piece, read), not once per term."""
    layer = um.UNFLinear(HAND["rank3"], 1, 1)
    assert len(layer._reads) == len(reads(("h", "h", "h"))) + len(reads(("h",))) == 22 + 2
    assert len(layer._groups) == 4 and layer.num_terms == 235


def test_width_transfer() -> None:
    """(e) A predictor built at one width accepts the same architecture at other widths of permutable axes."""
    torch.manual_seed(0)
    spec = um.WeightSpec.from_module(CNN())
    wide = spec.resize({label: spec.sizes[label] * 2 for label in spec.permutable_labels})
    model = um.UNFPredictor(spec, hidden=(4, 4), head=(8,)).double()
    same_params = um.UNFPredictor(wide, hidden=(4, 4), head=(8,))
    assert [p.shape for p in model.parameters()] == [p.shape for p in same_params.parameters()]
    w = _features(wide, 3, None)
    out = model(w)
    assert out.shape == (3, 1) and torch.isfinite(out).all()
    perm = wide.random_permutation(torch.Generator().manual_seed(0))
    assert float((model(wide.permute(w, perm)) - out).detach().abs().max()) < 1e-10
    with pytest.raises(um.SpecMismatchError, match="c1.weight"):  # fixed kernel size cannot change
        model({**w, "c1.weight": torch.zeros(3, 8, 2, 5, 5, dtype=torch.float64)})


def test_predictor_accepts_channels_and_reports_terms() -> None:
    spec = HAND["gru"]
    torch.manual_seed(0)
    model = um.UNFPredictor(spec, hidden=(3,), head=(), in_channels=2, pool="mean").double()
    x = _features(spec, 2, 2)
    assert model(x).shape == (2, 1) and model.num_terms == model.layers[0].num_terms


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", ["gru-exact", "cnn-permutable-structured"])
def test_runs_on_cuda_like_on_cpu(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if case == "gru-exact":
        spec, mode = HAND["gru"], "exact"
    else:  # folded groups computed by structure: their index buffers and batched matmuls move to the device too
        spec, mode = _derived("cnn"), "permutable"
        monkeypatch.setattr(um.UNFLinear, "_fold_structured", True)
    torch.manual_seed(0)
    layer = um.UNFLinear(spec, 2, 3, fixed_axes=mode).double()
    x = _features(spec, 2, 2)
    cpu = layer(x)
    gpu = layer.cuda()({k: v.cuda() for k, v in x.items()})
    assert max(float((cpu[k] - gpu[k].cpu()).detach().abs().max()) for k in cpu) < 1e-10


def _member_specs() -> dict[str, um.WeightSpec]:
    """The zoo members' weight spaces (cnn, mlp, gru_seq2seq, transformer at their recipes' default sizes)."""
    from pipeline.zoo.members import build_member

    archs = {
        "cnn": ({"name": "cnn", "in_channels": 1, "num_classes": 10}, torch.zeros(2, 1, 8, 8)),
        "mlp": ({"name": "mlp", "in_features": 64, "num_classes": 10}, torch.zeros(2, 64)),
        "gru_seq2seq": ({"name": "gru_seq2seq", "vocab_size": 15, "pad_id": 0, "bos_id": 1}, None),
        "transformer": ({"name": "transformer", "vocab_size": 24, "seq_len": 3, "num_classes": 23},
                        torch.zeros(2, 3, dtype=torch.long)),
    }
    torch.manual_seed(0)
    return {f"member_{n}": um.WeightSpec.from_module(build_member(a), x) for n, (a, x) in archs.items()}


@pytest.mark.parametrize("structured", [None, True, False, "batch-major"],
                         ids=["chosen", "structured", "dense", "batch-major"])
def test_matches_the_reference_layer(structured: bool | str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The optimized layer (shared reductions, one matmul per group, merged writes) computes the same function as
    the straightforward grouped layer it replaced, for the same parameters: outputs, input and parameter gradients.
    Folded groups (permutable mode) both ways: by their structure and as dense matmuls with assembled weights; and
    every contiguous input piece computed batch-major (as large ones are), not copied channel-major, and in exact
    mode every piece whose fixed axes are innermost copied channels-last (as large ones are)."""
    import _unf_layers_ref as ref
    import unf_models.layers as layers

    if structured == "batch-major":
        monkeypatch.setattr(layers, "_BATCH_MAJOR_MIN", 0)
        structured = None
    monkeypatch.setattr(um.UNFLinear, "_fold_structured", structured)
    specs = {**{n: s if isinstance(s, um.WeightSpec) else _derived(s) for n, s in SPECS.items()},
             **{f"arch_{n}": _derived(n) for n, _, _ in ARCHS}, **_member_specs()}
    for name, spec in specs.items():
        for mode in ("exact", "permutable") if structured is None else ("permutable",):
            torch.manual_seed(0)
            # 5 output channels: no channel count equals a folded size (3 x 3 kernels), so a layout that confuses
            # channels with folded axes cannot pass by coincidence of shapes
            new = um.UNFLinear(spec, 2, 5, fixed_axes=mode, pos_embed=mode == "permutable").double()
            old = ref.UNFLinear(spec, 2, 5, fixed_axes=mode, pos_embed=mode == "permutable").double()
            old.load_state_dict(new.state_dict())
            x = _features(spec, 2, 2)
            for v in x.values():
                v.requires_grad_(True)
            a, b = new(x), old(x)
            assert _maxdiff(a, b) < 1e-12, (name, mode)
            params = [n for n, p in new.named_parameters() if p.numel()]
            ga = torch.autograd.grad(sum((v * v).sum() for v in a.values()),
                                     [*x.values(), *(new.get_parameter(n) for n in params)])
            gb = torch.autograd.grad(sum((v * v).sum() for v in b.values()),
                                     [*x.values(), *(old.get_parameter(n) for n in params)])
            assert max(float((p - q).abs().max()) for p, q in zip(ga, gb)) < 1e-10, (name, mode)


def test_single_axis_fixed_labels_fold_into_channels() -> None:
    """Permutable mode folds a conv's kernel axes (fixed labels on one axis of one tensor) into channels: fewer
    matmuls than basis groups, the same parameters and span (test_matches_the_reference_layer checks the values)."""
    spec = _derived("cnn")
    torch.manual_seed(0)
    layer = um.UNFLinear(spec, 2, 3, fixed_axes="permutable")
    assert layer._folded is not None
    convs = [p for p in layer._folded.pieces if len(p.axes) == 4]
    assert convs and all(p.labels == p.axes[:2] and p.fold == math.prod(spec.sizes[a] for a in p.axes[2:])
                         for p in convs)  # (out, in) stay dims, the kernel axes are folded
    assert len(layer._fwd.groups) < len(layer._groups)
    assert set(layer.state_dict()) == {n for n, _ in layer.named_parameters()}  # constants are not saved
    assert um.UNFLinear(spec, 2, 3, fixed_axes="exact")._folded is None


@pytest.mark.parametrize("make, shape, folds", [
    (lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 6), nn.ReLU(), nn.Linear(6, 3)), (2, 8, 8), 1),  # 8x8 input
    (lambda: nn.Sequential(nn.Conv2d(1, 4, 5, padding=2), nn.ReLU(), nn.Conv2d(4, 4, 5, padding=2), nn.Flatten(),
                           nn.Linear(64, 3)), (2, 1, 4, 4), 1),  # 5x5 kernels
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.Flatten(),
                           nn.Linear(64, 3)), (2, 3, 4, 4), 9),  # RGB input: 9 of the 3 x 3 x 3 folded
], ids=["mlp-8x8", "conv-5x5", "conv-rgb"])
def test_a_fold_takes_two_labels_or_all(make: Callable[[], nn.Module], shape: tuple[int, ...], folds: int) -> None:
    """A piece's single-axis fixed labels fold when the largest fold (sizes multiplying to at most 9) is all of
    them or two or more of them; one label of several (an 8x8 input's row, a 5x5 kernel's row) stays a dim."""
    torch.manual_seed(0)
    spec = um.WeightSpec.from_module(make(), torch.zeros(shape))
    layer = um.UNFLinear(spec, 2, 3, fixed_axes="permutable").double()
    first = next(p for p in (layer._folded.pieces if layer._folded else layer._layout.pieces) if len(p.axes) >= 3)
    assert first.fold == folds
    x = _features(spec, 2, 2)
    perm = spec.with_fixed(()).random_permutation(torch.Generator().manual_seed(1))
    assert _maxdiff(layer(spec.permute(x, perm)), spec.permute(layer(x), perm)) < 1e-10


def test_wide_folded_groups_are_computed_by_their_structure() -> None:
    """At wide channels the kernel-folded groups run by structure (per kept-axes matmuls on folded means, no dense
    (9K)^2 weight); at narrow ones as dense matmuls. Either way the parameters are the same (state dicts load)."""
    spec = _derived("cnn")
    narrow = um.UNFLinear(spec, 2, 3, fixed_axes="permutable")
    wide = um.UNFLinear(spec, 64, 64, fixed_axes="permutable")
    assert all(g.dense is not None for g in narrow._folded.plan)
    assert any(g.dense is None and any(o is not None and o.parts for o in g.outputs) for g in wide._folded.plan)
    assert set(wide.state_dict()) == set(um.UNFLinear(spec, 64, 64, fixed_axes="permutable").state_dict())


def test_structured_folded_layer_under_vmap_and_grad(monkeypatch: pytest.MonkeyPatch) -> None:
    """The structured folded groups work under functorch transforms (the learned optimizers vmap the layer)."""
    monkeypatch.setattr(um.UNFLinear, "_fold_structured", True)
    spec = _derived("cnn")
    torch.manual_seed(0)
    layer = um.UNFLinear(spec, 2, 3, fixed_axes="permutable").double()
    x = _features(spec, 3, 2)  # (3, 2, *shape): vmapped over the 3, each call a batch of one

    def one(v: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum((y * y).sum() for y in layer({k: t.unsqueeze(0) for k, t in v.items()}).values())

    mapped = torch.func.vmap(one)(x)
    loop = torch.stack([one({k: t[i] for k, t in x.items()}) for i in range(3)])
    assert float((mapped - loop).detach().abs().max()) < 1e-10
    grads = torch.func.vmap(torch.func.grad(one))(x)
    for i in range(3):
        xi = {k: t[i].clone().requires_grad_(True) for k, t in x.items()}
        g = torch.autograd.grad(one(xi), list(xi.values()))
        assert max(float((grads[k][i] - gk).detach().abs().max()) for k, gk in zip(xi, g)) < 1e-10


@pytest.mark.parametrize("mode", ["exact", "permutable"])
def test_fused_activation_matches_applying_it_after(spec: um.WeightSpec, mode: str) -> None:
    """forward_internal(h, act, act_) (in place where the output is the layer's own) == act applied afterwards,
    values and input gradients."""
    torch.manual_seed(0)
    layer = um.UNFLinear(spec, 2, 3, fixed_axes=mode).double()
    x = _features(spec, 2, 2)
    for v in x.values():
        v.requires_grad_(True)
    h = layer._layout.to_internal(x, layer._layout.sizes(x, 2))
    fused = layer.forward_internal(h, torch.relu, torch.relu_)
    plain = [torch.relu(t) for t in layer.forward_internal(h)]
    assert max(float((a - b).detach().abs().max()) for a, b in zip(fused, plain)) == 0.0
    ga = torch.autograd.grad(sum((t * t).sum() for t in fused), list(x.values()))
    gb = torch.autograd.grad(sum((t * t).sum() for t in plain), list(x.values()))
    assert max(float((a - b).abs().max()) for a, b in zip(ga, gb)) < 1e-12
