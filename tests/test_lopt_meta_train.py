"""Meta-training: learns on a hand-built problem, resumes exactly, refuses a different run; evaluation report."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.errors import CheckpointError, ConfigError
from pipeline.lopt.es import ESConfig
from pipeline.lopt.evaluate import (
    EvalConfig,
    evaluate_optimizers,
    format_table,
    paired_difference,
    run_optimizer,
    save_report,
)
from pipeline.lopt.meta_train import MetaTrainConfig, load_optimizer, meta_train
from pipeline.lopt.optimizers import LOptConfig, ResidualLOpt
from _lopt_problems import mlp_problem


def _config(kind: str = "perparam", steps: int = 4, **kw) -> MetaTrainConfig:
    return MetaTrainConfig(
        optimizer=LOptConfig(kind=kind, hidden=8, layers=2),
        es=ESConfig(pairs=2, sigma=0.01),
        outer_steps=steps,
        horizon=6,
        truncation=3,
        checkpoint_every=2,
        **kw,
    )


def test_resume_continues_exactly(tmp_path) -> None:
    problems = [mlp_problem(seed=s) for s in range(2)]
    straight = meta_train(problems, _config(steps=5), tmp_path / "a")
    part = meta_train(problems, _config(steps=5), tmp_path / "b", stop_after=3)  # stops mid-episode (window 2 of 2)
    assert len(part.history) == 3
    resumed = meta_train(problems, _config(steps=5), tmp_path / "b")
    for k in straight.meta:
        torch.testing.assert_close(resumed.meta[k], straight.meta[k], rtol=0, atol=0)
    assert [h["meta_loss"] for h in resumed.history] == [h["meta_loss"] for h in straight.history]
    lopt, meta, stored = load_optimizer(tmp_path / "b")
    assert lopt.kind == "perparam" and stored["meta_train"]["outer_steps"] == 5
    assert all(torch.equal(meta[k], straight.meta[k]) for k in meta)


def test_resume_refuses_a_different_run(tmp_path) -> None:
    problems = [mlp_problem()]
    meta_train(problems, _config(steps=2), tmp_path / "run")
    with pytest.raises(ConfigError, match="different meta-train"):
        meta_train(problems, _config(steps=2, seed=1), tmp_path / "run")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("not a run")
    with pytest.raises(ConfigError, match="not a meta-training directory"):
        meta_train(problems, _config(steps=2), tmp_path / "other")
    with pytest.raises(CheckpointError, match="meta-train"):
        load_optimizer(tmp_path / "other")


def test_meta_training_lowers_the_meta_loss_of_sgdm() -> None:
    """From a too-small step size, ES raises alpha and the meta-loss falls (the loop learns, not just runs)."""
    cfg = MetaTrainConfig(
        optimizer=LOptConfig(kind="sgdm", alpha=0.003),
        es=ESConfig(pairs=4, sigma=0.05),
        outer_steps=30,
        horizon=10,
        truncation=5,
        outer_lr=0.1,
        hp_lr=0.1,
    )
    problem = mlp_problem()
    res = meta_train([problem], cfg)
    assert res.history[-1]["alpha"] > 5 * 0.003
    sgdm = ResidualLOpt(cfg.optimizer)
    before = run_optimizer([problem], sgdm, sgdm.init_meta(0), 10, (10,)).train_loss[0, 0]
    after = run_optimizer([problem], sgdm, res.meta, 10, (10,)).train_loss[0, 0]
    assert after < before - 0.02


def test_evaluation_report(tmp_path) -> None:
    trained = meta_train([mlp_problem(seed=0)], _config("sgdm", steps=2))
    sgdm = ResidualLOpt(LOptConfig(kind="sgdm"))
    test = [mlp_problem(seed=s) for s in (1, 2, 3)]
    val = [mlp_problem(seed=s) for s in (4, 5)]
    cfg = EvalConfig(multiples=(2,), adam_lrs=(1e-3, 1e-1, 1e3))
    report = evaluate_optimizers({"sgdm": (sgdm, trained.meta)}, test, val, horizon=5, config=cfg,
                                 extra={"sgdm": {"meta_train_wall_s": trained.wall_time_s}})
    assert report["adam"]["lr"] in (1e-3, 1e-1) and set(report["adam"]["grid"]) == {"0.001", "0.1", "1000"}
    assert set(report["rows"]) == {"sgdm", f"adam (lr {report['adam']['lr']:g})"}
    row = report["rows"]["sgdm"]
    assert set(row["train_loss"]) == {"5", "10"} and 0 <= row["diverged"] <= 1
    d = row["vs_adam"]["train_loss@10"]
    assert d["lo"] <= d["mean"] <= d["hi"] and d["n"] == 3
    assert len(report["curves"]["sgdm"]) == 10
    path = save_report(report, tmp_path / "eval")
    assert json.loads(path.read_text())["horizon"] == 5 and (tmp_path / "eval" / "curves.png").stat().st_size > 1000
    assert format_table(report).row_count == 2


def test_paired_difference_interval() -> None:
    d = paired_difference([1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0])
    assert d["mean"] == 2.5 and d["lo"] == pytest.approx(2.5 - 3.182446 * 1.290994 / 2, rel=1e-5)


def _val_config(steps: int = 6, **kw) -> MetaTrainConfig:
    return _config("sgdm", steps=steps, validate_every=2, val_members=2, **kw)


def test_validation_selects_the_best_scoring_meta_parameters(tmp_path, monkeypatch) -> None:
    """The saved optimizer is the one with the lowest recorded validation score (here step 2 of 0, 2, 4, 6), and
    meta_last.safetensors holds the last step's; training itself is unchanged by validation."""
    import importlib

    from safetensors.torch import load_file

    problems, val = [mlp_problem(seed=0)], [mlp_problem(seed=s) for s in (7, 8)]
    scores = iter([0.5, 0.3, 0.4, 0.6])
    seen: list[list] = []

    def fake_score(probs, lopt, meta, horizon, seed, cap):
        seen.append(list(probs))
        return next(scores)

    monkeypatch.setattr(importlib.import_module("pipeline.lopt.meta_train"), "validation_score", fake_score)
    res = meta_train(problems, _val_config(), tmp_path / "run", val_problems=val)
    assert [v["step"] for v in res.validation] == [0, 2, 4, 6] and res.selected_step == 2 and res.selected_val_loss == 0.3
    assert all(s == val for s in seen)  # scored on the validation problems only
    at2 = meta_train(problems, _config("sgdm", steps=2))  # no validation: the meta-parameters after 2 steps
    plain = meta_train(problems, _config("sgdm", steps=6))
    _, saved, _ = load_optimizer(tmp_path / "run")
    last = load_file(str(tmp_path / "run" / "meta_last.safetensors"))
    for k in saved:
        assert torch.equal(saved[k], at2.meta[k]) and torch.equal(res.meta[k], at2.meta[k])
        assert torch.equal(last[k], plain.meta[k])
    assert any(not torch.equal(saved[k], last[k]) for k in saved)
    progress = json.loads((tmp_path / "run" / "progress.json").read_text())
    assert progress["selected"] == {"step": 2, "val_loss": 0.3} and progress["validation"] == res.validation


def test_recorded_curve_and_saved_file_agree(tmp_path) -> None:
    """With the real score: the saved optimizer rescored gives the curve's minimum."""
    from pipeline.lopt.meta_train import validation_score

    problems, val = [mlp_problem(seed=0)], [mlp_problem(seed=s) for s in (7, 8)]
    cfg = _val_config(steps=4)
    res = meta_train(problems, cfg, tmp_path / "run", val_problems=val)
    best = min(res.validation, key=lambda v: v["val_loss"])
    assert res.selected_step == best["step"]
    lopt, saved, _ = load_optimizer(tmp_path / "run")
    assert validation_score(val, lopt, saved, cfg.horizon, cfg.seed, cfg.loss_cap) == pytest.approx(best["val_loss"], abs=1e-9)


def test_resume_keeps_the_best(tmp_path) -> None:
    problems, val = [mlp_problem(seed=s) for s in range(2)], [mlp_problem(seed=s) for s in (7, 8)]
    straight = meta_train(problems, _val_config(steps=6), tmp_path / "a", val_problems=val)
    meta_train(problems, _val_config(steps=6), tmp_path / "b", val_problems=val, stop_after=3)  # after the step-2 validation
    resumed = meta_train(problems, _val_config(steps=6), tmp_path / "b", val_problems=val)
    assert resumed.validation == straight.validation and resumed.selected_step == straight.selected_step
    for k in straight.meta:
        assert torch.equal(resumed.meta[k], straight.meta[k]) and torch.equal(resumed.meta_last[k], straight.meta_last[k])
    with pytest.raises(ConfigError, match="different meta-train"):  # validation settings are part of the run
        meta_train(problems, _config("sgdm", steps=6, validate_every=3, val_members=2), tmp_path / "b", val_problems=val)


class _Killed(BaseException):
    """Stands for SIGKILL at a chosen write: nothing after it runs (BaseException: no handler catches it)."""


@pytest.mark.parametrize("killed_at", ["meta", "progress"])
def test_kill_between_checkpoint_and_derived_files_resumes_exactly(tmp_path, monkeypatch, killed_at: str) -> None:
    """Killed after checkpoint.safetensors holds step 4 but before meta*.safetensors / progress.json follow (they still
    say step 2): the rerun resumes from step 4 exactly, never pairs step-4 parameters with step-2 progress."""
    import importlib

    mt = importlib.import_module("pipeline.lopt.meta_train")
    problems = [mlp_problem(seed=s) for s in range(2)]
    straight = meta_train(problems, _config(steps=6), tmp_path / "a")
    saves = {"n": 0}
    real_meta, real_json = mt._save_meta, mt._write_json

    def save_meta(out, last, selected):
        saves["n"] += 1  # one call per checkpoint (steps 2, 4, 6)
        if killed_at == "meta" and saves["n"] == 2:
            raise _Killed
        real_meta(out, last, selected)

    def write_json(path, data):
        if killed_at == "progress" and path.name == "progress.json" and data["step"] == 4:
            raise _Killed
        real_json(path, data)

    monkeypatch.setattr(mt, "_save_meta", save_meta)
    monkeypatch.setattr(mt, "_write_json", write_json)
    with pytest.raises(_Killed):
        meta_train(problems, _config(steps=6), tmp_path / "b")
    monkeypatch.undo()
    run = tmp_path / "b"
    assert json.loads((run / "progress.json").read_text())["step"] == 2  # the window of the bug: files disagree
    resumed = meta_train(problems, _config(steps=6), run)
    assert [h["meta_loss"] for h in resumed.history] == [h["meta_loss"] for h in straight.history]
    for k in straight.meta:
        assert torch.equal(resumed.meta[k], straight.meta[k]), k
    _, saved, _ = load_optimizer(run)
    assert all(torch.equal(saved[k], straight.meta[k]) for k in saved)
    progress = json.loads((run / "progress.json").read_text())
    assert progress["step"] == 6 and progress["history"] == straight.history


def test_kill_after_the_last_checkpoint_rebuilds_the_derived_files(tmp_path, monkeypatch) -> None:
    """Killed after the final checkpoint but before progress.json: the rerun trains nothing and repairs progress.json."""
    import importlib

    mt = importlib.import_module("pipeline.lopt.meta_train")
    problems = [mlp_problem()]
    real_json = mt._write_json

    def write_json(path, data):
        if path.name == "progress.json" and data["step"] == 4:
            raise _Killed
        real_json(path, data)

    monkeypatch.setattr(mt, "_write_json", write_json)
    with pytest.raises(_Killed):
        meta_train(problems, _config(steps=4), tmp_path / "run")
    monkeypatch.undo()
    assert json.loads((tmp_path / "run" / "progress.json").read_text())["step"] == 2
    again = meta_train(problems, _config(steps=4), tmp_path / "run")
    straight = meta_train(problems, _config(steps=4))
    assert again.history == straight.history and all(torch.equal(again.meta[k], straight.meta[k]) for k in again.meta)
    assert json.loads((tmp_path / "run" / "progress.json").read_text())["history"] == straight.history


def test_unverifiable_or_foreign_checkpoints_are_refused(tmp_path) -> None:
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    problems = [mlp_problem()]
    meta_train(problems, _config(steps=2), tmp_path / "run")
    meta_train(problems, _config(steps=2, seed=1), tmp_path / "other")
    ckpt = tmp_path / "run" / "checkpoint.safetensors"
    tensors = load_file(str(ckpt))
    with safe_open(str(ckpt), framework="pt") as f:
        metadata = f.metadata()

    def refused(match: str) -> None:
        with pytest.raises(CheckpointError, match=match):
            meta_train(problems, _config(steps=4), tmp_path / "run")

    save_file(tensors, str(ckpt))  # an older checkpoint: no step record, cannot be paired safely
    refused("does not record its own outer step")
    save_file(tensors, str(ckpt), metadata={**metadata, "progress": json.dumps({**json.loads(metadata["progress"]), "step": 1})})
    refused("step 1 disagrees with its history")
    save_file(load_file(str(tmp_path / "other" / "checkpoint.safetensors")), str(ckpt),
              metadata=safe_open(str(tmp_path / "other" / "checkpoint.safetensors"), framework="pt").metadata())
    refused("another meta-training run")
    ckpt.write_bytes(b"\x10\x00")  # torn file
    refused("checkpoint unreadable")
