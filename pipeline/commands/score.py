"""`unfzoo score`: score checkpoint files or zoo members with a trained predictor (thin skin over pipeline.score)."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.commands._common import (
    DEVICES,
    check_device,
    completer,
    console,
    err_console,
    escape,
    one_of,
    print_json,
    print_table,
    user_errors,
)

_EPILOG = """
[bold]Examples[/]

  unfzoo score runs/cnn-unf/unf runs/sweep/ --out scores.csv

  unfzoo score runs/cnn-unf/unf 'downloads/**/*.safetensors' model.ckpt --out scores.parquet

  unfzoo score runs/cnn-unf/unf datasets/zoos/cnn-digits.zarr --checkpoint 20 --out zoo_scores.csv

Inputs: files (any suffix; read safely), directories (recursive: .pt .pth .ckpt .bin .safetensors), quoted globs,
or zarr zoo stores (every member at --checkpoint). PyTorch files are read with torch.load(weights_only=True) only:
a pickle that needs anything beyond tensors and plain containers is refused, never run. Exit code 0 when every input
scored, 1 when some failed (listed; the rest are scored and written), 2 for a usage error.
"""

_OUT_SUFFIXES = (".csv", ".parquet", ".pq")
_SHOW_ERRORS = 20


def score(
    predictor_dir: Path = typer.Argument(..., help="A trained predictor: an `unfzoo train` model sub-folder (or an "
                                         "output folder holding a single model)."),
    inputs: list[str] = typer.Argument(..., help="Checkpoint files, directories, globs or zoo stores."),
    out: Path = typer.Option(..., "--out", "-o", help="Output table: .csv or .parquet, one row per input."),
    checkpoint: str = typer.Option("final", help="Zoo inputs: the epoch to score (final = the last stored).",
                                   metavar="[final|EPOCH]"),
    batch_size: int = typer.Option(256, help="Checkpoints per predictor call."),
    workers: int = typer.Option(None, help="Reader processes; 0 reads in-process. Default: a LocalCluster of one "
                                "process per core when the files are many enough to repay its start-up (~11,000 "
                                "small files on 2 cores), else in-process.", show_default="automatic"),
    scheduler: str = typer.Option(None, help="Address of a running Dask scheduler (e.g. tcp://host:8786) to read "
                                  "files on; 'sync' reads in-process."),
    device: str = typer.Option("auto", help="Predictor device: auto (CUDA when present), cpu, cuda or cuda:N.",
                               metavar=one_of(DEVICES), autocompletion=completer(DEVICES)),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON document on stdout."),
) -> None:
    """Score checkpoint files, folders, globs or zoo stores with a trained predictor; one verdict per input."""
    with user_errors():
        from pipeline.errors import ConfigError

        if out.suffix.lower() not in _OUT_SUFFIXES:
            raise ConfigError(f"--out {out}: use a .csv or .parquet file name")
        zoo_checkpoint: int | str = checkpoint
        if checkpoint not in ("final", "last"):
            try:
                zoo_checkpoint = int(checkpoint)
            except ValueError as err:
                raise ConfigError(f"--checkpoint {checkpoint!r}: use an epoch number or 'final'") from err
        if out.suffix.lower() != ".csv":
            from pipeline.extras import require

            require("pyarrow", extra="parquet", feature=f"--out {out.name} (parquet output)")
        check_device(device)

        from pipeline.predict import load_predictor
        from pipeline.score import score_checkpoints

        predictor = load_predictor(predictor_dir, device=device)
        frame = score_checkpoints(
            predictor, inputs, batch_size=batch_size, scheduler=scheduler, workers=workers,
            checkpoint=zoo_checkpoint, progress=True,
        )
        _write(frame, out)

        if as_json:
            print_json(_summary(frame, out))
            failed = int((frame["status"] != "ok").sum())
        else:
            members = getattr(predictor, "members", None)  # a seed ensemble (EnsemblePredictor)
            what = f"seed ensemble of {len(members)}" if members else "predictor"
            failed = _summarize(frame, f"{predictor.kind} {what} of {predictor.target}", out)
            probe = ((members[0] if members else predictor).config.get("hyperparameters") or {}).get("probe")
            if probe:  # the one assumption a probe predictor makes that the weights cannot show
                console.print(escape(f"note: this predictor runs each network under the activations of its training "
                                     f"zoo ({', '.join(probe['activations'])}); a network trained with another "
                                     "activation is misread"), soft_wrap=True)
        if failed:
            raise typer.Exit(code=1)


def _summarize(frame, title: str, out: Path) -> int:  # noqa: ANN001 - a pandas DataFrame (imported lazily)
    """Print the summary table, the highest predictions and the failures; return the number of failures."""
    import pandas as pd
    from rich.table import Table

    ok, failed = frame[frame["status"] == "ok"], frame[frame["status"] != "ok"]
    table = Table(title=escape(f"{title}: {len(frame)} inputs"))
    for col in ("scored", "failed", "min", "median", "max"):
        table.add_column(col, justify="right")
    quantiles = [f"{ok['prediction'].quantile(q):.4f}" if len(ok) else "-" for q in (0.0, 0.5, 1.0)]
    table.add_row(str(len(ok)), str(len(failed)), *quantiles)
    print_table(table)
    if len(ok):
        best = ok.nlargest(min(5, len(ok)), "prediction")
        names = [p if pd.isna(m) else f"{p}#member={m}" for p, m in zip(best["path"], best["member"])]
        console.print("highest: " + ", ".join(f"{escape(n)} ({v:.4f})" for n, v in zip(names, best["prediction"])),
                      soft_wrap=True)  # paths stay whole, for copying
    console.print(f"wrote {escape(str(out))}", soft_wrap=True)
    if len(failed):
        err_console.print(f"[bold red]{len(failed)} input(s) failed[/] (status=error in {escape(str(out))}):")
        for error in failed["error"].head(_SHOW_ERRORS):
            err_console.print(f"  {escape(error)}", highlight=False, soft_wrap=True)
        if len(failed) > _SHOW_ERRORS:
            err_console.print(f"  ... and {len(failed) - _SHOW_ERRORS} more")
    return len(failed)


def _summary(frame, out: Path) -> dict:  # noqa: ANN001 - a pandas DataFrame
    """The `--json` summary: counts, prediction quantiles, the five highest inputs and the failures."""
    import pandas as pd

    ok, failed = frame[frame["status"] == "ok"], frame[frame["status"] != "ok"]
    stats = {k: float(ok["prediction"].quantile(q)) if len(ok) else None
             for k, q in (("min", 0.0), ("median", 0.5), ("max", 1.0))}
    best = ok.nlargest(min(5, len(ok)), "prediction")
    return {
        "out": str(out), "inputs": len(frame), "scored": len(ok), "failed": len(failed), "prediction": stats,
        "highest": [{"path": p, "member": None if pd.isna(m) else int(m), "prediction": float(v)}
                    for p, m, v in zip(best["path"], best["member"], best["prediction"])],
        "errors": [str(e) for e in failed["error"]],
    }


def _write(frame, out: Path) -> None:  # noqa: ANN001 - a pandas DataFrame (pandas is imported lazily)
    """Write the table atomically (a temporary file renamed into place)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if out.suffix.lower() == ".csv":
        frame.to_csv(tmp, index=False)
    else:
        frame.to_parquet(tmp, index=False)
    tmp.replace(out)
