"""Shared CLI plumbing: user errors become a message and an exit code, never a traceback.

Text that comes from the user (paths, names, error messages quoting a recipe's `[arch]` table) goes through
`escape` before it is printed with rich, which would otherwise read `[...]` as markup and drop it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.markup import escape

from pipeline.errors import UnfzooError

__all__ = ["console", "err_console", "escape", "user_errors"]

console = Console()
err_console = Console(stderr=True)


def _user_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [UnfzooError]
    unf_errors = sys.modules.get("unf_models.errors")  # loaded only if the command touched unf_models
    if unf_errors is not None:
        types.append(unf_errors.UNFError)
    return tuple(types)


@contextmanager
def user_errors() -> Iterator[None]:
    """Print user mistakes as `error: ...` on stderr and exit with the error's code (2 unless it says otherwise)."""
    try:
        yield
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]: rerun the same command to resume")
        raise typer.Exit(code=130) from None
    except Exception as err:  # noqa: BLE001 - re-raised unless it is a user error
        if not isinstance(err, _user_error_types()):
            raise
        err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=getattr(err, "exit_code", 2)) from None
