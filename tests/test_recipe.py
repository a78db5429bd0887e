"""Recipes: validation names the file, field and allowed values; draws are deterministic and extension-stable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import RecipeError
from pipeline.zoo.recipe import draw_chunk, draw_hparams, load_recipe, parse_recipe, recipe_names

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
    small = load_recipe("cnn-digits-smallcnnzoo")
    assert small.members >= 1000
    assert {n: small.hparams[n].kind for n in ("lr", "weight_decay", "init_std")} == dict.fromkeys(("lr", "weight_decay", "init_std"), "log_uniform")
    assert set(small.hparams["optimizer"].values) == {"sgd", "momentum", "adam"}
    assert small.hparams["train_fraction"].values == (0.1, 0.25, 0.5, 1.0)


def test_default_and_foreign_recipes_are_diverse_and_disjoint() -> None:
    """The default zoo uses every non-held-out family; the foreign zoos only families the defaults never use."""
    from pipeline.zoo.population import HELD_OUT_INITS, HELD_OUT_OPTIMIZERS, INIT_SCHEMES, OPTIMIZERS, SCHEDULES

    for default, foreign in (("cnn-digits", "cnn-digits-foreign"), ("mlp-digits-diverse", "mlp-digits-foreign")):
        d, f = load_recipe(default), load_recipe(foreign)
        assert d.members >= 2048 and d.arch["name"] == f.arch["name"]
        values = lambda r, n: set(r.hparams[n].values)  # noqa: E731
        assert values(d, "optimizer") == set(OPTIMIZERS) - set(HELD_OUT_OPTIMIZERS)
        assert values(d, "init") == set(INIT_SCHEMES) - set(HELD_OUT_INITS)
        assert values(d, "schedule") == set(SCHEDULES) and len(values(d, "width")) >= 3
        assert set(d.hparams["lr"].branches) == values(d, "optimizer")  # an lr range per family
        assert values(f, "optimizer") <= set(HELD_OUT_OPTIMIZERS) and values(f, "init") <= set(HELD_OUT_INITS)
        assert min(values(f, "width")) > max(values(d, "width"))
        for name in ("label_noise", "shift", "epochs"):
            assert len(values(d, name)) > 1, name
    gru = load_recipe("gru-arith")
    assert gru.hparams["lr"].values == (1e-4, 1e-2) and gru.hparams["batch_size"].values == (64, 128, 256)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("members = 10", "members = 0"), "field 'members' must be an integer >= 1"),
        (("members = 10", "members = 10\ncolour = 1"), "unknown field 'colour'; allowed fields: name, description"),
        (('optimizer = {choice = ["sgd", "adam"]}', 'optimizer = {choice = ["sgd", "lion"]}'), "'lion' is not allowed; allowed values: "),
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


DIVERSE = BASE.replace(
    'lr = {log_uniform = [1e-3, 1e-1]}',
    """init = {choice = ["torch", "xavier_normal"]}
schedule = {choice = ["constant", "cosine"]}
width = {choice = [8, 16]}
label_noise = {uniform = [0.0, 0.2]}
shift = {choice = [0, 1]}
epochs = {choice = [1, 2]}
lr = {by = "optimizer", sgd = {log_uniform = [0.05, 0.2]}, adam = {log_uniform = [1e-3, 3e-3]}}""",
)


def test_conditional_ranges_follow_each_chunks_categorical_value() -> None:
    recipe = parse_recipe(DIVERSE, source="diverse.toml")
    assert recipe.hparams["lr"].kind == "by" and set(recipe.hparams["lr"].branches) == {"sgd", "adam"}
    assert parse_recipe(recipe.to_dict()) == recipe  # the TOML shape round-trips, conditional included
    assert recipe.identity()["hparams"]["lr"]["by"] == "optimizer"
    hp = draw_hparams(recipe.with_members(64))
    sgd = hp["optimizer"] == "sgd"
    assert sgd.any() and (~sgd).any()
    assert ((hp["lr"][sgd] >= 0.05) & (hp["lr"][sgd] <= 0.2)).all()
    assert ((hp["lr"][~sgd] >= 1e-3) & (hp["lr"][~sgd] <= 3e-3)).all()
    assert set(hp["width"]) == {8, 16} and set(hp["init"]) == {"torch", "xavier_normal"}
    assert set(hp["shift"]) == {0.0, 1.0} and set(hp["epochs"]) == {1.0, 2.0}
    # the new names draw from their own streams: a recipe without them draws the same lr values given the optimizer
    plain = parse_recipe(BASE.replace("lr = {log_uniform = [1e-3, 1e-1]}", "lr = {log_uniform = [0.05, 0.2]}"))
    first = draw_chunk(plain, 0)
    assert first.continuous["lr"].min() >= 0.05


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("by = \"optimizer\"", "by = \"activation\""), "by = 'activation' must name a per-chunk hyperparameter of this recipe"),
        ((", adam = {log_uniform = [1e-3, 3e-3]}", ""), "needs one entry per value of 'optimizer' (sgd, adam); missing 'adam'"),
        (("adam = {log_uniform", "adamw = {log_uniform"), "missing 'adam'"),
        (("sgd = {log_uniform = [0.05, 0.2]}", "sgd = {by = \"width\", 8 = 0.1}"), "not nested"),
        (("shift = {choice = [0, 1]}", "shift = {uniform = [0, 2]}"), "shift takes whole numbers"),
        (("epochs = {choice = [1, 2]}", "epochs = {choice = [1, 3]}"), "per-member epochs must be <= epochs (2)"),
        (("width = {choice = [8, 16]}", "width = {choice = [8, 0]}"), "widths must be positive integers"),
        (('init = {choice = ["torch", "xavier_normal"]}', 'init = {choice = ["torch", "lecun"]}'), "'lecun' is not allowed"),
        (('schedule = {choice = ["constant", "cosine"]}', 'schedule = "onecycle"'), "'onecycle' is not allowed"),
        (("label_noise = {uniform = [0.0, 0.2]}", "label_noise = 1.0"), "outside the allowed range [0.0, 1.0)"),
        (('name = "mlp"', 'name = "gru_seq2seq"'), "field 'hparams.width' applies to arch 'cnn' or 'mlp'"),
    ],
)
def test_option_validation_names_the_field(tmp_path: Path, edit: tuple[str, str], message: str) -> None:
    path = tmp_path / "bad.toml"
    assert edit[0] in DIVERSE
    path.write_text(DIVERSE.replace(*edit))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(path) in str(info.value) and message in str(info.value)
