"""Check that a spec's symmetries are real: permuting a model's state by the spec must leave its output unchanged.

Runs on a float64 copy of the model in eval mode: one random permutation of each permutable label alone, then all
labels together, applied to every state tensor the spec names (parameters and buffers such as BatchNorm running
statistics), after jittering those tensors (so that symmetric values, such as a fresh LayerNorm's ones, cannot hide
a wrong claim); state tensors outside the spec stay put. Any output that moves by more than ``rtol * (1 + |output|)``
raises `SymmetryError` naming the label, the tensors it moves and, for derived specs, where the derivation decided it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from unf_models.errors import SpecMismatchError, SymmetryError
from unf_models.spec import WeightSpec

__all__ = ["verify_spec", "as_inputs"]


def as_inputs(example_input: Any) -> tuple[Any, ...]:
    """The positional inputs a model is called with (a tuple/list is several inputs, anything else one)."""
    return tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)


def _double(value: Any, device: torch.device | None) -> Any:
    if isinstance(value, Tensor):
        value = value.to(device) if device is not None else value
        return value.double() if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_double(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _double(v, device) for k, v in value.items()}
    return value


def _flat(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value.detach()]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _flat(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _flat(v)]
    return []


def _moved_perm(n: int, generator: torch.Generator) -> Tensor:
    """A random permutation of n > 1 items that is never the identity."""
    p = torch.randperm(n, generator=generator)
    if torch.equal(p, torch.arange(n)):
        p = torch.roll(p, 1)
    return p


def _distance(base: list[Tensor], out: list[Tensor]) -> float:
    worst = 0.0
    for a, b in zip(base, out, strict=True):
        if a.shape != b.shape:
            return float("inf")
        if not (a.is_floating_point() or a.is_complex()):
            if not torch.equal(a, b):
                return float("inf")
            continue
        finite = torch.isfinite(a)
        if not torch.equal(finite, torch.isfinite(b)):
            return float("inf")
        if finite.any():
            worst = max(worst, float((a[finite] - b[finite]).abs().max()))
    return worst


def _moves(spec: WeightSpec, label: str) -> str:
    hits = []
    for t in spec.tensors:
        axes = sorted({i for part in t.parts for i, a in enumerate(part.axes) if a == label})
        if axes:
            hits.append(t.name if len(t.parts) == 1 and len(t.parts[0].axes) == 1 else
                        f"{t.name} (view axis {', '.join(map(str, axes))})")
    more = f", ... ({len(hits) - 6} more)" if len(hits) > 6 else ""
    return ", ".join(hits[:6]) + more


def _degenerate(t: Tensor, generator: torch.Generator, sample: int = 64) -> bool:
    """Whether ``t`` may hide an asymmetry: small, or repeated values among a random sample of its entries (a
    fresh norm layer's ones, a zero-initialised layer, an identity matrix)."""
    if t.numel() <= 4096:
        return True
    idx = torch.randint(t.numel(), (sample,), generator=generator).to(t.device)
    return int(t.reshape(-1)[idx].unique().numel()) < sample * 0.9


def _perturb(tensors: Mapping[str, Tensor], generator: torch.Generator) -> None:
    """Jitter covered tensors in place (positive ones multiplicatively) where their values repeat, so that
    symmetric values such as a norm layer's initial ones and zeros cannot hide a wrong claim; the claim is about
    every weight value. Large tensors of distinct (trained or random) values are left as they are."""
    with torch.no_grad():
        for t in tensors.values():
            if not t.is_floating_point() or t.numel() == 0 or not _degenerate(t, generator):
                continue
            # a random rank-1 pattern (first dim x the rest): generic, and cheap for 10M-parameter models
            rows = torch.randn(t.shape[0] if t.dim() else 1, generator=generator, dtype=torch.float64)
            cols = torch.randn(max(t.numel() // rows.numel(), 1), generator=generator, dtype=torch.float64)
            noise = (rows[:, None] * cols[None, :]).reshape(t.shape).to(t.device, t.dtype)
            if bool((t > 0).all()):
                t.mul_(torch.exp(0.2 * noise))
            else:
                scale = max(float(t.std()) if t.numel() > 1 else 0.0, 0.1 * float(t.abs().mean()), 1e-2)
                t.add_(0.2 * scale * noise)


def verify_spec(spec: WeightSpec, model: nn.Module, example_input: Any, *, seed: int = 0, rtol: float = 1e-7,
                origins: Mapping[str, str] | None = None, perturb: bool = True) -> None:
    """Raise `SymmetryError` unless every permutable label of ``spec`` is a symmetry of ``model`` on
    ``example_input`` (see the module docstring); ``origins`` says where a derived spec decided each label.
    ``perturb`` (default) first jitters the covered tensors of the float64 copy (never the model itself)."""
    # a float64 copy without a float32 copy first: parameters and buffers are converted while the module is copied
    memo: dict[int, Any] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in memo and t.is_floating_point():
            value = t.detach().to(torch.float64, copy=True)
            memo[id(t)] = nn.Parameter(value, t.requires_grad) if isinstance(t, nn.Parameter) else value
    twin = copy.deepcopy(model, memo).double().eval()
    ref = next(iter(twin.parameters()), None)
    inputs = _double(as_inputs(example_input), ref.device if ref is not None else None)
    state = {k: v.detach() for k, v in twin.state_dict(keep_vars=True).items()}
    missing = [n for n in spec.names if n not in state]
    if missing:
        raise SpecMismatchError(f"spec names tensor(s) {missing[:6]} that {type(model).__name__}'s state dict lacks "
                                f"(it has {list(state)[:8]}...)")
    covered = {n: state[n] for n in spec.names}
    spec.check(covered, allow_other_widths=False)
    generator = torch.Generator().manual_seed(seed)
    if perturb:
        _perturb(covered, generator)
    labels = [label for label in spec.permutable_labels if spec.sizes[label] > 1]
    trials = [(label,) for label in labels] + ([tuple(labels)] if len(labels) > 1 else [])
    live = twin.state_dict(keep_vars=True)  # the copy's parameters and buffers themselves

    def run(changes: Mapping[str, Tensor]) -> list[Tensor]:
        """The copy's outputs with some state tensors swapped in (their storage, not a copy), then restored."""
        old = {}
        for n, v in changes.items():
            if v is not covered[n]:
                old[n] = live[n].data
                live[n].data = v
        try:
            return _flat(twin(*inputs))
        finally:
            for n, d in old.items():
                live[n].data = d

    with torch.no_grad():
        base = run({})
        scale = max((float(t[torch.isfinite(t)].abs().max()) for t in base
                     if t.is_floating_point() and torch.isfinite(t).any()), default=0.0)
        tol = rtol * (1.0 + scale)
        for trial in trials:
            perm = {label: _moved_perm(spec.sizes[label], generator) for label in trial}
            moved = spec._permute_at(covered, perm, spec.sizes, 0)
            diff = _distance(base, run(moved))
            if diff <= tol:
                continue
            if len(trial) > 1:
                raise SymmetryError(
                    f"the spec's labels are each a symmetry of {type(model).__name__} but not all together: permuting "
                    f"all of {list(trial)} at once changes its output by {diff:.3g} (tolerance {tol:.1g}); declare "
                    f"the spec by hand with fewer permutable labels")
            (label,) = trial
            where = (origins or {}).get(label, "declared in the spec given")
            raise SymmetryError(
                f"the spec claims label '{label}' (size {spec.sizes[label]}) is a symmetry of {type(model).__name__}, "
                f"but permuting it changes the output by {diff:.3g} (tolerance {tol:.1g}); it moves "
                f"{_moves(spec, label)}; {where}. Declare the spec by hand with '{label}' in fixed=(...) or tied to "
                f"the axes it must move with")
