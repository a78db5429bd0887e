"""`unfzoo lopt`: user errors become one-line messages with exit code 2, never tracebacks."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from pipeline.cli import app

runner = CliRunner()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["meta-train", "{tmp}/no-zoo.zarr", "--out", "{tmp}/o"], "does not exist"),
        (["meta-train", "{tmp}/no-zoo.zarr", "--optimizer", "lstm", "--out", "{tmp}/o"], "unknown; use one of"),
        (["meta-train", "{tmp}/no-zoo.zarr", "--horizon", "30", "--truncation", "20", "--out", "{tmp}/o"], "multiple of truncation"),
        (["meta-train", "{tmp}/no-zoo.zarr", "--estimator", "sgd", "--out", "{tmp}/o"], "pes or tes"),
        (["meta-train", "{tmp}/no-zoo.zarr", "--device", "tpu", "--out", "{tmp}/o"], "not a torch device"),
        (["eval", "{tmp}", "--zoo", "{tmp}/no-zoo.zarr"], "no meta-trained optimizer"),
        (["eval", "{tmp}", "--zoo", "{tmp}/no-zoo.zarr", "--adam-lrs", "1e-3,fast"], "comma-separated numbers"),
        (["eval", "{tmp}", "--zoo", "{tmp}/no-zoo.zarr", "--multiple", "0"], "multiple >= 1"),
        (["eval", "{tmp}", "--zoo", "{tmp}/no-zoo.zarr", "--multiple", "4,2.5"], "whole multiples"),
        (["meta-train", "{tmp}/no-zoo.zarr", "--nominal", "rmsprop", "--out", "{tmp}/o"], "sgdm or adam"),
        (["meta-train", "{tmp}/no-zoo.zarr", "--meta-loss", "mse", "--out", "{tmp}/o"], "ratio or log"),
    ],
)
def test_user_errors_exit_2(tmp_path, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["lopt", *[a.format(tmp=tmp_path) for a in args]])
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and message in result.output
    assert "Traceback" not in result.output


def test_help_lists_both_commands() -> None:
    result = runner.invoke(app, ["lopt", "--help"])
    assert result.exit_code == 0 and "meta-train" in result.output and "eval" in result.output


def test_meta_train_resume_and_eval_on_a_zoo(predict_zoo, tmp_path) -> None:
    """End to end on the shared tiny MLP zoo: meta-train unf and sgdm briefly, rerun resumes, eval writes the report."""
    import json

    zoo = predict_zoo.url
    common = ["--outer-steps", "2", "--horizon", "4", "--truncation", "2", "--pairs", "2", "--max-members", "4",
              "--hidden", "8", "--device", "cpu"]
    for opt in ("unf", "sgdm"):
        result = runner.invoke(app, ["lopt", "meta-train", zoo, "--optimizer", opt, "--out", str(tmp_path / opt), *common])
        assert result.exit_code == 0, result.output
        assert "meta-trained" in result.output
    again = runner.invoke(app, ["lopt", "meta-train", zoo, "--optimizer", "sgdm", "--out", str(tmp_path / "sgdm"), *common])
    assert again.exit_code == 0, again.output
    assert len(json.loads((tmp_path / "sgdm" / "progress.json").read_text())["history"]) == 2  # nothing redone
    assert "selected step" in again.output
    from pipeline.lopt.runs import split_members

    source = json.loads((tmp_path / "sgdm" / "config.json").read_text())["source"]
    progress = json.loads((tmp_path / "sgdm" / "progress.json").read_text())
    assert source["val_members"] == split_members(predict_zoo, "val", 8)  # validation: val split only
    assert not set(source["val_members"]) & set(split_members(predict_zoo, "test"))
    assert not set(source["val_members"]) & set(source["members"])
    assert [v["step"] for v in progress["validation"]] == [0, 2]
    assert progress["selected"]["val_loss"] == min(v["val_loss"] for v in progress["validation"])
    clash = runner.invoke(app, ["lopt", "meta-train", zoo, "--optimizer", "sgdm", "--out", str(tmp_path / "sgdm"),
                                *common, "--seed", "5"])
    assert clash.exit_code == 2 and "different meta-train" in clash.output

    result = runner.invoke(app, ["lopt", "eval", str(tmp_path), "--zoo", zoo, "--members", "3", "--val-members", "2",
                                 "--multiple", "2", "--adam-lrs", "1e-3,1e-1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert set(report["rows"]) == {"unf", "sgdm", f"adam (lr {report['adam']['lr']:g})"}
    assert report["eval_at"] == [4, 8] and len(report["members"]) == 3
    assert report["rows"]["sgdm"]["selected_step"] == progress["selected"]["step"]
    assert report["reference"] is not None and report["reference"]["train_loss@horizon"] > 0
    assert (tmp_path / "eval" / "curves.png").is_file() and "adam" in result.output


def test_meta_train_seeds_then_eval_reports_intervals_over_them(predict_zoo, tmp_path) -> None:
    """--seeds 2 writes OUT/seed0 and OUT/seed1 (a rerun resumes both); eval groups them into one row per optimizer."""
    import csv
    import json

    zoo = predict_zoo.url
    common = ["--outer-steps", "2", "--horizon", "4", "--truncation", "2", "--pairs", "2", "--max-members", "4",
              "--hidden", "8", "--device", "cpu", "--seeds", "2"]
    for opt, extra in (("perparam", ["--nominal", "adam", "--norm-features"]), ("sgdm", [])):
        result = runner.invoke(app, ["lopt", "meta-train", zoo, "--optimizer", opt, "--out", str(tmp_path / opt), *common, *extra])
        assert result.exit_code == 0, result.output
        assert "seed 1:" in result.output
    assert json.loads((tmp_path / "perparam" / "seed1" / "config.json").read_text())["meta_train"]["seed"] == 1
    result = runner.invoke(app, ["lopt", "eval", str(tmp_path), "--zoo", zoo, "--members", "3", "--val-members", "2",
                                 "--multiple", "2,3", "--adam-lrs", "1e-2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert report["eval_at"] == [4, 8, 12]
    assert report["rows"]["perparam"]["seeds"] == 2 and report["rows"]["perparam"]["nominal"] == "adam"
    assert len(report["rows"]["sgdm"]["selected_steps"]) == 2
    rows = list(csv.DictReader((tmp_path / "eval" / "results.csv").open()))
    assert {r["optimizer"] for r in rows} == set(report["rows"]) and len(rows) == 3 * 3
    versus = report["rows"]["perparam"]["vs_versus"]["train_loss@4"]
    assert report["versus"] == "sgdm" and versus["seeds"] == 2 and versus["seeds_versus"] == 2  # both seed sets resampled
    assert all(r["versus"] == "sgdm" for r in rows) and {r["vs_versus"] == "" for r in rows if r["optimizer"] == "sgdm"} == {True}
    wrong = runner.invoke(app, ["lopt", "eval", str(tmp_path), "--zoo", zoo, "--versus", "unf", "--device", "cpu"])
    assert wrong.exit_code == 2 and "--versus 'unf' is not among" in wrong.output and "Traceback" not in wrong.output
