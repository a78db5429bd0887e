"""ES estimators: unbiased on a quadratic, PES unbiased over truncations, clipping and NaN handling."""

from __future__ import annotations

import math

import torch

from pipeline.lopt.es import ESConfig, antithetic_gradient, clip_by_norm, es_gradient, es_step, sanitize_losses
from pipeline.lopt.meta_train import PopulationUnroll
from pipeline.lopt.optimizers import LOptConfig, ResidualLOpt, flatten_meta
from _lopt_problems import mlp_problem


def test_es_gradient_on_a_quadratic_matches_the_true_gradient() -> None:
    gen = torch.Generator().manual_seed(0)
    d = 6
    q = torch.randn(d, d, generator=gen, dtype=torch.float64)
    a = q @ q.T + torch.eye(d, dtype=torch.float64)
    b = torch.randn(d, generator=gen, dtype=torch.float64)
    theta = torch.randn(d, generator=gen, dtype=torch.float64)

    def loss(thetas: torch.Tensor) -> torch.Tensor:  # (P, D) -> (P,)
        return 0.5 * torch.einsum("pi,ij,pj->p", thetas, a, thetas) + thetas @ b

    true = a @ theta + b
    est, se = es_gradient(loss, theta, pairs=3000, sigma=0.05, generator=gen)
    z = (est - true) / se
    assert float(z.abs().max()) < 4.5, z
    assert float(se.max()) < 0.1 * float(true.abs().max())  # the check has power: the error bars are tight


class _LinearUnroll:
    """Toy inner loop s <- 0.8 s + theta, loss |s - 1|^2 per step; windows of 4 steps. State (P, D)."""

    def __init__(self, steps: int = 4):
        self.steps = steps

    def advance(self, thetas, state):
        total = torch.zeros(thetas.shape[0], dtype=thetas.dtype)
        for _ in range(self.steps):
            state = 0.8 * state + thetas
            total = total + (state - 1).square().sum(1)
        return state, total / self.steps

    def replicate(self, state, n):
        return state.expand(n, -1).clone()


def test_pes_is_unbiased_over_truncations_where_truncated_es_is_not() -> None:
    """Summed over 3 windows, PES estimates the gradient of the whole unroll's loss; TES misses the carry-over."""
    d, windows = 2, 3
    theta = torch.tensor([0.1, -0.2], dtype=torch.float64)
    unroll = _LinearUnroll()

    def total_loss(th):
        s, out = torch.zeros(1, d, dtype=th.dtype), 0.0
        for _ in range(windows):
            s, loss = unroll.advance(th.unsqueeze(0), s)
            out = out + loss[0]
        return out

    true = torch.func.grad(total_loss)(theta)
    results = {}
    for estimator in ("pes", "tes"):
        cfg = ESConfig(estimator=estimator, pairs=16, sigma=0.01)
        reps = []
        for r in range(150):
            gen = torch.Generator().manual_seed(r)
            n = 2 * cfg.pairs if estimator == "pes" else 1
            state, accum, g = torch.zeros(n, d, dtype=torch.float64), None, torch.zeros(d, dtype=torch.float64)
            for _ in range(windows):
                step = es_step(unroll, theta, state, accum, cfg, gen)
                state, accum, g = step.state, step.accum, g + step.grad
            reps.append(g)
        reps_t = torch.stack(reps)
        results[estimator] = (reps_t.mean(0), reps_t.std(0) / math.sqrt(len(reps)))
    mean, se = results["pes"]
    assert float(((mean - true) / se).abs().max()) < 4.5, (mean, true, se)
    mean_t, se_t = results["tes"]
    assert float(((mean_t - true) / se_t).abs().max()) > 10  # truncation bias, far outside its error bars


def test_sanitize_and_clip() -> None:
    losses = torch.tensor([0.5, float("nan"), float("inf"), 7.0, -float("inf")])
    out = sanitize_losses(losses, cap=2.0)
    assert out.tolist() == [0.5, 2.0, 2.0, 2.0, -2.0]
    g = clip_by_norm(torch.tensor([3.0, 4.0, float("nan")]), 1.0)
    torch.testing.assert_close(g, torch.tensor([0.6, 0.8, 0.0]))
    grad, se = antithetic_gradient(torch.tensor([1.0, 0.0]), torch.tensor([[0.1]]), sigma=0.1)
    assert float(grad) == 5.0 and math.isinf(float(se))


def test_no_nan_under_random_meta_parameters_on_a_diverging_task() -> None:
    """Huge inputs and random meta-parameters with step sizes up to e^3: particles diverge, ES stays finite."""
    problem = mlp_problem(scale=50.0)
    lopt = ResidualLOpt(LOptConfig(kind="perparam"))
    template = lopt.init_meta(0)
    order = torch.stack([problem.data_order(8, s) for s in range(4)])
    unroll = PopulationUnroll(lopt, template, problem, order, cap=2.0, truncation=4)
    gen = torch.Generator().manual_seed(0)
    theta = flatten_meta(template) + torch.randn(flatten_meta(template).shape, generator=gen)
    theta[0] = 3.0  # log_alpha: alpha = 20
    state = unroll.init_state(8)
    cfg = ESConfig(pairs=4, sigma=0.5)
    accum = None
    for _ in range(2):
        step = es_step(unroll, theta, state, accum, cfg, gen)
        state, accum = step.state, step.accum
        assert torch.isfinite(step.losses).all() and float(step.losses.max()) <= 2.0
        assert torch.isfinite(step.grad).all() and math.isfinite(step.loss)
        theta = theta - 0.1 * clip_by_norm(step.grad, 1.0)
        assert torch.isfinite(theta).all()
    assert float(step.losses.max()) == 2.0  # some particle did diverge (the cap was needed)
