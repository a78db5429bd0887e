"""`unfzoo zoo RECIPE`: build, resume or extend a zoo store (a thin skin over `pipeline.zoo.build_zoo`)."""

from __future__ import annotations

from typing import Any, Optional

import typer

from pipeline.commands._common import (
    DEVICES,
    check_device,
    completer,
    console,
    escape,
    one_of,
    print_table,
    user_errors,
)


def _recipe_names(incomplete: str) -> list[str]:
    from pipeline.zoo.recipe import recipe_names

    return [n for n in recipe_names() if n.startswith(incomplete)]


_recipe_names.__annotations__ = {"incomplete": str, "return": list[str]}  # typer matches real types, not strings


def zoo(
    recipe: str = typer.Argument(..., help="Recipe name from datasets/ (e.g. cnn-digits) or a path to a TOML file.",
                                 autocompletion=_recipe_names),
    members: Optional[int] = typer.Option(None, "--members", help="Member count (larger than the store's extends it).",
                                          show_default="the recipe's"),
    out: Optional[str] = typer.Option(None, "--out", help="Store path or fsspec URL.",
                                      show_default="datasets/zoos/NAME.zarr"),
    workers: Optional[int] = typer.Option(
        None, "--workers", help="Dask worker processes; 0 trains in this process.",
        show_default="in this process for small builds, else one per core"
    ),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Address of a running Dask scheduler."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a store that holds another recipe's zoo."),
    repair: bool = typer.Option(
        False, "--repair", help="Verify every finished chunk's checksums and retrain the damaged chunks."
    ),
    threads: Optional[int] = typer.Option(
        None, "--threads", help="Torch threads per task; keep it fixed for bit-identical reruns.",
        show_default="cores / workers"
    ),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda or cuda:N.",
                               metavar=one_of(DEVICES), autocompletion=completer(DEVICES)),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress (a bar on a terminal, a "
                                  "line per chunk in a file or pipe)."),
) -> None:
    """Train every member of RECIPE in chunks and write them to a zarr store; rerun to resume after a crash."""
    with user_errors():
        from pipeline.errors import ConfigError
        from pipeline.zoo.recipe import load_recipe
        from pipeline.zoo import build_zoo

        if workers is not None and workers < 0:
            raise ConfigError(f"--workers must be >= 0, got {workers}")
        if threads is not None and threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {threads}")
        if members is not None and members < 1:
            raise ConfigError(f"--members must be >= 1, got {members}")
        check_device(device)
        rec = load_recipe(recipe)
        target = out or f"datasets/zoos/{rec.name}.zarr"
        bar = _ProgressBar(enabled=progress)
        try:
            report = build_zoo(
                rec, target, members=members, workers=workers, scheduler=scheduler, overwrite=overwrite,
                repair=repair, device=device, threads=threads, on_start=bar.start, on_chunk=bar.advance,
            )
        finally:
            bar.stop()
        _print_summary(rec.name, report)


class _ProgressBar:
    """Members done, diverged, elapsed and ETA: a bar on a terminal, a line per chunk in a file or pipe."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.reporter: Any = None
        self.diverged = 0

    def start(self, total: int, done: int, to_train: int) -> None:
        from pipeline.progress import ProgressReporter

        if done:
            console.print(f"resuming: {done} of {total} members already in the store, {to_train} to train")
        self.reporter = ProgressReporter("training", total, unit="members", completed=done, console=console,
                                         every=1, enabled=self.enabled, diverged=0)

    def advance(self, outcome: Any) -> None:
        self.diverged += outcome.n_diverged
        self.reporter.advance(outcome.n, diverged=self.diverged)

    def stop(self) -> None:
        if self.reporter is not None:
            self.reporter.close()


def _print_summary(name: str, report: Any) -> None:
    import numpy as np
    from rich.table import Table

    table = Table(title=f"zoo {escape(name)}", show_header=False, title_justify="left")
    table.add_row("store", escape(str(report.url)))
    table.add_row("members", f"{report.members} ({report.done} done, {report.diverged} diverged, {report.pending} pending)")
    table.add_row("trained now", f"{report.trained} ({report.skipped} were already in the store)")
    if report.repaired:
        table.add_row("repaired", "chunks " + ", ".join(map(str, report.repaired)) + " (failed their checksums)")
    table.add_row("wall time", f"{report.wall_s:.1f} s")
    if report.trained:
        table.add_row("throughput", f"{report.members_per_s:.1f} members/s with {report.workers or 'in-process'} workers")
    acc = report.final_test_acc[np.isfinite(report.final_test_acc)]
    if acc.size:
        q = np.quantile(acc, [0, 0.1, 0.5, 0.9, 1.0])
        table.add_row("final test acc", "min {:.3f}  p10 {:.3f}  median {:.3f}  p90 {:.3f}  max {:.3f}".format(*q))
    print_table(table)
