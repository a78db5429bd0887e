"""`WeightSpec`: which axes of which tensors share a permutation (a weight space's symmetry), frozen and JSON-able.

A weight space is an ordered set of named tensors (a module's ``state_dict`` keys) with their natural shapes. Each
tensor is seen through one or more *parts*: the flattened tensor is cut into consecutive chunks, each reshaped to
the part's view shape and carrying one label per view axis. Most tensors have one part whose view is the natural
shape; a GRU's ``weight_hh_l0`` (3h, h) is one part viewed as (3, h, h) labelled ("gate", "h", "h"); a
MultiheadAttention ``in_proj_weight`` (3d, d) is three parts (heads, head_dim, d) for Q, K and V, so Q/K and V may
carry different head_dim labels. Parts are consecutive blocks along one natural dim, the tensor's ``split`` (0 unless
given): a convolution reading the concatenation of two branches, weight (out, a + b, k, k), is two parts split along
dim 1, (out, a, k, k) and (out, b, k, k), whose input-channel axes carry the branches' labels. Axes with equal labels are permuted together. *Fixed* labels (input features,
classes, kernel positions, vocabulary, gates) are not permuted by the symmetry group.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from math import prod
from typing import Any

import torch
from torch import Tensor

from unf_models.errors import SpecError, SpecMismatchError

__all__ = ["Part", "TensorSpec", "WeightSpec"]

_FORMAT = "unf_models.WeightSpec"
_VERSION = 2  # highest version read; to_dict writes 1 unless a tensor splits a dim other than 0


@dataclass(frozen=True)
class Part:
    """One labelled view of a consecutive chunk of a tensor: ``axes[i]`` labels view axis i of size ``shape[i]``."""

    axes: tuple[str, ...]
    shape: tuple[int, ...]


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor: natural (state-dict) ``shape``, labelled ``parts``; ``groups[i][j]`` = number of view axes of
    part i merged into natural dim j. The parts are blocks along natural dim ``split``; the other dims are the same
    in every part."""

    name: str
    shape: tuple[int, ...]
    parts: tuple[Part, ...]
    groups: tuple[tuple[int, ...], ...]
    split: int = 0

    @property
    def axes(self) -> tuple[str, ...]:
        """Labels of the view axes (single-part tensors); for split tensors use ``parts``."""
        if len(self.parts) != 1:
            raise SpecError(f"tensor '{self.name}' is split into {len(self.parts)} parts; read spec['{self.name}'].parts")
        return self.parts[0].axes

    def dim_terms(self, j: int) -> list[tuple[str, ...]]:
        """Labels whose sizes make natural dim j: a sum over parts (the split dim) of products of view axes."""
        parts = range(len(self.parts)) if j == self.split else range(1)
        out = []
        for i in parts:
            start = sum(self.groups[i][:j])
            out.append(self.parts[i].axes[start : start + self.groups[i][j]])
        return out

    def block_shape(self, i: int, view: Sequence[int]) -> tuple[int, ...]:
        """Natural shape of part i's block, given that part's view sizes."""
        out, start = [], 0
        for g in self.groups[i]:
            out.append(prod(view[start : start + g]))
            start += g
        return tuple(out)


def _is_label_tuple(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and all(isinstance(v, str) for v in value)


def _match(name: str, dims: Sequence[int], view: Sequence[int], natural: tuple[int, ...]) -> list[int]:
    """Greedy: how many consecutive view axes (from the start of ``view``) make each of ``dims``."""
    pos, groups = 0, []
    for dim in dims:
        size, take = 1, 0
        while pos + take < len(view) and (take == 0 or size < dim):
            size *= view[pos + take]
            take += 1
        if size != dim:
            raise SpecError(f"tensor '{name}': view {tuple(view)} does not reshape to natural shape {natural} "
                            f"(natural dim of size {dim} is not a product of consecutive view axes)")
        pos += take
        groups.append(take)
    return groups


def _group_axes(name: str, shape: tuple[int, ...], views: list[tuple[int, ...]], split: int = 0
                ) -> tuple[tuple[int, ...], ...]:
    """Match each part's view axes to natural dims (each natural dim = product of consecutive view axes); the parts
    are blocks along natural dim ``split``."""
    if not shape:
        if any(v for v in views) or len(views) != 1:
            raise SpecError(f"tensor '{name}': a scalar tensor needs exactly one part with no axes")
        return ((),)
    if not 0 <= split < len(shape):
        raise SpecError(f"tensor '{name}': split dim {split} is not a dim of its natural shape {shape}")
    if len(views) == 1 and prod(views[0]) != prod(shape):
        raise SpecError(f"tensor '{name}': view {views[0]} has {prod(views[0])} entries, natural shape {shape} has "
                        f"{prod(shape)}")
    out, block_sizes = [], []
    for view in views:
        head = _match(name, shape[:split], view, shape)
        tail = _match(name, shape[:split:-1], view[::-1], shape)[::-1]
        mid = len(view) - sum(head) - sum(tail)
        if mid < 1:
            raise SpecError(f"tensor '{name}': view {view} leaves no axes for natural dim {split} of {shape}")
        groups = (*head, mid, *tail)
        if out and (groups[:split] != out[0][:split] or groups[split + 1 :] != out[0][split + 1 :]):
            raise SpecError(f"tensor '{name}': parts must share their view axes outside the split dim {split}, got "
                            f"views {views}")
        out.append(groups)
        block_sizes.append(prod(view[sum(head) : sum(head) + mid]))
    if sum(block_sizes) != shape[split]:
        raise SpecError(f"tensor '{name}': parts {views} add up to {sum(block_sizes)} along dim {split}, "
                        f"natural shape {shape} has {shape[split]}")
    return tuple(out)


def _default_natural(axes: list[tuple[str, ...]], views: list[tuple[int, ...]]) -> tuple[int, ...]:
    """Natural shape of a split tensor when none is given: the parts' common trailing labels stay separate dims,
    everything before them is concatenated along dim 0 (``in_proj_weight`` -> (3d, d), ``in_proj_bias`` -> (3d,))."""
    k = 0
    while k < min(len(a) for a in axes) - 1 and len({a[len(a) - 1 - k] for a in axes}) == 1:
        k += 1
    lead = sum(prod(v[: len(v) - k]) for v in views)
    return (lead, *views[0][len(views[0]) - k :])


class WeightSpec:
    """Frozen description of a weight space's permutation symmetry.

    ``WeightSpec({"w": ("h", "in"), "b": ("h",)}, shapes={"w": (4, 3), "b": (4,)}, fixed=("in",))``.
    ``axes[name]`` is a tuple of labels (one part) or a list of such tuples (several parts, see the module doc);
    ``views[name]`` gives the view shape(s) when they differ from the natural shape; ``sizes`` may replace shapes;
    ``splits[name]`` is the natural dim a several-part tensor is split along (default 0; give its shape then).
    """

    __slots__ = ("_tensors", "_fixed", "_index", "_sizes")

    def __init__(
        self,
        axes: Mapping[str, Sequence[str] | Sequence[Sequence[str]]],
        shapes: Mapping[str, Sequence[int]] | None = None,
        fixed: Iterable[str] = (),
        views: Mapping[str, Sequence[int] | Sequence[Sequence[int]]] | None = None,
        sizes: Mapping[str, int] | None = None,
        splits: Mapping[str, int] | None = None,
    ) -> None:
        shapes, views, sizes, splits = dict(shapes or {}), dict(views or {}), dict(sizes or {}), dict(splits or {})
        for extra, what in ((set(shapes) - set(axes), "shapes"), (set(views) - set(axes), "views"),
                            (set(splits) - set(axes), "splits")):
            if extra:
                raise SpecError(f"{what} names tensors with no axes: {sorted(extra)}; add them to axes")
        tensors = []
        for name, labels in axes.items():
            if not isinstance(name, str) or not name:
                raise SpecError(f"tensor names must be non-empty strings, got {name!r}")
            if isinstance(labels, str) or any(isinstance(p, str) for p in labels) and not _is_label_tuple(labels):
                raise SpecError(f"tensor '{name}': axes must be a tuple of label strings or a list of such tuples, "
                                f"got {labels!r}")
            part_axes = [tuple(labels)] if _is_label_tuple(labels) else [tuple(p) for p in labels]
            if not part_axes or not all(_is_label_tuple(p) and all(p) for p in part_axes):
                raise SpecError(f"tensor '{name}': axes must be a tuple of label strings or a list of such tuples, "
                                f"got {labels!r}")
            natural = tuple(int(n) for n in shapes[name]) if name in shapes else None
            part_views = self._resolve_views(name, part_axes, natural, views.get(name), sizes)
            for p_axes, p_view in zip(part_axes, part_views):
                if len(p_axes) != len(p_view):
                    raise SpecError(f"tensor '{name}': {len(p_axes)} labels {p_axes} for a view of "
                                    f"{len(p_view)} axes {p_view}")
                if any(n < 1 for n in p_view):
                    raise SpecError(f"tensor '{name}': view {p_view} has an empty axis")
            split = int(splits.get(name, 0))
            if natural is None:
                if split:
                    raise SpecError(f"tensor '{name}' is split along dim {split}: give shapes['{name}']")
                natural = part_views[0] if len(part_views) == 1 else _default_natural(part_axes, part_views)
            groups = _group_axes(name, natural, part_views, split)
            parts = tuple(Part(a, v) for a, v in zip(part_axes, part_views))
            tensors.append(TensorSpec(name, natural, parts, groups, split))
        self._init(tuple(tensors), frozenset(fixed))

    @staticmethod
    def _resolve_views(name: str, part_axes: list[tuple[str, ...]], natural: tuple[int, ...] | None,
                       view: Any, sizes: dict[str, int]) -> list[tuple[int, ...]]:
        if view is not None:
            if all(isinstance(v, int) for v in view):
                view_list = [tuple(view)]
            else:
                view_list = [tuple(int(n) for n in v) for v in view]
            if len(view_list) != len(part_axes):
                raise SpecError(f"tensor '{name}': {len(part_axes)} parts but {len(view_list)} views")
            return view_list
        if all(label in sizes for p in part_axes for label in p):
            return [tuple(int(sizes[label]) for label in p) for p in part_axes]
        if natural is not None and len(part_axes) == 1 and len(part_axes[0]) == len(natural):
            return [natural]
        missing = sorted({label for p in part_axes for label in p if label not in sizes})
        raise SpecError(f"tensor '{name}': cannot tell its view shape; give shapes['{name}'] (natural shape), "
                        f"views['{name}'] or sizes for labels {missing}")

    def _init(self, tensors: tuple[TensorSpec, ...], fixed: frozenset[str]) -> None:
        sizes: dict[str, int] = {}
        where: dict[str, str] = {}
        for t in tensors:
            for part in t.parts:
                for label, n in zip(part.axes, part.shape):
                    if label in sizes and sizes[label] != n:
                        raise SpecError(f"label '{label}' has size {sizes[label]} in tensor '{where[label]}' but "
                                        f"{n} in tensor '{t.name}'; axes sharing a label must have equal sizes")
                    sizes.setdefault(label, n)
                    where.setdefault(label, t.name)
        unknown = sorted(fixed - set(sizes))
        if unknown:
            raise SpecError(f"fixed labels {unknown} label no axis; fixed must name labels used in axes")
        names = [t.name for t in tensors]
        if len(set(names)) != len(names):
            raise SpecError(f"duplicate tensor names in spec: {names}")
        object.__setattr__(self, "_tensors", tensors)
        object.__setattr__(self, "_fixed", fixed)
        object.__setattr__(self, "_index", {t.name: t for t in tensors})
        object.__setattr__(self, "_sizes", sizes)

    @classmethod
    def _from_tensors(cls, tensors: Iterable[TensorSpec], fixed: Iterable[str]) -> WeightSpec:
        spec = cls.__new__(cls)
        spec._init(tuple(tensors), frozenset(fixed))
        return spec

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("WeightSpec is frozen; use resize/with_shapes/with_fixed for a modified copy")

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickle through the JSON form, so specs travel to Dask workers despite the frozen __setattr__.
        return (WeightSpec.from_dict, (self.to_dict(),))

    # ------------------------------------------------------------------ accessors
    @property
    def tensors(self) -> tuple[TensorSpec, ...]:
        return self._tensors

    @property
    def names(self) -> list[str]:
        """Tensor names (state-dict keys) in order."""
        return [t.name for t in self._tensors]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """{name: natural shape}."""
        return {t.name: t.shape for t in self._tensors}

    @property
    def sizes(self) -> dict[str, int]:
        """{label: size} at the spec's own widths."""
        return dict(self._sizes)

    @property
    def labels(self) -> list[str]:
        return list(self._sizes)

    @property
    def fixed_labels(self) -> list[str]:
        return [label for label in self._sizes if label in self._fixed]

    @property
    def permutable_labels(self) -> list[str]:
        return [label for label in self._sizes if label not in self._fixed]

    def is_fixed(self, label: str) -> bool:
        return label in self._fixed

    def axes(self, name: str) -> tuple[str, ...] | tuple[tuple[str, ...], ...]:
        """Labels of tensor ``name``'s view axes; a tuple per part for split tensors."""
        t = self[name]
        return t.parts[0].axes if len(t.parts) == 1 else tuple(p.axes for p in t.parts)

    def __getitem__(self, name: str) -> TensorSpec:
        try:
            return self._index[name]
        except KeyError as err:
            raise SpecMismatchError(f"tensor '{name}' is not in the spec (it has {self.names})") from err

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __len__(self) -> int:
        return len(self._tensors)

    def __iter__(self):
        return iter(self.names)

    def num_params(self, sizes: Mapping[str, int] | None = None) -> int:
        return sum(prod(s) for s in self._shapes_at(sizes or self._sizes).values())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WeightSpec) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash((self._tensors, self._fixed))

    def __repr__(self) -> str:
        lines = [f"WeightSpec({len(self)} tensors, permutable={self.permutable_labels}, fixed={self.fixed_labels})"]
        for t in self._tensors:
            views = " + ".join(f"{p.axes}" for p in t.parts)
            lines.append(f"  {t.name}: {t.shape} as {views}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ shapes at other widths
    def symbolic_shape(self, name: str) -> str:
        """Natural shape with permutable labels as names, e.g. ``(3*h, h)``."""
        t = self[name]

        def term(labels: tuple[str, ...]) -> str:
            return "*".join(str(self._sizes[a]) if a in self._fixed else a for a in labels)

        return "(" + ", ".join(" + ".join(term(x) for x in t.dim_terms(j)) for j in range(len(t.shape))) + ")"

    def _shapes_at(self, sizes: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
        return {t.name: tuple(sum(prod(sizes[a] for a in x) for x in t.dim_terms(j)) for j in range(len(t.shape)))
                for t in self._tensors}

    def part_shapes(self, name: str, sizes: Mapping[str, int] | None = None) -> list[tuple[int, ...]]:
        sizes = sizes or self._sizes
        return [tuple(sizes[a] for a in p.axes) for p in self[name].parts]

    def infer_sizes(self, shapes: Mapping[str, Sequence[int]], allow_other_widths: bool = True) -> dict[str, int]:
        """Label sizes that explain the natural ``shapes`` (permutable labels may differ from the spec's).

        Raises SpecMismatchError naming the first tensor whose shape cannot be explained.
        """
        shapes = {k: tuple(v) for k, v in shapes.items()}
        sizes = dict(self._sizes)
        if allow_other_widths:
            unknown = set(self.permutable_labels)
            equations = [(t.dim_terms(j), shapes[t.name][j]) for t in self._tensors if t.name in shapes
                         and len(shapes[t.name]) == len(t.shape) for j in range(len(t.shape))]
            progress = True
            while unknown and progress:
                progress = False
                for terms, value in equations:
                    todo = {a for x in terms for a in x if a in unknown}
                    if len(todo) != 1:
                        continue
                    (label,) = todo
                    if any(x.count(label) > 1 for x in terms):
                        continue
                    coef = sum(prod(sizes[a] for a in x if a != label) for x in terms if label in x)
                    rest = sum(prod(sizes[a] for a in x) for x in terms if label not in x)
                    if coef > 0 and value - rest > 0 and (value - rest) % coef == 0:
                        sizes[label] = (value - rest) // coef
                        unknown.discard(label)
                        progress = True
        expected = self._shapes_at(sizes)
        for t in self._tensors:
            if t.name in shapes and shapes[t.name] != expected[t.name]:
                hint = (f"{self.symbolic_shape(t.name)}, i.e. {t.shape} at the spec's widths" if allow_other_widths
                        else f"{t.shape}")
                raise SpecMismatchError(f"tensor '{t.name}': expected shape {hint}, found {shapes[t.name]}")
        return sizes

    def check(self, tensors: Mapping[str, Tensor | Sequence[int]], batch_dims: int = 0,
              allow_other_widths: bool = True) -> dict[str, int]:
        """Check keys and shapes of ``tensors`` (each ``(*batch, *natural_shape)``); return the label sizes.

        Other widths are allowed only along permutable axes, consistently across tensors. Raises
        SpecMismatchError naming the missing/extra key or the tensor with its expected and found shape.
        """
        missing = [n for n in self.names if n not in tensors]
        extra = [n for n in tensors if n not in self._index]
        if missing:
            raise SpecMismatchError(f"missing tensor(s) {missing} (the spec expects {self.names})")
        if extra:
            raise SpecMismatchError(f"unexpected tensor(s) {extra} not in the spec (it expects {self.names})")
        natural, batch = {}, None
        for name in self.names:
            shape = tuple(tensors[name].shape if hasattr(tensors[name], "shape") else tensors[name])
            t = self._index[name]
            if len(shape) != batch_dims + len(t.shape):
                raise SpecMismatchError(f"tensor '{name}': expected {batch_dims} batch dim(s) + shape "
                                        f"{self.symbolic_shape(name)}, found shape {shape}")
            if batch is not None and shape[:batch_dims] != batch:
                raise SpecMismatchError(f"tensor '{name}': batch dims {shape[:batch_dims]} differ from {batch}")
            batch = shape[:batch_dims]
            natural[name] = shape[batch_dims:]
        return self.infer_sizes(natural, allow_other_widths)

    # ------------------------------------------------------------------ permutations
    def random_permutation(self, generator: torch.Generator | None = None, sizes: Mapping[str, int] | None = None,
                           device: torch.device | str | None = None) -> dict[str, Tensor]:
        """One random permutation (LongTensor) per permutable label, at the spec's widths or ``sizes``."""
        sizes = {**self._sizes, **(sizes or {})}
        return {label: torch.randperm(sizes[label], generator=generator).to(device or "cpu")
                for label in self.permutable_labels}

    def split_parts(self, name: str, tensor: Tensor, sizes: Mapping[str, int], batch_dims: int) -> list[Tensor]:
        """View ``tensor`` (*batch, *natural) as its parts, each (*batch, *part_view)."""
        batch = tensor.shape[:batch_dims]
        shapes = self.part_shapes(name, sizes)
        if len(shapes) == 1:
            flat = tensor.reshape(*batch, -1)
            return [flat.view(*batch, *shapes[0]) if flat.is_contiguous() else flat.reshape(*batch, *shapes[0])]
        t = self._index[name]
        blocks = [t.block_shape(i, s) for i, s in enumerate(shapes)]
        chunks = tensor.split([b[t.split] for b in blocks], dim=batch_dims + t.split)
        return [c.reshape(*batch, *s) for c, s in zip(chunks, shapes)]

    def join_parts(self, name: str, parts: Sequence[Tensor], natural: Sequence[int], batch_dims: int) -> Tensor:
        """Inverse of ``split_parts``: parts (*batch, *part_view) -> (*batch, *natural)."""
        batch = parts[0].shape[:batch_dims]
        if len(parts) == 1:
            return parts[0].reshape(*batch, *natural)
        t = self._index[name]
        blocks = [p.reshape(*batch, *t.block_shape(i, p.shape[batch_dims:])) for i, p in enumerate(parts)]
        return torch.cat(blocks, dim=batch_dims + t.split)

    def permute(self, tensors: Mapping[str, Tensor], perm: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Apply ``perm`` ({label: index tensor}) to every axis with that label: ``out[..., j, ...] = t[..., p[j], ...]``.

        Acts on each tensor's trailing (natural) dims; leading dims are batch dims. Labels absent from ``perm`` stay
        put; ``perm`` may also name fixed labels (to show that permuting them is *not* a symmetry).
        """
        unknown = [label for label in perm if label not in self._sizes]
        if unknown:
            raise SpecError(f"permutation names labels {unknown} that are not in the spec ({self.labels})")
        first = self.names[0]
        batch_dims = tensors[first].dim() - len(self._index[first].shape) if first in tensors else 0
        sizes = self.check(tensors, batch_dims=batch_dims)
        for label, p in perm.items():
            if p.shape != (sizes[label],):
                raise SpecError(f"permutation of label '{label}' has shape {tuple(p.shape)}, expected "
                                f"({sizes[label]},)")
        return self._permute_at(tensors, perm, sizes, batch_dims)

    def _permute_at(self, tensors: Mapping[str, Tensor], perm: Mapping[str, Tensor], sizes: Mapping[str, int],
                    batch_dims: int) -> dict[str, Tensor]:
        """``permute`` with checked label sizes; tensors without a permuted label are passed through as they are."""
        out = {}
        for t in self._tensors:
            x = tensors[t.name]
            if not any(label in perm for part in t.parts for label in part.axes):
                out[t.name] = x
                continue
            parts = self.split_parts(t.name, x, sizes, batch_dims)
            moved = []
            for part, view in zip(t.parts, parts):
                for axis, label in enumerate(part.axes):
                    if label in perm:
                        view = view.index_select(batch_dims + axis, perm[label].to(view.device))
                moved.append(view)
            out[t.name] = self.join_parts(t.name, moved, x.shape[batch_dims:], batch_dims)
        return out

    # ------------------------------------------------------------------ modified copies
    def with_fixed(self, fixed: Iterable[str]) -> WeightSpec:
        """Same tensors, different set of fixed labels (``with_fixed(())`` makes every axis permutable)."""
        return WeightSpec._from_tensors(self._tensors, fixed)

    def resize(self, sizes: Mapping[str, int]) -> WeightSpec:
        """Copy at other widths of permutable labels: ``spec.resize({"h": 32})``."""
        bad = [label for label in sizes if label not in self._sizes or label in self._fixed]
        if bad:
            raise SpecError(f"resize only changes permutable labels; {bad} are fixed or unknown "
                            f"(permutable: {self.permutable_labels})")
        new = {**self._sizes, **{k: int(v) for k, v in sizes.items()}}
        shapes = self._shapes_at(new)
        tensors = [TensorSpec(t.name, shapes[t.name],
                              tuple(Part(p.axes, tuple(new[a] for a in p.axes)) for p in t.parts), t.groups, t.split)
                   for t in self._tensors]
        return WeightSpec._from_tensors(tensors, self._fixed)

    def with_shapes(self, shapes: Mapping[str, Sequence[int]]) -> WeightSpec:
        """Copy whose natural shapes are ``shapes`` (all tensors; other widths along permutable axes only)."""
        self.check(shapes)
        return self.resize({k: v for k, v in self.infer_sizes(shapes).items() if k not in self._fixed})

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; ``WeightSpec.from_dict`` inverts it. Version 1 unless a tensor is split along a dim
        other than 0 (version 2 adds the tensor's ``split``, so older readers refuse it instead of misreading it)."""
        split = any(t.split for t in self._tensors)
        return {
            "format": _FORMAT,
            "version": 2 if split else 1,
            "fixed": sorted(self._fixed),
            "tensors": [{"name": t.name, "shape": list(t.shape),
                         "parts": [{"axes": list(p.axes), "shape": list(p.shape)} for p in t.parts],
                         **({"split": t.split} if t.split else {})}
                        for t in self._tensors],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WeightSpec:
        try:
            if data.get("format", _FORMAT) != _FORMAT or int(data.get("version", _VERSION)) > _VERSION:
                raise SpecError(f"not a {_FORMAT} v{_VERSION} dict: format={data.get('format')!r}, "
                                f"version={data.get('version')!r}")
            axes = {t["name"]: [tuple(p["axes"]) for p in t["parts"]] for t in data["tensors"]}
            views = {t["name"]: [tuple(p["shape"]) for p in t["parts"]] for t in data["tensors"]}
            shapes = {t["name"]: tuple(t["shape"]) for t in data["tensors"]}
            splits = {t["name"]: int(t["split"]) for t in data["tensors"] if t.get("split")}
            return cls(axes, shapes=shapes, fixed=data.get("fixed", ()), views=views, splits=splits)
        except (KeyError, TypeError, AttributeError) as err:
            raise SpecError(f"malformed spec dict: {err!r}; expected keys format, version, fixed, tensors[name, "
                            f"shape, parts[axes, shape], split]") from err

    # ------------------------------------------------------------------ derivation
    @classmethod
    def from_module(cls, model: torch.nn.Module, example_input: Any = None, *, include_buffers: bool = False,
                    verify: bool = True) -> WeightSpec:
        """Derive the spec of ``model`` (see ``unf_models.derive``): parameters and norm-layer running statistics
        (``include_buffers=True``: every floating-point buffer). ``verify`` (default) checks every claimed symmetry
        on a float64 copy (see ``verify``) and raises SymmetryError on a mismatch."""
        from unf_models.derive import spec_from_module

        return spec_from_module(model, example_input, include_buffers=include_buffers, verify=verify)

    def verify(self, model: torch.nn.Module, example_input: Any, *, seed: int = 0, rtol: float = 1e-7) -> None:
        """Raise SymmetryError unless permuting ``model``'s state by this spec (each permutable label alone, then all
        together) leaves its float64 eval-mode output on ``example_input`` unchanged (see ``unf_models.verify``)."""
        from unf_models.verify import verify_spec

        verify_spec(self, model, example_input, seed=seed, rtol=rtol)
