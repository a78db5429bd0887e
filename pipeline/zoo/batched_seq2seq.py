"""The `gru_seq2seq` member architecture evaluated for a whole chunk of members at once, without vmap.

Vmapping `GRUSeq2Seq` runs its explicit time loop (some ten small ops per step and GRU) through torch.func's
batching layer, whose per-op cost dwarfs the arithmetic on these tiny tensors. This module runs the same network
directly on stacked parameters (k members, each with its own batch of B sequences): per-member embedding lookups
by gather, each GRU step one batched product for all members, the output projection one more. Autograd of the summed
member losses gives every member its own gradient (members share nothing).

Same equations and gate order as `MemberGRU` (r, z, n; padding keeps the encoder state), teacher forcing as
`GRUSeq2Seq.forward`, dropout with the counter noise `MemberDropout` computes per member (the same masks, bit for
bit, via `batched_counter_keep`); results equal the vmapped module's up to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from pipeline.zoo.batched_cnn import batched_counter_keep

__all__ = ["BatchedSeq2Seq"]

_EVAL_GATES = 1 << 18  # gate activations per time step of an evaluation call (1 MiB in float32)
_EVAL_SEQUENCES = 128  # sequences per member in an evaluation call, at least (longer products per member)
_STEP_GATES = 1 << 17  # gate activations per time step and thread of a training step's members (CPU)


def _embed(table: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Rows of each member's embedding table (k, V, E) for its tokens (k, T, B) -> (k, T, B, E)."""
    k, t, b = tokens.shape
    index = tokens.reshape(k, t * b, 1).expand(k, t * b, table.shape[-1])
    return table.gather(1, index).view(k, t, b, table.shape[-1])


def _gru_step(gi_t: torch.Tensor, h: torch.Tensor, w_hh_t: torch.Tensor, bias: torch.Tensor, gates: torch.Tensor,
              mask_t: torch.Tensor | None, out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One GRU step of every member (`MemberGRU`'s equations, gates r, z, n): input gate pre-activations gi_t
    (k, B, 3H) (bias included), state h (k, B, H), w_hh_t (k, H, 3H), bias (k, 1, 3H); writes r, z, n into `gates`
    (k, B, 3H), and the new state into `out` when given; `mask_t` (k, B) bool keeps h where False. Returns the new
    state and the recurrent products gh = h W_hh^T + b_hh (k, B, 3H)."""
    hidden = h.shape[-1]
    gh = torch.baddbmm(bias, h, w_hh_t)
    torch.sigmoid(gi_t[..., : 2 * hidden] + gh[..., : 2 * hidden], out=gates[..., : 2 * hidden])
    r, z, n = gates[..., :hidden], gates[..., hidden : 2 * hidden], gates[..., 2 * hidden :]
    torch.tanh(torch.addcmul(gi_t[..., 2 * hidden :], r, gh[..., 2 * hidden :]), out=n)
    if mask_t is None:  # h' = (1 - z) n + z h, as one op
        return torch.lerp(n, h, z, out=out), gh
    return torch.where(mask_t[..., None], torch.lerp(n, h, z), h, out=out), gh


class _Recurrence(torch.autograd.Function):
    """The GRU time loop of every member, with its backward through time written out: the inputs' gate
    pre-activations gi (k, T, B, 3H) (bias included), initial state h0 (k, B, H), w_hh (k, 3H, H), b_hh (k, 3H),
    `mask` (k, T, B) bool or None -> states (k, T, B, H). Autograd of the per-step ops would record some thirty nodes
    per step (slice gradients zero-filled, gate chunks concatenated back); one backward step here is a dozen ops on
    the saved gates, and the recurrent weights' gradients are one product over all steps."""

    @staticmethod
    def forward(ctx: Any, gi: torch.Tensor, h0: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        k, t_len, b, _ = gi.shape
        hidden = h0.shape[-1]
        w_hh_t, bias = w_hh.transpose(1, 2), b_hh[:, None, :]
        states = gi.new_empty(k, t_len + 1, b, hidden)  # h0, then each step's state
        gates = torch.empty_like(gi)  # r, z, n per step
        hns = gi.new_empty(k, t_len, b, hidden)  # W_hn h + b_hn per step
        states[:, 0] = h0
        for t in range(t_len):
            mask_t = None if mask is None else mask[:, t]
            _, gh = _gru_step(gi[:, t], states[:, t], w_hh_t, bias, gates[:, t], mask_t, states[:, t + 1])
            hns[:, t] = gh[..., 2 * hidden :]
        ctx.save_for_backward(states, gates, hns, w_hh, mask)
        return states[:, 1:]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        states, gates, hns, w_hh, mask = ctx.saved_tensors
        k, t_len, b, hidden = grad.shape
        d_pre = torch.empty_like(gates)  # (k, T, B, 3H): gradients of the gates' pre-activations (= of gi)
        d_gh = torch.empty_like(gates)  # ... and of the recurrent products (the n gate's enters through r)
        dh = torch.zeros_like(states[:, 0])
        for t in reversed(range(t_len)):
            dh = dh + grad[:, t]
            h, d, dg = states[:, t], d_pre[:, t], d_gh[:, t]
            r, z, n = (gates[:, t, :, i * hidden : (i + 1) * hidden] for i in range(3))
            d_new, carry = (dh, None) if mask is None else (dh * mask[:, t, :, None], dh * ~mask[:, t, :, None])
            torch.mul(d_new * (1 - z), 1 - n * n, out=d[..., 2 * hidden :])  # h' = (1-z) n + z h; n = tanh(.)
            torch.mul(d[..., 2 * hidden :] * hns[:, t], r * (1 - r), out=d[..., :hidden])  # via n, then sigmoid
            torch.mul(d_new * (h - n), z * (1 - z), out=d[..., hidden : 2 * hidden])
            dg[..., : 2 * hidden] = d[..., : 2 * hidden]
            torch.mul(d[..., 2 * hidden :], r, out=dg[..., 2 * hidden :])
            dh = torch.baddbmm(d_new * z, dg, w_hh)  # (k, B, H)
            if carry is not None:
                dh += carry
        d_gh_k = d_gh.view(k, t_len * b, 3 * hidden)
        d_w = torch.bmm(d_gh_k.transpose(1, 2), states[:, :-1].reshape(k, t_len * b, hidden))  # (k, 3H, H)
        return d_pre, dh, d_w, d_gh_k.sum(1), None


def _recurrence_no_grad(gi: torch.Tensor, h: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor,
                        mask: torch.Tensor | None, last_only: bool) -> torch.Tensor:
    """`_Recurrence.forward`'s states without autograd (evaluation): the same steps (values equal up to rounding), but
    one step's gates live in a small reused buffer instead of being stored for every step; with `last_only`, only
    the final state is kept, (k, 1, B, H)."""
    k, t_len, b, _ = gi.shape
    w_hh_t, bias = w_hh.transpose(1, 2), b_hh[:, None, :]
    states = None if last_only else gi.new_empty(k, t_len, b, h.shape[-1])
    gates = gi.new_empty(k, b, gi.shape[-1])
    for t in range(t_len):
        h, _ = _gru_step(gi[:, t], h, w_hh_t, bias, gates, None if mask is None else mask[:, t], None)
        if states is not None:
            states[:, t] = h
    return h[:, None] if states is None else states


def _gru(params: Mapping[str, torch.Tensor], prefix: str, x: torch.Tensor, h: torch.Tensor,
         mask: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
    """One-layer GRU of every member: inputs x (k, T, B, I), initial state h (k, B, H), `mask` (k, T, B) bool keeps
    the state at False steps -> states (k, T, B, H) (the last step's is the final state; without autograd and with
    `last_only`, only that one: (k, 1, B, H))."""
    k, t_len, b, _ = x.shape
    w_ih, b_ih = params[f"{prefix}.weight_ih_l0"], params[f"{prefix}.bias_ih_l0"]  # (k, 3H, I), (k, 3H)
    gi = torch.baddbmm(b_ih[:, None, :], x.reshape(k, t_len * b, -1), w_ih.transpose(1, 2))  # (k, T*B, 3H)
    w_hh, b_hh = params[f"{prefix}.weight_hh_l0"], params[f"{prefix}.bias_hh_l0"]
    if not torch.is_grad_enabled():
        return _recurrence_no_grad(gi.view(k, t_len, b, -1), h, w_hh, b_hh, mask, last_only)
    return _Recurrence.apply(gi.view(k, t_len, b, -1), h, w_hh, b_hh, mask)


class BatchedSeq2Seq:
    """`GRUSeq2Seq` (a resolved `gru_seq2seq` arch) applied to k members at once: params keyed like its
    named_parameters with a leading member axis; sources (k, B, S), answers (k, B, T) -> logits (k, B, T, vocab)."""

    def __init__(self, arch: Mapping[str, Any]) -> None:
        self.pad_id, self.bos_id = int(arch["pad_id"]), int(arch["bos_id"])
        self.hidden = int(arch["hidden_size"])
        # members x sequences per evaluation call: one step's gates of them all stay in a core's L2 cache (measured:
        # 2,048 sequences of 3 x 32 gates ran evaluation ~15% faster than 8,192)
        self.eval_rows = max(1, _EVAL_GATES // (3 * self.hidden))
        # ... of blocks of members with at least _EVAL_SEQUENCES sequences each (measured, 128 members: blocks of 21
        # took 0.95x the time of all of them at 21 sequences each, at 1 and 2 threads)
        self.eval_members: int | None = max(1, self.eval_rows // _EVAL_SEQUENCES)

    def step_members(self, batch: int) -> int:
        """Members per training step on a CPU, `batch` sequences each: one time step's gates of them all in about
        half a MiB per thread (measured, 128 members of batch 32: at 1 thread blocks of 32-64 took 0.94x the time of
        all 128 at once; at 2 threads blocks of 84 0.96x, of 42 1.0x)."""
        return max(1, _STEP_GATES * torch.get_num_threads() // (batch * 3 * self.hidden))

    def __call__(
        self,
        params: Mapping[str, torch.Tensor],
        src: torch.Tensor,
        tgt: torch.Tensor,
        rates: torch.Tensor | None = None,
        keys: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Teacher-forced logits of each member on its own batch; dropout on the decoder outputs (counter noise, rate
        `rates` (k,), int32 `keys` (k,)) when both are given (training), none otherwise."""
        table = params["embedding.weight"]  # (k, V, E)
        k, b = src.shape[:2]
        hidden = params["encoder.weight_hh_l0"].shape[-1]
        src_t = src.transpose(1, 2)  # (k, S, B): each member time-major, no copy
        h = _gru(params, "encoder", _embed(table, src_t), table.new_zeros(k, b, hidden), src_t != self.pad_id, True)
        inputs = torch.cat([torch.full_like(tgt[..., :1], self.bos_id), tgt[..., :-1]], dim=-1)  # (k, B, T)
        out = _gru(params, "decoder", _embed(table, inputs.transpose(1, 2)), h[:, -1])  # (k, T, B, H)
        t_len = out.shape[1]
        if rates is not None and keys is not None:  # MemberDropout's masks index each member's (B, T, H) outputs
            keep = batched_counter_keep(keys, 0, b * t_len * hidden, rates, out.dtype, scaled=True)
            out = out * keep.view(k, b, t_len, hidden).transpose(1, 2)  # keep: 0 or 1 / (1 - rate)
        logits = torch.baddbmm(params["head.bias"][:, None, :], out.reshape(k, t_len * b, hidden),
                               params["head.weight"].transpose(1, 2))
        return logits.view(k, t_len, b, -1).transpose(1, 2)  # (k, B, T, vocab)

    @torch.no_grad()
    def evaluator(self, params: Mapping[str, torch.Tensor]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Eval-mode logits of all k members: f(src (B, S), tgt (B, T) or per member (k, B, T)) -> (k, B, T, vocab)."""
        k = params["head.bias"].shape[0]

        def forward(src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
            src = src.expand(k, *src.shape)
            tgt = tgt.expand(k, *tgt.shape) if tgt.dim() == 2 else tgt
            return self(params, src, tgt)

        return forward
