"""Tasks: offline, deterministic, fixed splits, fingerprints that follow data and params, clear errors."""

from __future__ import annotations

import gzip
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.zoo import tasks
from pipeline.errors import ConfigError, TaskDataMissingError
from pipeline.zoo.tasks import FASHION_MNIST_DIR, TASK_NAMES, decode_arith, load_task

OFFLINE_TASKS = [n for n in TASK_NAMES if n != "fashion8"]
HAVE_FASHION = Path(FASHION_MNIST_DIR, "train-labels-idx1-ubyte.gz").is_file() or Path(
    FASHION_MNIST_DIR, "train-labels-idx1-ubyte"
).is_file()


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a task tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _rebuild(name: str, **params) -> tasks.Task:
    """Build a task from scratch (bypassing the cache)."""
    for key in [k for k in tasks._CACHE if k[0] == name]:
        del tasks._CACHE[key]
    return load_task(name, **params)


SMALL = {"mnist1d": {"num_samples": 400}}  # generation time grows with the sample count


@pytest.mark.parametrize("name", OFFLINE_TASKS)
def test_task_is_offline_and_deterministic(name: str, no_network) -> None:
    first = load_task(name, **SMALL.get(name, {}))
    again = _rebuild(name, **SMALL.get(name, {}))
    assert again is not first and again.fingerprint == first.fingerprint
    for field in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(first, field), getattr(again, field)), field
    assert len(first.fingerprint) == 64 and first.kind in ("classification", "seq2seq")
    assert first.info["n_train"] == len(first.y_train) > 0 and first.info["n_test"] == len(first.y_test) > 0
    assert load_task(name, **SMALL.get(name, {})) is again  # cached per resolved params


@pytest.mark.parametrize("name", ["digits", "arith", "modadd"])
def test_fingerprint_follows_the_split_seed(name: str) -> None:
    other = load_task(name, seed=7)
    assert other.fingerprint != load_task(name).fingerprint
    assert other.params["seed"] == 7


def test_digits_split_and_scale() -> None:
    t = load_task("digits")
    assert t.x_train.shape == (1437, 1, 8, 8) and t.x_test.shape == (360, 1, 8, 8)
    assert t.x_train.dtype == torch.float32 and t.y_train.dtype == torch.int64
    assert float(t.x_train.min()) == -1.0 and float(t.x_train.max()) == 1.0
    assert torch.bincount(t.y_test).min() >= 30  # stratified: every class in the test set


def test_arith_questions_disjoint_and_answers_right() -> None:
    t = load_task("arith", max_digits=2, n_train=3000, n_test=1000)
    train = {decode_arith(x) for x in t.x_train}
    test = {decode_arith(x) for x in t.x_test}
    assert len(train) == 3000 and len(test) == 1000 and not train & test
    for x, y in zip(t.x_test[:200], t.y_test[:200]):
        a, b = decode_arith(x).rstrip("=").split("+")
        assert decode_arith(y) == f"{int(a) + int(b)}<eos>"
    assert t.info["src_len"] == 6 and t.info["tgt_len"] == 4 and t.info["vocab_size"] == len(tasks.ARITH_TOKENS)
    assert max(int(x) for q in train for x in q.rstrip("=").split("+")) <= 99


def test_modadd_labels() -> None:
    t = load_task("modadd", p=11, train_share=0.8)
    x = torch.cat([t.x_train, t.x_test])
    y = torch.cat([t.y_train, t.y_test])
    assert len(x) == 121 and len(t.y_train) == 97
    assert torch.equal((x[:, 0] + x[:, 1]) % 11, y) and bool((x[:, 2] == 11).all())
    assert len({tuple(r) for r in x.tolist()}) == 121  # every pair once: train and test disjoint


def test_mnist1d_leaves_global_rngs_alone() -> None:
    np.random.seed(123)
    expected = np.random.random(3)
    np.random.seed(123)
    t = _rebuild("mnist1d", num_samples=200)
    assert np.array_equal(np.random.random(3), expected)
    assert t.x_train.shape == (160, 40) and t.x_test.shape == (40, 40)


def _write_idx(path: Path, data: np.ndarray) -> None:
    header = bytes([0, 0, 8, data.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in data.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + data.astype(np.uint8).tobytes())


def test_fashion8_reads_idx_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 10)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    t = load_task("fashion8", data_dir=str(tmp_path), n_train=20, n_test=10)
    assert t.x_train.shape == (20, 1, 8, 8) and t.x_test.shape == (10, 1, 8, 8)
    assert -1.0 <= float(t.x_train.min()) and float(t.x_train.max()) <= 1.0
    assert torch.equal(t.y_test, torch.arange(10))
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in tmp_path.glob("*.gz"):
        (copy / f.name).write_bytes(f.read_bytes())
    moved = load_task("fashion8", data_dir=str(copy), n_train=20, n_test=10)
    assert moved.fingerprint == t.fingerprint  # where the files live is not part of the fingerprint
    assert moved.params["data_dir"] == str(copy)


def test_fashion8_missing_files_say_where_and_how(tmp_path: Path) -> None:
    with pytest.raises(TaskDataMissingError, match="apt-get install dataset-fashion-mnist") as err:
        load_task("fashion8", data_dir=str(tmp_path))
    assert str(tmp_path) in str(err.value)


@pytest.mark.skipif(not HAVE_FASHION, reason=f"Fashion-MNIST IDX files not installed in {FASHION_MNIST_DIR}")
def test_fashion8_real_files() -> None:
    t = load_task("fashion8", n_train=1000, n_test=500)
    assert t.x_train.shape == (1000, 1, 8, 8) and set(t.y_test.tolist()) == set(range(10))


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("cifar", {}, "allowed tasks: digits, arith"),
        ("digits", {"max_digits": 2}, "allowed parameters: seed, test_fraction"),
        ("arith", {"max_digits": 0}, "'max_digits' must be an integer in"),
        ("arith", {"max_digits": 1, "n_train": 95, "n_test": 10}, "distinct questions"),
        ("modadd", {"train_share": 1.5}, "'train_share' must be in"),
        ("digits", {"seed": "zero"}, "'seed' must be an integer"),
    ],
)
def test_bad_names_and_params_are_config_errors(name: str, params: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_task(name, **params)
