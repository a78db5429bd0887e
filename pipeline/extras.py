"""Optional dependencies: a feature that needs one says which extra to install, instead of an ImportError."""

from __future__ import annotations

import importlib
from types import ModuleType

from pipeline.errors import MissingExtraError


def require(module: str, *, extra: str, feature: str) -> ModuleType:
    """Import `module`, or raise MissingExtraError naming the pip extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(
            f"{feature} needs the optional package {module!r}: pip install 'unfzoo[{extra}]' (or pip install {module})"
        ) from err
