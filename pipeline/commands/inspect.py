"""`unfzoo inspect ZOO`: members, status counts, metric distributions and size of any zoo store."""

from __future__ import annotations

from typing import Any

import typer

from pipeline.commands._common import escape, print_json, print_table, user_errors

_QUANTILES = ("min", "p10", "median", "p90", "max")


def inspect(
    zoo: str = typer.Argument(..., help="Zoo store path or fsspec URL."),
    verify: bool = typer.Option(
        False, "--verify", help="Read every finished chunk and check its checksums; exit 1 naming damaged chunks."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document instead of tables."),
    migrate: bool = typer.Option(
        False, "--migrate", help="Upgrade the metadata of a store written by an older unfzoo (dimension names, "
        "member coordinates, category flags for xarray) in place; takes the store's writer lock."
    ),
) -> None:
    """Summarize a zoo store: what it holds, how much of it is trained, and how good the members are."""
    with user_errors():
        from rich.table import Table

        from pipeline.zoo.store import STORE_VERSION, Zoo, store_version

        store = Zoo.open(zoo)
        if migrate:
            store = _migrate(store)
        elif store_version(store.attrs) < STORE_VERSION and not as_json:
            from pipeline.commands._common import err_console

            err_console.print(f"note: this store has layout version {store_version(store.attrs)}; xarray.open_zarr "
                              "sees its weight dims as KEY.0 and no member coordinate (Zoo.to_xarray() is not "
                              f"affected). Upgrade it in place: unfzoo inspect {escape(store.url)} --migrate",
                              highlight=False, soft_wrap=True)
        if verify:
            _verify(store)
        summary = store.summary()
        if as_json:
            print_json(_json_summary(summary))
            return
        head = Table(title=f"zoo {escape(str(summary['name']))}", show_header=False, title_justify="left")
        for key in ("store", "kind", "task", "arch", "members", "status", "checkpoint epochs", "chunks", "splits", "size on disk"):
            head.add_row(key, escape(str(summary[key])))
        labels = summary["labels"]
        for kind in ("permutable", "fixed"):
            text = ", ".join(f"{label} ({size})" for label, size in labels[kind].items()) if labels else "-"
            head.add_row(f"{kind} labels", escape(text or "-"))
        print_table(head)
        hp = Table(title="hyperparameters", title_justify="left")
        hp.add_column("name")
        hp.add_column("values")
        for name, text in summary["hparams"].items():
            hp.add_row(escape(name), escape(text))
        print_table(hp)
        metrics = Table(title="metrics of done members (min / p10 / median / p90 / max)", title_justify="left")
        metrics.add_column("metric")
        metrics.add_column("epoch", justify="right")
        metrics.add_column("quantiles")
        for (name, epoch), q in summary["metrics"].items():
            metrics.add_row(escape(name), str(epoch), "  ".join(f"{v:.3f}" for v in q))
        print_table(metrics)


def _migrate(store: Any) -> Any:
    """Upgrade the store's metadata under its writer lock; returns the store opened again."""
    from pipeline.commands._common import err_console
    from pipeline.zoo.store import STORE_VERSION, Zoo, migrate_store
    from pipeline.zoo.storelock import StoreLock

    with StoreLock(store.url):
        changed = migrate_store(store.url)
    err_console.print(f"migrate: {escape(store.url)} " + (f"upgraded to layout version {STORE_VERSION}" if changed
                      else f"already has layout version {STORE_VERSION}; nothing to do"), highlight=False,
                      soft_wrap=True)
    return Zoo.open(store.url)


def _json_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary with structured values: the arch as an object, metric quantiles as records."""
    import json

    doc = {key.replace(" ", "_"): value for key, value in summary.items() if key != "metrics"}
    if isinstance(summary.get("arch"), str) and summary["arch"] != "-":
        doc["arch"] = json.loads(summary["arch"])
    doc["metrics"] = [{"metric": name, "epoch": int(epoch), **dict(zip(_QUANTILES, q))}
                      for (name, epoch), q in summary["metrics"].items()]
    return doc


def _verify(store: object) -> None:
    """Print what `Zoo.verify` found; damage ends the command with exit code 1 after naming every damaged chunk."""
    from pipeline.commands._common import console, err_console

    report = store.verify()  # type: ignore[attr-defined]
    if not report.checksums:
        console.print(f"verify: {report.checked} finished chunks read; this store predates checksums, so only "
                      "readability was checked")
    elif report.ok:
        console.print(f"verify: {report.checked} finished chunks read, every checksum matches")
    if report.ok:
        return
    for damage in report.damaged:
        err_console.print(f"damaged: {escape(damage.describe())}", highlight=False, soft_wrap=True)
    kind = store.attrs.get("kind")  # type: ignore[attr-defined]
    fix = (f"unfzoo zoo {store.attrs.get('name', 'RECIPE')} --out {store.url} --repair" if kind == "recipe"  # type: ignore[attr-defined]
           else "import the zoo again with --overwrite")
    err_console.print(f"verify: {len(report.damaged)} of {report.checked} finished chunks damaged; fix: {escape(fix)}",
                      highlight=False, soft_wrap=True)
    raise typer.Exit(code=1)
