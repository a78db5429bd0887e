"""SIGKILL sweep: a build killed at any of its write phases (store creation, chunk writes, extension, --overwrite,
repair) and run again ends bit-identical to an uninterrupted build.

Kill points are deterministic: `UNFZOO_KILL_AT=name[:n]` makes the process SIGKILL itself at the n-th pass of a
named phase (`pipeline.zoo.store._kill_point`). Each killed build runs in a forked child of this process (modules and task
data already loaded, so a kill point costs well under a second); the rerun runs in this process. UNFZOO_SWEEP=full
adds more kill points (every chunk of every phase).
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import zarr

from pipeline.zoo.store import Zoo
from pipeline.zoo.storelock import lock_path
from pipeline.zoo import build_zoo

RECIPE = """
name = "sweep"
members = 10
members_per_chunk = 4
seed = {seed}
epochs = 1
checkpoint_epochs = [0, 1]
[task]
name = "digits"
[arch]
name = "mlp"
hidden = [8]
[hparams]
optimizer = {{choice = ["sgd", "adam"]}}
activation = {{choice = ["relu", "tanh"]}}
batch_size = 128
lr = {{log_uniform = [1e-3, 1e-1]}}
train_fraction = {{choice = [0.5, 1.0]}}
"""

# (scenario, kill point): "fresh" builds 10 members into an empty path; "extend" grows a 6-member store to 10 with
# --members (the partial chunk is reset and retrained); "overwrite" replaces another recipe's store; "repair"
# retrains a damaged chunk. Every rerun is the plain command (no --overwrite): it must resume, not start over.
POINTS = [
    ("fresh", "create:started"),
    ("fresh", "create:array:3"),
    ("fresh", "create:arrays"),
    ("fresh", "build:created"),
    ("fresh", "write:data:1"),
    ("fresh", "write:checksum:2"),
    ("fresh", "write:status:1"),
    ("fresh", "build:splits"),
    ("extend", "reset"),
    ("extend", "resize:array:4"),
    ("extend", "write:data:1"),
    ("overwrite", "create:moved-aside"),
    ("overwrite", "create:array:2"),
    ("overwrite", "write:status:1"),
    ("repair", "reset"),
    ("repair", "write:checksum:1"),
]
FULL = [
    ("fresh", "write:data:2"), ("fresh", "write:data:3"), ("fresh", "write:checksum:1"), ("fresh", "write:checksum:3"),
    ("fresh", "write:status:2"), ("fresh", "create:array:1"), ("fresh", "create:array:12"),
    ("extend", "resize:array:1"), ("extend", "resize:array:12"), ("extend", "write:status:1"),
    ("extend", "build:splits"), ("overwrite", "create:started"), ("overwrite", "create:arrays"),
    ("overwrite", "write:data:2"), ("repair", "write:data:1"), ("repair", "write:status:1"),
]
if os.environ.get("UNFZOO_SWEEP") == "full":
    POINTS += FULL


def tree(url: str) -> dict[str, object]:
    """Every array's bytes, shape, chunks and attrs, and the root attrs."""
    root = zarr.open_group(url, mode="r", use_consolidated=False)
    out: dict[str, object] = {"attrs": dict(root.attrs)}
    for group in ("weights", "metrics", "hparams", "members"):
        for name, arr in root[group].arrays():
            out[f"{group}/{name}"] = (arr[:].tobytes(), dict(arr.attrs), arr.shape, arr.chunks, str(arr.dtype))
    return out


def _build(recipe: Path, out: Path, **kw: object) -> None:
    build_zoo(recipe, out, workers=0, threads=1, device="cpu", **kw)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The recipe, another recipe, and uninterrupted stores: the 10-member reference, a 6-member one to extend,
    another recipe's store to overwrite."""
    folder = tmp_path_factory.mktemp("sweep")
    recipe, other = folder / "sweep.toml", folder / "other.toml"
    recipe.write_text(RECIPE.format(seed=7))
    other.write_text(RECIPE.format(seed=8))
    _build(recipe, folder / "ref.zarr")
    _build(recipe, folder / "six.zarr", members=6)
    _build(other, folder / "other.zarr")
    return {"folder": folder, "recipe": recipe, "ref": tree(str(folder / "ref.zarr"))}


def _killed(point: str, fn) -> None:
    """Run `fn` in a forked child that SIGKILLs itself at `point`; assert it died there."""
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 3
        try:
            os.environ["UNFZOO_KILL_AT"] = point
            fn()
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + 120
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"child killed at {point} hung")
        time.sleep(0.01)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"{point} never reached (status {status})"


def _damage(url: Path) -> None:
    """Truncate chunk 1 (members 4-7) of the first weight array: a raw chunk, so decoding it fails."""
    chunk = next(p for p in sorted((url / "weights").glob("*/c/1/**/*")) if p.is_file())
    chunk.write_bytes(chunk.read_bytes()[:10])


@pytest.mark.parametrize(("scenario", "point"), POINTS, ids=[f"{s}-{p}" for s, p in POINTS])
def test_killed_build_resumes_bit_identically(sweep: dict[str, object], scenario: str, point: str, tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    folder, recipe = sweep["folder"], sweep["recipe"]
    out = tmp_path / "z.zarr"
    kw: dict[str, object] = {}
    if scenario == "extend":
        shutil.copytree(folder / "six.zarr", out)
        kw = {"members": 10}
    elif scenario == "overwrite":
        shutil.copytree(folder / "other.zarr", out)
    elif scenario == "repair":
        shutil.copytree(folder / "ref.zarr", out)
        _damage(out)
    first = {**kw, "overwrite": scenario == "overwrite", "repair": scenario == "repair"}
    _killed(point, lambda: _build(recipe, out, **first))
    with caplog.at_level("WARNING", logger="pipeline.zoo.storelock"):
        _build(recipe, out, **kw, repair=scenario == "repair")
    assert "stale lock" in caplog.text  # the dead child's lock was taken over, with a message
    got = tree(str(out))
    assert got.keys() == sweep["ref"].keys()
    for key, value in sweep["ref"].items():
        assert got[key] == value, key
    assert Zoo.open(out).verify().ok
    assert not lock_path(str(out)).exists()
    assert not list(tmp_path.glob(".z.zarr.deleting-*"))
    assert (Zoo.open(out).status != 0).all()  # nothing left pending
