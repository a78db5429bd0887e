"""Learned optimizers: f = 0 is SGD with momentum, the UNF update is equivariant, features, Adam, the wrapper."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import grad

from pipeline.errors import ConfigError
from pipeline.lopt.features import N_ENTRY_FEATURES, build_features, init_momenta, time_features, update_momenta
from pipeline.lopt.optimizers import Adam, LearnedOptimizer, LOptConfig, ResidualLOpt, flatten_meta, unflatten_meta
from _lopt_problems import mlp_problem

torch.set_default_dtype(torch.float32)


def _lopt(kind: str, widths=(8, 12, 4), dtype=torch.float64):
    problem = mlp_problem(widths=widths, dtype=dtype)
    spec = None
    if kind == "unf":
        from unf_models import WeightSpec

        spec = WeightSpec.from_module(problem.model)
    return problem, ResidualLOpt(LOptConfig(kind=kind, head_scale=1.0), spec)  # random head: f != 0


@pytest.mark.parametrize("kind", ["sgdm", "perparam", "unf"])
def test_f_zero_is_sgd_with_momentum(kind: str) -> None:
    """With f's head zeroed the trajectory is torch's SGD(lr = alpha (1 - gamma0), momentum = gamma0), float64."""
    problem, lopt = _lopt(kind)
    meta = {k: v.double() for k, v in lopt.init_meta(3).items()}
    meta["log_alpha"] = torch.tensor(math.log(0.3), dtype=torch.float64)
    meta["logit_gamma0"] = torch.tensor(0.7, dtype=torch.float64)
    for k in meta:
        if k.startswith("f.head."):
            meta[k] = torch.zeros_like(meta[k])
    if kind != "sgdm":
        meta["log_beta"] = torch.tensor(0.0, dtype=torch.float64)  # beta = 1: only f = 0 keeps it SGDM
    alpha, gamma = 0.3, float(torch.sigmoid(meta["logit_gamma0"]))

    params = {k: v.clone() for k, v in problem.init.items()}
    state = lopt.init(params)
    model = mlp_problem(widths=(8, 12, 4), dtype=torch.float64).model
    sgd = torch.optim.SGD(model.parameters(), lr=alpha * (1 - gamma), momentum=gamma)
    x, y = problem.x_train, problem.y_train
    for t in range(12):
        xb, yb = x[16 * t : 16 * t + 16], y[16 * t : 16 * t + 16]
        g = grad(problem.loss)(params, xb, yb)
        params, state = lopt.update(meta, state, params, g)
        sgd.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        sgd.step()
    ref = dict(model.named_parameters())
    assert max(float((params[k] - ref[k].detach()).abs().max()) for k in params) < 1e-12
    assert float((params["0.weight"] - problem.init["0.weight"]).abs().max()) > 1e-3  # it did move


def test_nonzero_f_changes_the_step() -> None:
    """The same run with f's head left random (beta = 1) departs from SGDM: the previous test is not vacuous."""
    problem, lopt = _lopt("perparam")
    meta = {k: v.double() for k, v in lopt.init_meta(3).items()}
    meta["log_beta"] = torch.tensor(0.0, dtype=torch.float64)
    params = dict(problem.init)
    g = grad(problem.loss)(params, problem.x_train[:16], problem.y_train[:16])
    new, _ = lopt.update(meta, lopt.init(params), params, g)
    sgdm, _ = ResidualLOpt(LOptConfig(kind="sgdm")).update(meta, lopt.init(params), params, g)
    assert float((new["0.weight"] - sgdm["0.weight"]).abs().max()) > 1e-3


@pytest.mark.parametrize(("nominal", "norm_features"), [("sgdm", False), ("adam", True)])
def test_unf_update_is_equivariant_to_hidden_permutations(nominal: str, norm_features: bool) -> None:
    """Permuting the inner MLP's hidden units (params, grads, state) permutes the UNF optimizer's update (also with
    the Adam nominal term and the per-tensor norm features, which are permutation invariant)."""
    problem, _ = _lopt("unf", widths=(6, 7, 5, 3))
    from unf_models import WeightSpec

    lopt = ResidualLOpt(LOptConfig(kind="unf", head_scale=1.0, nominal=nominal, norm_features=norm_features), WeightSpec.from_module(problem.model))
    spec = lopt.spec
    meta = {k: v.double() for k, v in lopt.init_meta(1).items()}
    meta["log_beta"] = torch.tensor(0.0, dtype=torch.float64)  # beta = 1 so f dominates the step
    params = dict(problem.init)
    state = lopt.init(params)
    for t in range(3):  # non-trivial momenta and step count
        g = grad(problem.loss)(params, problem.x_train[16 * t : 16 * t + 16], problem.y_train[16 * t : 16 * t + 16])
        params, state = lopt.update(meta, state, params, g)
    g = grad(problem.loss)(params, problem.x_train[:32], problem.y_train[:32])
    perm = spec.random_permutation(torch.Generator().manual_seed(5))
    assert sorted(perm) == sorted(spec.permutable_labels) and len(perm) == 2

    def permute_state(s):
        out = {"step": s["step"], "nominal": spec.permute(s["nominal"], perm)}
        out["momenta"] = spec.permute(s["momenta"], perm)  # leading (K,) axis is a batch dim
        if "second" in s:
            out["second"] = spec.permute(s["second"], perm)
        return out

    new, _ = lopt.update(meta, state, params, g)
    new_p, _ = lopt.update(meta, permute_state(state), spec.permute(params, perm), spec.permute(g, perm))
    expected = spec.permute(new, perm)
    for k in new:
        torch.testing.assert_close(new_p[k], expected[k], rtol=1e-10, atol=1e-12)
    step = {k: new[k] - params[k] for k in new}
    assert max(float(v.abs().max()) for v in step.values()) > 1e-3


def test_unf_meta_parameters_serve_other_widths() -> None:
    """The UNF head's parameters do not depend on hidden width: one meta serves a wider net of the same spec."""
    problem, lopt = _lopt("unf", widths=(8, 12, 4))
    meta = {k: v.double() for k, v in lopt.init_meta(0).items()}
    wide = mlp_problem(widths=(8, 20, 4), dtype=torch.float64)
    g = grad(wide.loss)(wide.init, wide.x_train[:16], wide.y_train[:16])
    new, _ = lopt.update(meta, lopt.init(wide.init), wide.init, g)
    assert new["0.weight"].shape == (20, 8) and all(torch.isfinite(v).all() for v in new.values())


def test_features_are_normalized_and_finite() -> None:
    params = {"w": torch.randn(5, 4) * 3, "b": torch.zeros(5)}
    grads = {"w": torch.randn(5, 4), "b": torch.tensor([float("nan"), float("inf"), 1.0, -2.0, 0.5])}
    mom = update_momenta(init_momenta(params), grads)
    feats = build_features(params, grads, mom, clip=1.0)
    assert feats["w"].shape == (N_ENTRY_FEATURES, 5, 4)
    assert all(torch.isfinite(v).all() for v in feats.values())
    rms = feats["w"].square().mean(dim=(1, 2)).sqrt()  # per channel; tiny slow momenta stay below 1 (eps)
    torch.testing.assert_close(rms[:3], torch.ones(3), rtol=1e-3, atol=1e-3)
    assert bool((rms <= 1 + 1e-4).all()) and float(feats["w"][:3].abs().max()) > 1
    tf = time_features(torch.tensor(10))
    assert tf.shape == (11,) and float(tf[2]) == pytest.approx(0.0)  # tanh(10 / 10 - 1)


def test_adam_matches_torch_adam() -> None:
    problem = mlp_problem(dtype=torch.float64)
    opt = Adam()
    params, state = dict(problem.init), opt.init(problem.init)
    model = mlp_problem(dtype=torch.float64).model
    ref = torch.optim.Adam(model.parameters(), lr=3e-3)
    for t in range(8):
        xb, yb = problem.x_train[16 * t : 16 * t + 16], problem.y_train[16 * t : 16 * t + 16]
        params, state = opt.update(Adam.init_meta(3e-3), state, params, grad(problem.loss)(params, xb, yb))
        ref.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        ref.step()
    for k, p in model.named_parameters():  # torch keeps `step` in float32, so its bias correction differs ~1e-7
        torch.testing.assert_close(params[k], p.detach(), rtol=1e-6, atol=1e-9)


def test_wrapper_matches_functional_form() -> None:
    """LearnedOptimizer on an nn.Module takes the same steps as the functional update."""
    problem, lopt = _lopt("perparam", dtype=torch.float32)
    meta = lopt.init_meta(0)
    model = mlp_problem().model
    opt = LearnedOptimizer(model, lopt, meta)
    params, state = dict(problem.init), lopt.init(problem.init)
    for t in range(4):
        xb, yb = problem.x_train[16 * t : 16 * t + 16], problem.y_train[16 * t : 16 * t + 16]
        params, state = lopt.update(meta, state, params, grad(problem.loss)(params, xb, yb))
        opt.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
    for k, p in model.named_parameters():
        torch.testing.assert_close(params[k], p.detach(), rtol=1e-5, atol=1e-6)


def test_meta_flattening_round_trips_and_config_errors() -> None:
    _, lopt = _lopt("perparam")
    meta = lopt.init_meta(0)
    back = unflatten_meta(flatten_meta(meta), meta)
    assert all(torch.equal(back[k], meta[k]) for k in meta)
    with pytest.raises(ConfigError, match="kind"):
        LOptConfig(kind="lstm")
    with pytest.raises(ConfigError, match="WeightSpec"):
        ResidualLOpt(LOptConfig(kind="unf"), None)
    with pytest.raises(ConfigError, match="head_scale"):
        LOptConfig(head_scale=-1.0)


@pytest.mark.parametrize("kind", ["perparam", "unf"])
def test_default_init_starts_as_sgdm(kind: str) -> None:
    """head_scale 0 (the default) zeroes f's head only: the fresh optimizer takes SGDM's step, its hidden layers are
    random (so ES has gradients for the head), and a head_scale of 1 restores the random head."""
    problem = mlp_problem(widths=(8, 12, 4), dtype=torch.float64)
    from unf_models import WeightSpec

    spec = WeightSpec.from_module(problem.model) if kind == "unf" else None
    lopt = ResidualLOpt(LOptConfig(kind=kind), spec)
    meta = {k: v.double() for k, v in lopt.init_meta(0).items()}
    heads = [k for k in meta if k.startswith("f.head.")]
    assert heads and all(float(meta[k].abs().max()) == 0 for k in heads)
    assert float(meta["f.pointwise.0.weight"].abs().max()) > 0
    params = dict(problem.init)
    g = grad(problem.loss)(params, problem.x_train[:16], problem.y_train[:16])
    new, _ = lopt.update(meta, lopt.init(params), params, g)
    sgdm, _ = ResidualLOpt(LOptConfig(kind="sgdm")).update(meta, lopt.init(params), params, g)
    assert all(torch.equal(new[k], sgdm[k]) for k in new)
    random_head = ResidualLOpt(LOptConfig(kind=kind, head_scale=1.0), spec).init_meta(0)
    assert all(float(random_head[k].abs().max()) > 0 for k in heads if k.endswith("weight"))


def test_centred_f_adds_no_uniform_drift() -> None:
    """center=True: f's part of the step sums to zero over each tensor; without it a random head's does not."""
    problem = mlp_problem(dtype=torch.float64)
    params = dict(problem.init)
    g = grad(problem.loss)(params, problem.x_train[:16], problem.y_train[:16])
    means = {}
    for center in (True, False):
        lopt = ResidualLOpt(LOptConfig(kind="perparam", head_scale=1.0, center=center))
        meta = {k: v.double() for k, v in lopt.init_meta(0).items()}
        meta["log_beta"] = torch.tensor(0.0, dtype=torch.float64)
        new, _ = lopt.update(meta, lopt.init(params), params, g)
        sgdm, _ = ResidualLOpt(LOptConfig(kind="sgdm")).update(meta, lopt.init(params), params, g)
        means[center] = max(float((new[k] - sgdm[k]).mean().abs()) for k in new)
    assert means[True] < 1e-12 < 1e-4 < means[False]
