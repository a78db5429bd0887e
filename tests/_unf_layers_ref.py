"""Frozen copy of the UNF layer before the speed work (grouped terms, batched bmm, per-call reads and writes), kept
only as the reference the optimized `unf_models.layers.UNFLinear` must match (same parameters, same outputs)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import permutations, product
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
    fixed axes must move in front of permutable ones)."""

    def __init__(self, spec: WeightSpec, fixed_axes: FixedAxes) -> None:
        self.spec = spec
        self.fixed_axes = fixed_axes
        self.pieces = _pieces(spec, fixed_axes)
        self._sizes_cache: dict[tuple, dict[str, int]] = {}

    def sizes(self, x: Mapping[str, Tensor], batch_dims: int) -> dict[str, int]:
        key = tuple(tuple(x[n].shape[batch_dims:]) if n in x else None for n in self.spec.names)
        sizes = self._sizes_cache.get(key)
        if sizes is None:
            sizes = self.spec.check(x, batch_dims=batch_dims)
            if len(self._sizes_cache) < 64:
                self._sizes_cache[key] = sizes
        return sizes

    def to_internal(self, x: Mapping[str, Tensor], sizes: Mapping[str, int], channel_dim: bool = True
                    ) -> list[Tensor]:
        out = []
        views: dict[str, list[Tensor]] = {}
        for p in self.pieces:
            if p.name not in views:
                views[p.name] = self.spec.split_parts(p.name, x[p.name], sizes, 2 if channel_dim else 1)
            v = views[p.name][p.part]  # (B, C, *view)
            if not channel_dim:
                v = v.unsqueeze(1)
            if p.fixed_pos:
                v = v.permute(0, 1, *(2 + a for a in p.fixed_pos), *(2 + a for a in p.perm_pos))  # (B, C, *fixed, *perm)
                v = v.reshape(v.shape[0], -1, *v.shape[2 + len(p.fixed_pos) :])  # (B, C*fold, *perm)
            out.append(v)
        return out

    def from_internal(self, pieces: list[Tensor], sizes: Mapping[str, int], channels: int) -> dict[str, Tensor]:
        parts: dict[str, list[Tensor]] = {}
        for p, y in zip(self.pieces, pieces):
            if p.fixed_pos:
                fixed_dims = [sizes[p.axes[a]] for a in p.fixed_pos]
                y = y.reshape(y.shape[0], channels, *fixed_dims, *y.shape[2:])  # (B, C, *fixed, *perm)
                order = [*p.fixed_pos, *p.perm_pos]  # view axis held by each of dims 2..
                y = y.permute(0, 1, *(2 + order.index(a) for a in range(len(order))))  # (B, C, *view)
            parts.setdefault(p.name, []).append(y)
        shapes = self.spec._shapes_at(sizes)
        return {name: self.spec.join_parts(name, parts[name], shapes[name], 2) for name in self.spec.names}


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
    count = math.prod(x.shape[2 + read.blocks[i][0]] for i in read.reduced)
    return y / count if count != 1 else y


def _delta(shape: list[int], block: tuple[int, ...], n: int, like: Tensor) -> Tensor:
    """1 where all axes of ``block`` carry equal indices, shaped to broadcast over ``shape`` (axes offset by 2)."""
    idx = torch.arange(n, device=like.device)
    d = torch.zeros((n,) * len(block), dtype=like.dtype, device=like.device)
    d[(idx,) * len(block)] = 1
    view = [1] * len(shape)
    for a in block:
        view[2 + a] = n
    return d.reshape(view)


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


class UNFLinear(nn.Module):
    """Maximal permutation-equivariant linear layer on a weight space: ``{name: (B, C_in, *shape)}`` -> ``C_out``.

    ``num_terms`` counts the basis terms between tensor pairs (prod of Bell numbers per pair and part); each term has
    its own ``(C_in*fold_in, C_out*fold_out)`` mixing block, and every output also gets an equivariant bias.
    """

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

    def extra_repr(self) -> str:
        return (f"{self.in_channels}->{self.out_channels}, fixed_axes={self.fixed_axes!r}, "
                f"num_terms={self.num_terms}, groups={len(self._groups)}")

    def forward(self, x: Mapping[str, Tensor]) -> dict[str, Tensor]:
        sizes = self._layout.sizes(x, batch_dims=2)
        h = self._layout.to_internal(x, sizes)
        return self._layout.from_internal(self.forward_internal(h), sizes, self.out_channels)

    def forward_internal(self, h: list[Tensor]) -> list[Tensor]:
        """Pieces ``(B, K, *perm_dims)`` in and out (used by UNFPredictor to skip layout changes)."""
        if self.pos_embed:
            h = [x + self.pos_embed[str(i)] if str(i) in self.pos_embed else x for i, x in enumerate(h)]
        computed = [_read(h[pi], r) for pi, r in self._reads]  # each (B, K_in, *kept)
        batch = h[0].shape[0]
        parts: list[list[Tensor]] = [[] for _ in h]
        for g in self._groups:
            ins = []
            for c in g.contributions:
                r = computed[c.read]
                if c.order != tuple(range(len(c.order))):
                    r = r.permute(0, 1, *(2 + i for i in c.order))
                ins.append(r)
            cat = ins[0] if len(ins) == 1 else torch.cat(ins, dim=1)  # (B, sum K_in, *sig_dims)
            weight = self.mix[_key(g.signature)]  # (sum K_in, sum K_out)
            if not g.signature:
                z = torch.addmm(self.bias, cat, weight)  # (B, sum K_out)
            else:
                sig_dims = cat.shape[2:]
                flat = cat.reshape(batch, cat.shape[1], -1)  # (B, sum K_in, N)
                z = torch.bmm(weight.t().unsqueeze(0).expand(batch, -1, -1), flat)  # (B, sum K_out, N)
                z = z.view(batch, z.shape[1], *sig_dims)  # (B, sum K_out, *sig_dims)
            col = 0
            for o in g.outputs:
                y = z[:, col : col + o.width]
                col += o.width
                parts[o.piece].append(self._write(y, o, h[o.piece]))
        return [_accumulate(p) for p in parts]

    @staticmethod
    def _write(z: Tensor, o: _Output, like: Tensor) -> Tensor:
        """Place z (B, W, *sorted_kept) into an output piece (B, W, *dims): broadcast / diagonal writes."""
        ndim = like.dim() - 2
        if not ndim:
            return z
        if o.to_pos != tuple(range(len(o.to_pos))):
            z = z.permute(0, 1, *(2 + i for i in o.to_pos))  # kept dims in positional order
        # a block's first axis carries its index (kept) or 1 (broadcast); its other axes are 1 until the delta
        index: list[object] = [slice(None), slice(None)]
        kept = set(o.write.kept)
        position = []
        for i, block in enumerate(o.write.blocks):
            index.append(slice(None) if i in kept else None)
            index.extend([None] * (len(block) - 1))
            position.extend(block)
        z = z[tuple(index)]  # (B, W, block-ordered dims...)
        if position != list(range(ndim)):
            z = z.permute(0, 1, *(2 + position.index(a) for a in range(ndim)))
        for block in o.write.blocks:
            if len(block) > 1:
                z = z * _delta(list(like.shape), block, like.shape[2 + block[0]], z)
        return z


def _accumulate(terms: list[Tensor]) -> Tensor:
    """Sum broadcastable terms smallest first, so low-rank terms meet before they are expanded to full size."""
    terms = sorted(terms, key=lambda t: t.numel())
    acc = terms[0]
    for t in terms[1:]:
        acc = acc + t
    return acc


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
        self._reads = []
        for pi, p in enumerate(self._layout.pieces):
            for r in reads(p.labels):
                if r.kept:
                    continue
                if mode == "mean" and any(len(b) > 1 for b in r.blocks):
                    continue
                self._reads.append((pi, r))
        self.num_features = sum(channels * self._layout.pieces[pi].fold for pi, _ in self._reads)

    def forward(self, x: Mapping[str, Tensor]) -> Tensor:
        sizes = self._layout.sizes(x, batch_dims=2)
        return self.forward_internal(self._layout.to_internal(x, sizes))

    def forward_internal(self, h: list[Tensor]) -> Tensor:
        return torch.cat([_read(h[pi], r) for pi, r in self._reads], dim=-1)  # (B, num_features)
