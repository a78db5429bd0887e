"""The zoo stage (`unfzoo zoo`, `unfzoo import`): recipes, tasks and member architectures, population training,
the zarr store with its writer lock and splits, the member loader, and importers of zoos trained elsewhere.

    from pipeline.zoo import build_zoo
    report = build_zoo("cnn-digits", "datasets/zoos/cnn-digits.zarr")

Modules: `recipe` (TOML recipes, hyperparameter draws), `tasks` (datasets), `members` (architectures),
`population` (vmapped training), `build` (plan -> chunks -> store), `store` / `storelock` / `splits` (the store
format), `loader` (members for training), `importers` / `factory` (zoos trained elsewhere).
"""

from pipeline.zoo.build import (
    IN_PROCESS_WORK,
    BuildReport,
    ChunkOutcome,
    ChunkTask,
    ZooPlan,
    build_zoo,
    default_workers,
    in_process_by_default,
    plan_zoo,
    train_chunk,
)

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
