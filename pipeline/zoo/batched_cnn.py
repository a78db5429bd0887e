"""The `cnn` member architecture evaluated for a whole chunk of members at once, without vmap.

`train_population` trains a chunk of members whose parameters are stacked along a leading member axis. For the CNN,
vmapping the single-member module spends most of its time in layout copies and tiny products, so this module runs
the same network directly on stacked tensors (k members, each with its own batch of B samples) with batched matrix
products; autograd of the summed member losses then gives every member its own gradient (members share nothing).

Each convolution is one of two plain batched products:
- dense (small images, the zoo's 8x8 ones): the kernel is gathered into the layer's (C*H*W, O*Ho*Wo) matrix and
  x (k, B, C*H*W) @ that matrix is one bmm; the backward forms that matrix's gradient with one bmm and sums each
  kernel entry's copies with a gather (no scatter-add);
- unfold (larger images): im2col patches (F.unfold; its backward is F.fold) times the (O, C*kh*kw) kernel, one bmm.

Activations, counter-based dropout (the same keep masks as `MemberDropout` computes per member, bit for bit), global
average pooling and the linear head follow `CNNMember.forward`; results equal the vmapped module's up to float
rounding. With relu, bias, dropout and activation run in place on the product's output (no new buffers: on a CPU,
fresh multi-MiB tensors cost more than the arithmetic). `evaluator` serves eval mode on inputs shared by all members:
the dense matrices are built once and the first layer is one product for all members.
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
_EVAL_ELEMENTS = 1 << 19  # activation elements per evaluation call (small chunks stay in cache: fastest measured)
_BLOCK = 1 << 17  # elements per block of the dropout noise (2 int32 buffers of 512 KiB: in a core's L2 cache)


class _DenseConv(torch.autograd.Function):
    """out (k, B, O*L) = bias + h (k, B, C*H*W) @ D(w), D the layer's dense matrix gathered from the flat kernels
    w (k, O*C*K) through `fwd` (w zero-padded by one slot). Backward: dh = dout @ D^T, dD = h^T @ dout (one bmm
    each) and dw = the sum of dD over each kernel entry's copies, gathered through `copies` (L, O*C*K) (positions in
    D; `inside` (L, O*C*K) is 0 where a copy falls on the padding), not scattered."""

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
        grad_dense = torch.bmm(h.transpose(1, 2), grad).view(k, -1)  # (k, C*H*W*O*L); BLAS takes h^T as is
        copies = grad_dense.index_select(1, plan.copies.view(-1)).view(k, *plan.copies.shape)  # (k, L, O*C*K)
        grad_w = (copies * plan.inside).sum(1)  # over the output positions: a reduction over a short last dim is
        # ~6x slower on a CPU than this one over a middle dim
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
    dense: bool
    fwd: torch.Tensor | None = None  # dense: gather index into the padded flat kernel (C*H*W*O*L,)
    copies: torch.Tensor | None = None  # dense: (L, O*C*K) positions in D of each kernel entry's copies
    inside: torch.Tensor | None = None  # dense: (L, O*C*K) 1 where that copy exists, 0 where it falls on padding


def _dense_indices(
    c_in: int, c_out: int, h: int, w: int, k: tuple[int, int], s: tuple[int, int], p: tuple[int, int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """Index maps between a kernel (O, C, kh, kw) and the layer's dense matrix D (C*H*W, O*L), D[(c, pix), (o, l)] =
    kernel[o, c, i, j] where output position l reads pixel pix through tap (i, j), else 0."""
    (kh, kw), (sh, sw), (ph, pw) = k, s, p
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    kk, hw, big_l = kh * kw, h * w, ho * wo
    rows = torch.arange(ho)[None, None, :, None] * sh + torch.arange(kh)[:, None, None, None] - ph  # (kh, 1, Ho, 1)
    cols = torch.arange(wo)[None, None, None, :] * sw + torch.arange(kw)[None, :, None, None] - pw  # (1, kw, 1, Wo)
    inside = ((rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)).reshape(kk, big_l)  # (K, L)
    pixel = (rows * w + cols).reshape(kk, big_l)  # (K, L) where inside
    n_kernel = c_out * c_in * kk
    # tap[pix, l]: the tap reading pixel pix at output l, or kk (none); stride >= 1 means at most one tap per pair
    tap = torch.full((hw, big_l), kk, dtype=torch.int64)
    tap_of = torch.arange(kk)[:, None].expand(kk, big_l)
    lpos = torch.arange(big_l)[None, :].expand(kk, big_l)
    tap[pixel[inside], lpos[inside]] = tap_of[inside]
    o, c = torch.arange(c_out), torch.arange(c_in)
    # padded flat kernel: entry (o, c, tap) at (o * C + c) * K + tap; "none" -> n_kernel (the zero slot)
    entry = (o[None, None, :, None] * c_in + c[:, None, None, None]) * kk + tap[None, :, None, :]  # (C, HW, O, L)
    fwd = torch.where(tap[None, :, None, :] < kk, entry, n_kernel).reshape(-1)
    # copies of kernel entry (o, c, tap): dense positions ((c * HW + pixel[tap, l]) * O + o) * L + l, l inside
    pos = ((c[None, :, None, None] * hw + pixel[None, None]) * c_out + o[:, None, None, None]) * big_l + lpos[None, None]
    valid = inside[None, None].expand(c_out, c_in, kk, big_l)
    copies = torch.where(valid, pos, 0).reshape(n_kernel, big_l).t().contiguous()  # (L, O*C*K)
    inside = valid.reshape(n_kernel, big_l).t().contiguous()
    return fwd.to(device), copies.to(device), inside.to(device), ho, wo


_BITS: dict[tuple[int, str], torch.Tensor] = {}


def _index_hash(n: int, device: torch.device) -> torch.Tensor:
    """The key-independent part of the counter noise, cached per size and device: i = arange(n) * golden (int32)
    after the hash's first xor-shift, i ^ (i >>> 16). That step distributes over the xor with the key's base
    (x >>> s = (i >>> s) ^ (base >>> s) for x = i ^ base), so it is done here once instead of every step."""
    hit = _BITS.get((n, str(device)))
    if hit is None:
        i = torch.arange(n, device=device, dtype=torch.int32) * _GOLDEN
        hit = i ^ ((i >> 16) & 0xFFFF)
        _BITS[(n, str(device))] = hit
    return hit


def batched_counter_keep(
    keys: torch.Tensor, salt: int, numel: int, rates: torch.Tensor, dtype: torch.dtype = torch.bool
) -> torch.Tensor:
    """Keep masks (k, numel) of `MemberDropout`'s counter noise for k members at once (bool, or 0/1 in a float
    `dtype`): member i keeps element j iff the 24 bits `_counter_bits(keys[i], salt, ...)` at j are
    >= floor(rates[i] * 2^24). Same bits, computed in
    place on blocks of members that fit in cache, and compared without the final shift (u >> 8 >= t  <=>  u >= t << 8
    on unsigned 32-bit u)."""
    k = len(keys)
    base = _mix32(keys ^ (salt * 0x2545F491 & _M31))  # (k,)
    base = base ^ ((base >> 16) & 0xFFFF)  # its part of the hash's first xor-shift (see _index_hash)
    threshold = ((rates * float(1 << 24)).to(torch.int32).to(torch.int64) * 256 + _SIGN).to(torch.int32)  # (k,)
    index = _index_hash(numel, keys.device)[None, :]
    out = torch.empty(k, numel, dtype=dtype, device=keys.device)
    rows = max(1, _BLOCK // numel) if keys.device.type == "cpu" else k  # cache blocks matter on CPUs only
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
        for c_out in arch["channels"]:
            ho, wo = (h + 2 * p[0] - k[0]) // s[0] + 1, (w + 2 * p[1] - k[1]) // s[1] + 1
            if h * w <= _DENSE_RATIO * k[0] * k[1] and c * h * w * c_out * ho * wo <= _DENSE_MAX:
                fwd, copies, inside, ho, wo = _dense_indices(c, c_out, h, w, k, s, p, device)
                self.plans.append(_ConvPlan(c, c_out, h, w, ho, wo, True, fwd, copies, inside))
            else:
                self.plans.append(_ConvPlan(c, c_out, h, w, ho, wo, False))
            c, h, w = c_out, ho, wo
        widest = max([input_shape[0] * input_shape[1] * input_shape[2]] + [q.c_out * q.ho * q.wo for q in self.plans])
        self.eval_rows = max(1, _EVAL_ELEMENTS // widest)  # members x samples per evaluation call

    def _unfold_product(self, h: torch.Tensor, weight: torch.Tensor, plan: _ConvPlan) -> torch.Tensor:
        """im2col convolution without bias: h (k, B, C*H*W) and kernels `weight` (k, O, C, kh, kw) or flat ->
        (k, O, B*L), one bmm of each member's kernel matrix with its im2col patches."""
        k, b = h.shape[:2]
        big_l = plan.ho * plan.wo
        patches = F.unfold(h.reshape(k * b, plan.c_in, plan.h, plan.w), self.kernel, 1, self.padding, self.stride)
        patches = patches.view(k, b, -1, big_l).transpose(1, 2).reshape(k, patches.shape[1], b * big_l)
        return torch.bmm(weight.reshape(k, plan.c_out, -1), patches)

    def __call__(
        self,
        params: Mapping[str, torch.Tensor],
        x: torch.Tensor,
        rates: torch.Tensor | None = None,
        keys: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of each member on its own batch x (k, B, C, H, W); dropout (counter noise, rate `rates` (k,), int32
        `keys` (k,)) when both are given (training), none otherwise."""
        k, b = x.shape[:2]
        h = x.reshape(k, b, -1)  # (k, B, C*H*W)
        for i, plan in enumerate(self.plans):
            weight, bias = params[f"convs.{i}.weight"], params[f"convs.{i}.bias"]
            big_l = plan.ho * plan.wo
            if plan.dense:  # (k, B, O*L), the Function's own output (not a view): in-place ops keep autograd cheap
                out = _DenseConv.apply(h, weight.reshape(k, -1), bias, plan)
            else:
                out = self._unfold_product(h, weight, plan)  # (k, O, B*L)
                out += bias[:, :, None]  # in place: bmm's backward needs its inputs, not its output
                out = out.view(k, plan.c_out, b, big_l).transpose(1, 2).reshape(k, b, -1)  # a fresh copy, no view
            keep = None
            if rates is not None and keys is not None:
                keep = batched_counter_keep(keys, i, b * out.shape[-1], rates, out.dtype).view(k, b, -1)
                scale = (1.0 - rates)[:, None, None]
            if self.relu:  # relu(x) * keep / s == relu(x * keep / s) exactly; in place, no new buffers
                h = (out if keep is None else out.mul_(keep).div_(scale)).relu_()
            else:
                h = self.act(out)
                h = h if keep is None else h * keep / scale
        pooled = h.view(k, b, self.plans[-1].c_out, -1).mean(-1)  # (k, B, C_last)
        return torch.baddbmm(params["head.bias"][:, None, :], pooled, params["head.weight"].transpose(1, 2))

    @torch.no_grad()
    def evaluator(self, params: Mapping[str, torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """Eval-mode logits of all k members on shared inputs: f(x (B, C, H, W)) -> (k, B, classes). The dense
        matrices are built once; the first layer is one product of the inputs with all members' matrices."""
        k = params["head.bias"].shape[0]
        layers = []
        for i, plan in enumerate(self.plans):
            weight, bias = params[f"convs.{i}.weight"].reshape(k, -1), params[f"convs.{i}.bias"]
            dense = _dense_matrix(weight, plan) if plan.dense else None
            if i == 0 and dense is not None:
                dense = dense.transpose(0, 1).reshape(dense.shape[1], -1)  # (C*H*W, k*O*L)
            layers.append((plan, weight, bias, dense, bias.repeat_interleave(plan.ho * plan.wo, dim=1)[:, None, :]))
        head_w, head_b = params["head.weight"].transpose(1, 2), params["head.bias"][:, None, :]

        def forward(x: torch.Tensor) -> torch.Tensor:
            b = x.shape[0]
            h = x.reshape(b, -1)
            for i, (plan, weight, bias, dense, wide_bias) in enumerate(layers):
                if i == 0 and dense is not None:
                    out = (h @ dense).view(b, k, -1).transpose(0, 1) + wide_bias  # (k, B, O*L)
                    h = self.act(out)
                    continue
                if h.dim() == 2:
                    h = h.expand(k, *h.shape)
                if dense is not None:
                    out = torch.baddbmm(wide_bias, h, dense)
                else:
                    out = self._unfold_product(h, weight, plan).view(k, plan.c_out, b, plan.ho * plan.wo)
                    out = (out.transpose(1, 2) + bias[:, None, :, None]).reshape(k, b, -1)
                h = self.act(out)
            pooled = h.reshape(k, b, self.plans[-1].c_out, -1).mean(-1)
            return torch.baddbmm(head_b, pooled, head_w)

        return forward
