"""`unfzoo train`: user errors exit 2 with a message and no traceback; a short run writes its outputs."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from pipeline.cli import app

runner = CliRunner()


def _invoke(*args: str):
    return runner.invoke(app, ["train", *args])


def test_help_has_examples() -> None:
    result = _invoke("--help")
    assert result.exit_code == 0
    assert "unfzoo train datasets/zoos/cnn-digits.zarr --model all --seeds 3" in result.output


def test_missing_zoo(tmp_path: Path) -> None:
    result = _invoke(str(tmp_path / "nope.zarr"), "--out", str(tmp_path / "o"))
    assert result.exit_code == 2
    assert "does not exist" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_unknown_target_lists_available(predict_zoo, tmp_path: Path) -> None:
    result = _invoke(predict_zoo.url, "--target", "val_acc", "--out", str(tmp_path / "o"))
    assert result.exit_code == 2
    assert "unknown target 'val_acc'" in result.output and "test_acc" in result.output and "log_lr" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_empty_split(predict_zoo, tmp_path: Path) -> None:
    result = _invoke(predict_zoo.url, "--fractions", "1,0,0", "--out", str(tmp_path / "o"))
    assert result.exit_code == 2
    assert "val and test splits are empty" in result.output and "Traceback" not in result.output


def test_unknown_model_and_bad_checkpoints(predict_zoo, tmp_path: Path) -> None:
    result = _invoke(predict_zoo.url, "--model", "nfn", "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and "--model" in result.output
    result = _invoke(predict_zoo.url, "--checkpoints", "3,x", "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and "--checkpoints" in result.output


def test_unknown_matmul_precision(predict_zoo, tmp_path: Path) -> None:
    result = _invoke(predict_zoo.url, "--matmul-precision", "bf16", "--out", str(tmp_path / "o"))
    assert result.exit_code == 2
    assert "--matmul-precision 'bf16' is unknown" in result.output and "highest, high, medium" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "o").exists()


def test_matmul_precision_note_without_bfloat16_hardware(predict_zoo, tmp_path: Path, monkeypatch) -> None:
    import torch

    args = (predict_zoo.url, "--model", "flat", "--epochs", "1", "--checkpoints", "all", "--fractions", "0.6,0.2,0.2",
            "--device", "cpu", "--matmul-precision", "medium")
    for native, expect_note in ((False, True), (True, False)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda native=native: native, raising=False)
        result = _invoke(*args, "--out", str(tmp_path / f"o{native}"))
        assert result.exit_code == 0, result.output
        assert ("no bfloat16 matrix units" in result.output) is expect_note
        config = json.loads((tmp_path / f"o{native}" / "train_config.json").read_text())
        assert config["matmul_precision"] == "medium"


def test_compile_flag_trains_compiled_and_is_recorded(predict_zoo, tmp_path: Path, monkeypatch) -> None:
    import torch

    real_compile, compiled = torch.compile, []

    def aot_eager(fn, **kwargs):  # inductor's tracing without its code generation: seconds, not minutes, in CI
        compiled.append(fn)
        return real_compile(fn, backend="aot_eager", dynamic=kwargs.get("dynamic"))

    monkeypatch.setattr(torch, "compile", aot_eager)
    result = _invoke(predict_zoo.url, "--model", "flat", "--epochs", "1", "--checkpoints", "all", "--fractions",
                     "0.6,0.2,0.2", "--device", "cpu", "--compile", "--out", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    assert compiled and "test tau" in result.output
    assert json.loads((tmp_path / "o" / "train_config.json").read_text())["compile"] is True
    torch._dynamo.reset()


def test_short_run_writes_outputs_and_resumes(predict_zoo, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = (predict_zoo.url, "--model", "statnn,flat", "--epochs", "2", "--checkpoints", "all", "--fractions",
            "0.6,0.2,0.2", "--device", "cpu", "--out", str(out))
    result = _invoke(*args)
    assert result.exit_code == 0, result.output
    assert "statnn" in result.output and "test tau" in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert [s["model"] for s in metrics["summary"]] == ["statnn", "flat"]
    assert set(metrics["runs"][0]["metrics"]) == {"train", "val", "test"}
    assert metrics["data"]["excluded"]["diverged"] >= 0
    stamp = (out / "flat" / "seed0" / "result.json").stat().st_mtime_ns
    again = _invoke(*args)  # finished runs are reused, not retrained
    assert again.exit_code == 0
    assert (out / "flat" / "seed0" / "result.json").stat().st_mtime_ns == stamp
    other = _invoke(predict_zoo.url, "--target", "gen_gap", "--out", str(out))
    assert other.exit_code == 2 and "different target" in other.output
