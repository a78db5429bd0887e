"""The batched GRU seq2seq (no vmap) computes what each member's GRUSeq2Seq computes: logits with teacher forcing,
padding, dropout masks, gradients; and the engine trains a GRU chunk with it as with the vmapped module."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from pipeline.zoo.batched_seq2seq import BatchedSeq2Seq
from pipeline.zoo.members import build_member

K, B, S, T, VOCAB, PAD, BOS = 3, 4, 5, 3, 9, 0, 8
ARCH = {"name": "gru_seq2seq", "embed_dim": 4, "hidden_size": 6, "vocab_size": VOCAB, "pad_id": PAD, "bos_id": BOS}


def _setup():
    model = build_member(ARCH).double()
    model.dropout.counter_noise = True
    gen = torch.Generator().manual_seed(0)
    params = {n: 0.5 * torch.randn(K, *p.shape, generator=gen, dtype=torch.float64) for n, p in model.named_parameters()}
    src = torch.randint(1, BOS, (K, B, S), generator=gen)
    src[:, :, -2:] = PAD  # right padding: the encoder state must stay put there
    src[0, 1, 2:] = PAD
    tgt = torch.randint(1, BOS, (K, B, T), generator=gen)
    tgt[1, 2, -1] = PAD
    rates = torch.tensor([0.0, 0.3, 0.6], dtype=torch.float64)
    keys = torch.tensor([11, -7, 123456], dtype=torch.int32)
    return model, params, src, tgt, rates, keys


def _call(model, p, rate, key, src, tgt):
    buffers = {"dropout.rate": rate, "dropout.noise_key": key}
    return functional_call(model, (p, buffers), (src, tgt))


def test_batched_seq2seq_equals_each_member_with_padding_dropout_and_gradients() -> None:
    model, params, src, tgt, rates, keys = _setup()
    seq = BatchedSeq2Seq(ARCH)
    want = vmap(lambda p, r, k, s, t: _call(model, p, r, k, s, t))(params, rates, keys, src, tgt)
    leaves = {n: t.clone().requires_grad_() for n, t in params.items()}
    got = seq(leaves, src, tgt, rates, keys)
    assert got.shape == (K, B, T, VOCAB)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # gradients of the summed member losses are each member's own gradients
    per = F.cross_entropy(got.flatten(0, 2), tgt.flatten(), reduction="none").view(K, -1).mean(1)
    grads = torch.autograd.grad(per.sum(), list(leaves.values()))

    def loss(p, rate, key, s, t):
        return F.cross_entropy(_call(model, p, rate, key, s, t).flatten(0, 1), t.flatten())

    want_grads = vmap(grad(loss))(params, rates, keys, src, tgt)
    for n, g in zip(leaves, grads):
        torch.testing.assert_close(g, want_grads[n], rtol=1e-10, atol=1e-12, msg=n)
    # eval mode: no dropout; shared inputs through the evaluator equal per-member calls
    model.eval()
    want_eval = vmap(lambda p: functional_call(model, p, (src[0], tgt[0])))(params)
    torch.testing.assert_close(seq.evaluator(params)(src[0], tgt[0]), want_eval, rtol=1e-12, atol=1e-12)
    # without autograd (its own recurrence, no per-step gates kept) on each member's own inputs: the same values
    with torch.no_grad():
        no_grad = seq(params, src, tgt)
    torch.testing.assert_close(no_grad, seq(leaves, src, tgt).detach(), rtol=1e-12, atol=1e-12)


def test_engine_trains_gru_chunks_as_the_vmapped_module(monkeypatch) -> None:
    """A float64 GRU chunk with dropout: same weights and metrics with the batched network as with vmap."""
    import pipeline.zoo.population as population
    from pipeline.zoo.population import ChunkJob, member_seed, train_population
    from pipeline.zoo.tasks import load_task

    task = load_task("arith", n_train=96, n_test=32)
    job = ChunkJob({"name": "gru_seq2seq", "embed_dim": 4, "hidden_size": 8}, task, "adam", 16, 2, checkpoint_epochs=(0, 1, 2))
    hp = {"lr": np.array([3e-3, 1e-2, 5e-3]), "dropout": np.array([0.0, 0.2, 0.4]), "train_fraction": np.array([1.0, 0.5, 1.0])}
    seeds = np.array([member_seed(3, i) for i in range(3)])
    fast = train_population(job, hp, seeds, device="cpu", dtype=torch.float64)
    monkeypatch.setattr(population, "BatchedSeq2Seq", lambda arch: None)  # the vmapped module instead
    slow = train_population(job, hp, seeds, device="cpu", dtype=torch.float64)
    for n in fast.weights:
        np.testing.assert_allclose(fast.weights[n], slow.weights[n], rtol=1e-9, atol=1e-11, err_msg=n)
    for n in fast.metrics:
        np.testing.assert_allclose(fast.metrics[n], slow.metrics[n], rtol=1e-9, atol=1e-11, err_msg=n)
