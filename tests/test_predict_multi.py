"""`unfzoo train` on several zoos, eval zoos, leave-group-out splits, train-only checkpoint rows, bounded outputs,
history.csv, and the bad inputs of these options (one-line errors, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import ConfigError
from pipeline.predict import TrainConfig, build_data, load_predictor, train_predictor

runner = CliRunner()
SMALL = {"device": "cpu", "epochs": 2, "patience": 10, "fractions": (0.6, 0.2, 0.2), "unf_hidden": (4,),
         "unf_head": (16,), "deepsets_hidden": 8, "deepsets_head": (16,), "flat_hidden": (16,), "bootstrap": 100,
         "statnn_candidates": ("gbr-d3",)}


def _config(**kw) -> TrainConfig:
    return TrainConfig(**{**SMALL, **kw})


def test_two_widths_and_an_eval_zoo(predict_zoo, predict_zoo_wide, tmp_path: Path) -> None:
    data = build_data([predict_zoo, predict_zoo_wide], _config())
    assert [z["width"] for z in data.zoos] == ["8", "12"] and [z["role"] for z in data.zoos] == ["train", "train"]
    for split in ("train", "val", "test"):  # each zoo split on its own: both zoos on every side
        assert set(data.block[data.rows[split]].tolist()) == {0, 1}
    data.check_disjoint()
    two = train_predictor([predict_zoo, predict_zoo_wide], _config(models=("unf",)), tmp_path / "two", data=data)
    assert {(w["split"], w["width"]) for w in two.bias_by_width} == {("test", "8"), ("test", "12")}
    result = train_predictor(predict_zoo, _config(models=("unf", "statnn")), tmp_path / "o",
                             eval_zoos=[predict_zoo_wide])
    stats = {(s["model"], s["split"]): s for s in result.statistics}
    assert stats[("unf", "eval:wide")]["n"] == stats[("statnn", "eval:wide")]["n"] > 0
    widths = {(w["model"], w["split"], w["width"]) for w in result.bias_by_width}
    assert ("unf", "test", "8") in widths and ("statnn", "eval:wide", "12") in widths
    preds = pd.read_csv(tmp_path / "o" / "predictions.csv")
    assert preds["prediction"].between(0, 1).all()  # accuracies stay accuracies, STATNN included
    assert set(preds["zoo"]) == {"zoo", "wide"}
    md = (tmp_path / "o" / "comparison.md").read_text()
    assert "### eval:wide" in md and "Paired differences" in md and "± 0.000" not in md
    assert 0 < stats[("unf", "eval:wide")]["tau_ceiling"] <= 1 and stats[("unf", "test")]["n_test_samples"] == "360"
    assert "Noise ceiling of tau" in md
    with pytest.raises(ConfigError, match="also a training zoo"):
        build_data(predict_zoo, _config(), eval_zoos=[predict_zoo])
    with pytest.raises(ConfigError, match="flat reads the widths of .* a training zoo has width 12"):
        train_predictor([predict_zoo, predict_zoo_wide], _config(models=("flat",)), tmp_path / "f")
    assert not (tmp_path / "f").exists()


def test_eval_zoo_never_influences_selection(predict_zoo, predict_zoo_wide, tmp_path: Path) -> None:
    config = _config(models=("flat",), epochs=3)
    alone = train_predictor(predict_zoo, config, tmp_path / "a")
    both = train_predictor(predict_zoo, config, tmp_path / "b", eval_zoos=[predict_zoo_wide])
    assert alone.runs[0].history[-1]["val_tau"] == both.runs[0].history[-1]["val_tau"]
    assert alone.runs[0].metrics["test"] == both.runs[0].metrics["test"]
    assert both.runs[0].metrics["eval:wide"]["n"] == 0  # flat cannot read width 12: reported, not guessed
    again = train_predictor(predict_zoo, config, tmp_path / "a", eval_zoos=[predict_zoo_wide])  # added later
    assert "eval:wide" in again.runs[0].metrics and again.runs[0].history == alone.runs[0].history


def test_group_split_holds_out_a_hyperparameter_value(predict_zoo) -> None:
    data = build_data(predict_zoo, _config(split="group:optimizer=adam", checkpoints="all"))
    opt = np.asarray(predict_zoo.hparam("optimizer"), dtype=object)
    assert set(opt[data.member[data.rows["test"]]]) == {"adam"}
    assert set(opt[data.member[data.rows["train"]]]) == {"sgd"} == set(opt[data.member[data.rows["val"]]])
    assert data.info["held_out"] == ["adam"]
    default = build_data(predict_zoo, _config(split="group:activation", split_seed=1))
    assert default.info["held_out"] == ["tanh"]  # sorted values, index split_seed mod count
    with pytest.raises(ConfigError, match=r"'lr' is not a categorical.*optimizer \(adam \d+, sgd \d+\)"):
        build_data(predict_zoo, _config(split="group:lr"))
    with pytest.raises(ConfigError, match="no usable member has optimizer = rmsprop"):
        build_data(predict_zoo, _config(split="group:optimizer=rmsprop"))
    with pytest.raises(ConfigError, match="too small"):
        build_data(predict_zoo, _config(split="group:optimizer=adam,sgd"))
    with pytest.raises(ConfigError, match="--split 'grp:x' is unknown"):
        _config(split="grp:x")


def test_train_checkpoints_add_training_rows_only(predict_zoo) -> None:
    data = build_data(predict_zoo, _config(train_checkpoints="all"))
    assert set(data.epoch[data.rows["train"]].tolist()) == {0, 1, 4}
    for split in ("val", "test"):
        assert set(data.epoch[data.rows[split]].tolist()) == {4}
    data.check_disjoint()


def _pending_zoo(tmp_path: Path) -> str:
    from pipeline.zoo.store import StoreLayout, create_store
    from unf_models import WeightSpec

    spec = WeightSpec({"w": ("h", "in"), "b": ("h",)}, shapes={"w": (4, 3), "b": (4,)}, fixed=("in",))
    layout = StoreLayout(weight_shapes=spec.shapes, metric_names=("test_acc",), checkpoint_epochs=(0, 1),
                         members_per_chunk=10)
    url = str(tmp_path / "pending.zarr")
    create_store(url, layout, {"spec": spec.to_dict(), "task": {"name": "synthetic"}}, 20)
    return url


def test_cli_bad_inputs_are_one_line_errors(predict_zoo, tmp_path: Path) -> None:
    pending = _pending_zoo(tmp_path)
    r = runner.invoke(app, ["train", pending, "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "has no usable members: 20 pending" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["train", predict_zoo.url, "--eval-zoo", pending, "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "cannot be mixed with" in r.output  # another architecture family, both named
    assert "pending.zarr" in r.output and "zoo.zarr" in r.output
    afile = tmp_path / "afile"
    afile.write_text("x")
    r = runner.invoke(app, ["train", predict_zoo.url, "--out", str(afile)])
    assert r.exit_code == 2 and "is an existing file" in r.output and afile.read_text() == "x"
    r = runner.invoke(app, ["train", predict_zoo.url, "--split", "group:lr", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "valid" in r.output and "optimizer (" in r.output
    assert not (tmp_path / "o").exists()


def test_cli_log_lines_history_and_damaged_result(predict_zoo, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", predict_zoo.url, "--model", "flat", "--epochs", "2", "--device", "cpu", "--fractions",
            "0.6,0.2,0.2", "--bootstrap", "100", "--out", str(out)]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "flat seed 0 epoch 1/2 train_loss" in r.output and "flat seed 0 epoch 2/2" in r.output  # not a terminal
    history = pd.read_csv(out / "flat" / "seed0" / "history.csv")
    assert history["epoch"].tolist() == [1, 2] and {"train_loss", "val_tau", "best_val_tau"} <= set(history)
    assert not list(out.rglob("*.tmp"))
    result = out / "flat" / "seed0" / "result.json"
    result.write_text(result.read_text()[:50])  # truncated by something outside the tool
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "result.json is damaged" in r.output and "delete" in r.output
    assert "Traceback" not in r.output


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("candidate", ["gbr-d3", "gbr-d5", "mlp-a1e-3", "mlp-a1e-1"])
def test_loaded_statnn_equals_scikit_learn_predict(predict_zoo, tmp_path: Path, candidate: str) -> None:
    """Every candidate STATNN can pick: the saved (pickle-free) predictor equals scikit-learn's own `predict`."""
    from pipeline.predict.features import statnn_features
    from pipeline.predict.statnn import fit_statnn

    config = _config(models=("statnn",), statnn_candidates=(candidate,), checkpoints="all")
    result = train_predictor(predict_zoo, config, tmp_path / "o")
    predictor = load_predictor(tmp_path / "o" / "statnn", device="cpu")
    assert predictor.config["hyperparameters"]["name"] == candidate
    data = build_data(predict_zoo, config)
    x = statnn_features(data.weights, data.names).numpy()
    tr, va = data.rows["train"], data.rows["val"]
    model, _, est = fit_statnn(x[tr], data.y[tr], x[va], data.y[va], 0, (candidate,), clip=[0.0, 1.0])
    a = model.arrays
    expected = np.clip(est.predict((x - a["x_mean"]) / a["x_scale"]) * a["y_std"][0] + a["y_mean"][0], 0, 1)
    np.testing.assert_allclose(predictor.predict(data.weights), expected, rtol=0, atol=1e-9)
    assert not any(p.suffix in (".pkl", ".pickle", ".joblib") for p in (tmp_path / "o").rglob("*"))
    assert result.runs[0].metrics["test"]["n"] > 0


@pytest.mark.parametrize("model,normalize,extra", [("unf-hybrid", "tensor", {}), ("unf", "member", {}),
                                                   ("deepsets", "member", {}), ("unf", "fanin", {}),
                                                   ("unf-perm", "fanin", {"unf_pos_embed": True}),
                                                   ("unf-perm", "fanin", {"unf_keep_fixed": ("head",)})])
def test_hybrid_and_scale_aware_models_are_invariant_and_width_agnostic(predict_zoo, tmp_path: Path, model: str,
                                                                        normalize: str, extra: dict) -> None:
    config = _config(models=(model,), normalize=normalize, **extra)
    result = train_predictor(predict_zoo, config, tmp_path / "o")
    predictor = load_predictor(tmp_path / "o" / model, device="cpu")
    plain = _config(models=(model,), normalize=normalize)
    if extra:  # an option of the tied form: saved and loaded with it, and part of the run's resume key
        assert config.run_key(model) != plain.run_key(model) and config.run_key("unf") == plain.run_key("unf")
    if "unf_pos_embed" in extra:  # --pos-embed: an embedding along the fixed axes at the first layer
        assert predictor.config["hyperparameters"]["pos_embed"] is True
        assert len(predictor.net.unf.layers[0].pos_embed) > 0
    if "unf_keep_fixed" in extra:  # --keep-fixed head: only the kept label stays fixed, the others are tied
        assert predictor.config["hyperparameters"]["keep_fixed"] == ["head"]
        assert predictor.net.unf.spec.fixed_labels == ["head"]
    spec = predict_zoo.spec
    weights = predict_zoo.weights(np.arange(8), -1)
    base = predictor.predict(weights)
    perm = spec.random_permutation(torch.Generator().manual_seed(0))
    np.testing.assert_allclose(predictor.predict(spec.permute(weights, perm)), base, atol=1e-5)
    wide = spec.resize({label: 2 * spec.sizes[label] for label in spec.permutable_labels})
    out = predictor.predict({n: 0.1 * torch.randn(4, *s) for n, s in wide.shapes.items()})
    assert np.isfinite(out).all() and ((out >= 0) & (out <= 1)).all()
    run = result.runs[0]
    rows = run.predictions[(run.predictions["split"] == "test")]
    w = predict_zoo.weights(rows["member"].to_numpy(), -1)
    np.testing.assert_allclose(predictor.predict(w), rows["prediction"].to_numpy(), atol=1e-6)
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["config"]["normalize"] == normalize


def test_padded_narrow_members_are_cropped_to_their_width(tmp_path: Path) -> None:
    """A zoo with a `width` hyperparameter stores narrower members zero-padded: rows come back at their own width
    (one block per width), and flat still reads them (zero-padded again inside the model)."""
    from pipeline.zoo.store import MemberBlock, StoreLayout, Zoo, create_store, write_members, write_splits
    from unf_models import WeightSpec

    spec = WeightSpec({"w": ("h", "in"), "b": ("h",), "v": ("out", "h")}, shapes={"w": (6, 3), "b": (6,), "v": (2, 6)},
                      fixed=("in", "out"))
    layout = StoreLayout(weight_shapes=spec.shapes, metric_names=("test_acc",), checkpoint_epochs=(0,),
                         members_per_chunk=40, categorical={"width": (3, 6)})
    url = str(tmp_path / "padded.zarr")
    create_store(url, layout, {"spec": spec.to_dict(), "task": {"name": "synthetic"}}, 40)
    rng = np.random.default_rng(0)
    width = np.where(np.arange(40) % 2 == 0, 3, 6)
    weights = {n: rng.normal(size=(40, 1, *s)).astype(np.float32) for n, s in spec.shapes.items()}
    narrow = width == 3
    weights["w"][narrow, :, 3:] = 0
    weights["b"][narrow, :, 3:] = 0
    weights["v"][narrow, :, :, 3:] = 0
    write_members(url, 0, MemberBlock(weights, {"test_acc": rng.uniform(size=(40, 1))}, {"width": width},
                                      np.arange(40), np.arange(40), np.zeros(40, bool), np.full(40, -1, np.int32)))
    write_splits(url)
    zoo = Zoo.open(url)
    data = build_data(zoo, _config())
    assert sorted(z["width"] for z in data.zoos) == ["3", "6"]
    for _, b, w in data.take(np.arange(len(data))):
        expect = 3 if data.zoos[b]["width"] == "3" else 6
        assert w["w"].shape[1:] == (expect, 3) and w["v"].shape[1:] == (2, expect)
        members = data.member[data.block == b]
        np.testing.assert_array_equal(w["w"].numpy(), weights["w"][members, 0, :expect])
    result = train_predictor(zoo, _config(models=("flat", "unf")), tmp_path / "o")
    assert {r.model for r in result.runs} == {"flat", "unf"}
    assert all(r.metrics["test"]["n"] > 0 for r in result.runs)
    flat = load_predictor(tmp_path / "o" / "flat", device="cpu")
    narrow_w = {n: torch.from_numpy(weights[n][narrow][:4, 0]) for n in spec.names}
    cropped = {"w": narrow_w["w"][:, :3], "b": narrow_w["b"][:, :3], "v": narrow_w["v"][:, :, :3]}
    np.testing.assert_allclose(flat.predict(cropped), flat.predict(narrow_w), atol=1e-6)

    # scoring the zoo (CLI and Python) reads every member as training did: at its own width for UNF, padded for flat
    from pipeline.score import score_checkpoints

    trained = pd.read_csv(tmp_path / "o" / "predictions.csv")
    for model in ("unf", "flat"):
        predictor = load_predictor(tmp_path / "o" / model, device="cpu")
        rows = trained[trained["model"] == model]
        scored = score_checkpoints(predictor, [url]).set_index("member").loc[rows["member"]]
        np.testing.assert_allclose(scored["prediction"].to_numpy(), rows["prediction"].to_numpy(), atol=1e-6)
        np.testing.assert_allclose(predictor.predict_zoo(zoo, rows["member"].to_numpy()), rows["prediction"],
                                   atol=1e-6)
        if model == "unf":
            assert set(scored["widths"][narrow[rows["member"]]]) == {"h=3"} and set(scored["widths"][
                ~narrow[rows["member"]]]) == {""}
    unf = load_predictor(tmp_path / "o" / "unf", device="cpu")
    members = np.flatnonzero(narrow)[:4]
    assert not np.allclose(unf.predict(zoo.weights(members)), unf.predict_zoo(zoo, members), atol=1e-3)  # padding
    groups = zoo.weight_groups(np.arange(6))  # positions of each width, cropped
    assert [(rows.tolist(), w["w"].shape[1:]) for rows, w in groups] == [([0, 2, 4], (3, 3)), ([1, 3, 5], (6, 3))]


def test_tensorboard_scalars_when_tensorboard_is_installed(predict_zoo, tmp_path: Path, monkeypatch) -> None:
    """With tensorboard importable, each run also logs train_loss / val_tau / best_val_tau per epoch into its run
    folder (the same values as history.csv). A recording stand-in for torch.utils.tensorboard plays tensorboard."""
    import sys
    import types

    from pipeline.predict import TrainConfig, train_predictor

    logged: list[tuple[str, str, float, int]] = []

    class RecordingWriter:
        def __init__(self, log_dir: str) -> None:
            self.log_dir = log_dir

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            logged.append((self.log_dir, tag, value, step))

        def flush(self) -> None:
            pass

        def close(self) -> None:
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=RecordingWriter))
    config = TrainConfig(models="deepsets", epochs=2, patience=5, device="cpu", deepsets_hidden=8, deepsets_head=(16,))
    result = train_predictor(predict_zoo, config, tmp_path / "out")
    history = pd.read_csv(tmp_path / "out" / "deepsets" / "seed0" / "history.csv")
    run_dir = str(tmp_path / "out" / "deepsets" / "seed0")
    assert {d for d, *_ in logged} == {run_dir}
    val = [(step, value) for _, tag, value, step in logged if tag == "val_tau"]
    assert val == list(zip(history["epoch"], history["val_tau"])) and len(val) == len(result.runs[0].history) == 2


def test_fanin_scale_channel_reads_standard_inits_alike_at_every_width() -> None:
    """--normalize fanin: the scale channel is log10(RMS * sqrt(fan_in)), so kaiming-initialized conv layers of width 8
    and 64 get the same value (the "member" channel reads the wider one as ~0.45 decades smaller)."""
    from pipeline.predict.models import TensorNormalizer

    def scale(width: int, mode: str) -> float:
        w = torch.empty(16, width, width, 3, 3)  # 16 members
        gen = torch.Generator().manual_seed(width)
        for member in w:
            torch.nn.init.kaiming_normal_(member, generator=gen)
        norm = TensorNormalizer(["w"], [0.0], [0.05], mode=mode)
        return float(norm.channels({"w": w}, "raw")["w"][:, -1].mean())

    assert abs(scale(8, "fanin") - scale(64, "fanin")) < 0.01
    assert abs(scale(8, "fanin") - np.log10(2 ** 0.5)) < 0.01  # kaiming: RMS = sqrt(2 / fan_in)
    assert scale(8, "member") - scale(64, "member") > 0.4


def test_rank_loss_scores_the_order_and_trains(predict_zoo, tmp_path: Path) -> None:
    from pipeline.predict.train import pairwise_rank_loss

    y = torch.tensor([0.9, 0.5, 0.1])
    right, wrong = pairwise_rank_loss(torch.tensor([3.0, 0.0, -3.0]), y), pairwise_rank_loss(torch.tensor([-3.0, 0.0, 3.0]), y)
    assert right < 0.1 < 2.0 < wrong
    assert float(pairwise_rank_loss(torch.zeros(2), torch.tensor([0.5, 0.5]))) == 0.0  # no ordered pair: no loss
    result = train_predictor(predict_zoo, _config(models=("unf",), rank_weight=1.0), tmp_path / "o")
    assert np.isfinite(result.runs[0].history[-1]["train_loss"])
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["config"]["rank_weight"] == 1.0
    with pytest.raises(ConfigError, match="--rank-weight"):
        _config(rank_weight=-1.0)


def test_keep_fixed_bad_label_or_combination_is_refused(predict_zoo, tmp_path: Path, monkeypatch) -> None:
    import pipeline.predict

    def no_loading(*args, **kwargs):  # a typo in --keep-fixed is refused before any weights are read
        raise AssertionError("build_data called before --keep-fixed was checked")

    monkeypatch.setattr(pipeline.predict, "build_data", no_loading)
    result = CliRunner().invoke(app, ["train", predict_zoo.url, "--model", "unf-perm", "--keep-fixed", "nope",
                                      "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "--keep-fixed nope: not a fixed label" in result.output and "head" in result.output
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="do not combine"):
        TrainConfig(unf_keep_fixed=("head",), unf_pos_embed=True)


def test_size_feature_tells_widths_apart_and_keeps_invariance(predict_zoo, tmp_path: Path) -> None:
    """--features raw+log+size: a third channel, log10(entries per member) / 3, constant over each tensor (so every
    permutation symmetry holds) and different for a wider net; a predictor trained with it stays invariant."""
    from pipeline.predict.models import pointwise_features

    narrow, wide = torch.randn(2, 8, 8, 3, 3), torch.randn(2, 16, 16, 3, 3)
    c_narrow, c_wide = pointwise_features(narrow, "raw+log+size"), pointwise_features(wide, "raw+log+size")
    assert c_narrow.shape == (2, 3, 8, 8, 3, 3)
    assert torch.all(c_narrow[:, 2] == np.log10(8 * 8 * 9) / 3) and torch.all(c_wide[:, 2] == np.log10(16 * 16 * 9) / 3)
    train_predictor(predict_zoo, _config(models=("unf",), features="raw+log+size"), tmp_path / "o")
    predictor = load_predictor(tmp_path / "o" / "unf", device="cpu")
    weights = predict_zoo.weights(np.arange(8), -1)
    perm = predict_zoo.spec.random_permutation(torch.Generator().manual_seed(1))
    np.testing.assert_allclose(predictor.predict(predict_zoo.spec.permute(weights, perm)), predictor.predict(weights),
                               atol=1e-5)


def test_bias_by_reports_the_mean_error_per_hyperparameter_value(predict_zoo, predict_zoo_wide, tmp_path: Path) -> None:
    """`--bias-by optimizer,activation`: one mean-error row per model, split and value (an eval zoo whose recipe fixes a
    hyperparameter reads "-"), equal to the mean of prediction - target over those rows; in metrics.json and
    comparison.md."""
    out = tmp_path / "out"
    result = train_predictor(predict_zoo, _config(models=("statnn",), bias_by=("optimizer", "activation")), out,
                             eval_zoos=[predict_zoo_wide])
    groups = json.loads((out / "metrics.json").read_text())["bias_by_hparam"]
    test = [g for g in groups if g["split"] == "test" and g["hparam"] == "optimizer"]
    assert {g["value"] for g in test} == {"adam", "sgd"}
    preds = result.runs[0].predictions
    rows = preds[preds["split"] == "test"]
    optimizer = np.asarray(predict_zoo.hparam("optimizer"), dtype=object)[rows["member"].to_numpy()]
    assert sum(g["n"] for g in test) == len(rows)
    for g in test:
        sel = (optimizer == g["value"])
        err = rows["prediction"].to_numpy()[sel] - rows["target"].to_numpy()[sel]
        assert g["bias"] == pytest.approx(err.mean(), abs=1e-9) and g["mae"] == pytest.approx(np.abs(err).mean())
    wide = [g for g in groups if g["split"].startswith("eval:") and g["hparam"] == "optimizer"]
    assert [g["value"] for g in wide] == ["adam"]
    assert "### Mean error (prediction - target) per hyperparameter value" in (out / "comparison.md").read_text()


def test_bias_by_an_unknown_hyperparameter_is_refused(predict_zoo, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, ["train", str(predict_zoo.url), "--model", "statnn", "--bias-by", "colour",
                                 "--out", str(out)])
    assert result.exit_code == 2
    assert "--bias-by 'colour' is not a hyperparameter" in result.output and "optimizer (2)" in result.output
    assert not out.exists()
    result = runner.invoke(app, ["train", str(predict_zoo.url), "--model", "statnn", "--bias-by", "lr", "--out", str(out)])
    assert result.exit_code == 2 and "'lr' has" in result.output and "distinct values (at most 20)" in result.output
    assert not out.exists()
