"""The `cnn` member architecture evaluated for a whole chunk of members at once, without vmap.

`train_population` trains a chunk of members whose parameters are stacked along a leading member axis. For the CNN,
vmapping the single-member module spends most of its time in layout copies and tiny products, so this module runs
the same network directly on stacked tensors (k members, each with its own batch of B samples) with batched matrix
products; autograd of the summed member losses then gives every member its own gradient (members share nothing).

Each convolution is one of three plain batched products:
- patches (the first layer, whose input is data and needs no gradient): the im2col patches of the inputs, gathered
  with one precomputed index, times the (C*kh*kw, O) kernel: one bmm with no wasted multiply-adds and a backward
  that is one small bmm. Its output is channels-last, (k, B, Ho*Wo*O), which the next layer reads as it is (its
  dense matrix's rows are ordered to match; dropout hashes each element's index in the module's (O, Ho, Wo) order);
- dense (small images, the zoo's 8x8 ones): the kernel is gathered into the layer's (C*H*W, O*Ho*Wo) matrix and
  x (k, B, C*H*W) @ that matrix is one bmm; the backward forms that matrix's gradient with one bmm and sums each
  kernel entry's copies with a gather (no scatter-add);
- unfold (larger images): im2col patches (F.unfold; its backward is F.fold) times the (O, C*kh*kw) kernel, one bmm.

Activations, counter-based dropout (the same keep masks as `MemberDropout` computes per member, bit for bit), global
average pooling and the linear head follow `CNNMember.forward`; results equal the vmapped module's up to float
rounding. With relu, bias, dropout and activation run in place on the product's output (no new buffers: on a CPU,
fresh multi-MiB tensors cost more than the arithmetic). `evaluator` serves eval mode on inputs shared by all members:
the dense matrices are built once and the first layer multiplies the shared patches by each member's kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.zoo.members import _GOLDEN, _M31, _mix32, make_activation

__all__ = ["BatchedCNN", "batched_counter_keep"]

_DENSE_RATIO = 8  # dense when the dense matrix costs at most this many times the convolution's multiply-adds
_DENSE_MAX = 1 << 20  # ... and has at most this many entries per member (4 MiB in float32)
_SIGN = -(1 << 31)
_EVAL_ELEMENTS = 1 << 20  # activation elements per evaluation call (measured: 2^19-2^21 about even)
_EVAL_MATRICES = 1 << 20  # dense-matrix entries of the members evaluated together (4 MiB in float32)
_STEP_MATRICES = 1 << 21  # dense-matrix entries of the members trained together in one step (CPU)
_PATCH_TABLE_MAX = 64 << 20  # bytes: a training set's first-layer patches kept for the whole run (digits: 0.8 MiB)
_BLOCK = 1 << 17  # elements per thread per block of the dropout noise (2 int32 buffers of 512 KiB: a core's L2 cache)


class _DenseConv(torch.autograd.Function):
    """out (k, B, O*L) = bias + h (k, B, C*H*W) @ D(w), D the layer's dense matrix gathered from the flat kernels
    w (k, O*C*K) through `fwd` (w zero-padded by one slot). Backward: dh = dout @ D^T, dD = h^T @ dout (one bmm
    each) and dw = the sum of dD over each kernel entry's copies, gathered through `copies` (L, O*C*K) (positions in
    D, or one past its end where a copy falls on the padding: dD is written with a zero after it), not scattered."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, plan: _ConvPlan) -> torch.Tensor:
        dense = _dense_matrix(w, plan)  # (k, C*H*W, O*L)
        out = torch.bmm(h, dense)
        out += bias.repeat_interleave(plan.ho * plan.wo, dim=1)[:, None, :]
        ctx.save_for_backward(h, dense)
        ctx.plan = plan
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, dense = ctx.saved_tensors
        plan = ctx.plan
        k = h.shape[0]
        grad_h = torch.bmm(grad, dense.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        rows, cols = h.shape[2], grad.shape[2]
        grad_dense = h.new_empty(k, rows * cols + 1)  # (k, C*H*W*O*L + 1): dD, then the zero the padding reads
        grad_dense[:, -1] = 0  # (saves masking the gathered copies: ~1 ms a step of 256 members)
        torch.bmm(h.transpose(1, 2), grad, out=grad_dense[:, :-1].view(k, rows, cols))  # BLAS takes h^T as is
        copies = grad_dense.index_select(1, plan.copies.view(-1)).view(k, *plan.copies.shape)  # (k, L, O*C*K)
        grad_w = copies.sum(1)  # over the output positions: a reduction over a short last dim is ~6x slower on a
        # CPU than this one over a middle dim
        grad_b = grad.sum(1).view(k, plan.c_out, -1).sum(-1)  # the batch first: a middle-dim reduction
        return grad_h, grad_w, grad_b, None


def _dense_matrix(w: torch.Tensor, plan: _ConvPlan) -> torch.Tensor:
    """The dense (k, C*H*W, O*L) matrices of flat kernels w (k, O*C*K)."""
    return F.pad(w, (0, 1)).index_select(1, plan.fwd).view(len(w), -1, plan.c_out * plan.ho * plan.wo)


@dataclass(frozen=True)
class _ConvPlan:
    c_in: int
    c_out: int
    h: int
    w: int
    ho: int
    wo: int
    kind: str  # "patches" (first layer, output channels-last), "dense" or "unfold"
    in_last: bool = False  # the input is channels-last, (H*W, C) per sample: the patches layer's output
    pixels: torch.Tensor | None = None  # patches: (L*C*K,) positions in the zero-padded flat input (C*H*W + 1)
    fwd: torch.Tensor | None = None  # dense: gather index into the padded flat kernel (C*H*W*O*L,)
    copies: torch.Tensor | None = None  # dense: (L, O*C*K) positions in D of each kernel entry's copies (D's size
    # where that copy falls on the padding)


def _taps(h: int, w: int, k: tuple[int, int], s: tuple[int, int], p: tuple[int, int]
          ) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """For each kernel tap (i, j) and output position l: whether it reads inside the image, and which pixel
    (K, L) each; and the output size."""
    (kh, kw), (sh, sw), (ph, pw) = k, s, p
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    rows = torch.arange(ho)[None, None, :, None] * sh + torch.arange(kh)[:, None, None, None] - ph  # (kh, 1, Ho, 1)
    cols = torch.arange(wo)[None, None, None, :] * sw + torch.arange(kw)[None, :, None, None] - pw  # (1, kw, 1, Wo)
    inside = ((rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)).reshape(kh * kw, ho * wo)  # (K, L)
    pixel = (rows * w + cols).reshape(kh * kw, ho * wo)  # (K, L) where inside
    return inside, pixel, ho, wo


def _patch_indices(c_in: int, h: int, w: int, k: tuple[int, int], s: tuple[int, int], p: tuple[int, int],
                   device: torch.device) -> torch.Tensor:
    """im2col as one gather: (L*C*K,) positions in a flat (C*H*W) input zero-padded by one slot, entry (l, c, tap)
    the pixel tap (i, j) of output position l reads in channel c (the padding slot where it falls outside)."""
    inside, pixel, _, _ = _taps(h, w, k, s, p)
    c = torch.arange(c_in)[None, :, None]  # (1, C, 1)
    pos = torch.where(inside.t()[:, None, :], c * (h * w) + pixel.t()[:, None, :], c_in * h * w)  # (L, C, K)
    return pos.reshape(-1).to(device)


def _dense_indices(
    c_in: int, c_out: int, h: int, w: int, k: tuple[int, int], s: tuple[int, int], p: tuple[int, int],
    device: torch.device, in_last: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index maps between a kernel (O, C, kh, kw) and the layer's dense matrix D (C*H*W, O*L), D[(c, pix), (o, l)] =
    kernel[o, c, i, j] where output position l reads pixel pix through tap (i, j), else 0; rows (pix, c) instead
    when `in_last` (a channels-last input). Returns the gather of D from the zero-padded flat kernel, and each kernel
    entry's positions in D (L, O*C*K) (D's size where the copy falls on the padding)."""
    inside, pixel, ho, wo = _taps(h, w, k, s, p)
    kk, hw, big_l = k[0] * k[1], h * w, ho * wo
    n_kernel = c_out * c_in * kk
    # tap[pix, l]: the tap reading pixel pix at output l, or kk (none); stride >= 1 means at most one tap per pair
    tap = torch.full((hw, big_l), kk, dtype=torch.int64)
    tap_of = torch.arange(kk)[:, None].expand(kk, big_l)
    lpos = torch.arange(big_l)[None, :].expand(kk, big_l)
    tap[pixel[inside], lpos[inside]] = tap_of[inside]
    o, c = torch.arange(c_out), torch.arange(c_in)
    # padded flat kernel: entry (o, c, tap) at (o * C + c) * K + tap; "none" -> n_kernel (the zero slot)
    entry = (o[None, None, :, None] * c_in + c[:, None, None, None]) * kk + tap[None, :, None, :]  # (C, HW, O, L)
    fwd = torch.where(tap[None, :, None, :] < kk, entry, n_kernel)
    fwd = (fwd.transpose(0, 1) if in_last else fwd).reshape(-1)  # rows (pix, c) or (c, pix)
    # copies of kernel entry (o, c, tap): dense positions (row(c, pixel[tap, l]) * O + o) * L + l, l inside, else
    # one past D (a zero there)
    c4, pix4 = c[None, :, None, None], pixel[None, None]
    row = pix4 * c_in + c4 if in_last else c4 * hw + pix4
    pos = (row * c_out + o[:, None, None, None]) * big_l + lpos[None, None]
    valid = inside[None, None].expand(c_out, c_in, kk, big_l)
    copies = torch.where(valid, pos, c_in * hw * c_out * big_l).reshape(n_kernel, big_l).t().contiguous()  # (L, O*C*K)
    return fwd.to(device), copies.to(device)


_BITS: dict[tuple[int, str, tuple[int, int] | None], torch.Tensor] = {}


def _index_hash(n: int, device: torch.device, channels_last: tuple[int, int] | None = None) -> torch.Tensor:
    """The key-independent part of the counter noise, cached per size, device and layout: i = index * golden
    (int32) after the hash's first xor-shift, i ^ (i >>> 16). That step distributes over the xor with the key's base
    (x >>> s = (i >>> s) ^ (base >>> s) for x = i ^ base), so it is done here once instead of every step. The index
    is arange(n), or with `channels_last` (C, L) each stored (l, c) element's index in (C, L) order."""
    hit = _BITS.get((n, str(device), channels_last))
    if hit is None:
        i = torch.arange(n, device=device, dtype=torch.int32)
        if channels_last is not None:
            i = i.view(-1, *channels_last).transpose(1, 2).reshape(-1)
        i = i * _GOLDEN
        hit = i ^ ((i >> 16) & 0xFFFF)
        _BITS[(n, str(device), channels_last)] = hit
    return hit


def batched_counter_keep(
    keys: torch.Tensor, salt: int, numel: int, rates: torch.Tensor, dtype: torch.dtype = torch.bool,
    channels_last: tuple[int, int] | None = None, scaled: bool = False,
) -> torch.Tensor:
    """Keep masks (k, numel) of `MemberDropout`'s counter noise for k members at once (bool, or 0/1 in a float
    `dtype`; with `scaled`, 0 or 1 / (1 - rates[i]) in it: the dropout's whole multiplier, so that applying it and
    its backward take one pass each): member i keeps element j iff the 24 bits `_counter_bits(keys[i], salt, ...)`
    at j are >= floor(rates[i] * 2^24); with `channels_last` (C, L), elements are stored (..., L, C) and each gets
    the bits of its index in the module's (..., C, L) order. Same bits, computed in
    place on blocks of members that fit in cache, and compared without the final shift (u >> 8 >= t  <=>  u >= t << 8
    on unsigned 32-bit u)."""
    if scaled and not dtype.is_floating_point:
        raise ValueError(f"scaled keep masks need a float dtype, not {dtype}")
    k = len(keys)
    base = _mix32(keys ^ (salt * 0x2545F491 & _M31))  # (k,)
    base = base ^ ((base >> 16) & 0xFFFF)  # its part of the hash's first xor-shift (see _index_hash)
    threshold = ((rates * float(1 << 24)).to(torch.int32).to(torch.int64) * 256 + _SIGN).to(torch.int32)  # (k,)
    index = _index_hash(numel, keys.device, channels_last)[None, :]
    out = torch.empty(k, numel, dtype=dtype, device=keys.device)
    scale = (1.0 - rates.to(dtype)).reciprocal()[:, None] if scaled else None  # (k, 1)
    # cache blocks matter on CPUs only; each thread takes its share of a block (measured, 2 threads: 0.77-0.95x the
    # time with blocks of one share; 1 thread: blocks of two shares took 1.15x)
    rows = max(1, _BLOCK * torch.get_num_threads() // numel) if keys.device.type == "cpu" else k
    x = torch.empty(min(k, rows), numel, dtype=torch.int32, device=keys.device)
    t = torch.empty_like(x)
    for r0 in range(0, k, rows):
        r1 = min(k, r0 + rows)
        xb, tb = x[: r1 - r0], t[: r1 - r0]
        torch.bitwise_xor(index, base[r0:r1, None], out=xb)  # = x ^ (x >>> 16) for x = index hash ^ key base
        xb *= 0x7FEB352D
        for shift, mask, mult in ((15, 0x1FFFF, 0x2C1B3C6D), (16, 0xFFFF, None)):
            torch.bitwise_right_shift(xb, shift, out=tb)
            tb &= mask
            xb ^= tb
            if mult is not None:
                xb *= mult
        xb ^= _SIGN  # unsigned order as signed int32
        torch.ge(xb, threshold[r0:r1, None], out=out[r0:r1])  # bool, or 0/1 written in `dtype` directly
        if scale is not None:
            out[r0:r1] *= scale[r0:r1]  # while the block is in cache
    return out


class BatchedCNN:
    """`CNNMember` (a resolved `cnn` arch) applied to k members at once: params keyed like its named_parameters with a
    leading member axis, x (k, B, C, H, W) -> logits (k, B, classes)."""

    def __init__(self, arch: Mapping[str, Any], input_shape: tuple[int, int, int], device: torch.device) -> None:
        c, h, w = input_shape
        k = (arch["kernel_size"],) * 2
        s, p = (arch["stride"],) * 2, (arch["padding"],) * 2
        self.kernel, self.stride, self.padding = k, s, p
        self.act = make_activation(arch["activation"])
        self.relu = arch["activation"] == "relu"
        self.plans: list[_ConvPlan] = []
        for i, c_out in enumerate(arch["channels"]):
            ho, wo = (h + 2 * p[0] - k[0]) // s[0] + 1, (w + 2 * p[1] - k[1]) // s[1] + 1
            in_last = i == 1  # the patches layer's output is channels-last
            if i == 0:
                pixels = _patch_indices(c, h, w, k, s, p, device)
                self.plans.append(_ConvPlan(c, c_out, h, w, ho, wo, "patches", pixels=pixels))
            elif h * w <= _DENSE_RATIO * k[0] * k[1] and c * h * w * c_out * ho * wo <= _DENSE_MAX:
                fwd, copies = _dense_indices(c, c_out, h, w, k, s, p, device, in_last)
                plan = _ConvPlan(c, c_out, h, w, ho, wo, "dense", in_last, fwd=fwd, copies=copies)
                self.plans.append(plan)
            else:
                self.plans.append(_ConvPlan(c, c_out, h, w, ho, wo, "unfold", in_last))
            c, h, w = c_out, ho, wo
        widest = max([input_shape[0] * input_shape[1] * input_shape[2]] + [q.c_out * q.ho * q.wo for q in self.plans])
        self.eval_rows = max(1, _EVAL_ELEMENTS // widest)  # members x samples per evaluation call
        # members evaluated together: their dense matrices stay in cache while every sample passes through them
        dense = sum(q.c_in * q.h * q.w * q.c_out * q.ho * q.wo for q in self.plans if q.kind == "dense")
        self.eval_members: int | None = max(1, _EVAL_MATRICES // dense) if dense else None
        # members trained together (CPU): their dense matrices and gradients, 8 MiB each for the zoo's CNN
        # (measured on 256 members, 1 and 2 threads: blocks of 128 took 0.89x / 0.94x the time of one of 256, and
        # 64 more than 128)
        self._step_members = max(1, _STEP_MATRICES // dense) if dense else None

    def step_members(self, batch: int) -> int | None:
        """Members per training step on a CPU (None: all of them at once); `batch` samples per member."""
        return self._step_members

    def _unfold_product(self, h: torch.Tensor, weight: torch.Tensor, plan: _ConvPlan) -> torch.Tensor:
        """im2col convolution without bias: h (k, B, C*H*W), or (k, B, H*W*C) when `plan.in_last`, and kernels
        `weight` (k, O, C, kh, kw) or flat -> (k, O, B*L), one bmm of each member's kernel matrix with its patches."""
        k, b = h.shape[:2]
        big_l = plan.ho * plan.wo
        if plan.in_last:
            images = h.reshape(k * b, plan.h, plan.w, plan.c_in).permute(0, 3, 1, 2)
        else:
            images = h.reshape(k * b, plan.c_in, plan.h, plan.w)
        patches = F.unfold(images, self.kernel, 1, self.padding, self.stride)
        patches = patches.view(k, b, -1, big_l).transpose(1, 2).reshape(k, patches.shape[1], b * big_l)
        return torch.bmm(weight.reshape(k, plan.c_out, -1), patches)

    @staticmethod
    def _patches(x: torch.Tensor, plan: _ConvPlan) -> torch.Tensor:
        """im2col patches (..., L*C*K) of flat inputs x (..., C*H*W): one gather from the zero-padded input, on a 2-d
        view (index_select along the last dim of a 3-d tensor took ~4x as long)."""
        flat = F.pad(x.reshape(-1, x.shape[-1]), (0, 1))
        return flat.index_select(1, plan.pixels).view(*x.shape[:-1], -1)

    def first_patches(self, images: torch.Tensor) -> torch.Tensor | None:
        """The first layer's im2col patches (N, L*C*K) of fixed images (N, C, H, W), to gather rows of per step
        (`__call__` takes them in place of the images: one row copy per sample instead of a gather per element), or
        None where they would take more than `_PATCH_TABLE_MAX` bytes."""
        if not self.fits_patch_table(len(images), images.element_size()):
            return None
        return self._patches(images.reshape(len(images), -1), self.plans[0])

    def fits_patch_table(self, images: int, element_size: int) -> bool:
        """Whether `first_patches` of that many images (of `element_size` bytes per entry) stays within its cap."""
        plan = self.plans[0]
        per_image = plan.ho * plan.wo * plan.c_in * self.kernel[0] * self.kernel[1]
        return images * per_image * element_size <= _PATCH_TABLE_MAX

    def __call__(
        self,
        params: Mapping[str, torch.Tensor],
        x: torch.Tensor,
        rates: torch.Tensor | None = None,
        keys: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of each member on its own batch x (k, B, C, H, W), or on those images' first-layer patches
        (k, B, L*C*K) (rows of `first_patches`); dropout (counter noise, rate `rates` (k,), int32 `keys` (k,)) when
        both are given (training), none otherwise."""
        k, b = x.shape[:2]
        h = x.reshape(k, b, -1)  # (k, B, C*H*W), or the patches (k, B, L*C*K)
        for i, plan in enumerate(self.plans):
            weight, bias = params[f"convs.{i}.weight"], params[f"convs.{i}.bias"]
            big_l = plan.ho * plan.wo
            if plan.kind == "patches":  # (k, B*L, C*K) @ (k, C*K, O) -> (k, B, L*O), channels-last; a fresh tensor
                patches = (h if x.dim() == 3 else self._patches(h, plan)).view(k, b * big_l, -1)
                kernel = weight.reshape(k, plan.c_out, -1).transpose(1, 2)
                out = torch.baddbmm(bias[:, None, :], patches, kernel)
                out = torch.ops.aten._unsafe_view(out, (k, b, -1))  # not an autograd view: in-place ops stay cheap
            elif plan.kind == "dense":  # (k, B, O*L), the Function's own output (not a view): in-place ops keep
                out = _DenseConv.apply(h, weight.reshape(k, -1), bias, plan)  # autograd cheap
            else:
                out = self._unfold_product(h, weight, plan)  # (k, O, B*L)
                out += bias[:, :, None]  # in place: bmm's backward needs its inputs, not its output
                out = out.view(k, plan.c_out, b, big_l).transpose(1, 2).reshape(k, b, -1)  # a fresh copy, no view
            keep = None
            if rates is not None and keys is not None:
                layout = (plan.c_out, big_l) if plan.kind == "patches" else None
                keep = batched_counter_keep(keys, i, b * out.shape[-1], rates, out.dtype, layout, scaled=True)
                keep = keep.view(k, b, -1)  # 0 or 1 / (1 - rate): the whole dropout multiplier
            if self.relu:  # relu(x) * m == relu(x * m) for m >= 0; in place, no new buffers
                h = (out if keep is None else out.mul_(keep)).relu_()
            else:
                h = self.act(out)
                h = h if keep is None else h * keep
        return self._head(params, h, k, b)

    def _head(self, params: Mapping[str, torch.Tensor], h: torch.Tensor, k: int, b: int) -> torch.Tensor:
        """Global average pooling of the last layer's output and the linear head: (k, B, classes)."""
        last = self.plans[-1]
        if last.kind == "patches":  # channels-last: (k, B, L, C)
            pooled = h.reshape(k, b, -1, last.c_out).mean(2)
        else:
            pooled = h.reshape(k, b, last.c_out, -1).mean(-1)  # (k, B, C_last)
        return torch.baddbmm(params["head.bias"][:, None, :], pooled, params["head.weight"].transpose(1, 2))

    @torch.no_grad()
    def evaluator(self, params: Mapping[str, torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """Eval-mode logits of all k members on shared inputs: f(x (B, C, H, W)) -> (k, B, classes). The dense
        matrices are built once; the first layer multiplies the shared patches (not copied per member) by each
        member's kernel."""
        k = params["head.bias"].shape[0]
        first = self.plans[0]
        kernels = params["convs.0.weight"].reshape(k, first.c_out, -1).transpose(1, 2)  # (k, C*K, O)
        first_bias = params["convs.0.bias"][:, None, :]  # (k, 1, O)
        act = (lambda t: t.relu_()) if self.relu else self.act  # in place on each product's fresh output
        layers = []
        for i, plan in enumerate(self.plans[1:], start=1):
            weight, bias = params[f"convs.{i}.weight"].reshape(k, -1), params[f"convs.{i}.bias"]
            dense = _dense_matrix(weight, plan) if plan.kind == "dense" else None
            layers.append((plan, weight, bias, dense, bias.repeat_interleave(plan.ho * plan.wo, dim=1)[:, None, :]))

        def forward(x: torch.Tensor) -> torch.Tensor:
            b, big_l = x.shape[0], first.ho * first.wo
            patches = self._patches(x.reshape(b, -1), first).view(b * big_l, -1)  # (B*L, C*K), shared
            # each member's product straight in its channels-last layout (k, B*L, O): half the time of one shared
            # product (B*L, k*O) permuted into it
            out = torch.baddbmm(first_bias, patches.expand(k, *patches.shape), kernels)
            h = act(out.view(k, b, -1))
            for plan, weight, bias, dense, wide_bias in layers:
                if dense is not None:
                    out = torch.baddbmm(wide_bias, h, dense)
                else:
                    out = self._unfold_product(h, weight, plan).view(k, plan.c_out, b, plan.ho * plan.wo)
                    out = (out.transpose(1, 2) + bias[:, None, :, None]).reshape(k, b, -1)
                h = act(out)
            return self._head(params, h, k, b)

        return forward
