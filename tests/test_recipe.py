"""Recipes: validation names the file, field and allowed values; draws are deterministic and extension-stable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import RecipeError
from pipeline.recipe import draw_chunk, draw_hparams, load_recipe, parse_recipe, recipe_names

BASE = """
name = "tiny"
members = 10
members_per_chunk = 4
seed = 3
epochs = 2
checkpoint_epochs = [0, 1, 2]
[task]
name = "digits"
[arch]
name = "mlp"
[hparams]
optimizer = {choice = ["sgd", "adam"]}
batch_size = {choice = [32, 64]}
lr = {log_uniform = [1e-3, 1e-1]}
dropout = {uniform = [0.0, 0.5]}
train_fraction = {choice = [0.25, 1.0]}
"""


def test_shipped_recipes_are_valid() -> None:
    names = recipe_names()
    assert {"cnn-digits", "mlp-digits", "mlp-mnist1d", "mlp-fashion8", "gru-arith"} <= set(names)
    assert any(n.startswith("transformer-") for n in names)
    for name in names:
        recipe = load_recipe(name)
        assert recipe.name == name and recipe.checkpoint_epochs[0] == 0 and recipe.checkpoint_epochs[-1] == recipe.epochs
    cnn = load_recipe("cnn-digits")
    assert cnn.members >= 1000
    assert {n: cnn.hparams[n].kind for n in ("lr", "weight_decay", "init_std")} == dict.fromkeys(("lr", "weight_decay", "init_std"), "log_uniform")
    assert set(cnn.hparams["optimizer"].values) == {"sgd", "momentum", "adam"}
    assert cnn.hparams["train_fraction"].values == (0.1, 0.25, 0.5, 1.0)
    gru = load_recipe("gru-arith")
    assert gru.hparams["lr"].values == (1e-4, 1e-2) and gru.hparams["batch_size"].values == (64, 128, 256)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("members = 10", "members = 0"), "field 'members' must be an integer >= 1"),
        (("members = 10", "members = 10\ncolour = 1"), "unknown field 'colour'; allowed fields: name, description"),
        (('optimizer = {choice = ["sgd", "adam"]}', 'optimizer = {choice = ["sgd", "rmsprop"]}'), "'rmsprop' is not allowed; allowed values: "),
        (("lr = {log_uniform = [1e-3, 1e-1]}", "lr = {log_uniform = [0.0, 1e-1]}"), "hparams.lr"),
        (("lr = {log_uniform = [1e-3, 1e-1]}", "lr = {normal = [0.0, 1e-1]}"), "one of log_uniform, uniform, choice"),
        (("dropout = {uniform = [0.0, 0.5]}", "dropout = {uniform = [0.0, 1.5]}"), "outside the allowed range [0.0, 1.0)"),
        (("checkpoint_epochs = [0, 1, 2]", "checkpoint_epochs = [1, 2]"), "field 'checkpoint_epochs' must be a strictly increasing"),
        (("[hparams]", "[hparams]\nmomentum = 0.9"), "unknown field 'hparams.momentum'; allowed hyperparameters: optimizer"),
        (("members_per_chunk = 4", "members_per_chunk = 4\nruns_per_config = 3"), "multiple of 'runs_per_config'"),
        (("members = 10", "members = 10\n[extra"), "not valid TOML"),
    ],
)
def test_validation_names_file_field_and_allowed_values(tmp_path: Path, edit: tuple[str, str], message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(BASE.replace(*edit))
    with pytest.raises(RecipeError, match=None) as info:
        load_recipe(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_missing_recipe_lists_the_shipped_ones() -> None:
    with pytest.raises(RecipeError, match="cnn-digits"):
        load_recipe("no-such-recipe")


def test_draws_are_deterministic_and_per_chunk_categorical() -> None:
    recipe = parse_recipe(BASE)
    a, b = draw_hparams(recipe), draw_hparams(recipe)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    for c in range(3):  # optimizer and batch size constant inside a chunk
        draw = draw_chunk(recipe, c)
        assert isinstance(draw.categorical["optimizer"], str) and draw.categorical["batch_size"] in (32, 64)
        assert len(draw.members) == (4 if c < 2 else 2)
    lr = a["lr"]
    assert ((lr >= 1e-3) & (lr <= 1e-1)).all() and len(np.unique(lr)) == 10
    assert set(a["train_fraction"]) <= {0.25, 1.0}
    other_seed = draw_hparams(parse_recipe(BASE.replace("seed = 3", "seed = 4")))
    assert not np.array_equal(other_seed["lr"], lr)


def test_extending_never_changes_earlier_members() -> None:
    recipe = parse_recipe(BASE)
    small, big = draw_hparams(recipe, 10), draw_hparams(recipe, 23)
    for k in small:
        assert list(big[k][:10]) == list(small[k]), k


def test_runs_per_config_share_continuous_hparams() -> None:
    recipe = parse_recipe(BASE.replace("members_per_chunk = 4", "members_per_chunk = 4\nruns_per_config = 2"))
    draw = draw_chunk(recipe, 1)
    assert list(draw.config) == [2, 2, 3, 3]
    assert draw.continuous["lr"][0] == draw.continuous["lr"][1] != draw.continuous["lr"][2]


def test_identity_ignores_member_count_and_text() -> None:
    a = parse_recipe(BASE)
    b = parse_recipe("# a comment\n" + BASE.replace("members = 10", "members = 99"))
    assert a.identity() == b.identity() and a != b
    assert parse_recipe(BASE.replace("seed = 3", "seed = 5")).identity() != a.identity()
    assert parse_recipe(a.to_dict()).identity() == a.identity()


def test_categorical_combinations_are_balanced_over_chunks() -> None:
    recipe = parse_recipe(BASE.replace("members = 10", "members = 40"))  # 2 optimizers x 2 batch sizes, 10 chunks
    combos = [tuple(draw_chunk(recipe, c).categorical.values()) for c in range(10)]
    assert len(set(combos[:4])) == 4 and len(set(combos[4:8])) == 4  # each block of 4 chunks holds every combination
    assert combos[:4] != combos[4:8]  # in an order drawn per block
    assert all(draw_chunk(recipe.with_members(12), c).categorical == draw_chunk(recipe, c).categorical for c in range(3))
