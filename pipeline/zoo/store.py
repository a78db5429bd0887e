"""The zoo store: one zarr v3 group per zoo, written chunk-aligned by many workers, read back through `Zoo`.

Layout (N members, C checkpoints, chunks of K members along the member axis everywhere):

    /                       attrs["unfzoo"]: recipe text, arch, task, spec, checkpoint epochs, layout, version
    weights/<state key>     float32 (member, checkpoint, *shape), uncompressed, fill NaN; the weight dimensions
                            are named after the spec's axis labels (`weight_dims`)
    weights/checkpoint      int32 (checkpoint,) epoch of each checkpoint (an xarray coordinate)
    <group>/member          int64 (member,) 0..N-1 in weights, metrics, hparams and members (xarray coordinate)
    metrics/<name>          float32 (member, checkpoint), fill NaN; metrics/checkpoint as above
    hparams/<name>          float64 (member,) or int16 codes with attrs["categories"] and CF flag_values /
                            flag_meanings (fill -1)
    members/status          int8 (member,) 0 pending, 1 done, 2 diverged (CF flags); written last by each task
    members/checksum        uint32 (member, array): CRC-32 of each member's row of each array the task writes
                            (attrs["arrays"] names the columns); written after the data, before the status
    members/seed, config, diverged_epoch, split_run, split_config

attrs["unfzoo"]["store_version"] is STORE_VERSION; stores without it (version 1: weight dimensions named
`key.0`, no member coordinates, no flag attributes) read as before, and `migrate_store` upgrades their metadata in
place (a `unfzoo zoo` rerun does it; `unfzoo inspect STORE --migrate` for imported zoos).

The root attrs carry "state": "creating" from the first write of a new store until every array exists; a store in
that state holds nothing trained, so a rerun simply creates it again. A writer holds the store's lock
(`pipeline.zoo.storelock`) for the whole build.

Rules that keep zarr 3.1 from losing data: only the coordinator creates or resizes arrays,
before any task runs; a task reopens the group (never consolidated metadata), writes whole chunks it alone owns, and
writes `members/status` after everything else, so a chunk counts as done only once its data is in the store.
"""

from __future__ import annotations

import json
import os
import signal
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import DamagedStoreError, StoreError
from pipeline.zoo.splits import DEFAULT_FRACTIONS, SPLIT_KINDS, assign_split, check_fractions, split_indices

if TYPE_CHECKING:  # heavy imports only for type checkers
    import pandas as pd
    import torch
    import zarr

    from pipeline.zoo.loader import ZooLoader
    from pipeline.zoo.recipe import Recipe

__all__ = [
    "FORMAT",
    "STATUS_NAMES",
    "PENDING",
    "DONE",
    "DIVERGED",
    "StoreLayout",
    "MemberBlock",
    "open_group",
    "store_exists",
    "create_store",
    "resize_store",
    "reset_members",
    "write_members",
    "read_status",
    "read_arrays",
    "read_blocks",
    "write_splits",
    "store_size",
    "normalize_url",
    "read_meta",
    "check_capacity",
    "Damage",
    "verify_store",
    "recreate_missing_arrays",
    "MAX_MEMBERS",
    "STORE_VERSION",
    "weight_dims",
    "migrate_store",
    "Zoo",
]

FORMAT = "unfzoo.zoo/1"
STORE_VERSION = 2  # 2: weight dims named from the spec, member coordinates, CF flags; 1 (no key): before that
COORD_GROUPS = ("weights", "metrics", "hparams", "members")  # each holds a `member` coordinate array
MAX_MEMBERS = 100_000_000  # the coordinator holds a few bytes per member in memory; far above any real zoo
CHECKSUM = "members/checksum"
STATUS_NAMES = ("pending", "done", "diverged")
PENDING, DONE, DIVERGED = 0, 1, 2
_MEMBER_ARRAYS = {  # name -> (dtype, fill value)
    "status": ("int8", PENDING),
    "seed": ("int64", -1),
    "config": ("int64", -1),
    "diverged_epoch": ("int32", -1),
    "split_run": ("int8", -1),
    "split_config": ("int8", -1),
}


@dataclass(frozen=True)
class StoreLayout:
    """The arrays of a zoo: weight shapes (state-dict order), metric names, hyperparameter columns."""

    weight_shapes: Mapping[str, tuple[int, ...]]
    metric_names: tuple[str, ...]
    checkpoint_epochs: tuple[int, ...]
    members_per_chunk: int
    continuous: tuple[str, ...] = ()
    categorical: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)  # name -> categories

    def to_json(self) -> dict[str, Any]:
        """JSON-able form stored in the group attributes."""
        return {
            "weight_shapes": {k: list(v) for k, v in self.weight_shapes.items()},
            "metric_names": list(self.metric_names),
            "checkpoint_epochs": list(self.checkpoint_epochs),
            "members_per_chunk": self.members_per_chunk,
            "continuous": list(self.continuous),
            "categorical": {k: list(v) for k, v in self.categorical.items()},
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> StoreLayout:
        """Inverse of `to_json`."""
        return cls(
            weight_shapes={k: tuple(v) for k, v in d["weight_shapes"].items()},
            metric_names=tuple(d["metric_names"]),
            checkpoint_epochs=tuple(d["checkpoint_epochs"]),
            members_per_chunk=int(d["members_per_chunk"]),
            continuous=tuple(d.get("continuous", ())),
            categorical={k: tuple(v) for k, v in d.get("categorical", {}).items()},
        )

    @property
    def n_checkpoints(self) -> int:
        return len(self.checkpoint_epochs)


@dataclass
class MemberBlock:
    """What one task writes: a whole chunk of consecutive members (m of them), C checkpoints."""

    weights: dict[str, np.ndarray]  # key -> (m, C, *shape) float32
    metrics: dict[str, np.ndarray]  # name -> (m, C) float32
    hparams: dict[str, np.ndarray]  # name -> (m,) values (categoricals as raw values)
    seed: np.ndarray  # (m,) int64
    config: np.ndarray  # (m,) int64
    diverged: np.ndarray  # (m,) bool
    diverged_epoch: np.ndarray  # (m,) int32, -1 when finite throughout

    def __len__(self) -> int:
        return len(self.seed)


_KILL_COUNTS: dict[str, int] = {}


def _kill_point(name: str) -> None:
    """Fault injection for the crash-safety tests: UNFZOO_KILL_AT=name[:n] SIGKILLs this process at the n-th pass."""
    spec = os.environ.get("UNFZOO_KILL_AT")
    if not spec:
        return
    target, _, count = spec.rpartition(":")
    if not count.isdigit():
        target, count = spec, "1"
    if target != name:
        return
    _KILL_COUNTS[name] = _KILL_COUNTS.get(name, 0) + 1
    if _KILL_COUNTS[name] >= int(count):
        os.kill(os.getpid(), signal.SIGKILL)


def normalize_url(url: str | os.PathLike[str]) -> str:
    """A local path for `file://` URLs (zarr's fsspec route for them cannot create stores); other URLs unchanged."""
    url = str(url)
    if url.startswith("file://"):
        rest = url[len("file://"):]
        return rest[len("localhost"):] if rest.startswith("localhost/") else rest
    return url


def _is_local(url: str) -> bool:
    return "://" not in str(url) or str(url).startswith("file://")


def _local_path(url: str) -> Path:
    return Path(normalize_url(url))


def open_group(url: str | os.PathLike[str], mode: str = "r") -> zarr.Group:
    """Open the zoo group at a path or fsspec URL, always bypassing consolidated metadata."""
    import zarr

    url = normalize_url(url)
    if mode == "r" and _is_local(url) and not (_local_path(url) / "zarr.json").is_file():
        raise StoreError(f"{url} is not a zoo store (no zarr.json there); build one with `unfzoo zoo RECIPE --out {url}`")
    try:
        return zarr.open_group(url, mode=mode, use_consolidated=False)
    except (FileNotFoundError, KeyError, ValueError, zarr.errors.GroupNotFoundError) as err:
        raise StoreError(f"cannot open zoo store {url}: {err}") from err


def store_exists(url: str | os.PathLike[str]) -> bool:
    """True when a zarr group (of any kind) is at `url`."""
    import zarr

    url = normalize_url(url)
    if _is_local(url):
        return (_local_path(url) / "zarr.json").is_file()
    try:
        zarr.open_group(url, mode="r", use_consolidated=False)
    except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError):
        return False
    return True


def check_capacity(url: str | os.PathLike[str], layout: StoreLayout, members: int, existing: int = 0) -> None:
    """Refuse, before anything is written, a member count the coordinator cannot hold or the disk cannot store."""
    if not 1 <= members <= MAX_MEMBERS:
        raise StoreError(f"a zoo of {members} members is out of range: use 1 to {MAX_MEMBERS} members")
    url = normalize_url(url)
    if not _is_local(url):
        return
    import shutil

    per_member = layout.n_checkpoints * 4 * (sum(int(np.prod(s)) for s in layout.weight_shapes.values())
                                             + len(layout.metric_names))
    need = per_member * max(0, members - existing)
    folder = _local_path(url).absolute()
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if need > free:
        raise StoreError(
            f"{members} members need about {_human_bytes(need)} at {url}, but only {_human_bytes(free)} is free "
            "there; use fewer members (--members or the recipe's 'members') or another --out"
        )


def _check_target(url: str) -> None:
    """Refuse a local target that is a file, or a non-empty folder that is not a zarr store."""
    if not _is_local(url):
        return
    path = _local_path(url)
    if path.exists() and not path.is_dir():
        raise StoreError(f"{path} is a file, not a zoo store; choose another --out")
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise StoreError(f"{parent} is a file, so {path} cannot be created there; choose another --out")
    if path.is_dir() and any(path.iterdir()) and not (path / "zarr.json").is_file():
        raise StoreError(f"{path} exists, is not empty and is not a zarr store; refusing to replace it")


def _clear(url: str) -> None:
    """Delete the store at `url`. Locally the folder is first renamed aside (atomic), so a kill never leaves a
    half-deleted store at `url`; leftovers of such kills are removed by `remove_trash`."""
    import shutil
    import uuid

    if not _is_local(url):
        return  # zarr's mode="w" clears it
    path = _local_path(url)
    if path.is_dir():
        trash = path.with_name(f".{path.name}.deleting-{uuid.uuid4().hex[:8]}")
        path.rename(trash)
        _kill_point("create:moved-aside")
        shutil.rmtree(trash, ignore_errors=True)


def remove_trash(url: str | os.PathLike[str]) -> None:
    """Remove folders a killed `--overwrite` left renamed aside next to a local store. Lock holders only."""
    import shutil

    url = normalize_url(url)
    if _is_local(url):
        path = _local_path(url).absolute()
        if path.parent.is_dir():
            for trash in path.parent.glob(f".{path.name}.deleting-*"):
                shutil.rmtree(trash, ignore_errors=True)


def create_store(url: str | os.PathLike[str], layout: StoreLayout, attrs: Mapping[str, Any], members: int) -> zarr.Group:
    """Create an empty zoo of `members` members (all pending), replacing anything at `url`. Coordinator only.

    The root attributes are written first with "state": "creating" and rewritten without it once every array
    exists, so a store whose creation was killed is recognised (and created again) by the next run.
    """
    import zarr

    url = normalize_url(url)
    check_capacity(url, layout, members)
    _check_target(url)
    meta = _jsonable({**dict(attrs), "format": FORMAT, "layout": layout.to_json(), "members": int(members),
                      "checksums": CHECKSUM, "store_version": STORE_VERSION})
    _clear(url)
    root = zarr.open_group(url, mode="w", attributes={"unfzoo": {**meta, "state": "creating"}})
    _kill_point("create:started")
    epochs = np.asarray(layout.checkpoint_epochs, dtype=np.int32)
    for group_name in ("weights", "metrics"):
        grp = root.create_group(group_name)
        coord = grp.create_array("checkpoint", shape=(epochs.size,), chunks=(epochs.size,), dtype="int32",
                                 dimension_names=("checkpoint",))
        coord[:] = epochs
    root.create_group("hparams")
    root.create_group("members")
    _create_member_arrays(root, layout, members, dims=weight_dims(layout.weight_shapes, meta.get("spec")))
    _create_coords(root, layout, members)
    _kill_point("create:arrays")
    root.attrs["unfzoo"] = meta  # last: the store is complete
    return root


def _checksum_columns(layout: StoreLayout) -> list[str]:
    """The arrays a task writes, in checksum-column order (status last)."""
    names = [f"weights/{k}" for k in layout.weight_shapes]
    names += [f"metrics/{n}" for n in layout.metric_names]
    names += [f"hparams/{n}" for n in (*layout.continuous, *layout.categorical)]
    names += ["members/seed", "members/config", "members/diverged_epoch", "members/status"]
    return names


def _create_member_arrays(root: zarr.Group, layout: StoreLayout, members: int, only: Sequence[str] | None = None,
                          dims: Mapping[str, tuple[str, ...]] | None = None) -> None:
    """Create the member-axis arrays (all, or those named in `only`, replacing them); `dims` names the weight
    dimensions after (member, checkpoint) (default: `key.0`, `key.1`, ..., the version-1 names)."""
    from zarr.codecs import ZstdCodec

    k, n_ck = layout.members_per_chunk, layout.n_checkpoints
    small = {"compressors": ZstdCodec(level=3)}
    specs: dict[str, dict[str, Any]] = {}
    for key, shape in layout.weight_shapes.items():
        specs[f"weights/{key}"] = dict(
            shape=(members, n_ck, *shape), chunks=(k, n_ck, *shape), dtype="float32", fill_value=np.nan,
            compressors=None,  # float32 weights compress ~1.1x; raw chunks read 3-4x faster
            dimension_names=("member", "checkpoint", *(dims[key] if dims else _plain_dims(key, shape))),
        )
    for name in layout.metric_names:
        specs[f"metrics/{name}"] = dict(shape=(members, n_ck), chunks=(k, n_ck), dtype="float32", fill_value=np.nan,
                                        dimension_names=("member", "checkpoint"), **small)
    for name in layout.continuous:
        specs[f"hparams/{name}"] = dict(shape=(members,), chunks=(k,), dtype="float64", fill_value=np.nan,
                                        dimension_names=("member",), **small)
    for name in layout.categorical:
        specs[f"hparams/{name}"] = dict(shape=(members,), chunks=(k,), dtype="int16", fill_value=-1,
                                        dimension_names=("member",), **small)
    for name, (dtype, fill) in _MEMBER_ARRAYS.items():
        specs[f"members/{name}"] = dict(shape=(members,), chunks=(k,), dtype=dtype, fill_value=fill,
                                        dimension_names=("member",), **small)
    columns = _checksum_columns(layout)
    specs[CHECKSUM] = dict(shape=(members, len(columns)), chunks=(k, len(columns)), dtype="uint32", fill_value=0,
                           dimension_names=("member", "array"), **small)
    for name, spec in specs.items():
        if only is not None and name not in only:
            continue
        arr = root.create_array(name, overwrite=only is not None, **spec)
        _kill_point("create:array")
        if name.startswith("hparams/") and name[8:] in layout.categorical:
            arr.attrs.update({"categories": list(layout.categorical[name[8:]]),
                              **_flags(layout.categorical[name[8:]])})
        if name == "members/status":
            arr.attrs.update(_flags(STATUS_NAMES))
        if name == CHECKSUM:
            arr.attrs.update({"arrays": columns, "algorithm": "crc32"})


def _plain_dims(key: str, shape: Sequence[int]) -> tuple[str, ...]:
    return tuple(f"{key}.{i}" for i in range(len(shape)))


def weight_dims(weight_shapes: Mapping[str, Sequence[int]], spec: Any = None) -> dict[str, tuple[str, ...]]:
    """Names of each weight array's dimensions after (member, checkpoint), from the spec's axis labels.

    A natural dim with one labelled axis takes the label (`convs.0.out`, `k0`); a dim that is a product of view
    axes joins their labels with `*` (a GRU's `encoder.gate*encoder`), a dim split into parts joins the parts with
    `+`. Tied axes share a name, which xarray accepts because tied axes have one size; a name met again with
    another size (or twice in one array, or equal to `member`/`checkpoint`) becomes `KEY:NAME` so it stays
    distinct and still shows the label. Without a spec, or for a key the spec does not describe, `KEY.0`, `KEY.1`.
    `spec` is a `WeightSpec` or its dict form."""
    tensors: dict[str, Any] = {}
    if spec is not None:
        try:
            from unf_models import WeightSpec

            ws = spec if isinstance(spec, WeightSpec) else WeightSpec.from_dict(spec)
            tensors = {t.name: t for t in ws.tensors}
        except Exception:  # noqa: BLE001 - an unreadable spec only costs the names
            tensors = {}
    sizes: dict[str, int] = {"member": -1, "checkpoint": -1}
    out: dict[str, tuple[str, ...]] = {}
    for key, shape in weight_shapes.items():
        shape = tuple(int(v) for v in shape)
        t = tensors.get(key)
        if t is None or tuple(t.shape) != shape:
            out[key] = _plain_dims(key, shape)
            continue
        names: list[str] = []
        for j, size in enumerate(shape):
            name = "+".join("*".join(axes) for axes in t.dim_terms(j)) or f"{key}.{j}"
            if sizes.get(name, size) != size or name in names:
                name = f"{key}:{name}"
            sizes.setdefault(name, size)
            names.append(name)
        out[key] = tuple(names)
    return out


def _flags(names: Sequence[Any]) -> dict[str, Any]:
    """CF `flag_values`/`flag_meanings` for codes 0..n-1 (meanings are words: blanks become underscores)."""
    words = [str(v).replace(" ", "_") or "_" for v in names]
    return {"flag_values": list(range(len(names))), "flag_meanings": " ".join(words)}


def _create_coords(root: zarr.Group, layout: StoreLayout, members: int) -> None:
    """The `member` coordinate of each group (0..members-1), for xarray."""
    from zarr.codecs import ZstdCodec

    k = layout.members_per_chunk
    for group in COORD_GROUPS:
        arr = root.create_array(f"{group}/member", shape=(members,), chunks=(k,), dtype="int64", fill_value=-1,
                                dimension_names=("member",), compressors=ZstdCodec(level=3), overwrite=True)
        arr[:] = np.arange(members, dtype=np.int64)


def _write_coords(root: zarr.Group, members: int) -> None:
    """Fill the `member` coordinates that exist (after a resize)."""
    for group in COORD_GROUPS:
        try:
            arr = root[f"{group}/member"]
        except KeyError:
            continue
        if arr.shape != (members,):
            arr.resize((members,))
        arr[:] = np.arange(members, dtype=np.int64)


def _set_dimension_names(root: zarr.Group, name: str, dims: Sequence[str]) -> None:
    """Rewrite the dimension names in one array's zarr.json (zarr has no API for it); data chunks are untouched."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.buffer.cpu import Buffer
    from zarr.core.sync import sync

    key = "/".join(p for p in (root.path, name, "zarr.json") if p)
    raw = sync(root.store.get(key, prototype=default_buffer_prototype()))
    if raw is None:
        raise StoreError(f"{name}: its zarr.json is missing, so it cannot be migrated; run --repair first")
    doc = json.loads(raw.to_bytes())
    if doc.get("dimension_names") == list(dims):
        return
    doc["dimension_names"] = list(dims)
    sync(root.store.set(key, Buffer.from_bytes(json.dumps(doc, indent=2).encode())))


def store_version(meta: Mapping[str, Any]) -> int:
    """The layout version of a store's attrs["unfzoo"] (1 for stores written before versions were recorded)."""
    return int(meta.get("store_version", 1))


def migrate_store(url: str | os.PathLike[str]) -> bool:
    """Upgrade a version-1 store's metadata in place to STORE_VERSION: weight dimension names from the spec,
    `member` coordinates, CF flag attributes on categoricals and status. No chunk of data is rewritten; each step is
    idempotent and the version is recorded last, so a killed migration is finished by the next. Writers only
    (hold the store's lock). Returns False when the store is already current."""
    url = normalize_url(url)
    root = open_group(url, mode="r+")
    meta = read_meta(root, url)
    if store_version(meta) >= STORE_VERSION:
        return False
    layout = StoreLayout.from_json(meta["layout"])
    for key, names in weight_dims(layout.weight_shapes, meta.get("spec")).items():
        _set_dimension_names(root, f"weights/{key}", ("member", "checkpoint", *names))
    for name, categories in layout.categorical.items():
        root[f"hparams/{name}"].attrs.update(_flags(categories))
    root["members/status"].attrs.update(_flags(STATUS_NAMES))
    for kind in SPLIT_KINDS:
        if f"members/split_{kind}" in root:
            root[f"members/split_{kind}"].attrs.update(_flags(("train", "val", "test")))
    n = int(root["members/status"].shape[0])
    for group in COORD_GROUPS:
        if f"{group}/member" not in root:
            _create_coords(root, layout, n)
            break
    _write_coords(root, n)
    root.attrs["unfzoo"] = {**meta, "store_version": STORE_VERSION}
    return True


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def _member_arrays(root: zarr.Group, layout: StoreLayout) -> list[zarr.Array]:
    names = [f"weights/{k}" for k in layout.weight_shapes]
    names += [f"metrics/{n}" for n in layout.metric_names]
    names += [f"hparams/{n}" for n in (*layout.continuous, *layout.categorical)]
    names += [f"members/{n}" for n in _MEMBER_ARRAYS]
    if _has_checksums(root):
        names.append(CHECKSUM)
    return [root[n] for n in names]


def _coord_arrays(root: zarr.Group) -> list[zarr.Array]:
    out = []
    for group in COORD_GROUPS:
        try:
            out.append(root[f"{group}/member"])
        except KeyError:
            pass
    return out


def _has_checksums(root: Any) -> bool:
    try:
        return CHECKSUM in root
    except Exception:  # noqa: BLE001 - an unreadable members group: treated as no checksums here
        return False


_REQUIRED_META = ("layout", "members")
_REQUIRED_LAYOUT = ("weight_shapes", "metric_names", "checkpoint_epochs", "members_per_chunk")


def read_meta(root: zarr.Group, url: str | None = None, *, allow_creating: bool = False) -> dict[str, Any]:
    """The zoo's attrs["unfzoo"], checked: format, required keys, and not a store whose creation never finished."""
    where = url or str(root.store)
    meta = root.attrs.get("unfzoo")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StoreError(f"{where} is a zarr group but not an unfzoo zoo (no attrs['unfzoo'] of format {FORMAT})")
    if meta.get("state") == "creating" and not allow_creating:
        raise StoreError(f"{where}: the creation of this store was interrupted, so it holds no members yet; "
                         "rerun `unfzoo zoo RECIPE --out` on it to create it")
    missing = [k for k in _REQUIRED_META if k not in meta]
    layout = meta.get("layout")
    if not missing and isinstance(layout, dict):
        missing = [f"layout.{k}" for k in _REQUIRED_LAYOUT if k not in layout]
    elif not missing:
        missing = ["layout"]
    if missing:
        raise StoreError(f"{where}: the store's attrs['unfzoo'] lack the key {missing[0]!r}, so its metadata is damaged; "
                         "rebuild it (`unfzoo zoo RECIPE --out ... --overwrite`) or restore its zarr.json")
    try:
        StoreLayout.from_json(layout)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise StoreError(f"{where}: the store's attrs['unfzoo']['layout'] is malformed ({err!r}); rebuild it with "
                         "--overwrite or restore its zarr.json") from err
    return dict(meta)


def read_layout(root: zarr.Group, url: str | None = None) -> StoreLayout:
    """The layout recorded in a zoo group's attributes."""
    return StoreLayout.from_json(read_meta(root, url, allow_creating=True)["layout"])


def resize_store(url: str | os.PathLike[str], members: int) -> None:
    """Grow every member-axis array to `members` (new members pending). Coordinator only, before tasks start."""
    root = open_group(url, mode="r+")
    layout = read_layout(root)
    for arr in _member_arrays(root, layout):
        arr.resize((members, *arr.shape[1:]))
        _kill_point("resize:array")
    _write_coords(root, members)
    meta = dict(root.attrs["unfzoo"])
    meta["members"] = int(members)
    root.attrs["unfzoo"] = meta


def reset_members(url: str | os.PathLike[str], start: int, stop: int) -> None:
    """Mark members [start, stop) pending (whole chunks), so the next build retrains them."""
    root = open_group(url, mode="r+")
    status = root["members/status"]
    status[start:stop] = np.full(stop - start, PENDING, dtype=np.int8)
    _kill_point("reset")


def write_members(
    url: str | os.PathLike[str], start: int, block: MemberBlock, identity: Mapping[str, Any] | None = None
) -> None:
    """Write members [start, start + len(block)) — one whole chunk — data, then checksums, then status. Safe in any
    worker. With `identity`, refuses (StoreMismatchError) a store that now holds another recipe's zoo."""
    from zarr.core.sync import sync

    sync(_write_members(normalize_url(url), start, block, identity))


def _row_checksums(values: np.ndarray) -> np.ndarray:
    """(m,) uint32 CRC-32 of each member's row (the bytes of values[i], C order)."""
    if len(values) == 0:
        return np.zeros(0, dtype=np.uint32)
    flat = np.ascontiguousarray(values).reshape(len(values), -1).view(np.uint8)  # rows as bytes, no copy
    return np.fromiter((zlib.crc32(row) for row in flat), dtype=np.uint32, count=len(values))


async def _write_members(url: str, start: int, block: MemberBlock, identity: Mapping[str, Any] | None) -> None:
    import asyncio

    from zarr.api.asynchronous import open_group as open_async

    from pipeline.errors import StoreMismatchError

    try:  # reopened here: a handle from before a resize would drop writes
        root = await open_async(url, mode="r+", use_consolidated=False)
    except (FileNotFoundError, KeyError, ValueError) as err:
        raise StoreError(f"cannot open zoo store {url} for writing: {err}") from err
    meta = read_meta(root, url, allow_creating=True)
    if identity is not None and (meta.get("identity") != _jsonable(dict(identity)) or meta.get("state") == "creating"):
        raise StoreMismatchError(f"{url} was replaced by another zoo while this build ran; its chunk was not written")
    layout = StoreLayout.from_json(meta["layout"])
    m = len(block)
    stop = start + m
    k = layout.members_per_chunk
    status = await root.getitem("members/status")
    n = status.shape[0]
    if start % k or (stop % k and stop != n) or stop > n:
        raise StoreError(
            f"write of members [{start}, {stop}) is not one whole chunk of {k} inside {n} members; "
            "a store resized under a running build? rerun the same command to resume"
        )
    if set(block.weights) != set(layout.weight_shapes):
        raise StoreError(f"weights {sorted(block.weights)} do not match the store's {sorted(layout.weight_shapes)}")
    values: dict[str, np.ndarray] = {}
    for key in layout.weight_shapes:
        values[f"weights/{key}"] = np.asarray(block.weights[key], dtype=np.float32)
    for name in layout.metric_names:
        metric = block.metrics.get(name)
        values[f"metrics/{name}"] = (
            np.full((m, layout.n_checkpoints), np.nan, np.float32) if metric is None else np.asarray(metric, np.float32)
        )
    for name in layout.continuous:
        values[f"hparams/{name}"] = np.asarray(block.hparams[name], dtype=np.float64)
    for name, categories in layout.categorical.items():
        values[f"hparams/{name}"] = _encode(block.hparams[name], categories, name)
    values["members/seed"] = np.asarray(block.seed, dtype=np.int64)
    values["members/config"] = np.asarray(block.config, dtype=np.int64)
    values["members/diverged_epoch"] = np.asarray(block.diverged_epoch, dtype=np.int32)
    for name, v in values.items():
        expected = (m, *layout.weight_shapes[name[8:]]) if name.startswith("weights/") else (m,)
        if name.startswith(("weights/", "metrics/")):
            expected = (m, layout.n_checkpoints, *expected[1:])
        if v.shape != expected:
            raise StoreError(f"chunk data {name!r} has shape {v.shape}, the store expects {expected}")
    sl = slice(start, stop)
    arrays = await asyncio.gather(*(root.getitem(name) for name in values))
    # A chunk of a finished member is never "empty"; skipping zarr's all-fill-value scan doubles the write rate.
    arrays = [arr.with_config({"write_empty_chunks": True}) for arr in arrays]
    await asyncio.gather(*(arr.setitem(sl, values[name]) for arr, name in zip(arrays, values)))
    _kill_point("write:data")
    codes = np.where(np.asarray(block.diverged, bool), DIVERGED, DONE).astype(np.int8)
    try:
        checksum = await root.getitem(CHECKSUM)
    except KeyError:
        checksum = None  # a store from before checksums
    if checksum is not None:
        values["members/status"] = codes
        columns = list(checksum.attrs.get("arrays", ()))
        if set(columns) != set(values):
            raise StoreError(f"{url}: members/checksum covers {columns}, the chunk holds {sorted(values)}")
        sums = np.stack([_row_checksums(values[name]) for name in columns], axis=1)
        await checksum.with_config({"write_empty_chunks": True}).setitem(sl, sums)
        _kill_point("write:checksum")
    await status.setitem(sl, codes)  # last: marks the chunk's data as complete
    _kill_point("write:status")


async def _read_arrays(url: str, names: Sequence[str], selections: Sequence[Any]) -> list[list[np.ndarray]]:
    import asyncio

    from zarr.api.asynchronous import open_group as open_async

    root = await open_async(url, mode="r", use_consolidated=False)
    arrays = await asyncio.gather(*(root.getitem(name) for name in names))
    flat = await asyncio.gather(*(arr.getitem(sel) for sel in selections for arr in arrays))
    return [list(flat[i * len(arrays) : (i + 1) * len(arrays)]) for i in range(len(selections))]


def read_arrays(url: str | os.PathLike[str], names: Sequence[str], selection: Any = slice(None)) -> dict[str, np.ndarray]:
    """Read several arrays of a store concurrently ({name: data}); `selection` is a basic selection for all."""
    from zarr.core.sync import sync

    return dict(zip(names, sync(_read_arrays(str(url), list(names), [selection]))[0]))


def read_blocks(url: str | os.PathLike[str], names: Sequence[str], selections: Sequence[Any]) -> list[dict[str, np.ndarray]]:
    """Read several selections (e.g. whole member chunks) of several arrays, all at once: one dict per selection."""
    from zarr.core.sync import sync

    out = sync(_read_arrays(str(url), list(names), list(selections)))
    return [dict(zip(names, parts)) for parts in out]


def _encode(values: Any, categories: Sequence[Any], name: str) -> np.ndarray:
    lookup = {_cat_key(c): i for i, c in enumerate(categories)}
    try:
        return np.array([lookup[_cat_key(v)] for v in np.asarray(values, dtype=object)], dtype=np.int16)
    except KeyError as err:
        raise StoreError(f"hyperparameter {name!r} value {err.args[0]!r} is not one of its categories {list(categories)}") from err


def _cat_key(v: Any) -> str:
    v = v.item() if hasattr(v, "item") else v
    if isinstance(v, float) and not np.isfinite(v):
        v = None  # missing values share the category None
    return json.dumps(v)


def read_status(url: str | os.PathLike[str]) -> np.ndarray:
    """Per-member status codes; a chunk that cannot be decoded (torn write on a non-atomic store) reads as pending."""
    root = open_group(url, mode="r")
    try:
        status = root["members/status"]
    except Exception as err:  # noqa: BLE001 - the array itself is gone: the status of every member is lost
        raise DamagedStoreError(
            f"{url} is damaged: its members/status array is missing or unreadable ({type(err).__name__}); for a "
            f"zoo built from a recipe run `unfzoo zoo RECIPE --out {url} --repair` (retrains every member)"
        ) from err
    try:  # one read; chunk by chunk only when some chunk cannot be decoded
        return np.asarray(status[:], dtype=np.int8)
    except Exception:  # noqa: BLE001 - located below
        pass
    n, k = status.shape[0], status.chunks[0]
    out = np.zeros(n, dtype=np.int8)
    for start in range(0, n, k):
        try:
            out[start : start + k] = status[start : start + k]
        except Exception:  # noqa: BLE001 - unreadable chunk = not done; it gets rewritten
            out[start : start + k] = PENDING
    return out


@dataclass(frozen=True)
class Damage:
    """A damaged chunk: which members fail, in which arrays, and why."""

    chunk: int
    start: int
    stop: int
    members: tuple[int, ...]
    arrays: tuple[str, ...]
    reason: str

    def describe(self) -> str:
        """One line: `chunk 2 (members 8-11): checksum mismatch in weights/fc1.weight (members 8, 9)`."""
        who = ", ".join(map(str, self.members[:8])) + (f" and {len(self.members) - 8} more" if len(self.members) > 8 else "")
        arrays = ", ".join(self.arrays[:4]) + (f" and {len(self.arrays) - 4} more arrays" if len(self.arrays) > 4 else "")
        return f"chunk {self.chunk} (members {self.start}-{self.stop - 1}): {self.reason} in {arrays} (members {who})"


@dataclass
class VerifyReport:
    """What `verify_store` found: chunks checked, damaged chunks, and whether the store has checksums at all."""

    url: str
    checked: int
    damaged: list[Damage]
    checksums: bool
    missing_arrays: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.damaged


def _damage_error(url: str, meta: Mapping[str, Any], damaged: Sequence[Damage]) -> DamagedStoreError:
    """The error `zoo` reruns and readers raise: names the damaged chunks and says how to repair them."""
    shown = "; ".join(d.describe() for d in damaged[:3]) + (f"; and {len(damaged) - 3} more chunks" if len(damaged) > 3 else "")
    if meta.get("kind") == "recipe":
        fix = f"run `unfzoo zoo {meta.get('name', 'RECIPE')} --out {url} --repair` to retrain exactly those chunks"
    else:
        fix = "import the zoo again (--overwrite): imported members cannot be retrained"
    return DamagedStoreError(f"{url} is damaged: {shown}; {fix}")


async def _read_tolerant(url: str, names: Sequence[str], selections: Sequence[slice]) -> dict[tuple[str, int], Any]:
    """{(name, i): data or the exception} for each array and selection; a missing array gives KeyError."""
    import asyncio

    from zarr.api.asynchronous import open_group as open_async

    root = await open_async(url, mode="r", use_consolidated=False)
    arrays = await asyncio.gather(*(root.getitem(n) for n in names), return_exceptions=True)
    jobs, keys = [], []
    for name, arr in zip(names, arrays):
        for i, sel in enumerate(selections):
            keys.append((name, i))
            jobs.append(arr.getitem(sel) if not isinstance(arr, BaseException) else _raise(arr))
    results = await asyncio.gather(*jobs, return_exceptions=True)
    return dict(zip(keys, results))


async def _raise(err: BaseException) -> Any:
    raise err


def verify_store(url: str | os.PathLike[str], chunks: Sequence[int] | None = None, batch: int = 16) -> VerifyReport:
    """Read every finished chunk (or those in `chunks`) of every array a task writes and compare each member's row
    with its stored CRC-32. Pending chunks are skipped: they hold nothing yet and the next build writes them."""
    from zarr.core.sync import sync

    url = normalize_url(url)
    root = open_group(url, mode="r")
    meta = read_meta(root, url)
    layout = StoreLayout.from_json(meta["layout"])
    status = read_status(url)
    n, k = len(status), layout.members_per_chunk
    has = meta.get("checksums") == CHECKSUM
    columns = _checksum_columns(layout)
    if has and _has_checksums(root):
        columns = list(root[CHECKSUM].attrs.get("arrays", columns))
    names = [c for c in columns if c != "members/status"] + ([CHECKSUM] if has else [])
    missing = []
    for name in names:
        try:
            root[name]
        except Exception:  # noqa: BLE001 - missing or unreadable metadata: damaged either way
            missing.append(name)
    todo = [c for c in range(-(-n // k)) if (status[c * k : (c + 1) * k] != PENDING).any()]
    if chunks is not None:
        todo = [c for c in todo if c in set(chunks)]
    damaged: list[Damage] = []
    for b in range(0, len(todo), batch):
        group = todo[b : b + batch]
        sels = [slice(c * k, min((c + 1) * k, n)) for c in group]
        data = sync(_read_tolerant(url, names, sels))
        for i, c in enumerate(group):
            start, stop = sels[i].start, sels[i].stop
            st = status[start:stop]
            done = np.flatnonzero(st != PENDING)
            bad_arrays: dict[str, set[int]] = {}
            reason = "checksum mismatch"
            stored = data.get((CHECKSUM, i)) if has else None
            if has and (isinstance(stored, BaseException) or stored is None or stored.shape != (stop - start, len(columns))):
                bad_arrays[CHECKSUM] = set(done.tolist())
                reason = "unreadable or missing chunk"
                stored = None
            for j, name in enumerate(columns):
                value = st if name == "members/status" else data[(name, i)]
                if isinstance(value, BaseException):
                    bad_arrays[name] = set(done.tolist())
                    reason = "missing array" if name in missing else "unreadable or missing chunk"
                    continue
                if stored is None:
                    continue
                got = _row_checksums(value[done])
                wrong = done[got != stored[done, j]]
                if wrong.size:
                    bad_arrays[name] = set(wrong.tolist())
            if bad_arrays:
                members = sorted(set().union(*bad_arrays.values()))
                damaged.append(Damage(c, start, stop, tuple(start + m for m in members), tuple(bad_arrays), reason))
    return VerifyReport(url, len(todo), damaged, has, tuple(missing))


def recreate_missing_arrays(url: str | os.PathLike[str], names: Sequence[str]) -> None:
    """Create again (empty, at the store's member count) member arrays that were deleted. Coordinator only."""
    root = open_group(url, mode="r+")
    layout = read_layout(root)
    meta = read_meta(root, str(url))
    members = int(meta["members"])
    for group in ("weights", "metrics", "hparams", "members"):
        if group not in root:
            root.create_group(group)
    dims = weight_dims(layout.weight_shapes, meta.get("spec")) if store_version(meta) >= 2 else None
    _create_member_arrays(root, layout, members, only=list(names), dims=dims)


def write_splits(url: str | os.PathLike[str], seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> None:
    """Store the run and configuration splits for (seed, fractions). Coordinator only (after the tasks)."""
    root = open_group(url, mode="r+")
    fr = check_fractions(fractions)
    n = root["members/status"].shape[0]
    config = root["members/config"][:]
    config = np.where(config < 0, -1 - np.arange(n), config)  # unknown config: its own group
    for kind, groups in (("run", np.arange(n)), ("config", config)):
        arr = root[f"members/split_{kind}"]
        arr[:] = assign_split(groups, seed, fr)
        arr.attrs.update({"seed": int(seed), "fractions": list(fr), "codes": ["train", "val", "test"],
                          **_flags(("train", "val", "test"))})
    _write_coords(root, n)


def store_size(url: str | os.PathLike[str]) -> int:
    """Bytes the store occupies (files under a local path, or fsspec's du for URLs)."""
    url = str(url)
    if _is_local(url):
        return sum(p.stat().st_size for p in _local_path(url).rglob("*") if p.is_file())
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return int(fs.du(path))


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _category_values(values: np.ndarray, categories: Sequence[Any]) -> np.ndarray:
    """Decoded categorical values as a plain array: numbers (NaN when pending) when every category is a number,
    strings ("" when pending) otherwise."""
    if all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in categories):
        numbers = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
        ints = all(isinstance(c, int) for c in categories)
        return numbers.astype(np.int64) if ints and np.isfinite(numbers).all() else numbers
    return np.array(["" if v is None else str(v) for v in values], dtype=str)


def _as_indices(members: Any, n: int) -> np.ndarray:
    if members is None:
        return np.arange(n, dtype=np.int64)
    if isinstance(members, slice):
        return np.arange(n, dtype=np.int64)[members]
    idx = np.atleast_1d(np.asarray(members))
    if idx.dtype == bool:
        if idx.shape != (n,):
            raise IndexError(f"boolean member mask has shape {idx.shape}, expected ({n},)")
        return np.flatnonzero(idx).astype(np.int64)
    idx = idx.astype(np.int64)
    if idx.size and (idx.min() < -n or idx.max() >= n):
        raise IndexError(f"member index out of range for a zoo of {n} members")
    return np.where(idx < 0, idx + n, idx)


def _module_summary(record: Any) -> str:
    """How `inspect` shows an architecture imported with --module (or '-' for none)."""
    if not record:
        return "-"
    return f"--module {record.get('factory')} {json.dumps(record.get('kwargs') or {})}"


def _spec_labels(spec: Any) -> dict[str, dict[str, int]] | None:
    """{"permutable": {label: size}, "fixed": {label: size}} of a weight-space spec (None without one): the names
    `unfzoo train --keep-fixed` takes and what the UNF layers permute."""
    if spec is None:
        return None
    sizes = spec.sizes
    return {"permutable": {label: sizes[label] for label in spec.permutable_labels},
            "fixed": {label: sizes[label] for label in spec.fixed_labels}}


class Zoo:
    """Read a zoo store: metadata, the members table, weights as tensors, modules, splits and a loader."""

    def __init__(self, root: zarr.Group, url: str) -> None:
        self.root = root
        self.url = url
        self.attrs: dict[str, Any] = read_meta(root, url)
        self.layout = StoreLayout.from_json(self.attrs["layout"])
        self._cache: dict[str, np.ndarray] | None = None

    @classmethod
    def open(cls, path_or_url: str | os.PathLike[str]) -> Zoo:
        """Open a store read-only (a local path or any fsspec URL zarr accepts)."""
        url = normalize_url(path_or_url)
        return cls(open_group(url, mode="r"), url)

    # ---- integrity ------------------------------------------------------------------------------------------------
    @cached_property
    def _checksums(self) -> tuple[np.ndarray, dict[str, int]] | None:
        """(members, arrays) stored CRC-32s and {array name: column}, or None for a store without checksums."""
        if self.attrs.get("checksums") != CHECKSUM:
            return None
        try:
            arr = self.root[CHECKSUM]
            table = arr[:]
        except Exception as err:  # noqa: BLE001 - a lost checksum chunk or array is damage like any other
            raise self._located_error(err) from err
        return table, {name: j for j, name in enumerate(arr.attrs.get("arrays", ()))}

    def _check_rows(self, name: str, members: np.ndarray, values: np.ndarray) -> None:
        """Raise DamagedStoreError when finished members' rows of `name` differ from their stored checksums."""
        sums = self._checksums
        if sums is None or name not in sums[1]:
            return
        finished = self.status[members] != PENDING
        if not finished.all():  # pending rows hold no data yet (fancy indexing copies, so only when needed)
            if not finished.any():
                return
            members, values = members[finished], values[finished]
        wrong = members[_row_checksums(values) != sums[0][members, sums[1][name]]]
        if wrong.size:
            k = self.members_per_chunk
            damaged = [
                Damage(int(c), int(c) * k, min((int(c) + 1) * k, self.n_members),
                       tuple(int(m) for m in wrong[wrong // k == c]), (name,), "checksum mismatch")
                for c in np.unique(wrong // k)
            ]
            raise _damage_error(self.url, self.attrs, damaged)

    def _located_error(self, err: BaseException, members: np.ndarray | None = None) -> StoreError:
        """A read failed: name the damaged chunks (by verifying those read), or say what failed."""
        chunks = None if members is None else sorted(set((members // self.members_per_chunk).tolist()))
        try:
            report = verify_store(self.url, chunks)
        except Exception:  # noqa: BLE001 - fall through to the plain message
            report = None
        if report is not None and report.damaged:
            return _damage_error(self.url, self.attrs, report.damaged)
        return StoreError(f"cannot read zoo store {self.url}: {type(err).__name__}: {err}")

    def _column(self, name: str) -> np.ndarray:
        """A whole (member,) or (member, checkpoint) array, checked against the checksums."""
        try:
            values = self.root[name][:]
        except Exception as err:  # noqa: BLE001 - missing or undecodable chunk: say which
            raise self._located_error(err) from err
        self._check_rows(name, np.arange(len(values)), values)
        return values

    def verify(self) -> VerifyReport:
        """Check every finished chunk against its checksums (see `verify_store`)."""
        return verify_store(self.url)

    def __repr__(self) -> str:
        return f"Zoo({self.url!r}, members={self.n_members}, checkpoints={list(self.checkpoint_epochs)})"

    # ---- metadata -------------------------------------------------------------------------------------------------
    @property
    def n_members(self) -> int:
        return int(self.root["members/status"].shape[0])

    def __len__(self) -> int:
        return self.n_members

    @property
    def members_per_chunk(self) -> int:
        return self.layout.members_per_chunk

    @property
    def checkpoint_epochs(self) -> tuple[int, ...]:
        return self.layout.checkpoint_epochs

    @property
    def weight_keys(self) -> tuple[str, ...]:
        """State-dict keys in module order."""
        return tuple(self.layout.weight_shapes)

    @property
    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self.layout.weight_shapes)

    @property
    def metric_names(self) -> tuple[str, ...]:
        return self.layout.metric_names

    @property
    def arch(self) -> dict[str, Any] | None:
        """The resolved architecture (without the per-member activation), or None for imports without one."""
        arch = self.attrs.get("arch")
        return dict(arch) if arch is not None else None

    @property
    def task_name(self) -> str | None:
        return (self.attrs.get("task") or {}).get("name")

    @property
    def task_params(self) -> dict[str, Any]:
        return dict((self.attrs.get("task") or {}).get("params", {}))

    @property
    def fingerprint(self) -> str | None:
        return (self.attrs.get("task") or {}).get("fingerprint")

    @cached_property
    def recipe(self) -> Recipe | None:
        """The recipe the zoo was built from (None for imported zoos)."""
        text = self.attrs.get("recipe_text")
        if not text:
            return None
        from pipeline.zoo.recipe import parse_recipe

        recipe = parse_recipe(text, source=f"{self.url} (stored recipe)", default_name=self.attrs.get("name", "zoo"))
        return recipe.with_members(self.n_members)

    @cached_property
    def spec(self) -> Any:
        """The weight-space spec (`unf_models.WeightSpec`), or None when the store has none."""
        d = self.attrs.get("spec")
        if d is None:
            return None
        from unf_models import WeightSpec

        return WeightSpec.from_dict(d)

    # ---- tables ---------------------------------------------------------------------------------------------------
    @cached_property
    def status(self) -> np.ndarray:
        """(members,) int8 status codes (see STATUS_NAMES)."""
        return read_status(self.url)

    def hparam(self, name: str) -> np.ndarray:
        """One hyperparameter column, categoricals decoded to their values."""
        values = self._column(f"hparams/{name}")
        if name in self.layout.categorical:
            cats = np.asarray(list(self.layout.categorical[name]) + [None], dtype=object)
            return cats[values]  # code -1 -> None (pending)
        return values

    @cached_property
    def members(self) -> pd.DataFrame:
        """One row per member: hyperparameters, seed, config, status, split, and `metric@eN` per checkpoint."""
        import pandas as pd

        cols: dict[str, Any] = {}
        for name in (*self.layout.categorical, *self.layout.continuous):
            cols[name] = self.hparam(name)
        for name in ("seed", "config", "diverged_epoch"):
            cols[name] = self._column(f"members/{name}")
        cols["status"] = pd.Categorical.from_codes(self.status.astype(np.int64), categories=list(STATUS_NAMES))
        codes = self.root["members/split_run"][:].astype(np.int64)
        cols["split"] = pd.Categorical.from_codes(codes, categories=["train", "val", "test"])
        for name in self.metric_names:
            values = self.metric(name)
            for j, epoch in enumerate(self.checkpoint_epochs):
                cols[f"{name}@e{epoch}"] = values[:, j]
        frame = pd.DataFrame(cols)
        frame.index.name = "member"
        return frame

    def metric(self, name: str) -> np.ndarray:
        """(members, checkpoints) float32 values of one metric."""
        if name not in self.metric_names:
            raise StoreError(f"{self.url} has no metric {name!r}; it has {', '.join(self.metric_names)}")
        return self._column(f"metrics/{name}")

    def split(
        self, kind: str = "run", seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS
    ) -> dict[str, np.ndarray]:
        """Disjoint {"train", "val", "test"} member indices: by run or by hyperparameter configuration.

        The split for the stored (seed, fractions) is read from the zoo; other choices are computed the same way.
        """
        if kind not in SPLIT_KINDS:
            raise StoreError(f"split kind {kind!r} is not one of {', '.join(SPLIT_KINDS)}")
        fr = check_fractions(fractions)
        try:  # the coordinator rewrites the split arrays on every build; a lost one is computed below instead
            arr = self.root[f"members/split_{kind}"]
            stored, attrs = arr[:], dict(arr.attrs)
        except Exception:  # noqa: BLE001 - missing or unreadable: recompute
            stored, attrs = None, {}
        stored_fr = np.asarray(attrs.get("fractions", ()), dtype=float)
        if (stored is not None and attrs.get("seed") == seed and stored_fr.shape == (len(fr),)
                and np.allclose(stored_fr, fr) and (stored >= 0).all()):
            return split_indices(stored)
        n = self.n_members
        if kind == "run":
            groups = np.arange(n)
        else:
            config = self._column("members/config")
            groups = np.where(config < 0, -1 - np.arange(n), config)
        return split_indices(assign_split(groups, seed, fr))

    # ---- weights --------------------------------------------------------------------------------------------------
    def _checkpoint_index(self, checkpoint: int) -> int:
        n = len(self.checkpoint_epochs)
        if not -n <= int(checkpoint) < n:
            raise IndexError(f"checkpoint index {checkpoint} out of range for {n} checkpoints (epochs {list(self.checkpoint_epochs)})")
        return int(checkpoint) % n

    def epoch_index(self, epoch: int | str) -> int:
        """The checkpoint index of a stored epoch ('final' = the last); StoreError listing the stored epochs."""
        epochs = list(self.checkpoint_epochs)
        if epoch in ("final", "last"):
            return len(epochs) - 1
        if int(epoch) not in epochs:
            raise StoreError(f"{self.url} stores no checkpoint at epoch {epoch}; it stores epochs {epochs}")
        return epochs.index(int(epoch))

    def read_weights(self, members: Any = None, checkpoints: Any = None) -> dict[str, np.ndarray]:
        """{key: (len(members), len(checkpoints), *shape) float32 numpy} for the selection (default: all)."""
        m_idx = _as_indices(members, self.n_members)
        c_idx = _as_indices(checkpoints, len(self.checkpoint_epochs))
        n_c = len(self.checkpoint_epochs)
        all_c = len(c_idx) == n_c and bool((c_idx == np.arange(n_c)).all())

        def pick(a: np.ndarray) -> np.ndarray:  # (m, C_all, ...) -> (m, C, ...)
            return a if all_c else a[:, c_idx]

        if m_idx.size == 0:
            return {k: np.zeros((0, len(c_idx), *s), np.float32) for k, s in self.weight_shapes.items()}
        if self._cache is not None:
            return {k: pick(self._cache[k][m_idx]) for k in self.weight_keys}
        names = [f"weights/{k}" for k in self.weight_keys]
        if (np.diff(m_idx) == 1).all():  # a contiguous range: whole-chunk reads, all arrays at once
            try:
                data = read_arrays(self.url, names, slice(int(m_idx[0]), int(m_idx[-1]) + 1))
            except Exception as err:  # noqa: BLE001 - missing or undecodable chunk: say which
                raise self._located_error(err, m_idx) from err
            for name in names:
                self._check_rows(name, m_idx, data[name])
            return {k: pick(data[n]) for k, n in zip(self.weight_keys, names)}
        order = np.argsort(m_idx, kind="stable")  # zarr reads sorted indices chunk by chunk
        inverse = np.argsort(order, kind="stable")
        out = {}
        for key, name in zip(self.weight_keys, names):
            try:  # whole rows (chunks hold every checkpoint anyway), so they can be checked
                rows = self.root[name].oindex[m_idx[order]]
            except Exception as err:  # noqa: BLE001 - missing or undecodable chunk: say which
                raise self._located_error(err, m_idx) from err
            self._check_rows(name, m_idx[order], rows)
            out[key] = pick(rows)[inverse]
        return out

    def weights(self, members: Any, checkpoint: int = -1, *, epoch: int | str | None = None) -> dict[str, torch.Tensor]:
        """{key: tensor (len(members), *shape)} at one checkpoint index (default: the last), or at `epoch`, in the
        stored shapes: in a zoo with a `width` hyperparameter narrower members come zero-padded to the widest (the
        same function, not the same weights); `weight_groups` gives each member at its own width."""
        import torch

        c = self._checkpoint_index(checkpoint) if epoch is None else self.epoch_index(epoch)
        data = self.read_weights(members, [c])
        return {k: torch.from_numpy(np.ascontiguousarray(v[:, 0])) for k, v in data.items()}

    def _widths(self) -> np.ndarray | None:
        """The `width` hyperparameter of every member (object array; None while pending), or None in a zoo
        without one."""
        if "width" not in self.layout.continuous and "width" not in self.layout.categorical:
            return None
        return np.asarray(self.hparam("width"), dtype=object)

    def member_shapes(self, members: Any) -> list[dict[str, tuple[int, ...]]]:
        """Each member's own weight shapes: the stored ones, or, in a zoo with a `width` hyperparameter (every
        permutable axis that wide; narrower members are stored zero-padded), the spec resized to its width."""
        index = np.arange(self.n_members)[members]
        stored, widths = self.weight_shapes, self._widths()
        if self.spec is None or widths is None:
            return [stored] * len(np.atleast_1d(index))
        cache: dict[Any, dict[str, tuple[int, ...]]] = {}
        out = []
        for w in np.atleast_1d(widths[index]):
            if w not in cache:
                try:
                    sized = self.spec.resize({label: int(w) for label in self.spec.permutable_labels}).shapes
                    cache[w] = {k: tuple(sized[k]) for k in stored}
                except (TypeError, ValueError, KeyError):  # pending member (no width) or a spec that does not resize
                    cache[w] = stored
                if any(a > b for k in stored for a, b in zip(cache[w][k], stored[k])):
                    cache[w] = stored  # not a padded narrower member: keep the stored shapes
            out.append(cache[w])
        return out

    def weight_groups(self, members: Any, checkpoint: int = -1, *, epoch: int | str | None = None
                      ) -> list[tuple[np.ndarray, dict[str, torch.Tensor]]]:
        """`weights` with every member at its own width (cropped back from the zero padding, as `unfzoo train` and
        `unfzoo score` read them): one `(positions in members, {key: (n, *shape)})` per group of members sharing
        their shapes, in first-seen order; a zoo without widths gives one group."""
        import torch

        from pipeline.zoo.members import crop_to_shapes

        stacked = self.weights(members, checkpoint, epoch=epoch)
        groups: dict[tuple, list[int]] = {}
        for pos, shapes in enumerate(self.member_shapes(members)):
            groups.setdefault(tuple(shapes.items()), []).append(pos)
        out = []
        for key, positions in groups.items():
            rows = np.asarray(positions, dtype=np.int64)
            cropped = crop_to_shapes(stacked, dict(key))  # views; the row selection is the one copy
            out.append((rows, {k: v.index_select(0, torch.from_numpy(rows)) for k, v in cropped.items()}))
        return out

    def member_arch(self, member: int) -> dict[str, Any]:
        """The architecture of one member, including its activation when it is a hyperparameter."""
        if self.arch is None:
            raise StoreError(f"{self.url} records no architecture, so members cannot be rebuilt as modules")
        arch = dict(self.arch)
        if "activation" in self.layout.categorical:
            arch["activation"] = self.hparam("activation")[int(member)]
        return arch

    def module(self, member: int, checkpoint: int = -1, *, epoch: int | str | None = None,
               padded: bool = False) -> torch.nn.Module:
        """A ready `nn.Module` holding member `member`'s weights at a checkpoint index (default: the last), or at
        `epoch`: in a zoo with a `width` hyperparameter, the network at the member's own width (`padded=True`: at the
        zoo's widest, zero-padded as stored, the same function); zoos imported with `--module` rebuild it with the
        recorded factory and kwargs."""
        state = {k: v[0] for k, v in self.weights([int(member)], checkpoint, epoch=epoch).items()}
        record = self.attrs.get("module")
        if record:
            from pipeline.zoo.factory import module_from_record

            module = module_from_record(record, where=str(self.url))
        else:
            from pipeline.zoo.members import build_member, crop_to_shapes, with_width

            arch, widths = self.member_arch(member), self._widths()
            if widths is not None and widths[int(member)] is not None and not padded:
                arch = with_width(arch, int(widths[int(member)]))
            module = build_member(arch)
            state = crop_to_shapes(state, {k: tuple(v.shape) for k, v in module.state_dict().items() if k in state})
        module.load_state_dict(state)
        return module.eval()

    def load(self) -> Zoo:
        """Read every weight array into memory; later weight reads and loaders use it."""
        try:
            data = read_arrays(self.url, [f"weights/{k}" for k in self.weight_keys])
        except Exception as err:  # noqa: BLE001 - missing or undecodable chunk: say which
            raise self._located_error(err) from err
        for k in self.weight_keys:
            self._check_rows(f"weights/{k}", np.arange(self.n_members), data[f"weights/{k}"])
        self._cache = {k: data[f"weights/{k}"] for k in self.weight_keys}
        return self

    @property
    def nbytes(self) -> int:
        """Bytes of all weights in memory (members x checkpoints x params x 4)."""
        n = self.n_members * len(self.checkpoint_epochs)
        return sum(n * int(np.prod(s)) * 4 for s in self.layout.weight_shapes.values())

    def size_on_disk(self) -> int:
        """Bytes the store occupies."""
        return store_size(self.url)

    def summary(self) -> dict[str, Any]:
        """What `unfzoo inspect` shows: metadata, status counts, hyperparameter ranges, metric quantiles, size."""
        status = self.status
        counts = {name: int((status == i).sum()) for i, name in enumerate(STATUS_NAMES)}
        task = self.attrs.get("task") or {}
        arch = self.arch
        k = self.members_per_chunk
        splits = {kind: {s: len(v) for s, v in self.split(kind).items()} for kind in SPLIT_KINDS}
        hparams: dict[str, str] = {}
        for name in self.layout.categorical:
            values, freq = np.unique(np.asarray([str(v) for v in self.hparam(name)]), return_counts=True)
            hparams[name] = ", ".join(f"{v} ({c})" for v, c in zip(values, freq))
        for name in self.layout.continuous:
            col = self.hparam(name)
            col = col[np.isfinite(col)]
            uniq = np.unique(col)
            hparams[name] = (
                ", ".join(f"{v:g}" for v in uniq) if 0 < len(uniq) <= 6
                else f"{col.min():.3g} .. {col.max():.3g} (median {np.median(col):.3g})" if len(col) else "-"
            )
        metrics: dict[tuple[str, int], list[float]] = {}
        done = status == DONE
        for name in self.metric_names:
            values = self.metric(name)[done]
            for j, epoch in enumerate(self.checkpoint_epochs):
                col = values[:, j][np.isfinite(values[:, j])]
                if col.size and (j in (0, len(self.checkpoint_epochs) - 1) or name == "test_acc"):
                    metrics[(name, epoch)] = np.quantile(col, [0, 0.1, 0.5, 0.9, 1.0]).tolist()
        return {
            "store": self.url,
            "name": self.attrs.get("name", "zoo"),
            "kind": self.attrs.get("kind", "?") + (f" ({self.attrs['source']['format']})" if "source" in self.attrs else ""),
            "task": f"{task.get('name')} {task.get('params') or ''} fingerprint {task.get('fingerprint')}" if task else "-",
            "arch": json.dumps(arch) if arch is not None else _module_summary(self.attrs.get("module")),
            "members": self.n_members,
            "status": ", ".join(f"{n} {c}" for n, c in counts.items()),
            "status_counts": counts,
            "checkpoint epochs": list(self.checkpoint_epochs),
            "chunks": f"{-(-self.n_members // k)} of {k} members",
            "splits": "; ".join(f"{kind}: " + "/".join(str(c) for c in v.values()) for kind, v in splits.items()),
            "size on disk": _human_bytes(self.size_on_disk()),
            "labels": _spec_labels(self.spec),
            "hparams": hparams,
            "metrics": metrics,
        }

    def to_xarray(self, weights: bool = True) -> Any:
        """The zoo as an `xarray.Dataset` (needs the `unfzoo[xarray]` extra).

        Coordinates `member` (0..N-1) and `checkpoint` (the stored epochs); one variable per weight array (lazy dask
        arrays over the store's chunks, dims `member`, `checkpoint`, then the spec's axis labels, see
        `weight_dims`), per metric (member, checkpoint), per hyperparameter (categoricals as their values: strings,
        or numbers when every category is one; "" / NaN for pending members), and `status` and `split` as strings,
        `seed`, `config`, `diverged_epoch`. Tables are read (and checksum-checked) now; weights only when computed.
        Works on stores of any version. `weights=False` leaves the weights out.
        """
        from pipeline.extras import require

        xr = require("xarray", extra="xarray", feature="Zoo.to_xarray()")
        variables: dict[str, Any] = {}

        def put(name: str, group: str, value: Any) -> None:
            variables[name if name not in variables else f"{group}.{name}"] = value

        if weights:
            import dask.array as da

            dims = weight_dims(self.layout.weight_shapes, self.attrs.get("spec"))
            for key in self.weight_keys:
                arr = self.root[f"weights/{key}"]
                put(key, "weights", (("member", "checkpoint", *dims[key]), da.from_zarr(arr, chunks=arr.chunks),
                                     {"group": "weights"}))
        for name in self.metric_names:
            put(name, "metrics", (("member", "checkpoint"), self.metric(name), {"group": "metrics"}))
        for name in (*self.layout.categorical, *self.layout.continuous):
            attrs: dict[str, Any] = {"group": "hparams"}
            values = self.hparam(name)
            if name in self.layout.categorical:
                values = _category_values(values, self.layout.categorical[name])
                attrs["categories"] = list(self.layout.categorical[name])
            put(name, "hparams", (("member",), values, attrs))
        codes = self.status.astype(np.int64)
        put("status", "members", (("member",), np.asarray(STATUS_NAMES)[codes], {"codes": list(STATUS_NAMES)}))
        try:  # rewritten by every build; a lost one reads as unassigned here (Zoo.split recomputes it)
            split = self.root["members/split_run"][:].astype(np.int64)
        except Exception:  # noqa: BLE001 - missing or unreadable
            split = np.full(self.n_members, -1, np.int64)
        put("split", "members", (("member",), np.asarray(["train", "val", "test", ""])[split],
                                 {"kind": "run", "codes": ["train", "val", "test"]}))
        for name in ("seed", "config", "diverged_epoch"):
            put(name, "members", (("member",), self._column(f"members/{name}"), {}))
        coords = {"member": np.arange(self.n_members, dtype=np.int64),
                  "checkpoint": ("checkpoint", np.asarray(self.checkpoint_epochs, np.int32), {"long_name": "epoch"})}
        task = self.attrs.get("task") or {}
        attrs = {"name": self.attrs.get("name", "zoo"), "kind": self.attrs.get("kind", "?"), "store": self.url,
                 "task": task.get("name") or "", "arch": json.dumps(self.arch) if self.arch is not None else ""}
        return xr.Dataset(variables, coords=coords, attrs=attrs)

    def loader(
        self,
        members: Any = None,
        checkpoints: Any = None,
        batch_size: int = 128,
        shuffle: bool = True,
        seed: int = 0,
        **kwargs: Any,
    ) -> ZooLoader:
        """Batches of (weights dict, member idx, checkpoint idx) over members x checkpoints; see `ZooLoader`."""
        from pipeline.zoo.loader import ZooLoader

        return ZooLoader(self, members, checkpoints, batch_size=batch_size, shuffle=shuffle, seed=seed, **kwargs)
