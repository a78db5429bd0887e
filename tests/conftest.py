"""Shared pytest fixtures. Helpers add session-scoped fixtures here (tiny zoos, trained predictors)."""

from __future__ import annotations

import os

# Keep test runs deterministic and friendly to a 2-core CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")


# ---- predictors (issue 5): a tiny zoo and predictors trained on it, shared by test_predict*.py and scoring tests ----
import pytest  # noqa: E402


PREDICT_RECIPE = """
name = "predict-tiny"
description = "test zoo: 64 small MLPs on digits, accuracies from chance to well trained"
members = 64
members_per_chunk = 16
runs_per_config = 2
seed = 3
epochs = 4
checkpoint_epochs = [0, 1, 4]
[task]
name = "digits"
[arch]
name = "mlp"
hidden = [8]
[hparams]
optimizer = {choice = ["sgd", "adam"]}
activation = {choice = ["relu", "tanh"]}
batch_size = 64
lr = {log_uniform = [1e-3, 3e-1]}
train_fraction = {choice = [0.25, 1.0]}
"""


@pytest.fixture(scope="session")
def predict_zoo(tmp_path_factory):
    """A tiny real zoo (pipeline.zoo.store.Zoo, built in-process by `build_zoo`): 64 MLPs (64 -> 8 -> 10) on digits,
    checkpoints at epochs 0, 1, 4, two runs per hyperparameter configuration."""
    from pipeline.zoo.store import Zoo
    from pipeline.zoo import build_zoo

    folder = tmp_path_factory.mktemp("predict_zoo")
    (folder / "predict-tiny.toml").write_text(PREDICT_RECIPE)
    build_zoo(folder / "predict-tiny.toml", folder / "zoo.zarr", workers=0, device="cpu")
    return Zoo.open(folder / "zoo.zarr")


@pytest.fixture(scope="session")
def trained_predictors(predict_zoo, tmp_path_factory):
    """`train_predictor` result: every model kind (unf, unf-perm, statnn, deepsets, flat), one seed, a few epochs;
    predictors in `result.out_dir / <model>` (load with `pipeline.predict.load_predictor`)."""
    from pipeline.predict import TrainConfig, train_predictor

    config = TrainConfig(models="all", checkpoints="all", fractions=(0.6, 0.2, 0.2), epochs=4, device="cpu",
                         unf_hidden=(8, 8), unf_head=(64,), deepsets_hidden=16, deepsets_head=(64,), flat_hidden=(64,))
    return train_predictor(predict_zoo, config, tmp_path_factory.mktemp("trained_predictors") / "out")


# ---- scoring (issue 6): a tiny zoo of width-16 CNNs and predictors trained on it, for test_score*.py ----
SCORE_CNN_EPOCHS = (0, 5)
SCORE_CNN_ARCH = {"name": "cnn", "channels": [16, 16, 16], "kernel_size": 3, "stride": 2, "padding": 1,
                  "in_channels": 1, "num_classes": 10, "activation": "relu"}


@pytest.fixture(scope="session")
def score_zoo(tmp_path_factory):
    """A 40-member zoo of the engine's CNN member (3 conv 3x3, 16 channels, + linear 10) written through the store
    API without training (seconds, not minutes): weights are random with a per-member scale and test_acc falls with
    that scale, so a predictor can learn it; `zoo.module(i)` rebuilds members. Member 0 diverged: final weights NaN."""
    import numpy as np

    from pipeline.zoo.members import build_member
    from pipeline.zoo.store import MemberBlock, StoreLayout, Zoo, create_store, write_members, write_splits
    from unf_models import WeightSpec

    spec = WeightSpec.from_module(build_member(SCORE_CNN_ARCH))
    layout = StoreLayout(weight_shapes=spec.shapes, metric_names=("test_acc",), checkpoint_epochs=SCORE_CNN_EPOCHS,
                         members_per_chunk=20, continuous=("lr",), categorical={})
    url = str(tmp_path_factory.mktemp("score_zoo") / "cnn.zarr")
    n, k = 40, 20
    attrs = {"spec": spec.to_dict(), "arch": SCORE_CNN_ARCH, "name": "score-cnn", "task": {"name": "digits"}}
    create_store(url, layout, attrs, n)
    rng = np.random.default_rng(0)
    for start in range(0, n, k):
        scale = rng.uniform(0.05, 0.5, size=(k, len(SCORE_CNN_EPOCHS)))  # (members, checkpoints)
        weights = {  # (members, checkpoints, *shape)
            name: (rng.standard_normal((k, len(SCORE_CNN_EPOCHS), *shape)) * scale.reshape(k, -1, *[1] * len(shape)))
            .astype(np.float32) for name, shape in spec.shapes.items()
        }
        diverged = np.zeros(k, dtype=bool)
        if start == 0:
            diverged[0] = True
            for w in weights.values():
                w[0, -1] = np.nan
        write_members(url, start, MemberBlock(
            weights=weights, metrics={"test_acc": (1.0 - scale).astype(np.float32)}, hparams={"lr": scale[:, 0]},
            seed=np.arange(start, start + k), config=np.arange(start, start + k), diverged=diverged,
            diverged_epoch=np.where(diverged, SCORE_CNN_EPOCHS[-1], -1).astype(np.int32),
        ))
    write_splits(url)
    return Zoo.open(url)


@pytest.fixture(scope="session")
def score_predictor_dirs(score_zoo, tmp_path_factory):
    """{"unf": folder of a width-agnostic UNF predictor, "flat": folder of a fixed-width MLP predictor}, both trained
    briefly on `score_zoo` with `train_predictor`."""
    from pipeline.predict import TrainConfig, train_predictor

    config = TrainConfig(models=("unf", "flat"), checkpoints="final", fractions=(0.6, 0.2, 0.2), epochs=2,
                         batch_size=32, device="cpu", unf_hidden=(4,), unf_head=(16,), flat_hidden=(16,))
    out = train_predictor(score_zoo, config, tmp_path_factory.mktemp("score_predictors") / "out").out_dir
    return {kind: out / kind for kind in ("unf", "flat")}


@pytest.fixture(scope="session")
def score_predictors(score_predictor_dirs):
    """The predictors of `score_predictor_dirs`, loaded on the CPU."""
    from pipeline.predict import load_predictor

    return {kind: load_predictor(path, device="cpu") for kind, path in score_predictor_dirs.items()}


@pytest.fixture(scope="session")
def predict_zoo_wide(tmp_path_factory):
    """Like `predict_zoo` but wider (64 -> 12 -> 10), 32 members, another seed and only the adam optimizer: a
    "foreign" zoo of the same architecture family for multi-zoo and eval-zoo tests."""
    from pipeline.zoo.store import Zoo
    from pipeline.zoo import build_zoo

    folder = tmp_path_factory.mktemp("predict_zoo_wide")
    recipe = (PREDICT_RECIPE.replace('name = "predict-tiny"', 'name = "predict-wide"').replace("members = 64", "members = 32")
              .replace("hidden = [8]", "hidden = [12]").replace("seed = 3", "seed = 11")
              .replace('optimizer = {choice = ["sgd", "adam"]}', 'optimizer = {choice = ["adam"]}'))
    (folder / "predict-wide.toml").write_text(recipe)
    build_zoo(folder / "predict-wide.toml", folder / "wide.zarr", workers=0, device="cpu")
    return Zoo.open(folder / "wide.zarr")
