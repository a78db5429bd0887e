"""Predictors (`pipeline.predict`): honest splits, validation-only selection, artifacts, width transfer, resume."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError, PredictorError
from pipeline.predict import TrainConfig, available_targets, build_data, load_predictor
from pipeline.predict.statnn import fit_statnn
from pipeline.predict.train import fit_run
from unf_models import SpecMismatchError

CPU = torch.device("cpu")


def _config(**kw) -> TrainConfig:
    base = {"checkpoints": "all", "fractions": (0.6, 0.2, 0.2), "device": "cpu", "epochs": 3, "patience": 10}
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("split", ["run", "config"])
def test_split_never_shares_a_member_or_config_across_sides(predict_zoo, split: str) -> None:
    data = build_data(predict_zoo, _config(split=split))
    sides = {s: set(data.member[r].tolist()) for s, r in data.rows.items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not sides[a] & sides[b]
    # every checkpoint of a member sits with the member
    n_ck = len(predict_zoo.checkpoint_epochs)
    for s, r in data.rows.items():
        members, counts = np.unique(data.member[r], return_counts=True)
        assert (counts == n_ck).all(), s
    if split == "config":
        config_ids = predict_zoo.root["members/config"][:]
        cfg = {s: set(config_ids[data.member[r]].tolist()) for s, r in data.rows.items()}
        assert not (cfg["train"] & cfg["val"]) and not (cfg["train"] & cfg["test"]) and not (cfg["val"] & cfg["test"])
    # diverged members are excluded and counted
    n_div = int((predict_zoo.status == 2).sum())
    assert data.excluded["diverged"] == n_div
    assert not set(np.flatnonzero(predict_zoo.status == 2)) & set(data.member.tolist())


def test_diverged_and_pending_members_are_excluded_and_counted(tmp_path: Path) -> None:
    from pipeline.zoo.store import MemberBlock, StoreLayout, Zoo, create_store, write_members, write_splits
    from unf_models import WeightSpec

    spec = WeightSpec({"w": ("h", "in"), "b": ("h",)}, shapes={"w": (4, 3), "b": (4,)}, fixed=("in",))
    layout = StoreLayout(weight_shapes=spec.shapes, metric_names=("test_acc",), checkpoint_epochs=(0, 1),
                         members_per_chunk=10, continuous=("lr",))
    url = str(tmp_path / "z.zarr")
    create_store(url, layout, {"spec": spec.to_dict(), "task": {"name": "synthetic"}}, 30)
    rng = np.random.default_rng(0)
    for start in (0, 10):  # members 20..29 stay pending
        weights = {n: rng.normal(size=(10, 2, *s)).astype(np.float32) for n, s in spec.shapes.items()}
        acc = rng.uniform(size=(10, 2))
        diverged = np.arange(start, start + 10) == 3
        acc[diverged, 1] = np.nan
        weights["w"][diverged, 1] = np.nan
        write_members(url, start, MemberBlock(weights, {"test_acc": acc}, {"lr": rng.uniform(size=10)},
                                              np.arange(10), np.arange(start, start + 10), diverged,
                                              np.where(diverged, 1, -1).astype(np.int32)))
    write_splits(url)
    zoo = Zoo.open(url)
    data = build_data(zoo, _config(fractions=(0.5, 0.25, 0.25)))
    assert data.excluded == {"pending": 10, "diverged": 1, "non_finite": 0}
    assert set(data.member.tolist()) == set(range(20)) - {3}
    kept = build_data(zoo, _config(fractions=(0.5, 0.25, 0.25), include_diverged=True))
    assert kept.excluded["non_finite"] == 1 and 3 in set(kept.member.tolist())  # its finite epoch-0 row stays
    assert np.isfinite(kept.y).all()


def _poisoned(data):
    """Same data, but test targets reversed and test weights replaced by large noise."""
    gen = torch.Generator().manual_seed(1)
    test = torch.from_numpy(data.rows["test"])
    weights = {}
    for name, w in data.weights.items():
        w = w.clone()
        w[test] = 100 * torch.randn(w[test].shape, generator=gen)
        weights[name] = w
    y = data.y.copy()
    y[data.rows["test"]] = y[data.rows["test"]][::-1] * 0.5 + 3.0
    return dataclasses.replace(data, blocks=[weights], y=y)


@pytest.mark.parametrize("model", ["flat", "statnn"])
def test_selection_never_reads_test(predict_zoo, tmp_path: Path, model: str) -> None:
    config = _config(epochs=4, statnn_candidates=("gbr-d3", "mlp-a1e-3"))
    data = build_data(predict_zoo, config)
    clean = fit_run(model, data, config, predict_zoo.spec, 0, tmp_path / "clean", {}, CPU)
    dirty = fit_run(model, _poisoned(data), config, predict_zoo.spec, 0, tmp_path / "dirty", {}, CPU)
    assert [h["val_tau"] for h in clean.history] == [h["val_tau"] for h in dirty.history]
    assert [h["train_loss"] for h in clean.history] == [h["train_loss"] for h in dirty.history]
    assert clean.best_epoch == dirty.best_epoch and clean.extra == dirty.extra
    for split in ("train", "val"):
        assert clean.metrics[split] == dirty.metrics[split]
    assert clean.metrics["test"] != dirty.metrics["test"]  # the poison did reach the test rows


def test_end_to_end_beats_chance_and_writes_reports(trained_predictors) -> None:
    result = trained_predictors
    summary = result.summary.set_index("model")
    # chance is 0; a few epochs on 38 training members already rank the held-out checkpoints
    assert summary.loc["unf", "test_tau_mean"] > 0.15
    assert summary.loc["statnn", "test_tau_mean"] > 0.3
    # Deep Sets: 0.15 since the raw+log default (0.21 here after 4 epochs; > 0.3 with --features raw). On cnn-digits
    # the log channel raises its validation tau (README "Predictors"); this 38-member smoke zoo only checks > chance.
    assert summary.loc["deepsets", "test_tau_mean"] > 0.15
    for name in ("metrics.json", "predictions.csv", "comparison.md", "comparison.csv", "test_scatter.png",
                 "val_tau.png", "unf/predictor.json", "unf/model.safetensors", "unf/seed0/result.json"):
        assert (result.out_dir / name).is_file(), name


@pytest.mark.parametrize("model", ["unf", "unf-perm", "statnn", "deepsets", "flat"])
def test_saved_predictor_reproduces_training_predictions(trained_predictors, predict_zoo, model: str) -> None:
    run = next(r for r in trained_predictors.runs if r.model == model)
    predictor = load_predictor(run.directory, device="cpu")
    assert predictor.kind == ("unf" if model.startswith("unf") else model)
    assert predictor.target == "test_acc" and predictor.spec == predict_zoo.spec
    assert predictor.width_agnostic == (model != "flat")
    rows = run.predictions[run.predictions["split"] == "test"]
    epochs = list(predict_zoo.checkpoint_epochs)
    for epoch, group in rows.groupby("epoch"):
        weights = predict_zoo.weights(group["member"].to_numpy(), epochs.index(epoch))
        np.testing.assert_allclose(predictor.predict(weights), group["prediction"].to_numpy(), rtol=0, atol=1e-6)


def test_unf_val_row_is_the_unf_form_with_the_better_validation_tau(trained_predictors) -> None:
    """With both UNF forms trained, "unf-val" repeats the one whose mean validation tau is higher (never test), and
    comparison.md says which; its pairs with the two forms themselves are left out (0 or already listed)."""
    summary = trained_predictors.summary.set_index("model")
    chosen = "unf" if summary.loc["unf", "val_tau_mean"] >= summary.loc["unf-perm", "val_tau_mean"] else "unf-perm"
    for col in ("val_tau_mean", "test_tau_mean", "seeds"):
        assert summary.loc["unf-val", col] == summary.loc[chosen, col]
    text = (trained_predictors.out_dir / "comparison.md").read_text()
    assert f"unf-val = {chosen}: of the UNF forms trained" in text
    pairs = {(p["a"], p["b"]) for p in trained_predictors.pairs}
    assert not pairs & {("unf", "unf-val"), ("unf-perm", "unf-val"), ("unf-val", "unf"), ("unf-val", "unf-perm")}
    assert any("unf-val" in pair and "statnn" in pair for pair in pairs)


def test_unf_val_folder_saves_the_selected_form(trained_predictors, predict_zoo) -> None:
    """`<out>/unf-val/` is a loadable copy of the validation-selected form's predictor, with selection.json saying
    which form and why, so `unfzoo score <out>/unf-val` scores with the form the report's unf-val row stands for."""
    out = trained_predictors.out_dir
    selection = json.loads((out / "unf-val" / "selection.json").read_text())
    summary = trained_predictors.summary.set_index("model")
    chosen = "unf" if summary.loc["unf", "val_tau_mean"] >= summary.loc["unf-perm", "val_tau_mean"] else "unf-perm"
    assert selection["form"] == chosen
    assert selection["mean_val_tau"][chosen] == pytest.approx(summary.loc[chosen, "val_tau_mean"])
    assert (out / "unf-val" / "model.safetensors").read_bytes() == (out / chosen / "model.safetensors").read_bytes()
    selected, original = load_predictor(out / "unf-val", device="cpu"), load_predictor(out / chosen, device="cpu")
    weights = predict_zoo.weights(np.arange(6), -1)
    np.testing.assert_array_equal(selected.predict(weights), original.predict(weights))
    with pytest.raises(PredictorError, match="unf-val"):
        load_predictor(out, device="cpu")  # several predictors: the message points at the selected one


def test_unf_predictor_is_invariant_and_width_agnostic(trained_predictors, predict_zoo) -> None:
    unf = load_predictor(trained_predictors.out_dir / "unf", device="cpu")
    assert unf.config["hyperparameters"]["features"] == "raw+log+size"  # the default: log|w| and size keep symmetry
    spec = predict_zoo.spec
    weights = predict_zoo.weights(np.arange(8), -1)
    perm = spec.random_permutation(torch.Generator().manual_seed(0))
    np.testing.assert_allclose(unf.predict(spec.permute(weights, perm)), unf.predict(weights), atol=1e-5)
    wide = spec.resize({label: 2 * spec.sizes[label] for label in spec.permutable_labels})
    wide_weights = {n: 0.1 * torch.randn(4, *s) for n, s in wide.shapes.items()}
    assert np.isfinite(unf.predict(wide_weights)).all()
    flat = load_predictor(trained_predictors.out_dir / "flat", device="cpu")
    with pytest.raises(SpecMismatchError):
        flat.predict(wide_weights)
    with pytest.raises(SpecMismatchError, match="missing"):
        unf.predict({k: v for k, v in weights.items() if k != spec.names[0]})


def test_matmul_precision_applies_to_training_steps_only(predict_zoo, tmp_path: Path, monkeypatch) -> None:
    """--matmul-precision medium: optimizer steps run at "medium"; every prediction (validation, test, saved) at
    "highest", and the process's setting is restored after the run; the run key records the choice."""
    import pipeline.predict.train as train_mod

    seen: dict[str, set[str]] = {"step": set(), "predict": set()}
    adam_step, raw_outputs = torch.optim.Adam.step, train_mod._raw_outputs

    def step(self, *args, **kwargs):
        seen["step"].add(torch.get_float32_matmul_precision())
        return adam_step(self, *args, **kwargs)

    def predict(*args, **kwargs):
        seen["predict"].add(torch.get_float32_matmul_precision())
        return raw_outputs(*args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    monkeypatch.setattr(train_mod, "_raw_outputs", predict)
    config = _config(epochs=2, matmul_precision="medium")
    data = build_data(predict_zoo, config)
    run = fit_run("flat", data, config, predict_zoo.spec, 0, tmp_path / "run", {}, CPU)
    assert seen == {"step": {"medium"}, "predict": {"highest"}}
    assert torch.get_float32_matmul_precision() == "highest"
    assert np.isfinite(run.metrics["test"]["tau"])
    assert config.run_key("flat") != _config(epochs=2).run_key("flat")
    with pytest.raises(ConfigError, match="--matmul-precision 'tf32' is unknown"):
        _config(matmul_precision="tf32")


def test_training_steps_flush_denormals(predict_zoo, tmp_path: Path, monkeypatch) -> None:
    """Optimizer steps run with subnormals flushed to zero (decaying Adam moments would otherwise slow the CPU many
    times over); the thread's previous mode is restored after training, and after a block that raises."""
    from pipeline.device import flush_denormals, flushing_denormals

    seen = set()
    adam_step = torch.optim.Adam.step

    def step(self, *args, **kwargs):
        seen.add(flushing_denormals())
        return adam_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    config = _config(epochs=1)
    assert not flushing_denormals()
    fit_run("flat", build_data(predict_zoo, config), config, predict_zoo.spec, 0, tmp_path / "run", {}, CPU)
    assert seen == {True} and not flushing_denormals()
    with pytest.raises(RuntimeError), flush_denormals():
        assert flushing_denormals() and float(torch.full((1,), 1e-39) * 3.0) == 0.0
        raise RuntimeError
    assert not flushing_denormals() and float(torch.full((1,), 1e-39) * 3.0) > 0.0


def test_compiled_training_steps_match_eager(predict_zoo, tmp_path: Path, monkeypatch) -> None:
    """compile=True: every training step's forward runs compiled (here on aot_eager: inductor's tracing without its
    code generation), validation and test predictions eager; the trained predictor matches eager training, and the
    run key is eager's (the same computation)."""
    import math

    from pipeline.compile import RECOMPILE_LIMIT

    compile_calls, steps = [], []
    real_compile = torch.compile

    def compile_spy(fn, **kwargs):
        compile_calls.append(kwargs)
        compiled = real_compile(fn, backend="aot_eager", dynamic=kwargs.get("dynamic"))

        def step(*args):
            steps.append(torch._dynamo.config.recompile_limit)
            return compiled(*args)
        return step

    monkeypatch.setattr(torch, "compile", compile_spy)
    config = _config(epochs=2, compile=True)
    data = build_data(predict_zoo, config)
    torch._dynamo.reset()
    limit = torch._dynamo.config.recompile_limit
    got = fit_run("unf", data, config, predict_zoo.spec, 0, tmp_path / "compiled", {}, CPU)
    assert compile_calls and all(kw["dynamic"] is False for kw in compile_calls)
    assert len(steps) == 2 * math.ceil(len(data.rows["train"]) / config.batch_size)
    # room for a graph per model, width and batch size while training (dynamo's default 8 ran out), restored after
    assert min(steps) >= RECOMPILE_LIMIT > limit == torch._dynamo.config.recompile_limit
    monkeypatch.setattr(torch, "compile", real_compile)
    want = fit_run("unf", data, _config(epochs=2), predict_zoo.spec, 0, tmp_path / "eager", {}, CPU)
    np.testing.assert_allclose(got.predictions["prediction"], want.predictions["prediction"], atol=1e-4)
    assert config.run_key("unf") == _config(epochs=2).run_key("unf")
    torch._dynamo.reset()


def test_resume_after_interrupt_matches_uninterrupted_run(predict_zoo, tmp_path: Path) -> None:
    config = _config(epochs=4)
    data = build_data(predict_zoo, config)
    full = fit_run("flat", data, config, predict_zoo.spec, 0, tmp_path / "full", {}, CPU)

    def stop_at_2(model, seed, epoch, total, info):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit_run("flat", data, config, predict_zoo.spec, 0, tmp_path / "cut", {}, CPU, progress=stop_at_2)
    assert (tmp_path / "cut" / "resume.pt").is_file()
    seen = []
    resumed = fit_run("flat", data, config, predict_zoo.spec, 0, tmp_path / "cut", {}, CPU,
                      progress=lambda m, s, e, t, i: seen.append(e))
    assert seen == [3, 4]  # picked up after the last finished epoch
    assert [h["val_tau"] for h in resumed.history] == [h["val_tau"] for h in full.history]
    assert resumed.metrics == full.metrics


def test_targets_gen_gap_and_log_hparam(predict_zoo) -> None:
    targets = available_targets(predict_zoo)
    assert {"test_acc", "gen_gap", "log_lr"} <= set(targets)
    gap = build_data(predict_zoo, _config(target="gen_gap", checkpoints="final"))
    final = len(predict_zoo.checkpoint_epochs) - 1
    expected = predict_zoo.metric("train_acc")[gap.member, final] - predict_zoo.metric("test_acc")[gap.member, final]
    np.testing.assert_allclose(gap.y, expected.astype(np.float64), rtol=1e-6)
    lr = build_data(predict_zoo, _config(target="log_lr", checkpoints="final"))
    np.testing.assert_allclose(lr.y, np.log10(predict_zoo.hparam("lr")[lr.member]))
    assert lr.loss == "mse" and abs(lr.y[lr.rows["train"]].mean() - lr.y_mean) < 1e-9
    with pytest.raises(ConfigError, match="available: .*test_acc"):
        build_data(predict_zoo, _config(target="nope"))
    with pytest.raises(ConfigError, match="not stored"):
        build_data(predict_zoo, _config(checkpoints=(999,)))


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_statnn_export_matches_scikit_learn() -> None:
    from sklearn.ensemble import GradientBoostingRegressor
    from sklearn.neural_network import MLPRegressor

    from pipeline.predict.statnn import StatNNModel, _export_gbr, _export_mlp

    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 14))
    y = np.tanh(x[:, 0] + x[:, 1] * x[:, 2])
    ident = {"x_mean": np.zeros(14), "x_scale": np.ones(14), "y_mean": np.zeros(1), "y_std": np.ones(1)}
    gbr = GradientBoostingRegressor(n_estimators=30, max_depth=4, subsample=0.8, random_state=0).fit(x, y)
    mlp = MLPRegressor(hidden_layer_sizes=(16, 8), max_iter=50, random_state=0).fit(x, y)
    for family, est, arrays in (("gbr", gbr, _export_gbr(gbr)), ("mlp", mlp, _export_mlp(mlp))):
        model = StatNNModel(family, family, {**ident, **arrays})
        np.testing.assert_allclose(model.predict(x), est.predict(x), rtol=0, atol=1e-9)
    chosen, val_taus, _ = fit_statnn(x[:90], y[:90], x[90:], y[90:], seed=0)
    assert set(val_taus) == {"gbr-d3", "gbr-d5", "mlp-a1e-3", "mlp-a1e-1"}
    assert val_taus[chosen.name] == max(val_taus.values())


def test_load_predictor_errors(tmp_path: Path, trained_predictors) -> None:
    with pytest.raises(PredictorError, match="does not exist"):
        load_predictor(tmp_path / "missing")
    with pytest.raises(PredictorError, match="several predictors"):
        load_predictor(trained_predictors.out_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PredictorError, match="no predictor.json"):
        load_predictor(tmp_path / "empty")


@pytest.mark.parametrize("model", ["unf", "unf-perm", "deepsets", "flat"])
def test_training_on_prepared_inputs_matches_per_batch_inputs(predict_zoo, tmp_path: Path, monkeypatch,
                                                              model: str) -> None:
    """Training prepares the inputs (normalization, features, layout) once per run; the same run with them
    computed every batch (the fallback above PREPARED_BYTES_MAX) gives the same model up to float rounding."""
    import pipeline.predict.train as train

    config = _config(epochs=2, unf_hidden=(4, 4), unf_head=(16,), deepsets_hidden=8, deepsets_head=(16,),
                     flat_hidden=(16,))
    data = build_data(predict_zoo, config)
    calls = []
    real = train._prepared_inputs
    monkeypatch.setattr(train, "_prepared_inputs", lambda *a: calls.append(1) or real(*a))
    once = fit_run(model, data, config, predict_zoo.spec, 0, tmp_path / "once", {}, CPU)
    assert calls and real(*_first_part(model, data, config, predict_zoo.spec)) is not None
    monkeypatch.setattr(train, "PREPARED_BYTES_MAX", 0)
    per_batch = fit_run(model, data, config, predict_zoo.spec, 0, tmp_path / "per_batch", {}, CPU)
    a, b = once.predictions["prediction"].to_numpy(), per_batch.predictions["prediction"].to_numpy()
    assert np.allclose(a, b, atol=1e-5), float(np.abs(a - b).max())
    assert [h["train_loss"] for h in once.history] == pytest.approx([h["train_loss"] for h in per_batch.history],
                                                                      rel=1e-5)


def _first_part(model: str, data, config: TrainConfig, spec):
    """(net, [one training part], chunk) as `_fit_torch` builds them, to call `_prepared_inputs` directly."""
    from pipeline.predict.config import MODEL_KINDS
    from pipeline.predict.data import normalization_stats
    from pipeline.predict.models import TensorNormalizer, build_net
    from pipeline.predict.train import _hyperparameters

    _, _, w = data.take(data.rows["train"])[0]
    net = build_net(MODEL_KINDS[model], spec, _hyperparameters(model, config),
                    TensorNormalizer(data.names, *normalization_stats([w], data.names)))
    n = len(next(iter(w.values())))
    return net, [(w, torch.zeros(n), None)], 7  # chunks of 7 members: the concatenation is exercised


def test_prepared_inputs_select_the_same_members_as_the_raw_weights(predict_zoo) -> None:
    """forward_prepared(select(prepare(all), idx)) == forward(weights[idx]) for every torch model kind, prepared in
    chunks (as training does) or at once."""
    from pipeline.predict.train import _prepared_inputs

    config = _config(unf_hidden=(4, 4), unf_head=(16,), deepsets_hidden=8, deepsets_head=(16,), flat_hidden=(16,),
                     unf_pos_embed=True)
    data = build_data(predict_zoo, config)
    idx = torch.tensor([5, 0, 3, 11])
    for model in ("unf", "unf-perm", "deepsets", "flat"):
        net, parts, chunk = _first_part(model, data, config, predict_zoo.spec)
        (prepared,) = _prepared_inputs(net, parts, chunk)
        w = parts[0][0]
        with torch.no_grad():
            direct = net({k: v[idx] for k, v in w.items()})
            via = net.forward_prepared(net.select(prepared, idx))
        assert torch.allclose(direct, via, atol=1e-6), model
