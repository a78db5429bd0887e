"""Importers on small fixtures written by the tests in the exact release formats; CLI messages and exit codes."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.zoo.store import DONE, Zoo

runner = CliRunner()

# PyTorch shapes of a miniature Small-CNN-Zoo network: two 3x3 convs (4 channels) and a dense layer to 10 classes.
TORCH_SHAPES = [("conv2d", (4, 1, 3, 3), (4,)), ("conv2d_1", (4, 4, 3, 3), (4,)), ("dense", (10, 4), (10,))]
STEPS = [0, 1, 86]


def _write_small_cnn_zoo(folder: Path) -> dict[tuple[str, int], list[np.ndarray]]:
    """Three runs x three steps in the release format; returns the PyTorch-layout tensors per (run, step)."""
    rng = np.random.default_rng(0)
    layout, start = [], 0
    for layer, w_shape, b_shape in TORCH_SHAPES:  # flat order: bias before kernel (alphabetical TF names)
        tf_shape = (w_shape[2], w_shape[3], w_shape[1], w_shape[0]) if len(w_shape) == 4 else (w_shape[1], w_shape[0])
        for kind, shape in (("bias", b_shape), ("kernel", tf_shape)):
            size = int(np.prod(shape))
            layout.append({"varname": f"sequential/{layer}/{kind}:0", "start_idx": start, "end_idx": start + size,
                           "size": size, "shape": str(tuple(shape))})
            start += size
    pd.DataFrame(layout).to_csv(folder / "layout.csv", index=False)

    truth, rows, records = {}, [], []
    runs = {"run-a": STEPS, "run-b": STEPS, "run-c": [0, 86]}  # run-c lacks step 1
    for r, (run, steps) in enumerate(runs.items()):
        for step in steps:
            tensors, flat = [], []
            for layer, w_shape, b_shape in TORCH_SHAPES:
                w = rng.standard_normal(w_shape).astype(np.float32)
                b = rng.standard_normal(b_shape).astype(np.float32)
                if run == "run-b" and step == 86 and layer == "dense":
                    w[0, 0] = np.nan  # a non-finite run
                tensors += [w, b]
                kernel = w.transpose(2, 3, 1, 0) if w.ndim == 4 else w.T  # OIHW -> HWIO, (out, in) -> (in, out)
                flat += [b.ravel(), kernel.ravel()]
            truth[(run, step)] = tensors
            rows.append(np.concatenate(flat))
            records.append({"modeldir": f"/zoo/{run}", "step": step, "test_accuracy": 0.1 * r + step / 1000,
                            "test_loss": 2.0 - r, "train_accuracy": 0.5, "train_loss": 1.0,
                            "config.learning_rate": [5e-4, 5e-3, 5e-2][r], "config.l2reg": 1e-6,
                            "config.optimizer": ["adam", "sgd", "adam"][r], "config.activation": "relu",
                            "config.random_seed": 10 + r})
    order = rng.permutation(len(rows))  # rows of the release are not grouped by run
    np.save(folder / "weights.npy", np.stack(rows)[order])
    frame = pd.DataFrame(records).iloc[order].reset_index(drop=True)
    with gzip.open(folder / "metrics.csv.gz", "wt") as f:
        frame.to_csv(f)  # with the unnamed index column, as pandas writes it by default
    return truth


def test_small_cnn_zoo_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "cifar10"
    src.mkdir()
    truth = _write_small_cnn_zoo(src)
    out = str(tmp_path / "imported.zarr")
    result = runner.invoke(app, ["import", "small-cnn-zoo", str(src), "--out", out])
    assert result.exit_code == 0, result.output
    zoo = Zoo.open(out)
    assert zoo.n_members == 3 and zoo.checkpoint_epochs == tuple(STEPS)
    assert [zoo.weight_shapes[k] for k in zoo.weight_keys] == [s for _, w, b in TORCH_SHAPES for s in (w, b)]
    for member, run in enumerate(["run-a", "run-b", "run-c"]):
        for c, step in enumerate(STEPS):
            got = zoo.weights([member], c)
            for key, expected in zip(zoo.weight_keys, truth.get((run, step), [None] * 6)):
                if expected is None:
                    assert torch.isnan(got[key]).all()  # missing step
                else:
                    np.testing.assert_array_equal(got[key][0].numpy(), expected)
    frame = zoo.members
    assert list(frame["status"]) == ["done", "diverged", "diverged"]
    assert frame.loc[1, "diverged_epoch"] == 86
    assert list(frame["lr"]) == [5e-4, 5e-3, 5e-2] and list(frame["optimizer"]) == ["adam", "sgd", "adam"]
    assert list(frame["seed"]) == [10, 11, 12]
    np.testing.assert_allclose(zoo.metric("test_acc")[0], [0.0, 0.001, 0.086], rtol=1e-6)
    assert {"test_acc", "test_loss", "train_acc", "train_loss"} <= set(zoo.metric_names)

    again = runner.invoke(app, ["import", "small-cnn-zoo", str(src), "--out", out])
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_small_cnn_zoo_errors_name_the_file(tmp_path: Path) -> None:
    src = tmp_path / "broken"
    src.mkdir()
    _write_small_cnn_zoo(src)
    (src / "layout.csv").write_text("varname,start_idx,end_idx,size,shape\nsequential/conv2d/bias:0,0,5,4,\"(4,)\"\n")
    result = runner.invoke(app, ["import", "small-cnn-zoo", str(src), "--out", str(tmp_path / "o.zarr")])
    assert result.exit_code == 2 and "layout.csv" in result.output and "conv2d/bias" in result.output
    (src / "layout.csv").unlink()
    result = runner.invoke(app, ["import", "small-cnn-zoo", str(src), "--out", str(tmp_path / "o.zarr")])
    assert result.exit_code == 2 and "layout.csv is missing" in result.output
    assert not (tmp_path / "o.zarr").exists()


def _mlp_states(n_members: int, epochs: list[int]) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    from pipeline.zoo.members import build_member, resolve_arch
    from pipeline.zoo.tasks import load_task

    arch = resolve_arch({"name": "mlp", "hidden": [8], "activation": "tanh"}, load_task("digits"))
    states = {}
    for m in range(n_members):
        for e in epochs:
            torch.manual_seed(10 * m + e)
            states[(m, e)] = {k: v.clone() for k, v in build_member(arch).state_dict().items()}
    return states


def test_checkpoint_folder_round_trip(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    src = tmp_path / "ckpts"
    src.mkdir()
    states = _mlp_states(3, [0, 5])
    rows = []
    for (m, e), state in states.items():
        name = f"net{m}_e{e}.safetensors" if m == 2 else f"net{m}_e{e}.pt"
        if m == 2:
            save_file(state, str(src / name))
        else:
            torch.save({"state_dict": state}, src / name)  # a common wrapper around the state dict
        rows.append({"file": name, "member": f"net{m}", "epoch": e, "test_acc": 0.1 * m + e / 100,
                     "hp.lr": [1e-3, 1e-2, 1e-1][m], "hp.optimizer": ["sgd", "adam", "sgd"][m]})
    pd.DataFrame(rows).to_csv(tmp_path / "metrics.csv", index=False)
    out = str(tmp_path / "ckpt.zarr")
    arch = '{"name": "mlp", "hidden": [8], "activation": "tanh"}'
    args = ["import", "checkpoints", str(src), "--arch", arch, "--metrics", str(tmp_path / "metrics.csv"), "--out", out]
    result = runner.invoke(app, [*args, "--task", "digits"])
    assert result.exit_code == 0, result.output
    zoo = Zoo.open(out)
    assert zoo.n_members == 3 and zoo.checkpoint_epochs == (0, 5) and zoo.spec is not None
    for m in range(3):
        for c, e in enumerate((0, 5)):
            got = zoo.weights([m], c)
            for k, v in states[(m, e)].items():
                np.testing.assert_array_equal(got[k][0].numpy(), v.numpy())
    assert list(zoo.members["optimizer"]) == ["sgd", "adam", "sgd"] and list(zoo.members["lr"]) == [1e-3, 1e-2, 1e-1]
    np.testing.assert_allclose(zoo.metric("test_acc")[1], [0.1, 0.15], rtol=1e-6)
    assert (zoo.status == DONE).all()
    module = zoo.module(1, -1)
    x = torch.randn(4, 1, 8, 8)
    reference = zoo.module(1, -1)
    reference.load_state_dict(states[(1, 5)])
    torch.testing.assert_close(module(x), reference(x))


def test_checkpoint_errors_name_file_and_tensor(tmp_path: Path) -> None:
    src = tmp_path / "ckpts"
    src.mkdir()
    state = _mlp_states(1, [0])[(0, 0)]
    state["head.weight"] = torch.zeros(3, 3)
    torch.save(state, src / "a.pt")
    pd.DataFrame([{"file": "a.pt", "test_acc": 0.5}]).to_csv(tmp_path / "m.csv", index=False)
    arch = '{"name": "mlp", "hidden": [8], "activation": "tanh"}'
    args = ["import", "checkpoints", str(src), "--arch", arch, "--metrics", str(tmp_path / "m.csv"), "--task", "digits"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "o.zarr")])
    assert result.exit_code == 2 and "a.pt" in result.output and "'head.weight'" in result.output
    torch.save({"model": torch.nn.Linear(2, 2)}, src / "a.pt")  # a pickled module: refused, never unpickled
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "o.zarr")])
    assert result.exit_code == 2 and "a.pt: refused to unpickle" in result.output
    assert not (tmp_path / "o.zarr").exists()


def _one_member_folder(tmp_path: Path) -> tuple[Path, list[str]]:
    """A folder with one valid checkpoint (a.pt) and the CLI arguments up to --metrics."""
    src = tmp_path / "ckpts"
    src.mkdir()
    torch.save(_mlp_states(1, [0])[(0, 0)], src / "a.pt")
    arch = '{"name": "mlp", "hidden": [8], "activation": "tanh"}'
    return src, ["import", "checkpoints", str(src), "--arch", arch, "--task", "digits"]


@pytest.mark.parametrize(
    ("csv", "expected"),
    [
        ("file,epoch,test_acc\na.pt,0,0.5\na.pt,x,0.6\n", "line 3: epoch 'x' is not a non-negative integer"),
        ("file,epoch,test_acc\na.pt,0,0.5\na.pt,,0.6\n", "line 3: epoch '' is not a non-negative integer"),
        ("file,epoch,test_acc\na.pt,1.5,0.5\n", "line 2: epoch '1.5' is not a non-negative integer"),
        ("file,epoch,test_acc\na.pt,-1,0.5\n", "line 2: epoch '-1' is not a non-negative integer"),
        ("file,test_acc\na.pt,0.5\n,0.6\n", "line 3: the 'file' cell is empty"),
        ("file,test_acc\n../outside.pt,0.5\n", "line 2: file '../outside.pt' lies outside the checkpoint folder"),
        ("file,test_acc\n{abs},0.5\n", "lies outside the checkpoint folder"),
        ("file,test_acc\nlink.pt,0.5\n", "line 2: file 'link.pt' lies outside the checkpoint folder"),
        ("file,hp.name,test_acc\na.pt,caf\xe9,0.5\n", "not UTF-8 text (it holds byte 0xe9)"),
    ],
)
def test_bad_import_csv_is_one_line_naming_file_and_row(tmp_path: Path, csv: str, expected: str) -> None:
    """Non-integer/empty epochs, empty file cells, files outside the folder and non-UTF-8 CSVs: exit 2, one line
    naming the CSV and the row, nothing written, and nothing outside the folder read."""
    src, args = _one_member_folder(tmp_path)
    outside = tmp_path / "outside.pt"
    outside.write_bytes((src / "a.pt").read_bytes())  # a valid checkpoint: only the path check can refuse it
    (src / "link.pt").symlink_to(outside)
    metrics = tmp_path / "m.csv"
    metrics.write_bytes(csv.replace("{abs}", str(outside)).encode("latin-1"))
    out = tmp_path / "o.zarr"
    result = runner.invoke(app, [*args, "--metrics", str(metrics), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert expected in result.output and str(metrics) in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) <= 3  # one message (rich may wrap a long path)
    assert not out.exists()


def test_epochs_written_as_floats_are_accepted(tmp_path: Path) -> None:
    src, args = _one_member_folder(tmp_path)
    (tmp_path / "m.csv").write_text("file,epoch,test_acc\na.pt,3.0,0.5\n")
    result = runner.invoke(app, [*args, "--metrics", str(tmp_path / "m.csv"), "--out", str(tmp_path / "o.zarr")])
    assert result.exit_code == 0, result.output
    assert Zoo.open(str(tmp_path / "o.zarr")).checkpoint_epochs == (3,)
