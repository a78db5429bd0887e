"""User model factories: ``FILE.py:name`` or ``package.module:name``, called with JSON keyword arguments.

`unfzoo import checkpoints --module` builds the checkpoints' architecture with the user's own code; the store records
the factory (a file as its absolute path, with the file's SHA-256) and its keyword arguments, so `Zoo.module()`
rebuilds members. The factory is code the user named on the command line: it runs in this process, like any import.
Checkpoints are still read weights-only.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

__all__ = ["parse_module_kwargs", "load_factory", "build_module", "factory_record", "module_from_record"]


def parse_module_kwargs(kwargs: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """Keyword arguments for the factory: a dict, or JSON text of an object (None: no arguments)."""
    if kwargs is None:
        return {}
    if isinstance(kwargs, Mapping):
        return dict(kwargs)
    try:
        value = json.loads(kwargs)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--module-kwargs {kwargs!r} is not JSON ({err.msg}); use e.g. '{{\"width\": 16}}'") from err
    if not isinstance(value, dict):
        raise ConfigError(f"--module-kwargs {kwargs!r} must be a JSON object, e.g. '{{\"width\": 16}}'")
    return value


def _split(ref: str) -> tuple[str, str]:
    where, sep, name = str(ref).rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise ConfigError(f"--module {ref!r}: use FILE.py:factory or package.module:factory (a callable returning "
                          "the nn.Module)")
    return where, name


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_factory(ref: str) -> tuple[Callable[..., Any], str]:
    """The factory callable and its canonical reference (a file as an absolute path)."""
    where, name = _split(ref)
    if where.endswith(".py"):
        path = Path(where).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"--module {ref!r}: file {where} does not exist")
        mod_name = f"unfzoo_user_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:
            raise ConfigError(f"--module {ref!r}: {path} cannot be imported as Python")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module  # dataclasses and pickling look modules up here
        try:
            spec.loader.exec_module(module)
        except Exception as err:  # noqa: BLE001 - the user's file: report, never a traceback
            sys.modules.pop(mod_name, None)
            raise ConfigError(f"--module {ref!r}: importing {path} failed: {type(err).__name__}: {err}") from err
        canonical = f"{path}:{name}"
    else:
        try:
            module = importlib.import_module(where)
        except Exception as err:  # noqa: BLE001
            raise ConfigError(f"--module {ref!r}: cannot import {where}: {type(err).__name__}: {err}") from err
        canonical = f"{where}:{name}"
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ConfigError(f"--module {ref!r}: {where} has no callable {name!r}")
    return factory, canonical


def build_module(ref: str, kwargs: Mapping[str, Any] | None = None) -> Any:
    """Call the factory with ``kwargs``; it must return an ``nn.Module``."""
    from torch import nn

    factory, _ = load_factory(ref)
    try:
        module = factory(**dict(kwargs or {}))
    except Exception as err:  # noqa: BLE001 - the user's code
        raise ConfigError(f"--module {ref!r} with kwargs {dict(kwargs or {})}: calling it failed: "
                          f"{type(err).__name__}: {err}") from err
    if not isinstance(module, nn.Module):
        raise ConfigError(f"--module {ref!r} returned {type(module).__name__}, not a torch.nn.Module")
    return module


def factory_record(ref: str, kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a store records: canonical factory reference, kwargs, and the file's SHA-256 (files only)."""
    _, canonical = load_factory(ref)
    where, _ = _split(canonical)
    sha = _sha256(Path(where)) if where.endswith(".py") else None
    return {"factory": canonical, "kwargs": dict(kwargs or {}), "sha256": sha}


def module_from_record(record: Mapping[str, Any], where: str = "the store") -> Any:
    """Rebuild the module a store recorded (raises ConfigError when the factory file is gone)."""
    ref = str(record["factory"])
    file, _ = _split(ref)
    if file.endswith(".py") and not Path(file).is_file():
        raise ConfigError(f"{where} was imported with --module {ref}, and {file} no longer exists; restore it to "
                          "rebuild members as modules")
    if file.endswith(".py") and record.get("sha256") and _sha256(Path(file)) != record["sha256"]:
        logging.getLogger(__name__).warning("%s changed since %s was imported; rebuilding members with it", file,
                                            where)
    return build_module(ref, record.get("kwargs") or {})
