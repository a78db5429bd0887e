"""`unfzoo import checkpoints --module FILE.py:factory`: the user's own architecture, end to end, and its bad input."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import unf_models as um
from pipeline.cli import app
from pipeline.zoo.store import Zoo

runner = CliRunner()

MODEL = textwrap.dedent('''
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.conv = nn.Conv2d(1, width, 3, padding=1)
            self.bn = nn.BatchNorm2d(width)
            self.fc = nn.Linear(width, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


    def make(width=4):
        return Net(width)


    def not_a_module():
        return 42
''')


def _zoo_folder(tmp_path: Path, width: int = 4, members: int = 4) -> tuple[Path, Path, Path]:
    model_file = tmp_path / "mynet.py"
    model_file.write_text(MODEL)
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    namespace: dict = {}
    exec(compile(MODEL, str(model_file), "exec"), namespace)  # the same class, to write matching checkpoints
    rows = []
    for k in range(members):
        torch.manual_seed(k)
        net = namespace["make"](width)
        net.bn.running_mean.normal_()
        torch.save(net.state_dict(), ckpts / f"m{k}.pt")
        rows.append({"file": f"m{k}.pt", "hp.lr": 0.1 * (k + 1), "test_acc": 0.2 * k})
    pd.DataFrame(rows).to_csv(tmp_path / "metrics.csv", index=False)
    return model_file, ckpts, tmp_path / "metrics.csv"


def _import(tmp_path: Path, *extra: str) -> tuple[object, Path]:
    model_file, ckpts, metrics = _zoo_folder(tmp_path)
    out = tmp_path / "zoo.zarr"
    args = ["import", "checkpoints", str(ckpts), "--metrics", str(metrics), "--out", str(out), *extra]
    return runner.invoke(app, [a.replace("MODEL", str(model_file)) for a in args]), out


def test_module_import_records_factory_and_spec_and_rebuilds_members(tmp_path: Path) -> None:
    result, out = _import(tmp_path, "--module", "MODEL:make", "--module-kwargs", '{"width": 4}')
    assert result.exit_code == 0, result.output
    zoo = Zoo.open(str(out))
    record = zoo.attrs["module"]
    assert record["factory"] == f"{(tmp_path / 'mynet.py').resolve()}:make" and record["kwargs"] == {"width": 4}
    assert zoo.arch is None and len(record["sha256"]) == 64
    spec = zoo.spec
    assert "bn.running_mean" in spec and "bn.num_batches_tracked" not in spec
    assert not spec.is_fixed(spec.axes("conv.weight")[0])
    member = zoo.module(2)
    saved = torch.load(tmp_path / "ckpts" / "m2.pt", weights_only=True)
    for k, v in member.state_dict().items():
        assert torch.equal(v.float(), saved[k].float()), k
    spec.verify(member, torch.randn(2, 1, 6, 6))


@pytest.mark.parametrize("extra, fragment", [
    (["--module", "MODEL:missing"], "has no callable 'missing'"),
    (["--module", "nowhere.py:make"], "nowhere.py does not exist"),
    (["--module", "no_such_package_xyz.mod:make"], "cannot import no_such_package_xyz.mod"),
    (["--module", "MODEL:not_a_module"], "returned int, not a torch.nn.Module"),
    (["--module", "MODEL"], "use FILE.py:factory"),
    (["--module", "MODEL:make", "--module-kwargs", "{width: 4}"], "is not JSON"),
    (["--module", "MODEL:make", "--module-kwargs", "[4]"], "must be a JSON object"),
    (["--module", "MODEL:make", "--module-kwargs", '{"depth": 2}'], "calling it failed: TypeError"),
    (["--module", "MODEL:make", "--module-kwargs", '{"width": 5}'], "m0.pt: tensor 'conv.weight' has shape"),
    ([], "exactly one of --arch (built-in) or --module"),
])
def test_bad_module_input_is_one_line_and_writes_nothing(tmp_path: Path, extra: list[str], fragment: str) -> None:
    result, out = _import(tmp_path, *extra)
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert fragment in message and "Traceback" not in result.output
    assert not out.exists()


def test_checkpoint_with_other_keys_names_the_file_and_first_key(tmp_path: Path) -> None:
    model_file, ckpts, metrics = _zoo_folder(tmp_path)
    state = torch.load(ckpts / "m1.pt", weights_only=True)
    state["extra.weight"] = state.pop("fc.weight")
    torch.save(state, ckpts / "m1.pt")
    out = tmp_path / "zoo.zarr"
    result = runner.invoke(app, ["import", "checkpoints", str(ckpts), "--metrics", str(metrics), "--out", str(out),
                                 "--module", f"{model_file}:make"])
    message = " ".join(result.output.split())
    assert result.exit_code == 2 and "m1.pt: keys do not match" in message and "fc.weight" in message
    assert "extra.weight" in message and "--module" in message and not out.exists()
