"""Exceptions of unf_models: each names the tensor, label or module at fault and how to fix it."""

from __future__ import annotations


class UNFError(Exception):
    """Base of unf_models' errors about user input (specs, state dicts, modules)."""

    exit_code: int = 2


class SpecError(UNFError, ValueError):
    """A weight-space spec is malformed (names the tensor and the axis)."""


class SpecMismatchError(SpecError):
    """Tensors do not match a spec: a missing or extra key, or a wrong shape."""


class UnsupportedModuleError(UNFError, TypeError):
    """`WeightSpec.from_module` met an op it cannot derive symmetries for."""


class SymmetryError(SpecError):
    """A spec claims a symmetry the model lacks: permuting a label's axes changes the model's output (names the
    label, the tensors it moves and where the derivation decided it)."""
