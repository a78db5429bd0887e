"""Tasks: offline data sets with fixed, seeded train/test splits and a fingerprint recorded with every zoo.

`load_task(name, **params)` returns a `Task` whose tensors live on the CPU. Every task is built from data that needs
no download (scikit-learn's digits, generated arithmetic / MNIST-1D / modular addition, Fashion-MNIST IDX files from
Debian's `dataset-fashion-mnist`). Results are cached per (name, resolved params); treat the tensors as read-only.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import random
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import ConfigError, TaskDataMissingError

__all__ = [
    "TASK_NAMES",
    "TASK_DEFAULTS",
    "ARITH_TOKENS",
    "FASHION_MNIST_DIR",
    "Task",
    "load_task",
    "decode_arith",
]

TASK_NAMES: tuple[str, ...] = ("digits", "arith", "mnist1d", "fashion8", "modadd")

# Where Debian's `dataset-fashion-mnist` package installs the (gzipped) IDX files.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

# Default parameters of each task; `load_task` accepts exactly these keys.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"seed": 0, "test_fraction": 0.2},
    "arith": {"max_digits": 2, "n_train": 4000, "n_test": 1000, "seed": 0},
    "mnist1d": {"seed": 42, "num_samples": 5000, "train_split": 0.8},
    "fashion8": {"data_dir": FASHION_MNIST_DIR, "n_train": 60000, "n_test": 10000, "seed": 0},
    "modadd": {"p": 23, "train_share": 0.5, "seed": 0},
}
# Params that say where data lives, not what it is: kept in `params`, left out of the fingerprint.
_LOCATION_PARAMS = frozenset({"data_dir"})

# arith vocabulary: id 0 pads, then digits, operators, end and start of the answer.
ARITH_TOKENS: tuple[str, ...] = ("<pad>", *"0123456789", "+", "=", "<eos>", "<bos>")
_ARITH_ID = {tok: i for i, tok in enumerate(ARITH_TOKENS)}


@dataclass(frozen=True, eq=False)
class Task:
    """A data set with a fixed split. `kind` is "classification" or "seq2seq"; `info` holds the dims members need."""

    name: str
    kind: str
    params: dict
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    info: dict
    fingerprint: str

    def __repr__(self) -> str:
        return (
            f"Task({self.name!r}, kind={self.kind!r}, params={self.params}, train={tuple(self.x_train.shape)}, "
            f"test={tuple(self.x_test.shape)}, fingerprint={self.fingerprint[:12]}...)"
        )


_CACHE: dict[tuple[str, str], Task] = {}
_CACHE_LOCK = threading.Lock()
_GLOBAL_RNG_LOCK = threading.Lock()  # mnist1d seeds the global numpy / random generators: restore them under a lock


def load_task(name: str, **params: Any) -> Task:
    """Build (or fetch from the cache) task `name` with `params` over its defaults (see TASK_DEFAULTS).

    Raises ConfigError for an unknown task, parameter or value and TaskDataMissingError when data files are absent.
    """
    if name not in TASK_DEFAULTS:
        raise ConfigError(f"unknown task {name!r}; allowed tasks: {', '.join(TASK_NAMES)}")
    defaults = TASK_DEFAULTS[name]
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ConfigError(
            f"task {name!r} has no parameter {unknown[0]!r}; allowed parameters: {', '.join(sorted(defaults))}"
        )
    resolved = _check_params(name, {**defaults, **params})
    key = (name, json.dumps(resolved, sort_keys=True))
    with _CACHE_LOCK:
        cached = _CACHE.get(key)
    if cached is not None:
        return cached
    kind, arrays, info = _BUILDERS[name](resolved)
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    info = {**info, "n_train": int(len(arrays["y_train"])), "n_test": int(len(arrays["y_test"]))}
    task = Task(
        name=name,
        kind=kind,
        params=resolved,
        x_train=torch.from_numpy(arrays["x_train"]),
        y_train=torch.from_numpy(arrays["y_train"]),
        x_test=torch.from_numpy(arrays["x_test"]),
        y_test=torch.from_numpy(arrays["y_test"]),
        info=info,
        fingerprint=_fingerprint(name, resolved, arrays),
    )
    with _CACHE_LOCK:
        return _CACHE.setdefault(key, task)


def decode_arith(tokens: torch.Tensor | np.ndarray) -> str:
    """Readable text of one arith token sequence (padding dropped), e.g. '12+5=' or '17<eos>'."""
    return "".join(ARITH_TOKENS[int(t)] for t in np.asarray(tokens).ravel() if int(t) != _ARITH_ID["<pad>"])


# ---------------------------------------------------------------------------------------------------- validation


def _check_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """Type- and range-check resolved params; returns a JSON-able copy."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        where = f"task {name!r} parameter {key!r}"
        default = TASK_DEFAULTS[name][key]
        if isinstance(default, str):
            if not isinstance(value, (str, Path)):
                raise ConfigError(f"{where} must be a path string; got {value!r}")
            out[key] = str(value)
        elif isinstance(default, bool) or not isinstance(default, (int, float)):
            out[key] = value
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ConfigError(f"{where} must be an integer; got {value!r}")
            out[key] = int(value)
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(value):
                raise ConfigError(f"{where} must be a finite number; got {value!r}")
            out[key] = float(value)
    _check_ranges(name, out)
    return out


def _require(cond: bool, name: str, key: str, what: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"task {name!r} parameter {key!r} must be {what}; got {value!r}")


def _check_ranges(name: str, p: dict[str, Any]) -> None:
    if "seed" in p:
        _require(p["seed"] >= 0, name, "seed", "a non-negative integer", p["seed"])
    if name == "digits":
        _require(0.0 < p["test_fraction"] < 1.0, name, "test_fraction", "in (0, 1)", p["test_fraction"])
    elif name == "arith":
        k = p["max_digits"]
        _require(1 <= k <= 9, name, "max_digits", "an integer in [1, 9]", k)
        _require(p["n_train"] >= 1, name, "n_train", ">= 1", p["n_train"])
        _require(p["n_test"] >= 1, name, "n_test", ">= 1", p["n_test"])
        total = 10 ** (2 * k)
        _require(
            p["n_train"] + p["n_test"] <= total,
            name,
            "n_train",
            f"at most {total} - n_test (there are {total} distinct questions with up to {k} digits)",
            p["n_train"],
        )
    elif name == "mnist1d":
        _require(p["num_samples"] >= 20, name, "num_samples", ">= 20", p["num_samples"])
        _require(0.0 < p["train_split"] < 1.0, name, "train_split", "in (0, 1)", p["train_split"])
    elif name == "fashion8":
        _require(1 <= p["n_train"] <= 60000, name, "n_train", "in [1, 60000]", p["n_train"])
        _require(1 <= p["n_test"] <= 10000, name, "n_test", "in [1, 10000]", p["n_test"])
    elif name == "modadd":
        _require(2 <= p["p"] <= 1000, name, "p", "an integer in [2, 1000]", p["p"])
        _require(0.0 < p["train_share"] < 1.0, name, "train_share", "in (0, 1)", p["train_share"])


def _fingerprint(name: str, params: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over the task name, its params (location params excluded) and every array's dtype, shape and bytes."""
    h = hashlib.sha256()
    what = {k: v for k, v in params.items() if k not in _LOCATION_PARAMS}
    h.update(json.dumps({"task": name, "params": what}, sort_keys=True).encode())
    for key in sorted(arrays):
        arr = arrays[key]
        h.update(f"{key}:{arr.dtype.str}:{arr.shape}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------------ builders

_Built = tuple[str, dict[str, np.ndarray], dict[str, Any]]


def _to_unit_range(x: np.ndarray, top: float) -> np.ndarray:
    """Scale values in [0, top] to float32 in [-1, 1]."""
    return (x.astype(np.float32) * np.float32(2.0 / top) - np.float32(1.0)).astype(np.float32)


def _build_digits(p: dict[str, Any]) -> _Built:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = _to_unit_range(data.images, 16.0)[:, None]  # (1797, 1, 8, 8)
    y = data.target.astype(np.int64)
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=p["test_fraction"], random_state=p["seed"], stratify=y
    )
    arrays = {"x_train": x[idx_train], "y_train": y[idx_train], "x_test": x[idx_test], "y_test": y[idx_test]}
    return "classification", arrays, {"input": "real", "input_shape": [1, 8, 8], "num_classes": 10}


def _sample_questions(k: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """n distinct question indices a * 10^k + b, in random order."""
    total = 10 ** (2 * k)
    if total <= 4_000_000:
        return rng.choice(total, size=n, replace=False)
    seen: dict[int, None] = {}
    while len(seen) < n:
        for q in rng.integers(0, total, size=2 * (n - len(seen)) + 16).tolist():
            seen.setdefault(q)
            if len(seen) == n:
                break
    return np.fromiter(seen, dtype=np.int64, count=n)


def _encode_arith(a: np.ndarray, b: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded token arrays: sources "a+b=" (n, 2k+2) and answers "a+b<eos>" (n, k+2)."""
    src = np.zeros((len(a), 2 * k + 2), dtype=np.int64)
    tgt = np.zeros((len(a), k + 2), dtype=np.int64)
    for i, (ai, bi) in enumerate(zip(a.tolist(), b.tolist())):
        s = [_ARITH_ID[c] for c in f"{ai}+{bi}="]
        t = [_ARITH_ID[c] for c in str(ai + bi)] + [_ARITH_ID["<eos>"]]
        src[i, : len(s)] = s
        tgt[i, : len(t)] = t
    return src, tgt


def _build_arith(p: dict[str, Any]) -> _Built:
    k = p["max_digits"]
    rng = np.random.default_rng(np.random.SeedSequence([p["seed"], 0xA417]))
    q = _sample_questions(k, p["n_train"] + p["n_test"], rng)  # distinct, so train and test are disjoint
    a, b = np.divmod(q, 10**k)
    src, tgt = _encode_arith(a, b, k)
    n = p["n_train"]
    arrays = {"x_train": src[:n], "y_train": tgt[:n], "x_test": src[n:], "y_test": tgt[n:]}
    info = {
        "input": "tokens",
        "max_digits": k,
        "vocab_size": len(ARITH_TOKENS),
        "src_len": 2 * k + 2,
        "tgt_len": k + 2,
        "pad_id": _ARITH_ID["<pad>"],
        "bos_id": _ARITH_ID["<bos>"],
        "eos_id": _ARITH_ID["<eos>"],
        "tokens": list(ARITH_TOKENS),
    }
    return "seq2seq", arrays, info


def _build_mnist1d(p: dict[str, Any]) -> _Built:
    from pipeline.extras import require

    require("mnist1d", extra="mnist1d", feature="the mnist1d task")
    from mnist1d.data import get_dataset_args, make_dataset  # never get_dataset: it tries the network

    args = get_dataset_args()
    args.seed, args.num_samples, args.train_split = p["seed"], p["num_samples"], p["train_split"]
    with _GLOBAL_RNG_LOCK:  # make_dataset seeds numpy's and Python's global generators: leave them as they were
        np_state, py_state = np.random.get_state(), random.getstate()
        try:
            data = make_dataset(args)
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
    length = int(args.final_seq_length)
    arrays = {
        "x_train": np.asarray(data["x"], dtype=np.float32),
        "y_train": np.asarray(data["y"], dtype=np.int64),
        "x_test": np.asarray(data["x_test"], dtype=np.float32),
        "y_test": np.asarray(data["y_test"], dtype=np.int64),
    }
    return "classification", arrays, {"input": "real", "input_shape": [length], "num_classes": 10}


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a uint8 array."""
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise TaskDataMissingError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise TaskDataMissingError(f"{path} is truncated: header says {dims}, found {data.size} values")
    return data.reshape(dims)


def _find_idx(directory: Path, stem: str) -> Path:
    for name in (stem, f"{stem}.gz"):
        if (directory / name).is_file():
            return directory / name
    raise TaskDataMissingError(
        f"task 'fashion8' looked for {stem}[.gz] in {directory} and found nothing; install the data with "
        f"`apt-get install dataset-fashion-mnist` (files go to {FASHION_MNIST_DIR}) or pass data_dir=<folder with "
        "the four Fashion-MNIST IDX files>"
    )


def _build_fashion8(p: dict[str, Any]) -> _Built:
    directory = Path(p["data_dir"]).expanduser()
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(_find_idx(directory, f"{prefix}-images-idx3-ubyte"))
        labels = _read_idx(_find_idx(directory, f"{prefix}-labels-idx1-ubyte"))
        n = p[f"n_{split}"]
        if n > len(labels):
            raise ConfigError(f"task 'fashion8' parameter 'n_{split}' is {n} but the {split} files hold {len(labels)}")
        rng = np.random.default_rng(np.random.SeedSequence([p["seed"], 0xFA5, 0 if split == "train" else 1]))
        pick = np.sort(rng.choice(len(labels), size=n, replace=False)) if n < len(labels) else np.arange(n)
        small = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(images[pick].astype(np.float32))[:, None], 8)
        parts[f"x_{split}"] = _to_unit_range(small.numpy(), 255.0)  # (n, 1, 8, 8)
        parts[f"y_{split}"] = labels[pick].astype(np.int64)
    return "classification", parts, {"input": "real", "input_shape": [1, 8, 8], "num_classes": 10}


def _build_modadd(p: dict[str, Any]) -> _Built:
    mod = p["p"]
    a, b = np.divmod(np.arange(mod * mod, dtype=np.int64), mod)
    x = np.stack([a, b, np.full_like(a, mod)], axis=1)  # tokens "a b =", with id p meaning "="
    y = (a + b) % mod
    rng = np.random.default_rng(np.random.SeedSequence([p["seed"], 0x30DADD]))
    order = rng.permutation(mod * mod)
    n_train = max(1, min(mod * mod - 1, round(p["train_share"] * mod * mod)))
    tr, te = order[:n_train], order[n_train:]
    arrays = {"x_train": x[tr], "y_train": y[tr], "x_test": x[te], "y_test": y[te]}
    info = {"input": "tokens", "input_shape": [3], "seq_len": 3, "vocab_size": mod + 1, "num_classes": mod}
    return "classification", arrays, info


_BUILDERS: dict[str, Callable[[dict[str, Any]], _Built]] = {
    "digits": _build_digits,
    "arith": _build_arith,
    "mnist1d": _build_mnist1d,
    "fashion8": _build_fashion8,
    "modadd": _build_modadd,
}
