"""Batched population training: learns, equals a plain per-member loop, isolates divergence, is deterministic."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.func import functional_call

from pipeline.errors import ConfigError
from pipeline.zoo.members import build_member
from pipeline.zoo.population import (
    METRIC_NAMES,
    ChunkJob,
    member_seed,
    train_member_reference,
    train_population,
)
from pipeline.zoo.tasks import load_task

# One tiny population per architecture: (task, task params, optimizer, lr, weight decay, batch, epochs, test-acc bar).
CASES = {
    "cnn": ("digits", {}, "adam", 1e-2, 0.0, 64, 2, 0.5),
    "mlp": ("mnist1d", {"num_samples": 2500}, "momentum", 0.2, 0.0, 64, 2, 0.25),
    "gru_seq2seq": ("arith", {"n_train": 1000, "n_test": 200}, "adam", 1e-2, 0.0, 50, 4, 0.01),
    "transformer": ("modadd", {"p": 11, "train_share": 0.8}, "adam", 1e-2, 1e-3, 97, 60, 0.3),
}
CHANCE = {"cnn": 0.1, "mlp": 0.1, "gru_seq2seq": 0.0, "transformer": 1 / 11}


def _hparams(lr: float, wd: float, fraction: float) -> dict[str, np.ndarray]:
    """Member 1 uses dropout and a training subset, so the comparison with the plain loop covers both."""
    return {
        "lr": np.array([lr, lr, 0.7 * lr]),
        "weight_decay": np.array([wd, wd + 1e-4, wd]),
        "init_std": np.array([0.1, 0.15, 0.05]),
        "dropout": np.array([0.0, 0.1, 0.0]),
        "train_fraction": np.array([1.0, fraction, 1.0]),
    }


def _job(name: str) -> tuple[ChunkJob, dict[str, np.ndarray], np.ndarray]:
    task, params, opt, lr, wd, batch, epochs, _ = CASES[name]
    job = ChunkJob({"name": name}, load_task(task, **params), opt, batch, epochs, (1, min(10, epochs)))
    fraction = 0.9 if name == "transformer" else 0.6  # modular addition generalizes only from most of the table
    return job, _hparams(lr, wd, fraction), np.array([member_seed(0, i) for i in range(3)])


def _short(job: ChunkJob) -> ChunkJob:
    """The job's first min(10, epochs) epochs, with the job's checkpoints up to there (a prefix of them)."""
    upto = min(10, job.epochs)
    return ChunkJob(job.arch, job.task, job.optimizer, job.batch_size, upto, [e for e in job.checkpoint_epochs if e <= upto])


@pytest.fixture(scope="module")
def trained():
    """Each case trained once, lazily: (job, hparams, seeds, float32 result of the full job)."""
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            job, hp, seeds = _job(name)
            cache[name] = (job, hp, seeds, train_population(job, hp, seeds, device="cpu"))
        return cache[name]

    return get


@pytest.fixture(scope="module")
def trained64():
    """Each case's short job (`_short`) trained once in float64, lazily."""
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            job, hp, seeds = _job(name)
            cache[name] = train_population(_short(job), hp, seeds, device="cpu", dtype=torch.float64)
        return cache[name]

    return get


def _identifiable(key: str, value: np.ndarray) -> np.ndarray:
    """`value` without the entries that the loss does not determine: attention's key bias (the middle third of
    in_proj_bias) only adds a per-query constant to the scores, which softmax ignores, so its gradient is zero up to
    rounding and Adam's normalization turns that rounding into steps of any size (CPU-dependent, even in float64)."""
    if key.endswith("self_attn.in_proj_bias"):
        d = value.shape[-1] // 3
        return np.concatenate([value[..., :d], value[..., 2 * d :]], axis=-1)
    return value


def _outputs(job: ChunkJob, weights: dict[str, np.ndarray]) -> torch.Tensor:
    """The float64 eval-mode outputs of the member with `weights` on the job's test inputs."""
    model = build_member(job.arch).double().eval()
    params = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}
    x, y = job.task.x_test, job.task.y_test
    x = x.double() if x.is_floating_point() else x
    with torch.no_grad():
        return functional_call(model, params, (x, y) if job.task.kind == "seq2seq" else (x,))


@pytest.mark.parametrize("name", list(CASES))
def test_each_architecture_learns_and_equals_a_plain_loop(name: str, trained, trained64) -> None:
    job, hp, seeds, res = trained(name)
    assert job.checkpoint_epochs[:2] == (0, 1) and job.checkpoint_epochs[-1] == job.epochs
    assert set(res.metrics) == set(METRIC_NAMES) and not res.diverged.any()
    for key, value in res.weights.items():
        assert value.shape[:2] == (3, len(job.checkpoint_epochs)) and value.dtype == np.float32, key
    final = res.metrics["test_acc"][:, -1]
    assert (final >= CASES[name][-1]).all() and (final > 2 * CHANCE[name]).all(), final
    if name == "gru_seq2seq":  # success rate is strict; per-token accuracy must be well above 1/vocab too
        assert (res.metrics["test_token_acc"][:, -1] > 0.4).all()
        assert (res.metrics["test_acc"][:, 0] == 0).all()

    # The math: in float64, the batched member 1 (dropout, subset) equals training it alone with torch.optim over the
    # first <= 10 epochs. float64 keeps rounding (and so the CPU's kernels) ~1e-16 away from these tolerances; any
    # real difference (a wrong bias correction, decay, mask or data order) is orders of magnitude above them.
    short = _short(job)
    res64 = trained64(name)
    ref = train_member_reference(short, {k: v[1] for k, v in hp.items()}, int(seeds[1]), dtype=torch.float64)
    assert res64.weights[next(iter(res64.weights))].dtype == np.float64
    for key, value in res64.weights.items():
        got, want = _identifiable(key, value[1]), _identifiable(key, ref.weights[key][0])
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-10, err_msg=key)
    for metric in METRIC_NAMES:
        np.testing.assert_allclose(res64.metrics[metric][1], ref.metrics[metric][0], rtol=1e-9, atol=1e-12, err_msg=metric)
    final64 = {k: v[1, -1] for k, v in res64.weights.items()}
    torch.testing.assert_close(_outputs(short, final64), _outputs(short, {k: v[0, -1] for k, v in ref.weights.items()}),
                               rtol=1e-9, atol=1e-9)  # the unidentified entries change nothing the member computes

    # The production float32 engine follows the float64 one at the function level (losses; accuracies to a sample).
    c = len(short.checkpoint_epochs)
    for metric in ("train_loss", "test_loss"):
        np.testing.assert_allclose(res.metrics[metric][:, :c], res64.metrics[metric], rtol=1e-4, err_msg=metric)
    for metric in ("test_acc", "test_token_acc"):  # a token flip moves token accuracy less than a sample flip
        np.testing.assert_allclose(res.metrics[metric][:, :c], res64.metrics[metric], atol=1.01 / len(job.task.y_test),
                                   err_msg=metric)


def test_same_job_and_seeds_give_bit_identical_results(trained) -> None:
    job, hp, seeds, res = trained("transformer")
    again = train_population(job, hp, seeds, device="cpu")
    for key in res.weights:
        assert np.array_equal(res.weights[key], again.weights[key]), key
    for metric in METRIC_NAMES:
        assert np.array_equal(res.metrics[metric], again.metrics[metric], equal_nan=True), metric


def test_a_member_does_not_depend_on_its_chunk_mates(trained64) -> None:
    job, hp, seeds = _job("cnn")
    res = trained64("cnn")
    # member 1 alone (another chunk composition) gets the same randomness and result, up to float64 rounding
    alone = train_population(_short(job), {k: v[1:2] for k, v in hp.items()}, seeds[1:2], device="cpu", dtype=torch.float64)
    for key in res.weights:
        np.testing.assert_allclose(alone.weights[key][0], res.weights[key][1], rtol=1e-9, atol=1e-10, err_msg=key)


@pytest.mark.parametrize("name", ["cnn", "gru_seq2seq"])
def test_checkpoint_metrics_do_not_depend_on_the_evaluation_blocks(name: str, trained64, monkeypatch) -> None:
    """The batched CNN and GRU evaluate a block of members at a time (sized by the CNN's dense matrices, by the
    GRU's sequences per member); one member per block gives the same metrics as the whole chunk at once."""
    import pipeline.zoo.batched_cnn as batched_cnn
    import pipeline.zoo.batched_seq2seq as batched_seq2seq

    job, hp, seeds = _job(name)
    res = trained64(name)
    monkeypatch.setattr(batched_cnn, "_EVAL_MATRICES", 1)  # blocks of one member, several samples per call
    monkeypatch.setattr(batched_seq2seq, "_EVAL_SEQUENCES", 1 << 30)
    blocks = train_population(_short(job), hp, seeds, device="cpu", dtype=torch.float64)
    for metric in METRIC_NAMES:
        np.testing.assert_allclose(blocks.metrics[metric], res.metrics[metric], rtol=1e-9, atol=1e-12, err_msg=metric)


@pytest.mark.parametrize("name", ["cnn", "gru_seq2seq"])
def test_training_in_member_blocks_equals_one_block(name: str, monkeypatch) -> None:
    """On a CPU a step trains its members in blocks (the batched model's `step_members`): blocks of two, with a
    member whose run ends an epoch early and one with fewer steps per epoch, train what one block of all trains."""
    from pipeline.zoo.batched_cnn import BatchedCNN
    from pipeline.zoo.batched_seq2seq import BatchedSeq2Seq

    job, hp, seeds = _job(name)
    job = ChunkJob(job.arch, job.task, job.optimizer, job.batch_size, 2, (1, 2))
    hp = {**hp, "epochs": np.array([2, 2, 1])}
    whole = train_population(job, hp, seeds, device="cpu", dtype=torch.float64)
    for cls in (BatchedCNN, BatchedSeq2Seq):
        monkeypatch.setattr(cls, "step_members", lambda self, batch: 2)
    blocks = train_population(job, hp, seeds, device="cpu", dtype=torch.float64)
    for key in whole.weights:
        np.testing.assert_allclose(blocks.weights[key], whole.weights[key], rtol=1e-12, atol=1e-14, err_msg=key)
    for metric in METRIC_NAMES:
        np.testing.assert_allclose(blocks.metrics[metric], whole.metrics[metric], rtol=1e-12, atol=1e-14,
                                   err_msg=metric)


def test_diverging_member_is_flagged_and_isolated() -> None:
    job = ChunkJob({"name": "mlp"}, load_task("digits"), "sgd", 64, 2, (1,))
    seeds = np.array([member_seed(5, i) for i in range(3)])
    for dtype, huge in ((torch.float32, 1e15), (torch.float64, 1e250)):
        hp = {"lr": np.array([0.5, huge, 0.5])}
        res = train_population(job, hp, seeds, device="cpu", dtype=dtype)
        assert res.diverged.tolist() == [False, True, False], dtype
        assert res.diverged_epoch.tolist() == [-1, 1, -1] and res.diverged_epoch.dtype == np.int32
        for key, w in res.weights.items():
            assert np.isfinite(w[1, 0]).all() and np.isnan(w[1, 1:]).all(), key  # init kept, NaN from epoch 1 on
        assert np.isnan(res.metrics["test_loss"][1, 1:]).all() and np.isfinite(res.metrics["test_loss"][1, 0])
        assert (res.metrics["test_acc"][[0, 2], -1] > 0.4).all()
    # chunk-mates train exactly as without the diverging member and as the plain loop (float64: rounding aside)
    mates = train_population(job, {"lr": hp["lr"][[0, 2]]}, seeds[[0, 2]], device="cpu", dtype=torch.float64)
    ref = train_member_reference(job, {"lr": 0.5}, int(seeds[0]), dtype=torch.float64)
    assert ref.diverged_epoch.tolist() == [-1]
    for key in res.weights:
        np.testing.assert_allclose(res.weights[key][[0, 2]], mates.weights[key], rtol=1e-9, atol=1e-10, err_msg=key)
        np.testing.assert_allclose(res.weights[key][0], ref.weights[key][0], rtol=1e-9, atol=1e-10, err_msg=key)


def test_member_seeds_are_stable_and_distinct() -> None:
    assert member_seed(0, 0) == member_seed(0, 0) == 7896617691693857887  # numpy's SeedSequence is a stable API
    seeds = {member_seed(0, i) for i in range(2000)} | {member_seed(1, i) for i in range(2000)}
    assert len(seeds) == 4000 and min(seeds) >= 0 and max(seeds) < 2**63


def test_progress_and_zero_epochs() -> None:
    job = ChunkJob({"name": "mlp", "hidden": [8]}, load_task("digits"), "sgd", 256, 0)
    assert job.checkpoint_epochs == (0,)
    calls = []
    res = train_population(job, {"lr": [0.1, 0.1]}, np.array([1, 2]), device="cpu", progress=lambda e, n: calls.append(e))
    assert calls == [] and res.weights["head.weight"].shape == (2, 1, 10, 8)
    assert np.all(res.metrics["test_acc"] < 0.5)


@pytest.mark.parametrize(
    ("kwargs", "hparams", "match"),
    [
        ({"optimizer": "lion"}, {"lr": [0.1]}, "allowed: sgd, momentum, nesterov, adam"),
        ({"checkpoint_epochs": (5,)}, {"lr": [0.1]}, "outside \\[0, 2\\]"),
        ({"batch_size": 0}, {"lr": [0.1]}, "batch_size must be a positive integer"),
        ({}, {"lr": [0.1], "momentum": [0.9]}, "'momentum' is not a per-member one"),
        ({}, {"lr": [-0.1]}, "'lr' of member 0 is -0.1"),
        ({}, {"lr": [0.1], "dropout": [1.0]}, "'dropout' of member 0"),
        ({}, {"lr": [0.1, 0.2]}, "'lr' has shape \\(2,\\)"),
        ({}, {"weight_decay": [0.0]}, "'lr' is required"),
    ],
)
def test_bad_jobs_and_hparams_are_config_errors(kwargs: dict, hparams: dict, match: str) -> None:
    args = {"arch": {"name": "mlp"}, "task": load_task("digits"), "optimizer": "sgd", "batch_size": 32, "epochs": 2}
    with pytest.raises(ConfigError, match=match):
        job = ChunkJob(**{**args, **kwargs})
        train_population(job, {k: np.asarray(v) for k, v in hparams.items()}, np.array([3]), device="cpu")
