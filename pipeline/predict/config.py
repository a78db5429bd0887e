"""The frozen configuration of one `unfzoo train` invocation (every model kind, every seed)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import ConfigError

__all__ = ["MODEL_NAMES", "MODEL_KINDS", "ALL_MODELS", "PROBE_MODELS", "FEATURES", "NORMALIZE", "TrainConfig",
           "parse_models", "parse_checkpoints"]

# `--features` choices of the torch models -> input channels per weight (see `models.pointwise_features`)
# "raw+log+size" adds log10 of the tensor's entries per member, a constant per tensor that tells the model the width
FEATURES: dict[str, int] = {"raw": 1, "raw+log": 2, "raw+log+size": 3}
# `--normalize` choices: "tensor" (one scalar mean/std per tensor from the training rows) | "member" (scale-aware:
# each member's tensor divided by its own RMS, plus a constant channel holding log10 of that RMS, so the network sees
# shape and scale separately; still permutation invariant and width-agnostic) | "fanin" (as "member", but the scale
# channel holds log10(RMS * sqrt(fan_in)): standard inits put that near a constant at every width, so a wider network
# is not read as a small-weight one)
NORMALIZE: dict[str, int] = {"tensor": 0, "member": 1, "fanin": 1}  # extra input channels

# Model names a user may ask for -> the predictor kind they train. "unf-perm" is the ablation: UNF with fixed axes
# (input features, classes, kernel positions) treated as permutable, as the reference implementation does.
# "unf-hybrid": UNF whose head also reads the STATNN statistics (standardized) beside the UNF pooled features.
# "probe": the member's outputs on learned probe inputs -> MLP (reads the function; cnn and mlp zoos built by `unfzoo
# zoo`); "unf-probe": UNF pooled features and those probe outputs side by side -> MLP head.
MODEL_KINDS: dict[str, str] = {
    "unf": "unf",
    "unf-perm": "unf",
    "statnn": "statnn",
    "deepsets": "deepsets",
    "flat": "flat",
    "unf-hybrid": "hybrid",
    "unf-probe": "unf-probe",
    "probe": "probe",
}
MODEL_NAMES: tuple[str, ...] = tuple(MODEL_KINDS)
# The UNF forms (exact, tied fixed axes) and the name of whichever has the better validation tau: a report row and,
# after `unfzoo train`, a predictor folder
UNF_FORMS: tuple[str, ...] = ("unf", "unf-perm", "unf-probe")
SELECTED_UNF = "unf-val"
# the models that read a member through its function; `--model all` leaves them out on zoos they cannot read
PROBE_MODELS: tuple[str, ...] = ("unf-probe", "probe")
ALL_MODELS: tuple[str, ...] = ("unf", "statnn", "deepsets", "flat", "unf-perm", *PROBE_MODELS)


def parse_models(text: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """'unf', 'unf,statnn' or 'all' -> a tuple of model names, validated."""
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    if items == ["all"]:
        return ALL_MODELS
    bad = [m for m in items if m not in MODEL_KINDS]
    if bad or not items:
        raise ConfigError(f"--model {','.join(bad) or text!r} is unknown; use one of {', '.join(MODEL_NAMES)} or all")
    return tuple(dict.fromkeys(items))


def parse_checkpoints(text: str | tuple[int, ...]) -> str | tuple[int, ...]:
    """'final', 'all' or a comma list of epochs '0,5,20' -> 'final' | 'all' | (0, 5, 20)."""
    if isinstance(text, tuple):
        return tuple(int(e) for e in text)
    text = text.strip()
    if text in ("final", "all"):
        return text
    try:
        epochs = tuple(int(e) for e in text.split(",") if e.strip())
    except ValueError as err:
        raise ConfigError(f"--checkpoints {text!r}: use final, all or a comma list of epochs such as 0,5,20") from err
    if not epochs:
        raise ConfigError("--checkpoints is empty: use final, all or a comma list of epochs such as 0,5,20")
    return epochs


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a predictor comparison; stored (resolved) in every output directory.

    The data split is fixed by `split_seed`; `seeds` model seeds (0..seeds-1) vary initialisation and batch order, so
    the spread over seeds measures the predictors, on the same members, and comparisons between models are paired.
    """

    models: tuple[str, ...] = ("unf",)
    target: str = "test_acc"
    checkpoints: str | tuple[int, ...] = "final"  # rows evaluated (and trained on): "final" | "all" | epochs
    # extra checkpoints used as training rows only (val/test/eval rows stay `checkpoints`): "same" | "all" | epochs
    train_checkpoints: str | tuple[int, ...] = "same"
    split: str = "run"  # "run" | "config" | "group:<hparam>[=v1,v2]" (held-out hyperparameter group(s) = test)
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    split_seed: int = 0
    seeds: int = 1
    include_diverged: bool = False
    loss: str = "auto"  # "auto" (BCE when train+val targets lie in [0, 1], else MSE) | "bce" | "mse"
    # torch models (unf, deepsets, flat)
    epochs: int = 25
    batch_size: int = 10
    lr: float = 1e-3
    patience: int = 6  # epochs without a better validation tau before stopping
    augment: bool = False  # random permutation (group element) per batch on the training inputs
    # "fanin" by default (scale-aware with a width-free scale channel, see NORMALIZE). "member" beat "tensor" on held-out
    # optimizer groups and a wider zoo (mlp-digits, docs/results.md); on cnn-digits "fanin" then beat "member" with UNF
    # on a held-out width (train 8/16, test the 24-wide members: tau 0.707 +- 0.005 vs 0.643 +- 0.008, 3 seeds) and a
    # held-out optimizer (rmsprop, 2 seeds), and on in-group validation (0.778 vs 0.733).
    normalize: str = "fanin"
    # weight of a pairwise ranking term added to the loss: within each batch, softplus(-(s_i - s_j)) over the pairs whose
    # targets order i above j (RankNet); Kendall tau scores exactly that order, which BCE/MSE only reach through the
    # values. 0 = off
    rank_weight: float = 0.0
    ensemble: bool = False  # also report "<model>-ens": the mean prediction over seeds
    bootstrap: int = 1000  # resamples of every bootstrap interval (tau, paired tau differences)
    chance_margin: float = 0.05  # members with accuracy > 1/n_classes + margin count as trained (tau_above, AUC)
    # input channels of the torch models: "raw" | "raw+log" (adds log|w|: member weight scales span ~50x; on a
    # 302-member validation of cnn-digits-smallcnnzoo UNF's tau rose 0.690 -> 0.741 with it) | "raw+log+size".
    # "raw+log+size" by default: on held-out groups of cnn-digits it fixed UNF's calibration at an unseen width (bias
    # -0.060 -> +0.002, R^2 0.71 -> 0.79, tau level) and won on a held-out optimizer (0.589 -> 0.636) and on validation
    features: str = "raw+log+size"
    unf_hidden: tuple[int, ...] = (16, 16)
    unf_head: tuple[int, ...] = (512,)
    # a learned embedding along the fixed axes at the first layer of `unf-perm` (the reference code's io_embed), so
    # the tied layer can tell pixels, kernel positions and classes apart again; exact `unf` needs none. Off: it tied
    # unf-perm on held-out widths of cnn-digits and mlp-digits-diverse (docs/results.md)
    unf_pos_embed: bool = False
    # fixed labels that `unf-perm` keeps fixed (exact) while it ties every other one, e.g. an MLP's input pixels
    # ("x.2", "x.3"): the network's input keeps its identity, kernel positions and classes are tied. () = tie all
    unf_keep_fixed: tuple[str, ...] = ()
    deepsets_hidden: int = 32
    deepsets_head: tuple[int, ...] = (512,)
    flat_hidden: tuple[int, ...] = (512, 512)
    probes: int = 64  # learned probe inputs of `probe` and `unf-probe`
    probe_head: tuple[int, ...] = (512,)  # hidden sizes of `probe`'s head (`unf-probe` uses unf_head)
    statnn_candidates: tuple[str, ...] = ("gbr-d3", "gbr-d5", "mlp-a1e-3", "mlp-a1e-1")  # see STATNN_CANDIDATES
    eval_batch_size: int = 256
    device: str = "auto"
    # float32 matmul precision of the torch models' training steps (pipeline.device.MATMUL_PRECISIONS): "highest"
    # (float32) | "high" (TF32 on NVIDIA GPUs) | "medium" (bfloat16 products, also on CPUs with AMX). Validation,
    # test and saved predictions run outside those steps, at torch's default "highest", so reported metrics are what
    # `unfzoo score` computes
    matmul_precision: str = "highest"
    # torch.compile (inductor) the torch models' training forward passes: faster steps after a compile of tens of
    # seconds to a minute per model (and per batch shape), so it pays on long runs. Same computation up to float
    # rounding, so not part of the run key (like the device)
    compile: bool = False
    max_members: int | None = None  # use only the first N members (quick runs); None = all
    # hyperparameters (at most 20 distinct values) whose values get their own mean-error rows in the report (test and
    # eval splits), e.g. ("shift", "optimizer"): where a predictor over- or under-predicts a training recipe
    bias_by: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes kept with the config

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", parse_models(self.models))
        object.__setattr__(self, "checkpoints", parse_checkpoints(self.checkpoints))
        tc = self.train_checkpoints
        object.__setattr__(self, "train_checkpoints", tc if tc == "same" else parse_checkpoints(tc))
        from pipeline.zoo.splits import parse_split

        object.__setattr__(self, "split", str(parse_split(self.split)))
        for name in ("fractions", "unf_hidden", "unf_head", "deepsets_head", "flat_hidden", "statnn_candidates",
                     "unf_keep_fixed", "probe_head", "bias_by"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.normalize not in NORMALIZE:
            raise ConfigError(f"--normalize {self.normalize!r} is unknown; use {' or '.join(NORMALIZE)}")
        if not 0 <= self.chance_margin < 1:
            raise ConfigError(f"--chance-margin must lie in [0, 1), got {self.chance_margin}")
        if self.features not in FEATURES:
            raise ConfigError(f"--features {self.features!r} is unknown; use {' or '.join(FEATURES)}")
        if self.loss not in ("auto", "bce", "mse"):
            raise ConfigError(f"loss {self.loss!r} is unknown; use auto, bce or mse")
        if len(self.fractions) != 3 or min(self.fractions) < 0 or abs(sum(self.fractions) - 1) > 1e-6:
            raise ConfigError(f"fractions {self.fractions} must be three non-negative numbers summing to 1")
        for name in ("seeds", "epochs", "batch_size", "patience", "eval_batch_size", "deepsets_hidden", "bootstrap",
                     "probes"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        from pipeline.predict.statnn import STATNN_CANDIDATES

        known = [c[0] for c in STATNN_CANDIDATES]
        if not self.statnn_candidates or set(self.statnn_candidates) - set(known):
            raise ConfigError(f"statnn_candidates {self.statnn_candidates} must be a non-empty subset of {known}")
        if not 0 <= self.rank_weight < 1e3:
            raise ConfigError(f"--rank-weight must lie in [0, 1000), got {self.rank_weight}")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if self.unf_keep_fixed and self.unf_pos_embed:
            raise ConfigError("--keep-fixed and --pos-embed do not combine: a kept label needs no embedding; "
                              "use one of them")
        from pipeline.device import check_matmul_precision

        check_matmul_precision(self.matmul_precision)
        if self.max_members is not None and self.max_members < 3:
            raise ConfigError(f"--max-members must be at least 3 (train, val, test), got {self.max_members}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in known}
        return cls(**kwargs)

    def tied_form_options(self, model: str) -> dict[str, Any]:
        """The options only the tied form (`unf-perm`) takes, as they enter its hyperparameters and run key: the
        positional embedding and the labels it keeps fixed; empty for every other model and when unset."""
        if model != "unf-perm":
            return {}
        return {**({"pos_embed": True} if self.unf_pos_embed else {}),
                **({"keep_fixed": sorted(self.unf_keep_fixed)} if self.unf_keep_fixed else {})}

    def run_key(self, model: str) -> str:
        """Hash of the fields that decide one model's runs: a finished or interrupted run is reused only when it
        matches (changing the device, the seed count or another model's settings keeps it)."""
        d = self.to_dict()
        fields = ["target", "checkpoints", "train_checkpoints", "split", "fractions", "split_seed",
                  "include_diverged", "loss", "max_members"]
        kind = MODEL_KINDS[model]
        if kind == "statnn":
            fields += ["statnn_candidates"]
        elif kind == "probe":
            fields += ["epochs", "batch_size", "lr", "patience", "probes", "probe_head"]
        else:
            net = "unf" if kind in ("hybrid", "unf-probe") else kind
            fields += ["epochs", "batch_size", "lr", "patience", "augment", "features", f"{net}_hidden"]
            fields += [f"{net}_head"] if net in ("unf", "deepsets") else []
            fields += ["probes"] if kind == "unf-probe" else []
            fields += ["normalize"] if self.normalize != "tensor" else []  # old runs keep their keys
            fields += ["rank_weight"] if self.rank_weight else []
            fields += ["matmul_precision"] if self.matmul_precision != "highest" else []
        payload = {"model": model, **{k: d[k] for k in fields}, **self.tied_form_options(model)}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
