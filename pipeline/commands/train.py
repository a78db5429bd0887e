"""`unfzoo train`: train weight-space predictors on a zoo and compare them (thin skin over pipeline.predict)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from pipeline.commands._common import DEVICES, check_device, completer, console, escape, one_of, print_json, user_errors

# Mirrors pipeline.predict.config (MODEL_NAMES, FEATURES) and pipeline.device (MATMUL_PRECISIONS); kept here so
# `--help` does not import torch (a test checks).
MODELS = ("unf", "unf-perm", "unf-hybrid", "unf-probe", "probe", "statnn", "deepsets", "flat", "all")
SPLITS = ("run", "config")
FEATURES = ("raw+log+size", "raw+log", "raw")
LOSSES = ("auto", "bce", "mse")
PRECISIONS = ("highest", "high", "medium")

_EPILOG = """
[bold]Examples[/]

  unfzoo train datasets/zoos/cnn-digits.zarr --model unf --out runs/cnn-unf

  unfzoo train datasets/zoos/cnn-digits.zarr --model all --seeds 3 --out runs/cnn-all

  unfzoo train datasets/zoos/gru-arith.zarr --model unf,statnn --checkpoints all --split config

  unfzoo train datasets/zoos/cnn-digits.zarr --model statnn --target log_lr --out runs/cnn-lr

  unfzoo train A.zarr B.zarr --model unf,statnn --eval-zoo C.zarr --split group:optimizer

Models: unf, statnn, deepsets, flat, unf-perm (ablation: fixed axes treated as permutable), unf-hybrid (UNF whose
head also reads the STATNN statistics), probe (the member's outputs on learned probe inputs; cnn and mlp zoos),
unf-probe (UNF pooled features and probe outputs side by side), all, or a comma list.
Several zoos: one architecture family, any widths (flat needs one width); each zoo is split on its own.
--eval-zoo: predicted and reported as split eval:<name>, never used for selection or early stopping.
--split group:<hparam>[=v1,v2]: members with the held-out value(s) are the test split (default: one value, the
sorted values' index split-seed mod count); the rest is split by run into train and val (ratio of --fractions).
The output folder holds <model>/ (load it with pipeline.predict.load_predictor or score with it: with --seeds 2+
the seed ensemble when its validation tau is at least the best seed's, else the best-validation seed; its
selection.json says which), <model>/seed<k>/ (history.csv per epoch), unf-val/ (with two or more UNF forms: a copy
of the one with the better validation tau), metrics.json, predictions.csv, comparison.md/.csv, pairs.csv,
test_scatter.png and val_tau.png. Rerunning the same command resumes interrupted runs and skips finished ones.
"""


def _fractions(text: str) -> tuple[float, ...]:
    from pipeline.errors import ConfigError

    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError as err:
        raise ConfigError(f"--fractions {text!r}: use three numbers such as 0.8,0.1,0.1") from err


def train(
    zoos: list[str] = typer.Argument(..., help="Zoo store(s) (path or fsspec URL), e.g. datasets/zoos/cnn-digits.zarr; "
                                     "several: one architecture family, any widths."),
    eval_zoo: list[str] = typer.Option(None, "--eval-zoo", help="Foreign zoo reported as its own split, never used "
                                       "for selection (repeatable)."),
    model: str = typer.Option("unf", "--model", "-m", help="unf, unf-perm, unf-hybrid, unf-probe, probe, statnn, "
                              "deepsets, flat, all, or a comma list such as unf,statnn.", metavar="MODEL[,MODEL...]",
                              autocompletion=completer(MODELS, comma_list=True)),
    target: str = typer.Option("test_acc", help="Metric (test_acc, train_loss, ...), gen_gap, or a hyperparameter "
                               "such as log_lr."),
    checkpoints: str = typer.Option("final", help="Rows evaluated and trained on, by epoch: final, all or a comma list "
                                    "such as 0,5,20.", metavar="[final|all|EPOCH,...]"),
    train_checkpoints: str = typer.Option("same", help="Extra training rows from other checkpoints of the training "
                                          "members: same, all or a comma list of epochs (val/test stay --checkpoints).",
                                          metavar="[same|all|EPOCH,...]"),
    split: str = typer.Option("run", help="run (every checkpoint of a member on one side), config (every seed of a "
                              "hyperparameter configuration on one side) or group:<hparam>[=v1,v2] (held-out "
                              "group(s) = test).", metavar=one_of(SPLITS, more="group:HPARAM[=V,...]"),
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
    normalize: str = typer.Option("fanin", help="fanin (scale-aware: each member's tensor / its RMS, plus a channel "
                                  "log10(RMS * sqrt(fan_in)), the same at every width for standard inits; wins on "
                                  "held-out widths and optimizers) | member (the same with log-RMS, which reads wider "
                                  "nets as smaller) | tensor (one mean/std per tensor from the training rows)."),
    rank_weight: float = typer.Option(0.0, help="Weight of a pairwise ranking term (RankNet) added to the torch "
                                      "models' loss; 0 = off."),
    pos_embed: bool = typer.Option(False, help="A learned embedding along the fixed axes (pixels, kernel positions, "
                                   "classes) at the first layer of unf-perm, so it can tell them apart (exact "
                                   "unf needs none)."),
    keep_fixed: str = typer.Option("", help="Fixed labels unf-perm keeps fixed while it ties the others, e.g. an "
                                   "MLP's input pixels x.2,x.3 (a label that is not fixed gets an error listing "
                                   "the fixed ones).",
                                   metavar="LABEL[,LABEL...]"),
    probes: int = typer.Option(64, help="Learned probe inputs of probe and unf-probe (each member is run on them)."),
    ensemble: bool = typer.Option(False, help="Also report <model>-ens: the mean prediction over seeds."),
    bias_by: str = typer.Option("", help="Hyperparameters (at most 20 distinct values each) whose values get their "
                                "own mean-error rows in comparison.md (test and eval splits), e.g. shift,optimizer.",
                                metavar="HPARAM[,HPARAM...]"),
    chance_margin: float = typer.Option(0.05, help="Trained = accuracy above 1/classes + this (tau above chance, "
                                        "AUC)."),
    bootstrap: int = typer.Option(1000, help="Bootstrap resamples of the intervals."),
    features: str = typer.Option("raw+log+size", help="Input channels of the torch models: raw+log+size (the weight, "
                                 "log|w| and log10 of the tensor's size, which tells the width; all keep every "
                                 "symmetry) | raw+log | raw.",
                                 metavar=one_of(FEATURES), autocompletion=completer(FEATURES)),
    loss: str = typer.Option("auto", help="auto (BCE when train/val targets lie in [0,1], else MSE) | bce | mse.",
                             metavar=one_of(LOSSES), autocompletion=completer(LOSSES)),
    include_diverged: bool = typer.Option(False, help="Keep diverged members (their non-finite rows are dropped)."),
    max_members: int = typer.Option(None, help="Use only the first N members (quick runs).", show_default="all"),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda or cuda:N.", metavar=one_of(DEVICES),
                               autocompletion=completer(DEVICES)),
    matmul_precision: str = typer.Option("highest", help="Float32 matrix products of the torch models' training "
                                         "steps: highest (float32) | high (TF32 on NVIDIA GPUs) | medium (bfloat16 "
                                         "products: GPUs, and CPUs with AMX). Predictions and metrics always use "
                                         "float32 products.", metavar=one_of(PRECISIONS),
                                         autocompletion=completer(PRECISIONS)),
    compile_steps: bool = typer.Option(False, "--compile", help="torch.compile the torch models' training steps: "
                                       "faster steps after a compile of up to a minute per model; for long runs."),
    out: Path = typer.Option(None, help="Output folder.", show_default="runs/train/<zoo name>-<target>"),
    as_json: bool = typer.Option(False, "--json", help="Print the statistics (per model and split) and the paired "
                                 "tau differences as one JSON document on stdout; progress lines go to stderr."),
) -> None:
    """Train weight-space predictors (UNF and baselines) on a zoo; report Kendall tau on a held-out test split."""
    from pipeline.device import flush_denormals

    # subnormals as zero from the start: torch's intra-op threads take this thread's mode when they start (the
    # `flush_denormals` block inside training reaches only the thread it runs in)
    with user_errors(), flush_denormals():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from pipeline.errors import ConfigError, StoreError
        from pipeline.predict import TrainConfig, available_targets, build_data, train_predictor
        from pipeline.zoo.store import Zoo

        check_device(device)
        for path in (*zoos, *(eval_zoo or ())):
            if "://" not in path and not Path(path).exists():
                raise StoreError(f"zoo {path} does not exist; build it first, e.g. `make zoo` or "
                                 f"`unfzoo zoo cnn-digits --out {path}`")
        stores = [Zoo.open(z) for z in zoos]
        evals = [Zoo.open(z) for z in (eval_zoo or ())]
        config = TrainConfig(models=model, target=target, checkpoints=checkpoints,
                             train_checkpoints=train_checkpoints, split=split, fractions=_fractions(fractions),
                             split_seed=split_seed, seeds=seeds, epochs=epochs, batch_size=batch_size, lr=lr,
                             patience=patience, augment=augment, normalize=normalize, rank_weight=rank_weight,
                             unf_pos_embed=pos_embed,
                             unf_keep_fixed=tuple(t.strip() for t in keep_fixed.split(",") if t.strip()),
                             probes=probes, ensemble=ensemble, chance_margin=chance_margin, bootstrap=bootstrap,
                             features=features, bias_by=tuple(t.strip() for t in bias_by.split(",") if t.strip()),
                             loss=loss, include_diverged=include_diverged, max_members=max_members, device=device,
                             matmul_precision=matmul_precision, compile=compile_steps)
        for path, store in zip((*zoos, *(eval_zoo or ())), (*stores, *evals)):
            targets = available_targets(store)
            if target not in targets:
                raise ConfigError(f"unknown target {target!r} for {path}; available: {', '.join(targets)}")
        if stores[0].spec is not None:
            from pipeline.predict.train import check_keep_fixed

            check_keep_fixed(stores[0], config.unf_keep_fixed)
        from pipeline.predict.train import plan_probe_models

        # refuses a zoo an asked-for probe model cannot read, before any loading; `all` leaves them out there
        config, _, probe_note = plan_probe_models(stores, config)
        from pipeline.device import precision_note, resolve_device

        for note in (probe_note, precision_note(config.matmul_precision, resolve_device(config.device))):
            if note is not None:
                print(f"note: {note}", file=sys.stderr if as_json else sys.stdout, flush=True)
        if out is not None and out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out} is an existing file, not a folder; pass a folder path")
        out = out or Path("runs/train") / f"{'+'.join(Path(z.rstrip('/')).stem for z in zoos)}-{target}"
        with console.status(f"loading {', '.join(zoos)}"):
            data = build_data(stores, config, evals)
        counts = data.counts()
        extra = "".join(f", {s} {c['rows']}" for s, c in counts.items() if s.startswith("eval:"))
        line = (f"{', '.join(zoos)}: target {target} ({data.loss.upper()}), rows train/val/test "
                f"{counts['train']['rows']}/{counts['val']['rows']}/{counts['test']['rows']}{extra} from "
                f"{sum(c['members'] for c in counts.values())} members; excluded {data.excluded}"
                + (f"; held out {split.split('=')[0][6:]} = {','.join(data.info['held_out'])}"
                   if data.info.get("held_out") else ""))
        log = sys.stderr if as_json else sys.stdout  # --json keeps stdout for the one JSON document
        if console.is_terminal and not as_json:
            console.print(escape(line))
        else:
            print(line, file=log, flush=True)  # never wrapped at a console width in a log file

        if as_json or not console.is_terminal:  # a log file: one plain line per epoch, as it happens
            def on_line(name: str, seed: int, epoch: int, total: int, info: dict) -> None:
                loss = info.get("train_loss")
                print(f"{name} seed {seed} epoch {epoch}/{total}" + (f" train_loss {loss:.4f}" if loss is not None
                      else "") + f" val_tau {info['val_tau']:.4f} best {info.get('best_tau', info['val_tau']):.4f}",
                      file=log, flush=True)

            result = train_predictor(stores, config, out, progress=on_line, data=data, eval_zoos=evals)
            if as_json:
                print_json({"out": str(out), "target": target, "models": list(config.models),
                            "statistics": result.statistics, "pairs": result.pairs,
                            "bias_by_width": result.bias_by_width})
            else:
                _print_summary(result, config, target, out)
            return

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

            result = train_predictor(stores, config, out, progress=on_epoch, data=data, eval_zoos=evals)
            for task_id in tasks.values():
                progress.update(task_id, total=progress.tasks[task_id].completed)
        _print_summary(result, config, target, out)


def _print_summary(result, config, target: str, out: Path) -> None:
    """The comparison table: tau with its 90% bootstrap interval per split (the seed spread with 2+ seeds)."""
    from rich.table import Table

    stats = [s for s in (result.statistics or []) if s["split"] != "train"]
    splits = list(dict.fromkeys(s["split"] for s in stats))
    table = Table(title=f"{target}: Kendall tau [90% bootstrap interval over members]"
                  + (f", ± sd over {config.seeds} seeds" if config.seeds > 1 else " (1 seed)"))
    table.add_column("model")
    for split in splits:
        table.add_column(escape(f"{split} tau"), justify="right")
    table.add_column("test R^2", justify="right")
    table.add_column("test MAE", justify="right")
    table.add_column("test bias", justify="right")

    def fmt(x, d=3):
        return "-" if x is None or x != x else f"{x:.{d}f}"

    rows = []
    for model in dict.fromkeys(s["model"] for s in stats):
        cells, test = [], {}
        for split in splits:
            s = next((x for x in stats if x["model"] == model and x["split"] == split), None)
            if s is None or not s.get("n"):
                cells.append("-")
                continue
            test = s if split == "test" else test
            sd = f" ± {fmt(s['tau_sd'])}" if s["seeds"] > 1 else ""
            cells.append(f"{fmt(s['tau'])}{sd} [{fmt(s['tau_low'])}, {fmt(s['tau_high'])}]")
        rows.append([model, *cells, fmt(test.get("r2")), fmt(test.get("mae"), 4), fmt(test.get("bias"), 4)])
    if console.is_terminal:
        for row in rows:
            table.add_row(*row)
        console.print(table)
    else:  # a log file: plain Markdown lines, never cut at a console width
        print(table.title)
        header = ["model", *(f"{split} tau" for split in splits), "test R^2", "test MAE", "test bias"]
        for line in (header, ["---"] * len(header), *rows):
            print("| " + " | ".join(line) + " |")
    print(f"wrote {out}/ (metrics.json, predictions.csv, comparison.md, pairs.csv, test_scatter.png, "
          f"val_tau.png; predictors in {', '.join(f'{out}/{m}' for m in config.models)})", flush=True)
