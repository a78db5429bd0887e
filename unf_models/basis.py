"""Pure enumeration of the UNF linear basis (no nn.Module, no tensors).

Between an output tensor with axis labels ``o1..ok`` and an input tensor with labels ``i1..im`` the equivariant
linear maps are spanned by the *valid partitions* of the k+m axis slots: blocks only join slots with the same label.
Per block: input-only -> reduce (mean); input and output -> keep; repeated input slots -> read the diagonal;
repeated output slots -> write on the diagonal; output-only -> broadcast. Per label the slots can be partitioned in
Bell(c_out + c_in) ways, so a pair has ``prod_label Bell(c_out + c_in)`` terms.

A term is split into a :class:`Read` (how the input is reduced to its kept blocks), a :class:`Write` (how the kept
blocks are placed into the output) and a matching between the two. Layers group terms that share a read (computed
once) and terms whose kept blocks carry the same labels (one matmul), see ``layers.py``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import product
from math import prod

__all__ = [
    "Read",
    "Write",
    "Term",
    "bell",
    "set_partitions",
    "num_pair_terms",
    "pair_terms",
    "reads",
    "writes",
]

Block = tuple[int, ...]  # axis positions of one block, ascending


@lru_cache(maxsize=None)
def bell(n: int) -> int:
    """Bell number B(n): the number of set partitions of n items (1, 1, 2, 5, 15, 52, 203, ...)."""
    if n < 0:
        raise ValueError(f"bell(n) needs n >= 0, got {n}")
    row = [1]  # Bell triangle
    for _ in range(n):
        nxt = [row[-1]]
        for value in row:
            nxt.append(nxt[-1] + value)
        row = nxt
    return row[0]


def set_partitions(items: Sequence[int]) -> Iterator[tuple[Block, ...]]:
    """All set partitions of ``items``; blocks keep the items' order and are ordered by their first item."""
    items = tuple(items)
    if not items:
        yield ()
        return
    first, rest = items[0], items[1:]
    for part in set_partitions(rest):
        yield ((first,), *part)  # first alone
        for k in range(len(part)):  # first joins block k (stays first in it, so order holds)
            yield (*part[:k], (first, *part[k]), *part[k + 1 :])


def _canonical(blocks: Sequence[Block]) -> tuple[Block, ...]:
    return tuple(sorted((tuple(sorted(b)) for b in blocks), key=lambda b: b[0]))


@dataclass(frozen=True)
class Read:
    """How a term reads its input: diagonals over ``blocks``, kept blocks ``kept`` (in order), the rest averaged.

    ``blocks`` partitions the input's axis positions; a block with several positions reads their diagonal.
    The result has one axis per kept block, in the order of ``kept`` (ascending block index = positional order).
    """

    blocks: tuple[Block, ...]
    kept: tuple[int, ...]

    @property
    def reduced(self) -> tuple[int, ...]:
        return tuple(i for i in range(len(self.blocks)) if i not in self.kept)

    def describe(self, labels: Sequence[str]) -> str:
        parts = []
        for i, block in enumerate(self.blocks):
            where = ",".join(str(p) for p in block)
            kind = ("diagonal read " if len(block) > 1 else "") + ("keep" if i in self.kept else "reduce")
            parts.append(f"{labels[block[0]]}[{where}]:{kind}")
        return " ".join(parts) or "scalar"


@dataclass(frozen=True)
class Write:
    """How a term writes its output: one output axis group per block; ``kept`` blocks receive the input's kept axes.

    Blocks not in ``kept`` are broadcast; a block with several positions is written on its diagonal (zero elsewhere).
    """

    blocks: tuple[Block, ...]
    kept: tuple[int, ...]

    @property
    def broadcast(self) -> tuple[int, ...]:
        return tuple(i for i in range(len(self.blocks)) if i not in self.kept)

    def describe(self, labels: Sequence[str]) -> str:
        parts = []
        for i, block in enumerate(self.blocks):
            where = ",".join(str(p) for p in block)
            kind = ("keep" if i in self.kept else "broadcast") + (" diagonal write" if len(block) > 1 else "")
            parts.append(f"{labels[block[0]]}[{where}]:{kind}")
        return " ".join(parts) or "scalar"


@dataclass(frozen=True)
class Term:
    """One basis map between a pair of tensors: ``write.kept[j]`` receives the input axis ``read.kept[match[j]]``."""

    read: Read
    write: Write
    match: tuple[int, ...]

    def describe(self, out_labels: Sequence[str], in_labels: Sequence[str]) -> str:
        links = ", ".join(f"out{self.write.blocks[self.write.kept[j]]}<-in{self.read.blocks[self.read.kept[m]]}"
                          for j, m in enumerate(self.match))
        return f"read({self.read.describe(in_labels)}) write({self.write.describe(out_labels)}) [{links}]"


def num_pair_terms(out_labels: Sequence[str], in_labels: Sequence[str]) -> int:
    """prod over labels of Bell(c_out + c_in): the number of basis terms from ``in_labels`` to ``out_labels``."""
    counts: dict[str, int] = {}
    for label in (*out_labels, *in_labels):
        counts[label] = counts.get(label, 0) + 1
    return prod(bell(c) for c in counts.values())


@lru_cache(maxsize=None)
def pair_terms(out_labels: tuple[str, ...], in_labels: tuple[str, ...]) -> tuple[Term, ...]:
    """Every basis term from a tensor with ``in_labels`` to one with ``out_labels`` (one per valid partition)."""
    k = len(out_labels)
    slots = [*out_labels, *in_labels]  # slot s < k is output axis s; slot k + j is input axis j
    per_label: dict[str, list[int]] = {}
    for s, label in enumerate(slots):
        per_label.setdefault(label, []).append(s)
    choices = [list(set_partitions(group)) for group in per_label.values()]
    terms = []
    for combo in product(*choices):
        blocks = [b for part in combo for b in part]
        in_blocks = _canonical([tuple(s - k for s in b if s >= k) for b in blocks if any(s >= k for s in b)])
        out_blocks = _canonical([tuple(s for s in b if s < k) for b in blocks if any(s < k for s in b)])
        in_index = {b[0]: i for i, b in enumerate(in_blocks)}
        out_index = {b[0]: i for i, b in enumerate(out_blocks)}
        pairs = []  # (out block index, in block index) of kept blocks
        for b in blocks:
            outs, ins = [s for s in b if s < k], [s - k for s in b if s >= k]
            if outs and ins:
                pairs.append((out_index[min(outs)], in_index[min(ins)]))
        pairs.sort()
        read_kept = tuple(sorted(i for _, i in pairs))
        write_kept = tuple(o for o, _ in pairs)
        match = tuple(read_kept.index(i) for _, i in pairs)
        terms.append(Term(Read(in_blocks, read_kept), Write(out_blocks, write_kept), match))
    return tuple(terms)


@lru_cache(maxsize=None)
def reads(labels: tuple[str, ...]) -> tuple[Read, ...]:
    """Every distinct read of a tensor with ``labels`` (label-respecting partition x subset of kept blocks)."""
    out = []
    for part in _label_partitions(labels):
        for mask in product((False, True), repeat=len(part)):
            out.append(Read(part, tuple(i for i, keep in enumerate(mask) if keep)))
    return tuple(out)


@lru_cache(maxsize=None)
def writes(labels: tuple[str, ...]) -> tuple[Write, ...]:
    """Every distinct write into a tensor with ``labels``."""
    return tuple(Write(r.blocks, r.kept) for r in reads(labels))


def _label_partitions(labels: tuple[str, ...]) -> list[tuple[Block, ...]]:
    per_label: dict[str, list[int]] = {}
    for pos, label in enumerate(labels):
        per_label.setdefault(label, []).append(pos)
    return [_canonical([b for part in combo for b in part])
            for combo in product(*(list(set_partitions(g)) for g in per_label.values()))]
