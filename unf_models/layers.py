"""UNF layers: the maximal permutation-equivariant linear map (`UNFLinear`) and invariant pooling (`UNFPool`).

Public tensors are ``{name: (batch, channels, *natural_shape)}``. Internally every *piece* (a tensor part, see
``spec.py``) is held as ``(batch, K, *permutable_dims)``; with ``fixed_axes="exact"`` the fixed axes are
folded into K = channels * prod(fixed sizes), which gives the maximal layer for the true symmetry group (fixed axes
are not permuted, so any linear map along them is allowed). ``fixed_axes="permutable"`` is the reference code's
approximation: fixed labels are treated as permutable (cheaper in channels, more basis terms, and equivariant to
permutations that are not symmetries); ``pos_embed=True`` adds a learned embedding along those axes to break it.

Computation (see ``basis.py``), on channel-major copies ``(K, batch, *dims)`` of the pieces: each distinct *read*
of a piece (diagonals + means) is computed once, from the smallest read that contains it; terms whose kept axes
carry the same labels form one group: their reads are concatenated along channels and mixed by one matmul whose
output rows cover every (output piece, write) of the group; writes then broadcast, and each piece's terms are summed
smallest first into the smallest term containing them (terms on the same diagonal blocks are summed compactly and
added onto the diagonal once, in place). In permutable mode, fixed labels on a single axis (a conv's kernel axes) are folded
into channels (``_Folded``): the same parameters and span, far fewer groups, each computed either as one dense matmul
with a weight assembled from its terms' blocks or by its structure (per kept folded axes, matmuls on folded means),
whichever a cost model at construction says is cheaper. Every plan is built at construction, so ``forward`` has no
data-dependent Python and ``torch.compile`` traces it as one graph. Parameters never depend on permutable sizes, so
one layer accepts other widths of the same architecture.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from itertools import combinations, permutations, product
from typing import Literal

import torch
from torch import Tensor, nn

from unf_models.basis import Read, Write, num_pair_terms, reads, writes
from unf_models.errors import SpecError
from unf_models.spec import WeightSpec

__all__ = ["UNFLinear", "UNFPool", "FixedAxes"]

FixedAxes = Literal["exact", "permutable"]


@dataclass(frozen=True)
class _Piece:
    """One part of one tensor as the layer sees it."""

    name: str
    part: int
    axes: tuple[str, ...]  # labels of all view axes
    perm_pos: tuple[int, ...]  # view positions of permutable axes (layer order)
    fixed_pos: tuple[int, ...]  # view positions folded into channels
    fold: int  # prod of fixed sizes (channel multiplier)

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.axes[p] for p in self.perm_pos)


def _pieces(spec: WeightSpec, fixed_axes: FixedAxes) -> list[_Piece]:
    if fixed_axes not in ("exact", "permutable"):
        raise SpecError(f"fixed_axes must be 'exact' or 'permutable', got {fixed_axes!r}")
    out = []
    for t in spec.tensors:
        for i, part in enumerate(t.parts):
            fixed = tuple(a for a, label in enumerate(part.axes) if fixed_axes == "exact" and spec.is_fixed(label))
            perm = tuple(a for a in range(len(part.axes)) if a not in fixed)
            fold = math.prod(part.shape[a] for a in fixed)
            out.append(_Piece(t.name, i, part.axes, perm, fixed, fold))
    return out


class _Layout:
    """Converts public ``{name: (B, C, *natural)}`` to pieces ``(B, C*fold, *perm_dims)`` and back (views unless
    fixed axes must move in front of permutable ones; such copies are channel-major in memory, as layers use them,
    or, for large pieces whose fixed axes are innermost, channels-last: ``_channels_last``)."""

    def __init__(self, spec: WeightSpec, fixed_axes: FixedAxes) -> None:
        self.spec = spec
        self.fixed_axes = fixed_axes
        self.pieces = _pieces(spec, fixed_axes)
        self._sizes_cache: dict[tuple, dict[str, int]] = {}
        self._size_plan = _size_plan(spec)

    def sizes(self, x: Mapping[str, Tensor], batch_dims: int) -> dict[str, int]:
        """Label sizes of ``x`` (checked against the spec; cached per shape). While ``torch.compile`` traces, the
        sizes are read off the shapes by a plan solved at construction instead (plain arithmetic, no dict state),
        so one graph serves every call and, with dynamic shapes, every width."""
        if torch.compiler.is_compiling():
            return _apply_size_plan(self._size_plan, self.spec.sizes, x, batch_dims)
        key = tuple(tuple(x[n].shape[batch_dims:]) if n in x else None for n in self.spec.names)
        sizes = self._sizes_cache.get(key)
        if sizes is None:
            sizes = self.spec.check(x, batch_dims=batch_dims)
            if len(self._sizes_cache) < 64:
                self._sizes_cache[key] = sizes
        return sizes

    def to_internal(self, x: Mapping[str, Tensor], sizes: Mapping[str, int], channel_dim: bool = True,
                    channels_last: bool = True) -> list[Tensor]:
        """Public ``{name: (B, C, *natural)}`` -> pieces ``(B, C*fold, *perm_dims)``: views, or one copy where fixed
        axes fold into channels (channels-last for large pieces whose fixed axes are innermost, else channel-major;
        ``channels_last=False``: always channel-major, for callers that copy into that layout next anyway)."""
        out = []
        views: dict[str, list[Tensor]] = {}
        for p in self.pieces:
            if p.name not in views:
                views[p.name] = self.spec.split_parts(p.name, x[p.name], sizes, 2 if channel_dim else 1)
            v = views[p.name][p.part]  # (B, C, *view)
            if not channel_dim:
                v = v.unsqueeze(1)
            fixed, perm = [2 + a for a in p.fixed_pos], [2 + a for a in p.perm_pos]
            innermost = fixed == list(range(v.dim() - len(fixed), v.dim()))
            if channels_last and fixed and perm and innermost and v.numel() >= _BATCH_MAJOR_MIN:
                # fixed axes innermost (a Linear's inputs, a conv's kernel): one copy that keeps them innermost,
                # (B, *perm, C, *fixed) in memory, ~4x faster than moving them outermost
                v = v.permute(0, *perm, 1, *fixed).contiguous()
                v = v.reshape(*v.shape[: 1 + len(perm)], -1).movedim(-1, 1)  # (B, C*fold, *perm), channels-last
            elif fixed:  # one copy, channel-major as the layer computes: (C, *fixed, B, *perm)
                v = v.permute(1, *fixed, 0, *perm)
                v = v.reshape(-1, *v.shape[1 + len(fixed) :]).transpose(0, 1)  # (B, C*fold, *perm)
            out.append(v)
        return out

    def from_internal(self, pieces: list[Tensor], sizes: Mapping[str, int], channels: int,
                      like: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Pieces back to ``{name: (B, channels, *natural)}``, natural shapes those of ``like`` (the layer's input)."""
        parts: dict[str, list[Tensor]] = {}
        for p, y in zip(self.pieces, pieces):
            if p.fixed_pos:  # a view when y is channel-major (as the layer returns it)
                fixed_dims = [sizes[p.axes[a]] for a in p.fixed_pos]
                nf = len(fixed_dims)
                y = y.transpose(0, 1).reshape(channels, *fixed_dims, y.shape[0], *y.shape[2:])  # (C, *fixed, B, *perm)
                order = [*p.fixed_pos, *p.perm_pos]  # view axis held by each fixed, then perm, dim
                dims = [1 + i if i < nf else 2 + i for i in (order.index(a) for a in range(len(order)))]
                y = y.permute(nf + 1, 0, *dims)  # (B, C, *view)
            parts.setdefault(p.name, []).append(y)
        return {name: self.spec.join_parts(name, parts[name], like[name].shape[2:], 2) for name in self.spec.names}


_Equation = tuple[str, str, int, tuple[tuple[str, ...], ...]]  # (label, tensor, natural dim, dim terms)


def _size_plan(spec: WeightSpec) -> tuple[_Equation, ...]:
    """Which tensor dim determines each permutable label, in solving order (as ``WeightSpec.infer_sizes`` solves)."""
    unknown = set(spec.permutable_labels)
    equations = [(t.name, j, t.dim_terms(j)) for t in spec.tensors for j in range(len(t.shape))]
    plan = []
    progress = True
    while unknown and progress:
        progress = False
        for name, j, terms in equations:
            todo = {a for x in terms for a in x if a in unknown}
            if len(todo) == 1 and not any(x.count(next(iter(todo))) > 1 for x in terms):
                (label,) = todo
                plan.append((label, name, j, tuple(tuple(x) for x in terms)))
                unknown.discard(label)
                progress = True
    return tuple(plan)


def _apply_size_plan(plan: tuple[_Equation, ...], defaults: Mapping[str, int], x: Mapping[str, Tensor],
                     batch_dims: int) -> dict[str, int]:
    sizes = dict(defaults)
    for label, name, j, terms in plan:  # natural size = coef * size(label) + rest
        coef, rest = 0, 0
        for term in terms:
            value = 1
            for a in term:
                if a != label:
                    value = value * sizes[a]
            if label in term:
                coef = coef + value
            else:
                rest = rest + value
        sizes[label] = (x[name].shape[batch_dims + j] - rest) // coef
    return sizes


def _read(x: Tensor, read: Read) -> Tensor:
    """x: (B, K, *dims) -> (B, K, *kept_block_dims): diagonals over blocks, mean over reduced blocks."""
    ndim = x.dim() - 2
    if all(len(b) == 1 for b in read.blocks):
        reduced = tuple(2 + read.blocks[i][0] for i in read.reduced)
        return x.mean(dim=reduced) if reduced else x
    letters = "abcdefghijklmnopqrstuvw"
    sub = [""] * ndim
    for i, block in enumerate(read.blocks):
        for a in block:
            sub[a] = letters[i]
    keep = "".join(letters[i] for i in read.kept)
    y = torch.einsum(f"yz{''.join(sub)}->yz{keep}", x)  # sums over reduced blocks
    count = 1
    for i in read.reduced:
        count = count * x.shape[2 + read.blocks[i][0]]
    return y / count


@dataclass(frozen=True)
class _Output:
    piece: int
    write: Write
    width: int  # output columns = out_channels * fold
    to_pos: tuple[int, ...]  # permutation of the group's (sorted) kept dims into positional order


@dataclass(frozen=True)
class _Contribution:
    read: int  # index into the layer's read list
    order: tuple[int, ...]  # which kept dim of the read goes to each sorted-signature position


@dataclass(frozen=True)
class _Group:
    signature: tuple[str, ...]  # sorted labels of kept axes
    contributions: tuple[_Contribution, ...]
    outputs: tuple[_Output, ...]


def _sorted_order(labels: tuple[str, ...]) -> tuple[int, ...]:
    return tuple(sorted(range(len(labels)), key=lambda i: (labels[i], i)))


def _plan(pieces: list[_Piece], in_channels: int, out_channels: int
          ) -> tuple[list[tuple[int, Read]], list[_Group], list[int]]:
    """All reads, groups (one matmul each) and per-piece fan-in for the layer."""
    read_list: list[tuple[int, Read]] = []
    by_sig: dict[tuple[str, ...], list[_Contribution]] = {}
    for pi, p in enumerate(pieces):
        for r in reads(p.labels):
            kept_labels = tuple(p.labels[r.blocks[i][0]] for i in r.kept)
            sig_order = _sorted_order(kept_labels)  # kept dim feeding each sorted position (one matching)
            sig = tuple(kept_labels[i] for i in sig_order)
            ri = len(read_list)
            read_list.append((pi, r))
            # every label-respecting matching: permute the kept dims within each label
            per_label: dict[str, list[int]] = {}
            for pos, label in enumerate(sig):
                per_label.setdefault(label, []).append(pos)
            choices = [list(permutations(pos)) for pos in per_label.values()]
            for combo in product(*choices):
                order = list(sig_order)
                for positions, perm in zip(per_label.values(), combo):
                    for dst, src in zip(positions, perm):
                        order[dst] = sig_order[src]
                by_sig.setdefault(sig, []).append(_Contribution(ri, tuple(order)))
    groups = []
    outs_by_sig: dict[tuple[str, ...], list[_Output]] = {}
    for pi, p in enumerate(pieces):
        for w in writes(p.labels):
            kept_labels = tuple(p.labels[w.blocks[i][0]] for i in w.kept)
            order = _sorted_order(kept_labels)
            sig = tuple(kept_labels[i] for i in order)
            to_pos = tuple(order.index(i) for i in range(len(order)))  # sorted position of each positional dim
            outs_by_sig.setdefault(sig, []).append(_Output(pi, w, out_channels * p.fold, to_pos))
    fan_in = [0] * len(pieces)
    for sig, outs in outs_by_sig.items():
        contribs = by_sig.get(sig, [])
        if not contribs:
            continue
        rows = sum(in_channels * pieces[read_list[c.read][0]].fold for c in contribs)
        for o in outs:
            fan_in[o.piece] += rows
        groups.append(_Group(sig, tuple(contribs), tuple(outs)))
    return read_list, groups, fan_in


def _key(sig: tuple[str, ...]) -> str:
    return ("[" + ",".join(sig) + "]").replace(".", "_")


def _delta(ndim: int, block: tuple[int, ...], n: int, like: Tensor) -> Tensor:
    """1 where all axes of ``block`` carry equal indices, shaped to broadcast over a ``(B, K, *dims)`` piece with
    ``ndim`` dims (block axes offset by 2). Built from ``arange`` comparisons (no data-dependent indexing)."""
    idx = torch.arange(n, device=like.device)
    d = idx.view(-1, 1) == idx.view(1, -1)
    for k in range(2, len(block)):  # further axes must equal the first
        d = d.unsqueeze(-1) & (idx.view(-1, *[1] * k) == idx.view(*[1] * k, -1))
    view = [1] * (ndim + 2)
    for a in block:
        view[2 + a] = n
    return d.to(like.dtype).reshape(view)


@dataclass(frozen=True)
class _ReadStep:
    """How one read is computed: a base read takes the piece's diagonals (``equation``; "" = the piece itself), any
    other read averages one dim (``dim``) of its ``parent`` read, so every reduction is done once, on the smallest
    tensor that has it (the lattice of reads: mean over {i, j} = mean over j of the mean over i)."""

    piece: int
    parent: int  # index into the read list, -1 for a base read
    equation: str
    dim: int


def _read_steps(pieces: list[_Piece], read_list: list[tuple[int, Read]], sizes: Mapping[str, int]
                ) -> tuple[_ReadStep, ...]:
    index = {(pi, r.blocks, r.kept): i for i, (pi, r) in enumerate(read_list)}
    steps = []
    for pi, r in read_list:
        if not r.reduced:
            if all(len(b) == 1 for b in r.blocks):
                steps.append(_ReadStep(pi, -1, "", 0))
            else:
                letters = "abcdefghijklmnopqrstuvw"
                sub = [""] * len(pieces[pi].labels)
                for i, block in enumerate(r.blocks):
                    for a in block:
                        sub[a] = letters[i]
                keep = "".join(letters[i] for i in r.kept)
                steps.append(_ReadStep(pi, -1, f"yz{''.join(sub)}->yz{keep}", 0))
            continue
        # parent keeps one more block: the reduced block with the smallest nominal size (smallest parent tensor)
        labels = pieces[pi].labels
        b = min(r.reduced, key=lambda i: (sizes.get(labels[r.blocks[i][0]], 0), i))
        parent_kept = tuple(sorted((*r.kept, b)))
        steps.append(_ReadStep(pi, index[(pi, r.blocks, parent_kept)], "", 2 + parent_kept.index(b)))
    return tuple(steps)


def _read_order(steps: tuple[_ReadStep, ...], used: set[int]) -> tuple[int, ...]:
    """The reads to compute (the used ones and their ancestors), parents first."""
    need: set[int] = set()
    for i in used:
        while i >= 0 and i not in need:
            need.add(i)
            i = steps[i].parent

    def depth(i: int) -> int:
        return 0 if steps[i].parent < 0 else 1 + depth(steps[i].parent)

    return tuple(sorted(need, key=lambda i: (depth(i), i)))


def _compute_reads(h: list[Tensor], steps: tuple[_ReadStep, ...], order: tuple[int, ...]
                   ) -> tuple[list[Tensor | None], list[int]]:
    """The reads listed in ``order`` (B, K, *kept), each distinct reduction once, from its smallest parent, as sums,
    and each read's count (entries per sum; 1 for a base read): the mean is sum / count. The consumers scale whole
    concatenations at once (``_row_scale``) instead of dividing every read (one op each way, not one per read)."""
    out: list[Tensor | None] = [None] * len(steps)
    count = [1] * len(steps)
    for i in order:
        s = steps[i]
        if s.parent >= 0:
            parent = out[s.parent]
            if _channels_last(parent):  # summed as the (B, *kept, K) it is in memory (as (K, B, *kept): ~10x slower)
                out[i] = parent.movedim(0, -1).sum(dim=s.dim - 1).movedim(-1, 0)  # type: ignore[union-attr]
            else:
                out[i] = parent.sum(dim=s.dim)  # type: ignore[union-attr]  # its backward is an expand (a view)
            count[i] = count[s.parent] * parent.shape[s.dim]  # type: ignore[union-attr]
        else:
            out[i] = torch.einsum(s.equation, h[s.piece]) if s.equation else h[s.piece]
    return out, count


def _row_scale(counts: list[int], widths: list[int], like: Tensor, cache: dict | None) -> Tensor | float | None:
    """1 / count for the rows of a concatenation of blocks ``widths`` rows high: None when every count is 1, a float
    for a single block, else a ``(sum(widths),)`` tensor (kept in ``cache`` per counts, dtype and device)."""
    if all(c == 1 for c in counts):
        return None
    if len(counts) == 1:
        return 1.0 / counts[0]
    key = (tuple(counts), tuple(widths), like.dtype, like.device)
    hit = None if cache is None or torch.compiler.is_compiling() else cache.get(key)
    if hit is None:
        hit = torch.tensor([1.0 / c for c, w in zip(counts, widths) for _ in range(w)], dtype=like.dtype,
                           device=like.device)
        if cache is not None and not torch.compiler.is_compiling() and len(cache) < 256:
            cache[key] = hit
    return hit


@dataclass(frozen=True)
class _WritePlan:
    """Precomputed view ops placing a group's output columns into an output piece (see ``_apply_write``)."""

    rows: tuple[int, int]  # this output's row block of the group's matmul output
    perm: tuple[int, ...]  # (W, B, *sorted_kept) -> (W, B, *kept in positional order); () = identity
    index: tuple[object, ...]  # inserts the broadcast axes and the extra axes of diagonal blocks; () = none
    perm2: tuple[int, ...]  # block order -> positional order; () = identity
    diagonals: tuple[tuple[int, ...], ...]  # blocks written on their diagonal
    support: frozenset[int]  # output dims this term is not broadcast along


def _write_plan(o: _Output, rows: tuple[int, int], ndim_out: int) -> _WritePlan:
    perm = (0, 1, *(2 + i for i in o.to_pos))
    index: list[object] = [slice(None), slice(None)]
    kept = set(o.write.kept)
    position: list[int] = []
    support: set[int] = set()
    for i, block in enumerate(o.write.blocks):
        index.append(slice(None) if i in kept else None)
        index.extend([None] * (len(block) - 1))
        position.extend(block)
        if i in kept or len(block) > 1:
            support.update(block)
    perm2 = (0, 1, *(2 + position.index(a) for a in range(ndim_out)))
    perm2 = () if perm2 == tuple(range(ndim_out + 2)) else perm2
    diagonals = tuple(b for b in o.write.blocks if len(b) > 1)
    perm = () if perm == tuple(range(len(perm))) else perm
    plain = all(isinstance(i, slice) for i in index)  # every dim kept in place: no indexing needed
    return _WritePlan(rows, perm, () if plain or not ndim_out else tuple(index), perm2, diagonals,
                      frozenset(support))


def _apply_write(z: Tensor, w: _WritePlan, like: Tensor) -> Tensor:
    """z: this output's rows of the group's matmul output (W, B, *sorted_kept) -> the term in the layer's
    channel-major layout (W, B, *dims) with size 1 along broadcast axes (a view, times a 0/1 delta per diagonal
    block)."""
    return _diagonalize(_place(z, w), w.diagonals, like)


def _place(z: Tensor, w: _WritePlan) -> Tensor:
    """The term as a view in the piece's layout, a diagonal block held along its first axis only (compact)."""
    y = z.permute(w.perm) if w.perm else z
    if not w.index:
        return y
    y = y[w.index]
    if w.perm2:
        y = y.permute(w.perm2)
    return y


def _diagonalize(y: Tensor, diagonals: tuple[tuple[int, ...], ...], like: Tensor) -> Tensor:
    for block in diagonals:
        y = y * _delta(like.dim() - 2, block, like.shape[2 + block[0]], like)
    return y


def _add_to_diagonals_(y: Tensor, c: Tensor, blocks: tuple[tuple[int, ...], ...]) -> None:
    """``y[..., i, ..., i, ...] += c[..., i, ..., 0, ...]`` for every diagonal block, in place on a strided view of
    ``y`` (K, B, *dims); ``c`` holds each block along its first axis, size 1 on the others (``_place``). Its backward
    is a copy of the gradient and its diagonal, where multiplying by 0/1 masks cost full-size products both ways."""
    y, c = _diagonal_views(y, c, blocks)
    y.add_(c)


def _diagonal_views(y: Tensor, c: Tensor, blocks: tuple[tuple[int, ...], ...]) -> tuple[Tensor, Tensor]:
    """The strided view of ``y``'s diagonal blocks and the matching (broadcastable) view of ``c``."""
    order = list(range(y.dim()))  # original dim held by each current dim
    for block in blocks:
        dims = [order.index(2 + a) for a in block]
        end = list(range(y.dim() - len(dims), y.dim()))
        y, c = y.movedim(dims, end), c.movedim(dims, end)
        for _ in range(len(dims) - 1):
            y = y.diagonal(0, -2, -1)
        c = c.flatten(-len(dims))  # a view: the block's other axes have size 1
        order = [a for a in order if a - 2 not in block] + [2 + block[0]]
    return y, c


class _AddToDiagonals(torch.autograd.Function):
    """``_add_to_diagonals_`` as one autograd node: the gradient passes to ``y`` as it is and ``c`` gets its diagonal
    entries, where autograd's record of an in-place add on a view copies the whole gradient first."""

    @staticmethod
    def forward(ctx, y: Tensor, c: Tensor, blocks: tuple[tuple[int, ...], ...]) -> Tensor:  # type: ignore[override]
        ctx.blocks, ctx.c_meta = blocks, (c.shape, c.dtype, c.device)
        _add_to_diagonals_(y, c, blocks)
        ctx.mark_dirty(y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:  # type: ignore[override]
        shape, dtype, device = ctx.c_meta
        gc = torch.zeros(shape, dtype=dtype, device=device)
        g_view, gc_view = _diagonal_views(grad, gc, ctx.blocks)
        gc_view.copy_(g_view.sum_to_size(gc_view.shape))
        return grad, gc, None


def _merge_plan(supports: list[frozenset[int]]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Order in which to sum one piece's terms and, per term, the term it is added into (-1: a root).

    Each term is added into the smallest later term whose support contains its own, so additions (and the
    reductions of their gradients) happen at the smallest shape that holds both instead of at full size."""
    order = sorted(range(len(supports)), key=lambda i: (len(supports[i]), i))
    parent = [-1] * len(supports)
    for rank, i in enumerate(order):
        for j in order[rank + 1 :]:
            if supports[i] <= supports[j]:
                parent[i] = j
                break
    return tuple(order), tuple(parent)


def _fold_labels(spec: WeightSpec, pieces: list[_Piece], limit: int = 9) -> frozenset[str]:
    """Fixed labels the layer treats as permutable that sit on exactly one axis of one piece (a conv's kernel and
    input-channel axes in permutable mode); per piece the subset with the largest product of sizes up to ``limit``,
    when it is all of them or holds at least two labels of size > 1, else none.

    Such a label has two terms on its own piece (keep the axis, or mean then broadcast) and one on every other (mean,
    or broadcast), so its terms are computed by folding the axis into channels and mixing with a weight assembled
    from the terms' own blocks: same span, same parameters, a fraction of the reads, matmuls and writes. Folding a
    single label of several halves the piece's terms for F times the arithmetic of its largest one; that made the
    layer slower than no fold (the mlp-digits member's 8x8 input, a 5x5 kernel), while folding two of three (a 3x3
    kernel's rows and the input channels of an RGB conv) made it faster (docs/unf.md)."""
    count: dict[str, int] = {}
    for p in pieces:
        for label in p.labels:
            count[label] = count.get(label, 0) + 1
    out: set[str] = set()
    for p in pieces:
        mine = [a for a in p.labels if count[a] == 1 and spec.is_fixed(a)]
        subsets = [c for k in range(len(mine) + 1) for c in combinations(mine, k)]
        fits = [c for c in subsets if math.prod(spec.sizes[a] for a in c) <= limit]
        best = max(fits, key=lambda c: (math.prod(spec.sizes[a] for a in c), len(c)))  # the largest fold
        if len(best) == len(mine) or sum(spec.sizes[a] > 1 for a in best) >= 2:
            out.update(best)
    return frozenset(out)


def _restrict(blocks: tuple[tuple[int, ...], ...], kept: tuple[int, ...], rest: tuple[int, ...]
              ) -> tuple[tuple[tuple[int, ...], ...], tuple[int, ...]]:
    """Blocks and kept blocks of a read/write without the folded axes (each a block of its own); ``rest`` lists the
    remaining axis positions in order (their new positions are their indices)."""
    new_blocks, new_index = [], {}
    for i, block in enumerate(blocks):
        if block[0] in rest:
            new_index[i] = len(new_blocks)
            new_blocks.append(tuple(rest.index(a) for a in block))
    return tuple(new_blocks), tuple(new_index[i] for i in kept if i in new_index)


@dataclass(frozen=True)
class _FoldPart:
    """Terms of one folded piece onto itself that keep the non-trivial folded axes ``axes`` (on both sides) and
    average the others: one (batched) matmul on the inputs' sums over the other folded axes."""

    axes: tuple[int, ...]  # kept non-trivial folded axes (indices into the piece's ``nt``)
    inputs: tuple[int, ...]  # the group's contributions from this piece
    weight: str  # buffer of the weight's parameter indices, (terms, len(inputs) * K_in, K_out)
    drop: int  # entries per sum: the product of the other folded sizes
    kept: int  # kept positions: the product of the kept folded sizes


@dataclass(frozen=True)
class _FoldOutput:
    """How one folded output of a group is summed: its common (all-mean) row block plus its parts, each added into
    the smallest part that keeps all its axes (``_merge_plan``; index 0 is the common block)."""

    nt: tuple[int, ...]  # the piece's non-trivial folded sizes
    fold: int  # their product
    parts: tuple[_FoldPart, ...]
    order: tuple[int, ...]
    parent: tuple[int, ...]


@dataclass(frozen=True)
class _FoldGroup:
    """A group of the folded basis: computed by its structure (see ``_Folded``), or, where ``dense`` names its
    assembled weight, as one dense matmul like an unfolded group."""

    dense: str | None  # the dense weight's name
    dense_shape: tuple[int, int]  # its (rows, columns) in units of channels: the summed folds of inputs, outputs
    members: tuple[tuple[str, int, int], ...]  # the original groups whose terms it holds: (key, n_c, n_o)
    weights: tuple[str, ...]  # structured: the weights gathered for it
    nt: tuple[tuple[int, ...], ...]  # per contribution: its piece's non-trivial folded sizes
    folds: tuple[int, ...]  # per contribution: their product
    sums: tuple[tuple[tuple[tuple[int, ...], tuple[int, ...], int], ...], ...]  # per contribution: (S, parent, dim)
    common: str  # buffer: indices of the all-mean weight (terms, sum K_in, sum K_out)
    bias: str | None  # buffer: indices of the bias rows (sum K_out), the constant group only
    outputs: tuple[_FoldOutput | None, ...]  # None: an output piece without folded axes


# Cost model of a folded group (1-thread CPU, calibrated on the CNN layers of benchmarks/bench_unf.py at 16, 32 and 64
# channels): in multiply-add equivalents, an element read or written costs _PASS_COST, one op (forward + backward,
# with autograd) _OP_COST, and groups are costed at _BATCH columns per signature entry.
_PASS_COST, _OP_COST, _BATCH = 14, 1_000_000, 16


def _dense_cost(rows: int, cols: int, columns: int, assembly: int) -> int:
    """Estimated cost of a dense folded group: its matmul, input and output, and its weight's assembly (``assembly``
    multiply-adds, then a reordering copy)."""
    return columns * (rows * cols + _PASS_COST * (rows + cols)) + assembly + _PASS_COST * rows * cols + 3 * _OP_COST


def _structured_cost(cin: int, cout: int, nts: list[tuple[int, ...]], pin: list[int], sums: tuple,
                     outs: list[_FoldOutput | None], n_out: int, columns: int) -> int:
    """The same computed by structure: its matmuls' multiply-adds, every element its sums, matmuls and broadcast
    additions read or write (see ``_fold_output``), and its ops."""
    macs = len(pin) * cin * n_out * cout  # the all-mean matmul
    moved = len(pin) * cin + n_out * cout
    ops = 1
    for p, steps in zip(pin, sums):
        ops += len(steps)
        nt = nts[p]
        for kept, parent, _ in steps:
            moved += cin * (math.prod(nt[a] for a in parent) + math.prod(nt[a] for a in kept))
    for fo in outs:
        if fo is None:
            continue
        sizes = [1] + [part.kept for part in fo.parts]
        for part, n in zip(fo.parts, sizes[1:]):
            macs += len(part.inputs) * cin * cout * n
            moved += (len(part.inputs) * cin + cout) * n
            ops += 5  # weight gather and scale, matmul, addition, view
        for i, j in enumerate(fo.parent):
            moved += cout * (2 * sizes[j] + sizes[i]) if j >= 0 else 0
        if not fo.parts:
            moved += 2 * cout * fo.fold
    return columns * (macs + _PASS_COST * moved) + ops * _OP_COST


def _sum_plan(nt: tuple[int, ...], need: set[tuple[int, ...]]
              ) -> tuple[tuple[tuple[int, ...], tuple[int, ...], int], ...]:
    """Sums of a folded read over the folded axes not in each needed S, each from the smallest computed parent
    (one more axis kept, the smallest one); (S, parent, summed dim) in computing order."""
    full = tuple(range(len(nt)))
    plan: dict[tuple[int, ...], tuple[tuple[int, ...], int]] = {}
    todo = set(need) - {full}
    while todo:
        s = max(todo, key=lambda t: (len(t), t))
        todo.discard(s)
        if s in plan:
            continue
        a = min((a for a in full if a not in s), key=lambda a: (nt[a], a))
        parent = tuple(sorted((*s, a)))
        plan[s] = (parent, a)
        if parent != full and parent not in plan:
            todo.add(parent)
    ordered = sorted(plan, key=lambda t: (-len(t), t))
    return tuple((s, plan[s][0], plan[s][1]) for s in ordered)


class _Folded:
    """The layer's terms computed with its single-axis fixed labels (see ``_fold_labels``) folded into channels.

    Pieces become channel-major ``(F*K, B, *other_dims)`` (folded axes outermost; in memory batch-major for large
    pieces of a plan without structured groups, see ``fold``); the basis over the remaining labels is planned as
    usual. Each original term maps the folded axes by a constant ``(F_in, F_out)`` matrix:
    between pieces mean-then-broadcast, from a piece onto itself identity or mean-then-broadcast per folded axis.
    So a group is computed by its structure instead of one dense ``(F_in*K_in, F_out*K_out)`` matmul: one matmul on
    the inputs' full means (every all-mean term of the group, with the summed blocks of its terms), and per folded
    piece and set S of kept folded axes one matmul batched over the kept positions on the means over the others,
    broadcast back over them; size-1 folded axes are dropped (the terms keeping them or not are summed). The weights
    are the parameters' own blocks, gathered by constant indices (no fold matrices)."""

    def __init__(self, spec: WeightSpec, pieces: list[_Piece], read_list: list[tuple[int, Read]],
                 groups: list[_Group], labels: frozenset[str], in_channels: int, out_channels: int,
                 structured_always: bool | None = None) -> None:
        self.folded: list[tuple[int, ...]] = []  # per piece: label indices folded
        self.rest: list[tuple[int, ...]] = []  # per piece: label indices kept as dims
        self.fsizes: list[tuple[int, ...]] = []
        self.pieces: list[_Piece] = []
        for p in pieces:
            fl = tuple(k for k, a in enumerate(p.labels) if a in labels)
            rest = tuple(k for k in range(len(p.labels)) if k not in fl)
            self.folded.append(fl)
            self.rest.append(rest)
            self.fsizes.append(tuple(spec.sizes[p.labels[k]] for k in fl))
            self.pieces.append(_Piece(p.name, p.part, p.axes, tuple(p.perm_pos[k] for k in rest),
                                      tuple(p.perm_pos[k] for k in fl), math.prod(self.fsizes[-1])))
        nts = [tuple(n for n in fs if n > 1) for fs in self.fsizes]
        self.reads, self.groups, _ = _plan(self.pieces, in_channels, out_channels)
        read_index = {(pi, r.blocks, r.kept): i for i, (pi, r) in enumerate(self.reads)}
        contrib_at: dict[tuple[int, tuple[int, ...]], tuple[int, int]] = {}  # -> (group, contribution index)
        output_at: dict[tuple[int, object, object], tuple[int, int]] = {}  # -> (group, output index)
        for e, g in enumerate(self.groups):
            for ci, c in enumerate(g.contributions):
                contrib_at[(c.read, c.order)] = (e, ci)
            for oi, o in enumerate(g.outputs):
                output_at[(o.piece, o.write.blocks, o.write.kept)] = (e, oi)
        cin, cout = in_channels, out_channels
        # parameter offsets of every term's (cin, cout) block in the flat concatenation of ``mix`` (in its order)
        common: list[dict[tuple[int, int], list[tuple[int, int]]]] = [{} for _ in self.groups]  # (c, o) -> term offsets
        parts: list[dict[tuple[int, tuple[int, ...]], dict[int, list[tuple[int, int]]]]] = [{} for _ in self.groups]
        dense: list[list[tuple[int, int, tuple[int, int], Tensor]]] = [[] for _ in self.groups]  # (c, o, term, M)
        members: list[list[tuple[str, int, int]]] = [[] for _ in self.groups]  # original groups: (key, n_c, n_o)
        bias_at: dict[int, int] = {}  # const group output -> first bias column
        base, const_col = 0, 0
        self.keys: list[str] = []
        for g in groups:
            cols = len(g.outputs) * cout
            for ci, c in enumerate(g.contributions):
                pi, r = read_list[c.read]
                e, ec = self._exec_contribution(pi, r, c.order, read_index, contrib_at)
                kept = tuple(sorted(j for j, k in enumerate(self.folded[pi]) if self.fsizes[pi][j] > 1
                                    and any(k in r.blocks[i] for i in r.kept)))
                axes = tuple(sum(1 for q in range(j) if self.fsizes[pi][q] > 1) for j in kept)  # indices in nt
                for oi, o in enumerate(g.outputs):
                    wb, wk = _restrict(o.write.blocks, o.write.kept, self.rest[o.piece])
                    eo, oe = output_at[(o.piece, wb, wk)]
                    if eo != e:
                        raise SpecError("internal: a folded term maps across groups")
                    offset = (base + ci * cin * cols + oi * cout, cols)
                    dense[e].append((ec, oe, offset, self._fold_matrix(pi, r, o.piece, o.write)))
                    if o.piece != pi or not axes:
                        common[e].setdefault((ec, oe), []).append(offset)
                    else:
                        parts[e].setdefault((oe, axes), {}).setdefault(ec, []).append(offset)
            if not g.signature:  # the bias: one slice per output, broadcast over the folded axes too
                for o in g.outputs:
                    wb, wk = _restrict(o.write.blocks, o.write.kept, self.rest[o.piece])
                    bias_at[output_at[(o.piece, wb, wk)][1]] = const_col
                    const_col += o.width
            self.keys.append(_key(g.signature))
            members[e].append((self.keys[-1], len(g.contributions), len(g.outputs)))
            base += len(g.contributions) * cin * cols
        self.size = base  # the flat parameters; index ``base`` is a zero (padding of sums over fewer terms)
        self._buffers: dict[str, Tensor] = {}
        plan = []
        for e, g in enumerate(self.groups):
            pin = [self.reads[c.read][0] for c in g.contributions]
            name = f"_fold_{e}"
            self._buffers[name] = self._index([[common[e].get((ci, oi), []) for oi in range(len(g.outputs))]
                                               for ci in range(len(pin))], cin, cout)
            need: list[set[tuple[int, ...]]] = [{()} for _ in pin]
            outs: list[_FoldOutput | None] = []
            for oi, o in enumerate(g.outputs):
                if self.pieces[o.piece].fold == 1:
                    outs.append(None)
                    continue
                fparts = []
                for (oe, axes), blocks in sorted(parts[e].items()):
                    if oe != oi:
                        continue
                    ins = tuple(sorted(blocks))
                    if ins != tuple(ci for ci, p in enumerate(pin) if p == o.piece):
                        raise SpecError("internal: a folded piece's term is missing")
                    wname = f"_fold_{e}_{oi}_{'_'.join(map(str, axes))}"
                    self._buffers[wname] = self._index([[blocks[ci]] for ci in ins], cin, cout)
                    for ci in ins:
                        need[ci].add(axes)
                    drop = math.prod(n for a, n in enumerate(nts[o.piece]) if a not in axes)
                    fparts.append(_FoldPart(axes, ins, wname, drop, math.prod(nts[o.piece]) // drop))
                order, parent = _merge_plan([frozenset()] + [frozenset(p.axes) for p in fparts])
                outs.append(_FoldOutput(nts[o.piece], math.prod(nts[o.piece]), tuple(fparts), order, parent))
            sums = tuple(_sum_plan(nts[p], s) for p, s in zip(pin, need))
            fin = [self.pieces[p].fold for p in pin]
            fout = [self.pieces[o.piece].fold for o in g.outputs]
            columns = _BATCH * math.prod(spec.sizes[a] for a in g.signature)
            assembly = sum(fin) * sum(fout) * len(dense[e]) * cin * cout  # the dense weight's fold matmul
            structured = structured_always or (structured_always is None and max(fin + fout) > 1 and _structured_cost(
                cin, cout, nts, pin, sums, outs, len(g.outputs), columns)
                < _dense_cost(cin * sum(fin), cout * sum(fout), columns, assembly))
            names = (name, *(p.weight for fo in outs if fo is not None for p in fo.parts))
            if not structured:
                for n in names:
                    del self._buffers[n]
                self._dense_buffers(name, dense[e], fin, fout, cin, cout)
            bias = None
            if not g.signature:  # the bias: one slice per output, broadcast over the folded axes too
                bias = f"_fold_{e}_bias"
                self._buffers[bias] = torch.tensor([bias_at[oi] + j for oi in range(len(g.outputs))
                                                    for _ in range(1 if structured else fout[oi]) for j in range(cout)],
                                                   dtype=torch.long)
            plan.append(_FoldGroup(None if structured else name, (sum(fin), sum(fout)), tuple(members[e]),
                                   names if structured else (),
                                   tuple(nts[p] for p in pin), tuple(math.prod(nts[p]) for p in pin), sums,
                                   names[0], bias, tuple(outs)))
        self.plan = tuple(plan)
        self.structured = any(fg.dense is None for fg in plan)  # whether any weight is gathered from flat parameters
        self.in_channels, self.out_channels = in_channels, out_channels
        self._cast: dict[str, tuple[Tensor, Tensor]] = {}  # buffer name -> (the buffer, it in the weights' dtype)

    def _dense_buffers(self, name: str, terms: list[tuple[int, int, tuple[int, int], Tensor]], fin: list[int],
                       fout: list[int], cin: int, cout: int) -> None:
        """The constant fold matrices (``name_m``, (F rows x F columns, terms), float64) that assemble a dense group
        weight per call from its terms' blocks (rows (contribution, folded, K_in), columns (output, folded, K_out),
        as the folded pieces' channels)."""
        row_f = [sum(fin[:c]) for c in range(len(fin))]
        col_f = [sum(fout[:o]) for o in range(len(fout))]
        rows_f, cols_f = sum(fin), sum(fout)
        mat = torch.zeros(rows_f, cols_f, len(terms), dtype=torch.float64)
        for t, (c, o, _, m) in enumerate(terms):
            mat[row_f[c] : row_f[c] + fin[c], col_f[o] : col_f[o] + fout[o], t] = m
        self._buffers[name + "_m"] = mat.reshape(rows_f * cols_f, len(terms))

    def _fold_matrix(self, pi: int, r: Read, po: int, w: Write) -> Tensor:
        """(F_in, F_out): how the term maps the folded axes of its input piece onto those of its output piece."""
        f_in, f_out = math.prod(self.fsizes[pi]), math.prod(self.fsizes[po])
        if pi != po:
            return torch.full((f_in, f_out), 1.0 / f_in, dtype=torch.float64)
        m = torch.ones(1, 1, dtype=torch.float64)
        for k, n in zip(self.folded[pi], self.fsizes[pi]):
            kept_in = any(k in r.blocks[i] for i in r.kept)
            kept_out = any(k in w.blocks[i] for i in w.kept)
            if kept_in != kept_out:
                raise SpecError("internal: a single-axis label is kept on one side of a term only")
            m = torch.kron(m, torch.eye(n, dtype=torch.float64) if kept_in
                           else torch.full((n, n), 1.0 / n, dtype=torch.float64))
        return m

    def _index(self, blocks: list[list[list[tuple[int, int]]]], cin: int, cout: int) -> Tensor:
        """(terms, rows*cin, cols*cout) parameter indices of a weight whose (row, col) block is the sum of the terms
        at ``blocks[row][col]`` ((offset, row stride) each; missing terms point at the zero after the parameters)."""
        depth = max(1, max(len(b) for row in blocks for b in row))
        rows, cols = len(blocks), len(blocks[0])
        idx = torch.full((depth, rows, cin, cols, cout), self.size, dtype=torch.long)
        for r, row in enumerate(blocks):
            for c, terms in enumerate(row):
                for d, (offset, stride) in enumerate(terms):
                    idx[d, r, :, c, :] = offset + stride * torch.arange(cin).view(cin, 1) + torch.arange(cout)
        return idx.view(depth, rows * cin, cols * cout)

    def _exec_contribution(self, pi: int, r: Read, order: tuple[int, ...], read_index: Mapping, contrib_at: Mapping
                           ) -> tuple[int, int]:
        blocks, kept = _restrict(r.blocks, r.kept, self.rest[pi])
        keep_folded = [r.blocks[i][0] not in self.rest[pi] for i in r.kept]  # per kept dim of r: folded?
        new_dim = [sum(1 for q in range(k) if not keep_folded[q]) for k in range(len(r.kept))]
        new_order = tuple(new_dim[k] for k in order if not keep_folded[k])
        return contrib_at[(read_index[(pi, blocks, kept)], new_order)]

    def buffers(self) -> dict[str, Tensor]:
        return self._buffers

    def fold(self, h: list[Tensor], batch_major_min: int | None = None) -> list[Tensor]:
        """Pieces (B, K, *dims) -> channel-major (F*K, B, *other_dims), folded axes outermost (one copy each; none
        for a layer's own output). With ``batch_major_min``, pieces of at least that many elements that are not
        already laid out so are folded batch-major in memory instead: the transposed view of a contiguous
        (B, F*K, *other_dims) (``_batch_major``), one copy too, none for a layer's own batch-major output."""
        out = []
        for t, fl, rest in zip(h, self.folded, self.rest):
            v = t.permute(*(2 + k for k in fl), 1, 0, *(2 + k for k in rest))
            if batch_major_min is not None and t.dim() > 2 and t.numel() >= batch_major_min and not v.is_contiguous():
                v = t.permute(0, *(2 + k for k in fl), 1, *(2 + k for k in rest))
                out.append(v.reshape(v.shape[0], -1, *v.shape[2 + len(fl) :]).transpose(0, 1))
                continue
            if fl and not v.is_contiguous():  # copy channel by channel first (the source stays in cache), then the
                v = t.permute(1, *(2 + k for k in fl), 0, *(2 + k for k in rest)).contiguous()  # folded axes
                v = v.permute(*range(1, 1 + len(fl)), 0, *range(1 + len(fl), v.dim()))  # to the front: ~25% faster
            out.append(v.reshape(-1, *v.shape[len(fl) + 1 :]))
        return out

    def unfold(self, h: list[Tensor], channels: int) -> list[Tensor]:
        """Channel-major (F*C, B, *other_dims), in either memory layout -> views (B, C, *dims)."""
        out = []
        for t, fl, rest, fs in zip(h, self.folded, self.rest, self.fsizes):
            if _batch_major(t):  # memory (B, *folded, C, *rest)
                t, batch, first = t.transpose(0, 1).reshape(t.shape[1], *fs, channels, *t.shape[2:]), 0, 1
            else:  # memory (*folded, C, B, *rest)
                t, batch, first = t.reshape(*fs, channels, *t.shape[1:]), len(fl) + 1, 0
            where = {k: first + j for j, k in enumerate(fl)} | {k: 2 + len(fl) + j for j, k in enumerate(rest)}
            out.append(t.permute(batch, first + len(fl), *(where[k] for k in range(len(fl) + len(rest)))))
        return out

    def weights(self, module: nn.Module) -> dict[str, Tensor]:
        """Every weight of the plan (and the constant group's bias), gathered from the parameters' own blocks (one
        concatenation of ``mix``, then per weight one indexing, summing the terms a size-1 folded axis merges) or,
        for a dense group, assembled: one matmul of the constant fold matrices with the terms' blocks, reordered."""
        mix = module.mix
        cin, cout = self.in_channels, self.out_channels
        flat = torch.cat([mix[k].reshape(-1) for k in self.keys] + [mix[self.keys[0]].new_zeros(1)]) \
            if self.structured else None
        out = {}
        for fg in self.plan:
            if fg.dense is not None:
                blocks = []  # the terms' (K_in, K_out) blocks, in the fold matrix's order
                for k, nc, no in fg.members:
                    w = mix[k]
                    if nc > 1 and no > 1:
                        w = w.view(nc, cin, no, cout).permute(0, 2, 1, 3)
                    blocks.append(w.reshape(nc * no, cin * cout))
                stack = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
                y = torch.mm(self._matrix(module, fg.dense + "_m", stack.dtype), stack)
                rows, cols = fg.dense_shape
                y = y.view(rows, cols, cin, cout).permute(0, 2, 1, 3)
                out[fg.dense] = y.reshape(rows * cin, cols * cout)
            for name in fg.weights:
                idx = getattr(module, name)
                w = flat.index_select(0, idx.view(-1)).view(idx.shape)  # type: ignore[union-attr]
                out[name] = w[0] if w.shape[0] == 1 else w.sum(0)
            if fg.bias is not None:
                out[fg.bias] = module.bias[getattr(module, fg.bias)]
        return out

    def _matrix(self, module: nn.Module, name: str, dtype: torch.dtype) -> Tensor:
        """The float64 fold buffer ``name`` in the weights' dtype, converted once per buffer (not every call)."""
        source = getattr(module, name)
        if source.dtype == dtype or torch.compiler.is_compiling():
            return source.to(dtype)
        hit = self._cast.get(name)
        if hit is None or hit[0] is not source or hit[1].dtype != dtype:
            hit = (source, source.to(dtype))
            self._cast[name] = hit
        return hit[1]


@dataclass(frozen=True)
class _ForwardPlan:
    """Everything forward needs that does not depend on the input, built once: read steps (each reduction once, from
    the smallest parent), per-group (read, permutation) inputs and write views, per-piece summation order. Keeps
    forward free of data-dependent Python, so ``torch.compile`` traces it in one graph."""

    steps: tuple[_ReadStep, ...]
    read_order: tuple[int, ...]
    groups: tuple[tuple[str, tuple, tuple, tuple[int, ...]], ...]  # (weight key, inputs, outputs, widths)
    num_outputs: int
    # per piece: ((diagonals, ids, order, parent) per diagonal pattern, (ids, order, parent) of the other terms' sum)
    merges: tuple[tuple[tuple[tuple, ...], tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]], ...]


def _forward_plan(pieces: list[_Piece], read_list: list[tuple[int, Read]], groups: list[_Group],
                  sizes: Mapping[str, int]) -> _ForwardPlan:
    steps = _read_steps(pieces, read_list, sizes)
    used = {c.read for g in groups for c in g.contributions}
    group_plans = []
    per_piece: list[list[tuple[int, _WritePlan, frozenset[int]]]] = [[] for _ in pieces]
    n_out = 0
    for g in groups:
        # the group's dims in the positional order of its largest input (not the sorted signature): that input is
        # then a view, and the output of its own piece needs no permutation either
        def size(c: _Contribution) -> int:
            pi, r = read_list[c.read]
            return pieces[pi].fold * math.prod(sizes.get(pieces[pi].labels[r.blocks[i][0]], 1) for i in r.kept)

        lead = max(g.contributions, key=size).order
        lead = tuple(lead.index(k) for k in range(len(lead)))  # new sig position k <- sorted position lead[k]
        ins = []
        for c in g.contributions:
            ins.append((c.read, (0, 1, *(2 + c.order[lead[k]] for k in range(len(lead))))))  # (K, B, *sig)
        outs = []
        col = 0
        for o in g.outputs:
            o = replace(o, to_pos=tuple(lead.index(i) for i in o.to_pos))
            plan = _write_plan(o, (col, col + o.width), len(pieces[o.piece].labels))
            col += o.width
            outs.append((n_out, o.piece, plan))
            compact = frozenset(o.write.blocks[i][0] for i in o.write.kept)  # dims of size > 1 before placing
            per_piece[o.piece].append((n_out, plan, compact))
            n_out += 1
        group_plans.append((_key(g.signature), tuple(ins), tuple(outs), tuple(o.width for o in g.outputs)))
    # terms written on the same diagonal blocks are summed in their compact form first, then added in place onto
    # those diagonals of the piece's sum of the other terms (no full-size 0/1 product, no full-size addition)
    merges = []
    for terms in per_piece:
        if not terms:
            raise SpecError("internal: a weight-space piece receives no basis term")
        patterns: dict[tuple, list[tuple[int, _WritePlan, frozenset[int]]]] = {}
        for t, wp, compact in terms:
            patterns.setdefault(wp.diagonals, []).append((t, wp, compact))
        diag, final = [], []
        for d, members in patterns.items():
            if not d:
                final += [(t, wp.support) for t, wp, _ in members]
                continue
            order, parent = _merge_plan([compact for _, _, compact in members])
            diag.append((d, tuple(t for t, _, _ in members), order, parent))
        order, parent = _merge_plan([sup for _, sup in final])
        merges.append((tuple(diag), (tuple(t for t, _ in final), order, parent)))
    return _ForwardPlan(steps, _read_order(steps, used), tuple(group_plans), n_out, tuple(merges))


def _sum_tree(vals: list[Tensor | None], fresh: list[bool], order: tuple[int, ...], parent: tuple[int, ...]
              ) -> tuple[Tensor, bool]:
    """Sum of ``vals``, small terms first, each added into the smallest term that contains it (``_merge_plan``);
    ``fresh[j]``: vals[j] was made here and is referenced nowhere else, so it takes additions in place. Also says
    whether the sum is such a tensor."""
    vals, fresh = list(vals), list(fresh)
    acc: Tensor | None = None
    own = False
    for i in order:
        j = parent[i]
        if j >= 0 and fresh[j]:
            vals[j].add_(vals[i])  # type: ignore[union-attr]
        elif j >= 0:
            vals[j] = vals[j] + vals[i]  # type: ignore[operator]
            fresh[j] = True
        elif acc is None:
            acc, own = vals[i], fresh[i]
        else:
            acc, own = acc + vals[i], True
    return acc, own  # type: ignore[return-value]


class _PermutedCopy(torch.autograd.Function):
    """``x.permute(perm).contiguous()`` whose gradient is contiguous too. Plain autograd hands back the permuted view
    of the output's gradient; once summed with ``x``'s other gradients the sum keeps that transposed layout, and every
    later backward op on it (the ReLU's mask, the reductions) runs ~10x slower on the strided tensor."""

    @staticmethod
    def forward(ctx, x: Tensor, perm: tuple[int, ...]) -> Tensor:  # type: ignore[override]
        ctx.inv = tuple(perm.index(i) for i in range(len(perm)))
        return x.permute(perm).contiguous()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad.permute(ctx.inv).contiguous(), None


_BATCH_MAJOR_MIN = 1 << 16  # elements from which a contiguous (B, K, ...) input piece is computed batch-major


def _channels_last(t: Tensor) -> bool:
    """A (K, B, *dims) piece whose memory is (B, *dims, K): ``_Layout.to_internal``'s copy of a large piece with
    innermost fixed axes. The layer takes it as it is: reduced, concatenated and multiplied in that layout."""
    return t.dim() > 2 and t.shape[0] > 1 and not t.is_contiguous() and t.movedim(0, -1).is_contiguous()


def _batch_major(t: Tensor) -> bool:
    """A (K, B, *dims) piece whose memory is batch-major: the transposed view of a contiguous (B, K, *dims)."""
    return t.dim() > 2 and not t.is_contiguous() and t.transpose(0, 1).is_contiguous()


class _BatchMajorMatmul(torch.autograd.Function):
    """``weight.t() @ x`` on a batch-major piece ``x`` (K_in, B, *dims) seen channel-major (``_batch_major``): one
    matmul per batch member with the weight shared, the product (K_out, B, *dims) batch-major in memory too. So the
    dict API's contiguous (B, C, *shape) inputs need no layout copy and its outputs come back contiguous. The product
    is a tensor of its own (permuted strides, not a view), so the piece's other terms go into it in place."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:  # type: ignore[override]
        bm = x.transpose(0, 1).reshape(x.shape[1], x.shape[0], -1)  # (B, K_in, N), a view
        k_out, (b, n) = weight.shape[1], (bm.shape[0], bm.shape[2])
        inner = x.shape[2:]
        strides = [n, k_out * n]
        for i in range(len(inner)):  # the contiguous strides of the inner dims
            strides.append(math.prod(inner[i + 1 :]))
        out = torch.empty_strided((k_out, b, *inner), strides, dtype=x.dtype, device=x.device)
        torch.bmm(weight.t().expand(b, k_out, bm.shape[1]), bm, out=out.transpose(0, 1).view(b, k_out, n))
        ctx.save_for_backward(x, weight)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        b = x.shape[1]
        g = grad.transpose(0, 1).reshape(b, grad.shape[0], -1)  # (B, K_out, N): a view when grad is batch-major
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = torch.bmm(weight.expand(b, *weight.shape), g).view(b, x.shape[0], *x.shape[2:]).transpose(0, 1)
        if ctx.needs_input_grad[1]:
            bm = x.transpose(0, 1).reshape(b, x.shape[0], -1)
            gw = torch.bmm(bm, g.transpose(1, 2)).sum(0)  # (K_in, K_out)
        return gx, gw


class _Split(torch.autograd.Function):
    """``z.split(widths)`` (dim 0) into tensors autograd treats as z's outputs rather than views of it, so each may
    take its piece's other terms and the activation in place (views of a multi-output split may not): no
    full-size sum allocated per piece. Safe because z is a fresh matmul product nothing else reads; the gradient
    is the same one concatenation as split's."""

    @staticmethod
    def forward(ctx, z: Tensor, widths: tuple[int, ...]) -> tuple[Tensor, ...]:  # type: ignore[override]
        return tuple(torch.ops.aten._unsafe_view(c, c.shape) for c in z.split(widths))

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor, None]:  # type: ignore[override]
        return torch.cat(grads), None  # type: ignore[arg-type]


def _fold_sums(x: Tensor, nt: tuple[int, ...], steps: tuple) -> dict[tuple[int, ...], Tensor]:
    """A folded group input (F*K, B, *sig) as ``(*nt, K, M)`` and its sums over the folded axes not in each needed
    set S (kept as size-1 dims), keyed by S; each sum from its smallest parent (``_sum_plan``)."""
    full = tuple(range(len(nt)))
    flat = x.flatten(1)
    out = {full: flat.reshape(*nt, -1, flat.shape[1])}
    for s, parent, axis in steps:
        out[s] = out[parent].sum(dim=axis, keepdim=True)
    return out


def _fold_output(common: Tensor, fo: _FoldOutput, sums: list[dict[tuple[int, ...], Tensor]], counts: list[int],
                 weights: Mapping[str, Tensor], scales: dict | None) -> Tensor:
    """One folded output (F*K_out, B, *sig): its all-mean block ``common`` (K_out, B, *sig) broadcast over its folded
    axes plus, per part, one matmul (batched over the kept positions) on its inputs' sums, broadcast over the rest;
    each part added in place into the smallest part that keeps all its axes."""
    k, shape = common.shape[0], common.shape[1:]
    flat = common.flatten(1)
    m = flat.shape[1]
    vals = [flat.reshape(*[1] * len(fo.nt), k, m)]
    for part in fo.parts:
        xs = [sums[c][part.axes] for c in part.inputs]
        x = xs[0] if len(xs) == 1 else torch.cat(xs, dim=-2)
        weight = weights[part.weight]  # (len(inputs) * K_in, K_out)
        scale = _row_scale([counts[c] * part.drop for c in part.inputs],
                           [weight.shape[0] // len(part.inputs)] * len(part.inputs), weight, scales)
        if scale is not None:  # sums -> means: scale the small weight, not the input
            weight = weight * (scale if isinstance(scale, float) else scale.view(-1, 1))
        if part.kept == 1:
            y = torch.mm(weight.t(), x.reshape(-1, m))
        else:  # one matmul per kept position, the weight shared (a stride-0 batch)
            y = torch.bmm(weight.t().unsqueeze(0).expand(part.kept, k, weight.shape[0]),
                          x.reshape(part.kept, weight.shape[0], m))
        vals.append(torch.ops.aten._unsafe_view(y, (*x.shape[:-2], k, m)))
    y, _ = _sum_tree(vals, [False] + [True] * len(fo.parts), fo.order, fo.parent)  # the parts are ours; common not
    if y.shape[:-2] != fo.nt:  # no part keeps every folded axis: materialize the broadcast
        y = y.expand(*fo.nt, k, m).contiguous()
    return torch.ops.aten._unsafe_view(y, (fo.fold * k, *shape))


def _run(plan: _ForwardPlan, h: list[Tensor], weights: Mapping[str, Tensor], bias: Tensor | None,
         act: Callable[[Tensor], Tensor] | None = None, act_: Callable[[Tensor], Tensor] | None = None,
         scales: dict | None = None, folded: tuple[_FoldGroup, ...] | None = None) -> list[Tensor]:
    """One layer application on channel-major pieces ``h`` (K, B, *dims), with mixing ``weights`` per group key.

    Channels outermost throughout: every read of a contiguous piece is contiguous, so a group's input is a view (or
    one concatenation) of shape (sum K_in, B*N) for its one matmul, and its output (sum K_out, B, *sig) splits into
    contiguous row blocks per output. A piece may instead be batch-major in memory (``_batch_major``: the public
    dict's large pieces, not copied); its group's product is then batch-major too (``_BatchMajorMatmul``). With
    ``folded`` (one plan per group, ``_Folded``), each group is computed by its folded structure instead, with the
    weights and bias named there."""
    reads, counts = _compute_reads(h, plan.steps, plan.read_order)
    # _PermutedCopy, _Split and _AddToDiagonals serve eager autograd; traced (torch.compile) or functorch-transformed
    # (vmap, grad: the learned optimizers) calls take the plain ops, as before them. _BatchMajorMatmul is traced too;
    # functorch-transformed calls never see batch-major pieces (UNFLinear.forward_internal copies them there)
    transformed = torch._C._are_functorch_transforms_active()
    eager = not (torch.compiler.is_compiling() or transformed)
    terms: list[Tensor | None] = [None] * plan.num_outputs  # the terms, then each piece's placed diagonal sums
    owned = [False] * plan.num_outputs  # made here, referenced nowhere else: may be added into in place
    for gi, (key, ins, outs, widths) in enumerate(plan.groups):
        # permuted inputs (a tied matrix transposed) are copied first: cat's strided path is ~2x slower than both
        xs = [_PermutedCopy.apply(reads[r], perm) if eager and perm != tuple(range(len(perm)))
              and reads[r].is_contiguous() else reads[r].permute(perm) for r, perm in ins]  # type: ignore[union-attr]
        xcounts = rcounts = [counts[r] for r, _ in ins]
        fg = folded[gi] if folded is not None else None
        if fg is not None and fg.dense is not None:  # a folded group computed densely
            fg, weight, b = None, weights[fg.dense], weights[fg.bias] if fg.bias is not None else None
        elif fg is not None:  # the group's all-mean terms: one matmul on the inputs' sums over their folded axes
            sums = [_fold_sums(x, nt, steps) for x, nt, steps in zip(xs, fg.nt, fg.sums)]
            xcounts = [n * f for n, f in zip(rcounts, fg.folds)]
            xs = [s[()].reshape(-1, *x.shape[1:]) for s, x in zip(sums, xs)]
            weight, b = weights[fg.common], weights[fg.bias] if fg.bias is not None else None
            widths = tuple(weight.shape[1] // len(widths) for _ in widths)
        else:
            weight, b = weights[key], bias  # (sum K_in, sum K_out)
        if len(xs) > 1 and any(c != 1 for c in xcounts):
            rows = [x.shape[0] for x in xs]
            if 4 * sum(r for r, c in zip(rows, xcounts) if c != 1) <= sum(rows):  # few rows to scale: scale those
                xs = [x * (1.0 / c) if c != 1 else x for x, c in zip(xs, xcounts)]  # inputs, not a whole operand
                xcounts = [1] * len(xs)
        if len(xs) == 1:
            cat = xs[0]
        elif all(_batch_major(x) for x in xs):  # batch-major pieces are concatenated batch-major
            cat = torch.cat([x.transpose(0, 1) for x in xs], dim=1).transpose(0, 1)
        elif 2 * sum(x.shape[0] for x in xs if _channels_last(x)) >= sum(x.shape[0] for x in xs):
            # mostly channels-last pieces: concatenated channels-last (the small others copied into that layout)
            cat = torch.cat([x.movedim(0, -1) for x in xs], dim=-1).movedim(-1, 0)
        else:
            cat = torch.cat([x.contiguous() for x in xs], dim=0)
        scale = _row_scale(xcounts, [x.shape[0] for x in xs], cat, scales)  # sums -> means
        if scale is not None and weight.numel() < cat.numel():  # scale the smaller operand's rows
            weight = weight * (scale if isinstance(scale, float) else scale.view(-1, 1))
        elif scale is not None:
            cat = cat * (scale if isinstance(scale, float) else scale.view(-1, *[1] * (cat.dim() - 1)))
        if cat.dim() == 2 and b is not None:
            z = torch.addmm(b.unsqueeze(1), weight.t(), cat)  # (sum K_out, B)
        elif cat.dim() == 2:
            z = torch.mm(weight.t(), cat)
        elif _batch_major(cat) and not transformed:
            z = _BatchMajorMatmul.apply(cat, weight)  # (sum K_out, B, *dims), batch-major in memory
        else:
            z = torch.mm(weight.t(), cat.reshape(cat.shape[0], -1))
            # the product is a temporary of ours: reshaped as a tensor of its own (not an autograd view), a term
            # that is all of it can take the other terms in place (no full-size sum allocated per piece)
            z = torch.ops.aten._unsafe_view(z, (weight.shape[1], *cat.shape[1:]))
        # split, not slices: its backward is one concatenation, not a zero-filled z-sized gradient per output; a
        # full-size product's parts are split as tensors of their own, which take the other terms in place
        # (worth its overhead when such a part is large)
        plain = [w for w, (_, _, wp) in zip(widths, outs) if not wp.perm and not wp.index]  # parts kept as they are
        own = len(widths) == 1 or eager and bool(plain) and max(plain) * (z.numel() // z.shape[0]) >= 1 << 16
        chunks = (z,) if len(widths) == 1 else _Split.apply(z, tuple(widths)) if own else z.split(widths)
        for oi, ((t, piece, wplan), chunk) in enumerate(zip(outs, chunks)):
            mine = own
            fo = fg.outputs[oi] if fg is not None else None
            if fo is not None:  # a folded output: its common block broadcast, plus its parts (a fresh tensor)
                chunk = _fold_output(chunk, fo, sums, rcounts, weights, scales)  # type: ignore[union-attr]
                mine = True
            terms[t] = _place(chunk, wplan)  # diagonal blocks are placed per pattern, after summing
            owned[t] = mine and not wplan.perm and not wplan.index
    out = []
    for pi, (diag, (ids, order, parent)) in enumerate(plan.merges):
        y, own = _sum_tree([terms[t] for t in ids], [owned[t] for t in ids], order, parent) if ids else (None, False)
        for d, members, m_order, m_parent in diag:
            compact, _ = _sum_tree([terms[t] for t in members], [False] * len(members), m_order, m_parent)
            full = (compact.shape[0], compact.shape[1], *h[pi].shape[2:])
            if y is None:
                y, own = compact.new_zeros(full), True
            elif not own or y.shape != full:  # a tensor of our own, full size, to add the diagonals into
                y, own = y.expand(full).clone(memory_format=torch.contiguous_format), True
            if eager:
                y = _AddToDiagonals.apply(y, compact, d)
            else:
                _add_to_diagonals_(y, compact, d)
        out.append(act_(y) if act_ is not None and own else act(y) if act is not None else y)
    return out  # type: ignore[return-value]



class UNFLinear(nn.Module):
    """Maximal permutation-equivariant linear layer on a weight space: ``{name: (B, C_in, *shape)}`` -> ``C_out``.

    ``num_terms`` counts the basis terms between tensor pairs (prod of Bell numbers per pair and part); each term has
    its own ``(C_in*fold_in, C_out*fold_out)`` mixing block, and every output also gets an equivariant bias.
    """

    _fold_structured: bool | None = None  # folded groups: by their structure (True), dense (False), cheaper (None)

    def __init__(self, spec: WeightSpec, in_channels: int, out_channels: int, fixed_axes: FixedAxes = "exact",
                 pos_embed: bool = False) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise SpecError(f"UNFLinear needs positive channels, got {in_channels} -> {out_channels}")
        if pos_embed and fixed_axes != "permutable":
            raise SpecError("pos_embed=True only applies to fixed_axes='permutable' (exact mode needs no embedding)")
        self.spec = spec
        self.in_channels, self.out_channels = in_channels, out_channels
        self.fixed_axes = fixed_axes
        self._layout = _Layout(spec, fixed_axes)
        pieces = self._layout.pieces
        self._reads, self._groups, fan_in = _plan(pieces, in_channels, out_channels)
        self.mix = nn.ParameterDict()
        for g in self._groups:
            rows = sum(in_channels * pieces[self._reads[c.read][0]].fold for c in g.contributions)
            weight = torch.empty(rows, sum(o.width for o in g.outputs))
            col = 0
            for o in g.outputs:  # uniform(+-1/sqrt(fan_in)) per output piece, as nn.Linear does
                bound = 1.0 / math.sqrt(fan_in[o.piece])
                nn.init.uniform_(weight[:, col : col + o.width], -bound, bound)
                col += o.width
            self.mix[_key(g.signature)] = nn.Parameter(weight)
        const = [g for g in self._groups if not g.signature]
        bias = torch.empty(sum(o.width for o in const[0].outputs) if const else 0)
        col = 0
        for o in const[0].outputs if const else ():
            bound = 1.0 / math.sqrt(fan_in[o.piece])
            nn.init.uniform_(bias[col : col + o.width], -bound, bound)
            col += o.width
        self.bias = nn.Parameter(bias)
        self.pos_embed = nn.ParameterDict()
        if pos_embed:
            for i, p in enumerate(pieces):
                shape = [spec.sizes[a] if spec.is_fixed(a) else 1 for a in p.axes]
                if any(n > 1 for n in shape):
                    self.pos_embed[str(i)] = nn.Parameter(torch.randn(in_channels, *shape) * 0.1)
        self.num_terms = sum(num_pair_terms(po.labels, pi.labels) for po in pieces for pi in pieces)
        folded = _fold_labels(spec, pieces)
        self._folded = _Folded(spec, pieces, self._reads, self._groups, folded, in_channels, out_channels,
                               self._fold_structured) if folded else None
        if self._folded is None:
            self._fwd = _forward_plan(pieces, self._reads, self._groups, spec.sizes)
        else:  # computed on the folded pieces; its constants are buffers (they follow .to()), not state
            self._fwd = _forward_plan(self._folded.pieces, self._folded.reads, self._folded.groups, spec.sizes)
            for name, value in self._folded.buffers().items():
                self.register_buffer(name, value, persistent=False)
        self._embedded = tuple((i, str(i)) for i in range(len(pieces)) if str(i) in self.pos_embed)
        self._scales: dict = {}  # the 1/count row scales of the groups' inputs, per sizes (see _row_scale)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}->{self.out_channels}, fixed_axes={self.fixed_axes!r}, "
                f"num_terms={self.num_terms}, groups={len(self._groups)}, matmuls={len(self._fwd.groups)}")

    def forward(self, x: Mapping[str, Tensor]) -> dict[str, Tensor]:
        sizes = self._layout.sizes(x, batch_dims=2)
        h = self._layout.to_internal(x, sizes)
        return self._layout.from_internal(self.forward_internal(h), sizes, self.out_channels, x)

    def forward_internal(self, h: list[Tensor], act: Callable[[Tensor], Tensor] | None = None,
                         act_: Callable[[Tensor], Tensor] | None = None, channel_major: bool = False
                         ) -> list[Tensor]:
        """Pieces ``(B, K, *perm_dims)`` in and out (used by UNFPredictor to skip layout changes). ``act`` (e.g. a
        pointwise nonlinearity) is applied to every output piece, as its in-place form ``act_`` where that piece is
        a fresh tensor of the layer's own (no second full-size tensor per piece). ``channel_major``: return the
        contiguous ``(K_out, B, *perm_dims)`` pieces themselves where the layer computes them so (not ``folds``)."""
        if self._embedded:
            h = list(h)
            for i, key in self._embedded:
                h[i] = h[i] + self.pos_embed[key]
        if torch._C._are_functorch_transforms_active():
            return self._forward_work(self._work_layout(h), act, act_, channel_major)
        if self._folded is None:
            # large contiguous (B, K, ...) pieces are computed batch-major as they are (no layout copy in or out);
            # small ones are cheaper to copy than to run as a matmul per batch member
            # (and channels-last ones, as to_internal makes them)
            h = [t.transpose(0, 1) if t.numel() >= _BATCH_MAJOR_MIN and (t.is_contiguous()
                 or _channels_last(t.transpose(0, 1))) else t.transpose(0, 1).contiguous() for t in h]
            return self._forward_work(h, act, act_, channel_major)
        # folded: large pieces batch-major too (folding is a copy either way) unless a group is computed by its
        # structure, whose sums and matmuls over the folded axes take channel-major pieces
        return self._forward_work(self._folded.fold(h, None if self._folded.structured else _BATCH_MAJOR_MIN),
                                  act, act_, channel_major)

    @property
    def channel_major(self) -> bool:
        """Whether the layer computes on contiguous channel-major pieces ``(K, B, *perm_dims)`` (its ``enter``-ed
        layout, also what it returns with ``channel_major=True``): no folded axes, no positional embedding."""
        return self._folded is None and not self._embedded

    def enter(self, h: list[Tensor]) -> list[Tensor]:
        """Pieces ``(B, K, *perm_dims)`` -> the layout ``forward_entered`` takes, batch on dim 1 (channel-major, or
        folded). Parameter-free, so constant inputs (a training set) are entered once and batches are taken from
        them with ``index_select(1, ...)`` instead of paying the layout copy every step."""
        if self._embedded:  # the embedding is learned: added per call, before the working layout
            return [t.transpose(0, 1).contiguous() for t in h]
        return self._work_layout(h)

    def forward_entered(self, h: list[Tensor], act: Callable[[Tensor], Tensor] | None = None,
                        act_: Callable[[Tensor], Tensor] | None = None, channel_major: bool = False
                        ) -> list[Tensor]:
        """``forward_internal`` on pieces already ``enter``-ed (or returned channel-major by the layer before)."""
        if self._embedded:
            return self.forward_internal([t.transpose(0, 1) for t in h], act, act_, channel_major)
        return self._forward_work(h, act, act_, channel_major)

    def _work_layout(self, h: list[Tensor]) -> list[Tensor]:
        if self._folded is None:  # channel-major (K, B, *dims): free when the input already is (a layer's output)
            return [t.transpose(0, 1).contiguous() for t in h]
        return self._folded.fold(h)

    def _forward_work(self, h: list[Tensor], act: Callable[[Tensor], Tensor] | None,
                      act_: Callable[[Tensor], Tensor] | None, channel_major: bool = False) -> list[Tensor]:
        if self._folded is None:
            out = _run(self._fwd, h, self.mix, self.bias, act, act_, self._scales)
            return [t.contiguous() for t in out] if channel_major else [t.transpose(0, 1) for t in out]
        f = self._folded
        out = _run(self._fwd, h, f.weights(self), None, act, act_, self._scales, f.plan)
        return f.unfold(out, self.out_channels)


class UNFPool(nn.Module):
    """Invariant pooling: per piece, means over permutable axes -> ``(B, num_features)``.

    ``mode="maximal"`` adds the diagonal means of tied labels (every invariant linear map); ``"mean"`` only the
    plain mean. Fixed axes are kept as features in exact mode.
    """

    def __init__(self, spec: WeightSpec, channels: int, fixed_axes: FixedAxes = "exact",
                 mode: Literal["maximal", "mean"] = "maximal") -> None:
        super().__init__()
        if mode not in ("maximal", "mean"):
            raise SpecError(f"UNFPool mode must be 'maximal' or 'mean', got {mode!r}")
        self.spec, self.channels, self.fixed_axes, self.mode = spec, channels, fixed_axes, mode
        self._layout = _Layout(spec, fixed_axes)
        pieces = self._layout.pieces
        every = [(pi, r) for pi, p in enumerate(pieces) for r in reads(p.labels)]
        self._features = tuple(i for i, (_, r) in enumerate(every)
                               if not r.kept and (mode == "maximal" or all(len(b) == 1 for b in r.blocks)))
        self._reads = [every[i] for i in self._features]
        self._steps = _read_steps(pieces, every, spec.sizes)
        self._read_order = _read_order(self._steps, set(self._features))
        self.num_features = sum(channels * pieces[pi].fold for pi, _ in self._reads)
        self._scales: dict = {}  # 1/count per feature, per sizes (see _row_scale)

    def forward(self, x: Mapping[str, Tensor]) -> Tensor:
        sizes = self._layout.sizes(x, batch_dims=2)
        return self.forward_internal(self._layout.to_internal(x, sizes))

    def forward_internal(self, h: list[Tensor], channel_major: bool = False) -> Tensor:
        """Pieces ``(B, K, *perm_dims)`` (or, with ``channel_major``, ``(K, B, *perm_dims)``) -> features."""
        # a channel-major piece (a layer's output, seen as a (B, K, ...) view) is reduced as (K, B, ...): contiguous
        # reductions, and their gradients are written channel-major too; the small (K, B) results are transposed
        if channel_major:
            flip = [True] * len(h)
        else:
            flip = [t.dim() > 2 and not t.is_contiguous() and t.transpose(0, 1).is_contiguous() for t in h]
            h = [t.transpose(0, 1) if f else t for t, f in zip(h, flip)]
        reads, counts = _compute_reads(h, self._steps, self._read_order)
        feats = [reads[i].t() if flip[pi] else reads[i] for i, (pi, _) in zip(self._features, self._reads)]
        out = torch.cat(feats, dim=-1)  # type: ignore[arg-type]  # (B, num_features) sums
        scale = _row_scale([counts[i] for i in self._features], [f.shape[-1] for f in feats], out,  # type: ignore
                           self._scales)
        return out if scale is None else out * scale  # means
