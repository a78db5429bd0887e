"""Derive a `WeightSpec` from an ``nn.Module`` by torch.fx tracing and per-dimension label propagation.

The module is traced with every instance (subclasses included) of a supported ``torch.nn`` class as a leaf (a root
module of such a class is wrapped, so ``nn.LSTM`` or ``nn.TransformerEncoder`` may be the model itself); shapes come
from running the graph on an example input (given, or built from the first layer). Every dimension of every traced
tensor is a row-major product of factors, each with a label (or none, for batch / sequence / spatial dims). Leaf
modules label their parameters' (and norm layers' running statistics') axes from their inputs' labels; element-wise
ops with two tensors tie labels (residual additions, gating), ``matmul`` ties the contracted dims, flatten keeps a
labelled channel with a fixed spatial part, reductions drop dims. A label can be *refined* into a product of labels
(a reshape that splits a feature dim, grouped convolutions, GroupNorm) or be a *sum* of labels (channel
concatenation, ``chunk``, a bidirectional RNN's output); a weight axis reading a sum is split into parts, one per
summand. Labels that reach the model's inputs or outputs, kernel positions, gates and vocabularies are fixed; indexing
or slicing a labelled dim fixes its label, and so does any structure the spec cannot express (conservative: the spec
never claims a symmetry the network lacks). `spec_from_module` then verifies the result (``unf_models.verify``).
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from math import prod
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from unf_models.errors import SpecError, SymmetryError, UnsupportedModuleError
from unf_models.spec import WeightSpec, _group_axes

__all__ = ["spec_from_module", "SUPPORTED_MODULES"]

_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.ELU, nn.CELU, nn.SELU, nn.LeakyReLU, nn.Softplus,
    nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Mish, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Softmax,
    nn.LogSoftmax, nn.Identity, nn.modules.dropout._DropoutNd, nn.AlphaDropout,
)
_POOLS: dict[type[nn.Module], int] = {
    nn.MaxPool1d: 1, nn.AvgPool1d: 1, nn.AdaptiveAvgPool1d: 1, nn.AdaptiveMaxPool1d: 1,
    nn.MaxPool2d: 2, nn.AvgPool2d: 2, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveMaxPool2d: 2,
    nn.MaxPool3d: 3, nn.AvgPool3d: 3, nn.AdaptiveAvgPool3d: 3, nn.AdaptiveMaxPool3d: 3,
}
_NORMS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
_TRANSFORMERS: tuple[type[nn.Module], ...] = (
    nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder, nn.TransformerDecoderLayer,
    nn.TransformerDecoder, nn.Transformer,
)
SUPPORTED_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, *_NORMS, nn.Embedding, nn.RNNBase, *_TRANSFORMERS, nn.Flatten,
    nn.Unflatten, nn.PReLU, *_ACTIVATIONS, *_POOLS,
)

_HINT = (
    "Declare the spec by hand instead, e.g. um.WeightSpec({{{example}}}, shapes={{...}}, fixed=(...)): one label "
    "per axis, equal labels for axes permuted together, fixed=(...) for axes that are not permuted (inputs, "
    "classes, kernel positions, vocabulary)."
)

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


# ----------------------------------------------------------------------------------------------- leaf module rules
def _rule_linear(ctx: _Ctx, m: nn.Linear, name: str, x: _T) -> _T:
    out = ctx.new(name, m.out_features)
    in_labels, in_sizes = ctx.consume(x.dims[-1], name)
    ctx.param(f"{name}.weight", [(out, *in_labels)], [(m.out_features, *in_sizes)])
    if m.bias is not None:
        ctx.param(f"{name}.bias", [(out,)], [(m.out_features,)])
    return _T([*x.dims[:-1], ((out, m.out_features),)])


def _group_split(ctx: _Ctx, dim: tuple[Factor, ...], groups: int, owner: str) -> tuple[int, int | None]:
    """A channel dim read in ``groups`` consecutive groups: (label of the group index, label within a group)."""
    total = _size(dim)
    if groups == total:
        return ctx.label_of(dim, owner), None
    p = 1
    for k, (_, s) in enumerate(dim):
        p *= s
        if p == groups:
            return ctx.label_of(dim[: k + 1], f"{owner}.groups"), ctx.label_of(dim[k + 1 :], owner)
        if p > groups:
            break
    g, within = ctx.labels.refine(ctx.label_of(dim, owner), [groups, total // groups], ctx.where,
                                  [f"{owner}.groups", f"{owner}.in"])
    return g, within


def _rule_conv(ctx: _Ctx, m: nn.Conv1d | nn.Conv2d | nn.Conv3d, name: str, x: _T, out_shape: Sequence[int]) -> _T:
    nsp = len(m.kernel_size)
    if len(x.dims) < nsp + 1:
        raise UnsupportedModuleError(f"module '{name}' ({type(m).__name__}) got an input of shape {x.shape}")
    dim = x.dims[-(nsp + 1)]
    kernel = [ctx.new(f"{name}.k{i}", k, _FIXED) for i, k in enumerate(m.kernel_size)]
    g = m.groups
    if g == 1:
        out = ctx.new(name, m.out_channels)
        in_labels, in_sizes = ctx.consume(dim, name)
        ctx.param(f"{name}.weight", [(out, *in_labels, *kernel)], [(m.out_channels, *in_sizes, *m.kernel_size)])
        out_dim: tuple[Factor, ...] = ((out, m.out_channels),)
        lead_axes, lead_sizes = [out], [m.out_channels]
    else:  # grouped / depthwise: (groups, out per group) x (in per group); groups share one label with the input
        group, within = _group_split(ctx, dim, g, name)
        ci, co = m.in_channels // g, m.out_channels // g
        w_in = within if within is not None else ctx.new(f"{name}.in", 1, _FIXED)
        if co > 1:
            o = ctx.new(name, co)
            lead_axes, lead_sizes, out_dim = [group, o], [g, co], ((group, g), (o, co))
        else:
            lead_axes, lead_sizes, out_dim = [group], [g], ((group, g),)
        ctx.param(f"{name}.weight", [(*lead_axes, w_in, *kernel)], [(*lead_sizes, ci, *m.kernel_size)])
    if m.bias is not None:
        ctx.param(f"{name}.bias", [tuple(lead_axes)], [tuple(lead_sizes)])
    lead = x.dims[: -(nsp + 1)]
    return _T([*lead, out_dim, *(((None, int(s)),) for s in out_shape[len(lead) + 1 :])])


def _norm_stats(ctx: _Ctx, m: nn.Module, name: str, labels: tuple[int, ...], view: tuple[int, ...]) -> None:
    """Affine parameters and running statistics of a per-channel norm layer (statistics move with their channel)."""
    if getattr(m, "affine", True) and getattr(m, "weight", None) is not None:
        ctx.param(f"{name}.weight", [labels], [view])
    if getattr(m, "affine", True) and getattr(m, "bias", None) is not None:
        ctx.param(f"{name}.bias", [labels], [view])
    if getattr(m, "track_running_stats", False) and getattr(m, "running_mean", None) is not None:
        ctx.param(f"{name}.running_mean", [labels], [view])
        ctx.param(f"{name}.running_var", [labels], [view])


def _rule_batchnorm(ctx: _Ctx, m: nn.modules.batchnorm._NormBase, name: str, x: _T) -> _T:
    axis = 1 if len(x.dims) > 1 else 0
    if isinstance(m, nn.modules.instancenorm._InstanceNorm) and len(x.dims) == m._get_no_batch_dim():
        axis = 0
    channel = ctx.label_of(x.dims[axis], name)
    _norm_stats(ctx, m, name, (channel,), (m.num_features,))
    return x


def _rule_groupnorm(ctx: _Ctx, m: nn.GroupNorm, name: str, x: _T) -> _T:
    dim = x.dims[1]
    if m.num_groups in (1, m.num_channels):
        labels, view = (ctx.label_of(dim, name),), (m.num_channels,)
    else:
        labels = tuple(_group_split(ctx, dim, m.num_groups, name))  # type: ignore[arg-type]
        view = (m.num_groups, m.num_channels // m.num_groups)
    _norm_stats(ctx, m, name, labels, view)
    return x


def _rule_layernorm(ctx: _Ctx, m: nn.Module, name: str, x: _T) -> _T:
    """LayerNorm / RMSNorm over the last dims: equivariant to any permutation of them; weights carry their labels."""
    shape = tuple(m.normalized_shape)  # type: ignore[attr-defined]
    labels = tuple(ctx.label_of(d, name) for d in x.dims[len(x.dims) - len(shape) :])
    _norm_stats(ctx, m, name, labels, shape)
    return x


def _rule_embedding(ctx: _Ctx, m: nn.Embedding, name: str, x: _T) -> _T:
    vocab = ctx.new(f"{name}.vocab", m.num_embeddings, _FIXED)
    out = ctx.new(name, m.embedding_dim)
    ctx.param(f"{name}.weight", [(vocab, out)], [(m.num_embeddings, m.embedding_dim)])
    return _T([*x.dims, ((out, m.embedding_dim),)])


def _rule_rnn(ctx: _Ctx, m: nn.RNNBase, name: str, args: list[Any], out_meta: Any) -> Any:
    """RNN / LSTM / GRU, multi-layer, bidirectional (output = forward then reverse features), LSTM projections."""
    gates = {"LSTM": 4, "GRU": 3}.get(m.mode, 1)
    dirs = 2 if m.bidirectional else 1
    proj = int(getattr(m, "proj_size", 0) or 0)
    hsize, osize = m.hidden_size, proj or m.hidden_size
    x = args[0]
    suffix = ["", "r"]
    cell = [[ctx.new(f"{name}.h{k}{suffix[d]}" if m.num_layers > 1 or dirs > 1 else name, hsize)
             for d in range(dirs)] for k in range(m.num_layers)]
    outl = [[ctx.new(f"{name}.p{k}{suffix[d]}", proj) for d in range(dirs)] for k in range(m.num_layers)] if proj \
        else cell
    hx = args[1] if len(args) > 1 else None
    states = [s for s in (hx if isinstance(hx, (tuple, list)) else [hx]) if isinstance(s, _T)]
    for i, s in enumerate(states):
        want = [lab for layer in (cell if i == 1 else outl) for lab in layer]
        labels = s.stack[1] if s.stack is not None else [lab for lab, _ in s.dims[-1]]
        if len(labels) != len(want) or any(lab is None for lab in labels):
            raise UnsupportedModuleError(f"module '{name}': cannot match its initial state to {m.num_layers} "
                                         f"layer(s) x {dirs} direction(s) of size {osize}")
        for h, lab in zip(want, labels):
            ctx.tie(h, lab, f"initial state of '{name}'")
    gate = ctx.new(f"{name}.gate", gates, _FIXED) if gates > 1 else None
    pre, pre_size = ((gate,), (gates,)) if gate is not None else ((), ())
    src, src_sizes = ctx.consume(x.dims[-1], name)
    for k in range(m.num_layers):
        for d in range(dirs):
            end = f"l{k}{'_reverse' if d else ''}"
            h, o = cell[k][d], outl[k][d]
            ctx.param(f"{name}.weight_ih_{end}", [(*pre, h, *src)], [(*pre_size, hsize, *src_sizes)])
            ctx.param(f"{name}.weight_hh_{end}", [(*pre, h, o)], [(*pre_size, hsize, osize)])
            if m.bias:
                ctx.param(f"{name}.bias_ih_{end}", [(*pre, h)], [(*pre_size, hsize)])
                ctx.param(f"{name}.bias_hh_{end}", [(*pre, h)], [(*pre_size, hsize)])
            if proj:
                ctx.param(f"{name}.weight_hr_{end}", [(o, h)], [(osize, hsize)])
        src = [ctx.labels.compose(_SUM, outl[k], ctx.short(f"{name}.out{k}"), ctx.where)]
        src_sizes = [osize * dirs]
    out = _T([*x.dims[:-1], ((src[0], osize * dirs),)])

    def state(shape: Sequence[int], layers: list[list[int]]) -> _T:
        t = _plain(shape)
        flat = [lab for layer in layers for lab in layer]
        if len(flat) == 1:
            t.dims[-1] = ((flat[0], int(shape[-1])),)
        else:
            t.stack = (0, flat, len(shape) - 1)
        return t

    if m.mode == "LSTM":
        h_shape, c_shape = out_meta[1]
        return (out, (state(h_shape, outl), state(c_shape, cell)))
    return (out, state(out_meta[1], outl))


def _rule_mha(ctx: _Ctx, m: nn.MultiheadAttention, name: str, q: _T, k: _T, v: _T) -> _T:
    if not m._qkv_same_embed_dim or m.bias_k is not None:
        raise UnsupportedModuleError(f"module '{name}' (MultiheadAttention) uses kdim/vdim or add_bias_kv, "
                                     f"which are not supported")
    d = ctx.label_of(q.dims[-1], name)
    for other, what in ((k, "key"), (v, "value")):
        ctx.tie(d, ctx.label_of(other.dims[-1], name), f"{name} ({what})")
    e, h = m.embed_dim, m.num_heads
    dh = e // h
    heads = ctx.new(f"{name}.heads", h)
    qk = ctx.new(f"{name}.qk", dh)
    vv = ctx.new(f"{name}.v", dh)
    out = ctx.new(name, e)
    ctx.param(f"{name}.in_proj_weight", [(heads, qk, d), (heads, qk, d), (heads, vv, d)], [(h, dh, e)] * 3)
    if m.in_proj_bias is not None:
        ctx.param(f"{name}.in_proj_bias", [(heads, qk), (heads, qk), (heads, vv)], [(h, dh)] * 3)
    ctx.param(f"{name}.out_proj.weight", [(out, heads, vv)], [(e, h, dh)])
    if m.out_proj.bias is not None:
        ctx.param(f"{name}.out_proj.bias", [(out,)], [(e,)])
    return _T([*q.dims[:-1], ((out, e),)])


def _block_end(ctx: _Ctx, m: nn.Module, name: str, x: _T, d: int, attn: list[tuple[str, _T, _T]],
               norms: Sequence[str]) -> _T:
    """A transformer block: attentions and the feed-forward write back into the residual stream ``d``."""
    for attr, q, kv in attn:
        y = _rule_mha(ctx, getattr(m, attr), f"{name}.{attr}", q, kv, kv)
        ctx.tie(d, y.dims[-1][0][0], f"residual of '{name}'")  # type: ignore[arg-type]
    for norm in norms:
        _rule_layernorm(ctx, getattr(m, norm), f"{name}.{norm}", x)
    hidden = _rule_linear(ctx, m.linear1, f"{name}.linear1", x)  # type: ignore[arg-type]
    back = _rule_linear(ctx, m.linear2, f"{name}.linear2", hidden)  # type: ignore[arg-type]
    ctx.tie(d, back.dims[-1][0][0], f"residual of '{name}'")  # type: ignore[arg-type]
    return x


def _rule_encoder_layer(ctx: _Ctx, m: nn.TransformerEncoderLayer, name: str, x: _T) -> _T:
    d = ctx.label_of(x.dims[-1], name)
    x = _T([*x.dims[:-1], ((d, _size(x.dims[-1])),)])
    return _block_end(ctx, m, name, x, d, [("self_attn", x, x)], ("norm1", "norm2"))


def _rule_decoder_layer(ctx: _Ctx, m: nn.TransformerDecoderLayer, name: str, x: _T, memory: _T) -> _T:
    d = ctx.label_of(x.dims[-1], name)
    x = _T([*x.dims[:-1], ((d, _size(x.dims[-1])),)])
    return _block_end(ctx, m, name, x, d, [("self_attn", x, x), ("multihead_attn", x, memory)],
                      ("norm1", "norm2", "norm3"))


def _stack_norm(ctx: _Ctx, m: nn.Module, name: str, x: _T) -> None:
    norm = getattr(m, "norm", None)
    if norm is None:
        return
    if not isinstance(norm, _NORMS) or isinstance(norm, (nn.modules.batchnorm._NormBase, nn.GroupNorm)):
        raise UnsupportedModuleError(f"module '{name}.norm' ({type(norm).__name__}) is not a LayerNorm")
    _rule_layernorm(ctx, norm, f"{name}.norm", x)


def _rule_encoder(ctx: _Ctx, m: nn.TransformerEncoder, name: str, x: _T) -> _T:
    for i, layer in enumerate(m.layers):
        if not isinstance(layer, nn.TransformerEncoderLayer):
            raise UnsupportedModuleError(f"module '{name}.layers.{i}' ({type(layer).__name__}) inside a "
                                         f"TransformerEncoder is not a TransformerEncoderLayer")
        x = _rule_encoder_layer(ctx, layer, f"{name}.layers.{i}", x)
    _stack_norm(ctx, m, name, x)
    return x


def _rule_decoder(ctx: _Ctx, m: nn.TransformerDecoder, name: str, x: _T, memory: _T) -> _T:
    for i, layer in enumerate(m.layers):
        if not isinstance(layer, nn.TransformerDecoderLayer):
            raise UnsupportedModuleError(f"module '{name}.layers.{i}' ({type(layer).__name__}) inside a "
                                         f"TransformerDecoder is not a TransformerDecoderLayer")
        x = _rule_decoder_layer(ctx, layer, f"{name}.layers.{i}", x, memory)
    _stack_norm(ctx, m, name, x)
    return x


def _rule_pool(x: _T, nsp: int, out_shape: Sequence[int]) -> _T:
    lead = x.dims[: len(x.dims) - nsp]
    return _T([*lead, *(((None, int(s)),) for s in out_shape[len(lead) :])])


def _arg(args: list[Any], kwargs: dict[str, Any], i: int, key: str) -> Any:
    return kwargs.get(key, args[i] if len(args) > i else None)


def _call_module(ctx: _Ctx, m: nn.Module, name: str, args: list[Any], kwargs: dict[str, Any], out_meta: Any,
                 out_shape: Sequence[int] | None) -> Any:
    x = args[0] if args else next(iter(kwargs.values()), None)
    if isinstance(m, nn.Transformer):
        src, tgt = _arg(args, kwargs, 0, "src"), _arg(args, kwargs, 1, "tgt")
        memory = _rule_encoder(ctx, m.encoder, f"{name}.encoder", src)  # type: ignore[arg-type]
        return _rule_decoder(ctx, m.decoder, f"{name}.decoder", tgt, memory)  # type: ignore[arg-type]
    if isinstance(m, nn.TransformerEncoder):
        return _rule_encoder(ctx, m, name, x)
    if isinstance(m, nn.TransformerEncoderLayer):
        return _rule_encoder_layer(ctx, m, name, x)
    if isinstance(m, (nn.TransformerDecoder, nn.TransformerDecoderLayer)):
        memory = _arg(args, kwargs, 1, "memory")
        rule = _rule_decoder if isinstance(m, nn.TransformerDecoder) else _rule_decoder_layer
        return rule(ctx, m, name, x, memory)  # type: ignore[arg-type]
    if isinstance(m, nn.MultiheadAttention):
        q, k, v = _arg(args, kwargs, 0, "query"), _arg(args, kwargs, 1, "key"), _arg(args, kwargs, 2, "value")
        out = _rule_mha(ctx, m, name, q, k, v)
        weights = out_meta[1] if isinstance(out_meta, (tuple, list)) and len(out_meta) > 1 else None
        return (out, _plain(weights) if weights is not None else _NONTENSOR)
    if isinstance(m, nn.RNNBase):
        return _rule_rnn(ctx, m, name, [x, _arg(args, kwargs, 1, "hx")], out_meta)
    if not isinstance(x, _T):
        raise UnsupportedModuleError(f"module '{name}' ({type(m).__name__}) got a non-tensor input")
    if isinstance(m, nn.Linear):
        return _rule_linear(ctx, m, name, x)
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return _rule_conv(ctx, m, name, x, out_shape or ())
    if isinstance(m, nn.modules.batchnorm._NormBase):
        return _rule_batchnorm(ctx, m, name, x)
    if isinstance(m, nn.GroupNorm):
        return _rule_groupnorm(ctx, m, name, x)
    if isinstance(m, _NORMS):  # LayerNorm, RMSNorm
        return _rule_layernorm(ctx, m, name, x)
    if isinstance(m, nn.Embedding):
        return _rule_embedding(ctx, m, name, x)
    if isinstance(m, nn.PReLU):
        if m.num_parameters == 1:
            ctx.param(f"{name}.weight", [(ctx.new(f"{name}.weight", 1, _FIXED),)], [(1,)])
        else:
            ctx.param(f"{name}.weight", [(ctx.label_of(x.dims[1], name),)], [(m.num_parameters,)])
        return x
    if isinstance(m, _ACTIVATIONS):  # element-wise, or softmax along a dim (equivariant to permuting it)
        return x
    for cls, nsp in _POOLS.items():
        if isinstance(m, cls):
            return _rule_pool(x, nsp, out_shape or ())
    if isinstance(m, (nn.Flatten, nn.Unflatten)):
        return _reshape(ctx, x, out_shape or (), f"module '{name}'")
    raise UnsupportedModuleError(f"module '{name}' ({type(m).__name__}) is not supported by "
                                 f"WeightSpec.from_module")


# ----------------------------------------------------------------------------------------------- function rules
_UNARY = {
    torch.relu, F.relu, torch.tanh, F.tanh, torch.sigmoid, F.sigmoid, F.gelu, F.silu, F.elu, F.leaky_relu,
    F.softplus, F.dropout, F.hardtanh, F.relu6, F.mish, F.selu, F.celu, torch.abs, torch.neg, operator.neg,
    torch.exp, torch.sqrt, torch.square, torch.clamp, torch.clip, F.softmax, F.log_softmax, torch.softmax,
    torch.log_softmax, torch.nn.functional.normalize, operator.pos, F.hardsigmoid, F.hardswish, F.logsigmoid,
    F.softsign, F.tanhshrink, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    torch.rsqrt, torch.reciprocal, torch.log, torch.log1p, torch.expm1, torch.erf, torch.sin, torch.cos,
    torch.sign, torch.nan_to_num, torch.exp2,
}
# torch.fx-wrapped functions that are the identity in eval mode (derivation and verification run in eval mode)
_EVAL_IDENTITY = {"stochastic_depth", "drop_path"}
_UNARY_METHODS = {
    "relu", "tanh", "sigmoid", "exp", "abs", "neg", "clamp", "clip", "softmax", "log_softmax", "contiguous",
    "float", "double", "half", "to", "type", "type_as", "detach", "clone", "sqrt", "square", "relu_", "tanh_",
    "sigmoid_", "cpu", "cuda", "requires_grad_", "rsqrt", "reciprocal", "log", "log1p", "expm1", "erf", "sin",
    "cos", "sign", "nan_to_num", "exp2", "clamp_", "clamp_min", "clamp_max", "hardtanh_", "relu6",
}
_BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
           operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum,
           torch.minimum}
_BINARY |= {operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge, torch.eq, torch.ne,
            torch.lt, torch.le, torch.gt, torch.ge, torch.where, torch.masked_fill}
_BINARY_METHODS = {"add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_", "maximum", "minimum", "eq", "ne",
                   "lt", "le", "gt", "ge", "masked_fill"}
_CREATE = {torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like, torch.rand_like, torch.randn_like,
           torch.randint_like}
_CREATE_METHODS = {"new_zeros", "new_ones", "new_full", "new_empty", "new_tensor", "size", "dim", "numel",
                   "__len__"}
_REDUCE = {torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var, torch.logsumexp}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin", "std", "var", "logsumexp"}
_RESHAPE = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "unflatten", "view_as", "reshape_as"}
_RMS = (F.rms_norm,) if hasattr(F, "rms_norm") else ()
_FUNC_NORMS = {F.layer_norm, F.group_norm, F.batch_norm, F.instance_norm, *_RMS}
_POOL_FUNCS = {F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.avg_pool1d: 1, F.avg_pool2d: 2,
               F.max_pool1d: 1, F.max_pool2d: 2, F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2,
               F.adaptive_avg_pool3d: 3, F.avg_pool3d: 3, F.max_pool3d: 3, F.adaptive_max_pool3d: 3}


def _op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return getattr(node.target, "__name__", str(node.target))


def _reduce(x: _T, dims: Any, keepdim: bool, out_shape: Sequence[int]) -> _T:
    n = len(x.dims)
    if dims is None:
        axes = set(range(n))
    else:
        axes = {d % n for d in (dims if isinstance(dims, (tuple, list)) else [dims])}
    out = []
    for i, d in enumerate(x.dims):
        if i in axes:
            if keepdim:
                out.append(((None, 1),))
        else:
            out.append(d)
    if len(out) != len(out_shape):
        return _plain(out_shape)
    return _T(out)


def _getitem(ctx: _Ctx, x: Any, index: Any, out_shape: Sequence[int] | None, where: str) -> Any:
    if not isinstance(x, _T):
        if isinstance(x, (tuple, list)) and isinstance(index, int):
            return x[index]
        return _NONTENSOR
    idx = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, _T) for i in idx) or any(not isinstance(i, (int, slice, type(None), type(...)))
                                                   for i in idx):
        ctx.fix_dims(x)  # advanced indexing: claim nothing
        return _plain(out_shape or ())
    n_real = sum(1 for i in idx if i is not None and i is not ...)
    if ... in idx:
        k = idx.index(...)
        idx = (*idx[:k], *([slice(None)] * (len(x.dims) - n_real)), *idx[k + 1 :])
    out, pos, stack = [], 0, x.stack
    for i in idx:
        if i is None:
            out.append(((None, 1),))
            continue
        d = x.dims[pos]
        labelled = any(lab is not None for lab, _ in d)
        if isinstance(i, int):
            if stack is not None and stack[0] == pos:
                feature = stack[2]
                x = _T(list(x.dims))
                x.dims[feature] = ((stack[1][i], x.dims[feature][0][1]),)
                d, stack = x.dims[pos], None
            elif labelled:
                for lab, _ in d:
                    if lab is not None:
                        ctx.labels.fix(lab)
        elif isinstance(i, slice):
            if i == slice(None):
                out.append(d)
            else:
                if labelled:
                    for lab, _ in d:
                        if lab is not None:
                            ctx.labels.fix(lab)
                out.append(((None, -1),))
        pos += 1
    out.extend(x.dims[pos:])
    if out_shape is not None and len(out_shape) == len(out):  # sliced dims take their size from the run
        out = [((None, int(n)),) if all(lab is None for lab, _ in d) and prod(s for _, s in d) != n else d
               for d, n in zip(out, out_shape)]
    return _T(out)


def _split_op(ctx: _Ctx, x: _T, dim: int, out_meta: Any, unbind: bool) -> Any:
    """chunk / split / unbind along ``dim``: a labelled dim splits into consecutive blocks with labels of their own
    (unbind fixes it)."""
    n = len(x.dims)
    dim %= n
    shapes = [tuple(s) for s in out_meta] if isinstance(out_meta, (tuple, list)) else []
    if not shapes:
        ctx.fix_dims(x)
        return _NONTENSOR
    d = x.dims[dim]
    if unbind:
        ctx.fix_dim(d)
        return tuple(_T([*x.dims[:dim], *x.dims[dim + 1 :]]) for _ in shapes)
    sizes = [int(s[dim]) for s in shapes]
    if not _labelled(d):
        blocks: list[int | None] = [None] * len(sizes)
    else:
        blocks = list(ctx.labels.split(ctx.label_of(d, ctx.where), sizes, ctx.where))
    return tuple(_T([*x.dims[:dim], ((lab, s),), *x.dims[dim + 1 :]]) for lab, s in zip(blocks, sizes))


def _matmul(ctx: _Ctx, a: _T, b: _T, out_shape: Sequence[int] | None, where: str) -> _T:
    """a @ b: the contracted dims are tied (a sum over them is invariant when both move together)."""
    if len(a.dims) == 1 or len(b.dims) == 1:
        ctx.tie_dims(a.dims[-1], b.dims[-2] if len(b.dims) > 1 else b.dims[0], where)
        return _plain(out_shape or ())
    ctx.tie_dims(a.dims[-1], b.dims[-2], where)
    batch = list(out_shape or ())[:-2]
    lead = _broadcast(ctx, _T(list(a.dims[:-2])), _T(list(b.dims[:-2])), batch, where).dims if batch else []
    return _T([*lead, a.dims[-2], b.dims[-1]])


def _tie_trailing(ctx: _Ctx, x: _T, w: Any, where: str) -> None:
    if isinstance(w, _T):
        _broadcast(ctx, x, w, x.shape, where)


def _tie_channel(ctx: _Ctx, x: _T, w: Any, where: str) -> None:
    if isinstance(w, _T) and len(x.dims) > 1:
        ctx.tie_dims(x.dims[1], w.dims[0], where)


def _call_function(ctx: _Ctx, node: fx.Node, args: list[Any], kwargs: dict[str, Any],
                   out_shape: Sequence[int] | None) -> Any:
    target, where = node.target, f"op '{_op_name(node)}' ({node.name})"
    method = node.op == "call_method"
    name = target if method else None
    tensors = [a for a in args if isinstance(a, _T)]
    if (method and name in ("chunk", "split", "unbind", "tensor_split")) or target in (
            torch.chunk, torch.split, torch.unbind, torch.tensor_split):
        dim = kwargs.get("dim", args[1] if name == "unbind" or target is torch.unbind else
                         (args[2] if len(args) > 2 else 0))
        if not isinstance(dim, int):
            dim = 0
        return _split_op(ctx, args[0], dim, node.meta.get(_META), name == "unbind" or target is torch.unbind)
    if (method and name in ("matmul", "bmm")) or target in (operator.matmul, torch.matmul, torch.bmm):
        return _matmul(ctx, tensors[0], tensors[1], out_shape, where)
    if target is F.scaled_dot_product_attention:
        q, k, v = tensors[:3]
        ctx.tie_dims(q.dims[-1], k.dims[-1], where)
        ctx.tie_dims(k.dims[-2], v.dims[-2], where)
        batch = list(out_shape or ())[:-2]
        lead: list[tuple[Factor, ...]] = []
        if batch:
            kv = _broadcast(ctx, _T(list(k.dims[:-2])), _T(list(v.dims[:-2])), batch, where)
            lead = _broadcast(ctx, _T(list(q.dims[:-2])), kv, batch, where).dims
        return _T([*lead, q.dims[-2], v.dims[-1]])
    if target is F.linear:
        x, w = args[0], _arg(args, kwargs, 1, "weight")
        b = _arg(args, kwargs, 2, "bias")
        ctx.tie_dims(x.dims[-1], w.dims[1], where)
        if isinstance(b, _T):
            ctx.tie_dims(w.dims[0], b.dims[0], where)
        return _T([*x.dims[:-1], w.dims[0]])
    if target in _FUNC_NORMS:
        x = args[0]
        if target in (F.layer_norm, *_RMS):
            for key, i in (("weight", 2), ("bias", 3)):
                _tie_trailing(ctx, x, _arg(args, kwargs, i, key), where)
        elif target is F.group_norm:
            groups = int(_arg(args, kwargs, 1, "num_groups"))
            c = _size(x.dims[1])
            labels = ((ctx.label_of(x.dims[1], where),) if groups in (1, c) else
                      _group_split(ctx, x.dims[1], groups, where))
            for key, i in (("weight", 2), ("bias", 3)):
                w = _arg(args, kwargs, i, key)
                if isinstance(w, _T):
                    if len(labels) == 1:
                        ctx.tie_dims(((labels[0], c),), w.dims[0], where)
                    else:
                        ctx.tie(ctx.label_of(w.dims[0], where),
                                ctx.labels.compose(_PROD, list(labels), ctx.node, where), where)  # type: ignore[arg-type]
        else:  # batch_norm(x, running_mean, running_var, weight, bias, ...), instance_norm(x, rm, rv, w, b, ...)
            for key, i in (("running_mean", 1), ("running_var", 2), ("weight", 3), ("bias", 4)):
                _tie_channel(ctx, x, _arg(args, kwargs, i, key), where)
        return x
    if target is F.pad:
        x, pad = args[0], _arg(args, kwargs, 1, "pad")
        k = len(pad) // 2
        dims = list(x.dims)
        for j in range(k):
            if pad[2 * j] or pad[2 * j + 1]:
                ctx.fix_dim(dims[-1 - j])
                dims[-1 - j] = ((None, int(out_shape[-1 - j]) if out_shape else -1),)
        return _T(dims)
    if target is F.interpolate:
        x = args[0]
        return _rule_pool(x, len(x.dims) - 2, out_shape or ())
    if not method and getattr(target, "__name__", "") in _EVAL_IDENTITY and tensors:
        return tensors[0]
    if target is operator.getitem:
        return _getitem(ctx, args[0], args[1], out_shape, where)
    if target in (getattr, len):
        return _NONTENSOR
    if (method and name in _CREATE_METHODS) or target in _CREATE:  # a fresh tensor shaped like another
        return _plain(out_shape) if out_shape is not None else _NONTENSOR
    if target in (torch.cat, torch.concat, torch.stack, torch.hstack, torch.vstack):
        tensors = _tensors_in(args[0] if args else kwargs.get("tensors"))
        if not tensors:
            return _plain(out_shape) if out_shape is not None else _NONTENSOR
        if target in (torch.hstack, torch.vstack):
            ctx.fix_dims(tensors)
            return _plain(out_shape or ())
    if not tensors and not any(isinstance(v, _T) for v in kwargs.values()):
        if out_shape is not None and target not in _UNARY:
            return _plain(out_shape)  # a fresh tensor (zeros, arange, ...): unlabelled
        return _NONTENSOR
    x = tensors[0] if tensors else next(v for v in kwargs.values() if isinstance(v, _T))
    if (method and name in _UNARY_METHODS) or target in _UNARY:
        return x
    if (method and name == "pow") or target is torch.pow or target is operator.pow:
        if len(tensors) == 1:
            return x
    if (method and name in _BINARY_METHODS) or target in _BINARY:
        tensors = tensors + [v for v in kwargs.values() if isinstance(v, _T)]
        if len(tensors) > 2:  # torch.where(cond, a, b): tie all three
            base = tensors[0]
            for other in tensors[1:]:
                base = _broadcast(ctx, base, other, out_shape or base.shape, where)
            return base
        if len(tensors) == 1:
            return x if out_shape is None or tuple(out_shape) == x.shape else _broadcast(
                ctx, x, _plain(()), out_shape, where)
        return _broadcast(ctx, tensors[0], tensors[1], out_shape or tensors[0].shape, where)
    if (method and name in _REDUCE_METHODS) or target in _REDUCE:
        dims = kwargs.get("dim", args[1] if len(args) > 1 else None)
        keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
        return _reduce(x, dims, bool(keepdim), out_shape or ())
    if (method and name in _RESHAPE_METHODS) or target in _RESHAPE:
        return _reshape(ctx, x, out_shape or (), where)
    if (method and name in ("permute", "transpose", "t", "movedim", "swapaxes")) or target in (
            torch.permute, torch.transpose, torch.t, torch.movedim, torch.swapaxes):
        n = len(x.dims)
        rest = [a for a in args[1:] if not isinstance(a, _T)]
        if name == "permute" or target is torch.permute:
            order = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else list(rest)
            order = order or list(kwargs.get("dims", ()))
        elif name == "t" or target is torch.t:
            order = list(range(n))[::-1]
        else:
            a, b = (rest + [kwargs.get("dim0"), kwargs.get("dim1")])[:2]
            order = list(range(n))
            if name == "movedim" or target is torch.movedim:
                order.pop(a % n)
                order.insert(b % n, a % n)
            else:
                order[a % n], order[b % n] = order[b % n], order[a % n]
        return _T([x.dims[o % n] for o in order])
    if method and name in ("expand", "expand_as"):  # grows size-1 dims only: labels stay
        shape = list(out_shape or ())
        lead = [((None, int(n)),) for n in shape[: len(shape) - len(x.dims)]]
        return _T(lead + [d if prod(s for _, s in d) == n else ((None, int(n)),)
                          for d, n in zip(x.dims, shape[len(lead) :])])
    if method and name == "repeat":
        return _reshape_repeat(ctx, x, out_shape or ())
    if target in _POOL_FUNCS:
        return _rule_pool(x, _POOL_FUNCS[target], out_shape or ())
    if target in (torch.cat, torch.concat, torch.stack):
        dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
        parts = tensors
        if len(parts) != len(args[0] if args else kwargs.get("tensors")):
            ctx.fix_dims(parts)
            return _plain(out_shape or ())
        if target is torch.stack:
            n = len(parts[0].dims) + 1
            dim %= n
            base = parts[0]
            for other in parts[1:]:
                base = _broadcast(ctx, base, other, base.shape, where)
            return _T([*base.dims[:dim], ((None, len(parts)),), *base.dims[dim:]])
        n = len(parts[0].dims)
        dim %= n
        base = _T([d if i != dim else ((None, 1),) for i, d in enumerate(parts[0].dims)])
        for other in parts[1:]:
            base = _broadcast(ctx, base, _T([d if i != dim else ((None, 1),) for i, d in enumerate(other.dims)]),
                              [s if i != dim else 1 for i, s in enumerate(base.shape)], where)
        total = sum(_size(t.dims[dim]) for t in parts)
        if any(_labelled(t.dims[dim]) for t in parts):  # the result's axis is the sum of the parts' axes
            cat = ctx.labels.compose(_SUM, [ctx.label_of(t.dims[dim], where) for t in parts], ctx.node, where)
            base.dims[dim] = ((cat, total),)
        else:
            base.dims[dim] = ((None, total),)
        return base
    raise UnsupportedModuleError(f"{where} is not supported by WeightSpec.from_module")


def _reshape_repeat(ctx: _Ctx, x: _T, out_shape: Sequence[int]) -> _T:
    out = [d if prod(s for _, s in d) == n else ((None, int(n)),) for d, n in zip(x.dims, out_shape)]
    if len(out) != len(out_shape):
        return _plain(out_shape)
    for d, n in zip(x.dims, out_shape):
        if prod(s for _, s in d) != n:
            for lab, _ in d:
                if lab is not None:
                    ctx.labels.fix(lab)
    return _T(out)


# ----------------------------------------------------------------------------------------------- tracing
class _LeafTracer(fx.Tracer):
    """Treat every instance (subclasses included) of a supported torch.nn class as a leaf, except the classes in
    ``through`` (subclasses with a forward of their own, traced into on a second attempt)."""

    def __init__(self, through: frozenset[type] = frozenset()) -> None:
        super().__init__()
        self.through = through

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, SUPPORTED_MODULES) and type(m) not in self.through:
            return True
        return super().is_leaf_module(m, qualname)


def _own_forward(model: nn.Module) -> frozenset[type]:
    """Subclasses of supported classes that replace torch.nn's forward (e.g. a channels-first LayerNorm)."""
    out = set()
    for m in model.modules():
        cls = type(m)
        if not isinstance(m, SUPPORTED_MODULES) or cls.__module__.startswith("torch."):
            continue
        base = next(c for c in cls.__mro__ if c.__module__.startswith("torch.nn"))
        if cls.forward is not base.forward:
            out.add(cls)
    return frozenset(out)


def _example_inputs(gm: fx.GraphModule, root: nn.Module, spatial: int, seq: bool) -> list[Any]:
    """Build an input per placeholder from the first leaf module that consumes it."""
    out = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        if node.args:  # has a default (e.g. an optional hidden state): keep it
            out.append(node.args[0])
            continue
        consumer = _first_module(node, gm)
        if consumer is None:
            raise SpecError(f"cannot build an example for input '{node.name}': pass example_input=...")
        x = _input_for(consumer, spatial, seq)
        ref = next(root.parameters(), None)
        if ref is not None:
            x = x.to(ref.device, ref.dtype if x.is_floating_point() else x.dtype)
        out.append(x)
    return out


def _first_module(node: fx.Node, gm: fx.GraphModule) -> nn.Module | None:
    """The first leaf module reading an input (an Embedding wins: then the input holds token ids)."""
    seen, todo, found = set(), [node], []
    while todo:
        cur = todo.pop(0)
        for user in cur.users:
            if user in seen:
                continue
            seen.add(user)
            if user.op == "call_module":
                found.append(gm.get_submodule(user.target))
            else:
                todo.append(user)
    embeddings = [m for m in found if isinstance(m, nn.Embedding)]
    return (embeddings or found or [None])[0]


def _input_for(m: nn.Module, spatial: int, sequence: bool) -> torch.Tensor:
    batch, seq = 2, 5
    if isinstance(m, nn.Embedding):
        return torch.randint(0, m.num_embeddings, (batch, seq))
    if isinstance(m, nn.Linear):
        return torch.randn(batch, seq, m.in_features) if sequence else torch.randn(batch, m.in_features)
    if isinstance(m, nn.Conv1d):
        return torch.randn(batch, m.in_channels, spatial)
    if isinstance(m, nn.Conv2d):
        return torch.randn(batch, m.in_channels, spatial, spatial)
    if isinstance(m, nn.RNNBase):
        return torch.randn(batch, seq, m.input_size) if m.batch_first else torch.randn(seq, batch, m.input_size)
    if isinstance(m, nn.MultiheadAttention):
        return torch.randn(batch, seq, m.embed_dim) if m.batch_first else torch.randn(seq, batch, m.embed_dim)
    if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return torch.randn(batch, seq, m.self_attn.embed_dim)
    if isinstance(m, (nn.TransformerEncoder, nn.TransformerDecoder)):
        return torch.randn(batch, seq, m.layers[0].self_attn.embed_dim)
    if isinstance(m, nn.Transformer):
        return torch.randn(seq, batch, m.d_model) if not m.batch_first else torch.randn(batch, seq, m.d_model)
    if isinstance(m, nn.Conv3d):
        return torch.randn(batch, m.in_channels, spatial, spatial, spatial)
    if isinstance(m, nn.modules.batchnorm._NormBase):
        nsp = {"BatchNorm2d": 2, "InstanceNorm2d": 2, "BatchNorm3d": 3, "InstanceNorm3d": 3}
        extra = next((n for cls, n in nsp.items() for c in type(m).__mro__ if c.__name__ == cls), 0)
        if isinstance(m, nn.modules.instancenorm._InstanceNorm):
            extra = max(extra, 1)
        return torch.randn(batch, m.num_features, *([spatial] * extra))
    if isinstance(m, nn.GroupNorm):
        return torch.randn(batch, m.num_channels, spatial, spatial)
    if isinstance(m, _NORMS):
        return torch.randn(batch, *m.normalized_shape)  # type: ignore[attr-defined]
    raise SpecError(f"cannot build an example input for a first layer of type {type(m).__name__}: "
                    f"pass example_input=...")


_META = "unf_models_shape"


def _shape_tree(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.Size(value.shape)
    if isinstance(value, (tuple, list)):
        return tuple(_shape_tree(v) for v in value)
    return None


class _ShapeRecorder(fx.Interpreter):
    """Runs the traced graph once and stores every node's output shape(s) in ``node.meta``."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.extra_traceback = False  # fx's error decoration imports torch._dynamo (seconds); we retry sizes

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        n.meta[_META] = _shape_tree(result)
        return result


def _meta_shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get(_META)
    return tuple(meta) if isinstance(meta, torch.Size) else None


def _skeleton(model: nn.Module) -> str:
    items = [f"'{n}': {tuple('?' for _ in p.shape)}" for n, p in list(model.named_parameters())[:3]]
    return ", ".join(items).replace("'?'", "'...'") + (", ..." if len(list(model.parameters())) > 3 else "")


class _Wrap(nn.Module):
    """Holds a root module of a supported class, so the root is traced as a leaf like anywhere else."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner


def _leaf_root_graph(model: nn.Module) -> tuple[nn.Module, fx.Graph]:
    """A graph calling ``model`` once with its forward's positional parameters (defaults kept)."""
    graph = fx.Graph()
    params = []
    for p in inspect.signature(model.forward).parameters.values():
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            break
        params.append(graph.placeholder(p.name, default_value=p.default))
    graph.output(graph.call_module("inner", tuple(params)))
    return _Wrap(model), graph


def _trace(model: nn.Module, hint: str, through: frozenset[type] = frozenset()) -> tuple[fx.GraphModule, str]:
    if isinstance(model, SUPPORTED_MODULES) and type(model) not in through:
        root, graph = _leaf_root_graph(model)
        return fx.GraphModule(root, graph), "inner."
    try:
        graph = _LeafTracer(through).trace(model)
    except Exception as err:  # noqa: BLE001 - fx raises many types for untraceable Python
        raise UnsupportedModuleError(f"torch.fx cannot trace {type(model).__name__}: {err}. {hint}") from err
    return fx.GraphModule(model, graph), ""


def _record_shapes(gm: fx.GraphModule, model: nn.Module, example_input: Any) -> tuple[Any, ...]:
    """Run the graph once (eval mode, no grad) on the example input, or on inputs built from the first layers;
    returns the inputs used."""
    was_training = model.training
    model.eval()
    try:
        last_err: Exception | None = None
        tries = [(0, False)] if example_input is not None else [
            (spatial, seq) for seq in (False, True) for spatial in (8, 16, 28, 32, 64, 5, 12)]
        for spatial, seq in tries:
            try:
                if example_input is not None:
                    inputs = list(example_input) if isinstance(example_input, (tuple, list)) else [example_input]
                else:
                    inputs = _example_inputs(gm, model, spatial, seq)
                with torch.no_grad():
                    _ShapeRecorder(gm).run(*inputs)
                return tuple(inputs)
            except SpecError:
                raise
            except Exception as err:  # noqa: BLE001 - try the next example size
                last_err = err
        raise SpecError(f"running {type(model).__name__} on an example input failed ({last_err}); pass "
                        f"example_input=... to WeightSpec.from_module") from last_err
    finally:
        model.train(was_training)


def spec_from_module(model: nn.Module, example_input: Any = None, *, include_buffers: bool = False,
                     verify: bool = True) -> WeightSpec:
    """Derive ``model``'s weight-space symmetry (see the module docstring) and, unless ``verify=False``, check it
    on a float64 copy. Raises UnsupportedModuleError (an op it cannot describe) or SymmetryError (a claimed
    symmetry that does not hold: a bug in a rule, reported rather than returned)."""
    hint = _HINT.format(example=_skeleton(model))
    through = _own_forward(model)
    was_training = model.training
    model.eval()  # traced, run and verified in eval mode: dropout and stochastic depth are identities
    try:
        return _attempts(model, example_input, include_buffers, verify, hint, through)
    finally:
        model.train(was_training)


def _attempts(model: nn.Module, example_input: Any, include_buffers: bool, verify: bool, hint: str,
              through: frozenset[type]) -> WeightSpec:
    from unf_models.verify import verify_spec

    # Subclasses of supported classes count as the class they extend (the zoo's vmappable members do); when that
    # fails to verify, they are traced into instead (a channels-first LayerNorm2d computes something else).
    first: Exception | None = None
    for attempt in ((frozenset(), through) if through else (frozenset(),)):
        try:
            gm, strip = _trace(model, hint, attempt)
            inputs = _record_shapes(gm, model, example_input)
            try:
                spec, origins = _derive(model, gm, include_buffers, strip)
            except UnsupportedModuleError as err:
                raise UnsupportedModuleError(f"{err}. {hint}") from err
            if verify:
                verify_spec(spec, model, inputs, origins=origins)
            return spec
        except (UnsupportedModuleError, SymmetryError) as err:
            first = first or err
    assert first is not None
    raise first


def _spec_buffers(model: nn.Module, include_buffers: bool) -> frozenset[str]:
    """Buffers the spec describes: norm layers' running statistics; every floating buffer with include_buffers.
    Integer buffers (``num_batches_tracked``) are never in a spec: they have no channel axis to permute."""
    names = set()
    for mname, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats and m.running_mean is not None:
            names.update(f"{mname}.{b}" if mname else b for b in ("running_mean", "running_var"))
    if include_buffers:
        names.update(n for n, b in model.named_buffers() if b.is_floating_point())
    return frozenset(names)


def _derive(model: nn.Module, gm: fx.GraphModule, include_buffers: bool, strip: str = ""
            ) -> tuple[WeightSpec, dict[str, str]]:
    in_spec = _spec_buffers(model, include_buffers)
    ctx = _Ctx(in_spec=in_spec, strip=strip)
    env: dict[fx.Node, Any] = {}
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())

    def load(a: Any) -> Any:
        return fx.node.map_arg(a, lambda n: env[n])

    for node in gm.graph.nodes:
        shape = _meta_shape(node)
        if node.op == "placeholder":
            if shape is None:
                env[node] = _NONTENSOR
                continue
            ctx.where, ctx.node = f"input '{node.name}'", node.name
            env[node] = _T([((None, shape[0]),)] + [((ctx.new(f"{node.name}.{i}", n, _FIXED), n),)
                                                    for i, n in enumerate(shape[1:], 1)])
            continue
        if node.op == "get_attr":
            target = node.target[len(strip) :] if strip and node.target.startswith(strip) else node.target
            value = params.get(target, buffers.get(target))
            if value is None or shape is None:
                env[node] = _NONTENSOR
                continue
            ctx.where, ctx.node = f"attribute '{target}'", target
            described = target in params or target in in_spec
            status = _PENDING if described else _FIXED  # a constant buffer outside the spec never moves
            labels = [ctx.new(f"{target}.{i}", n, status) for i, n in enumerate(shape)]
            if described:
                ctx.param(target, [tuple(labels)], [tuple(shape)])
            env[node] = _T([((lab, n),) for lab, n in zip(labels, shape)])
            continue
        if node.op == "output":
            ctx.fix_dims(load(node.args[0]))
            continue
        args, kwargs = list(load(node.args)), dict(load(node.kwargs))
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            ctx.where = f"module '{node.target[len(strip):] or type(m).__name__}' ({type(m).__name__})"
            ctx.node = node.target
            env[node] = _call_module(ctx, m, node.target, args, kwargs, node.meta.get(_META), shape)
        else:
            ctx.where, ctx.node = f"op '{_op_name(node)}' ({node.name})", node.name
            env[node] = _call_function(ctx, node, args, kwargs, shape)
        if shape is not None and isinstance(env[node], _T) and env[node].shape != shape:
            got = env[node]
            if len(got.dims) == len(shape) and all(prod(s for _, s in d) in (n, -1) or n == 1
                                                   for d, n in zip(got.dims, shape)):
                got.dims = [d if prod(s for _, s in d) == n else ((None, n),) for d, n in zip(got.dims, shape)]
            else:
                raise UnsupportedModuleError(f"op '{_op_name(node)}' ({node.name}): lost track of its output "
                                             f"shape {shape} (got {got.shape})")
    return _assemble(model, ctx)


def _leaves(labels: _Labels, a: int, depth: int = 0) -> list[int]:
    """The leaf labels of a product structure (row-major), or [] when it contains a concatenation."""
    e = labels.children(a)
    if e is None:
        return [labels.find(a)]
    if e[0] != _PROD or depth > 64:
        return []
    out = []
    for c in e[1]:
        sub = _leaves(labels, c, depth + 1)
        if not sub:
            return []
        out.extend(sub)
    return out


def _segments(labels: _Labels, a: int, depth: int = 0) -> list[list[int]]:
    """A concatenation's blocks, each as leaf labels (nested concatenations flattened); [] if not expressible."""
    e = labels.children(a)
    if e is None or e[0] != _SUM:
        leaves = _leaves(labels, a)
        return [leaves] if leaves else []
    if depth > 64:
        return []
    out = []
    for c in e[1]:
        sub = _segments(labels, c, depth + 1)
        if not sub:
            return []
        out.extend(sub)
    return out


def _all_leaves(labels: _Labels, a: int, seen: set[int] | None = None) -> list[int]:
    seen = seen if seen is not None else set()
    r = labels.find(a)
    if r in seen:
        return []
    seen.add(r)
    e = labels.children(r)
    return [r] if e is None else [x for c in e[1] for x in _all_leaves(labels, c, seen)]


def _expand_param(ctx: _Ctx, name: str, shape: tuple[int, ...], rec: _Param
                  ) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]], int]:
    """Final parts, views and split dim of one tensor: product labels become several view axes; one concatenated
    axis (the first view axis of its natural dim) splits the tensor into parts; anything else is fixed."""
    labels = ctx.labels
    collapsed = ctx.collapsed

    def collapse(a: int) -> tuple[list[int], list[int]]:
        r = labels.find(a)
        labels.fix(r)
        if r not in collapsed:
            collapsed[r] = labels.new(labels.name[r], labels.size[r], _FIXED)
        return [collapsed[r]], [labels.size[r]]

    def flat(a: int) -> tuple[list[int], list[int]]:
        leaves = _leaves(labels, a)
        if not leaves or all(labels.status[x] != _FREE for x in _all_leaves(labels, a)):
            return collapse(a) if labels.children(a) is not None else ([labels.find(a)], [labels.size[labels.find(a)]])
        return leaves, [labels.size[x] for x in leaves]

    cat_axis, cat_segments = None, None
    if len(rec.parts) == 1:
        groups = _group_axes(name, shape, rec.views)[0]
        starts = {sum(groups[:j]): j for j in range(len(groups))}
        for i, a in enumerate(rec.parts[0]):
            e = labels.children(a)
            if e is not None and e[0] == _SUM and i in starts and cat_axis is None:
                segs = _segments(labels, a)
                if segs and any(labels.status[x] == _FREE for s in segs for x in s):
                    cat_axis, cat_segments = i, segs
    parts_out, views_out = [], []
    if cat_axis is not None:
        axes = rec.parts[0]
        pre = [flat(a) for a in axes[:cat_axis]]
        post = [flat(a) for a in axes[cat_axis + 1 :]]
        for seg in cat_segments:  # type: ignore[union-attr]
            labs = [x for ls, _ in pre for x in ls] + seg + [x for ls, _ in post for x in ls]
            sizes = [x for _, ss in pre for x in ss] + [labels.size[x] for x in seg] + [x for _, ss in post for x in ss]
            parts_out.append(tuple(labs))
            views_out.append(tuple(sizes))
        return parts_out, views_out, starts[cat_axis]
    for part in rec.parts:
        labs, sizes = [], []
        for a in part:
            e = labels.children(a)
            ls, ss = collapse(a) if e is not None and e[0] == _SUM else flat(a)
            labs.extend(ls)
            sizes.extend(ss)
        parts_out.append(tuple(labs))
        views_out.append(tuple(sizes))
    return parts_out, views_out, 0


def _assemble(model: nn.Module, ctx: _Ctx) -> tuple[WeightSpec, dict[str, str]]:
    labels = ctx.labels
    labels.settle()
    state = model.state_dict(keep_vars=True)
    param_names = {n for n, _ in model.named_parameters()}
    names = [n for n in state if n in param_names or n in ctx.in_spec]
    axes, views, shapes, splits = {}, {}, {}, {}
    for name in names:
        value = state[name]
        shape = tuple(value.shape)
        rec = ctx.params.get(name)
        if rec is None:  # unused by the traced forward: no symmetry claimed
            rec = _Param([tuple(ctx.new(f"{name}.{i}", n, _FIXED) for i, n in enumerate(shape))], [shape])
        parts, part_views, split = _expand_param(ctx, name, shape, rec)
        axes[name], views[name], shapes[name] = parts, part_views, shape
        if split:
            splits[name] = split
    labels.settle()
    roots = sorted({labels.find(a) for parts in axes.values() for p in parts for a in p})
    used: dict[int, str] = {}
    taken: dict[str, int] = {}
    for r in roots:
        base = labels.name[r]
        k = taken.get(base, 0)
        taken[base] = k + 1
        used[r] = base if k == 0 else f"{base}~{k}"
    fixed = [used[r] for r in roots if labels.status[r] != _FREE]
    named = {n: [tuple(used[labels.find(a)] for a in p) for p in parts] for n, parts in axes.items()}
    try:
        spec = WeightSpec({n: (p[0] if len(p) == 1 else p) for n, p in named.items()}, shapes=shapes,
                          views={n: (v[0] if len(v) == 1 else v) for n, v in views.items()}, fixed=fixed,
                          splits=splits)
    except SpecError as err:  # a rule disagreed with the module about a tensor's layout
        raise UnsupportedModuleError(f"cannot assemble the derived spec: {err}") from err
    origins = {}
    for r in roots:
        if labels.status[r] == _FREE:
            where = [o for o in labels.origin[r] if o][:6]
            origins[used[r]] = "the derivation decided it at " + ("; ".join(where) if where else "an unknown op")
    return spec, origins
