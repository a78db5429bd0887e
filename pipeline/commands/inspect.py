"""`unfzoo inspect ZOO`: members, status counts, metric distributions and size of any zoo store."""

from __future__ import annotations

import typer

from pipeline.commands._common import console, user_errors


def inspect(zoo: str = typer.Argument(..., help="Zoo store path or fsspec URL.")) -> None:
    """Summarize a zoo store: what it holds, how much of it is trained, and how good the members are."""
    with user_errors():
        from rich.table import Table

        from pipeline.store import Zoo

        summary = Zoo.open(zoo).summary()
        head = Table(title=f"zoo {summary['name']}", show_header=False, title_justify="left")
        for key in ("store", "kind", "task", "arch", "members", "status", "checkpoint epochs", "chunks", "splits", "size on disk"):
            head.add_row(key, str(summary[key]))
        console.print(head)
        hp = Table(title="hyperparameters", title_justify="left")
        hp.add_column("name")
        hp.add_column("values")
        for name, text in summary["hparams"].items():
            hp.add_row(name, text)
        console.print(hp)
        metrics = Table(title="metrics of done members (min / p10 / median / p90 / max)", title_justify="left")
        metrics.add_column("metric")
        metrics.add_column("epoch", justify="right")
        metrics.add_column("quantiles")
        for (name, epoch), q in summary["metrics"].items():
            metrics.add_row(name, str(epoch), "  ".join(f"{v:.3f}" for v in q))
        console.print(metrics)
