"""`unfzoo lopt`: meta-train learned optimizers on a zoo and evaluate them (thin skin over pipeline.lopt)."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import typer

from pipeline.commands._common import (
    DEVICES,
    check_device,
    completer,
    console,
    escape,
    one_of,
    print_json,
    print_table,
    user_errors,
)

# Mirror pipeline.lopt.optimizers.KINDS and the ES estimators; kept here so `--help` does not import torch (a test checks).
OPTIMIZERS = ("unf", "perparam", "sgdm")
INIT_FROM = ("default", "tuned")  # pipeline.lopt.warm_start.INIT_FROM
ESTIMATORS = ("pes", "tes")

_EPILOG = """
[bold]Examples[/]

  unfzoo lopt meta-train datasets/zoos/mlp-digits-lopt.zarr --optimizer unf --out runs/lopt/mlp-digits-lopt/unf

  unfzoo lopt meta-train datasets/zoos/mlp-digits-lopt.zarr --optimizer sgdm --out runs/lopt/mlp-digits-lopt/sgdm

  unfzoo lopt eval runs/lopt/mlp-digits-lopt --zoo datasets/zoos/mlp-digits-lopt.zarr

Rerunning meta-train with the same options resumes from its last checkpoint (a larger --outer-steps extends a run).
Defaults fit `make lopt` (4 optimizers x 3 seeds on 2 idle CPU cores). GPU-sized settings: --pairs 16 --truncation 50
--horizon 1000 --outer-steps 2000 --hidden 32 --layers 3 (the UNF paper's PES setup and f).
"""

lopt_app = typer.Typer(
    help="Learned optimizers (UNF, per-parameter, meta-tuned SGDM) meta-trained with ES on a zoo's members.",
    no_args_is_help=True,
    add_completion=False,
    epilog=_EPILOG,
    rich_markup_mode="rich",
)


def _floats(text: str, option: str) -> tuple[float, ...]:
    from pipeline.errors import ConfigError

    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as err:
        raise ConfigError(f"{option} {text!r}: use comma-separated numbers such as 1e-3,3e-3,1e-2") from err
    if not values:
        raise ConfigError(f"{option} is empty")
    return values


def _multiples(text: str) -> tuple[int, ...]:
    from pipeline.errors import ConfigError

    values = _floats(text, "--multiple")
    if any(v != int(v) for v in values):
        raise ConfigError(f"--multiple {text!r}: use whole multiples of the horizon such as 4,10")
    return tuple(int(v) for v in values)


def _warm_note(warm: dict | None) -> str:
    """", started at the tuned alpha ... gamma0 ..." for a run with --init-from tuned (its `warm_start` record)."""
    if not warm:
        return ""
    return f", started at the tuned alpha {warm['alpha']:g}, gamma0 {warm['gamma0']:g} (val {min(warm['grid'].values()):.4f})"


@lopt_app.command("meta-train", epilog=_EPILOG)
def meta_train_cmd(
    zoo: str = typer.Argument(..., help="Zoo store whose train-split members are the inner problems."),
    optimizer: str = typer.Option("unf", "--optimizer", "-o", help="UNF, per-parameter MLP, or meta-tuned SGD with "
                                  "momentum.", metavar=one_of(OPTIMIZERS), autocompletion=completer(OPTIMIZERS)),
    out: Path = typer.Option(..., "--out", help="Output folder (config.json, meta.safetensors, checkpoint)."),
    outer_steps: int = typer.Option(500, help="ES steps (each one truncation window)."),
    horizon: int = typer.Option(100, help="Inner steps per inner run (the meta-training horizon)."),
    truncation: int = typer.Option(10, help="Inner steps per ES step; must divide --horizon."),
    pairs: int = typer.Option(8, help="Antithetic pairs (population = 2 x pairs, vmapped)."),
    sigma: float = typer.Option(0.01, help="ES perturbation scale."),
    estimator: str = typer.Option("pes", help="pes (unbiased over truncations) | tes (truncated ES).",
                                  metavar=one_of(ESTIMATORS), autocompletion=completer(ESTIMATORS)),
    outer_lr: float = typer.Option(3e-3, help="Adam learning rate on f's weights."),
    hp_lr: float = typer.Option(3e-2, help="Adam learning rate on log alpha, log beta, logit gamma0."),
    grad_clip: float = typer.Option(1.0, help="Norm bound of the ES gradient."),
    hidden: int = typer.Option(16, help="Channels of f's pointwise layers."),
    layers: int = typer.Option(2, help="Pointwise layers of f before its head."),
    alpha: float = typer.Option(None, help="Initial step size alpha.", show_default="0.1"),
    beta: float = typer.Option(0.01, help="Initial scale beta of f's output."),
    head_scale: float = typer.Option(0.0, help="Scale of f's head at init; 0 = start as SGDM (f = 0)."),
    seed: int = typer.Option(0, help="Seed of f's init, perturbations and episode draws."),
    seeds: int = typer.Option(0, help="Meta-train this many seeds (--seed, --seed + 1, ...) into OUT/seed<k>/ (0 = one run into OUT)."),
    nominal: str = typer.Option("sgdm", help="Nominal term the learned part is added to: sgdm | adam."),
    meta_loss: str = typer.Option("ratio", help="Meta-loss per inner step: ratio (loss / initial) | log (its logarithm)."),
    norm_features: bool = typer.Option(False, help="Give f the per-tensor log gradient and weight RMS as two more inputs."),
    init_from: str = typer.Option("default", help="Initial alpha and gamma0: default (--alpha, 0.9) | tuned (the nominal "
                                  "optimizer's best grid point on the val members, so ES starts at the tuned baseline).",
                                  metavar=one_of(INIT_FROM), autocompletion=completer(INIT_FROM)),
    curriculum: int = typer.Option(0, help="Grow the episode horizon from one truncation to --horizon over this many ES steps (0 = off)."),
    validate_every: int = typer.Option(50, help="Score the meta-parameters on val-split members every N outer steps "
                                       "(and at 0 and the end); the best are saved as the optimizer. 0 = keep the last."),
    val_members: int = typer.Option(8, help="Val-split members used by --validate-every."),
    max_members: int = typer.Option(0, help="Use at most N train-split members (0 = all)."),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda or cuda:N.", metavar=one_of(DEVICES),
                               autocompletion=completer(DEVICES)),
) -> None:
    """Meta-train a learned optimizer with ES on a zoo's train-split members."""
    with user_errors():
        from pipeline.errors import ConfigError
        from pipeline.lopt.es import ESConfig
        from pipeline.lopt.meta_train import MetaTrainConfig
        from pipeline.lopt.optimizers import LOptConfig
        from pipeline.lopt.runs import meta_train_zoo

        check_device(device)
        if alpha is not None and init_from == "tuned":
            raise ConfigError("--alpha and --init-from tuned both set the initial step size; pass one of them")
        config = MetaTrainConfig(
            optimizer=LOptConfig(kind=optimizer, hidden=hidden, layers=layers, alpha=0.1 if alpha is None else alpha, beta=beta, head_scale=head_scale,
                                 nominal=nominal, norm_features=norm_features),
            es=ESConfig(estimator=estimator, pairs=pairs, sigma=sigma),
            outer_steps=outer_steps,
            horizon=horizon,
            truncation=truncation,
            outer_lr=outer_lr,
            hp_lr=hp_lr,
            grad_clip=grad_clip,
            seed=seed,
            validate_every=validate_every,
            val_members=val_members,
            meta_loss=meta_loss,
            curriculum=curriculum,
            init_from=init_from,
        )
        if seeds:
            from pipeline.lopt.runs import meta_train_seeds

            for k, result in enumerate(meta_train_seeds(zoo, config, out, seeds, device=device, max_members=max_members, progress=True)):
                sel = f", selected step {result.selected_step} (val {result.selected_val_loss:.4f})" if result.selected_step is not None else ""
                console.print(f"seed {seed + k}: meta-trained {optimizer} in {result.wall_time_s / 60:.1f} min{sel}{_warm_note(result.warm_start)}; wrote {out}/seed{seed + k}/")
            return
        result = meta_train_zoo(zoo, config, out, device=device, max_members=max_members, progress=True)
        hp = result.history[-1] if result.history else {}
        console.print(
            f"meta-trained {optimizer} in {result.wall_time_s / 60:.1f} min; last step: "
            + ", ".join(f"{k} {hp[k]:.4g}" for k in ("alpha", "beta", "gamma0", "meta_loss") if k in hp)
            + f"{_warm_note(result.warm_start)}; wrote {escape(str(out))}/"
        )
        if result.selected_step is not None:
            last = result.validation[-1]
            console.print(
                f"selected step {result.selected_step} (val loss {result.selected_val_loss:.4f} x initial, best of "
                f"{len(result.validation)} validations; last step {last['step']}: {last['val_loss']:.4f}) -> meta.safetensors; "
                "last step -> meta_last.safetensors"
            )


@lopt_app.command("eval", epilog=_EPILOG)
def eval_cmd(
    directory: Path = typer.Argument(..., help="A meta-train output folder, or a folder of them (one per optimizer, "
                                     "each one run or seed<k>/ runs)."),
    zoo: str = typer.Option(..., "--zoo", help="Zoo store whose test-split members are trained (val split tunes Adam)."),
    members: int = typer.Option(0, help="Test members to train (0 = all)."),
    val_members: int = typer.Option(8, help="Validation members for tuning Adam's learning rate (0 = all)."),
    horizon: int = typer.Option(0, help="Inner steps of the horizon (0 = the meta-training horizon)."),
    multiple: str = typer.Option("4,10", help="Also report at these multiples of the horizon (comma-separated)."),
    adam_lrs: str = typer.Option("1e-4,3e-4,1e-3,3e-3,1e-2,3e-2,1e-1", help="Adam learning-rate grid."),
    seed: int = typer.Option(0, help="Seed of the data order (the same for every optimizer)."),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda or cuda:N.", metavar=one_of(DEVICES),
                               autocompletion=completer(DEVICES)),
    out: Path = typer.Option(None, help="Output folder (results.json, results.csv, curves.png).",
                             show_default="DIRECTORY/eval"),
    versus: str = typer.Option(None, "--versus", help="Also give every optimizer's paired difference against this one "
                               "(a folder name under DIRECTORY; '' = none).", show_default="sgdm when evaluated"),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON document on stdout."),
) -> None:
    """Evaluate meta-trained optimizers and tuned Adam on a zoo's held-out members."""
    with user_errors():
        from pipeline.lopt.evaluate import EvalConfig, format_table
        from pipeline.lopt.runs import evaluate_zoo

        check_device(device)
        config = EvalConfig(
            horizon=horizon,
            multiples=_multiples(multiple),
            members=members,
            val_members=val_members,
            adam_lrs=_floats(adam_lrs, "--adam-lrs"),
            seed=seed,
            versus=versus,
        )
        # --json keeps stdout for the document: no spinner
        status = nullcontext() if as_json else console.status("training held-out members with every optimizer")
        with status:
            report, path = evaluate_zoo(directory, zoo, config, out=out, device=device)
        if as_json:
            print_json(report)
            return
        print_table(format_table(report))
        grid = ", ".join(f"{k}: {v:.4f}" for k, v in report["adam"]["grid"].items())
        console.print(f"adam lr {report['adam']['lr']:g} chosen on {report['adam']['val_members']} val members (loss@{report['horizon']}: {grid})")
        console.print(escape(f"wrote {path}, {path.parent / 'results.csv'} and {path.parent / 'curves.png'}"))
