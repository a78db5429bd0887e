"""Exceptions for user mistakes: each says what is wrong, where, and what to do.

Every class also subclasses the matching built-in, so callers may catch `ValueError` etc. The CLI turns any
`UnfzooError` into a one-line message and exit code `exit_code`, never a traceback.
"""

from __future__ import annotations


class UnfzooError(Exception):
    """Base of every error caused by the user's input (files, recipes, options)."""

    exit_code: int = 2


class RecipeError(UnfzooError, ValueError):
    """A zoo recipe is invalid: names the file, the field and the allowed values."""


class TaskDataMissingError(UnfzooError, FileNotFoundError):
    """A task's data files are absent: says where it looked and how to get them."""


class ConfigError(UnfzooError, ValueError):
    """An option or configuration value is invalid."""


class StoreError(UnfzooError, ValueError):
    """A zoo store is missing, unreadable or inconsistent with what was asked."""


class StoreMismatchError(StoreError):
    """A command would mix a different recipe into an existing store."""


class CheckpointError(UnfzooError, ValueError):
    """A checkpoint file cannot be loaded safely or does not match the expected architecture."""


class PredictorError(UnfzooError, ValueError):
    """A trained predictor directory is missing, incomplete or incompatible."""


class DamagedStoreError(StoreError):
    """Chunks of a zoo store fail their checksums or cannot be read: names the chunks, members and arrays."""


class StoreBusyError(StoreError):
    """Another process holds the store's writer lock: names its pid and host."""


class MissingExtraError(UnfzooError, ImportError):
    """A feature needs an optional package: names the pip extra (e.g. unfzoo[parquet]) that installs it."""
