"""Damage to a finished store is found and repaired: per-member checksums, `inspect --verify`, `zoo` reruns and the
readers `train` uses refuse it naming chunks and members, and `zoo --repair` retrains exactly the damaged chunks,
bit-identical to an undamaged build."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import DamagedStoreError
from pipeline.zoo.store import Zoo, verify_store
from pipeline.zoo import build_zoo

runner = CliRunner()

RECIPE = """
name = "integrity"
members = 10
members_per_chunk = 4
seed = 5
epochs = 1
checkpoint_epochs = [0, 1]
[task]
name = "digits"
[arch]
name = "mlp"
hidden = [8]
[hparams]
optimizer = {choice = ["sgd", "adam"]}
activation = {choice = ["relu", "tanh"]}
batch_size = 128
lr = {log_uniform = [1e-3, 1e-1]}
train_fraction = {choice = [0.5, 1.0]}
"""


def store_hash(url: Path) -> str:
    """SHA-256 over every file of a store (path and bytes): equal hashes mean bit-identical stores."""
    h = hashlib.sha256()
    for p in sorted(url.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(url)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    folder = tmp_path_factory.mktemp("integrity")
    recipe = folder / "integrity.toml"
    recipe.write_text(RECIPE)
    ref = folder / "ref.zarr"
    build_zoo(recipe, ref, workers=0, threads=1, device="cpu")
    return recipe, ref, store_hash(ref)


def _chunk(url: Path, array: str, chunk: int) -> Path:
    """The file of member chunk `chunk` of `array` (the first file under c/<chunk>)."""
    return next(p for p in sorted((url / array / "c" / str(chunk)).rglob("*")) if p.is_file()) \
        if (url / array / "c" / str(chunk)).is_dir() else url / array / "c" / str(chunk)


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE: dict[str, tuple[Callable[[Path], None], list[int]]] = {  # name -> (damage, chunks it hits)
    "weight chunk deleted": (lambda u: _chunk(u, "weights/layers.0.weight", 1).unlink(), [1]),
    "weight chunk truncated": (lambda u: _chunk(u, "weights/head.weight", 2).write_bytes(b"\0" * 7), [2]),
    "weight bit flipped": (lambda u: _flip(_chunk(u, "weights/head.bias", 0)), [0]),
    "metric chunk deleted": (lambda u: _chunk(u, "metrics/test_acc", 1).unlink(), [1]),
    "checksum chunk deleted": (lambda u: _chunk(u, "members/checksum", 2).unlink(), [2]),
    "weight array deleted": (lambda u: shutil.rmtree(u / "weights" / "layers.0.bias"), [0, 1, 2]),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damage_is_named_refused_and_repaired_bit_identically(built: tuple[Path, Path, str], kind: str,
                                                              tmp_path: Path) -> None:
    recipe, ref, ref_hash = built
    out = tmp_path / "z.zarr"
    shutil.copytree(ref, out)
    damage, chunks = DAMAGE[kind]
    damage(out)

    report = verify_store(out)
    assert sorted(d.chunk for d in report.damaged) == chunks
    verify = runner.invoke(app, ["inspect", str(out), "--verify"])
    assert verify.exit_code == 1, verify.output
    for c in chunks:
        assert f"chunk {c} (members {4 * c}-" in verify.output
    assert "--repair" in verify.output and "Traceback" not in verify.output

    rerun = runner.invoke(app, ["zoo", str(recipe), "--out", str(out), "--workers", "0", "--no-progress"])
    assert rerun.exit_code == 2, rerun.output
    assert f"chunk {chunks[0]}" in rerun.output and "--repair" in rerun.output and "Traceback" not in rerun.output

    with pytest.raises(DamagedStoreError, match=rf"chunk {chunks[0]} .*--repair"):  # what `unfzoo train` loads
        zoo = Zoo.open(out)
        zoo.read_weights(np.flatnonzero(zoo.status != 0))
        [zoo.metric(n) for n in zoo.metric_names]

    fixed = runner.invoke(app, ["zoo", str(recipe), "--out", str(out), "--workers", "0", "--threads", "1",
                                "--device", "cpu", "--repair", "--no-progress"])
    assert fixed.exit_code == 0, fixed.output
    retrained = sum(min(4, 10 - 4 * c) for c in chunks)
    assert f"{retrained} ({10 - retrained} were already in the store)" in fixed.output
    assert "repaired" in fixed.output and "chunks " + ", ".join(map(str, chunks)) in fixed.output
    assert store_hash(out) == ref_hash
    assert runner.invoke(app, ["inspect", str(out), "--verify"]).exit_code == 0


def test_loader_and_train_data_refuse_a_damaged_chunk(built: tuple[Path, Path, str], tmp_path: Path) -> None:
    from pipeline.predict import TrainConfig, build_data

    _, ref, _ = built
    out = tmp_path / "z.zarr"
    shutil.copytree(ref, out)
    _flip(_chunk(out, "weights/layers.0.weight", 1))
    zoo = Zoo.open(out)
    with pytest.raises(DamagedStoreError, match=r"chunk 1 \(members 4-7\).*weights/layers.0.weight"):
        list(zoo.loader(batch_size=4, max_memory_bytes=0))  # chunk streaming
    with pytest.raises(DamagedStoreError, match="chunk 1"):
        zoo.load()
    with pytest.raises(DamagedStoreError, match="--repair"):
        build_data(Zoo.open(out), TrainConfig(models=("flat",), fractions=(0.6, 0.2, 0.2), epochs=1, device="cpu"))
    assert [w["head.bias"].shape[0] for w, _, _ in Zoo.open(ref).loader(batch_size=40, max_memory_bytes=0)] == [20]


def test_repair_of_an_undamaged_store_changes_nothing(built: tuple[Path, Path, str], tmp_path: Path) -> None:
    recipe, ref, ref_hash = built
    out = tmp_path / "z.zarr"
    shutil.copytree(ref, out)
    report = build_zoo(recipe, out, workers=0, threads=1, device="cpu", repair=True)
    assert report.repaired == [] and report.trained == 0
    assert store_hash(out) == ref_hash


def test_a_store_killed_before_its_splits_still_opens(built: tuple[Path, Path, str], tmp_path: Path) -> None:
    """Split arrays without attributes (a build killed before `write_splits`) or deleted: splits are computed."""
    _, ref, _ = built
    out = tmp_path / "z.zarr"
    shutil.copytree(ref, out)
    expected = Zoo.open(ref).split("config")
    shutil.rmtree(out / "members" / "split_config")
    import json

    meta = json.loads((out / "members" / "split_run" / "zarr.json").read_text())
    meta["attributes"] = {}
    (out / "members" / "split_run" / "zarr.json").write_text(json.dumps(meta))
    zoo = Zoo.open(out)
    assert all(np.array_equal(a, b) for a, b in zip(zoo.split("config").values(), expected.values()))
    assert sum(len(v) for v in zoo.split("run").values()) == 10
    assert runner.invoke(app, ["inspect", str(out), "--verify"]).exit_code == 0


def test_a_deleted_status_array_is_refused_and_repaired(built: tuple[Path, Path, str], tmp_path: Path) -> None:
    recipe, ref, ref_hash = built
    out = tmp_path / "z.zarr"
    shutil.copytree(ref, out)
    shutil.rmtree(out / "members" / "status")
    for args in (["inspect", str(out), "--verify"], ["zoo", str(recipe), "--out", str(out), "--workers", "0"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and "members/status" in result.output and "--repair" in result.output, result.output
    fixed = runner.invoke(app, ["zoo", str(recipe), "--out", str(out), "--workers", "0", "--threads", "1",
                                "--device", "cpu", "--repair", "--no-progress"])
    assert fixed.exit_code == 0, fixed.output
    assert store_hash(out) == ref_hash
