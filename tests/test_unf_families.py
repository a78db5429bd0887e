"""WeightSpec.from_module on the common architecture families: every claimed symmetry is real, buffers included."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

import unf_models as um
from _unf_families import FAMILIES, Inception, MobileNet, ResNet

IDS = [f[0] for f in FAMILIES]
pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")


def _build(make) -> nn.Module:
    torch.manual_seed(0)
    model = make()
    for m in model.modules():  # non-trivial running statistics, so that forgetting to move them shows
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.running_mean is not None:
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module", params=FAMILIES, ids=IDS)
def family(request):
    name, make, inputs, outcome = request.param
    model = _build(make)
    x = inputs()
    spec = um.WeightSpec.from_module(model, x)  # verifies by default
    return name, model, x, outcome, spec


def _double(x: tuple) -> tuple:
    return tuple(t.double() if t.is_floating_point() else t for t in x)


def test_derived_symmetries_are_real(family) -> None:
    """Permuting the whole state (parameters and running statistics) by the spec leaves the output unchanged."""
    _, model, x, outcome, spec = family
    twin = copy.deepcopy(model).double().eval()
    state = dict(twin.state_dict())
    if outcome == "all-fixed":  # the root's outputs carry every hidden axis: nothing may move
        assert not spec.permutable_labels
        return
    assert spec.permutable_labels
    covered = {k: state[k] for k in spec.names}
    with torch.no_grad():
        base = functional_call(twin, state, _double(x))
        base = base[0] if isinstance(base, tuple) else base
        for seed in range(2):
            moved = spec.permute(covered, spec.random_permutation(torch.Generator().manual_seed(seed)))
            assert any(not torch.equal(moved[k], covered[k]) for k in covered)
            out = functional_call(twin, {**state, **moved}, _double(x))
            out = out[0] if isinstance(out, tuple) else out
            assert (out - base).abs().max() <= 1e-9 * (1 + base.abs().max())


def test_spec_covers_parameters_and_running_stats(family) -> None:
    """Every parameter and every BatchNorm running statistic is in the spec; integer counters are not."""
    _, model, _, _, spec = family
    state = model.state_dict()
    expected = [k for k, v in state.items() if v.is_floating_point()
                and (k in dict(model.named_parameters()) or k.endswith(("running_mean", "running_var")))]
    assert spec.names == expected
    assert not any(k.endswith("num_batches_tracked") for k in spec.names)
    assert um.WeightSpec.from_dict(spec.to_dict()) == spec


def test_resnet_running_stats_move_with_their_channel() -> None:
    spec = um.WeightSpec.from_module(_build(lambda: ResNet("basic", (1, 1), (4, 6))), torch.randn(2, 3, 8, 8))
    bn = spec.axes("layers.0.bn1.running_var")
    assert bn == spec.axes("layers.0.bn1.weight") == (spec.axes("layers.0.conv1.weight")[0],)
    assert not spec.is_fixed(bn[0])
    stream = spec.axes("layers.0.bn2.running_mean")[0]  # the residual stream: stem, block outputs tied
    assert spec.axes("bn1.running_mean") == (stream,) and spec.axes("layers.0.conv1.weight")[1] == stream


def test_concatenation_splits_the_consumer_axis() -> None:
    """The mixing conv after the inception concat is four parts along its input-channel dim, one per branch."""
    spec = um.WeightSpec.from_module(_build(Inception), torch.randn(2, 3, 8, 8))
    mix = spec["mix.0.weight"]
    assert mix.split == 1 and len(mix.parts) == 4
    branches = [spec.axes(n)[0] for n in ("b1.0.weight", "b2.1.0.weight", "b3.1.0.weight", "b4.1.0.weight")]
    assert [p.axes[1] for p in mix.parts] == branches
    assert not any(spec.is_fixed(b) for b in branches)
    assert spec.to_dict()["version"] == 2


class _WrongSpecNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.b = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.bn(self.a(x))))


def test_a_wrong_spec_is_caught() -> None:
    """A hand spec that forgets the running statistics, and one that frees the output axis, both fail verify."""
    model = _build(_WrongSpecNet)
    x = torch.randn(5, 3)
    good = um.WeightSpec.from_module(model, x)
    good.verify(model, x)
    h = good.axes("a.weight")[0]
    no_stats = um.WeightSpec({n: good.axes(n) for n in good.names if "running" not in n},
                             shapes={n: s for n, s in good.shapes.items() if "running" not in n},
                             fixed=good.fixed_labels)
    with pytest.raises(um.SymmetryError, match=rf"label '{h}'.*a.weight.*bn.weight"):
        no_stats.verify(model, x)
    out = good.axes("b.weight")[0]
    with pytest.raises(um.SymmetryError, match=rf"label '{out}'.*b.weight"):
        good.with_fixed([f for f in good.fixed_labels if f != out]).verify(model, x)


def test_from_module_raises_on_a_wrong_derivation(monkeypatch) -> None:
    """If a derivation rule were wrong, from_module reports it (label, tensors, where decided) instead of returning."""
    import unf_models._rules as rules

    def forget_stats(ctx, m, name, labels, view):  # a broken BatchNorm rule: running statistics left out
        ctx.param(f"{name}.weight", [labels], [view])
        ctx.param(f"{name}.bias", [labels], [view])

    monkeypatch.setattr(rules, "_norm_stats", forget_stats)
    model = _build(_WrongSpecNet)
    with pytest.raises(um.SymmetryError, match=r"label 'a'.*moves a.weight.*derivation decided it at module 'a'"):
        um.WeightSpec.from_module(model, torch.randn(5, 3))
    spec = um.WeightSpec.from_module(model, torch.randn(5, 3), verify=False)  # verify=False skips the check
    assert "bn.running_mean" in spec  # unused by the broken rule: present with fixed axes
    assert spec.is_fixed(spec.axes("bn.running_mean")[0])


class _Cumsum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(self.a(x), dim=1)


def test_unsupported_ops_are_refused_naming_them() -> None:
    with pytest.raises(um.UnsupportedModuleError, match=r"cumsum.*WeightSpec\(\{'a.weight'"):
        um.WeightSpec.from_module(_Cumsum(), torch.randn(1, 3, 6, 6))


def test_a_model_in_training_mode_is_derived_in_eval_mode_and_left_training() -> None:
    """Stochastic depth and dropout are identities in eval mode, where the derivation runs; the mode is restored."""
    model = _build(MobileNet).train()
    spec = um.WeightSpec.from_module(model, torch.randn(2, 3, 8, 8))
    assert model.training and all(m.training for m in model.modules())
    assert not spec.is_fixed(spec.axes("blocks.0.dw.0.weight")[0])
