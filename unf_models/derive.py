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
from math import prod
from typing import Any

import torch
from torch import fx, nn

from unf_models.errors import SpecError, SymmetryError, UnsupportedModuleError
from unf_models.spec import WeightSpec, _group_axes
from unf_models._labels import (
    _FREE,
    _PENDING,
    _FIXED,
    _PROD,
    _SUM,
    _Labels,
    _T,
    _NONTENSOR,
    _Param,
    _Ctx,
)
from unf_models._rules import (
    _NORMS,
    SUPPORTED_MODULES,
    _call_module,
    _op_name,
    _call_function,
    _META,
)

__all__ = ["spec_from_module", "SUPPORTED_MODULES"]

_HINT = (
    "Declare the spec by hand instead, e.g. um.WeightSpec({{{example}}}, shapes={{...}}, fixed=(...)): one label "
    "per axis, equal labels for axes permuted together, fixed=(...) for axes that are not permuted (inputs, "
    "classes, kernel positions, vocabulary)."
)


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
