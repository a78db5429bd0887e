"""Batch-score checkpoint files and zoo members with a trained weight-space predictor, one verdict per input.

Files are read in windows (by Dask workers when there are many, in the calling process otherwise), matched against
the predictor's spec, stacked per shape and scored in batches on the predictor's device. Only a few windows are in
flight at a time, so memory stays bounded however many files there are. A file that cannot be read or does not
match gets an error row; the others are still scored.
"""

from __future__ import annotations

import glob
import logging
import math
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.checkpoints import CHECKPOINT_SUFFIXES, CheckpointBatch, SpecMatcher, error_text, read_checkpoints
from pipeline.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["OUTPUT_COLUMNS", "ScoreInputs", "discover_inputs", "local_cluster_pays_off", "printable", "score_checkpoints"]

OUTPUT_COLUMNS: tuple[str, ...] = (
    "path",  # the file, or the zoo directory for zoo members
    "member",  # zoo member index (zoo inputs only)
    "checkpoint",  # zoo checkpoint epoch (zoo inputs only)
    "status",  # "ok" | "error"
    "prediction",  # the predictor's output (NaN on error)
    "error",  # why the input was not scored ('' when ok)
    "format",  # "torch" | "safetensors" | "zoo"
    "wrapper",  # container keys walked to reach the state dict, e.g. "state_dict" ('' for a bare state dict)
    "stripped_prefix",  # key prefix removed, e.g. "module." ('' when none)
    "widths",  # permutable labels sized unlike the predictor's zoo, e.g. "convs.0=32,convs.1=32" ('' when none)
    "ignored_keys",  # tensors of the file outside the predictor's weight space (other prefixes, buffers)
)
# When a LocalCluster pays off: starting and closing one costs seconds (each worker process imports distributed and
# torch), reading a small checkpoint ~2 ms; the main process also scores, so w workers give about w - 0.3 times the
# reading speed. Measured on 2 cores (benchmarks/bench_score.py): break-even near 10,000 files; fewer with more cores.
CLUSTER_OVERHEAD_S = 9.0
SECONDS_PER_FILE = 0.002
_ZOO_MARKERS = ("zarr.json", ".zgroup")
_IN_FLIGHT_PER_WORKER = 2  # Dask windows queued per worker
_PREDICT_QUEUE = 2  # batches waiting for the predictor thread
Key = tuple[int, int]  # (input position, member index or 0): rows sort into input order


@dataclass(frozen=True)
class ScoreInputs:
    """What the user's inputs resolve to, in input order: ("file" | "zoo", Path) or ("missing", (input, why))."""

    items: tuple[tuple[str, Any], ...]

    @property
    def files(self) -> list[Path]:
        return [v for k, v in self.items if k == "file"]

    @property
    def zoos(self) -> list[Path]:
        return [v for k, v in self.items if k == "zoo"]

    @property
    def missing(self) -> list[tuple[str, str]]:
        """(input, why) for each input that names nothing."""
        return [v for k, v in self.items if k == "missing"]


def _is_zoo(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in _ZOO_MARKERS)


def _walk(directory: Path) -> Iterator[Path]:
    """Checkpoint files under `directory`, recursively, sorted; zoo stores inside are not descended into."""
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not _is_zoo(Path(root) / d))
        for name in sorted(files):
            if name.endswith(CHECKPOINT_SUFFIXES):
                yield Path(root) / name


def discover_inputs(inputs: Iterable[str | os.PathLike[str]]) -> ScoreInputs:
    """Resolve files, directories (recursive), globs (``**`` allowed) and zarr zoo paths; duplicates are dropped.

    A file named explicitly is read whatever its suffix (loading is safe either way); directories and globs yield
    only .pt/.pth/.ckpt/.bin/.safetensors files. Zoo stores stay whole (scored member by member).
    """
    items: list[tuple[str, Any]] = []
    seen: set[str] = set()
    for raw in inputs:
        text = os.fspath(raw)
        path = Path(text)
        if path.exists():
            candidates = [path]
        elif glob.has_magic(text):
            candidates = [Path(p) for p in sorted(glob.glob(text, recursive=True))]
            candidates = [p for p in candidates if p.is_dir() or p.name.endswith(CHECKPOINT_SUFFIXES)]
            if not candidates:
                items.append(("missing", (text, "the pattern matches no checkpoint file")))
        else:
            items.append(("missing", (text, "no such file or directory")))
            candidates = []
        for cand in candidates:
            kind = "zoo" if _is_zoo(cand) else "dir" if cand.is_dir() else "file"
            for file in _walk(cand) if kind == "dir" else [cand]:
                real = os.path.abspath(file)
                if real not in seen:
                    seen.add(real)
                    items.append(("zoo" if kind == "zoo" else "file", file))
    return ScoreInputs(tuple(items))


# ----------------------------------------------------------------------------------------------- reading (workers)


def _default_workers() -> int:
    return max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8))


def local_cluster_pays_off(n_files: int, n_workers: int | None = None) -> bool:
    """Whether reading `n_files` on a fresh LocalCluster of `n_workers` processes beats reading them in-process."""
    n_workers = n_workers or _default_workers()
    saved = n_files * SECONDS_PER_FILE * (1 - 1 / max(n_workers - 0.3, 1.0))
    return saved > CLUSTER_OVERHEAD_S


@contextmanager
def _dask_client(scheduler: Any, workers: int | None, n_files: int) -> Iterator[Any]:
    """A Dask client for reading files, or None for the in-process path; a LocalCluster made here is closed here."""
    if workers is not None and workers < 0:
        raise ConfigError(f"--workers must be 0 (read in-process) or more, got {workers}")
    if scheduler is not None and not isinstance(scheduler, str):
        yield scheduler  # an existing distributed.Client: the caller owns it
        return
    if n_files == 0 or scheduler in ("sync", "synchronous") or (scheduler is None and workers == 0):
        yield None
        return
    if scheduler is None and workers is None and not local_cluster_pays_off(n_files):
        yield None
        return
    from distributed import Client, LocalCluster

    if scheduler in (None, "local"):
        n = workers or _default_workers()
        cluster = LocalCluster(
            n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0",  # None still binds 8787
            silence_logs=logging.ERROR,
        )
        with cluster, Client(cluster) as client:
            yield client
        return
    try:
        client = Client(scheduler, timeout="20s")
    except (OSError, TimeoutError, ValueError) as err:
        raise ConfigError(f"--scheduler {scheduler!r}: no Dask scheduler answers there ({err})") from err
    with client:
        yield client


def _n_workers(client: Any) -> int:
    return max(1, len(client.scheduler_info(n_workers=-1).get("workers", {})))


_Stream = Iterator[tuple[Sequence[tuple[Key, str]], "CheckpointBatch | BaseException"]]


def _windows_in_process(windows: Sequence[Sequence[tuple[Key, str]]], matcher: SpecMatcher) -> _Stream:
    for window in windows:
        yield window, read_checkpoints(window, matcher)


def _windows_dask(client: Any, windows: Sequence[Sequence[tuple[Key, str]]], matcher: SpecMatcher) -> _Stream:
    """Submit windows with at most a few per worker in flight; yield each as it finishes (any order)."""
    from distributed import as_completed

    limit = _IN_FLIGHT_PER_WORKER * _n_workers(client)
    [matcher_future] = client.scatter([matcher], broadcast=True)  # travels as the spec's dict
    todo = iter(windows)
    owner: dict[str, Sequence[tuple[Key, str]]] = {}
    running = as_completed()

    def submit() -> None:
        window = next(todo, None)
        if window is not None:
            future = client.submit(read_checkpoints, list(window), matcher_future, pure=False)
            owner[future.key] = window
            running.add(future)

    for _ in range(limit):
        submit()
    for future in running:
        window = owner.pop(future.key)
        try:
            result: CheckpointBatch | BaseException = future.result()
        except Exception as err:  # noqa: BLE001 - a lost worker fails its window's files, not the whole run
            result = err
        future.release()
        submit()
        yield window, result


# ----------------------------------------------------------------------------------------------------------- scoring


class _Batcher:
    """Buffers matched weights per shape signature and scores full batches of `batch_size` members.

    Predictor calls run on one background thread, at most `_PREDICT_QUEUE` batches ahead: torch releases the GIL in
    its kernels, so scoring overlaps with reading the next files (which holds the GIL while it unpickles).
    """

    def __init__(self, predictor: Any, batch_size: int, rows: dict[Key, dict[str, Any]]):
        self.predictor, self.batch_size, self.rows = predictor, batch_size, rows
        self.names = list(predictor.spec.names)
        self.groups: dict[Any, tuple[list[Key], dict[str, list[np.ndarray]]]] = {}
        self.buffered = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="unfzoo-score")
        self._pending: deque[Future[None]] = deque()

    def __enter__(self) -> _Batcher:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self.flush()
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def add(self, sig: Any, keys: list[Key], arrays: Mapping[str, np.ndarray]) -> None:
        if not keys:
            return
        group_keys, parts = self.groups.setdefault(sig, ([], {n: [] for n in self.names}))
        group_keys.extend(keys)
        for name in self.names:
            parts[name].append(arrays[name])
        self.buffered += len(keys)
        if len(group_keys) >= self.batch_size:
            self._drain(sig, full_only=True)
        if self.buffered >= 4 * self.batch_size:  # many distinct widths: keep the buffer bounded anyway
            self.flush()

    def flush(self) -> None:
        """Score everything buffered, partial batches included."""
        for sig in list(self.groups):
            self._drain(sig, full_only=False)

    def _drain(self, sig: Any, full_only: bool) -> None:
        keys, parts = self.groups.pop(sig)
        stacked = {n: np.concatenate(p) if len(p) > 1 else p[0] for n, p in parts.items()}  # (n, *shape)
        stop = len(keys) - len(keys) % self.batch_size if full_only else len(keys)
        for start in range(0, stop, self.batch_size):
            end = min(start + self.batch_size, stop)
            self._pending.append(self._pool.submit(
                self._predict, keys[start:end], {n: a[start:end] for n, a in stacked.items()}))
            while len(self._pending) > _PREDICT_QUEUE:
                self._pending.popleft().result()
        self.buffered -= stop
        if stop < len(keys):
            self.groups[sig] = (keys[stop:], {n: [a[stop:]] for n, a in stacked.items()})

    def _predict(self, keys: list[Key], arrays: Mapping[str, np.ndarray]) -> None:
        import torch

        weights = {name: torch.from_numpy(arrays[name]) for name in self.names}  # (n, *shape) each
        try:
            preds = np.asarray(self.predictor.predict(weights), dtype=np.float64).reshape(len(keys))
        except (RuntimeError, ValueError) as err:  # e.g. a width the predictor cannot take: these rows fail
            for key in keys:
                self.rows[key].update(status="error", error=f"prediction failed: {error_text(err)}")
            return
        for key, value in zip(keys, preds):
            if math.isfinite(value):
                self.rows[key]["prediction"] = float(value)
            else:
                self.rows[key].update(status="error", error=f"the predictor returned {value} (non-finite)")


@dataclass
class _ZooInput:
    pos: int
    path: Path
    zoo: Any
    index: int  # checkpoint index
    epoch: int
    widths: str
    spec: Any = None  # the predictor's spec, when each member is scored at its own width (see `_score_zoo`)


def _widths_text(spec: Any, shapes: Mapping[str, Sequence[int]], allow: bool) -> str:
    """The permutable labels `shapes` sizes unlike `spec` (the predictor's zoo), e.g. "convs.0=32,convs.1=32"."""
    sizes, reference = spec.check(shapes, allow_other_widths=allow), spec.sizes
    return ",".join(f"{label}={n}" for label, n in sizes.items() if n != reference.get(label, n))


def _open_zoos(found: ScoreInputs, spec: Any, allow: bool, checkpoint: int | str,
               rows: dict[Key, dict[str, Any]]) -> list[_ZooInput]:
    """Open each zoo input and check its checkpoint and spec; a zoo that does not fit gets one error row."""
    from pipeline.zoo.store import Zoo

    out = []
    for pos, (kind, path) in enumerate(found.items):
        if kind != "zoo":
            continue
        base = {"path": str(path), "format": "zoo"}
        try:
            zoo = Zoo.open(path)
            epochs = list(zoo.checkpoint_epochs)
            if checkpoint in ("final", "last", -1):
                index = len(epochs) - 1
            elif int(checkpoint) in epochs:
                index = epochs.index(int(checkpoint))
            else:
                raise ConfigError(
                    f"--checkpoint {checkpoint}: {path} stores epochs {epochs}; use one of them or 'final'"
                )
            widths = _widths_text(spec, zoo.weight_shapes, allow)
        except ConfigError:
            raise
        except Exception as err:  # noqa: BLE001 - an unreadable or mismatched zoo is one error row
            rows[(pos, 0)] = {**base, "status": "error", "error": f"{path}: {error_text(err)}"}
            continue
        # a width-agnostic predictor scores each member at its own width, as `unfzoo train` read it (narrower members
        # of a zoo with a `width` hyperparameter are stored zero-padded: the same function, other weights); a
        # fixed-width one (flat) reads them padded, as it was trained
        out.append(_ZooInput(pos, path, zoo, index, epochs[index], widths, spec if allow else None))
    return out


def _score_zoo(item: _ZooInput, batcher: _Batcher, rows: dict[Key, dict[str, Any]], batch_size: int,
               advance: Callable[[int], None]) -> None:
    """Score every member at one checkpoint, reading whole chunks; pending or non-finite members get error rows."""
    from pipeline.zoo.store import DIVERGED, DONE, STATUS_NAMES

    zoo, names = item.zoo, batcher.names
    status = np.asarray(zoo.status)
    chunk = max(1, int(zoo.members_per_chunk))
    step = chunk * max(1, batch_size // chunk)
    sig = tuple(tuple(zoo.weight_shapes[n]) for n in names)
    for start in range(0, zoo.n_members, step):
        stop = min(start + step, zoo.n_members)
        data = zoo.read_weights(slice(start, stop), [item.index])
        arrays = {n: np.ascontiguousarray(data[n][:, 0], dtype=np.float32) for n in names}  # (n, *shape)
        finite = np.ones(stop - start, dtype=bool)
        for a in arrays.values():
            finite &= np.isfinite(a.reshape(len(a), -1)).all(axis=1)
        ok = []
        for j, member in enumerate(range(start, stop)):
            key = (item.pos, member)
            row = {
                "path": str(item.path), "member": member, "checkpoint": item.epoch, "format": "zoo",
                "widths": item.widths, "ignored_keys": 0,
            }
            if status[member] not in (DONE, DIVERGED):
                row.update(status="error", error=f"member {member} is {STATUS_NAMES[status[member]]} (not trained)")
            elif not finite[j]:
                row.update(status="error", error=f"member {member} has non-finite weights at epoch {item.epoch}")
            else:
                row["status"] = "ok"
                ok.append(j)
            rows[key] = row
        if item.spec is None:
            batcher.add(sig, [(item.pos, start + j) for j in ok], {n: a[ok] for n, a in arrays.items()})
        else:
            _add_at_own_widths(item, batcher, rows, start, ok, arrays)
        advance(stop - start)


def _add_at_own_widths(item: _ZooInput, batcher: _Batcher, rows: dict[Key, dict[str, Any]], start: int,
                       ok: list[int], arrays: Mapping[str, np.ndarray]) -> None:
    """Scores members `start + ok` of a zoo block each at its own width (`Zoo.member_shapes`), grouped by shapes."""
    from pipeline.zoo.members import crop_to_shapes

    if not ok:
        return
    names = batcher.names
    own = item.zoo.member_shapes(np.asarray(ok, dtype=np.int64) + start)
    groups: dict[tuple, list[int]] = {}
    for j, shapes in zip(ok, own):
        groups.setdefault(tuple(tuple(shapes[n]) for n in names), []).append(j)
    for sig, js in groups.items():
        shapes = dict(zip(names, sig))
        widths = _widths_text(item.spec, shapes, True)
        for j in js:
            rows[(item.pos, start + j)]["widths"] = widths
        cropped = crop_to_shapes(arrays, shapes)  # views; the row selection is the one copy
        batcher.add(sig, [(item.pos, start + j) for j in js], {n: a[js] for n, a in cropped.items()})


@contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Callable[[int], None]]:
    """Progress on stderr: a rich bar on a terminal, a line every ~5% of the files in a file or pipe; yields
    `advance(n)`."""
    from rich.console import Console

    from pipeline.progress import ProgressReporter

    with ProgressReporter("scoring", total, unit="inputs", console=Console(stderr=True), enabled=enabled) as bar:
        yield bar.advance


def printable(text: str) -> str:
    """`text` as valid UTF-8 whatever it holds: bytes of a file name that are not UTF-8 (which Python keeps as lone
    surrogates) become backslash escapes, e.g. b"caf\\xe9.pt" -> "caf\\xe9.pt", so any name can be written to a
    CSV/Parquet table or a terminal."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no file name decodes to
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _frame(rows: Mapping[Key, Mapping[str, Any]]) -> pd.DataFrame:
    """Rows in input order (zoo members in member order) with every output column and stable dtypes; text columns
    are `printable`."""
    import pandas as pd

    records = [{c: printable(v) if isinstance(v, str) else v for c, v in rows[k].items()} for k in sorted(rows)]
    frame = pd.DataFrame.from_records(records, columns=list(OUTPUT_COLUMNS))
    frame["status"] = frame["status"].fillna("error").astype(str)
    for col in ("error", "format", "wrapper", "stripped_prefix", "widths"):
        frame[col] = frame[col].astype(object).fillna("").astype(str)
    frame["prediction"] = frame["prediction"].astype("float64")
    for col in ("member", "checkpoint", "ignored_keys"):
        frame[col] = frame[col].astype("Int64")
    return frame


def score_checkpoints(
    predictor: Any,
    inputs: Iterable[str | os.PathLike[str]],
    *,
    batch_size: int = 256,
    scheduler: Any = None,
    workers: int | None = None,
    checkpoint: int | str = "final",
    progress: bool = False,
) -> pd.DataFrame:
    """Score checkpoint files, directories, globs and zoo stores; one row per file or zoo member (`OUTPUT_COLUMNS`).

    `predictor` has `.spec`, `.width_agnostic` and `.predict({name: (N, *shape)}) -> (N,)` (see
    `pipeline.predict.load_predictor`). Files are read by Dask workers: `scheduler` None starts a LocalCluster of
    `workers` processes (default one per core) when `workers` is given or `local_cluster_pays_off`, and reads
    in-process otherwise; 'sync' reads in-process, 'local' forces a LocalCluster, any other string is a scheduler
    address, and a `distributed.Client` is used as is. `workers=0` reads in-process. Zoo members are scored at
    `checkpoint` (an epoch it stores, or 'final'). Raises ConfigError when no input exists or an option is invalid.
    """
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    found = discover_inputs(inputs)
    if not found.files and not found.zoos:
        detail = "; ".join(f"{t}: {why}" for t, why in found.missing) or "no .pt/.pth/.ckpt/.bin/.safetensors file"
        raise ConfigError(f"no checkpoints found ({detail})")
    spec, allow = predictor.spec, bool(predictor.width_agnostic)
    rows: dict[Key, dict[str, Any]] = {}
    files: list[tuple[Key, str]] = []
    for pos, (kind, value) in enumerate(found.items):
        if kind == "file":
            files.append(((pos, 0), str(value)))
            rows[(pos, 0)] = {"path": str(value)}
        elif kind == "missing":
            rows[(pos, 0)] = {"path": value[0], "status": "error", "error": f"{value[0]}: {value[1]}"}
    zoos = _open_zoos(found, spec, allow, checkpoint, rows)

    matcher = SpecMatcher(spec, allow)
    total = len(files) + sum(z.zoo.n_members for z in zoos)
    with _progress(progress, total) as advance, _Batcher(predictor, batch_size, rows) as batcher:
        with _dask_client(scheduler, workers, len(files)) as client:
            size = batch_size if client is None else int(min(512, max(16, len(files) // (8 * _n_workers(client)))))
            windows = [files[i : i + size] for i in range(0, len(files), size)]
            stream = (_windows_in_process(windows, matcher) if client is None
                      else _windows_dask(client, windows, matcher))
            for window, result in stream:
                if isinstance(result, BaseException):
                    for key, _ in window:
                        rows[key].update(status="error", error=f"worker failed: {error_text(result)}")
                else:
                    for key, meta in result.rows:
                        rows[key].update(meta)
                    for sig, (keys, arrays) in result.groups.items():
                        batcher.add(sig, keys, arrays)
                advance(len(window))
        for item in zoos:
            _score_zoo(item, batcher, rows, batch_size, advance)
    return _frame(rows)
