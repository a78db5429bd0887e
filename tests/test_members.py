"""Member architectures: arch resolution, parameter layouts, and the vmappable layers equal their torch classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, vmap

from pipeline.errors import ConfigError
from pipeline.zoo.members import (
    ARCH_NAMES,
    _mix32,
    GRUSeq2Seq,
    MemberConv2d,
    MemberDropout,
    MemberEncoderLayer,
    MemberGRU,
    build_member,
    counter_uniform,
    resolve_arch,
    small_cnn_zoo_arch,
)
from pipeline.zoo.tasks import load_task

TASK_FOR = {"cnn": "digits", "mlp": "digits", "gru_seq2seq": "arith", "transformer": "modadd"}


@pytest.fixture(scope="module")
def task_of():
    return {arch: load_task(name) for arch, name in TASK_FOR.items()}


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_resolve_fills_dims_and_is_idempotent(name: str, task_of) -> None:
    task = task_of[name]
    arch = resolve_arch({"name": name}, task)
    assert resolve_arch(arch, task) == arch and "activation" in arch
    model = build_member(arch)
    assert isinstance(model, nn.Module)
    assert list(dict(model.named_parameters())) == list(model.state_dict())  # state-dict keys = parameter names


def test_cnn_has_the_small_cnn_zoo_shape(task_of) -> None:
    model = build_member(resolve_arch({"name": "cnn"}, task_of["cnn"]))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {
        "convs.0.weight": (16, 1, 3, 3),
        "convs.0.bias": (16,),
        "convs.1.weight": (16, 16, 3, 3),
        "convs.1.bias": (16,),
        "convs.2.weight": (16, 16, 3, 3),
        "convs.2.bias": (16,),
        "head.weight": (10, 16),
        "head.bias": (10,),
    }
    assert sum(v.numel() for v in model.state_dict().values()) == 4970
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_small_cnn_zoo_arch_matches_tf_shapes() -> None:
    arch = small_cnn_zoo_arch([(3, 3, 1, 16), (3, 3, 16, 16), (3, 3, 16, 16)], [(16, 10)])
    model = build_member(arch)
    assert sum(v.numel() for v in model.state_dict().values()) == 4970
    assert small_cnn_zoo_arch([(3, 3, 1, 16), (5, 5, 16, 16)], [(16, 10)]) is None


@pytest.mark.parametrize(
    ("arch", "task", "match"),
    [
        ({"name": "resnet"}, "digits", "allowed: cnn, mlp, gru_seq2seq, transformer"),
        ({"name": "cnn", "width": 3}, "digits", "has no field 'width'"),
        ({"name": "mlp", "activation": "swish"}, "digits", "field 'activation' is 'swish'"),
        ({"name": "gru_seq2seq", "activation": "relu"}, "arith", "allowed: tanh"),
        ({"name": "cnn"}, "arith", "does not fit task 'arith'"),
        ({"name": "cnn", "num_classes": 3}, "digits", "field 'num_classes' is 3 but task 'digits' needs 10"),
        ({"name": "mlp", "hidden": [32, 0]}, "digits", "field 'hidden' must be"),
        ({"name": "transformer", "d_model": 30, "n_heads": 4}, "modadd", "divisible by 'n_heads'"),
    ],
)
def test_bad_arch_is_a_config_error_naming_the_field(arch: dict, task: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        resolve_arch(arch, load_task(task))


def test_build_needs_a_resolved_arch() -> None:
    with pytest.raises(ConfigError, match="not resolved: field 'in_channels'"):
        build_member({"name": "cnn"})


@pytest.mark.parametrize(("size", "stride", "padding"), [(8, 2, 1), (4, 2, 1), (2, 1, 1), (9, 1, 0)])
def test_batched_conv_equals_conv2d(size: int, stride: int, padding: int) -> None:
    torch.manual_seed(0)
    ref = nn.Conv2d(3, 5, 3, stride=stride, padding=padding).double()
    conv = MemberConv2d(3, 5, 3, stride=stride, padding=padding).double()
    conv.load_state_dict(ref.state_dict())
    conv.batched_forward = True
    x = torch.randn(4, 3, size, size, dtype=torch.float64)
    torch.testing.assert_close(conv(x), ref(x))
    # under vmap with per-member weights (both the dense and the im2col branch)
    params = {k: torch.randn(3, *v.shape, dtype=torch.float64) for k, v in ref.state_dict().items()}
    out = vmap(lambda p, xb: functional_call(conv, p, (xb,)), in_dims=(0, None))(params, x)
    for m in range(3):
        torch.testing.assert_close(out[m], functional_call(ref, {k: v[m] for k, v in params.items()}, (x,)))


def test_member_gru_equals_nn_gru_and_masks_hold_state() -> None:
    torch.manual_seed(0)
    ref = nn.GRU(4, 6, batch_first=True).double()
    gru = MemberGRU(4, 6).double()
    gru.load_state_dict(ref.state_dict())
    assert list(gru.state_dict()) == ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"]
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    h0 = torch.randn(1, 3, 6, dtype=torch.float64)
    for hx in (None, h0):
        out, h = gru(x, hx)
        out_ref, h_ref = ref(x, hx)
        torch.testing.assert_close(out, out_ref)
        torch.testing.assert_close(h, h_ref)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False], [True] + [False] * 4])
    _, h = gru(x, h0, mask=mask)
    for b, length in enumerate((5, 3, 1)):
        _, h_short = ref(x[b : b + 1, :length], h0[:, b : b + 1])
        torch.testing.assert_close(h[:, b], h_short[:, 0])


def test_encoder_layer_equals_torch_pre_norm_layer() -> None:
    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
    ref = ref.double().eval()
    layer = MemberEncoderLayer(8, 2, 16, "gelu").double().eval()
    assert list(layer.state_dict()) == list(ref.state_dict())
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x), ref(x))
    causal = nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)
    torch.testing.assert_close(layer(x, src_mask=causal), ref(x, src_mask=causal))


def test_counter_hash_is_exact_uint32_arithmetic() -> None:
    """The int32 torch hash equals the same rounds in numpy uint32 (well-defined wrapping), on every element."""
    x = np.random.default_rng(0).integers(0, 2**32, 4096, dtype=np.uint64).astype(np.uint32)
    ref = x.copy()
    for shift, mult in ((16, 0x7FEB352D), (15, 0x2C1B3C6D)):
        ref = ref ^ (ref >> np.uint32(shift))
        ref = ref * np.uint32(mult)
    ref = ref ^ (ref >> np.uint32(16))
    out = _mix32(torch.from_numpy(x.view(np.int32).copy()))
    assert np.array_equal(out.numpy().view(np.uint32), ref)


def test_dropout_counter_noise_is_per_member_and_deterministic() -> None:
    drop = MemberDropout(salt=1)
    drop.counter_noise = True
    x = torch.ones(1000)
    key = torch.tensor(12345, dtype=torch.int32)
    drop.noise_key.copy_(key)
    drop.rate.fill_(0.0)
    assert torch.equal(drop(x), x)  # rate 0 is exactly the identity
    drop.rate.fill_(0.3)
    y = drop(x)
    assert torch.equal(y, drop(x))  # same key, same mask
    assert 0.6 < float((y > 0).float().mean()) < 0.8 and torch.allclose(y[y > 0], torch.full_like(y[y > 0], 1 / 0.7))
    drop.noise_key.fill_(999)
    assert not torch.equal(drop(x), y)
    # vmapped over members with their own rates and keys = each member alone
    rates, keys = torch.tensor([0.0, 0.5, 0.9]), torch.tensor([1, 2, 3], dtype=torch.int32)
    out = vmap(lambda r, k: functional_call(drop, {"rate": r, "noise_key": k}, (x,)))(rates, keys)
    for m in range(3):
        torch.testing.assert_close(out[m], functional_call(drop, {"rate": rates[m], "noise_key": keys[m]}, (x,)))
    u = counter_uniform(torch.tensor(7, dtype=torch.int32), 0, (4096,))
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0 and abs(float(u.mean()) - 0.5) < 0.03
    drop.eval()
    assert torch.equal(drop(x), x)


def test_teacher_forcing_success_equals_greedy_decoding() -> None:
    torch.manual_seed(0)
    model = GRUSeq2Seq(vocab_size=15, embed_dim=8, hidden_size=16, pad_id=0, bos_id=14).eval()
    src = torch.randint(1, 13, (20, 6))
    greedy = model.generate(src, 4)  # (20, 4)
    assert torch.equal(model(src, greedy).argmax(-1), greedy)  # greedy tokens are right under teacher forcing
    wrong = greedy.clone()
    wrong[:, 2] = (wrong[:, 2] + 1) % 15
    assert not (model(src, wrong).argmax(-1) == wrong).all(dim=1).any()  # a wrong answer token never "succeeds"
