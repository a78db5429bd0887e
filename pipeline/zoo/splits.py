"""Train/val/test splits of a zoo by run or by hyperparameter configuration: deterministic, disjoint, exact sizes.

A split assigns whole groups (a run = one member with all its checkpoints; a configuration = every run that shares
its hyperparameters) so no group sits on two sides. Groups are ordered by a hash of (seed, group id), not by a
permutation of the group count, so extending a zoo moves few existing members between sides.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.errors import ConfigError

__all__ = ["SPLIT_NAMES", "SPLIT_KINDS", "DEFAULT_FRACTIONS", "check_fractions", "assign_split", "split_indices",
           "GroupSplit", "parse_split", "group_sizes", "assign_group_split"]

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


@dataclass(frozen=True)
class GroupSplit:
    """`--split group:<hparam>[=v1,v2]`: every member whose categorical hyperparameter `hparam` takes a held-out value
    is in test; `values` None means one value picked by the split seed (sorted values, index seed % count)."""

    hparam: str
    values: tuple[str, ...] | None = None

    def __str__(self) -> str:
        return f"group:{self.hparam}" + (f"={','.join(self.values)}" if self.values else "")


def parse_split(text: str) -> str | GroupSplit:
    """'run' | 'config' | 'group:<hparam>' | 'group:<hparam>=v1,v2' -> the kind, or a GroupSplit."""
    text = str(text).strip()
    if text in SPLIT_KINDS:
        return text
    if text.startswith("group:") and text[6:].split("=")[0].strip():
        name, _, values = text[6:].partition("=")
        vals = tuple(v.strip() for v in values.split(",") if v.strip()) if values else None
        return GroupSplit(name.strip(), vals or None)
    raise ConfigError(f"--split {text!r} is unknown; use run, config, group:<hyperparameter> (e.g. group:optimizer) "
                      f"or group:<hyperparameter>=<value>[,<value>...]")


def group_sizes(values: Mapping[str, np.ndarray]) -> str:
    """'optimizer (adam 30, sgd 34), activation (relu 40, tanh 24)' from {hparam: values of the usable members}."""
    parts = []
    for name, vals in values.items():
        uniq, counts = np.unique(np.asarray([str(v) for v in vals], dtype=object), return_counts=True)
        parts.append(f"{name} ({', '.join(f'{u} {c}' for u, c in zip(uniq, counts))})")
    return ", ".join(parts) or "none"


def assign_group_split(values: np.ndarray, held_out: Sequence[str], seed: int = 0,
                       fractions: Sequence[float] = DEFAULT_FRACTIONS) -> np.ndarray:
    """Split code per member: 2 (test) for members whose value (as text) is held out; the others are split by run
    into train and val in the ratio fractions[0]:fractions[1] (the test fraction is unused: test is the group)."""
    fr = check_fractions(fractions)
    text = np.asarray([str(v) for v in values], dtype=object)
    test = np.isin(text, np.asarray(list(held_out), dtype=object))
    codes = np.full(len(text), 2, dtype=np.int8)
    rest = np.flatnonzero(~test)
    if len(rest):
        tv = fr[0] + fr[1]
        inner = (fr[0] / tv, fr[1] / tv, 0.0) if tv > 0 else (0.5, 0.5, 0.0)
        sub = assign_split(rest, seed, inner)
        codes[rest] = np.where(sub == 2, 1, sub)  # rounding leftovers go to val, never to the held-out test
    return codes
