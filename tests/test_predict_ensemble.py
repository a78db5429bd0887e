"""Seed ensembles as saved predictors: the ensemble folder format, the validation-only choice between a model's seed
ensemble and its best seed (`<out>/<model>/`, `<out>/unf-val/`, selection.json, the report's unf-val row), and
scoring an ensemble folder with `unfzoo score`."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from pipeline.errors import PredictorError
from pipeline.predict import TrainConfig, load_predictor, train_predictor
from pipeline.predict.artifacts import ENSEMBLE_FORMAT, EnsemblePredictor, Predictor, save_ensemble
from pipeline.predict.report import model_choice, seed_or_ensemble
from pipeline.predict.train import kendall_tau

FORMS = ("unf", "unf-perm")


@pytest.fixture(scope="module")
def seed_runs(predict_zoo, tmp_path_factory):
    """Both UNF forms, two seeds each, two epochs, tiny layers: `train_predictor`'s own choice."""
    config = TrainConfig(models=FORMS, seeds=2, checkpoints="all", fractions=(0.6, 0.2, 0.2), epochs=2, device="cpu",
                         unf_hidden=(4,), unf_head=(16,), bootstrap=50)
    return train_predictor(predict_zoo, config, tmp_path_factory.mktemp("seed_runs") / "out")


@pytest.fixture(scope="module", params=["natural", "ensemble", "seed"])
def chosen(request, seed_runs, predict_zoo, tmp_path_factory):
    """`seed_runs`, and copies of its folder rerun (finished runs are reused, not retrained) with the rule's verdict
    forced to "ensemble" or "seed", so both ways of writing the folders and the report are exercised whatever the
    taus of this tiny zoo are on this CPU. Returns (the TrainResult, the forced verdict or None)."""
    if request.param == "natural":
        return seed_runs, None
    import pipeline.predict.report as report

    out = tmp_path_factory.mktemp(f"forced_{request.param}") / "out"
    shutil.copytree(seed_runs.out_dir, out)
    real = report.seed_or_ensemble

    def forced(preds, true):
        return {**real(preds, true), "predictor": request.param}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report, "seed_or_ensemble", forced)
        result = train_predictor(predict_zoo, seed_runs.config, out)
    assert [r.history for r in result.runs] == [r.history for r in seed_runs.runs]  # reused, not retrained
    return result, request.param


def _val(run) -> tuple[np.ndarray, np.ndarray]:
    frame = run.predictions[run.predictions["split"] == "val"]
    return frame["prediction"].to_numpy(), frame["target"].to_numpy()


def _final_weights(zoo, members):
    return zoo.weights(np.asarray(members), len(zoo.checkpoint_epochs) - 1)


def test_rule_picks_the_ensemble_only_when_it_is_at_least_as_good_on_validation() -> None:
    true = np.arange(8.0)
    one_swap_a = np.array([1, 0, 2, 3, 4, 5, 6, 7.0])  # tau 26/28 each
    one_swap_b = np.array([0, 1, 2, 3, 5, 4, 6, 7.0])
    wins = seed_or_ensemble({0: one_swap_a, 1: one_swap_b}, true)  # the mean only ties, never swaps: tau 0.963
    assert wins["predictor"] == "ensemble" and wins["ensemble_val_tau"] > wins["best_seed_val_tau"]
    assert wins["seed_val_tau"] == pytest.approx({0: 26 / 28, 1: 26 / 28}) and wins["seed"] == 0
    noisy = np.array([7, 6, 5, 4, 0, 1, 2, 3.0])  # the second seed drags the mean below the perfect first one
    loses = seed_or_ensemble({3: true, 5: noisy}, true)
    assert loses["predictor"] == "seed" and loses["seed"] == 3 and loses["best_seed_val_tau"] == pytest.approx(1.0)
    assert loses["ensemble_val_tau"] < 1.0 and loses["seeds"] == [3, 5]
    assert seed_or_ensemble({0: one_swap_a, 1: one_swap_a}, true)["predictor"] == "ensemble"  # a tie: ensemble
    single = seed_or_ensemble({2: one_swap_a}, true)
    assert single["predictor"] == "seed" and single["ensemble_val_tau"] is None


def test_ensemble_folder_loads_and_predicts_the_mean_of_its_members(seed_runs, predict_zoo, tmp_path: Path) -> None:
    runs = [r for r in seed_runs.runs if r.model == "unf"]
    folder = tmp_path / "ens"
    for r in runs:  # only the predictor files: the folder is self-contained
        (folder / r.directory.name).mkdir(parents=True)
        for name in ("predictor.json", "model.safetensors"):
            shutil.copyfile(r.directory / name, folder / r.directory.name / name)
    save_ensemble(folder, [r.directory.name for r in runs], {"val_tau": 0.5})
    config = json.loads((folder / "predictor.json").read_text())
    assert config["format"] == ENSEMBLE_FORMAT and config["kind"] == "ensemble"
    assert config["members"] == ["seed0", "seed1"] and config["seeds"] == [0, 1] and config["val_tau"] == 0.5
    moved = tmp_path / "elsewhere" / "ens"
    shutil.move(folder, moved)  # members are named relative to the folder: it can be moved
    ensemble = load_predictor(moved, device="cpu").to("cpu")
    assert isinstance(ensemble, EnsemblePredictor) and len(ensemble.members) == 2
    assert (ensemble.kind, ensemble.target, ensemble.width_agnostic) == ("unf", "test_acc", True)
    assert ensemble.spec == predict_zoo.spec and ensemble.device == torch.device("cpu")
    members = [load_predictor(r.directory, device="cpu") for r in runs]
    weights = _final_weights(predict_zoo, range(10))
    pred = ensemble.predict(weights)
    np.testing.assert_allclose(pred, np.mean([m.predict(weights) for m in members], axis=0), rtol=0, atol=1e-6)
    assert ((pred >= 0) & (pred <= 1)).all()
    # the same as the mean of the training-time predictions of those rows
    frames = [r.predictions for r in runs]
    final = int(predict_zoo.checkpoint_epochs[-1])
    rows = frames[0][(frames[0]["epoch"] == final)].head(5)
    mean = np.mean([f.loc[rows.index, "prediction"].to_numpy() for f in frames], axis=0)
    np.testing.assert_allclose(ensemble.predict(_final_weights(predict_zoo, rows["member"])), mean, rtol=0, atol=1e-6)


def test_model_folder_holds_the_choice_made_on_validation(chosen, predict_zoo) -> None:
    chosen, forced = chosen
    out = chosen.out_dir
    weights = _final_weights(predict_zoo, range(6))
    for model in FORMS:
        runs = [r for r in chosen.runs if r.model == model]
        selection = json.loads((out / model / "selection.json").read_text())
        val = [_val(r) for r in runs]
        seed_taus = {str(r.seed): kendall_tau(p, t) for r, (p, t) in zip(runs, val)}
        assert selection["seed_val_tau"] == pytest.approx(seed_taus)
        assert selection["best_seed_val_tau"] == pytest.approx(max(seed_taus.values()))
        assert selection["ensemble_val_tau"] == pytest.approx(kendall_tau(np.mean([p for p, _ in val], axis=0),
                                                                          val[0][1]))
        wins = selection["ensemble_val_tau"] >= selection["best_seed_val_tau"]
        assert selection["predictor"] == (forced or ("ensemble" if wins else "seed"))
        assert selection["model"] == model and "validation" in selection["rule"]
        predictor = load_predictor(out / model, device="cpu")
        members = [load_predictor(r.directory, device="cpu").predict(weights) for r in runs]
        if selection["predictor"] == "ensemble":
            assert isinstance(predictor, EnsemblePredictor) and not (out / model / "model.safetensors").exists()
            np.testing.assert_allclose(predictor.predict(weights), np.mean(members, axis=0), rtol=0, atol=1e-6)
        else:
            assert isinstance(predictor, Predictor)
            assert predictor.config["training"]["seed"] == selection["seed"]
            np.testing.assert_array_equal(predictor.predict(weights), members[selection["seed"]])


def test_unf_val_folder_and_report_row_stand_for_the_same_predictor(chosen, predict_zoo, tmp_path: Path) -> None:
    chosen, forced = chosen
    out = chosen.out_dir
    selection = json.loads((out / "unf-val" / "selection.json").read_text())
    form = selection["form"]
    of_form = json.loads((out / form / "selection.json").read_text())
    for key in ("predictor", "seed", "seeds", "seed_val_tau", "best_seed_val_tau", "ensemble_val_tau"):
        assert selection[key] == of_form[key], key
    assert set(selection["mean_val_tau"]) == set(FORMS) and "validation" in selection["rule"]
    ensemble = selection["predictor"] == "ensemble"
    assert selection["predictor"] == (forced or model_choice(chosen.runs, form)["predictor"])
    shutil.copytree(out / "unf-val", tmp_path / "unf-val")  # self-contained: members travel with it
    saved = load_predictor(tmp_path / "unf-val", device="cpu")
    assert isinstance(saved, EnsemblePredictor) == ensemble
    weights = _final_weights(predict_zoo, range(6))
    np.testing.assert_array_equal(saved.predict(weights), load_predictor(out / form, device="cpu").predict(weights))
    summary = chosen.summary.set_index("model")
    text = (out / "comparison.md").read_text()
    pairs = {(p["a"], p["b"]) for p in chosen.pairs}
    if ensemble:
        assert summary.loc["unf-val", "seeds"] == 2 and summary.loc["unf-val", "best_seed"] == -1
        assert summary.loc["unf-val", "val_tau_mean"] == pytest.approx(selection["ensemble_val_tau"], abs=1e-9)
        assert np.isnan(summary.loc["unf-val", "val_tau_std"])  # one prediction, like a -ens row
        assert f"unf-val = {form} (seed ensemble): of the UNF forms trained" in text
        assert {("unf", "unf-val"), ("unf-perm", "unf-val")} <= pairs  # the ensemble against the seeds: new
    else:
        for col in ("val_tau_mean", "test_tau_mean", "seeds"):
            assert summary.loc["unf-val", col] == summary.loc[form, col]
        assert f"unf-val = {form}: of the UNF forms trained" in text and "(seed ensemble)" not in text
        assert pairs == {("unf", "unf-perm")}
    for model in FORMS:  # the form rows stay mean +- sd over seeds
        assert summary.loc[model, "seeds"] == 2 and np.isfinite(summary.loc[model, "val_tau_std"])
    frame = pd.read_csv(out / "comparison.csv").set_index("model")
    assert frame.loc["unf-val", "val_tau_mean"] == pytest.approx(summary.loc["unf-val", "val_tau_mean"])


def test_one_seed_keeps_the_single_predictor(seed_runs, tmp_path: Path) -> None:
    from pipeline.predict.train import _save_model_predictor

    run = next(r for r in seed_runs.runs if r.model == "unf" and r.seed == 1)
    dest = tmp_path / "unf"
    shutil.copytree(run.directory, dest / "seed1")
    (dest / "selection.json").write_text("{}")  # a stale one from a run with more seeds
    moved = dataclasses.replace(run, directory=dest / "seed1")
    assert _save_model_predictor(dest, [moved])["predictor"] == "seed"
    assert not (dest / "selection.json").exists()
    assert (dest / "model.safetensors").read_bytes() == (run.directory / "model.safetensors").read_bytes()
    assert json.loads((dest / "predictor.json").read_text())["kind"] == "unf"


def _ensemble_dir(chosen) -> Path:
    folder = chosen[0].out_dir / "unf-val"
    assert json.loads((folder / "selection.json").read_text())["predictor"] == "ensemble"
    return folder


@pytest.mark.parametrize("chosen", ["ensemble"], indirect=True)
def test_unfzoo_score_scores_with_an_ensemble_folder(chosen, predict_zoo, tmp_path: Path) -> None:
    from pipeline.cli import app

    folder = _ensemble_dir(chosen)
    inputs = tmp_path / "ckpts"
    inputs.mkdir()
    weights = _final_weights(predict_zoo, range(4))
    for m in range(4):
        torch.save({k: v[m].clone() for k, v in weights.items()}, inputs / f"run{m}.pt")
    out = tmp_path / "scores.csv"
    result = CliRunner().invoke(app, ["score", str(folder), str(inputs), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "seed ensemble of 2" in result.output
    frame = pd.read_csv(out).sort_values("path")
    expected = load_predictor(folder, device="cpu").predict(weights)
    np.testing.assert_allclose(frame["prediction"].to_numpy(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("chosen", ["ensemble"], indirect=True)
def test_a_missing_or_damaged_member_is_a_one_line_error(chosen, predict_zoo, tmp_path: Path) -> None:
    from pipeline.cli import app

    folder = tmp_path / "unf-val"
    shutil.copytree(_ensemble_dir(chosen), folder)
    (folder / "seed0" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(PredictorError, match="seed0"):
        load_predictor(folder, device="cpu")
    shutil.rmtree(folder / "seed1")
    with pytest.raises(PredictorError, match=r"seed1 \(a member of the seed ensemble .*\) is missing"):
        load_predictor(folder, device="cpu")
    result = CliRunner().invoke(app, ["score", str(folder), str(tmp_path), "--out", str(tmp_path / "s.csv")])
    assert result.exit_code == 2 and "seed1" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "s.csv").exists()
    config = json.loads((folder / "predictor.json").read_text())
    (folder / "predictor.json").write_text(json.dumps({**config, "members": ["../elsewhere"]}))
    with pytest.raises(PredictorError, match="not a sub-folder name"):
        load_predictor(folder, device="cpu")


@pytest.mark.parametrize("chosen", ["ensemble"], indirect=True)
def test_with_ensemble_rows_unf_val_repeats_the_form_ens_row(chosen, predict_zoo, monkeypatch) -> None:
    """With `--ensemble`, an ensemble unf-val is the chosen form's "-ens" row; its pairs with the UNF rows are 0 or
    listed under that row, so they are left out."""
    import pipeline.predict.report as report
    from pipeline.predict import build_data

    result, _ = chosen
    real = report.seed_or_ensemble
    monkeypatch.setattr(report, "seed_or_ensemble", lambda p, t: {**real(p, t), "predictor": "ensemble"})
    form = report.selected_unf_form(result.runs)
    preds = report.model_predictions(result.runs, ensemble=True)
    np.testing.assert_array_equal(preds["unf-val"][0], preds[f"{form}-ens"][0])
    data = build_data(predict_zoo, result.config)
    summary = report.summarize(result.runs, data, ensemble=True).set_index("model")
    for col in ("val_tau_mean", "test_tau_mean", "seeds", "best_seed"):
        assert summary.loc["unf-val", col] == summary.loc[f"{form}-ens", col]
    pairs = report.pair_table(preds, data, 20, f"{form}-ens")
    assert pairs and not any("unf-val" in (p["a"], p["b"]) for p in pairs)
