"""The batched CNN (no vmap) computes what each member's CNNMember computes: logits, dropout masks, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from pipeline.zoo.batched_cnn import BatchedCNN, batched_counter_keep
from pipeline.zoo.members import _counter_bits, build_member

# The first layer always by patches (channels-last output); then 8x8 inputs: dense layers (the zoo's images), the
# first of them reading channels-last; 20x20: unfold layers (the first reading channels-last), then dense ones.
ARCHS = {
    "dense-relu": ({"activation": "relu", "channels": [4, 6, 5]}, (2, 8, 8)),
    "dense-tanh": ({"activation": "tanh", "channels": [4, 5]}, (1, 8, 8)),
    "patches-only": ({"activation": "relu", "channels": [3]}, (2, 8, 8)),
    "unfold-relu": ({"activation": "relu", "channels": [3, 4, 4]}, (2, 20, 20)),
    "unfold-gelu-stride1": ({"activation": "gelu", "channels": [3, 2], "stride": 1, "kernel_size": 5, "padding": 2}, (1, 16, 16)),
}
KINDS = {"dense-relu": ["patches", "dense", "dense"], "dense-tanh": ["patches", "dense"], "patches-only": ["patches"],
         "unfold-relu": ["patches", "unfold", "dense"], "unfold-gelu-stride1": ["patches", "unfold"]}
K, B, CLASSES = 3, 5, 4


def _setup(name: str):
    fields, shape = ARCHS[name]
    arch = {"name": "cnn", "kernel_size": 3, "stride": 2, "padding": 1, **fields, "in_channels": shape[0], "num_classes": CLASSES}
    model = build_member(arch).double()
    for m in model.drops:
        m.counter_noise = True
    gen = torch.Generator().manual_seed(0)
    params = {n: 0.3 * torch.randn(K, *p.shape, generator=gen, dtype=torch.float64) for n, p in model.named_parameters()}
    x = torch.randn(K, B, *shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (K, B), generator=gen)
    rates = torch.tensor([0.0, 0.3, 0.6], dtype=torch.float64)
    keys = torch.tensor([11, -7, 123456], dtype=torch.int32)
    return arch, shape, model, params, x, y, rates, keys


def _member_loss(model, drop_names):
    def loss(p, rate, key, xb, yb):
        buffers = {f"{d}.{b}": v for d in drop_names for b, v in (("rate", rate), ("noise_key", key))}
        return F.cross_entropy(functional_call(model, (p, buffers), (xb,)), yb)

    return loss


@pytest.mark.parametrize("name", list(ARCHS))
def test_batched_cnn_equals_each_member_with_dropout_and_gradients(name: str) -> None:
    arch, shape, model, params, x, y, rates, keys = _setup(name)
    cnn = BatchedCNN(arch, shape, torch.device("cpu"))
    assert [p.kind for p in cnn.plans] == KINDS[name]
    drops = [n for n, _ in model.named_modules() if n.startswith("drops.")]
    loss = _member_loss(model, drops)
    # training mode: each member's own rate and noise key, as the engine feeds MemberDropout
    want = vmap(lambda p, r, k, xb: functional_call(model, (p, {f"{d}.{b}": v for d in drops for b, v in (("rate", r), ("noise_key", k))}), (xb,)))(
        params, rates, keys, x
    )
    leaves = {n: t.clone().requires_grad_() for n, t in params.items()}
    got = cnn(leaves, x, rates, keys)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # gradients of the summed member losses are each member's own gradients
    per = F.cross_entropy(got.flatten(0, 1), y.flatten(), reduction="none").view(K, B).mean(1)
    grads = torch.autograd.grad(per.sum(), list(leaves.values()))
    want_grads = vmap(grad(loss))(params, rates, keys, x, y)
    for (n, g) in zip(leaves, grads):
        torch.testing.assert_close(g, want_grads[n], rtol=1e-10, atol=1e-12, msg=n)
    # eval mode: no dropout; shared inputs through the evaluator equal per-member calls
    model.eval()
    shared = x[0]
    want_eval = vmap(lambda p: functional_call(model, p, (shared,)))(params)
    torch.testing.assert_close(cnn(params, shared.expand(K, *shared.shape)), want_eval, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cnn.evaluator(params)(shared), want_eval, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["dense-relu", "unfold-relu"])
def test_first_layer_patches_from_a_table_give_the_same_logits_and_gradients(name: str, monkeypatch) -> None:
    """A step may pass rows of `first_patches` (the training images' patches, computed once) instead of images."""
    import pipeline.zoo.batched_cnn as batched_cnn

    arch, shape, _, params, x, y, rates, keys = _setup(name)
    cnn = BatchedCNN(arch, shape, torch.device("cpu"))
    table = cnn.first_patches(x.reshape(K * B, *shape))  # (N, L*C*K) for N = K*B images
    assert table is not None and table.shape[0] == K * B
    results = []
    for inputs in (x, table.view(K, B, -1)):
        leaves = {n: t.clone().requires_grad_() for n, t in params.items()}
        logits = cnn(leaves, inputs, rates, keys)
        per = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(K, B).mean(1)
        results.append((logits, torch.autograd.grad(per.sum(), list(leaves.values()))))
    (want, want_grads), (got, got_grads) = results
    assert torch.equal(got, want)
    assert all(torch.equal(g, w) for g, w in zip(got_grads, want_grads))
    monkeypatch.setattr(batched_cnn, "_PATCH_TABLE_MAX", table.numel() * table.element_size() - 1)
    assert cnn.first_patches(x.reshape(K * B, *shape)) is None  # over the cap: the caller passes images


@pytest.mark.parametrize("numel", [7, 4092, 40_000])
def test_batched_counter_keep_has_member_dropout_bits(numel: int, monkeypatch) -> None:
    import pipeline.zoo.batched_cnn as batched_cnn

    monkeypatch.setattr(batched_cnn, "_BLOCK", 1 << 14)  # blocks of several members, and of one (40_000)
    keys = torch.tensor([0, 1, -5, 2**31 - 1, -(2**31), 99], dtype=torch.int32)
    rates = torch.tensor([0.0, 0.1, 0.5, 0.9, 0.999, 0.25])
    keep = batched_counter_keep(keys, 2, numel, rates)
    as_float = batched_counter_keep(keys, 2, numel, rates, torch.float64)
    for m in range(len(keys)):
        bits = _counter_bits(keys[m], 2, (numel,))
        want = bits >= (rates[m] * float(1 << 24)).to(torch.int32)  # MemberDropout's rule
        assert torch.equal(keep[m], want), m
        assert torch.equal(as_float[m], want.double()), m
    scaled = batched_counter_keep(keys, 2, numel, rates, torch.float64, scaled=True)  # the dropout multiplier
    assert torch.equal(scaled, as_float * (1.0 - rates.double()).reciprocal()[:, None])
    assert keep[0].all()
    if numel % 12 == 0:  # stored channels-last: each element keeps the bit of its index in (..., C, L) order
        last = batched_counter_keep(keys, 2, numel, rates, channels_last=(3, 4))
        assert torch.equal(last, keep.view(len(keys), -1, 3, 4).transpose(2, 3).reshape(len(keys), -1))
    if numel > 1000:
        assert 0.45 < float(keep[2].float().mean()) < 0.55


def test_wide_layers_fall_back_to_unfold() -> None:
    """Dense matrices are capped per member (memory), so wide layers on small images use im2col instead."""
    arch = {"name": "cnn", "activation": "relu", "channels": [256, 256], "kernel_size": 3, "stride": 2, "padding": 1,
            "in_channels": 1, "num_classes": 10}
    cnn = BatchedCNN(arch, (1, 8, 8), torch.device("cpu"))
    assert [p.kind for p in cnn.plans] == ["patches", "unfold"]  # 4096 x 1024 dense entries are too many
