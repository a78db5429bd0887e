"""The `unfzoo` command line: one sub-command per pipeline stage, each a thin skin over a library function."""

from __future__ import annotations

import typer

from pipeline import __version__

app = typer.Typer(
    name="unfzoo",
    help="Model zoos, Universal Neural Functionals and weight-space predictors.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion: options with fixed values complete them
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"unfzoo {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version."),
) -> None:
    """unfzoo: build zoos of trained networks, learn from their weights, score checkpoints, meta-learn optimizers."""
    from pipeline.allocator import tune_allocator

    tune_allocator()  # reuse freed tensor memory instead of page-faulting it in every step (pipeline/allocator.py)


# Sub-commands are registered below, one line each; their modules import torch only when run.
from pipeline.commands import train as _train_cmd  # noqa: E402

app.command("train", epilog=_train_cmd._EPILOG)(_train_cmd.train)
from pipeline.commands import importer as _import_cmd  # noqa: E402
from pipeline.commands import inspect as _inspect_cmd  # noqa: E402
from pipeline.commands import zoo as _zoo_cmd  # noqa: E402

app.command("zoo")(_zoo_cmd.zoo)
app.command("inspect")(_inspect_cmd.inspect)
app.add_typer(_import_cmd.import_app, name="import")
from pipeline.commands import score as _score_cmd  # noqa: E402

app.command("score", epilog=_score_cmd._EPILOG)(_score_cmd.score)
from pipeline.commands import lopt as _lopt_cmd  # noqa: E402

app.add_typer(_lopt_cmd.lopt_app, name="lopt")
