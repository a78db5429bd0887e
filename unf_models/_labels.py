"""Label bookkeeping for `derive`: a union-find over axis labels (with products and concatenations) and the
per-dimension view of traced tensors, with the reshape and broadcast rules that move labels between them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from math import prod
from typing import Any

from unf_models.errors import UnsupportedModuleError

# ----------------------------------------------------------------------------------------------- label bookkeeping
_FREE, _PENDING, _FIXED = 0, 1, 2  # pending: fixed unless tied to a free label (parameters used via get_attr)
_PROD, _SUM = "prod", "sum"


class _Labels:
    """Union-find over labels with a size, a status, an origin and optionally an expansion each: a label may be
    refined into a product (``prod``: row-major factors) or be a concatenation (``sum``) of other labels."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.name: list[str] = []
        self.size: list[int] = []
        self.status: list[int] = []
        self.origin: list[list[str]] = []
        self.expand: dict[int, tuple[str, list[int]]] = {}

    def new(self, name: str, size: int, status: int = _FREE, origin: str = "") -> int:
        self.parent.append(len(self.parent))
        self.name.append(name)
        self.size.append(int(size))
        self.status.append(status)
        self.origin.append([origin] if origin else [])
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def children(self, a: int) -> tuple[str, list[int]] | None:
        e = self.expand.get(self.find(a))
        return (e[0], [self.find(c) for c in e[1]]) if e is not None else None

    def union(self, a: int, b: int, where: str) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if self.size[ra] != self.size[rb]:
            raise UnsupportedModuleError(f"{where}: cannot tie axis '{self.name[ra]}' (size {self.size[ra]}) to "
                                         f"axis '{self.name[rb]}' (size {self.size[rb]})")
        keep, drop = (ra, rb) if ra < rb else (rb, ra)  # the older label names the merged one
        self.parent[drop] = keep
        sa, sb = self.status[ra], self.status[rb]
        self.status[keep] = _FIXED if _FIXED in (sa, sb) else (_FREE if _FREE in (sa, sb) else _PENDING)
        if len(self.origin[keep]) < 12:
            self.origin[keep] = self.origin[keep] + [o for o in self.origin[drop] if o not in self.origin[keep]][:6]
            if where and where not in self.origin[keep]:
                self.origin[keep].append(f"tied at {where}")
        ek, ed = self.expand.pop(keep, None), self.expand.pop(drop, None)
        if ek is not None and ed is not None:
            self.expand[keep] = ek
            ck, cd = [self.find(c) for c in ek[1]], [self.find(c) for c in ed[1]]
            if ek[0] == ed[0] and [self.size[c] for c in ck] == [self.size[c] for c in cd]:
                for x, y in zip(ck, cd):
                    self.union(x, y, where)
            else:  # two different structures of one axis: claim no symmetry inside it
                self.fix(keep)
                for c in cd:
                    self.fix(c)
        elif ek is not None or ed is not None:
            self.expand[keep] = ek if ek is not None else ed  # type: ignore[assignment]
        if self.status[keep] == _FIXED and keep in self.expand:
            self.fix(keep)
        return self.find(keep)

    def fix(self, a: int, seen: set[int] | None = None) -> None:
        r = self.find(a)
        seen = seen if seen is not None else set()
        if r in seen:
            return
        seen.add(r)
        self.status[r] = _FIXED
        e = self.expand.get(r)
        if e is not None:
            for c in e[1]:
                self.fix(c, seen)

    def _structure(self, a: int, kind: str, sizes: Sequence[int], names: Sequence[str], origin: str) -> list[int]:
        r = self.find(a)
        sizes = [int(n) for n in sizes]
        if len(sizes) == 1:
            return [r]
        e = self.children(r)
        if e is not None:
            if e[0] == kind and [self.size[c] for c in e[1]] == sizes:
                return e[1]
            self.fix(r)  # refined two different ways: claim nothing inside it
            return [self.new(f"{self.name[r]}.{i}", n, _FIXED, origin) for i, n in enumerate(sizes)]
        kids = [self.new(nm, n, _FREE, origin) for nm, n in zip(names, sizes)]
        self.expand[r] = (kind, kids)
        if self.status[r] == _FIXED:
            self.fix(r)
        return kids

    def refine(self, a: int, sizes: Sequence[int], origin: str, names: Sequence[str] | None = None) -> list[int]:
        """Labels of the row-major factors ``sizes`` of label ``a`` (created once, shared by every reader)."""
        base = self.name[self.find(a)]
        return self._structure(a, _PROD, sizes, names or [f"{base}.{i}" for i in range(len(sizes))], origin)

    def split(self, a: int, sizes: Sequence[int], origin: str) -> list[int]:
        """Labels of consecutive blocks ``sizes`` of label ``a`` (``chunk``/``split`` of a feature dim)."""
        base = self.name[self.find(a)]
        return self._structure(a, _SUM, sizes, [f"{base}.{i}" for i in range(len(sizes))], origin)

    def compose(self, kind: str, kids: Sequence[int], name: str, origin: str) -> int:
        """A new label that is the product or the concatenation of ``kids``."""
        kids = [self.find(k) for k in kids]
        if len(kids) == 1:
            return kids[0]
        sizes = [self.size[k] for k in kids]
        r = self.new(name, prod(sizes) if kind == _PROD else sum(sizes), _FREE, origin)
        self.expand[r] = (kind, kids)
        return r

    def settle(self) -> None:
        """Before reading statuses: a fixed or pending (never tied to a free axis) label fixes all its parts."""
        for r in list(self.expand):
            if self.find(r) == r and self.status[r] != _FREE:
                self.fix(r)


Factor = tuple[int | None, int]  # (label or None, size); a dim is a row-major product of factors


@dataclass
class _T:
    """A traced tensor: per dim, its factors; ``stack``: (dim, labels per index, feature dim) of RNN states."""

    dims: list[tuple[Factor, ...]]
    stack: tuple[int, list[int], int] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(prod(s for _, s in d) for d in self.dims)


class _NT:
    """A non-tensor runtime value (sizes, ints, None, ...)."""


_NONTENSOR = _NT()


def _plain(shape: Sequence[int]) -> _T:
    return _T([((None, int(n)),) for n in shape])


def _size(d: tuple[Factor, ...]) -> int:
    return prod(s for _, s in d)


def _labelled(d: tuple[Factor, ...]) -> bool:
    return any(lab is not None for lab, _ in d)


@dataclass
class _Param:
    parts: list[tuple[int, ...]]  # labels per part
    views: list[tuple[int, ...]]


@dataclass
class _Ctx:
    labels: _Labels = field(default_factory=_Labels)
    params: dict[str, _Param] = field(default_factory=dict)
    in_spec: frozenset[str] = frozenset()  # buffers (besides parameters) whose axes the spec describes
    strip: str = ""  # prefix of the wrapper around a leaf root module
    where: str = ""  # the module / op being processed (label origins)
    node: str = ""  # its short name (names labels made by ops)
    collapsed: dict[int, int] = field(default_factory=dict)  # axis label -> one fixed label standing for it

    def new(self, name: str, size: int, status: int = _FREE) -> int:
        return self.labels.new(self.short(name), size, status, self.where)

    def short(self, name: str) -> str:
        """A label name: the module's path, or the op's node name for messages such as "op 'cat' (cat)"."""
        if " " in name:
            name = self.node
        if self.strip and name.startswith(self.strip.rstrip(".")):
            name = name[len(self.strip) :] or "root"
        return name

    def tie(self, a: int, b: int, where: str) -> int:
        return self.labels.union(a, b, where)

    def fix(self, a: int) -> None:
        self.labels.fix(a)

    def param(self, name: str, parts: list[tuple[int, ...]], views: list[tuple[int, ...]]) -> None:
        if self.strip and name.startswith(self.strip):
            name = name[len(self.strip) :]
        for labels, view in zip(parts, views):
            got = tuple(self.labels.size[self.labels.find(a)] for a in labels)
            if got != tuple(view):  # a rule read its input differently from how the module uses it
                raise UnsupportedModuleError(f"{self.where}: parameter '{name}' has axes of sizes {tuple(view)}, but "
                                             f"the input it reads gives sizes {got}")
        old = self.params.get(name)
        if old is None:
            self.params[name] = _Param(parts, views)
            return
        if old.views != views:
            raise UnsupportedModuleError(f"parameter '{name}' is used with two different layouts {old.views} and "
                                         f"{views}")
        for pa, pb in zip(old.parts, parts):
            for a, b in zip(pa, pb):
                self.tie(a, b, f"parameter '{name}'")

    def consume(self, dim: tuple[Factor, ...], owner: str) -> tuple[list[int], list[int]]:
        """Labels and sizes for a weight axis reading ``dim``: unlabelled runs become one fixed position label."""
        labels, sizes, run = [], [], 1
        for i, (label, size) in enumerate(dim):
            if label is None:
                run *= size
                if i + 1 == len(dim) or dim[i + 1][0] is not None:
                    labels.append(self.new(f"{owner}.pos" if len(dim) > 1 else f"{owner}.in", run, _FIXED))
                    sizes.append(run)
                    run = 1
            else:
                labels.append(label)
                sizes.append(size)
        return labels, sizes

    def label_of(self, dim: tuple[Factor, ...], owner: str) -> int:
        """One label for a whole dim: its label, a fixed one if unlabelled, or the product of its factors."""
        labels, _ = self.consume(dim, owner)
        return self.labels.compose(_PROD, labels, self.short(owner), self.where)

    def fix_dims(self, t: Any) -> None:
        for x in _tensors_in(t):
            for d in x.dims:
                self.fix_dim(d)
            if x.stack is not None:
                for label in x.stack[1]:
                    self.fix(label)

    def fix_dim(self, d: tuple[Factor, ...]) -> None:
        for label, _ in d:
            if label is not None:
                self.fix(label)

    def tie_dims(self, x: tuple[Factor, ...], y: tuple[Factor, ...], where: str) -> tuple[Factor, ...]:
        """Tie two dims of equal size that meet element by element (or are contracted together)."""
        size = _size(x)
        if [s for _, s in x] == [s for _, s in y]:
            merged = []
            for (la, s), (lb, _) in zip(x, y):
                if la is not None and lb is not None:
                    merged.append((self.tie(la, lb, where), s))
                elif la is None and lb is None:
                    merged.append((None, s))
                else:  # a labelled axis meets an unlabelled one of the same size: do not claim the symmetry
                    self.fix(la if la is not None else lb)  # type: ignore[arg-type]
                    merged.append((la if la is not None else lb, s))
            return tuple(merged)
        if not _labelled(x) and not _labelled(y):
            return ((None, size),)
        if not _labelled(x) or not _labelled(y):
            self.fix_dim(x)
            self.fix_dim(y)
            return ((None, size),)
        a, b = self.label_of(x, where), self.label_of(y, where)
        return ((self.tie(a, b, where), size),)


def _tensors_in(value: Any) -> list[_T]:
    if isinstance(value, _T):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors_in(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors_in(v)]
    return []


# ----------------------------------------------------------------------------------------------- shape transforms
def _reshape(ctx: _Ctx, x: _T, out_shape: Sequence[int], where: str) -> _T:
    """Map dims through a reshape: merged dims keep their factors, a labelled factor split across dims is refined
    into a product of labels; anything else fixes the labels involved (conservative)."""
    factors = [f for d in x.dims for f in d if f[1] != 1]
    targets = [int(n) for n in out_shape]
    if prod(s for _, s in factors) != prod(targets):
        raise UnsupportedModuleError(f"{where}: cannot follow reshape {x.shape} -> {tuple(out_shape)}")
    bounds, p = set(), 1
    for n in targets:
        p *= n
        bounds.add(p)
    pieces: list[Factor] = []
    p = 1
    for lab, s in factors:
        inner = sorted(b for b in bounds if p < b < p * s)
        cuts, prev, ok = [], p, True
        for b in inner:
            if b % prev:
                ok = False
                break
            cuts.append(b // prev)
            prev = b
        if not ok or (p * s) % prev:
            ctx.fix_dims(x)
            return _plain(out_shape)
        cuts.append(p * s // prev)
        if len(cuts) == 1:
            pieces.append((lab, s))
        elif lab is None:
            pieces.extend((None, c) for c in cuts)
        else:
            pieces.extend(zip(ctx.labels.refine(lab, cuts, ctx.where), cuts))
        p *= s
    out: list[tuple[Factor, ...]] = []
    k = 0
    for n in targets:
        acc: list[Factor] = []
        q = 1
        while q < n:
            acc.append(pieces[k])
            q *= pieces[k][1]
            k += 1
        out.append(tuple(acc) if acc else ((None, 1),))
    return _T(out)


def _broadcast(ctx: _Ctx, a: _T, b: _T, out_shape: Sequence[int], where: str) -> _T:
    """Element-wise op of two tensors: aligned dims of equal size tie their labels (residual connections)."""
    n = len(out_shape)
    da = [((None, 1),)] * (n - len(a.dims)) + list(a.dims)
    db = [((None, 1),)] * (n - len(b.dims)) + list(b.dims)
    out = []
    for x, y, size in zip(da, db, out_shape):
        sx, sy = _size(x), _size(y)
        if sx != sy:
            out.append(x if sx == size else y)
            continue
        out.append(ctx.tie_dims(x, y, where))
    if a.stack is not None or b.stack is not None:
        stacks = [s for s in (a.stack, b.stack) if s is not None]
        if len(stacks) == 2 and len(stacks[0][1]) == len(stacks[1][1]):
            for la, lb in zip(stacks[0][1], stacks[1][1]):
                ctx.tie(la, lb, where)
        return _T(out, stacks[0])
    return _T(out)
