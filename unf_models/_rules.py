"""The derivation rules: how each supported torch.nn module and each traced function or tensor method moves
axis labels, and which parameters (and running statistics) it labels."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from math import prod
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from unf_models.errors import UnsupportedModuleError
from unf_models._labels import (
    _FIXED,
    _PROD,
    _SUM,
    Factor,
    _T,
    _NONTENSOR,
    _plain,
    _size,
    _labelled,
    _Ctx,
    _tensors_in,
    _reshape,
    _broadcast,
)


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


_META = "unf_models_shape"  # node.meta key of recorded output shapes
