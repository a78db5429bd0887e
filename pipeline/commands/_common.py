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

__all__ = ["console", "err_console", "escape", "user_errors", "print_table", "print_json", "check_device"]

# In a file or pipe, long lines stay whole (no word wrapping at 80 columns); tables go through print_table.
console = Console(soft_wrap=not sys.stdout.isatty())
err_console = Console(stderr=True, soft_wrap=not sys.stderr.isatty())


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


# ---- help, completion, tables and JSON shared by the commands ----

DEVICES = ("auto", "cpu", "cuda", "cuda:N")


def one_of(values: tuple[str, ...] | list[str], *, more: str = "") -> str:
    """A metavar listing the allowed values, e.g. `[run|config]`, so `--help` shows them."""
    return "[" + "|".join(values) + (f"|{more}" if more else "") + "]"


def completer(values: tuple[str, ...] | list[str], *, comma_list: bool = False):  # noqa: ANN201 - a typer callback
    """A shell-completion callback offering `values` (for a comma list: completing its last item)."""

    def complete(incomplete: str) -> list[str]:
        head, _, last = incomplete.rpartition(",") if comma_list else ("", "", incomplete)
        prefix = f"{head}," if head else ""
        return [prefix + v for v in values if v.startswith(last) and "N" not in v]

    complete.__annotations__ = {"incomplete": str, "return": list[str]}  # typer matches real types, not strings
    return complete


def check_device(device: str) -> None:
    """Fail fast (exit 2) on a --device that is not a torch device or asks for an absent GPU, before any data loads."""
    from pipeline.device import resolve_device

    resolve_device(device)


def print_table(table, out: Console | None = None) -> None:  # noqa: ANN001 - a rich Table (rich is imported lazily)
    """Print a rich table whole: cells fold instead of being cut, and a file or pipe gets the table's natural width
    (rich would otherwise squeeze it into 80 columns)."""
    out = out or console
    for column in table.columns:
        column.overflow = "fold"
    if out.is_terminal:
        out.print(table)
        return
    width = out.measure(table, options=out.options.update_width(10_000)).maximum
    Console(file=out.file, width=max(width, 20), highlight=False, color_system=None).print(table)


def print_json(data: object) -> None:
    """Machine-readable output: one JSON document on stdout (NaN becomes null), nothing else."""
    import json
    import math

    def clean(x: object) -> object:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        if hasattr(x, "item") and callable(x.item):  # numpy scalars
            return clean(x.item())
        return x

    typer.echo(json.dumps(clean(data), indent=2, default=str))
