"""A batch loader over (member, checkpoint) pairs of a zoo that never pays a chunk decompression per sample.

When the selected weights fit in `max_memory_bytes` (the common case: a 6,000-member CNN zoo is ~240 MB) they are
read once and batches are gathered from memory. Otherwise whole chunks are read in shuffled chunk order, a buffer of
`buffer_chunks` chunks is shuffled pair by pair, and the next buffer is read in a background thread meanwhile.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from pipeline.zoo.store import Zoo

__all__ = ["ZooLoader", "Batch", "default_memory_budget"]

Batch = tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]  # weights {key: (B, *shape)}, member (B,), ckpt (B,)


def default_memory_budget() -> int:
    """Bytes of weights the loader may hold in memory: a quarter of physical RAM, at most 8 GiB."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    return int(min(total // 4, 8 << 30))


class ZooLoader:
    """Iterate batches of (weights dict, member idx, checkpoint idx); each `iter()` is one epoch.

    Epoch e shuffles with seed (seed, e), so runs are reproducible. `mode` is "memory" or "chunks".
    """

    def __init__(
        self,
        zoo: Zoo,
        members: Any = None,
        checkpoints: Any = None,
        *,
        batch_size: int = 128,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        max_memory_bytes: int | None = None,
        buffer_chunks: int = 8,
        device: str | torch.device | None = None,
    ) -> None:
        from pipeline.zoo.store import _as_indices

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.zoo = zoo
        self.members = np.unique(_as_indices(members, zoo.n_members))  # (M,) sorted
        self.checkpoints = _as_indices(checkpoints, len(zoo.checkpoint_epochs))  # (C,)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.buffer_chunks = max(1, int(buffer_chunks))
        self.device = torch.device(device) if device is not None else None
        self.epoch = 0
        per_pair = sum(int(np.prod(s)) * 4 for s in zoo.weight_shapes.values())
        self.nbytes = per_pair * len(self.members) * len(self.checkpoints)
        budget = default_memory_budget() if max_memory_bytes is None else int(max_memory_bytes)
        self.mode = "memory" if (zoo._cache is not None or self.nbytes <= budget) else "chunks"
        self._flat: dict[str, np.ndarray] | None = None
        self._verified: set[int] = set()  # chunks whose checksums the streaming mode has checked

    @property
    def n_pairs(self) -> int:
        return len(self.members) * len(self.checkpoints)

    def __len__(self) -> int:
        n = self.n_pairs
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        if self.mode == "memory":
            return self._iter_memory(rng)
        return self._iter_chunks(rng)

    # ---- in memory ------------------------------------------------------------------------------------------------
    def _load(self) -> dict[str, np.ndarray]:
        if self._flat is None:
            data = self.zoo.read_weights(self.members, self.checkpoints)  # {key: (M, C, *shape)}
            self._flat = {k: v.reshape(-1, *v.shape[2:]) for k, v in data.items()}  # (M*C, *shape)
        return self._flat

    def _iter_memory(self, rng: np.random.Generator) -> Iterator[Batch]:
        flat = self._load()
        n_c = len(self.checkpoints)
        order = rng.permutation(self.n_pairs) if self.shuffle else np.arange(self.n_pairs)
        for idx in self._batches(order):
            weights = {k: torch.from_numpy(np.take(v, idx, axis=0)) for k, v in flat.items()}
            yield self._emit(weights, self.members[idx // n_c], self.checkpoints[idx % n_c])

    # ---- chunk streaming ------------------------------------------------------------------------------------------
    def _read_buffer(self, chunks: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """Selected pairs of whole member chunks, read concurrently: ({key: (P, *shape)}, member (P,), ckpt (P,))."""
        from pipeline.zoo.store import read_blocks

        k, n = self.zoo.members_per_chunk, self.zoo.n_members
        bounds = [(int(c) * k, min((int(c) + 1) * k, n)) for c in chunks]
        names = [f"weights/{key}" for key in self.zoo.weight_keys]
        try:
            blocks = read_blocks(self.zoo.url, names, [slice(a, b) for a, b in bounds])  # whole chunks (k, C_all, ...)
        except Exception as err:  # noqa: BLE001 - a missing or undecodable chunk: name it
            raise self.zoo._located_error(err, np.concatenate([np.arange(a, b) for a, b in bounds])) from err
        for c, (a, b), block in zip(chunks, bounds, blocks):
            if int(c) not in self._verified:  # checked once per loader: later epochs re-read the same bytes
                for name in names:
                    self.zoo._check_rows(name, np.arange(a, b), block[name])
                self._verified.add(int(c))
        n_c = len(self.checkpoints)
        all_c = n_c == len(self.zoo.checkpoint_epochs) and bool((self.checkpoints == np.arange(n_c)).all())
        weights: dict[str, list[np.ndarray]] = {key: [] for key in self.zoo.weight_keys}
        members, ckpts = [], []
        for (a, b), block in zip(bounds, blocks):
            rows = self.members[(self.members >= a) & (self.members < b)]
            full = len(rows) == b - a
            for key, name in zip(self.zoo.weight_keys, names):
                sel = block[name] if full else block[name][rows - a]
                sel = sel if all_c else sel[:, self.checkpoints]  # (m, C, *shape)
                weights[key].append(sel.reshape(-1, *sel.shape[2:]))
            members.append(np.repeat(rows, n_c))
            ckpts.append(np.tile(self.checkpoints, len(rows)))
        return ({key: np.concatenate(v) for key, v in weights.items()}, np.concatenate(members), np.concatenate(ckpts))

    def _iter_chunks(self, rng: np.random.Generator) -> Iterator[Batch]:
        chunks = np.unique(self.members // self.zoo.members_per_chunk)
        if self.shuffle:
            chunks = rng.permutation(chunks)
        groups = [chunks[i : i + self.buffer_chunks] for i in range(0, len(chunks), self.buffer_chunks)]
        carry: tuple[dict[str, np.ndarray], np.ndarray, np.ndarray] | None = None
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending: Future | None = pool.submit(self._read_buffer, groups[0]) if groups else None
            for g in range(len(groups)):
                weights, mem, ck = pending.result()  # type: ignore[union-attr]
                pending = pool.submit(self._read_buffer, groups[g + 1]) if g + 1 < len(groups) else None
                if carry is not None:
                    weights = {k: np.concatenate([carry[0][k], weights[k]]) for k in weights}
                    mem, ck = np.concatenate([carry[1], mem]), np.concatenate([carry[2], ck])
                order = rng.permutation(len(mem)) if self.shuffle else np.arange(len(mem))
                last = g + 1 == len(groups)
                n_full = len(order) if last else len(order) - len(order) % self.batch_size
                for idx in self._batches(order[:n_full], final=last):
                    yield self._emit({k: torch.from_numpy(np.take(v, idx, axis=0)) for k, v in weights.items()}, mem[idx], ck[idx])
                rest = order[n_full:]
                carry = ({k: v[rest] for k, v in weights.items()}, mem[rest], ck[rest]) if len(rest) else None

    # ---- shared ---------------------------------------------------------------------------------------------------
    def _batches(self, order: np.ndarray, final: bool = True) -> Iterator[np.ndarray]:
        b = self.batch_size
        for i in range(0, len(order), b):
            idx = order[i : i + b]
            if len(idx) < b and (self.drop_last or not final):
                return
            yield idx

    def _emit(self, weights: dict[str, torch.Tensor], members: np.ndarray, ckpts: np.ndarray) -> Batch:
        m = torch.from_numpy(np.asarray(members, dtype=np.int64))
        c = torch.from_numpy(np.asarray(ckpts, dtype=np.int64))
        if self.device is not None:
            weights = {k: v.to(self.device, non_blocking=True) for k, v in weights.items()}
            m, c = m.to(self.device), c.to(self.device)
        return weights, m, c
