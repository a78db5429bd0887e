"""`unfzoo score`: exit codes 0 (all scored), 1 (some failed, rest written), 2 (usage errors, no traceback)."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, score_zoo) -> Path:
    folder = tmp_path_factory.mktemp("cli_checkpoints")
    for m in (1, 2, 3):
        torch.save({k: v[0].clone() for k, v in score_zoo.weights([m], -1).items()}, folder / f"run{m}.pt")
    return folder


def test_all_scored_exits_0_and_writes_the_table(tmp_path: Path, checkpoints: Path, score_predictor_dirs) -> None:
    out = tmp_path / "scores.parquet"
    result = runner.invoke(app, ["score", str(score_predictor_dirs["unf"]), str(checkpoints), "--out", str(out)])
    assert result.exit_code == 0, result.output
    frame = pd.read_parquet(out)
    assert len(frame) == 3 and (frame["status"] == "ok").all() and frame["prediction"].notna().all()
    assert "scored" in result.output and "wrote" in result.output


def test_some_failed_exits_1_lists_them_and_scores_the_rest(tmp_path: Path, checkpoints: Path,
                                                            score_predictor_dirs, score_zoo) -> None:
    broken = tmp_path / "broken.pt"
    broken.write_bytes((checkpoints / "run1.pt").read_bytes()[:500])
    out = tmp_path / "scores.csv"
    result = runner.invoke(app, ["score", str(score_predictor_dirs["unf"]), str(checkpoints), str(broken),
                                 score_zoo.url, "--checkpoint", "0", "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert "1 input(s) failed" in result.output and "broken.pt" in result.output
    assert "Traceback" not in result.output
    frame = pd.read_csv(out)
    assert len(frame) == 3 + 1 + 40
    assert frame["status"].value_counts().to_dict() == {"ok": 43, "error": 1}
    assert frame.loc[frame["format"] == "zoo", "checkpoint"].eq(0).all()


@pytest.mark.parametrize("case", ["missing_predictor", "no_inputs", "bad_out", "bad_checkpoint", "unknown_epoch"])
def test_usage_errors_exit_2_with_a_message(tmp_path: Path, checkpoints: Path, score_predictor_dirs, score_zoo,
                                            case: str) -> None:
    predictor, inputs, out = str(score_predictor_dirs["unf"]), [str(checkpoints)], str(tmp_path / "s.csv")
    extra: list[str] = []
    expected = {"missing_predictor": "does not exist", "no_inputs": "no checkpoints found",
                "bad_out": ".csv or .parquet", "bad_checkpoint": "epoch number",
                "unknown_epoch": "stores epochs [0, 5]"}[case]
    if case == "missing_predictor":
        predictor = str(tmp_path / "no_predictor")
    elif case == "no_inputs":
        (tmp_path / "empty").mkdir()
        inputs = [str(tmp_path / "empty"), str(tmp_path / "absent.pt")]
    elif case == "bad_out":
        out = str(tmp_path / "s.txt")
    elif case == "bad_checkpoint":
        extra = ["--checkpoint", "best"]
    else:
        inputs, extra = [score_zoo.url], ["--checkpoint", "3"]
    result = runner.invoke(app, ["score", predictor, *inputs, "--out", out, *extra])
    assert result.exit_code == 2, result.output
    assert expected in result.output and "Traceback" not in result.output
    assert not Path(out).exists()


def test_pipes_odd_tensors_and_any_file_name_are_rows_of_a_valid_table(tmp_path: Path, checkpoints: Path,
                                                                      score_predictor_dirs) -> None:
    """A folder with a named pipe, a meta-device tensor and a non-UTF-8 file name: the run ends (exit 1), the table is
    valid UTF-8 with one row per file, the good files (the oddly named one too) are scored."""
    folder = tmp_path / "runs"
    folder.mkdir()
    state = torch.load(checkpoints / "run1.pt", weights_only=True)
    torch.save(state, folder / "good.pt")
    torch.save(state, folder / os.fsdecode(b"r\xe9sum\xe9.pt"))  # Latin-1 bytes in the name
    torch.save({**state, "head.weight": torch.empty(state["head.weight"].shape, device="meta")}, folder / "meta.pt")
    os.mkfifo(folder / "pipe.pt")
    out = tmp_path / "scores.csv"
    result = runner.invoke(app, ["score", str(score_predictor_dirs["unf"]), str(folder), "--out", str(out),
                                 "--workers", "0"])
    assert result.exit_code == 1, result.output
    assert "2 input(s) failed" in result.output and "Traceback" not in result.output
    frame = pd.read_csv(out, encoding="utf-8")  # strict decoding: the file is valid UTF-8
    names = {Path(p).name: s for p, s in zip(frame["path"], frame["status"])}
    assert names == {"good.pt": "ok", "r\\xe9sum\\xe9.pt": "ok", "meta.pt": "error", "pipe.pt": "error"}


def test_brackets_in_file_names_are_printed(tmp_path: Path, checkpoints: Path, score_predictor_dirs) -> None:
    """rich would read '[lr=0.1]' as markup and drop it from the summary and the error list."""
    good, bad = tmp_path / "run[lr=0.1].pt", tmp_path / "bad[arch].pt"
    good.write_bytes((checkpoints / "run1.pt").read_bytes())
    bad.write_bytes(b"not a checkpoint")
    result = runner.invoke(app, ["score", str(score_predictor_dirs["unf"]), str(good), str(bad), "--out",
                                 str(tmp_path / "s.csv"), "--workers", "0"])
    assert result.exit_code == 1, result.output
    assert "run[lr=0.1].pt (" in result.output and "bad[arch].pt" in result.output
