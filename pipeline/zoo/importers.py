"""Bring zoos trained elsewhere into the store format: a folder of PyTorch checkpoints, or the Small CNN Zoo release.

Both importers validate their input fully before the store is created, load weights without unpickling arbitrary
objects (`torch.load(weights_only=True)` or safetensors), flag runs with non-finite weights as diverged, and write
the same layout `unfzoo zoo` writes, so every later stage reads imported and generated zoos alike.
"""

from __future__ import annotations

import ast
import functools
import inspect
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import __version__
from pipeline.checkpoints import CHECKPOINT_SUFFIXES, load_checkpoint
from pipeline.errors import CheckpointError, StoreMismatchError
from pipeline.zoo.store import MemberBlock, StoreLayout, _jsonable, create_store, store_exists, write_members, write_splits
from pipeline.zoo.storelock import StoreLock

__all__ = ["import_checkpoints", "import_small_cnn_zoo", "load_state_dict", "parse_arch", "CHECKPOINT_SUFFIXES"]

_SMALL_CNN_METRICS = {"test_accuracy": "test_acc", "train_accuracy": "train_acc", "test_loss": "test_loss", "train_loss": "train_loss"}
_SMALL_CNN_HPARAMS = {"learning_rate": "lr", "l2reg": "weight_decay"}
_NOT_METRICS = {"step", "laststep", "modeldir", "model_dir", "run", "index"}


def parse_arch(arch: str | Mapping[str, Any]) -> dict[str, Any]:
    """An architecture from a dict, JSON text, or a .json/.toml file (a recipe's [arch] table is taken from it)."""
    if isinstance(arch, Mapping):
        return dict(arch)
    text = str(arch)
    path = Path(text)
    if path.suffix in (".json", ".toml") and path.is_file():
        if path.suffix == ".json":
            data = json.loads(path.read_text())
        else:
            import tomllib

            data = tomllib.loads(path.read_text())
        data = data.get("arch", data)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise CheckpointError(
                f"--arch {text!r} is neither JSON (e.g. '{{\"name\": \"mlp\", ...}}') nor a .json/.toml file"
            ) from err
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise CheckpointError(f"--arch must describe an architecture with a 'name' (cnn, mlp, ...); got {data!r}")
    return data


def load_state_dict(path: str | Path) -> dict[str, Any]:
    """Tensors of one checkpoint file, loaded safely and unwrapped (the same loader as `unfzoo score`)."""
    return dict(load_checkpoint(path).state)


def _refuse_existing(out: str, overwrite: bool) -> None:
    if store_exists(out) and not overwrite:
        raise StoreMismatchError(f"{out} already holds a zarr store; pass --overwrite to replace it")


def _blocks(n: int, k: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, k):
        yield start, min(start + k, n)


def _first_bad_epoch(weights: Mapping[str, np.ndarray], epochs: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(diverged (m,), first checkpoint epoch with a non-finite weight or -1) from {key: (m, C, ...)}."""
    bad = None
    for v in weights.values():
        b = ~np.isfinite(v.reshape(v.shape[0], v.shape[1], -1)).all(axis=2)  # (m, C)
        bad = b if bad is None else bad | b
    assert bad is not None
    diverged = bad.any(axis=1)
    first = np.where(diverged, np.asarray(epochs)[bad.argmax(axis=1)], -1).astype(np.int32)
    return diverged, first


def _hparam_columns(frame: Any) -> tuple[tuple[str, ...], dict[str, tuple[Any, ...]]]:
    """Split hyperparameter columns into continuous (numeric) and categorical (with sorted categories)."""
    import pandas as pd

    continuous, categorical = [], {}
    for name in frame.columns:
        col = frame[name]
        if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
            continuous.append(name)
        else:
            categorical[name] = tuple(sorted({_plain(v) for v in col}, key=str))
    return tuple(continuous), categorical


def _plain(v: Any) -> Any:
    v = v.item() if hasattr(v, "item") else v
    if isinstance(v, float) and not np.isfinite(v):
        return None
    return v


def _config_ids(frame: Any) -> np.ndarray:
    cols = [c for c in frame.columns if "seed" not in c.lower()]
    if not cols:
        return np.arange(len(frame), dtype=np.int64)
    return frame[cols].astype(str).groupby(cols, sort=False).ngroup().to_numpy(np.int64)


def _holding_lock(importer: Any) -> Any:
    """Run an importer holding the writer lock of its `out` store (`pipeline.zoo.storelock`), as `unfzoo zoo` does:
    a second writer of the same store is refused with StoreBusyError naming the holder."""

    @functools.wraps(importer)
    def locked(*args: Any, **kwargs: Any) -> Any:
        from pipeline.zoo.store import normalize_url

        out = inspect.signature(importer).bind(*args, **kwargs).arguments["out"]
        with StoreLock(normalize_url(out)):
            return importer(*args, **kwargs)

    return locked


# ---- a folder of PyTorch checkpoints ---------------------------------------------------------------------------------
@_holding_lock
def import_checkpoints(
    directory: str | Path,
    arch: str | Mapping[str, Any] | None,
    metrics_csv: str | Path,
    out: str,
    *,
    task: str | None = None,
    module: str | None = None,
    module_kwargs: str | Mapping[str, Any] | None = None,
    members_per_chunk: int = 64,
    overwrite: bool = False,
) -> int:
    """Import state-dict files listed in a CSV into a zoo store; returns the number of members.

    The architecture is a built-in one (`arch`) or the user's own (`module`: ``FILE.py:factory`` or
    ``package.module:factory``, called with `module_kwargs`, a dict or JSON text; see `pipeline.zoo.factory`).

    CSV columns: `file` (path relative to `directory`, required), `member` and `epoch` (optional: several rows of one
    member are its checkpoints; every member needs the same epochs), `hp.<name>` (hyperparameters), and any other
    columns, which must be numeric, become metrics (per checkpoint).
    """
    import pandas as pd
    import torch

    from pipeline.zoo.members import build_member, resolve_arch

    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint folder {directory} does not exist")
    if (arch is None) == (module is None):
        raise CheckpointError("give the architecture as exactly one of --arch (built-in) or --module (your factory)")
    task_obj = None
    if task is not None:
        from pipeline.zoo.tasks import load_task

        task_obj = load_task(task)
    factory = None
    if module is not None:
        from pipeline.zoo.factory import build_module, factory_record, parse_module_kwargs

        kwargs = parse_module_kwargs(module_kwargs)
        factory = factory_record(module, kwargs)
        net = build_module(module, kwargs)
        arch_d: dict[str, Any] | None = None
    else:
        arch_d = parse_arch(arch)  # type: ignore[arg-type]
        if task_obj is not None:
            arch_d = dict(resolve_arch(arch_d, task_obj))
        try:
            net = build_member(arch_d)
        except (TypeError, KeyError, ValueError) as err:
            raise CheckpointError(f"--arch {arch_d!r} cannot be built: {err}") from err
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}

    table = _read_csv(metrics_csv)
    if "file" not in table.columns:
        raise CheckpointError(f"{metrics_csv}: needs a 'file' column naming each checkpoint (relative to {directory})")
    hp_cols = [c for c in table.columns if c.startswith("hp.")]
    metric_cols = [c for c in table.columns if c not in ("file", "member", "epoch", *hp_cols)]
    for c in metric_cols:
        if not pd.api.types.is_numeric_dtype(table[c]):
            raise CheckpointError(f"{metrics_csv}: column {c!r} is not numeric; prefix hyperparameter columns with 'hp.'")
    table["file"] = _text_cells(table, "file", metrics_csv)
    table["member"] = _text_cells(table, "member", metrics_csv) if "member" in table.columns else table["file"]
    table["epoch"] = _epoch_cells(table, metrics_csv) if "epoch" in table.columns else 0
    if table.duplicated(["member", "epoch"]).any():
        dup = table[table.duplicated(["member", "epoch"], keep=False)].iloc[0]
        raise CheckpointError(f"{metrics_csv}: member {dup['member']!r} has two rows for epoch {dup['epoch']}")
    names = list(dict.fromkeys(table["member"]))
    epochs = tuple(sorted(table["epoch"].unique().tolist()))
    counts = table.groupby("member").size()
    if (counts != len(epochs)).any():
        bad = counts[counts != len(epochs)].index[0]
        raise CheckpointError(f"{metrics_csv}: member {bad!r} lacks some of the epochs {list(epochs)}")
    for i, f in enumerate(table["file"]):
        _check_inside(directory, f, f"{metrics_csv} line {i + 2}")
        if not (directory / f).is_file():
            raise CheckpointError(f"{metrics_csv} line {i + 2}: file {f!r} is not in {directory}")
        if Path(f).suffix not in CHECKPOINT_SUFFIXES:
            raise CheckpointError(f"{metrics_csv} line {i + 2}: file {f!r} is not one of {', '.join(CHECKPOINT_SUFFIXES)}")

    firsts = table.drop_duplicates("member").set_index("member").loc[names]
    hp_frame = firsts[hp_cols].rename(columns=lambda c: c[3:]).reset_index(drop=True)
    continuous, categorical = _hparam_columns(hp_frame)
    layout = StoreLayout(
        weight_shapes=expected,
        metric_names=tuple(metric_cols),
        checkpoint_epochs=epochs,
        members_per_chunk=members_per_chunk,
        continuous=continuous,
        categorical=categorical,
    )
    attrs = {
        "kind": "import",
        "name": directory.name,
        "source": {"format": "checkpoints", "directory": str(directory), "metrics_csv": str(metrics_csv)},
        "arch": ({k: v for k, v in arch_d.items() if k != "activation"} if arch_d is not None
                 and "activation" in categorical else arch_d),
        **({"module": factory} if factory is not None else {}),
        "task": {"name": task, "params": {}, "fingerprint": getattr(task_obj, "fingerprint", None)} if task else None,
        "spec": _spec_for(net, task_obj),
        "checkpoint_epochs": list(epochs),
        "members_per_chunk": members_per_chunk,
        "version": __version__,
    }
    _refuse_existing(out, overwrite)
    option = "--module" if factory is not None else "--arch"
    for f in table["file"]:  # a first pass checks every file, so a bad one stops the import before anything is written
        _check_state(load_state_dict(directory / f), expected, directory / f, option)
    create_store(out, layout, _jsonable(attrs), len(names))
    rows = table.set_index(["member", "epoch"])
    configs = _config_ids(hp_frame)
    for start, stop in _blocks(len(names), members_per_chunk):
        m = stop - start
        weights = {k: np.empty((m, len(epochs), *s), np.float32) for k, s in expected.items()}
        metrics = {c: np.empty((m, len(epochs)), np.float32) for c in metric_cols}
        for i, name in enumerate(names[start:stop]):
            for j, epoch in enumerate(epochs):
                row = rows.loc[(name, epoch)]
                path = directory / row["file"]
                state = load_state_dict(path)
                for k in expected:
                    weights[k][i, j] = state[k].detach().to(torch.float32).numpy()
                for c in metric_cols:
                    metrics[c][i, j] = row[c]
        diverged, first = _first_bad_epoch(weights, epochs)
        write_members(
            out,
            start,
            MemberBlock(
                weights=weights,
                metrics=metrics,
                hparams={c: hp_frame[c].to_numpy()[start:stop] for c in hp_frame.columns},
                seed=np.full(m, -1, np.int64),
                config=configs[start:stop],
                diverged=diverged,
                diverged_epoch=first,
            ),
        )
    write_splits(out)
    return len(names)


def _read_csv(path: str | Path, **kwargs: Any) -> Any:
    """pandas.read_csv with every way it fails on a user's file turned into a CheckpointError naming the file."""
    import pandas as pd

    try:
        return pd.read_csv(path, **kwargs)
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{path}: not UTF-8 text (it holds byte 0x{err.object[err.start]:02x}); "
                              "save it as UTF-8, e.g. `iconv -f latin1 -t utf-8`") from err
    except (OSError, EOFError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise CheckpointError(f"cannot read CSV {path}: {err}") from err


def _text_cells(table: Any, column: str, path: str | Path) -> Any:
    """The column as strings; an empty cell is refused naming its line (line 1 is the header)."""
    empty = table[column].isna() | (table[column].astype(str).str.strip() == "")
    if empty.any():
        raise CheckpointError(f"{path} line {int(empty.to_numpy().argmax()) + 2}: the {column!r} cell is empty")
    return table[column].astype(str)


def _epoch_cells(table: Any, path: str | Path) -> Any:
    """The 'epoch' column as non-negative integers; an empty or non-integer cell is refused naming its line."""
    import pandas as pd

    raw = table["epoch"]
    values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(values) & (values >= 0) & (values < 2**53) & (values == np.round(values))
    if not ok.all():
        i = int((~ok).argmax())
        cell = "" if pd.isna(raw.iloc[i]) else str(raw.iloc[i])
        raise CheckpointError(f"{path} line {i + 2}: epoch {cell!r} is not a non-negative integer")
    return pd.Series(values.astype(np.int64), index=table.index)


def _check_inside(directory: Path, name: str, where: str) -> None:
    """Refuse a listed file that resolves outside `directory` (an absolute path, '..', or a symlink leading out)."""
    root = directory.resolve()
    target = (directory / name).resolve()
    if Path(name).is_absolute() or not target.is_relative_to(root):
        raise CheckpointError(f"{where}: file {name!r} lies outside the checkpoint folder {directory}; list files "
                              "relative to it (copy the file in if it belongs to the zoo)")


def _check_state(state: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], path: Path,
                 option: str = "--arch") -> None:
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        raise CheckpointError(
            f"{path}: keys do not match the architecture (missing {missing[:3]}, unexpected {extra[:3]}); "
            f"check {option}"
        )
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise CheckpointError(f"{path}: tensor {k!r} has shape {tuple(state[k].shape)}, the architecture expects {shape}")


def _spec_for(module: Any, task: Any = None) -> dict[str, Any] | None:
    from pipeline.zoo.build import _spec_dict

    return _spec_dict(module, task)


# ---- the Small CNN Zoo release -----------------------------------------------------------------------------------------
def _read_layout(path: Path) -> list[dict[str, Any]]:
    frame = _read_csv(path)
    need = {"varname", "start_idx", "end_idx", "shape"}
    if not need <= set(frame.columns):
        raise CheckpointError(f"{path}: needs columns {sorted(need)}; has {list(frame.columns)}")
    out = []
    for row in frame.itertuples(index=False):
        try:
            shape = tuple(int(s) for s in ast.literal_eval(str(row.shape)))
        except (ValueError, SyntaxError, TypeError) as err:
            raise CheckpointError(f"{path}: variable {row.varname!r} has an unreadable shape {row.shape!r}") from err
        start, end = int(row.start_idx), int(row.end_idx)
        if end - start != int(np.prod(shape)):
            raise CheckpointError(f"{path}: variable {row.varname!r} spans {end - start} values but has shape {shape}")
        out.append({"varname": str(row.varname), "start": start, "end": end, "shape": shape})
    return out


_VAR = re.compile(r"^(?:.*/)?(?P<layer>conv2d|dense)(?:_(?P<num>\d+))?/(?P<kind>kernel|bias)(?::\d+)?$")


def _small_cnn_tensors(layout: list[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    """Layers in network order, each {"name", "kind", "kernel": var, "bias": var}, from TF variable names."""
    layers: dict[tuple[int, int], dict[str, Any]] = {}
    for var in layout:
        match = _VAR.match(var["varname"])
        if match is None:
            raise CheckpointError(f"{path}: variable {var['varname']!r} is not a conv2d/dense kernel or bias")
        order = (0 if match["layer"] == "conv2d" else 1, int(match["num"] or 0))
        layers.setdefault(order, {"kind": match["layer"]})[match["kind"]] = var
    out = []
    for i, (order, layer) in enumerate(sorted(layers.items())):
        if "kernel" not in layer or "bias" not in layer:
            raise CheckpointError(f"{path}: layer {layer['kind']}_{order[1]} lacks its kernel or bias")
        out.append(layer)
    return out


def _to_torch(kind: str, kernel: np.ndarray) -> np.ndarray:
    """TF kernels to PyTorch: conv HWIO -> OIHW, dense (in, out) -> (out, in). Works on a leading batch axis."""
    if kind == "conv2d":
        return kernel.transpose(0, 4, 3, 1, 2)  # (n, H, W, I, O) -> (n, O, I, H, W)
    return kernel.transpose(0, 2, 1)  # (n, in, out) -> (n, out, in)


def small_cnn_arch(layers: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The `cnn` architecture matching Small CNN Zoo layers, or None when our `cnn` cannot express them."""
    try:
        from pipeline.zoo.members import small_cnn_zoo_arch
    except ImportError:
        return None
    convs = [tuple(layer["kernel"]["shape"]) for layer in layers if layer["kind"] == "conv2d"]
    denses = [tuple(layer["kernel"]["shape"]) for layer in layers if layer["kind"] == "dense"]
    return small_cnn_zoo_arch(convs, denses)


@_holding_lock
def import_small_cnn_zoo(
    directory: str | Path,
    out: str,
    *,
    members_per_chunk: int = 64,
    overwrite: bool = False,
) -> int:
    """Import a Small CNN Zoo folder (weights.npy, metrics.csv.gz, layout.csv); returns the number of runs.

    Each row of weights.npy is one (run, checkpoint): runs are the distinct `modeldir` values of metrics.csv.gz (rows
    are their own runs without it) and checkpoints the distinct `step` values. Kernels are converted from TF's HWIO
    to PyTorch's OIHW (dense kernels transposed); runs with non-finite weights or missing steps are flagged diverged.
    """
    import pandas as pd

    directory = Path(directory)
    files = {n: directory / n for n in ("weights.npy", "metrics.csv.gz", "layout.csv")}
    for name, path in files.items():
        if not path.is_file():
            raise CheckpointError(f"{directory} is not a Small CNN Zoo folder: {name} is missing")
    layout_vars = _read_layout(files["layout.csv"])
    layers = _small_cnn_tensors(layout_vars, files["layout.csv"])
    try:
        flat = np.load(files["weights.npy"], mmap_mode="r")
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{files['weights.npy']}: not a readable .npy array ({err})") from err
    width = max(v["end"] for v in layout_vars)
    if flat.ndim != 2 or flat.shape[1] < width:
        raise CheckpointError(f"{files['weights.npy']}: shape {flat.shape}, layout.csv needs (rows, {width})")
    table = _read_csv(files["metrics.csv.gz"], compression="gzip")
    table = table.drop(columns=[c for c in table.columns if str(c).startswith("Unnamed")])
    if len(table) != flat.shape[0]:
        raise CheckpointError(
            f"{files['metrics.csv.gz']} has {len(table)} rows but weights.npy has {flat.shape[0]}; they must match row by row"
        )

    run_col = next((c for c in ("modeldir", "model_dir", "run") if c in table.columns), None)
    run_key = table[run_col].astype(str) if run_col else pd.Series(np.arange(len(table)).astype(str))
    runs, run_idx = np.unique(run_key.to_numpy(), return_inverse=True)  # members sorted by run name
    first_row = pd.Series(np.arange(len(table))).groupby(run_idx).min().to_numpy()  # (runs,) a row of each run
    steps = table["step"].astype(int).to_numpy() if "step" in table.columns else np.zeros(len(table), int)
    epochs = tuple(int(s) for s in np.unique(steps))
    step_idx = np.searchsorted(np.asarray(epochs), steps)
    grid = np.full((len(runs), len(epochs)), -1, dtype=np.int64)  # (runs, checkpoints) -> row of weights.npy
    grid[run_idx, step_idx] = np.arange(len(table))

    metric_cols = {c: _SMALL_CNN_METRICS.get(c, c) for c in table.columns if not str(c).startswith("config.")
                   and c not in _NOT_METRICS and c != run_col and pd.api.types.is_numeric_dtype(table[c])}
    config_cols = [c for c in table.columns if str(c).startswith("config.")]
    firsts = table.iloc[first_row].reset_index(drop=True)
    hp_frame = firsts[config_cols].rename(columns=lambda c: _SMALL_CNN_HPARAMS.get(c[7:], c[7:]))
    continuous, categorical = _hparam_columns(hp_frame)
    seeds = firsts["config.random_seed"].fillna(-1).astype(np.int64).to_numpy() if "config.random_seed" in firsts else None

    names = _small_cnn_names(layers)
    shapes: dict[str, tuple[int, ...]] = {}
    for layer, (w_name, b_name) in zip(layers, names):
        k_shape = layer["kernel"]["shape"]
        shapes[w_name] = tuple(_to_torch(layer["kind"], np.empty((1, *k_shape), np.float32)).shape[1:])
        shapes[b_name] = tuple(layer["bias"]["shape"])
    arch = small_cnn_arch(layers)
    layout = StoreLayout(
        weight_shapes=shapes,
        metric_names=tuple(metric_cols.values()),
        checkpoint_epochs=epochs,
        members_per_chunk=members_per_chunk,
        continuous=continuous,
        categorical=categorical,
    )
    attrs = {
        "kind": "import",
        "name": directory.name,
        "source": {"format": "small-cnn-zoo", "directory": str(directory), "varnames": [v["varname"] for v in layout_vars]},
        "arch": arch,
        "spec": _spec_for(_build(arch)) if arch else None,
        "checkpoint_epochs": list(epochs),
        "members_per_chunk": members_per_chunk,
        "version": __version__,
    }
    _refuse_existing(out, overwrite)
    create_store(out, layout, _jsonable(attrs), len(runs))
    configs = _config_ids(hp_frame)
    metric_values = {new: table[old].to_numpy(np.float32) for old, new in metric_cols.items()}
    for start, stop in _blocks(len(runs), members_per_chunk):
        rows = grid[start:stop]  # (m, C)
        missing = rows < 0
        take = np.where(missing, 0, rows)
        block = np.asarray(flat[np.sort(np.unique(take))])  # read each needed row once
        pos = np.searchsorted(np.sort(np.unique(take)), take)  # (m, C) positions into block
        weights = {}
        for layer, (w_name, b_name) in zip(layers, names):
            kv, bv = layer["kernel"], layer["bias"]
            kern = block[:, kv["start"] : kv["end"]].reshape(-1, *kv["shape"])
            weights[w_name] = _to_torch(layer["kind"], kern)[pos]  # (m, C, *torch shape)
            weights[b_name] = block[:, bv["start"] : bv["end"]].reshape(-1, *bv["shape"])[pos]
        for v in weights.values():
            v[missing] = np.nan
        metrics = {}
        for name, values in metric_values.items():
            mv = values[take]
            mv[missing] = np.nan
            metrics[name] = mv
        diverged, first = _first_bad_epoch(weights, epochs)
        m = stop - start
        write_members(
            out,
            start,
            MemberBlock(
                weights={k: np.ascontiguousarray(v, dtype=np.float32) for k, v in weights.items()},
                metrics=metrics,
                hparams={c: hp_frame[c].to_numpy()[start:stop] for c in hp_frame.columns},
                seed=seeds[start:stop] if seeds is not None else np.full(m, -1, np.int64),
                config=configs[start:stop],
                diverged=diverged,
                diverged_epoch=first,
            ),
        )
    write_splits(out)
    return len(runs)


def _small_cnn_names(layers: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """State-dict names for each layer: the `cnn` member's names when it can express the zoo, else conv{i}/dense."""
    arch = small_cnn_arch(layers)
    if arch is not None:
        keys = list(_build(arch).state_dict())
        return [(keys[2 * i], keys[2 * i + 1]) for i in range(len(layers))]
    names, conv = [], 0
    for layer in layers:
        if layer["kind"] == "conv2d":
            conv += 1
            names.append((f"conv{conv}.weight", f"conv{conv}.bias"))
        else:
            names.append(("dense.weight", "dense.bias") if layer is layers[-1] else (f"dense{len(names)}.weight", f"dense{len(names)}.bias"))
    return names


def _build(arch: Mapping[str, Any]) -> Any:
    from pipeline.zoo.members import build_member

    return build_member(dict(arch))
