"""The store as xarray sees it: dims named from the spec labels, member/checkpoint coordinates, categorical codes with
CF flags, `Zoo.to_xarray()` with real values; stores of layout version 1 still open and migrate in place."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import MissingExtraError
from pipeline.zoo.store import COORD_GROUPS, STORE_VERSION, Zoo, _set_dimension_names, migrate_store, weight_dims
from pipeline.zoo import build_zoo

runner = CliRunner()

RECIPE = """
name = "xa"
members = 6
members_per_chunk = 4
seed = 3
epochs = 1
checkpoint_epochs = [0, 1]
[task]
name = "digits"
[arch]
name = "cnn"
channels = [4, 4]
[hparams]
optimizer = {choice = ["adam", "sgd"]}
activation = "relu"
batch_size = {choice = [64, 128]}
lr = 0.01
train_fraction = 1.0
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 6-member CNN zoo (two chunks, the second partial) and its recipe."""
    folder = tmp_path_factory.mktemp("xa")
    recipe = folder / "xa.toml"
    recipe.write_text(RECIPE)
    build_zoo(recipe, folder / "z.zarr", workers=0, threads=1, device="cpu")
    return recipe, folder / "z.zarr"


def _open(path: Path, group: str) -> xr.Dataset:
    return xr.open_zarr(str(path), group=group, consolidated=False)


def _decode_flags(var: xr.DataArray) -> list[str]:
    """What a CF-aware reader shows for flag codes."""
    meanings = dict(zip(var.attrs["flag_values"], var.attrs["flag_meanings"].split()))
    return [meanings[int(c)] for c in var.values]


def test_open_zarr_names_dims_from_the_spec_and_has_coordinates(built: tuple[Path, Path]) -> None:
    _, path = built
    zoo = Zoo.open(path)
    spec = zoo.spec
    ds = _open(path, "weights")
    for key, shape in zoo.weight_shapes.items():
        dims = ds[key].dims
        assert dims[:2] == ("member", "checkpoint")
        labels = spec[key].axes  # single-part tensors: one label per natural dim here
        assert dims[2:] == labels, key
        assert ds[key].shape[2:] == shape
    # tied axes share a dim: conv 1's output channels are conv 2's input channels and the head reads conv 2's output
    assert ds["convs.0.weight"].dims[2] == ds["convs.1.weight"].dims[3] == ds["convs.0.bias"].dims[2]
    assert ds["head.weight"].dims[3] == ds["convs.1.weight"].dims[2]
    assert not any(d.startswith(f"{key}.") for d in ds.dims for key in zoo.weight_keys)  # no fallback `KEY.0` names
    assert list(ds["member"].values) == list(range(6))
    assert list(ds["checkpoint"].values) == [0, 1]
    np.testing.assert_array_equal(ds["head.weight"].values, zoo.read_weights()["head.weight"])
    np.testing.assert_array_equal(ds["convs.1.weight"].sel(member=5, checkpoint=1).values,
                                  zoo.weights([5], epoch=1)["convs.1.weight"][0].numpy())
    for group in ("metrics", "hparams", "members"):
        assert list(_open(path, group)["member"].values) == list(range(6)), group
    assert list(_open(path, "metrics")["checkpoint"].values) == [0, 1]


def test_open_zarr_categoricals_and_status_carry_cf_flags(built: tuple[Path, Path]) -> None:
    _, path = built
    zoo = Zoo.open(path)
    hp = _open(path, "hparams")
    assert hp["optimizer"].attrs["flag_meanings"] == "adam sgd" and hp["optimizer"].attrs["flag_values"] == [0, 1]
    assert _decode_flags(hp["optimizer"]) == list(zoo.hparam("optimizer"))
    assert _decode_flags(hp["batch_size"]) == [str(v) for v in zoo.hparam("batch_size")]
    members = _open(path, "members")
    assert members["status"].attrs["flag_meanings"] == "pending done diverged"
    assert set(_decode_flags(members["status"])) <= {"done", "diverged"}
    assert _decode_flags(members["split_run"]) == list(zoo.members["split"])


def test_to_xarray_shows_values(built: tuple[Path, Path]) -> None:
    _, path = built
    zoo = Zoo.open(path)
    ds = zoo.to_xarray()
    assert isinstance(ds, xr.Dataset)
    assert list(ds["member"].values) == list(range(6)) and list(ds["checkpoint"].values) == [0, 1]
    assert ds["optimizer"].dtype.kind == "U" and list(ds["optimizer"].values) == list(zoo.hparam("optimizer"))
    assert ds["batch_size"].dtype.kind == "i" and set(ds["batch_size"].values) <= {64, 128}
    assert list(ds["batch_size"].values) == list(zoo.hparam("batch_size"))
    np.testing.assert_array_equal(ds["lr"].values, zoo.hparam("lr"))
    assert list(ds["status"].values) == ["done" if s == 1 else "diverged" for s in zoo.status]
    assert list(ds["split"].values) == list(zoo.members["split"])
    np.testing.assert_array_equal(ds["test_acc"].sel(checkpoint=1).values, zoo.metric("test_acc")[:, 1])
    for key, value in zoo.read_weights().items():
        assert ds[key].dims == _open(path, "weights")[key].dims
        np.testing.assert_array_equal(ds[key].values, value)
    assert ds.attrs["name"] == "xa" and ds.attrs["task"] == "digits"
    small = zoo.to_xarray(weights=False)
    assert "head.weight" not in small and "test_acc" in small and small.sizes == {"member": 6, "checkpoint": 2}


def test_weight_dims_keep_repeated_or_reserved_labels_distinct() -> None:
    from unf_models import WeightSpec

    spec = WeightSpec({"w": ("h", "h"), "m": ("member", "h"), "b": ("h",)}, shapes={"w": (3, 3), "m": (2, 3), "b": (3,)},
                      fixed=("member",))
    dims = weight_dims({"w": (3, 3), "m": (2, 3), "b": (3,), "other": (5,)}, spec)
    assert dims == {"w": ("h", "w:h"), "m": ("m:member", "h"), "b": ("h",), "other": ("other.0",)}
    assert weight_dims({"w": (4, 3)}, spec) == {"w": ("w.0", "w.1")}  # a shape the spec does not describe
    assert weight_dims({"w": (3, 3)}, None) == {"w": ("w.0", "w.1")}


def _make_version_1(path: Path) -> None:
    """Turn a fresh store into what unfzoo wrote before STORE_VERSION 2 (the data stays as it is)."""
    root = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    meta = dict(root.attrs["unfzoo"])
    meta.pop("store_version")
    layout = meta["layout"]
    for key, shape in layout["weight_shapes"].items():
        _set_dimension_names(root, f"weights/{key}", ("member", "checkpoint", *(f"{key}.{i}" for i in range(len(shape)))))
    for name in [*layout["categorical"], "../members/status", "../members/split_run", "../members/split_config"]:
        arr = root[f"hparams/{name}".replace("hparams/../", "")]
        arr.attrs.put({k: v for k, v in arr.attrs.asdict().items() if not k.startswith("flag_")})
    for group in COORD_GROUPS:
        shutil.rmtree(path / group / "member")
    root.attrs["unfzoo"] = meta


def _array_metadata(path: Path) -> dict[str, dict]:
    return {str(p.relative_to(path)): json.loads(p.read_text()) for p in sorted(path.rglob("zarr.json"))}


def test_a_version_1_store_reads_and_migrates_in_place(built: tuple[Path, Path], tmp_path: Path) -> None:
    _, path = built
    old = tmp_path / "old.zarr"
    shutil.copytree(path, old)
    _make_version_1(old)
    assert _open(old, "weights")["head.weight"].dims[2:] == ("head.weight.0", "head.weight.1")
    # readers need no migration: Zoo and to_xarray show the same as for a current store
    xr.testing.assert_equal(Zoo.open(old).to_xarray(), Zoo.open(path).to_xarray())
    shown = runner.invoke(app, ["inspect", str(old)])
    assert shown.exit_code == 0 and "layout version 1" in shown.output and "--migrate" in shown.output
    migrated = runner.invoke(app, ["inspect", str(old), "--migrate"])
    assert migrated.exit_code == 0, migrated.output
    assert f"upgraded to layout version {STORE_VERSION}" in migrated.output and "layout version 1" not in migrated.output
    assert _array_metadata(old) == _array_metadata(path)  # every zarr.json as a fresh build writes it
    np.testing.assert_array_equal(_open(old, "hparams")["member"].values, np.arange(6))
    assert "nothing to do" in runner.invoke(app, ["inspect", str(old), "--migrate"]).output
    assert Zoo.open(old).verify().ok


def test_a_zoo_rerun_migrates_a_version_1_store(built: tuple[Path, Path], tmp_path: Path) -> None:
    recipe, path = built
    old = tmp_path / "old.zarr"
    shutil.copytree(path, old)
    _make_version_1(old)
    assert migrate_store(old) is True and migrate_store(old) is False
    _make_version_1(old)
    report = build_zoo(recipe, old, workers=0, threads=1, device="cpu")
    assert report.trained == 0
    assert _array_metadata(old) == _array_metadata(path)


def test_to_xarray_without_xarray_names_the_extra(built: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "xarray", None)  # import xarray now raises ImportError
    with pytest.raises(MissingExtraError, match=r"unfzoo\[xarray\]"):
        Zoo.open(built[1]).to_xarray()
