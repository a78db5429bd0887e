"""Probe models (`probe`, `unf-probe`): the member forward from weights matches the member module, the features keep
every hidden-unit symmetry, training saves a predictor that reproduces itself, and zoos they cannot read are refused
before anything loads or is written."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipeline.errors import ConfigError
from pipeline.predict import TrainConfig, load_predictor, train_predictor
from pipeline.predict.probe import ProbeFeatures, member_logits, member_logits_under, probe_setup
from pipeline.zoo.members import build_member, pad_to_shapes

ARCHS = {
    "cnn": ({"name": "cnn", "channels": [6, 5, 7], "kernel_size": 3, "stride": 2, "padding": 1, "in_channels": 1,
             "num_classes": 10}, (1, 8, 8)),
    "mlp": ({"name": "mlp", "hidden": [9, 6], "in_features": 12, "num_classes": 4}, (12,)),
}


def _members(arch: dict, activation: str, n: int, seed: int) -> list[torch.nn.Module]:
    torch.manual_seed(seed)
    return [build_member({**arch, "activation": activation}).eval() for _ in range(n)]


def _stacked(modules: list[torch.nn.Module]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([m.state_dict()[k] for m in modules]) for k in modules[0].state_dict()}


@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("family", sorted(ARCHS))
def test_member_logits_match_the_member_module(family: str, activation: str) -> None:
    arch, input_shape = ARCHS[family]
    modules = _members(arch, activation, 3, seed=1)
    x = torch.rand(5, *input_shape)
    got = member_logits(arch, _stacked(modules), x, activation)  # (3, 5, K)
    with torch.no_grad():
        want = torch.stack([m(x) for m in modules])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", sorted(ARCHS))
def test_all_activations_in_one_pass_match_each_member_module(family: str) -> None:
    """The shared-first-layer pass gives, for every activation, what the member module with that activation gives."""
    arch, input_shape = ARCHS[family]
    activations = ["relu", "tanh", "gelu"]
    x = torch.rand(5, *input_shape)
    got = member_logits_under(arch, _stacked(_members(arch, "relu", 3, seed=4)), x, activations)  # (A, 3, 5, K)
    assert got.shape[:3] == (3, 3, 5)
    for a, activation in enumerate(activations):
        with torch.no_grad():  # same seed: the same weights under another activation
            want = torch.stack([m(x) for m in _members(arch, activation, 3, seed=4)])
        torch.testing.assert_close(got[a], want, rtol=1e-4, atol=1e-5)


def _wider(name: str, shape: tuple[int, ...], extra: int = 3) -> tuple[int, ...]:
    """The shape of tensor `name` in a network with `extra` more units in every hidden layer."""
    if name.startswith("head."):
        return (shape[0], shape[1] + extra) if len(shape) == 2 else shape
    first = name.split(".")[1] == "0"
    return (shape[0] + extra, *(shape[1:2] if first else (shape[1] + extra,)), *shape[2:]) if len(shape) > 1 \
        else (shape[0] + extra,)


@pytest.mark.parametrize("family", sorted(ARCHS))
def test_zero_padded_members_compute_the_same_logits(family: str) -> None:
    """Zoos store narrower members zero-padded to the widest width: the probe forward must see the same network."""
    arch, input_shape = ARCHS[family]
    weights = _stacked(_members(arch, "tanh", 2, seed=2))
    padded = {k: torch.as_tensor(v) for k, v in pad_to_shapes(
        {k: v.numpy() for k, v in weights.items()},
        {k: _wider(k, tuple(v.shape[1:])) for k, v in weights.items()}).items()}
    assert any(padded[k].shape != weights[k].shape for k in weights)
    x = torch.rand(4, *input_shape)
    torch.testing.assert_close(member_logits(arch, padded, x, "tanh"), member_logits(arch, weights, x, "tanh"),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", sorted(ARCHS))
def test_probe_features_are_invariant_to_hidden_unit_permutations(family: str) -> None:
    from unf_models import WeightSpec

    arch, input_shape = ARCHS[family]
    modules = _members(arch, "relu", 4, seed=3)
    spec = WeightSpec.from_module(modules[0])
    weights = _stacked(modules)
    torch.manual_seed(0)
    features = ProbeFeatures({"arch": arch, "input_shape": list(input_shape), "activations": ["relu", "tanh"],
                              "n_probes": 6})
    permuted = spec.permute(weights, spec.random_permutation(torch.Generator().manual_seed(5)))
    assert any(not torch.equal(permuted[k], weights[k]) for k in weights)
    with torch.no_grad():
        torch.testing.assert_close(features(permuted), features(weights), rtol=1e-4, atol=1e-4)
    assert features(weights).shape == (4, features.num_features)


def test_probe_setup_refuses_zoos_it_cannot_read() -> None:
    layout = SimpleNamespace(categorical={})
    gru = SimpleNamespace(url="gru.zarr", arch={"name": "gru_seq2seq"}, attrs={}, layout=layout)
    with pytest.raises(ConfigError, match=r"gru\.zarr.*'gru_seq2seq'"):
        probe_setup(gru, 8)
    imported = SimpleNamespace(url="imp.zarr", arch=None, attrs={}, layout=layout)
    with pytest.raises(ConfigError, match=r"imp\.zarr.*records no architecture"):
        probe_setup(imported, 8)


@pytest.fixture(scope="module")
def probe_run(predict_zoo, predict_zoo_wide, tmp_path_factory):
    config = TrainConfig(models=("unf", "unf-probe", "probe"), checkpoints="final", fractions=(0.6, 0.2, 0.2),
                         epochs=3, device="cpu", unf_hidden=(4,), unf_head=(32,), probe_head=(32,), probes=8)
    return train_predictor(predict_zoo, config, tmp_path_factory.mktemp("probe_run") / "out",
                           eval_zoos=[predict_zoo_wide])


def test_probe_setup_reads_the_zoo(predict_zoo) -> None:
    setup = probe_setup(predict_zoo, 8)
    assert setup["arch"]["name"] == "mlp"
    assert setup["input_shape"] == [1, 8, 8]
    assert sorted(setup["activations"]) == ["relu", "tanh"]  # the zoo's activation column: each is probed


@pytest.mark.parametrize("model", ["unf-probe", "probe"])
def test_saved_probe_predictors_reproduce_training_predictions(probe_run, predict_zoo_wide, model: str) -> None:
    run = next(r for r in probe_run.runs if r.model == model)
    predictor = load_predictor(run.directory, device="cpu")
    assert predictor.width_agnostic
    preds = run.predictions
    rows = preds[preds["split"].str.startswith("eval:")]  # a wider foreign zoo: read at its own width
    assert len(rows) > 0
    weights = predict_zoo_wide.weights(rows["member"].to_numpy(), len(predict_zoo_wide.checkpoint_epochs) - 1)
    np.testing.assert_allclose(predictor.predict(weights), rows["prediction"].to_numpy(), rtol=0, atol=1e-5)
    assert ((rows["prediction"] >= 0) & (rows["prediction"] <= 1)).all()


def test_unf_val_chooses_among_every_unf_form_on_validation(probe_run) -> None:
    summary = probe_run.summary.set_index("model")
    forms = ["unf", "unf-probe"]
    chosen = max(forms, key=lambda m: summary.loc[m, "val_tau_mean"])
    assert summary.loc["unf-val", "val_tau_mean"] == summary.loc[chosen, "val_tau_mean"]
    import json

    selection = json.loads((probe_run.out_dir / "unf-val" / "selection.json").read_text())
    assert selection["form"] == chosen


def test_cli_refuses_a_zoo_without_what_probes_need(score_zoo, tmp_path: Path) -> None:
    """score_zoo records a cnn arch but no task input shape: one line naming the zoo, exit 2, nothing written."""
    from pipeline.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["train", str(score_zoo.url), "--model", "unf,probe", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "input_shape" in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_unf_probe_prepared_in_chunks_gives_the_forward_outputs() -> None:
    """Training prepares the UNF inputs once, in chunks, and selects batches from them: the same outputs as the
    plain forward on those members."""
    from pipeline.predict.models import TensorNormalizer, UNFProbeNet
    from pipeline.predict.train import _prepared_inputs
    from unf_models import WeightSpec

    arch, input_shape = ARCHS["cnn"]
    modules = _members(arch, "relu", 12, seed=4)
    spec = WeightSpec.from_module(modules[0])
    weights = _stacked(modules)
    torch.manual_seed(0)
    setup = {"arch": arch, "input_shape": list(input_shape), "activations": ["relu"], "n_probes": 4}
    net = UNFProbeNet(spec, (4,), (16,), setup, normalizer=TensorNormalizer(spec.names, mode="fanin"),
                      features="raw+log+size").eval()
    prepared = _prepared_inputs(net, [(weights, torch.zeros(12), None)], chunk=5)  # chunks of 5, 5, 2
    index = torch.tensor([11, 0, 6, 3])
    with torch.no_grad():
        got = net.forward_prepared(net.select(prepared[0], index))
        want = net({k: v[index] for k, v in weights.items()})
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_model_all_leaves_the_probe_models_out_where_they_cannot_read(score_zoo) -> None:
    """`--model all` on a zoo the probe models cannot read trains the rest, with a note; naming one raises."""
    from pipeline.predict.train import plan_probe_models

    config, setup, note = plan_probe_models([score_zoo], TrainConfig(models="all"))
    assert setup is None and "probe" not in config.models and "unf-probe" not in config.models
    assert {"unf", "unf-perm", "statnn", "deepsets", "flat"} <= set(config.models)
    assert "left out unf-probe, probe" in note and "input_shape" in note
    with pytest.raises(ConfigError, match="input_shape"):
        plan_probe_models([score_zoo], TrainConfig(models=("unf", "probe")))


def test_scoring_with_a_probe_predictor_names_the_activations_it_assumes(probe_run, predict_zoo_wide,
                                                                        tmp_path: Path) -> None:
    from pipeline.cli import app

    out = tmp_path / "scores.csv"
    result = CliRunner().invoke(app, ["score", str(probe_run.out_dir / "unf-probe"), str(predict_zoo_wide.url),
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "under the activations of its training zoo (relu, tanh)" in result.output
    assert out.is_file()
