"""`lopt` beyond MLPs: meta-train and evaluate on tiny CNN and GRU seq2seq zoos (the UNF head over their specs)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from pipeline.cli import app

runner = CliRunner()

RECIPES = {
    "cnn": """
name = "lopt-cnn-tiny"
description = "test zoo: tiny CNNs on digits"
members = 10
members_per_chunk = 10
seed = 1
epochs = 1
checkpoint_epochs = [0, 1]
[task]
name = "digits"
[arch]
name = "cnn"
channels = [4, 4]
kernel_size = 3
stride = 2
padding = 1
[hparams]
optimizer = "sgd"
activation = "relu"
batch_size = 64
lr = 0.05
init_std = {log_uniform = [0.1, 0.3]}
""",
    "gru": """
name = "lopt-gru-tiny"
description = "test zoo: tiny GRU seq2seq on 1-digit addition"
members = 10
members_per_chunk = 10
seed = 1
epochs = 1
checkpoint_epochs = [0, 1]
[task]
name = "arith"
max_digits = 1
n_train = 60
n_test = 20
[arch]
name = "gru_seq2seq"
embed_dim = 4
hidden_size = 6
[hparams]
optimizer = "adam"
batch_size = 32
lr = 0.01
init_std = {log_uniform = [0.05, 0.3]}
""",
}


@pytest.mark.parametrize("arch", ["cnn", "gru"])
def test_meta_train_and_eval_on_other_zoos(tmp_path, arch: str) -> None:
    from pipeline.zoo import build_zoo

    (tmp_path / "r.toml").write_text(RECIPES[arch])
    build_zoo(tmp_path / "r.toml", tmp_path / "zoo.zarr", workers=0, device="cpu")
    zoo = str(tmp_path / "zoo.zarr")
    common = ["--outer-steps", "2", "--horizon", "2", "--truncation", "1", "--pairs", "1", "--max-members", "2",
              "--hidden", "4", "--layers", "1", "--val-members", "1", "--validate-every", "2", "--device", "cpu"]
    for opt in ("unf", "sgdm"):
        result = runner.invoke(app, ["lopt", "meta-train", zoo, "--optimizer", opt, "--out", str(tmp_path / "runs" / opt), *common])
        assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["lopt", "eval", str(tmp_path / "runs"), "--zoo", zoo, "--members", "2", "--val-members", "1",
                                 "--multiple", "2", "--adam-lrs", "1e-2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "runs" / "eval" / "results.json").read_text())
    assert set(report["rows"]) == {"unf", "sgdm", "adam (lr 0.01)"} and report["eval_at"] == [2, 4]
    for row in report["rows"].values():
        assert all(v > 0 for v in row["train_loss"].values()) and row["diverged"] < 1
