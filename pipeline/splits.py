"""Train/val/test splits of a zoo by run or by hyperparameter configuration: deterministic, disjoint, exact sizes.

A split assigns whole groups (a run = one member with all its checkpoints; a configuration = every run that shares
its hyperparameters) so no group sits on two sides. Groups are ordered by a hash of (seed, group id), not by a
permutation of the group count, so extending a zoo moves few existing members between sides.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.errors import ConfigError

__all__ = ["SPLIT_NAMES", "SPLIT_KINDS", "DEFAULT_FRACTIONS", "check_fractions", "assign_split", "split_indices"]

SPLIT_NAMES = ("train", "val", "test")
SPLIT_KINDS = ("run", "config")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Validate (train, val, test) fractions: three non-negative numbers summing to 1."""
    fr = tuple(float(f) for f in fractions)
    if len(fr) != 3 or any(not np.isfinite(f) or f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise ConfigError(f"split fractions must be three non-negative numbers (train, val, test) summing to 1; got {fractions!r}")
    return fr  # type: ignore[return-value]


def _hash64(seed: int, ids: np.ndarray) -> np.ndarray:
    """splitmix64 of (seed, id): a stable pseudo-random key per group id."""
    with np.errstate(over="ignore"):
        z = ids.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(0x632BE59BD9B4E019)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def assign_split(groups: np.ndarray, seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> np.ndarray:
    """Split code per member (0 train, 1 val, 2 test) such that members of one group share a side.

    `groups` is a (members,) integer array of group ids (member index for a run split, configuration id for a
    configuration split). Sizes are exact in groups: round(fraction * n_groups) for train and val, the rest test.
    """
    fr = check_fractions(fractions)
    groups = np.asarray(groups, dtype=np.int64)
    uniq, inverse = np.unique(groups, return_inverse=True)
    order = np.lexsort((uniq, _hash64(seed, uniq)))  # rank groups by hash (ties broken by id)
    n = len(uniq)
    n_train = int(round(fr[0] * n))
    n_val = min(int(round(fr[1] * n)), n - n_train)
    side = np.full(n, 2, dtype=np.int8)
    side[order[:n_train]] = 0
    side[order[n_train : n_train + n_val]] = 1
    return side[inverse]


def split_indices(codes: np.ndarray) -> dict[str, np.ndarray]:
    """{"train": idx, "val": idx, "test": idx} member indices from split codes (members coded -1 are left out)."""
    codes = np.asarray(codes)
    return {name: np.flatnonzero(codes == i).astype(np.int64) for i, name in enumerate(SPLIT_NAMES)}
