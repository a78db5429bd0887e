"""`unfzoo import ...`: bring zoos trained elsewhere into the store format (thin skin over `pipeline.zoo.importers`)."""

from __future__ import annotations

from typing import Optional

import typer

from pipeline.commands._common import console, escape, user_errors

import_app = typer.Typer(
    help="Import zoos trained elsewhere: a folder of PyTorch checkpoints, or the Small CNN Zoo release.",
    no_args_is_help=True,
)


@import_app.command("checkpoints")
def checkpoints(
    directory: str = typer.Argument(..., help="Folder of .pt/.pth state dicts or .safetensors files."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Built-in architecture as JSON, or a .json/.toml file "
                                       "(a recipe works)."),
    module: Optional[str] = typer.Option(None, "--module", help="Your own architecture instead of --arch: "
                                         "FILE.py:factory or package.module:factory, a callable returning the "
                                         "nn.Module."),
    module_kwargs: Optional[str] = typer.Option(None, "--module-kwargs", help="JSON object of keyword arguments "
                                                "for the --module factory, e.g. '{\"width\": 16}'."),
    metrics: str = typer.Option(..., "--metrics", help="CSV: file[, member, epoch], hp.<name>..., metric columns."),
    out: str = typer.Option(..., "--out", help="Store path or fsspec URL to create."),
    task: Optional[str] = typer.Option(None, "--task", help="Task whose dims complete --arch and whose examples trace "
                                       "--module for its spec (e.g. digits)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing store at --out."),
) -> None:
    """Import a folder of checkpoints of one architecture, with their metrics from a CSV."""
    with user_errors():
        from pipeline.zoo.importers import import_checkpoints

        n = import_checkpoints(directory, arch, metrics, out, task=task, module=module, module_kwargs=module_kwargs,
                               overwrite=overwrite)
        console.print(f"imported {n} members into {escape(out)}")


@import_app.command("small-cnn-zoo")
def small_cnn_zoo(
    directory: str = typer.Argument(..., help="Folder with weights.npy, metrics.csv.gz and layout.csv."),
    out: str = typer.Option(..., "--out", help="Store path or fsspec URL to create."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing store at --out."),
) -> None:
    """Import a Small CNN Zoo release folder (e.g. CIFAR-10-GS or SVHN-GS)."""
    with user_errors():
        from pipeline.zoo.importers import import_small_cnn_zoo

        n = import_small_cnn_zoo(directory, out, overwrite=overwrite)
        console.print(f"imported {n} runs into {escape(out)}")
