"""WeightSpec.from_module: derived symmetries are real (a), not over-claimed (b), and unsupported ops fail clearly (f)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

import unf_models as um
from _unf_archs import ARCHS, GRUSeq2Seq, Transformer

torch.manual_seed(0)


def _zoo_archs() -> list:
    """The zoo's member architectures (pipeline.zoo.members), when that module exists."""
    try:
        from pipeline.zoo.members import build_member
    except ImportError:
        return []
    from _unf_archs import ZOO_ARCHS

    return [(f"zoo_{name}", lambda arch=arch: build_member(arch), inputs) for name, arch, inputs in ZOO_ARCHS]


ALL = ARCHS + _zoo_archs()


def _build(make) -> nn.Module:
    torch.manual_seed(0)
    return make().double().eval()


def _state(model: nn.Module, spec: um.WeightSpec) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items() if k in spec}


def _run(model: nn.Module, params: dict[str, torch.Tensor], inputs: tuple) -> torch.Tensor:
    return functional_call(model, params, inputs)


@pytest.fixture(scope="module", params=ALL, ids=[a[0] for a in ALL])
def derived(request):
    name, make, inputs = request.param
    model = _build(make)
    spec = um.WeightSpec.from_module(model, include_buffers=True)
    return name, model, spec, inputs()


def test_symmetry_is_real(derived) -> None:
    """(a) The network computes the same function after spec.permute (on random inputs, float64)."""
    _, model, spec, inputs = derived
    params = _state(model, spec)
    assert spec.permutable_labels, "every test architecture has hidden symmetries"
    base = _run(model, params, inputs)
    for seed in range(2):
        perm = spec.random_permutation(torch.Generator().manual_seed(seed))
        moved = spec.permute(params, perm)
        assert any(not torch.equal(moved[k], params[k]) for k in params)
        assert (_run(model, moved, inputs) - base).abs().max() < 1e-10


def test_fixed_axes_are_not_symmetries(derived) -> None:
    """(b) Permuting any fixed label (inputs, classes, kernel positions, gates, vocabulary) changes the function."""
    _, model, spec, inputs = derived
    params = _state(model, spec)
    base = _run(model, params, inputs)
    checked = 0
    for label in spec.fixed_labels:
        n = spec.sizes[label]
        if n < 2:
            continue
        shift = torch.roll(torch.arange(n), 1)  # never the identity
        out = _run(model, spec.permute(params, {label: shift}), inputs)
        assert (out - base).abs().max() > 1e-6, f"permuting fixed label {label!r} left the function unchanged"
        checked += 1
    assert checked > 0


def test_spec_covers_parameters_and_round_trips(derived) -> None:
    _, model, spec, _ = derived
    assert [n for n in spec.names if "running" not in n] == [n for n, _ in model.named_parameters()]
    assert um.WeightSpec.from_dict(spec.to_dict()) == spec


def test_gru_seq2seq_labels() -> None:
    """Packed GRU tensors are (gate, h, in) with the gate fixed; encoder and decoder share the hidden label."""
    spec = um.WeightSpec.from_module(GRUSeq2Seq())
    enc, dec = spec.axes("enc.weight_hh_l0"), spec.axes("dec.weight_hh_l0")
    assert enc[1] == enc[2] == dec[1] == dec[2] and spec.is_fixed(enc[0])
    assert spec.axes("enc.weight_ih_l0")[2] == spec.axes("emb.weight")[1]  # embedding dim ties to GRU input
    assert spec.is_fixed(spec.axes("emb.weight")[0]) and spec.is_fixed(spec.axes("head.weight")[0])


def test_transformer_labels() -> None:
    """One residual label through embedding, blocks, LayerNorms and head; heads shared by Q, K, V and out-proj."""
    spec = um.WeightSpec.from_module(Transformer())
    d = spec.axes("emb.weight")[1]
    for name in ("enc.layers.0.norm1.weight", "enc.layers.1.linear2.bias", "norm.weight",
                 "enc.layers.1.self_attn.out_proj.bias"):
        assert spec.axes(name) == (d,)
    assert spec.axes("head.weight")[1] == d
    q, k, v = spec.axes("enc.layers.0.self_attn.in_proj_weight")
    heads, vdim = spec.axes("enc.layers.0.self_attn.out_proj.weight")[1:]
    assert q == k and q[0] == v[0] == heads and v[1] == vdim != q[1]


class _Bilinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Bilinear(3, 3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(h, h)


class _MatmulNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return torch.cumsum(h, dim=-1)  # order-dependent along the hidden axis


@pytest.mark.parametrize("model, what", [(_Bilinear(), "Bilinear"), (_MatmulNet(), "cumsum")])
def test_unsupported_op_names_it_and_shows_a_hand_spec(model, what) -> None:
    """(f) An unsupported module or op: the error names it and shows how to declare the spec by hand."""
    with pytest.raises(um.UnsupportedModuleError) as info:
        um.WeightSpec.from_module(model)
    message = str(info.value)
    assert what in message and "WeightSpec({" in message and "'a.weight'" in message and "fixed=" in message


def test_indexing_a_feature_fixes_its_label() -> None:
    """Reading one hidden unit by index breaks that axis' symmetry: the spec must not claim it."""

    class Pick(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 3)
            self.b = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x)[:, 0:1] + self.b(x).sum(-1, keepdim=True)

    spec = um.WeightSpec.from_module(Pick())
    assert spec.is_fixed(spec.axes("a.weight")[0]) and not spec.is_fixed(spec.axes("b.weight")[0])
