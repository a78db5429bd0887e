"""`unfzoo train`: train weight-space predictors on a zoo and compare them (thin skin over pipeline.predict)."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.commands._common import DEVICES, check_device, completer, console, one_of, print_table, user_errors

# Mirrors pipeline.predict.config (MODEL_NAMES, FEATURES); kept here so `--help` does not import torch (a test checks).
MODELS = ("unf", "unf-perm", "statnn", "deepsets", "flat", "all")
SPLITS = ("run", "config")
FEATURES = ("raw+log", "raw")
LOSSES = ("auto", "bce", "mse")

_EPILOG = """
[bold]Examples[/]

  unfzoo train datasets/zoos/cnn-digits.zarr --model unf --out runs/cnn-unf

  unfzoo train datasets/zoos/cnn-digits.zarr --model all --seeds 3 --out runs/cnn-all

  unfzoo train datasets/zoos/gru-arith.zarr --model unf,statnn --checkpoints all --split config

  unfzoo train datasets/zoos/cnn-digits.zarr --model statnn --target log_lr --out runs/cnn-lr

Models: unf, statnn, deepsets, flat, unf-perm (ablation: fixed axes treated as permutable), all, or a comma list.
The output folder holds <model>/ (best-validation seed; load it with pipeline.predict.load_predictor),
<model>/seed<k>/, metrics.json, predictions.csv, comparison.md/.csv, test_scatter.png and val_tau.png.
Rerunning the same command resumes interrupted runs and skips finished ones.
"""


def _fractions(text: str) -> tuple[float, ...]:
    from pipeline.errors import ConfigError

    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError as err:
        raise ConfigError(f"--fractions {text!r}: use three numbers such as 0.8,0.1,0.1") from err


def train(
    zoo: str = typer.Argument(..., help="Zoo store (path or fsspec URL), e.g. datasets/zoos/cnn-digits.zarr."),
    model: str = typer.Option("unf", "--model", "-m", help="unf, unf-perm, statnn, deepsets, flat, all, or a comma list such as "
                              "unf,statnn.", metavar="MODEL[,MODEL...]", autocompletion=completer(MODELS, comma_list=True)),
    target: str = typer.Option("test_acc", help="Metric (test_acc, train_loss, ...), gen_gap, or a hyperparameter "
                               "such as log_lr."),
    checkpoints: str = typer.Option("final", help="Checkpoints used, by epoch: final, all or a comma list such as 0,5,20.",
                                    metavar="[final|all|EPOCH,...]"),
    split: str = typer.Option("run", help="run (every checkpoint of a member on one side) | config (every seed of a "
                              "hyperparameter configuration on one side).", metavar=one_of(SPLITS),
                              autocompletion=completer(SPLITS)),
    fractions: str = typer.Option("0.8,0.1,0.1", help="train,val,test fractions of members (or configurations)."),
    split_seed: int = typer.Option(0, help="Seed of the split (fixed across model seeds)."),
    seeds: int = typer.Option(1, help="Model seeds per model (initialisation and batch order); mean and spread "
                              "are reported."),
    epochs: int = typer.Option(25, help="Maximum epochs of the torch models (early stopping usually ends sooner)."),
    batch_size: int = typer.Option(10, help="Batch size (members) of the torch models."),
    lr: float = typer.Option(1e-3, help="Adam learning rate."),
    patience: int = typer.Option(6, help="Early stopping: epochs without a better validation tau."),
    augment: bool = typer.Option(False, help="Random permutation of each training batch (symmetry augmentation)."),
    features: str = typer.Option("raw+log", help="Input channels of the torch models: raw+log (adds log|w|, "
                                 "pointwise, so symmetries are kept: weight scales differ ~50x between members) | raw.",
                                 metavar=one_of(FEATURES), autocompletion=completer(FEATURES)),
    loss: str = typer.Option("auto", help="auto (BCE when train/val targets lie in [0,1], else MSE) | bce | mse.",
                             metavar=one_of(LOSSES), autocompletion=completer(LOSSES)),
    include_diverged: bool = typer.Option(False, help="Keep diverged members (their non-finite rows are dropped)."),
    max_members: int = typer.Option(None, help="Use only the first N members (quick runs).", show_default="all"),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda or cuda:N.", metavar=one_of(DEVICES),
                               autocompletion=completer(DEVICES)),
    out: Path = typer.Option(None, help="Output folder.", show_default="runs/train/<zoo name>-<target>"),
) -> None:
    """Train weight-space predictors (UNF and baselines) on a zoo; report Kendall tau on a held-out test split."""
    with user_errors():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        from rich.table import Table

        from pipeline.errors import ConfigError, StoreError
        from pipeline.predict import TrainConfig, available_targets, build_data, train_predictor
        from pipeline.store import Zoo

        check_device(device)
        if "://" not in zoo and not Path(zoo).exists():
            raise StoreError(f"zoo {zoo} does not exist; build it first, e.g. `make zoo` or "
                             f"`unfzoo zoo cnn-digits --out {zoo}`")
        store = Zoo.open(zoo)
        config = TrainConfig(models=model, target=target, checkpoints=checkpoints, split=split,
                             fractions=_fractions(fractions), split_seed=split_seed, seeds=seeds, epochs=epochs,
                             batch_size=batch_size, lr=lr, patience=patience, augment=augment, features=features, loss=loss,
                             include_diverged=include_diverged, max_members=max_members, device=device)
        targets = available_targets(store)
        if target not in targets:
            raise ConfigError(f"unknown target {target!r} for {zoo}; available: {', '.join(targets)}")
        out = out or Path("runs/train") / f"{Path(zoo.rstrip('/')).stem}-{target}"
        with console.status(f"loading {zoo}"):
            data = build_data(store, config)
        counts = data.counts()
        console.print(f"[bold]{zoo}[/]: target {target} ({data.loss.upper()}), rows train/val/test "
                      f"{counts['train']['rows']}/{counts['val']['rows']}/{counts['test']['rows']} "
                      f"from {sum(c['members'] for c in counts.values())} members; excluded {data.excluded}")

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn())
        with Progress(*columns, console=console) as progress:
            tasks: dict[tuple[str, int], int] = {}

            def on_epoch(name: str, seed: int, epoch: int, total: int, info: dict) -> None:
                key = (name, seed)
                if key not in tasks:
                    for other in tasks.values():  # earlier runs are finished (maybe stopped early)
                        progress.update(other, total=progress.tasks[other].completed)
                    tasks[key] = progress.add_task(f"{name} seed {seed}", total=total, info="")
                progress.update(tasks[key], completed=epoch, info=f"val tau {info['val_tau']:.3f}")

            result = train_predictor(store, config, out, progress=on_epoch, data=data)
            for task_id in tasks.values():
                progress.update(task_id, total=progress.tasks[task_id].completed)

        table = Table(title=f"{target}: Kendall tau (mean ± spread over {config.seeds} seed(s))")
        for col in ("model", "test tau", "val tau", "test R^2", "test MAE"):
            table.add_column(col, justify="left" if col == "model" else "right")
        for r in result.summary.itertuples():
            table.add_row(r.model, f"{r.test_tau_mean:.3f} ± {r.test_tau_std:.3f}",
                          f"{r.val_tau_mean:.3f} ± {r.val_tau_std:.3f}", f"{r.test_r2_mean:.3f}",
                          f"{r.test_mae_mean:.4f}")
        print_table(table)
        console.print(f"wrote {out}/ (metrics.json, predictions.csv, comparison.md, test_scatter.png, val_tau.png; "
                      f"predictors in {', '.join(f'{out}/{m}' for m in config.models)})")
