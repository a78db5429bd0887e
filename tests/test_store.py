"""The zoo store layer without training: layout, chunk-aligned writes, concurrency, reader, loader and splits."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import ConfigError, StoreError
from pipeline.zoo.splits import assign_split, split_indices
from pipeline.zoo.store import (
    DIVERGED,
    DONE,
    PENDING,
    MemberBlock,
    StoreLayout,
    Zoo,
    create_store,
    read_status,
    resize_store,
    write_members,
    write_splits,
)

SHAPES = {"fc1.weight": (6, 5), "fc1.bias": (6,), "fc2.weight": (3, 6), "fc2.bias": (3,)}
LAYOUT = StoreLayout(
    weight_shapes=SHAPES,
    metric_names=("test_acc", "train_loss"),
    checkpoint_epochs=(0, 1, 3),
    members_per_chunk=4,
    continuous=("lr",),
    categorical={"optimizer": ("sgd", "adam"), "batch_size": (32, 64)},
)


def _block(start: int, m: int, seed: int = 0) -> MemberBlock:
    """Deterministic synthetic data for members [start, start + m)."""
    rng = np.random.default_rng([seed, start])
    weights = {k: rng.standard_normal((m, 3, *s)).astype(np.float32) for k, s in SHAPES.items()}
    diverged = np.zeros(m, bool)
    if start == 4:
        diverged[1] = True
    return MemberBlock(
        weights=weights,
        metrics={"test_acc": rng.random((m, 3)).astype(np.float32), "train_loss": rng.random((m, 3)).astype(np.float32)},
        hparams={
            "lr": rng.random(m),
            "optimizer": np.array(["adam" if start % 8 else "sgd"] * m, dtype=object),
            "batch_size": np.full(m, 32),
        },
        seed=np.arange(start, start + m),
        config=np.arange(start, start + m) // 2,
        diverged=diverged,
        diverged_epoch=np.where(diverged, 1, -1).astype(np.int32),
    )


def _fill(url: str, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    create_store(url, LAYOUT, {"kind": "import", "name": "synthetic", "arch": None}, n)
    ref: dict[str, list[np.ndarray]] = {}
    for start in range(0, n, 4):
        block = _block(start, min(4, n - start), seed)
        write_members(url, start, block)
        for k, v in block.weights.items():
            ref.setdefault(k, []).append(v)
    write_splits(url)
    return {k: np.concatenate(v) for k, v in ref.items()}


@pytest.fixture()
def filled(tmp_path: Path) -> tuple[str, dict[str, np.ndarray]]:
    url = str(tmp_path / "z.zarr")
    return url, _fill(url, 10)


def test_reader_round_trip(filled: tuple[str, dict[str, np.ndarray]]) -> None:
    url, ref = filled
    zoo = Zoo.open(url)
    assert zoo.n_members == 10 and zoo.checkpoint_epochs == (0, 1, 3)
    assert zoo.weight_keys == tuple(SHAPES)
    w = zoo.weights([7, 2, 9], checkpoint=1)
    for k in SHAPES:
        assert w[k].shape == (3, *SHAPES[k])
        np.testing.assert_array_equal(w[k].numpy(), ref[k][[7, 2, 9], 1])
    np.testing.assert_array_equal(zoo.weights(slice(None), -1)["fc2.bias"].numpy(), ref["fc2.bias"][:, 2])
    frame = zoo.members
    assert list(frame["status"]).count("diverged") == 1 and frame.loc[5, "status"] == "diverged"
    assert set(frame["optimizer"]) == {"sgd", "adam"} and frame.loc[4, "optimizer"] == "adam"
    assert {"test_acc@e0", "test_acc@e3", "train_loss@e1", "split", "config", "seed"} <= set(frame.columns)
    assert zoo.metric("test_acc").shape == (10, 3)
    with pytest.raises(StoreError, match="no metric"):
        zoo.metric("nope")


def test_opens_with_plain_zarr_and_xarray(filled: tuple[str, dict[str, np.ndarray]]) -> None:
    import xarray as xr
    import zarr

    url, ref = filled
    root = zarr.open_group(url, mode="r", use_consolidated=False)
    np.testing.assert_array_equal(root["weights/fc1.weight"][:], ref["fc1.weight"])
    assert root["weights/fc1.weight"].metadata.dimension_names[:2] == ("member", "checkpoint")
    ds = xr.open_zarr(url, group="weights", consolidated=False)
    assert ds["fc1.weight"].dims[:2] == ("member", "checkpoint")
    assert list(ds["checkpoint"].values) == [0, 1, 3]
    np.testing.assert_array_equal(ds["fc2.weight"].values, ref["fc2.weight"])
    metrics = xr.open_zarr(url, group="metrics", consolidated=False)
    assert metrics["test_acc"].shape == (10, 3)


def test_memory_url(tmp_path: Path) -> None:
    ref = _fill("memory://unfzoo-test-store", 6)
    zoo = Zoo.open("memory://unfzoo-test-store")
    np.testing.assert_array_equal(zoo.weights([5], 0)["fc1.bias"].numpy(), ref["fc1.bias"][[5], 0])


def test_writes_must_be_whole_chunks(tmp_path: Path) -> None:
    url = str(tmp_path / "z.zarr")
    create_store(url, LAYOUT, {"kind": "import"}, 10)
    with pytest.raises(StoreError, match="whole chunk"):
        write_members(url, 2, _block(2, 4))  # straddles two chunks
    with pytest.raises(StoreError, match="whole chunk"):
        write_members(url, 8, _block(8, 4))  # runs past the end
    write_members(url, 8, _block(8, 2))  # the partial last chunk is whole
    assert (read_status(url)[8:] == DONE).all() and (read_status(url)[:8] == PENDING).all()


def test_resize_then_write_from_a_fresh_handle(tmp_path: Path) -> None:
    url = str(tmp_path / "z.zarr")
    ref = _fill(url, 6)
    resize_store(url, 12)
    write_members(url, 8, _block(8, 4))
    zoo = Zoo.open(url)
    assert zoo.n_members == 12
    np.testing.assert_array_equal(zoo.read_weights(range(6))["fc1.weight"], ref["fc1.weight"])
    np.testing.assert_array_equal(zoo.read_weights([8, 11])["fc2.bias"], _block(8, 4).weights["fc2.bias"][[0, 3]])
    assert list(read_status(url)) == [1, 1, 1, 1, 1, 2, 0, 0, 1, 1, 1, 1]
    assert np.isnan(zoo.read_weights([6])["fc1.bias"]).all()  # pending members read as NaN


def test_torn_status_chunk_reads_as_pending(filled: tuple[str, dict[str, np.ndarray]]) -> None:
    url, _ = filled
    chunk_file = Path(url) / "members" / "status" / "c" / "1"
    chunk_file.write_bytes(chunk_file.read_bytes()[:3])  # what a non-atomic store could leave after a kill
    status = read_status(url)
    assert (status[4:8] == PENDING).all() and (status[:4] == DONE).all()


def _write_chunks(args: tuple[str, list[int]]) -> int:
    url, starts = args
    for start in starts:
        write_members(url, start, _block(start, 4, seed=7))
    return len(starts)


def test_two_processes_writing_concurrently_never_corrupt_a_chunk(tmp_path: Path) -> None:
    url = str(tmp_path / "z.zarr")
    n = 4 * 24
    create_store(url, LAYOUT, {"kind": "import"}, n)
    starts = list(range(0, n, 4))
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        assert sum(pool.map(_write_chunks, [(url, starts[0::2]), (url, starts[1::2])])) == len(starts)
    zoo = Zoo.open(url)
    data = zoo.read_weights()
    for start in starts:
        block = _block(start, 4, seed=7)
        for k in SHAPES:
            np.testing.assert_array_equal(data[k][start : start + 4], block.weights[k])
    assert set(np.unique(read_status(url))) == {DONE, DIVERGED}


@pytest.mark.parametrize("budget", [None, 0], ids=["memory", "chunks"])
def test_loader_visits_every_pair_once_per_epoch(filled: tuple[str, dict[str, np.ndarray]], budget: int | None) -> None:
    url, ref = filled
    zoo = Zoo.open(url)
    members = [0, 1, 2, 5, 6, 9]
    loader = zoo.loader(members, [0, 2], batch_size=4, shuffle=True, seed=3, max_memory_bytes=budget, buffer_chunks=2)
    assert loader.mode == ("memory" if budget is None else "chunks")
    epochs = []
    for _ in range(2):
        pairs = []
        for weights, m, c in loader:
            assert weights["fc1.weight"].shape[1:] == SHAPES["fc1.weight"] and len(m) <= 4
            for k in SHAPES:
                np.testing.assert_array_equal(weights[k].numpy(), ref[k][m.numpy(), c.numpy()])
            pairs += list(zip(m.tolist(), c.tolist()))
        assert sorted(pairs) == sorted((i, j) for i in members for j in (0, 2))
        epochs.append(pairs)
    assert len(loader) == 3 and epochs[0] != epochs[1]
    again = [list(zip(m.tolist(), c.tolist())) for _, m, c in zoo.loader(members, [0, 2], batch_size=4, seed=3, max_memory_bytes=budget, buffer_chunks=2)]
    assert sum(again, []) == epochs[0]  # same seed, same first epoch
    ordered = [m.tolist() for _, m, _ in zoo.loader(members, [0], batch_size=5, shuffle=False, drop_last=True, max_memory_bytes=budget)]
    assert ordered == [[0, 1, 2, 5, 6]]


def test_splits_are_disjoint_exact_and_deterministic(filled: tuple[str, dict[str, np.ndarray]]) -> None:
    url, _ = filled
    zoo = Zoo.open(url)
    for kind in ("run", "config"):
        split = zoo.split(kind)
        allm = np.concatenate(list(split.values()))
        assert sorted(allm.tolist()) == list(range(10)) and len(set(allm.tolist())) == 10
        assert {k: len(v) for k, v in zoo.split(kind, seed=5).items()} == {k: len(v) for k, v in split.items()}
    config = zoo.members["config"].to_numpy()
    for idx in zoo.split("config").values():  # a configuration never sits on two sides
        others = np.setdiff1d(np.arange(10), idx)
        assert not set(config[idx]) & set(config[others])
    assert all(np.array_equal(a, b) for a, b in zip(zoo.split("run").values(), zoo.split("run").values()))
    assert zoo.members["split"].tolist() == [s for i in range(10) for s, idx in zoo.split("run").items() if i in idx]


def test_split_sizes_and_stability() -> None:
    codes = assign_split(np.arange(1000), seed=0, fractions=(0.8, 0.1, 0.1))
    assert [len(v) for v in split_indices(codes).values()] == [800, 100, 100]
    grown = assign_split(np.arange(1100), seed=0)
    assert (grown[:1000] == codes).mean() > 0.9  # extending moves few members across sides
    assert not np.array_equal(assign_split(np.arange(1000), seed=1), codes)
    with pytest.raises(ConfigError, match="summing to 1"):
        assign_split(np.arange(10), fractions=(0.5, 0.2, 0.2))
