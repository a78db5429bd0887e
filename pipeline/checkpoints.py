"""Safe checkpoint loading and matching against a predictor's weight-space spec.

Loading never unpickles arbitrary objects: PyTorch files go through ``torch.load(..., weights_only=True)`` (tensors,
containers and primitive types only) and ``.safetensors`` files through ``safetensors``. Matching unwraps common
containers (``{"state_dict": ...}``, ``{"model": ...}``), strips a key prefix (``module.``, ``model.``, ...) and checks
keys and shapes with ``spec.check``; every step is reported so a user can see how a file was read.
"""

from __future__ import annotations

import os
import pickle
import re
import stat
import warnings
import zipfile
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import CheckpointError

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "WRAPPER_KEYS",
    "LoadedCheckpoint",
    "MatchedCheckpoint",
    "SpecMatcher",
    "CheckpointBatch",
    "error_text",
    "load_checkpoint",
    "match_state_dict",
    "read_checkpoints",
]

CHECKPOINT_SUFFIXES: tuple[str, ...] = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")
# Container keys that hold the state dict, tried in this order (Lightning, plain training scripts, DeepSpeed/timm).
WRAPPER_KEYS: tuple[str, ...] = ("state_dict", "model_state_dict", "model", "module", "net", "network")
_MAX_WRAPPER_DEPTH = 3
_MMAP_MIN_BYTES = 16 * 2**20  # larger zip checkpoints are memory-mapped: only the tensors we use are read
# Buffers a state dict may carry beside the parameters (specs describe parameters): ignored, never "extra layers".
_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
_NON_FINITE = "has non-finite values (NaN or inf): a diverged run cannot be scored"


@dataclass(frozen=True)
class LoadedCheckpoint:
    """The tensors of one file, unwrapped: `state` maps key -> tensor; `wrapper` is e.g. 'state_dict' or ''."""

    state: dict[str, torch.Tensor]
    format: str  # "torch" | "safetensors"
    wrapper: str


@dataclass(frozen=True)
class MatchedCheckpoint:
    """Tensors in spec order (float32, no batch axis) and how they were found."""

    tensors: dict[str, torch.Tensor]
    stripped_prefix: str
    ignored_keys: tuple[str, ...]  # keys outside the matched prefix, and buffers: not part of the weight space
    widths: str  # permutable labels whose size differs from the spec's, e.g. "convs.0=32,convs.1=32" ('' when none)


def error_text(err: BaseException) -> str:
    """One line for an error row: our own messages whole, anything else as 'Type: first line'."""
    if isinstance(err, CheckpointError):
        return str(err)
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _unsafe_reason(err: Exception) -> str:
    """Pull the blocked global or opcode out of torch's long weights-only message (which suggests unsafe loading)."""
    text = str(err)
    for pattern in (r"GLOBAL ([\w.]+)", r"(Unsupported operand \d+)", r"WeightsUnpickler error: ([^\n]+)"):
        found = re.search(pattern, text)
        if found:
            return found.group(1)
    return text.strip().splitlines()[0] if text.strip() else type(err).__name__


def _load_torch(path: Path) -> Any:
    mmap = path.stat().st_size >= _MMAP_MIN_BYTES and zipfile.is_zipfile(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": noise in a per-file loop
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused to unpickle: the file needs {_unsafe_reason(err)!r}, which safe (weights-only) loading "
            "does not allow; only tensors and plain containers are read. Re-save it with "
            "torch.save(model.state_dict(), ...) or as .safetensors"
        ) from err
    except (EOFError, RuntimeError, OSError, ValueError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path}: cannot read the file: {_diagnose(path, err)}") from err


def _diagnose(path: Path, err: Exception) -> str:
    """A short reason for an unreadable file, without torch's advice to load unsafely."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not head:
        return "it is empty"
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        return "truncated PyTorch zip archive (its central directory is missing)"
    lines = str(err).strip().splitlines()
    return f"truncated or corrupt ({lines[0] if lines else type(err).__name__})"


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: cannot read the safetensors file (truncated or corrupt?): {err}") from err


def _unwrap(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """Descend through wrapper dicts until a mapping that holds tensors; return it and the keys walked."""
    trail: list[str] = []
    for _ in range(_MAX_WRAPPER_DEPTH + 1):
        if not isinstance(obj, Mapping):
            where = f" under {'/'.join(trail)!r}" if trail else ""
            raise CheckpointError(
                f"{path}: holds a {type(obj).__name__}{where}, not a state dict (a mapping of names to tensors)"
            )
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors, "/".join(trail)
        inner = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        trail.append(inner)
        obj = obj[inner]
    keys = ", ".join(map(str, list(obj)[:8])) if isinstance(obj, Mapping) else ""
    raise CheckpointError(
        f"{path}: found no tensors{' under ' + repr('/'.join(trail)) if trail else ''}; top-level keys: "
        f"{keys or '(none)'}; expected a state dict, optionally wrapped as {{'state_dict': ...}} or {{'model': ...}}"
    )


def _check_regular_file(path: Path) -> None:
    """Refuse anything but a regular file before opening it: reading a named pipe or a device blocks forever or never
    ends (stat does not open, so it cannot block)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read the file: {err.strerror or err}") from err
    if not stat.S_ISREG(mode):
        kind = ("a named pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a directory" if stat.S_ISDIR(mode)
                else "not a regular file")
        raise CheckpointError(f"{path}: is {kind}, not a regular file; only checkpoint files are read")


def load_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Read one checkpoint file safely and unwrap it to a flat {key: tensor} state dict.

    Raises CheckpointError (naming the file) for non-regular files (pipes, devices), unsafe pickles, truncated or
    corrupt files and non-state-dict content.
    """
    path = Path(path)
    _check_regular_file(path)
    if path.suffix == ".safetensors":
        return LoadedCheckpoint(_load_safetensors(path), "safetensors", "")
    state, wrapper = _unwrap(_load_torch(path), path)
    return LoadedCheckpoint(state, "torch", wrapper)


def _find_prefix(keys: set[str], names: Sequence[str]) -> str | None:
    """The prefix p with p + name in `keys` for every spec name ('' first, then the shortest), or None."""
    if all(n in keys for n in names):
        return ""
    first = names[0]
    candidates = sorted(
        {k[: -len(first)] for k in keys if k.endswith(first) and k != first and k[: -len(first)].endswith(".")},
        key=len,
    )
    return next((p for p in candidates if all(p + n in keys for n in names)), None)


def _missing_message(keys: set[str], names: Sequence[str]) -> str:
    missing = [n for n in names if n not in keys]
    shown = ", ".join(sorted(keys)[:6]) + (", ..." if len(keys) > 6 else "")
    return (
        f"missing key(s) {', '.join(missing[:6])}{', ...' if len(missing) > 6 else ''} "
        f"(also with a prefix such as 'module.' or 'model.'); the file has {len(keys)} tensors: {shown}"
    )


class SpecMatcher:
    """Matches state dicts against one spec; shape checks are cached per shape signature (files of one sweep share
    shapes, so a batch of thousands pays for one check). Pickles as the spec's dict, so it can travel to workers."""

    def __init__(self, spec: Any, allow_other_widths: bool) -> None:
        self.spec, self.allow_other_widths = spec, bool(allow_other_widths)
        self.names = list(spec.names)
        self._base = dict(spec.sizes)
        self._checked: dict[tuple[tuple[int, ...], ...], str | CheckpointError] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"cls": type(self.spec), "spec": self.spec.to_dict(), "allow": self.allow_other_widths}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["cls"].from_dict(state["spec"]), state["allow"])

    def _widths(self, tensors: Mapping[str, torch.Tensor]) -> str:
        """Checked label sizes as 'label=n' for those that differ from the spec's; raises CheckpointError."""
        sig = tuple(tuple(t.shape) for t in tensors.values())
        if sig not in self._checked:
            try:
                sizes = self.spec.check(tensors, allow_other_widths=self.allow_other_widths)
                self._checked[sig] = ",".join(f"{a}={n}" for a, n in sizes.items() if n != self._base.get(a, n))
            except ValueError as err:  # unf_models' SpecMismatchError subclasses ValueError
                hint = "" if self.allow_other_widths else " (this predictor is not width-agnostic: widths must match)"
                self._checked[sig] = CheckpointError(f"{err}{hint}")
        found = self._checked[sig]
        if isinstance(found, CheckpointError):
            raise CheckpointError(str(found))
        return found

    def match(self, state: Mapping[str, torch.Tensor], path: str | Path = "", *, check_finite: bool = True
              ) -> MatchedCheckpoint:
        """Select the spec's tensors from `state` (stripping a common key prefix) and check keys and shapes.

        Other widths pass only along permutable axes and only when `allow_other_widths`. Raises CheckpointError
        naming the file and the key, with the expected and found shapes.
        """
        where = f"{path}: " if str(path) else ""
        keys = set(state)
        prefix = _find_prefix(keys, self.names)
        if prefix is None:
            raise CheckpointError(where + _missing_message(keys, self.names))
        spec = self.spec
        ours = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        extra = sorted(
            k for k, v in ours.items() if k not in spec and v.is_floating_point() and not k.endswith(_BUFFER_SUFFIXES)
        )
        if extra:
            more = ", ..." if len(extra) > 6 else ""
            raise CheckpointError(
                f"{where}unexpected tensor(s) {', '.join(prefix + k for k in extra[:6])}{more} are not in the "
                "predictor's weight space: the file holds a different architecture"
            )
        ignored = tuple(sorted(k for k in state if not k.startswith(prefix) or k[len(prefix) :] not in spec))
        tensors: dict[str, torch.Tensor] = {}
        for name in self.names:
            tensors[name] = _dense_float32(ours[name], f"{where}{prefix}{name}")
        try:
            widths = self._widths(tensors)
        except CheckpointError as err:
            raise CheckpointError(f"{where}{err}") from None
        if check_finite:
            for name, value in tensors.items():
                if not bool(torch.isfinite(value).all()):
                    raise CheckpointError(f"{where}{prefix}{name} {_NON_FINITE}")
        return MatchedCheckpoint(tensors, prefix, ignored, widths)


def _dense_float32(value: torch.Tensor, what: str) -> torch.Tensor:
    """`value` as a dense CPU float32 tensor; CheckpointError (naming `what`) for what holds no plain real weights:
    sparse layouts, meta-device tensors (shapes only), quantized, complex, integer and bool dtypes."""
    if value.layout != torch.strided:
        raise CheckpointError(f"{what} is a {str(value.layout).removeprefix('torch.')} tensor; expected dense weights "
                              "(save tensor.to_dense())")
    if value.device.type == "meta":
        raise CheckpointError(f"{what} is on the meta device: the file holds its shape but no values")
    if value.is_quantized:
        raise CheckpointError(f"{what} is quantized ({value.dtype}); expected floating-point weights (save "
                              "tensor.dequantize())")
    if not value.is_floating_point():
        raise CheckpointError(f"{what} has dtype {value.dtype}; expected floating-point weights")
    return value.detach().to("cpu", torch.float32).contiguous()


def match_state_dict(
    state: Mapping[str, torch.Tensor], spec: Any, *, allow_other_widths: bool, path: str | Path = ""
) -> MatchedCheckpoint:
    """Select `spec`'s tensors from `state` and check them (see `SpecMatcher.match`); `spec` is a WeightSpec."""
    return SpecMatcher(spec, allow_other_widths).match(state, path)


@dataclass
class CheckpointBatch:
    """What reading a list of files gives: (key, metadata) per file, and per shape signature the keys of the files
    that matched with their weights stacked as numpy arrays {name: (n, *shape)} (cheap to ship between processes)."""

    rows: list[tuple[Hashable, dict[str, Any]]]
    groups: dict[tuple[tuple[int, ...], ...], tuple[list[Hashable], dict[str, np.ndarray]]]


def read_checkpoints(items: Sequence[tuple[Hashable, str]], matcher: SpecMatcher) -> CheckpointBatch:
    """Load and match each (key, path); every failure becomes that file's error row, never an exception.

    Metadata per file: format, wrapper, status ('ok' | 'error'), error, stripped_prefix, widths, ignored_keys.
    Meant to run on a Dask worker: it imports nothing beyond torch and this module.
    """
    rows: dict[Hashable, dict[str, Any]] = {}
    paths = dict(items)
    pending: dict[tuple[tuple[int, ...], ...], tuple[list[Hashable], dict[str, list[np.ndarray]]]] = {}
    for key, path in items:
        meta = rows[key] = {"format": "safetensors" if str(path).endswith(".safetensors") else "torch"}
        try:  # everything done with the file's content happens in here, the numpy conversion included
            loaded = load_checkpoint(path)
            meta["wrapper"] = loaded.wrapper
            matched = matcher.match(loaded.state, path, check_finite=False)  # checked below, once per stack
            arrays = {name: np.asarray(t.numpy(), dtype=np.float32) for name, t in matched.tensors.items()}
        except Exception as err:  # noqa: BLE001 - any failure is this file's verdict, never the batch's
            meta.update(status="error", error=error_text(err))
            continue
        meta.update(status="ok", stripped_prefix=matched.stripped_prefix, widths=matched.widths,
                    ignored_keys=len(matched.ignored_keys))
        sig = tuple(a.shape for a in arrays.values())
        keys, stacks = pending.setdefault(sig, ([], {name: [] for name in arrays}))
        keys.append(key)
        for name, array in arrays.items():
            stacks[name].append(array)
    groups = {}
    for sig, (keys, stacks) in pending.items():
        # numpy: single-threaded, so no thread-pool contention with the predictor or other workers
        arrays = {name: np.stack(parts) for name, parts in stacks.items()}  # (n, *shape) each
        finite = np.ones(len(keys), dtype=bool)
        for name, a in arrays.items():
            ok = np.isfinite(a.reshape(len(a), -1)).all(axis=1)
            for j in np.flatnonzero(finite & ~ok):
                rows[keys[j]].update(status="error", error=f"{paths[keys[j]]}: {name} {_NON_FINITE}")
            finite &= ok
        if finite.any():
            keep = np.flatnonzero(finite)
            groups[sig] = ([keys[j] for j in keep], arrays if finite.all() else {n: a[keep] for n, a in arrays.items()})
    return CheckpointBatch(list(rows.items()), groups)
