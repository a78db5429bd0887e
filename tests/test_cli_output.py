"""What the CLI prints: defaults and allowed values in --help, shell completion of choices, --device checked before
any data loads, plain progress lines and whole tables when output is a file or pipe, and --json documents."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app

runner = CliRunner()
WIDE = {"COLUMNS": "200"}


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["train"], ["[default: (runs/train/<zoo name>-<target>)]", "[run|config|group:HPARAM[=V,...]]", "[raw+log+size|raw+log|raw]", "[auto|bce|mse]",
                     "[auto|cpu|cuda|cuda:N]", "MODEL[,MODEL...]", "[default: unf]", "[default: (all)]"]),
        (["lopt", "eval"], ["[default: (DIRECTORY/eval)]", "[default: 1e-4,3e-4", "--json"]),
        (["lopt", "meta-train"], ["[unf|perparam|sgdm]", "[pes|tes]", "[default: pes]"]),
        (["score"], ["[final|EPOCH]", "[default: final]", "[default: (automatic)]", "--json"]),
        (["zoo"], ["[default: (datasets/zoos/NAME.zarr)]", "[default: (in this process for small builds, else one per core)]", "[auto|cpu|cuda|cuda:N]"]),
        (["inspect"], ["--json"]),
    ],
)
def test_help_shows_defaults_and_allowed_values(command: list[str], expected: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # rich wraps long help lines
    for item in expected:
        assert " ".join(item.split()) in text, f"{' '.join(command)} --help lacks {item!r}"


def test_choices_mirror_the_library() -> None:
    """The CLI keeps its choice lists (so --help never imports torch); they must equal the library's."""
    from pipeline.commands import lopt as lopt_cmd
    from pipeline.commands import train as train_cmd
    from pipeline.device import MATMUL_PRECISIONS
    from pipeline.lopt.optimizers import KINDS
    from pipeline.predict.config import FEATURES, MODEL_NAMES

    assert set(train_cmd.MODELS) == {*MODEL_NAMES, "all"}
    assert set(train_cmd.FEATURES) == set(FEATURES)
    assert train_cmd.PRECISIONS == MATMUL_PRECISIONS
    assert set(lopt_cmd.OPTIMIZERS) == set(KINDS)


def test_help_does_not_import_torch() -> None:
    code = ("import sys; from typer.testing import CliRunner; from pipeline.cli import app; "
            "r = CliRunner().invoke(app, ['train', '--help']); assert r.exit_code == 0; print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("args", "incomplete", "expected"),
    [
        (["train", "z.zarr", "--split"], "", ["run", "config"]),
        (["train", "z.zarr", "--model"], "unf,st", ["unf,statnn"]),
        (["lopt", "meta-train", "z.zarr", "--optimizer"], "p", ["perparam"]),
        (["score", "p", "x", "--device"], "c", ["cpu", "cuda"]),
        (["zoo"], "cnn-d", ["cnn-digits", "cnn-digits-foreign", "cnn-digits-lopt", "cnn-digits-smallcnnzoo"]),
    ],
)
def test_shell_completion_lists_values(args: list[str], incomplete: str, expected: list[str]) -> None:
    """Through the shell's own protocol (what `unfzoo --install-completion` wires up)."""
    words = ["unfzoo", *args, incomplete]
    env = {"_UNFZOO_COMPLETE": "complete_bash", "COMP_WORDS": " ".join(words), "COMP_CWORD": str(len(words) - 1)}
    result = runner.invoke(app, [], prog_name="unfzoo", env=env)
    assert result.exit_code == 0, result.output
    assert result.output.split() == expected


def test_bad_device_fails_before_any_data_loads(tmp_path: Path) -> None:
    """The zoo does not exist: a device error proves the device was checked first."""
    for args in (["train", str(tmp_path / "no.zarr")], ["zoo", str(tmp_path / "no.toml")],
                 ["score", str(tmp_path), str(tmp_path), "--out", str(tmp_path / "s.csv")]):
        result = runner.invoke(app, [*args, "--device", "tpu"])
        assert result.exit_code == 2, result.output
        assert "error:" in result.output and "not a torch device" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "s.csv").exists()


def test_tables_are_never_cut_in_a_file() -> None:
    from rich.console import Console
    from rich.table import Table

    from pipeline.commands._common import print_table

    table = Table(title="wide")
    for name in ("optimizer", "Δloss@100 vs adam", "Δloss@400 vs adam", "meta-train"):
        table.add_column(name)
    long = "perparam (step 900: alpha 0.63, gamma0 0.67, beta 0.021)"
    table.add_row(long, "+0.011 [-0.004, +0.026]", "+0.085 [+0.005, +0.164]", "8.8 min, step 900")
    buffer = io.StringIO()
    print_table(table, Console(file=buffer, width=80))
    out = buffer.getvalue()
    assert long in out and "+0.085 [+0.005, +0.164]" in out and "…" not in out


def test_progress_lines_when_not_a_terminal() -> None:
    from rich.console import Console

    from pipeline.progress import ProgressReporter

    buffer = io.StringIO()
    with ProgressReporter("scoring", 100, unit="inputs", console=Console(file=buffer), every=30) as bar:
        for _ in range(10):
            bar.advance(10, failed=0)
    lines = buffer.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == [
        "scoring: 30/100 inputs (30%)", "scoring: 60/100 inputs (60%)", "scoring: 90/100 inputs (90%)",
        "scoring: 100/100 inputs (100%)"]
    assert "failed 0" in lines[0] and "eta" in lines[0] and "eta" not in lines[-1]


def test_zoo_prints_a_line_per_chunk(tmp_path: Path) -> None:
    recipe = tmp_path / "tiny.toml"
    recipe.write_text('name = "tiny"\nmembers = 8\nmembers_per_chunk = 4\nseed = 0\nepochs = 1\n'
                      'checkpoint_epochs = [0, 1]\n[task]\nname = "digits"\n[arch]\nname = "mlp"\nhidden = [4]\n'
                      '[hparams]\noptimizer = "adam"\nactivation = "relu"\nbatch_size = 256\nlr = 1e-2\n')
    result = runner.invoke(app, ["zoo", str(recipe), "--out", str(tmp_path / "z.zarr"), "--workers", "0",
                                 "--device", "cpu"], env=WIDE)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("training: ")]
    assert [line.split(" (")[0] for line in lines] == ["training: 4/8 members", "training: 8/8 members"]
    assert "━" not in result.output  # no bar frames in a file


def test_inspect_json(predict_zoo) -> None:
    result = runner.invoke(app, ["inspect", predict_zoo.url, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["members"] == 64 and doc["status_counts"]["done"] + doc["status_counts"]["diverged"] == 64
    assert doc["checkpoint_epochs"] == [0, 1, 4] and doc["arch"]["name"] == "mlp"
    final = [m for m in doc["metrics"] if m["metric"] == "test_acc" and m["epoch"] == 4]
    assert len(final) == 1 and final[0]["min"] <= final[0]["median"] <= final[0]["max"]
    # the spec's labels with their sizes: what --keep-fixed takes and what UNF permutes
    spec = predict_zoo.spec
    assert doc["labels"]["fixed"] == {label: spec.sizes[label] for label in spec.fixed_labels}
    assert list(doc["labels"]["permutable"]) == spec.permutable_labels and doc["labels"]["fixed"]
    table = runner.invoke(app, ["inspect", predict_zoo.url], env=WIDE)
    assert table.exit_code == 0 and "fixed labels" in table.output
    assert all(f"{label} ({size})" in table.output for label, size in doc["labels"]["fixed"].items())


def test_score_json_and_progress_lines(trained_predictors, predict_zoo, tmp_path: Path) -> None:
    out = tmp_path / "scores.csv"
    result = runner.invoke(app, ["score", str(trained_predictors.out_dir / "statnn"), predict_zoo.url, "--out", str(out),
                                 "--checkpoint", "4", "--json", "--device", "cpu"])
    assert result.exit_code in (0, 1), result.output
    start = result.stdout.index("{")
    doc = json.loads(result.stdout[start:])
    rows = list(csv.DictReader(out.open()))
    assert doc["inputs"] == len(rows) == 64 and doc["scored"] == sum(r["status"] == "ok" for r in rows)
    assert doc["prediction"]["min"] <= doc["prediction"]["median"] <= doc["prediction"]["max"]
    assert len(doc["highest"]) == 5 and doc["highest"][0]["prediction"] == doc["prediction"]["max"]
    assert "scoring: 64/64 inputs (100%)" in result.stderr


def test_lopt_eval_json_and_results_csv(predict_zoo, tmp_path: Path) -> None:
    common = ["--outer-steps", "1", "--horizon", "2", "--truncation", "2", "--pairs", "1", "--max-members", "2",
              "--validate-every", "0", "--device", "cpu"]
    made = runner.invoke(app, ["lopt", "meta-train", predict_zoo.url, "--optimizer", "sgdm", "--out",
                               str(tmp_path / "sgdm"), *common])
    assert made.exit_code == 0, made.output
    result = runner.invoke(app, ["lopt", "eval", str(tmp_path), "--zoo", predict_zoo.url, "--members", "2",
                                 "--val-members", "2", "--multiple", "2", "--adam-lrs", "1e-3,1e-1", "--device", "cpu",
                                 "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["eval_at"] == [2, 4] and "sgdm" in doc["rows"]
    rows = list(csv.DictReader((tmp_path / "eval" / "results.csv").open()))
    # one line per (optimizer, evaluation step)
    assert [(r["optimizer"], int(r["step"])) for r in rows][:2] == [("sgdm", 2), ("sgdm", 4)]
    assert len(rows) == 2 * len(doc["rows"])
    sgdm = rows[0]
    assert float(sgdm["train_loss"]) == pytest.approx(doc["rows"]["sgdm"]["train_loss"]["2"], rel=1e-6)
    assert float(sgdm["vs_adam_lo"]) <= float(sgdm["vs_adam"]) <= float(sgdm["vs_adam_hi"])


def test_python_takes_epochs_where_the_cli_does(predict_zoo) -> None:
    """Zoo.weights / Zoo.module accept epoch= (as --checkpoint does) besides a checkpoint index."""
    import torch

    from pipeline.errors import StoreError

    by_index = predict_zoo.weights([3, 5], 1)
    by_epoch = predict_zoo.weights([3, 5], epoch=1)
    assert all(torch.equal(by_index[k], by_epoch[k]) for k in by_index)
    final = predict_zoo.weights([3], epoch="final")
    assert all(torch.equal(final[k], predict_zoo.weights([3])[k]) for k in final)
    module = predict_zoo.module(3, epoch=4)
    assert torch.equal(next(module.parameters()).detach(), predict_zoo.weights([3], 2)[next(iter(final))][0])
    with pytest.raises(StoreError, match=r"epoch 2; it stores epochs \[0, 1, 4\]"):
        predict_zoo.weights([3], epoch=2)


def test_missing_extra_names_it(monkeypatch, tmp_path: Path) -> None:
    """Without pyarrow, --out *.parquet stops before reading anything and names the extra to install."""
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow` raise ImportError
    from pipeline.errors import MissingExtraError
    from pipeline.extras import require

    with pytest.raises(MissingExtraError, match=r"unfzoo\[parquet\]"):
        require("pyarrow", extra="parquet", feature="parquet output")
    result = runner.invoke(app, ["score", str(tmp_path), str(tmp_path), "--out", str(tmp_path / "s.parquet")])
    assert result.exit_code == 2 and "pip install 'unfzoo[parquet]'" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "s.parquet").exists()


def test_train_json_is_one_document_on_stdout(predict_zoo, tmp_path: Path) -> None:
    """`train --json`: stdout is exactly one JSON document (statistics per model and split, paired tau differences);
    the header and the per-epoch progress lines go to stderr."""
    result = runner.invoke(app, ["train", predict_zoo.url, "--model", "statnn,deepsets", "--epochs", "2",
                                 "--bootstrap", "50", "--device", "cpu", "--out", str(tmp_path / "t"), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["target"] == "test_acc" and doc["models"] == ["statnn", "deepsets"]
    test = {s["model"]: s for s in doc["statistics"] if s["split"] == "test"}
    assert set(test) == {"statnn", "deepsets"} and all(-1 <= s["tau"] <= 1 for s in test.values())
    assert any({p["a"], p["b"]} == {"statnn", "deepsets"} for p in doc["pairs"])
    assert "deepsets seed 0 epoch 1/2" in result.stderr and "rows train/val/test" in result.stderr
