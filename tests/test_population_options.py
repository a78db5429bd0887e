"""Engine options of issue 12 (optimizer families, init schemes, lr schedules, per-member epochs, label noise,
random shifts, widths): each equals the plain torch.optim / lr_scheduler loop, and the options behave as documented.

Comparisons with the plain loop run a few dozen steps and compare at the level of the whole network: the distance
between the engine's and the loop's weights relative to how far training moved them, and the test loss. Both
tolerate float rounding of any CPU (measured: ~2e-7 relative) but not a wrong formula (an off-by-one step, a
missing bias correction, coupled instead of decoupled decay: >1e-2).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.zoo.members import build_member, crop_to_shapes, pad_to_shapes, resolve_arch, with_width
from pipeline.zoo.population import (
    HELD_OUT_INITS,
    HELD_OUT_OPTIMIZERS,
    INIT_SCHEMES,
    OPTIMIZERS,
    ChunkJob,
    _stream_seed,
    init_member_weights,
    lr_factors,
    member_seed,
    noisy_labels,
    shift_offsets,
    train_member_reference,
    train_population,
)
from pipeline.zoo.tasks import load_task

SEEDS = np.array([member_seed(7, i) for i in range(3)])
MLP = {"name": "mlp", "hidden": [16]}
# Learning rates at which each family trains the small MLP without diverging (member 1 uses half, plus decay).
LR = {"sgd": 0.2, "momentum": 0.05, "nesterov": 0.05, "adam": 3e-3, "adamw": 3e-3, "rmsprop": 1e-3, "adagrad": 3e-2, "adamax": 3e-3}


@pytest.fixture(scope="module")
def digits():
    return load_task("digits")


def _flat(weights: dict[str, np.ndarray], row: int, c: int) -> np.ndarray:
    return np.concatenate([weights[k][row, c].ravel() for k in sorted(weights)])


def _assert_matches_reference(job: ChunkJob, hp: dict[str, np.ndarray], member: int = 1, seeds=SEEDS):
    """Train the chunk with the engine and member `member` alone with the plain loop; compare every checkpoint."""
    res = train_population(job, hp, seeds, device="cpu")
    ref = train_member_reference(job, {k: float(v[member]) for k, v in hp.items()}, int(seeds[member]))
    assert not res.diverged.any() and not ref.diverged.any()
    start = _flat(ref.weights, 0, 0)
    assert np.array_equal(_flat(res.weights, member, 0), start)  # the same init
    for c in range(1, len(job.checkpoint_epochs)):
        eng, loop = _flat(res.weights, member, c), _flat(ref.weights, 0, c)
        moved = np.linalg.norm(loop - start)
        assert moved > 0
        assert np.linalg.norm(eng - loop) / moved < 1e-4, (job, c)
    np.testing.assert_allclose(res.metrics["test_loss"][member], ref.metrics["test_loss"][0], rtol=1e-4, atol=1e-4)
    return res, ref


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_each_optimizer_family_equals_torch_optim(optimizer: str, digits) -> None:
    job = ChunkJob(MLP, digits, optimizer, 64, 2, (1,), init="torch")
    lr = LR[optimizer]
    hp = {"lr": np.array([lr, 0.5 * lr, lr]), "weight_decay": np.array([0.0, 1e-2, 0.0]), "dropout": np.array([0.0, 0.1, 0.0])}
    res, _ = _assert_matches_reference(job, hp)
    assert (res.metrics["test_acc"][:, -1] > 0.25).all()  # every family trains at these rates


def test_adamw_decay_is_decoupled(digits) -> None:
    """AdamW and Adam differ only through weight decay, and AdamW's is p *= 1 - lr wd (not an L2 gradient)."""
    hp = {"lr": np.array([3e-3]), "weight_decay": np.array([0.5])}
    adam = train_population(ChunkJob(MLP, digits, "adam", 64, 1), hp, SEEDS[:1], device="cpu")
    adamw = train_population(ChunkJob(MLP, digits, "adamw", 64, 1), hp, SEEDS[:1], device="cpu")
    plain = train_population(ChunkJob(MLP, digits, "adamw", 64, 1), {"lr": hp["lr"]}, SEEDS[:1], device="cpu")
    w = lambda r: _flat(r.weights, 0, 1)  # noqa: E731
    assert np.linalg.norm(w(adamw) - w(adam)) > 1e-2 * np.linalg.norm(w(adam))
    assert np.linalg.norm(w(adamw)) < np.linalg.norm(w(plain))  # decay shrinks the weights


@pytest.mark.parametrize("schedule", ["cosine", "step", "warmup"])
def test_each_schedule_equals_torch_lr_scheduler(schedule: str, digits) -> None:
    """Members with different step counts (train fraction) and run lengths (per-member epochs) each follow their
    own schedule, as torch's scheduler stepped once per update over the member's run."""
    job = ChunkJob(MLP, digits, "momentum", 64, 4, (1, 2), schedule=schedule)
    hp = {"lr": np.full(3, 0.05), "epochs": np.array([4, 3, 2]), "train_fraction": np.array([1.0, 0.5, 1.0])}
    for member in (1, 2):
        _assert_matches_reference(job, hp, member)


@pytest.mark.parametrize("schedule", ["cosine", "step", "warmup"])
@pytest.mark.parametrize(("steps", "epochs"), [(23, 12), (5, 3), (1, 1), (7, 1)])
def test_lr_factors_follow_torch_schedulers(schedule: str, steps: int, epochs: int) -> None:
    from pipeline.zoo.population import _reference_scheduler

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = _reference_scheduler(schedule, opt, steps, epochs)
    for epoch in range(1, epochs + 1):
        for s in range(steps):
            ours = lr_factors(schedule, epoch, s, np.array([steps]), np.array([epochs]))[0]
            assert math.isclose(ours, opt.param_groups[0]["lr"], rel_tol=1e-9, abs_tol=1e-12), (epoch, s)
            if sched is not None:
                opt.step()
                sched.step()


def test_per_member_epochs_stop_a_member_and_leave_its_mates_alone(digits) -> None:
    job = ChunkJob(MLP, digits, "adam", 64, 3, (1, 2))
    hp = {"lr": np.full(3, 3e-3), "epochs": np.array([3, 1, 2])}
    res, _ = _assert_matches_reference(job, hp, member=1)
    for key, w in res.weights.items():  # member 1 stopped after epoch 1, member 2 after 2: later checkpoints repeat
        assert np.array_equal(w[1, 1], w[1, 2]) and np.array_equal(w[1, 1], w[1, 3]), key
        assert np.array_equal(w[2, 2], w[2, 3]) and not np.array_equal(w[0, 2], w[0, 3]), key
    full = train_population(job, {"lr": hp["lr"][:1]}, SEEDS[:1], device="cpu")
    for key, w in res.weights.items():
        np.testing.assert_allclose(w[0], full.weights[key][0], rtol=1e-4, atol=1e-5, err_msg=key)


def test_label_noise_equals_reference_and_flips_the_drawn_share(digits) -> None:
    job = ChunkJob(MLP, digits, "adam", 64, 2, (1,))
    hp = {"lr": np.full(3, 3e-3), "label_noise": np.array([0.0, 0.3, 0.1])}
    res, _ = _assert_matches_reference(job, hp)
    clean = train_population(job, {"lr": hp["lr"]}, SEEDS, device="cpu")
    assert np.array_equal(res.weights["head.weight"][0], clean.weights["head.weight"][0])  # share 0: untouched
    assert not np.allclose(res.weights["head.weight"][1, -1], clean.weights["head.weight"][1, -1])
    # training accuracy is measured on the member's own (noisy) labels: the flipped share is hard to fit
    assert res.metrics["train_acc"][1, -1] < clean.metrics["train_acc"][1, -1]

    subset = np.arange(0, len(digits.y_train), 2)
    noisy = noisy_labels(123, digits.y_train, subset, 0.25, 10)
    changed = np.flatnonzero((noisy != digits.y_train).numpy())
    assert len(changed) == round(0.25 * len(subset)) and np.isin(changed, subset).all()
    assert torch.equal(noisy, noisy_labels(123, digits.y_train, subset, 0.25, 10))  # from the seed alone
    assert not torch.equal(noisy, noisy_labels(124, digits.y_train, subset, 0.25, 10))


@pytest.mark.parametrize("table", [True, False])
def test_random_shift_equals_reference_and_offsets_are_uniform(table: bool, digits, monkeypatch) -> None:
    """The batched CNN reads shifted images' patches from a table of every shifted copy (`table`), or, when that
    would be too large, gathers them from the shifted images."""
    import pipeline.zoo.batched_cnn as batched_cnn

    if not table:
        monkeypatch.setattr(batched_cnn, "_PATCH_TABLE_MAX", 0)
    job = ChunkJob({"name": "cnn", "channels": [8, 8]}, digits, "adam", 32, 1)
    hp = {"lr": np.full(3, 3e-3), "shift": np.array([0.0, 2.0, 1.0]), "dropout": np.array([0.0, 0.1, 0.0])}
    for member in (1, 2):
        _assert_matches_reference(job, hp, member)
    keys = torch.arange(4000, dtype=torch.int32)
    moves = shift_offsets(keys, torch.tensor([0, 1, 2, 3]).repeat(1000), 8)  # (4000, 8, 2)
    for s in range(4):
        vals = moves[s::4]
        assert int(vals.abs().max()) == s
        counts = torch.bincount((vals + s).flatten(), minlength=2 * s + 1).double()
        assert (counts / counts.mean() - 1).abs().max() < 0.05  # uniform over [-s, s]


@pytest.mark.parametrize("scheme", INIT_SCHEMES)
def test_init_schemes(scheme: str, digits) -> None:
    arch = resolve_arch({"name": "cnn", "channels": [32, 32]}, digits)
    model = build_member(arch)
    w = init_member_weights(model, 0.1, 11, scheme)
    assert w.keys() == dict(model.named_parameters()).keys()
    assert torch.equal(w["convs.1.weight"], init_member_weights(model, 0.1, 11, scheme)["convs.1.weight"])
    kernel = w["convs.1.weight"]  # (32, 32, 3, 3): fan_in = fan_out = 288
    std = {
        "trunc_normal": 0.1 * 0.8796,  # std of N(0, 1) truncated to [-2, 2]
        "torch": math.sqrt(1 / 3 / 288),  # kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(fan_in))
        "kaiming_normal": math.sqrt(2 / 288),
        "kaiming_uniform": math.sqrt(2 / 288),
        "xavier_normal": math.sqrt(2 / 576),
        "xavier_uniform": math.sqrt(2 / 576),
        "orthogonal": math.sqrt(1 / 288),  # rows of a (32, 288) matrix with orthonormal rows
    }[scheme]
    assert abs(float(kernel.std()) / std - 1) < 0.05
    if scheme == "orthogonal":
        m = kernel.reshape(32, -1)
        torch.testing.assert_close(m @ m.T, torch.eye(32), atol=1e-5, rtol=0)
    if scheme == "torch":  # exactly what nn.Conv2d / nn.Linear draw from the same generator state
        torch.manual_seed(_stream_seed(11, 0))
        fresh = build_member(arch)
        for key, value in fresh.state_dict().items():
            assert torch.equal(w[key], value), key
    else:
        assert all(not w[k].any() for k in w if k.endswith("bias"))


def test_held_out_families_are_real_options() -> None:
    assert set(HELD_OUT_OPTIMIZERS) <= set(OPTIMIZERS) and set(HELD_OUT_INITS) <= set(INIT_SCHEMES)


def test_narrow_member_padded_to_a_wider_zoo_computes_the_same_function(digits) -> None:
    for base in ({"name": "cnn"}, {"name": "mlp", "hidden": [32, 32]}):
        narrow = build_member(resolve_arch(with_width(base, 8), digits))
        wide = build_member(resolve_arch(with_width(base, 24), digits))
        shapes = {k: tuple(v.shape) for k, v in wide.state_dict().items()}
        state = {k: v.detach().numpy()[None] for k, v in narrow.state_dict().items()}  # (1, *shape)
        padded = pad_to_shapes(state, shapes)
        wide.load_state_dict({k: torch.from_numpy(v[0]) for k, v in padded.items()})
        x = digits.x_test[:50]
        torch.testing.assert_close(wide.eval()(x), narrow.eval()(x), atol=1e-5, rtol=1e-5)
        back = crop_to_shapes(padded, {k: tuple(v.shape) for k, v in narrow.state_dict().items()})
        assert all(np.array_equal(back[k], state[k]) for k in state)
        nan = pad_to_shapes({k: np.full_like(v, np.nan) for k, v in state.items()}, shapes)
        assert all(np.isnan(v).all() for v in nan.values())  # a diverged member stays NaN, padding included


@pytest.mark.parametrize(
    ("job_kwargs", "hparams", "match"),
    [
        ({"init": "lecun"}, {"lr": [0.1]}, "init scheme 'lecun' is unknown"),
        ({"schedule": "onecycle"}, {"lr": [0.1]}, "schedule 'onecycle' is unknown"),
        ({}, {"lr": [0.1], "shift": [1.5]}, "'shift' of member 0 is 1.5; must be a whole number"),
        ({}, {"lr": [0.1], "epochs": [3]}, "'epochs' of member 0 is 3; the run has 2 epochs"),
        ({}, {"lr": [0.1], "label_noise": [1.0]}, "'label_noise' of member 0"),
    ],
)
def test_bad_options_are_config_errors(job_kwargs: dict, hparams: dict, match: str, digits) -> None:
    with pytest.raises(ConfigError, match=match):
        job = ChunkJob(MLP, digits, "sgd", 32, 2, **job_kwargs)
        train_population(job, {k: np.asarray(v) for k, v in hparams.items()}, np.array([3]), device="cpu")


def test_task_options_are_refused_where_they_make_no_sense() -> None:
    arith = load_task("arith", n_train=200, n_test=50)
    job = ChunkJob({"name": "gru_seq2seq"}, arith, "adam", 32, 1)
    with pytest.raises(ConfigError, match="label_noise needs a classification task"):
        train_population(job, {"lr": [1e-3], "label_noise": [0.1]}, np.array([1]), device="cpu")
    with pytest.raises(ConfigError, match="needs an image task"):
        train_population(job, {"lr": [1e-3], "shift": [1]}, np.array([1]), device="cpu")
    with pytest.raises(ConfigError, match="no width choice"):
        with_width({"name": "gru_seq2seq"}, 8)


TINY_DIVERSE = """
name = "tiny-diverse"
members = 4
members_per_chunk = 1
seed = 1
epochs = 2
checkpoint_epochs = [0, 1, 2]
[task]
name = "digits"
[arch]
name = "cnn"
[hparams]
optimizer = {choice = ["sgd", "adamw"]}
batch_size = 64
init = "torch"
schedule = "cosine"
width = {choice = [4, 8]}
label_noise = {uniform = [0.0, 0.2]}
shift = {choice = [0, 1]}
epochs = {choice = [1, 2]}
lr = {by = "optimizer", sgd = {log_uniform = [0.05, 0.2]}, adamw = {log_uniform = [1e-3, 3e-3]}}
"""


def test_a_diverse_zoo_stores_narrow_members_zero_padded_and_extends_bit_identically(tmp_path) -> None:
    from pipeline.zoo.store import Zoo
    from pipeline.zoo import build_zoo

    recipe = tmp_path / "tiny-diverse.toml"
    recipe.write_text(TINY_DIVERSE)
    build_zoo(recipe, tmp_path / "full.zarr", workers=0, device="cpu", threads=1)
    build_zoo(recipe, tmp_path / "grown.zarr", members=2, workers=0, device="cpu", threads=1)
    build_zoo(recipe, tmp_path / "grown.zarr", members=4, workers=0, device="cpu", threads=1)
    zoo, grown = Zoo.open(tmp_path / "full.zarr"), Zoo.open(tmp_path / "grown.zarr")
    widths = zoo.hparam("width").astype(int)
    assert set(widths) == {4, 8} and set(zoo.hparam("optimizer")) == {"sgd", "adamw"}
    full, again = zoo.read_weights(), grown.read_weights()
    kernel = full["convs.1.weight"]  # (members, checkpoints, 8, 8, 3, 3): the widest shape
    assert kernel.shape[2:] == (8, 8, 3, 3)
    narrow = widths == 4
    assert not kernel[narrow][:, :, 4:].any() and not kernel[narrow][:, :, :, 4:].any()  # padding is zero
    assert np.abs(kernel[narrow][:, :, :4, :4]).min(axis=(-1, -2)).any()  # the real channels are not
    for key in zoo.weight_keys:
        assert np.array_equal(full[key], again[key], equal_nan=True), key
    # a stored narrow member rebuilds at its own width, or padded to the widest shape: the same function
    member = int(np.flatnonzero(narrow)[0])
    x = load_task("digits").x_test[:20]
    own, padded = zoo.module(member), zoo.module(member, padded=True)
    assert own.state_dict()["convs.1.weight"].shape == (4, 4, 3, 3)
    assert padded.state_dict()["convs.1.weight"].shape == (8, 8, 3, 3)
    logits = own(x)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, padded(x), atol=1e-5, rtol=1e-5)
