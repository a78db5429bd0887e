"""Build a zoo: recipe -> chunks -> (Dask) training tasks -> zarr store, resumable and extensible.

`build_zoo` validates everything before it writes anything, creates or grows the store in this process (the only
place arrays are created or resized), then trains each pending chunk as one task that reopens the store and writes
that chunk alone, status last. Killing it at any moment and running it again finishes the same zoo, bit for bit.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline import __version__
from pipeline.errors import ConfigError, StoreError, StoreMismatchError
from pipeline.zoo.recipe import Recipe, chunk_bounds, draw_chunk, load_recipe, n_chunks
from pipeline.zoo.store import (
    DIVERGED,
    DONE,
    PENDING,
    FORMAT,
    MemberBlock,
    StoreLayout,
    _check_target,
    _damage_error,
    _is_local,
    _jsonable,
    _kill_point,
    _local_path,
    check_capacity,
    create_store,
    migrate_store,
    normalize_url,
    open_group,
    read_meta,
    read_status,
    recreate_missing_arrays,
    remove_trash,
    reset_members,
    resize_store,
    store_exists,
    verify_store,
    write_members,
    write_splits,
)
from pipeline.zoo.storelock import StoreLock

__all__ = [
    "ZooPlan",
    "ChunkTask",
    "ChunkOutcome",
    "BuildReport",
    "plan_zoo",
    "build_zoo",
    "train_chunk",
    "default_workers",
    "in_process_by_default",
    "IN_PROCESS_WORK",
]


@dataclass(frozen=True)
class ZooPlan:
    """Everything decided before the store is touched: the recipe, resolved arch, task facts, layout, attrs."""

    recipe: Recipe
    arch: dict[str, Any]
    layout: StoreLayout
    attrs: dict[str, Any]


@dataclass(frozen=True)
class ChunkTask:
    """One Dask task: train chunk `chunk` of a `members`-member zoo and write it to `url`."""

    url: str
    recipe: Recipe
    arch: dict[str, Any]
    layout: StoreLayout
    chunk: int
    members: int
    threads: int | None = None
    device: str = "auto"


@dataclass(frozen=True)
class ChunkOutcome:
    """What a finished task reports back (small: the data itself is in the store)."""

    chunk: int
    start: int
    n: int
    n_diverged: int
    final_test_acc: np.ndarray
    seconds: float


@dataclass
class BuildReport:
    """Summary of a `build_zoo` call."""

    url: str
    members: int
    trained: int
    skipped: int
    done: int
    diverged: int
    pending: int
    wall_s: float
    workers: int
    final_test_acc: np.ndarray = field(repr=False)
    repaired: list[int] = field(default_factory=list)  # chunks a --repair found damaged and retrained

    @property
    def members_per_s(self) -> float:
        return self.trained / self.wall_s if self.wall_s > 0 else float("nan")


# Below this much training work (pending members x epochs x parameters per member) a default build (no --workers,
# no --scheduler) trains in this process: starting a LocalCluster (a Python + torch + task-data start per worker,
# ~15 s wall here) costs more than its parallelism saves. Measured with cnn-digits variants on 2 busy cores
# (load 8-9): 8 members x 1 epoch (2 chunks, work 40k) 27 s in-process vs 42 s on 2 workers; 32 x 1 (8 chunks,
# work 159k) 84 s vs 52 s; 128 x 2 (2 chunks, work 1.27M) 43 s vs 31 s. The threshold sits between 40k and 159k.
IN_PROCESS_WORK = 100_000


def in_process_by_default(pending_members: int, epochs: int, params: int, chunks: int, cores: int) -> bool:
    """Whether a build without --workers/--scheduler trains in this process rather than on a LocalCluster: when
    one worker would get all the work (one pending chunk or one core), or the work is below IN_PROCESS_WORK."""
    if chunks <= 1 or cores <= 1:
        return True
    return pending_members * max(1, epochs) * params < IN_PROCESS_WORK


def default_workers() -> int:
    """Cores available to this process."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _metric_names() -> tuple[str, ...]:
    from pipeline.zoo.population import METRIC_NAMES

    return tuple(METRIC_NAMES)


def _load_task(recipe: Recipe) -> Any:
    """The recipe's task (`load_task` caches it per process, so every chunk of a worker shares one copy)."""
    from pipeline.zoo.tasks import load_task

    return load_task(recipe.task, **dict(recipe.task_params))


def _with_activation(arch: Mapping[str, Any], activation: Any) -> dict[str, Any]:
    out = dict(arch)
    if activation is not None:
        out["activation"] = activation
    return out


def _widest(recipe: Recipe) -> int | None:
    """The largest `width` choice (the store's weight shapes; narrower members are stored zero-padded)."""
    return max(recipe.hparams["width"].values) if "width" in recipe.hparams else None


def plan_zoo(recipe: Recipe) -> ZooPlan:
    """Load the task, resolve the architecture, derive the weight-space spec and the store layout. Writes nothing.

    Raises RecipeError naming the recipe file when its task or architecture (with any activation choice) is invalid.
    """
    from pipeline.errors import ConfigError, RecipeError, TaskDataMissingError
    from pipeline.zoo.members import build_member, resolve_arch, with_width
    from pipeline.zoo.population import check_task_options

    try:
        task = _load_task(recipe)
    except TaskDataMissingError:
        raise
    except ConfigError as err:
        raise RecipeError(f"{recipe.source}: [task] {err}") from err
    activations = recipe.hparams["activation"].values if "activation" in recipe.hparams else (None,)
    try:
        wide = with_width(recipe.arch, _widest(recipe))
        resolved = [resolve_arch(_with_activation(wide, a), task) for a in activations]
        check_task_options(task, _may_be_positive(recipe, "label_noise"), _may_be_positive(recipe, "shift"))
    except ConfigError as err:
        raise RecipeError(f"{recipe.source}: [arch] with [hparams]: {err}") from err
    arch = dict(resolved[0])
    if "activation" in recipe.hparams:
        arch.pop("activation")  # per member: a hyperparameter column
    module = build_member(resolved[0])
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    categorical = {n: tuple(recipe.hparams[n].values) for n in recipe.categorical}
    layout = StoreLayout(
        weight_shapes=shapes,
        metric_names=_metric_names(),
        checkpoint_epochs=recipe.checkpoint_epochs,
        members_per_chunk=recipe.members_per_chunk,
        continuous=recipe.continuous,
        categorical=categorical,
    )
    attrs = {
        "kind": "recipe",
        "name": recipe.name,
        "recipe_text": recipe.text,
        "recipe": {k: v for k, v in recipe.to_dict().items() if k != "members"},  # the count lives in attrs "members"
        "identity": recipe.identity(),
        "arch": arch,
        "task": {
            "name": recipe.task,
            "params": dict(getattr(task, "params", recipe.task_params)),  # resolved, defaults included
            "fingerprint": getattr(task, "fingerprint", None),
            "info": getattr(task, "info", None),
        },
        "spec": _spec_dict(module, task),
        "checkpoint_epochs": list(recipe.checkpoint_epochs),
        "members_per_chunk": recipe.members_per_chunk,
        "seed": recipe.seed,
        "version": __version__,
    }
    return ZooPlan(recipe=recipe, arch=arch, layout=layout, attrs=_jsonable(attrs))


def _may_be_positive(recipe: Recipe, name: str) -> bool:
    """Whether the recipe can draw a value > 0 for continuous hyperparameter `name`."""
    dist = recipe.hparams.get(name)
    if dist is None:
        return False
    branches = dist.branches.values() if dist.kind == "by" else [dist]
    return any(v > 0 for d in branches for v in d.values)


def _example_input(task: Any) -> Any:
    """Two real inputs of the task, for tracing a member (seq2seq members take (source, target))."""
    if task is None:
        return None
    if getattr(task, "kind", None) == "seq2seq":
        return (task.x_train[:2], task.y_train[:2])
    return task.x_train[:2]


def _spec_dict(module: Any, task: Any = None) -> dict[str, Any] | None:
    """The module's weight-space spec as a dict (None when unf_models cannot describe it)."""
    try:
        from unf_models import WeightSpec
    except ImportError:
        return None
    from unf_models.errors import UNFError

    try:
        return WeightSpec.from_module(module, example_input=_example_input(task)).to_dict()
    except UNFError as err:
        logging.getLogger(__name__).warning("no weight-space spec stored: %s", err)
        return None


def train_chunk(task: ChunkTask) -> ChunkOutcome:
    """Train one chunk and write it (data, then status). Runs in a Dask worker or in process."""
    import torch

    from pipeline.allocator import tune_allocator
    from pipeline.zoo.members import pad_to_shapes, with_width
    from pipeline.zoo.population import ChunkJob, member_seed, train_population

    tune_allocator()  # once per worker process, as the CLI does for its own
    t0 = time.perf_counter()
    if task.threads:
        torch.set_num_threads(task.threads)
    recipe = task.recipe
    draw = draw_chunk(recipe, task.chunk, task.members)
    seeds = np.array([member_seed(recipe.seed, int(i)) for i in draw.members], dtype=np.int64)
    activation = draw.categorical.get("activation")
    width = draw.categorical.get("width")
    job = ChunkJob(
        arch=_with_activation(with_width(task.arch, None if width is None else int(width)), activation),
        task=_load_task(recipe),
        optimizer=draw.categorical["optimizer"],
        batch_size=int(draw.categorical["batch_size"]),
        epochs=recipe.epochs,
        checkpoint_epochs=tuple(recipe.checkpoint_epochs),
        init=draw.categorical.get("init", "trunc_normal"),
        schedule=draw.categorical.get("schedule", "constant"),
    )
    result = train_population(job, dict(draw.continuous), seeds, device=task.device)
    m = len(draw.members)
    hparams: dict[str, np.ndarray] = {n: np.full(m, v, dtype=object) for n, v in draw.categorical.items()}
    hparams.update(draw.continuous)
    metrics = {n: np.asarray(v, dtype=np.float32) for n, v in result.metrics.items() if n in task.layout.metric_names}
    block = MemberBlock(
        weights=pad_to_shapes({k: np.asarray(v, dtype=np.float32) for k, v in result.weights.items()}, task.layout.weight_shapes),
        metrics=metrics,
        hparams=hparams,
        seed=seeds,
        config=draw.config,
        diverged=np.asarray(result.diverged, dtype=bool),
        diverged_epoch=np.asarray(result.diverged_epoch, dtype=np.int32),
    )
    write_members(task.url, int(draw.members[0]), block, identity=recipe.identity())
    test_acc = metrics.get("test_acc", np.full((m, 1), np.nan, np.float32))[:, -1]
    return ChunkOutcome(
        chunk=task.chunk,
        start=int(draw.members[0]),
        n=m,
        n_diverged=int(block.diverged.sum()),
        final_test_acc=np.where(block.diverged, np.nan, test_acc),
        seconds=time.perf_counter() - t0,
    )


def _creation_unfinished(url: str) -> bool:
    """True when the store at `url` is one whose creation was killed (it holds nothing trained)."""
    meta = open_group(url, mode="r").attrs.get("unfzoo")
    return isinstance(meta, dict) and meta.get("format") == FORMAT and meta.get("state") == "creating"


def _check_compatible(url: str, plan: ZooPlan) -> int:
    """Members already in the store at `url`; raises StoreMismatchError if it holds another recipe's zoo."""
    root = open_group(url, mode="r")
    meta = root.attrs.get("unfzoo")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StoreMismatchError(f"{url} holds a zarr group that is not an unfzoo zoo; pass --overwrite to replace it")
    meta = read_meta(root, url)
    if meta.get("kind") != "recipe":
        raise StoreMismatchError(f"{url} holds an imported zoo, not one built from a recipe; pass --overwrite to replace it")
    ours, theirs = plan.attrs["identity"], meta.get("identity", {})
    if ours != theirs:
        key = next((k for k in ours if ours.get(k) != theirs.get(k)), "?")
        raise StoreMismatchError(
            f"{url} holds zoo {meta.get('name')!r} built from a different recipe (field {key!r}: stored "
            f"{theirs.get(key)!r}, asked {ours.get(key)!r}); use another --out or pass --overwrite to replace it"
        )
    stored_fp, our_fp = meta.get("task", {}).get("fingerprint"), plan.attrs["task"]["fingerprint"]
    if stored_fp != our_fp:
        raise StoreMismatchError(
            f"{url} was built on task data with fingerprint {stored_fp}, this machine's data has {our_fp}; "
            "pass --overwrite to rebuild it"
        )
    return int(meta["members"])


def _remove_partials(url: str) -> None:
    """Delete temp files a killed LocalStore write left behind (zarr writes `<key>.<uuid>.partial`, then renames)."""
    if _is_local(url):
        for p in _local_path(url).rglob("*.partial"):
            p.unlink(missing_ok=True)


def build_zoo(
    recipe: Recipe | str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    members: int | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
    overwrite: bool = False,
    repair: bool = False,
    device: str = "auto",
    threads: int | None = None,
    on_start: Callable[[int, int, int], None] | None = None,
    on_chunk: Callable[[ChunkOutcome], None] | None = None,
) -> BuildReport:
    """Build, resume or extend the zoo of `recipe` at `out` (a path or fsspec URL).

    `members` overrides the recipe's count (a larger count extends an existing zoo; by default the larger of the
    recipe's and the store's count). `workers=0` trains in this process; `workers=None` starts a Dask LocalCluster
    with one single-threaded worker per core, except for small builds (`in_process_by_default`), which train in this
    process; `workers=N` always starts N workers; `scheduler` connects to a running Dask scheduler instead. `threads` is
    torch's thread count per task (default: cores // workers on a LocalCluster, torch's own setting otherwise); a
    rerun gives bit-identical weights when it uses the same thread count.
    `repair` verifies every finished chunk and retrains the damaged ones (without it, damage is refused).
    The store's writer lock is held throughout (StoreBusyError when another process holds it).
    `on_start(total, already_done, to_train)` and `on_chunk(outcome)` report progress.
    """
    t0 = time.perf_counter()
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    url = normalize_url(out)
    if members is not None:
        recipe = recipe.with_members(members)
    if repair and overwrite:
        raise ConfigError("--repair keeps a store and --overwrite replaces it; pass one of them")
    plan = plan_zoo(recipe)  # validates task, arch and spec before anything is written
    _check_target(url)  # member counts and disk space are checked in _prepare_store, before any write
    if scheduler is not None:
        _check_scheduler(scheduler)
    with StoreLock(url):
        recipe, n_new, repaired = _prepare_store(url, recipe, plan, members, overwrite, repair)
        report = _train_pending(url, recipe, plan, n_new, workers, scheduler, device, threads, on_start, on_chunk)
    report.repaired = repaired
    report.wall_s = time.perf_counter() - t0
    return report


def _prepare_store(
    url: str, recipe: Recipe, plan: ZooPlan, members: int | None, overwrite: bool, repair: bool
) -> tuple[Recipe, int, list[int]]:
    """Create, resume, repair or grow the store (lock held); returns the recipe at its final member count, that
    count, and the chunks marked for retraining by a repair."""
    remove_trash(url)
    repaired: list[int] = []
    if store_exists(url) and not overwrite and not _creation_unfinished(url):
        n_old = _check_compatible(url, plan)
        n_new = recipe.members if members is not None else max(recipe.members, n_old)
        if n_new < n_old:
            raise StoreError(
                f"{url} holds {n_old} members; --members {n_new} would drop some. Use a larger count, or --overwrite "
                "to rebuild it smaller"
            )
        check_capacity(url, plan.layout, n_new, existing=n_old)
        _remove_partials(url)
        repaired = _check_damage(url, repair)
        migrate_store(url)  # a store from before STORE_VERSION 2 gets its xarray metadata; data untouched
        if n_new > n_old:
            k = recipe.members_per_chunk
            if n_old % k:  # the partial last chunk grows: retrain it whole, as a fresh build would
                reset_members(url, n_old - n_old % k, n_old)
            resize_store(url, n_new)
    else:
        n_new = recipe.members
        create_store(url, plan.layout, plan.attrs, n_new)
        _kill_point("build:created")
    return recipe.with_members(n_new), n_new, repaired


def _check_damage(url: str, repair: bool) -> list[int]:
    """Verify the finished chunks. Damage is refused, or with `repair` its chunks are marked pending (missing
    arrays created again first) so this build retrains exactly them. Returns the chunks marked."""
    report = verify_store(url) if not repair else None
    if report is not None:
        if report.damaged:
            raise _damage_error(url, read_meta(open_group(url), url), report.damaged)
        return []
    missing = _missing_arrays(url)
    if missing:
        recreate_missing_arrays(url, missing)
    report = verify_store(url)
    for damage in report.damaged:
        reset_members(url, damage.start, damage.stop)
    return [d.chunk for d in report.damaged]


def _missing_arrays(url: str) -> list[str]:
    """Member arrays of the layout whose metadata is gone or unreadable."""
    from pipeline.zoo.store import CHECKSUM, _checksum_columns

    root = open_group(url, mode="r")
    meta = read_meta(root, url)
    layout = StoreLayout.from_json(meta["layout"])
    names = _checksum_columns(layout) + ["members/split_run", "members/split_config"]
    if meta.get("checksums") == CHECKSUM:
        names.append(CHECKSUM)
    missing = []
    for name in names:
        try:
            root[name]
        except Exception:  # noqa: BLE001 - missing or unreadable metadata
            missing.append(name)
    return missing


def _check_scheduler(address: str) -> None:
    """Fail fast (3 s) with a one-line error when nothing listens at a tcp:// scheduler address."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    if parts.scheme not in ("tcp", "tls"):
        return  # other transports (inproc, ucx): Dask's own connect reports them
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or not port:
        raise ConfigError(f"--scheduler {address!r} is not an address: give HOST:PORT, e.g. tcp://127.0.0.1:8786")
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as err:
        raise ConfigError(
            f"--scheduler {address}: no Dask scheduler answers there ({err.strerror or err}); start one "
            "(`dask scheduler`) or leave out --scheduler to use this machine's cores"
        ) from None


def _train_pending(
    url: str,
    recipe: Recipe,
    plan: ZooPlan,
    n_new: int,
    workers: int | None,
    scheduler: str | None,
    device: str,
    threads: int | None,
    on_start: Callable[[int, int, int], None] | None,
    on_chunk: Callable[[ChunkOutcome], None] | None,
) -> BuildReport:
    """Train every chunk with a pending member, write the splits, and summarise the store."""

    status = read_status(url)
    k = recipe.members_per_chunk
    pending = [c for c in range(n_chunks(n_new, k)) if (status[slice(*chunk_bounds(c, n_new, k))] == PENDING).any()]
    to_train = sum(np.subtract(*chunk_bounds(c, n_new, k)[::-1]) for c in pending)
    if on_start is not None:
        on_start(n_new, n_new - int(to_train), int(to_train))

    n_workers = 0
    if pending:
        params = sum(int(np.prod(v)) for v in plan.layout.weight_shapes.values())
        small = workers is None and in_process_by_default(int(to_train), recipe.epochs, params, len(pending),
                                                          default_workers())
        if scheduler is None and (workers == 0 or small):
            for c in pending:
                outcome = train_chunk(ChunkTask(url, recipe, plan.arch, plan.layout, c, n_new, threads, device))
                if on_chunk is not None:
                    on_chunk(outcome)
        else:
            n_workers = _run_dask(url, recipe, plan, pending, n_new, workers, scheduler, device, threads, on_chunk)
    write_splits(url)
    _kill_point("build:splits")

    status = read_status(url)
    test_acc = open_group(url)["metrics/test_acc"][:, -1] if "test_acc" in plan.layout.metric_names else np.array([])
    return BuildReport(
        url=url,
        members=n_new,
        trained=int(to_train),
        skipped=n_new - int(to_train),
        done=int((status == DONE).sum()),
        diverged=int((status == DIVERGED).sum()),
        pending=int((status == PENDING).sum()),
        wall_s=0.0,
        workers=n_workers,
        final_test_acc=np.asarray(test_acc)[status == DONE] if len(test_acc) else np.array([]),
    )


def _run_dask(
    url: str,
    recipe: Recipe,
    plan: ZooPlan,
    pending: list[int],
    n_members: int,
    workers: int | None,
    scheduler: str | None,
    device: str,
    threads: int | None,
    on_chunk: Callable[[ChunkOutcome], None] | None,
) -> int:
    """Run the pending chunks as Dask tasks; returns the number of workers used."""
    import dask
    from dask.distributed import Client, LocalCluster, as_completed

    if scheduler is None and url.startswith("memory://"):
        raise StoreError("a memory:// store lives in one process; use --workers 0 or a real path for Dask workers")
    cores = default_workers()
    # Two Dask defaults cost more CPU than the training itself, so workers a LocalCluster spawns get neither:
    # MALLOC_TRIM_THRESHOLD_=65536 (fixing it turns off glibc's adaptive mmap threshold, so every large torch
    # temporary becomes an mmap + page faults: system time equal to user time), and the statistical profiler that
    # samples each worker's deep torch stacks every 10 ms.
    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    environ["MALLOC_TRIM_THRESHOLD_"] = None  # None unsets it
    settings = {"distributed.nanny.pre-spawn-environ": environ, "distributed.worker.profile.enabled": False}
    with dask.config.set(settings):
        cluster = None
        if scheduler is not None:
            try:
                client = Client(scheduler, timeout="10s")
            except OSError as err:
                raise ConfigError(f"--scheduler {scheduler}: cannot connect to a Dask scheduler ({err})") from None
            n_workers = max(1, len(client.scheduler_info().get("workers", {})))
        else:
            n_workers = max(1, min(workers or cores, len(pending)))
            threads = threads or max(1, cores // n_workers)  # n workers x threads torch threads <= cores
            cluster = LocalCluster(
                n_workers=n_workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=":0",  # a free port: None still binds the HTTP server to 8787 (clashes, warns)
                silence_logs=logging.ERROR,
            )
            client = Client(cluster)
    token = uuid.uuid4().hex[:8]
    try:
        futures = [
            client.submit(
                train_chunk,
                ChunkTask(url, recipe, plan.arch, plan.layout, c, n_members, threads, device),
                key=f"unfzoo-chunk-{c}-{token}",
                pure=False,
                priority=-i,
            )
            for i, c in enumerate(pending)
        ]
        for fut in as_completed(futures):
            outcome = fut.result()
            fut.release()
            if on_chunk is not None:
                on_chunk(outcome)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return n_workers
