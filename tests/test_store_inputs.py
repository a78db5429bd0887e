"""Bad input to `unfzoo zoo` / `inspect` is refused in one line with exit 2 and nothing written; file:// URLs work;
the writer lock refuses a second writer naming it, lets readers through, and takes over a dead writer's lock."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import StoreBusyError, StoreError
from pipeline.zoo.store import StoreLayout, Zoo, check_capacity
from pipeline.zoo.storelock import StoreLock, lock_path
from pipeline.zoo import build_zoo

runner = CliRunner()

RECIPE = """
name = "{name}"
members = {members}
members_per_chunk = 4
seed = 3
epochs = 1
checkpoint_epochs = [0, 1]
[task]
name = "digits"
[arch]
name = "mlp"
hidden = [4]
[hparams]
optimizer = "adam"
activation = "relu"
batch_size = 128
lr = 0.01
train_fraction = 1.0
"""


def _recipe(folder: Path, name: str = "inputs", members: int | str = 4) -> Path:
    path = folder / "r.toml"
    path.write_text(RECIPE.format(name=name, members=members))
    return path


def _zoo(*args: str) -> object:
    return runner.invoke(app, ["zoo", *args, "--workers", "0", "--threads", "1", "--device", "cpu", "--no-progress"])


def _one_line_error(result: object) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A built 4-member store and its recipe."""
    folder = tmp_path_factory.mktemp("inputs")
    recipe = _recipe(folder)
    build_zoo(recipe, folder / "z.zarr", workers=0, threads=1, device="cpu")
    return recipe, folder / "z.zarr"


def test_out_naming_an_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "file.zarr"
    target.write_text("keep me")
    line = _one_line_error(_zoo(str(_recipe(tmp_path)), "--out", str(target)))
    assert str(target) in line and "is a file" in line
    assert target.read_text() == "keep me" and not lock_path(str(target)).exists()
    line = _one_line_error(_zoo(str(_recipe(tmp_path)), "--out", str(target / "inner.zarr")))
    assert "is a file" in line and target.read_text() == "keep me"


def test_non_utf8_recipe(tmp_path: Path) -> None:
    path = tmp_path / "utf16.toml"
    path.write_bytes(RECIPE.format(name="u", members=4).encode("utf-16"))
    line = _one_line_error(_zoo(str(path), "--out", str(tmp_path / "z.zarr")))
    assert "utf16.toml" in line and "UTF-16" in line and "UTF-8" in line
    path.write_bytes(RECIPE.format(name="caf\xe9", members=4).encode("latin-1"))
    assert "not UTF-8" in _one_line_error(_zoo(str(path), "--out", str(tmp_path / "z.zarr")))
    assert not (tmp_path / "z.zarr").exists()


def test_huge_member_counts_are_refused_before_anything_exists(tmp_path: Path) -> None:
    out = tmp_path / "z.zarr"
    line = _one_line_error(_zoo(str(_recipe(tmp_path, members=10**12)), "--out", str(out)))
    assert "'members'" in line and "1000000000000" in line
    line = _one_line_error(_zoo(str(_recipe(tmp_path)), "--out", str(out), "--members", str(10**12)))
    assert "--members" in line
    assert not out.exists() and not lock_path(str(out)).exists()
    big = StoreLayout(weight_shapes={"w": (1000, 1000)}, metric_names=("test_acc",), checkpoint_epochs=(0, 1),
                      members_per_chunk=64)
    with pytest.raises(StoreError, match="free there"):  # 10^7 members x 8 MB: more than any test disk holds
        check_capacity(str(out), big, 10**7)
    assert not out.exists()


def test_scheduler_where_nothing_listens_fails_fast(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "z.zarr"
    t0 = time.monotonic()
    line = _one_line_error(_zoo(str(_recipe(tmp_path)), "--out", str(out), "--scheduler", f"tcp://127.0.0.1:{port}"))
    assert time.monotonic() - t0 < 10
    assert "--scheduler" in line and "no Dask scheduler" in line
    assert "not an address" in _one_line_error(_zoo(str(_recipe(tmp_path)), "--out", str(out), "--scheduler", "nohost"))
    assert not out.exists()


def test_store_attrs_missing_a_key(small: tuple[Path, Path], tmp_path: Path) -> None:
    import shutil

    recipe, built = small
    out = tmp_path / "z.zarr"
    shutil.copytree(built, out)
    meta_file = out / "zarr.json"
    meta = json.loads(meta_file.read_text())
    del meta["attributes"]["unfzoo"]["layout"]
    meta_file.write_text(json.dumps(meta))
    before = sorted(p.name for p in out.rglob("*"))
    for result in (runner.invoke(app, ["inspect", str(out)]), _zoo(str(recipe), "--out", str(out))):
        line = _one_line_error(result)
        assert "'layout'" in line and "damaged" in line
    assert sorted(p.name for p in out.rglob("*")) == before


def test_recipe_names_that_leave_the_zoo_folder(tmp_path: Path) -> None:
    for name in ("../outside", "a/b", "..\\\\x"):
        line = _one_line_error(_zoo(str(_recipe(tmp_path, name=name))))
        assert "'name'" in line and "plain file name" in line
    assert not (tmp_path.parent / "outside.zarr").exists()


def test_file_urls(small: tuple[Path, Path], tmp_path: Path) -> None:
    recipe, built = small
    url = f"file://{tmp_path / 'f.zarr'}"
    first = _zoo(str(recipe), "--out", url)
    assert first.exit_code == 0, first.output
    again = _zoo(str(recipe), "--out", url)
    assert again.exit_code == 0 and "4 of 4 members already in the store" in again.output
    zoo = Zoo.open(url)
    ref = Zoo.open(built)
    assert all(np.array_equal(zoo.read_weights()[k], ref.read_weights()[k]) for k in ref.weight_keys)
    assert runner.invoke(app, ["inspect", url, "--verify"]).exit_code == 0
    assert zarr.open_group(str(tmp_path / "f.zarr"), mode="r", use_consolidated=False).attrs["unfzoo"]["members"] == 4


def test_a_busy_store_refuses_writers_and_serves_readers(small: tuple[Path, Path], tmp_path: Path) -> None:
    import shutil

    recipe, built = small
    out = tmp_path / "z.zarr"
    shutil.copytree(built, out)
    other = tmp_path / "other"
    other.mkdir()
    with StoreLock(str(out)):
        info = json.loads(lock_path(str(out)).read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        for args in ([str(recipe)], [str(_recipe(other, name="other"))], [str(recipe), "--overwrite"]):
            line = _one_line_error(_zoo(*args, "--out", str(out)))
            assert f"pid {os.getpid()}" in line and socket.gethostname() in line
        assert runner.invoke(app, ["inspect", str(out), "--verify"]).exit_code == 0  # readers need no lock
        assert Zoo.open(out).read_weights()["head.bias"].shape[0] == 4
    assert not lock_path(str(out)).exists()
    assert Zoo.open(out).recipe.name == "inputs"  # the --overwrite never happened


def test_a_dead_writers_lock_is_taken_over(small: tuple[Path, Path], tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    recipe, _ = small
    out = tmp_path / "z.zarr"
    lock_path(str(out)).write_text(json.dumps({"pid": 999_999_999, "host": socket.gethostname(), "started": "then"}))
    with caplog.at_level("WARNING", logger="pipeline.zoo.storelock"):
        build_zoo(recipe, out, workers=0, threads=1, device="cpu")
    assert "stale lock of pid 999999999" in caplog.text
    assert not lock_path(str(out)).exists() and Zoo.open(out).n_members == 4


def test_memory_urls_lock_within_the_process(small: tuple[Path, Path]) -> None:
    recipe, _ = small
    with StoreLock("memory://unfzoo-lock-test"), pytest.raises(StoreBusyError, match="another build in this process"):
        build_zoo(recipe, "memory://unfzoo-lock-test", workers=0, threads=1, device="cpu")
    build_zoo(recipe, "memory://unfzoo-lock-test", workers=0, threads=1, device="cpu")
    assert Zoo.open("memory://unfzoo-lock-test").verify().ok


def test_interrupted_creation_is_named_by_readers(tmp_path: Path) -> None:
    root = zarr.open_group(str(tmp_path / "c.zarr"), mode="w",
                           attributes={"unfzoo": {"format": "unfzoo.zoo/1", "state": "creating"}})
    assert root is not None
    line = _one_line_error(runner.invoke(app, ["inspect", str(tmp_path / "c.zarr")]))
    assert "creation of this store was interrupted" in line and "rerun" in line


def test_a_task_never_writes_into_a_store_of_another_recipe(small: tuple[Path, Path], tmp_path: Path) -> None:
    """A chunk task checks the store still holds its recipe's zoo (e.g. replaced while the build ran)."""
    import dataclasses
    import shutil

    from pipeline.errors import StoreMismatchError
    from pipeline.zoo.recipe import load_recipe
    from pipeline.zoo import ChunkTask, plan_zoo, train_chunk

    recipe, built = small
    out = tmp_path / "z.zarr"
    shutil.copytree(built, out)
    plan = plan_zoo(load_recipe(recipe))
    changed = dataclasses.replace(plan.recipe, seed=99)
    before = (out / "weights" / "head.bias" / "c" / "0" / "0" / "0").read_bytes()
    with pytest.raises(StoreMismatchError, match="replaced by another zoo"):
        train_chunk(ChunkTask(str(out), changed, plan.arch, plan.layout, 0, 4, 1, "cpu"))
    assert (out / "weights" / "head.bias" / "c" / "0" / "0" / "0").read_bytes() == before


def test_imports_take_the_writer_lock(tmp_path: Path) -> None:
    """`import checkpoints` and `import small-cnn-zoo` refuse a store another writer holds, naming it, and touch
    nothing (the lock is taken before the source is even read)."""
    src = tmp_path / "src"
    src.mkdir()
    (tmp_path / "m.csv").write_text("file\nnet.pt\n")
    out = tmp_path / "busy.zarr"
    commands = (
        ["import", "checkpoints", str(src), "--arch", '{"name": "mlp", "hidden": [4]}', "--metrics",
         str(tmp_path / "m.csv"), "--out", str(out)],
        ["import", "small-cnn-zoo", str(src), "--out", str(out)],
    )
    with StoreLock(str(out)):
        for args in commands:
            line = _one_line_error(runner.invoke(app, args))
            assert "is being written by" in line and f"pid {os.getpid()}" in line and socket.gethostname() in line
    assert not out.exists() and not lock_path(str(out)).exists()
    for args in commands:  # unlocked, the same commands get as far as the (empty) source folder
        assert "is being written" not in _one_line_error(runner.invoke(app, args))


def test_summaries_print_user_strings_literally(small: tuple[Path, Path], tmp_path: Path) -> None:
    """A store path, zoo name or hyperparameter value holding rich markup is printed as written, not as markup."""
    import shutil

    recipe, built = small
    out = tmp_path / "[bold]z[/bold].zarr"
    shutil.copytree(built, out)
    rerun = _zoo(str(recipe), "--out", str(out))
    assert rerun.exit_code == 0, rerun.output
    assert "[bold]z[/bold].zarr" in rerun.output.replace("\n", "")
    shown = runner.invoke(app, ["inspect", str(out)], env={"COLUMNS": "400"})
    assert shown.exit_code == 0 and "[bold]z[/bold].zarr" in shown.output and '"hidden": [4]' in shown.output
