"""Inner problems: a network, its initialization, its data and batch size, as pure functions for `torch.func`.

A zoo member becomes an inner problem with its task, architecture, stored initialization (checkpoint 0) and batch
size; every optimizer trained on it sees the same data order (`data_order(steps, seed)`), so comparisons are paired.
Members train in eval mode (dropout off) and without their recipe's weight decay: the learned optimizers see the
plain training loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from pipeline.errors import ConfigError, StoreError

__all__ = ["InnerProblem", "group_problems", "problems_from_zoo"]

_EVAL_CHUNK = 4096


@dataclass
class InnerProblem:
    """One inner training problem. `model` is a template for `functional_call`; `init` its starting parameters."""

    model: nn.Module
    init: dict[str, Tensor]
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    batch_size: int
    kind: str = "classification"  # or "seq2seq": model(x, y) gives logits (B, L, V) for targets (B, L)
    pad_id: int | None = None  # seq2seq: target token ignored by the loss and accuracy
    name: str = ""
    member: int | None = None
    buffers: dict[str, Tensor] = field(default_factory=dict)
    _initial_loss: float | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"inner problem {self.name!r}: batch size must be positive, got {self.batch_size}")
        if len(self.x_train) < 1:
            raise ConfigError(f"inner problem {self.name!r} has no training data")
        self.model.eval()

    @property
    def device(self) -> torch.device:
        return next(iter(self.init.values())).device

    def to(self, device: torch.device | str) -> InnerProblem:
        """A copy with model, parameters and data on `device`."""
        mv = {k: v.to(device) for k, v in self.init.items()}
        return replace(
            self,
            model=self.model.to(device),
            init=mv,
            buffers={k: v.to(device) for k, v in self.buffers.items()},
            x_train=self.x_train.to(device),
            y_train=self.y_train.to(device),
            x_test=self.x_test.to(device),
            y_test=self.y_test.to(device),
        )

    # -- pure functions of the parameters (vmappable) --------------------------------------------------------------
    def logits(self, params: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        args = (x, y) if self.kind == "seq2seq" else (x,)  # seq2seq members decode with teacher forcing
        return functional_call(self.model, ({**params}, self.buffers), args)

    def loss(self, params: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        """Mean cross-entropy of the batch (over non-pad tokens for seq2seq)."""
        logits = self.logits(params, x, y)
        ignore = self.pad_id if self.pad_id is not None else -100
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=ignore)

    def correct(self, params: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        """Number of correct predictions (for seq2seq: sequences with every non-pad token right)."""
        hit = self.logits(params, x, y).argmax(-1) == y
        if hit.dim() > 1:
            if self.pad_id is not None:
                hit = hit | (y == self.pad_id)
            hit = hit.flatten(1).all(1)
        return hit.sum()

    # -- data ----------------------------------------------------------------------------------------------------------
    def data_order(self, steps: int, seed: int) -> Tensor:
        """Batch indices (steps, B): epochs of seeded permutations, last partial batch dropped. CPU, deterministic."""
        n = len(self.x_train)
        b = min(self.batch_size, n)
        per_epoch = n // b
        gen = torch.Generator().manual_seed(int(seed))
        epochs = -(-steps // per_epoch)
        perms = [torch.randperm(n, generator=gen)[: per_epoch * b].view(per_epoch, b) for _ in range(epochs)]
        return torch.cat(perms)[:steps]

    def full_loss(self, params: Mapping[str, Tensor], split: str = "train") -> Tensor:
        """Mean loss over a whole split (chunked forward passes); vmappable over params."""
        x, y = (self.x_train, self.y_train) if split == "train" else (self.x_test, self.y_test)
        total = 0.0
        for s in range(0, len(x), _EVAL_CHUNK):
            xb, yb = x[s : s + _EVAL_CHUNK], y[s : s + _EVAL_CHUNK]
            total = total + self.loss(params, xb, yb) * len(xb)
        return total / len(x)

    def accuracy(self, params: Mapping[str, Tensor], split: str = "test") -> Tensor:
        x, y = (self.x_train, self.y_train) if split == "train" else (self.x_test, self.y_test)
        hits = sum(self.correct(params, x[s : s + _EVAL_CHUNK], y[s : s + _EVAL_CHUNK]) for s in range(0, len(x), _EVAL_CHUNK))
        return hits / len(x)

    def initial_loss(self) -> float:
        """Training loss at the initialization (the scale meta-losses are measured in), cached."""
        if self._initial_loss is None:
            with torch.no_grad():
                value = float(self.full_loss(self.init))
            if not torch.isfinite(torch.tensor(value)) or value <= 0:
                raise ConfigError(f"inner problem {self.name!r}: initial loss is {value}; the initialization is unusable")
            self._initial_loss = value
        return self._initial_loss

    def shape_key(self) -> tuple[Any, ...]:
        """Problems with equal keys can be trained in one vmapped batch: same module structure (the repr names
        layers and activations), parameter shapes, batch size and data."""
        shapes = tuple((k, tuple(v.shape)) for k, v in self.init.items())
        return (repr(self.model), shapes, self.batch_size, self.kind, id(self.x_train), id(self.x_test))


def group_problems(problems: Sequence[InnerProblem]) -> list[list[int]]:
    """Indices of `problems` grouped by `shape_key` (same module, shapes, batch size, data), in first-seen order."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, p in enumerate(problems):
        groups.setdefault(p.shape_key(), []).append(i)
    return list(groups.values())


def _member_batch_size(zoo: Any, member: int) -> int:
    row = zoo.members.loc[member] if member in zoo.members.index else zoo.members.iloc[member]
    for col in ("batch_size", "hp.batch_size", "hparams.batch_size"):
        if col in row.index:
            return int(row[col])
    recipe = getattr(zoo, "recipe", None)
    for attr in ("batch_size",):
        value = getattr(recipe, attr, None) if recipe is not None else None
        if value is not None:
            return int(value if not isinstance(value, (list, tuple)) else value[0])
    raise StoreError(f"zoo {getattr(zoo, 'path', '')}: cannot find member {member}'s batch size (no batch_size column)")


def problems_from_zoo(zoo: Any, members: Sequence[int], device: torch.device | str = "cpu") -> list[InnerProblem]:
    """Inner problems for `members` of an opened `Zoo`: its task, each member's checkpoint-0 module and batch size."""
    from pipeline.zoo.tasks import load_task

    task = load_task(zoo.task_name, **dict(zoo.task_params))
    kind = task.kind
    pad_id = task.info.get("pad_id") if kind == "seq2seq" else None
    data = [t.to(device) for t in (task.x_train, task.y_train, task.x_test, task.y_test)]
    out = []
    for m in members:
        m = int(m)
        module = zoo.module(m, 0).to(device)
        init = {k: v.detach().clone() for k, v in module.named_parameters()}
        buffers = {k: v.detach().clone() for k, v in module.named_buffers()}
        out.append(
            InnerProblem(
                model=module,
                init=init,
                x_train=data[0],
                y_train=data[1],
                x_test=data[2],
                y_test=data[3],
                batch_size=_member_batch_size(zoo, m),
                kind=kind,
                pad_id=pad_id,
                name=f"member {m}",
                member=m,
                buffers=buffers,
            )
        )
    return out
