"""Derive a `WeightSpec` from an ``nn.Module`` by torch.fx tracing and per-dimension label propagation.

The module is traced with every instance (subclasses included) of a supported ``torch.nn`` class as a leaf; shapes
come from running the graph on an example input (given, or built from the first layer). Every dimension of every
traced tensor carries a label (or none, for batch / sequence / spatial dims); leaf modules give their parameters'
axes labels from their inputs' labels, element-wise ops with two tensors tie labels (residual additions), flatten
keeps a labelled channel with a fixed spatial part, reductions drop dims. Labels that reach the model's inputs or
outputs, kernel positions, gates and vocabularies are fixed; indexing or slicing a labelled dim fixes its label
(conservative: the spec never claims a symmetry the network lacks).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from math import prod
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from unf_models.errors import SpecError, UnsupportedModuleError
from unf_models.spec import WeightSpec

__all__ = ["spec_from_module", "SUPPORTED_MODULES"]

_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.ELU, nn.CELU, nn.SELU, nn.LeakyReLU, nn.Softplus,
    nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Mish, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Softmax,
    nn.LogSoftmax, nn.Identity, nn.modules.dropout._DropoutNd, nn.AlphaDropout,
)
_POOLS: dict[type[nn.Module], int] = {
    nn.MaxPool1d: 1, nn.AvgPool1d: 1, nn.AdaptiveAvgPool1d: 1, nn.AdaptiveMaxPool1d: 1,
    nn.MaxPool2d: 2, nn.AvgPool2d: 2, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveMaxPool2d: 2,
}
SUPPORTED_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.Embedding, nn.RNNBase,
    nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder, nn.Flatten, nn.Unflatten, nn.PReLU,
    *_ACTIVATIONS, *_POOLS,
)

_HINT = (
    "Declare the spec by hand instead, e.g. um.WeightSpec({{{example}}}, shapes={{...}}, fixed=(...)): one label "
    "per axis, equal labels for axes permuted together, fixed=(...) for axes that are not permuted (inputs, "
    "classes, kernel positions, vocabulary)."
)

# ----------------------------------------------------------------------------------------------- label bookkeeping
_FREE, _PENDING, _FIXED = 0, 1, 2  # pending: fixed unless tied to a free label (parameters used via get_attr)


class _Labels:
    """Union-find over labels with a size and a status each."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.name: list[str] = []
        self.size: list[int] = []
        self.status: list[int] = []

    def new(self, name: str, size: int, status: int = _FREE) -> int:
        self.parent.append(len(self.parent))
        self.name.append(name)
        self.size.append(int(size))
        self.status.append(status)
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

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
        return keep

    def fix(self, a: int) -> None:
        self.status[self.find(a)] = _FIXED


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


@dataclass
class _Param:
    parts: list[tuple[int, ...]]  # labels per part
    views: list[tuple[int, ...]]


@dataclass
class _Ctx:
    labels: _Labels = field(default_factory=_Labels)
    params: dict[str, _Param] = field(default_factory=dict)
    include_buffers: bool = False

    def new(self, name: str, size: int, status: int = _FREE) -> int:
        return self.labels.new(name, size, status)

    def tie(self, a: int, b: int, where: str) -> int:
        return self.labels.union(a, b, where)

    def param(self, name: str, parts: list[tuple[int, ...]], views: list[tuple[int, ...]]) -> None:
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

    def fix_dims(self, t: Any) -> None:
        for x in _tensors_in(t):
            for d in x.dims:
                for label, _ in d:
                    if label is not None:
                        self.labels.fix(label)
            if x.stack is not None:
                for label in x.stack[1]:
                    self.labels.fix(label)


def _tensors_in(value: Any) -> list[_T]:
    if isinstance(value, _T):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors_in(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors_in(v)]
    return []


def _single(ctx: _Ctx, dim: tuple[Factor, ...], owner: str, what: str) -> int:
    """The one label of a feature dim (unlabelled dims get a fixed label)."""
    if len(dim) != 1:
        raise UnsupportedModuleError(f"{owner}: {what} is a flattened dim {[(s) for _, s in dim]}; this layer "
                                     f"needs a plain feature dim there")
    label, size = dim[0]
    return label if label is not None else ctx.new(f"{owner}.in", size, _FIXED)


# ----------------------------------------------------------------------------------------------- shape transforms
def _reshape(ctx: _Ctx, x: _T, out_shape: Sequence[int], where: str) -> _T:
    """Map dims through a reshape that merges or splits consecutive dims."""
    src = [d for d in x.dims if prod(s for _, s in d) != 1 or any(lab is not None for lab, _ in d)]
    out: list[tuple[Factor, ...]] = []
    i = 0
    targets = list(out_shape)
    j = 0
    while j < len(targets):
        n = targets[j]
        if n == 1:
            out.append(((None, 1),))
            j += 1
            continue
        # collect source dims until their product reaches n, or target dims until they reach a source dim
        if i >= len(src):
            raise UnsupportedModuleError(f"{where}: cannot follow reshape {x.shape} -> {tuple(out_shape)}")
        group_src, size = [src[i]], prod(s for _, s in src[i])
        i += 1
        group_tgt, tsize = [n], n
        j += 1
        while size != tsize:
            if size < tsize:
                if i >= len(src):
                    raise UnsupportedModuleError(f"{where}: cannot follow reshape {x.shape} -> {tuple(out_shape)}")
                group_src.append(src[i])
                size *= prod(s for _, s in src[i])
                i += 1
            else:
                while j < len(targets) and targets[j] == 1:
                    group_tgt.append(1)
                    j += 1
                if j >= len(targets):
                    raise UnsupportedModuleError(f"{where}: cannot follow reshape {x.shape} -> {tuple(out_shape)}")
                group_tgt.append(targets[j])
                tsize *= targets[j]
                j += 1
        factors = [f for d in group_src for f in d]
        if len(group_tgt) == 1:
            out.append(tuple(factors))
            continue
        # split: distribute factors over target dims when they line up, else the dims must be unlabelled
        dims, k = [], 0
        for t in group_tgt:
            acc, p = [], 1
            while p < t and k < len(factors):
                acc.append(factors[k])
                p *= factors[k][1]
                k += 1
            if p != t:
                break
            dims.append(tuple(acc) if acc else ((None, 1),))
        if len(dims) == len(group_tgt) and k == len(factors):
            out.extend(dims)
        elif all(label is None for label, _ in factors):
            out.extend(((None, t),) for t in group_tgt)
        else:
            raise UnsupportedModuleError(f"{where}: reshape {x.shape} -> {tuple(out_shape)} splits a labelled "
                                         f"feature dim")
    if i != len(src):
        raise UnsupportedModuleError(f"{where}: cannot follow reshape {x.shape} -> {tuple(out_shape)}")
    return _T(out)


def _broadcast(ctx: _Ctx, a: _T, b: _T, out_shape: Sequence[int], where: str) -> _T:
    """Element-wise op of two tensors: aligned dims of equal size tie their labels (residual connections)."""
    n = len(out_shape)
    da = [((None, 1),)] * (n - len(a.dims)) + list(a.dims)
    db = [((None, 1),)] * (n - len(b.dims)) + list(b.dims)
    out = []
    for x, y, size in zip(da, db, out_shape):
        sx, sy = prod(s for _, s in x), prod(s for _, s in y)
        if sx != sy:
            out.append(x if sx == size else y)
            continue
        lx, ly = [lab for lab, _ in x], [lab for lab, _ in y]
        if [s for _, s in x] == [s for _, s in y]:
            merged = []
            for (la, s), lb in zip(x, ly):
                if la is not None and lb is not None:
                    merged.append((ctx.tie(la, lb, where), s))
                elif la is None and lb is None:
                    merged.append((None, s))
                else:  # a labelled axis meets an unlabelled one of the same size: do not claim the symmetry
                    ctx.labels.fix(la if la is not None else lb)
                    merged.append((la if la is not None else lb, s))
            out.append(tuple(merged))
        elif all(v is None for v in lx + ly):
            out.append(((None, size),))
        else:
            raise UnsupportedModuleError(f"{where}: combines dims of size {size} flattened differently")
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


def _rule_conv(ctx: _Ctx, m: nn.Conv1d | nn.Conv2d, name: str, x: _T, out_shape: Sequence[int]) -> _T:
    if m.groups != 1:
        raise UnsupportedModuleError(f"module '{name}' ({type(m).__name__}) has groups={m.groups}; only groups=1 "
                                     f"convolutions are supported")
    nsp = len(m.kernel_size)
    channel = _single(ctx, x.dims[-(nsp + 1)], name, "the input channel dim")
    out = ctx.new(name, m.out_channels)
    kernel = [ctx.new(f"{name}.k{i}", k, _FIXED) for i, k in enumerate(m.kernel_size)]
    ctx.param(f"{name}.weight", [(out, channel, *kernel)], [tuple(m.weight.shape)])
    if m.bias is not None:
        ctx.param(f"{name}.bias", [(out,)], [(m.out_channels,)])
    lead = x.dims[: -(nsp + 1)]
    return _T([*lead, ((out, m.out_channels),), *(((None, int(s)),) for s in out_shape[len(lead) + 1 :])])


def _rule_batchnorm(ctx: _Ctx, m: nn.modules.batchnorm._BatchNorm, name: str, x: _T) -> _T:
    axis = 1 if len(x.dims) > 1 else 0
    channel = _single(ctx, x.dims[axis], name, "the channel dim")
    if m.affine:
        ctx.param(f"{name}.weight", [(channel,)], [(m.num_features,)])
        ctx.param(f"{name}.bias", [(channel,)], [(m.num_features,)])
    if ctx.include_buffers and m.track_running_stats:
        ctx.param(f"{name}.running_mean", [(channel,)], [(m.num_features,)])
        ctx.param(f"{name}.running_var", [(channel,)], [(m.num_features,)])
    return x


def _rule_layernorm(ctx: _Ctx, m: nn.LayerNorm, name: str, x: _T) -> _T:
    k = len(m.normalized_shape)
    labels = tuple(_single(ctx, d, name, "a normalized dim") for d in x.dims[-k:])
    if m.weight is not None:
        ctx.param(f"{name}.weight", [labels], [tuple(m.normalized_shape)])
    if m.bias is not None:
        ctx.param(f"{name}.bias", [labels], [tuple(m.normalized_shape)])
    return x


def _rule_embedding(ctx: _Ctx, m: nn.Embedding, name: str, x: _T) -> _T:
    vocab = ctx.new(f"{name}.vocab", m.num_embeddings, _FIXED)
    out = ctx.new(name, m.embedding_dim)
    ctx.param(f"{name}.weight", [(vocab, out)], [(m.num_embeddings, m.embedding_dim)])
    return _T([*x.dims, ((out, m.embedding_dim),)])


def _rule_rnn(ctx: _Ctx, m: nn.RNNBase, name: str, args: list[Any], out_meta: Any) -> Any:
    if m.bidirectional:
        raise UnsupportedModuleError(f"module '{name}' ({type(m).__name__}) is bidirectional: its output "
                                     f"concatenates two hidden axes, which one label cannot describe")
    if getattr(m, "proj_size", 0):
        raise UnsupportedModuleError(f"module '{name}' (LSTM) has proj_size > 0, which is not supported")
    gates = {"LSTM": 4, "GRU": 3}.get(m.mode, 1)
    x = args[0]
    hidden = [ctx.new(f"{name}.h{k}" if m.num_layers > 1 else name, m.hidden_size) for k in range(m.num_layers)]
    hx = args[1] if len(args) > 1 else None
    states = [s for s in (hx if isinstance(hx, (tuple, list)) else [hx]) if isinstance(s, _T)]
    for s in states:
        labels = s.stack[1] if s.stack is not None else [lab for lab, _ in s.dims[-1]]
        if len(labels) != m.num_layers or any(lab is None for lab in labels):
            raise UnsupportedModuleError(f"module '{name}': cannot match its initial state to {m.num_layers} "
                                         f"layer(s) of hidden size {m.hidden_size}")
        for h, lab in zip(hidden, labels):
            ctx.tie(h, lab, f"initial state of '{name}'")
    gate = ctx.new(f"{name}.gate", gates, _FIXED) if gates > 1 else None
    in_labels, in_sizes = ctx.consume(x.dims[-1], name)
    for k in range(m.num_layers):
        h = hidden[k]
        src, src_sizes = (in_labels, in_sizes) if k == 0 else ([hidden[k - 1]], [m.hidden_size])
        pre, pre_size = ((gate,), (gates,)) if gate is not None else ((), ())
        ctx.param(f"{name}.weight_ih_l{k}", [(*pre, h, *src)], [(*pre_size, m.hidden_size, *src_sizes)])
        ctx.param(f"{name}.weight_hh_l{k}", [(*pre, h, h)], [(*pre_size, m.hidden_size, m.hidden_size)])
        if m.bias:
            ctx.param(f"{name}.bias_ih_l{k}", [(*pre, h)], [(*pre_size, m.hidden_size)])
            ctx.param(f"{name}.bias_hh_l{k}", [(*pre, h)], [(*pre_size, m.hidden_size)])
    out = _T([*x.dims[:-1], ((hidden[-1], m.hidden_size),)])
    state_shape = tuple(out_meta[1][0] if m.mode == "LSTM" else out_meta[1])
    state = _plain(state_shape)
    if m.num_layers == 1:
        state.dims[-1] = ((hidden[0], m.hidden_size),)
    else:
        state.stack = (0, hidden, len(state_shape) - 1)
    return (out, (state, _T(list(state.dims), state.stack)) if m.mode == "LSTM" else state)


def _rule_mha(ctx: _Ctx, m: nn.MultiheadAttention, name: str, q: _T, k: _T, v: _T) -> _T:
    if not m._qkv_same_embed_dim or m.bias_k is not None:
        raise UnsupportedModuleError(f"module '{name}' (MultiheadAttention) uses kdim/vdim or add_bias_kv, "
                                     f"which are not supported")
    d = _single(ctx, q.dims[-1], name, "the query's feature dim")
    for other, what in ((k, "key"), (v, "value")):
        ctx.tie(d, _single(ctx, other.dims[-1], name, f"the {what}'s feature dim"), f"{name} ({what})")
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


def _rule_encoder_layer(ctx: _Ctx, m: nn.TransformerEncoderLayer, name: str, x: _T) -> _T:
    d = _single(ctx, x.dims[-1], name, "the residual stream")
    y = _rule_mha(ctx, m.self_attn, f"{name}.self_attn", x, x, x)
    ctx.tie(d, y.dims[-1][0][0], f"residual of '{name}'")  # type: ignore[arg-type]
    for norm in ("norm1", "norm2"):
        _rule_layernorm(ctx, getattr(m, norm), f"{name}.{norm}", x)
    hidden = _rule_linear(ctx, m.linear1, f"{name}.linear1", x)
    back = _rule_linear(ctx, m.linear2, f"{name}.linear2", hidden)
    ctx.tie(d, back.dims[-1][0][0], f"residual of '{name}'")  # type: ignore[arg-type]
    return x


def _rule_encoder(ctx: _Ctx, m: nn.TransformerEncoder, name: str, x: _T) -> _T:
    for i, layer in enumerate(m.layers):
        if not isinstance(layer, nn.TransformerEncoderLayer):
            raise UnsupportedModuleError(f"module '{name}.layers.{i}' ({type(layer).__name__}) inside a "
                                         f"TransformerEncoder is not a TransformerEncoderLayer")
        x = _rule_encoder_layer(ctx, layer, f"{name}.layers.{i}", x)
    if m.norm is not None:
        if not isinstance(m.norm, nn.LayerNorm):
            raise UnsupportedModuleError(f"module '{name}.norm' ({type(m.norm).__name__}) is not a LayerNorm")
        _rule_layernorm(ctx, m.norm, f"{name}.norm", x)
    return x


def _rule_pool(x: _T, nsp: int, out_shape: Sequence[int]) -> _T:
    lead = x.dims[: len(x.dims) - nsp]
    return _T([*lead, *(((None, int(s)),) for s in out_shape[len(lead) :])])


def _call_module(ctx: _Ctx, m: nn.Module, name: str, args: list[Any], kwargs: dict[str, Any], out_meta: Any,
                 out_shape: Sequence[int] | None) -> Any:
    x = args[0] if args else next(iter(kwargs.values()), None)
    if isinstance(m, nn.TransformerEncoder):
        return _rule_encoder(ctx, m, name, x)
    if isinstance(m, nn.TransformerEncoderLayer):
        return _rule_encoder_layer(ctx, m, name, x)
    if isinstance(m, nn.MultiheadAttention):
        q = kwargs.get("query", args[0] if args else None)
        k = kwargs.get("key", args[1] if len(args) > 1 else None)
        v = kwargs.get("value", args[2] if len(args) > 2 else None)
        out = _rule_mha(ctx, m, name, q, k, v)
        weights = out_meta[1] if isinstance(out_meta, (tuple, list)) and len(out_meta) > 1 else None
        return (out, _plain(weights) if weights is not None else _NONTENSOR)
    if isinstance(m, nn.RNNBase):
        hx = kwargs.get("hx", args[1] if len(args) > 1 else None)
        return _rule_rnn(ctx, m, name, [x, hx], out_meta)
    if not isinstance(x, _T):
        raise UnsupportedModuleError(f"module '{name}' ({type(m).__name__}) got a non-tensor input")
    if isinstance(m, nn.Linear):
        return _rule_linear(ctx, m, name, x)
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        return _rule_conv(ctx, m, name, x, out_shape or ())
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return _rule_batchnorm(ctx, m, name, x)
    if isinstance(m, nn.LayerNorm):
        return _rule_layernorm(ctx, m, name, x)
    if isinstance(m, nn.Embedding):
        return _rule_embedding(ctx, m, name, x)
    if isinstance(m, nn.PReLU):
        if m.num_parameters == 1:
            ctx.param(f"{name}.weight", [(ctx.new(f"{name}.weight", 1, _FIXED),)], [(1,)])
        else:
            ctx.param(f"{name}.weight", [(_single(ctx, x.dims[1], name, "the channel dim"),)], [(m.num_parameters,)])
        return x
    if isinstance(m, _ACTIVATIONS):
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
    torch.log_softmax, torch.nn.functional.normalize, operator.pos,
}
_UNARY_METHODS = {
    "relu", "tanh", "sigmoid", "exp", "abs", "neg", "clamp", "clip", "softmax", "log_softmax", "contiguous",
    "float", "double", "half", "to", "type", "type_as", "detach", "clone", "sqrt", "square", "relu_", "tanh_",
    "sigmoid_", "cpu", "cuda", "requires_grad_",
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
_POOL_FUNCS = {F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.avg_pool1d: 1, F.avg_pool2d: 2,
               F.max_pool1d: 1, F.max_pool2d: 2, F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2}


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


def _call_function(ctx: _Ctx, node: fx.Node, args: list[Any], kwargs: dict[str, Any],
                   out_shape: Sequence[int] | None) -> Any:
    target, where = node.target, f"op '{_op_name(node)}' ({node.name})"
    method = node.op == "call_method"
    name = target if method else None
    tensors = [a for a in args if isinstance(a, _T)]
    if target is operator.getitem:
        return _getitem(ctx, args[0], args[1], out_shape, where)
    if target in (getattr, len):
        return _NONTENSOR
    if (method and name in _CREATE_METHODS) or target in _CREATE:  # a fresh tensor shaped like another
        return _plain(out_shape) if out_shape is not None else _NONTENSOR
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
        seq = args[0]
        dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
        parts = [t for t in seq if isinstance(t, _T)]
        if target is torch.stack:
            n = len(parts[0].dims) + 1
            dim %= n
            base = parts[0]
            for other in parts[1:]:
                base = _broadcast(ctx, base, other, base.shape, where)
            return _T([*base.dims[:dim], ((None, len(parts)),), *base.dims[dim:]])
        n = len(parts[0].dims)
        dim %= n
        for t in parts:
            for lab, _ in t.dims[dim]:
                if lab is not None:
                    ctx.labels.fix(lab)
        base = _T([d if i != dim else ((None, 1),) for i, d in enumerate(parts[0].dims)])
        for other in parts[1:]:
            base = _broadcast(ctx, base, _T([d if i != dim else ((None, 1),) for i, d in enumerate(other.dims)]),
                              [s if i != dim else 1 for i, s in enumerate(base.shape)], where)
        base.dims[dim] = ((None, int(out_shape[dim]) if out_shape else -1),)
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
    """Treat every instance (subclasses included) of a supported torch.nn class as a leaf."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, SUPPORTED_MODULES):
            return True
        return super().is_leaf_module(m, qualname)


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
    if isinstance(m, nn.TransformerEncoderLayer):
        return torch.randn(batch, seq, m.self_attn.embed_dim)
    if isinstance(m, nn.TransformerEncoder):
        layer = m.layers[0]
        return torch.randn(batch, seq, layer.self_attn.embed_dim)
    if isinstance(m, (nn.modules.batchnorm._BatchNorm,)):
        return torch.randn(batch, m.num_features, *([spatial] * (2 if isinstance(m, nn.BatchNorm2d) else 0)))
    if isinstance(m, nn.LayerNorm):
        return torch.randn(batch, *m.normalized_shape)
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


def spec_from_module(model: nn.Module, example_input: Any = None, *, include_buffers: bool = False) -> WeightSpec:
    """Derive ``model``'s weight-space symmetry; see the module docstring. Raises UnsupportedModuleError."""
    hint = _HINT.format(example=_skeleton(model))
    try:
        graph = _LeafTracer().trace(model)
    except Exception as err:  # noqa: BLE001 - fx raises many types for untraceable Python
        raise UnsupportedModuleError(f"torch.fx cannot trace {type(model).__name__}: {err}. {hint}") from err
    gm = fx.GraphModule(model, graph)
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
                last_err = None
                break
            except SpecError:
                raise
            except Exception as err:  # noqa: BLE001 - try the next example size
                last_err = err
        if last_err is not None:
            raise SpecError(f"running {type(model).__name__} on an example input failed ({last_err}); pass "
                            f"example_input=... to WeightSpec.from_module") from last_err
    finally:
        model.train(was_training)
    try:
        return _derive(model, gm, include_buffers)
    except UnsupportedModuleError as err:
        raise UnsupportedModuleError(f"{err}. {hint}") from err


def _derive(model: nn.Module, gm: fx.GraphModule, include_buffers: bool) -> WeightSpec:
    ctx = _Ctx(include_buffers=include_buffers)
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
            env[node] = _T([((None, shape[0]),)] + [((ctx.new(f"{node.name}.{i}", n, _FIXED), n),)
                                                    for i, n in enumerate(shape[1:], 1)])
            continue
        if node.op == "get_attr":
            value = params.get(node.target, buffers.get(node.target))
            if value is None or shape is None:
                env[node] = _NONTENSOR
                continue
            labels = [ctx.new(f"{node.target}.{i}", n, _PENDING) for i, n in enumerate(shape)]
            if node.target in params or (include_buffers and value.is_floating_point()):
                ctx.param(node.target, [tuple(labels)], [tuple(shape)])
            env[node] = _T([((lab, n),) for lab, n in zip(labels, shape)])
            continue
        if node.op == "output":
            ctx.fix_dims(load(node.args[0]))
            continue
        args, kwargs = list(load(node.args)), dict(load(node.kwargs))
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            env[node] = _call_module(ctx, m, node.target, args, kwargs, node.meta.get(_META), shape)
        else:
            env[node] = _call_function(ctx, node, args, kwargs, shape)
        if shape is not None and isinstance(env[node], _T) and env[node].shape != shape:
            got = env[node]
            if len(got.dims) == len(shape) and all(prod(s for _, s in d) in (n, -1) or n == 1
                                                   for d, n in zip(got.dims, shape)):
                got.dims = [d if prod(s for _, s in d) == n else ((None, n),) for d, n in zip(got.dims, shape)]
            else:
                raise UnsupportedModuleError(f"op '{_op_name(node)}' ({node.name}): lost track of its output "
                                             f"shape {shape} (got {got.shape})")
    return _assemble(model, ctx, include_buffers)


def _assemble(model: nn.Module, ctx: _Ctx, include_buffers: bool) -> WeightSpec:
    labels = ctx.labels
    state = model.state_dict(keep_vars=True)
    names = [n for n, v in state.items()
             if n in dict(model.named_parameters()) or (include_buffers and v.is_floating_point())]
    axes, views, shapes = {}, {}, {}
    used: dict[int, str] = {}
    for name in names:
        value = state[name]
        rec = ctx.params.get(name)
        if rec is None:  # unused by the traced forward (or a buffer): no symmetry claimed
            rec = _Param([tuple(ctx.new(f"{name}.{i}", n, _FIXED) for i, n in enumerate(value.shape))],
                         [tuple(value.shape)])
        axes[name] = [tuple(labels.find(a) for a in p) for p in rec.parts]
        views[name] = rec.views
        shapes[name] = tuple(value.shape)
    roots = sorted({a for parts in axes.values() for p in parts for a in p})
    taken: dict[str, int] = {}
    for r in roots:
        base = labels.name[r]
        k = taken.get(base, 0)
        taken[base] = k + 1
        used[r] = base if k == 0 else f"{base}~{k}"
    fixed = [used[r] for r in roots if labels.status[r] != _FREE]
    named = {n: [tuple(used[a] for a in p) for p in parts] for n, parts in axes.items()}
    return WeightSpec({n: (p[0] if len(p) == 1 else p) for n, p in named.items()}, shapes=shapes,
                      views={n: (v[0] if len(v) == 1 else v) for n, v in views.items()}, fixed=fixed)

