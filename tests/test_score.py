"""Scoring checkpoints (`pipeline.score`, `pipeline.checkpoints`): safe loading, per-file verdicts, wrappers and
prefixes, equality with zoo scores, width transfer, Dask paths."""

from __future__ import annotations

import os
import pickle
import shlex
import signal
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from pipeline.checkpoints import SpecMatcher, load_checkpoint, match_state_dict
from pipeline.errors import CheckpointError, ConfigError
from pipeline.score import OUTPUT_COLUMNS, discover_inputs, score_checkpoints


def _member_state(zoo, member: int, checkpoint: int = -1) -> dict[str, torch.Tensor]:
    """The state dict of the rebuilt nn.Module (what a training script would save)."""
    return zoo.module(member, checkpoint).state_dict()


def _stack(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([s[k] for s in states]) for k in states[0]}


class _RunsShell:
    """A pickle payload: unpickling it runs `touch marker` (what a hostile checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def test_code_in_a_pickle_never_runs_and_the_file_is_refused(tmp_path: Path, score_zoo, score_predictors) -> None:
    state = _member_state(score_zoo, 1)
    # control: the same kind of file, unpickled unsafely, does run its code, so the check below can fail
    torch.save({**state, "x": _RunsShell(tmp_path / "control")}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert (tmp_path / "control").exists()

    marker = tmp_path / "pwned"
    torch.save({**state, "x": _RunsShell(marker)}, tmp_path / "evil.pt")  # zip format
    with open(tmp_path / "evil_legacy.pth", "wb") as fh:  # plain pickle stream
        pickle.dump({"w": _RunsShell(marker)}, fh, protocol=2)
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # a whole pickled module: refused too
    torch.save(state, tmp_path / "good.pt")

    frame = score_checkpoints(score_predictors["unf"], [tmp_path / "evil.pt", tmp_path / "evil_legacy.pth",
                                                         tmp_path / "module.pt", tmp_path / "good.pt"])
    assert not marker.exists()
    assert frame["status"].tolist() == ["error", "error", "error", "ok"]
    for error in frame["error"][:3]:
        assert "refused to unpickle" in error and "weights_only=False" not in error
    assert "posix.system" in frame["error"][0] or "os.system" in frame["error"][0]
    assert "torch.nn.modules.linear.Linear" in frame["error"][2]


def test_truncated_and_wrong_architecture_files_fail_alone(tmp_path: Path, score_zoo, score_predictors) -> None:
    unf = score_predictors["unf"]
    states = [_member_state(score_zoo, m) for m in (1, 2, 3)]
    for i, state in enumerate(states):
        torch.save(state, tmp_path / f"good{i}.pt")
    data = (tmp_path / "good0.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save(torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 10)).state_dict(), tmp_path / "mlp.pt")
    kernel5 = {**states[0], "convs.0.weight": torch.zeros(16, 1, 5, 5)}
    torch.save(kernel5, tmp_path / "kernel5.pt")
    extra = {**states[0], "head2.weight": torch.zeros(10, 10)}
    torch.save(extra, tmp_path / "extra_layer.pt")
    save_file({k: v.contiguous() for k, v in states[0].items()}, tmp_path / "cut.safetensors")
    cut = (tmp_path / "cut.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(cut[: len(cut) - 100])

    frame = score_checkpoints(unf, [tmp_path])
    assert list(frame.columns) == list(OUTPUT_COLUMNS) and len(frame) == 9
    by_name = {Path(row.path).name: row for row in frame.itertuples()}
    assert {n for n, r in by_name.items() if r.status == "ok"} == {"good0.pt", "good1.pt", "good2.pt"}
    assert "truncated PyTorch zip archive" in by_name["truncated.pt"].error
    assert "empty" in by_name["empty.pt"].error
    assert "cannot read the safetensors file" in by_name["cut.safetensors"].error
    assert "missing key(s) convs.0.weight" in by_name["mlp.pt"].error and "has 4 tensors" in by_name["mlp.pt"].error
    assert "'convs.0.weight'" in by_name["kernel5.pt"].error and "(16, 1, 5, 5)" in by_name["kernel5.pt"].error
    assert "(16, 1, 3, 3)" in by_name["kernel5.pt"].error  # expected shape at the spec's widths
    assert "unexpected tensor(s) head2.weight" in by_name["extra_layer.pt"].error
    expected = unf.predict(_stack(states))
    got = [by_name[f"good{i}.pt"].prediction for i in range(3)]
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_wrappers_and_prefixes_are_unwrapped_and_reported(tmp_path: Path, score_zoo, score_predictors) -> None:
    state = _member_state(score_zoo, 4)
    torch.save(state, tmp_path / "a_bare.pt")
    torch.save({  # a Lightning checkpoint
        "epoch": 3, "global_step": 120, "state_dict": {f"model.{k}": v for k, v in state.items()},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1}]}], "hyper_parameters": {"lr": 0.1},
    }, tmp_path / "b_lightning.ckpt")
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "step": 7}, tmp_path / "c_ddp.pth")
    torch.save({**{f"_orig_mod.{k}": v for k, v in state.items()}, "ema.n_averaged": torch.tensor(3)},
               tmp_path / "d_compiled.bin")
    save_file({f"net.{k}": v.contiguous() for k, v in state.items()}, tmp_path / "e_net.safetensors")

    frame = score_checkpoints(score_predictors["unf"], [tmp_path])
    assert frame["status"].tolist() == ["ok"] * 5, frame["error"].tolist()
    assert frame["wrapper"].tolist() == ["", "state_dict", "model", "", ""]
    assert frame["stripped_prefix"].tolist() == ["", "model.", "module.", "_orig_mod.", "net."]
    assert frame["format"].tolist() == ["torch"] * 4 + ["safetensors"]
    assert frame["ignored_keys"].tolist() == [0, 0, 0, 1, 0]
    assert frame["widths"].tolist() == [""] * 5
    expected = score_predictors["unf"].predict(_stack([state]))[0]
    np.testing.assert_allclose(frame["prediction"], expected, rtol=1e-6)


def test_scores_from_files_equal_scores_from_the_zoo(tmp_path: Path, score_zoo, score_predictors) -> None:
    unf = score_predictors["unf"]
    members = np.arange(1, 40)
    for m in (3, 11, 27):
        torch.save(_member_state(score_zoo, m), tmp_path / f"m{m:02d}.pt")
    zoo_path = score_zoo.url
    frame = score_checkpoints(unf, [zoo_path, tmp_path], batch_size=16)
    zoo_rows, file_rows = frame[frame["format"] == "zoo"], frame[frame["format"] != "zoo"]
    assert zoo_rows["member"].tolist() == list(range(40)) and (zoo_rows["checkpoint"] == 5).all()
    assert zoo_rows["status"].tolist() == ["error"] + ["ok"] * 39  # member 0 diverged: NaN weights
    assert "non-finite" in zoo_rows["error"].iloc[0]
    direct = unf.predict(score_zoo.weights(members, -1))
    np.testing.assert_allclose(zoo_rows["prediction"].iloc[1:], direct, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(file_rows["prediction"], direct[[2, 10, 26]], rtol=1e-5, atol=1e-7)

    first = score_checkpoints(unf, [zoo_path], checkpoint=0)
    assert (first["checkpoint"] == 0).all() and (first["status"] == "ok").all()
    np.testing.assert_allclose(first["prediction"], unf.predict(score_zoo.weights(np.arange(40), 0)), rtol=1e-5)
    with pytest.raises(ConfigError, match=r"stores epochs \[0, 5\]"):
        score_checkpoints(unf, [zoo_path], checkpoint=3)


def test_width_32_cnn_is_scored_by_a_predictor_trained_on_width_16(tmp_path: Path, score_zoo, score_predictors) -> None:
    from pipeline.zoo.members import build_member

    torch.manual_seed(0)
    state = build_member({**score_zoo.arch, "channels": [32, 32, 32]}).state_dict()  # the zoo's CNN, twice as wide
    assert state["convs.1.weight"].shape == (32, 32, 3, 3)
    torch.save(state, tmp_path / "wide.pt")
    torch.save(_member_state(score_zoo, 5), tmp_path / "narrow.pt")

    unf = score_predictors["unf"]
    frame = score_checkpoints(unf, [tmp_path / "wide.pt", tmp_path / "narrow.pt"])
    assert frame["status"].tolist() == ["ok", "ok"]
    assert frame["widths"].tolist() == ["convs.0=32,convs.1=32,convs.2=32", ""]
    np.testing.assert_allclose(frame["prediction"].iloc[0], unf.predict(_stack([state]))[0], rtol=1e-6)

    flat = score_predictors["flat"]  # not width-agnostic: the same file is an error row naming key and shapes
    refused = score_checkpoints(flat, [tmp_path / "wide.pt", tmp_path / "narrow.pt"])
    assert refused["status"].tolist() == ["error", "ok"]
    assert "'convs.0.weight'" in refused["error"].iloc[0] and "(32, 1, 3, 3)" in refused["error"].iloc[0]
    assert "not width-agnostic" in refused["error"].iloc[0]


def test_matching_reports_the_key_and_shapes(tmp_path: Path, score_zoo) -> None:
    spec = score_zoo.spec
    state = {name: torch.zeros(shape) for name, shape in spec.shapes.items()}
    fixed_axis_changed = {**state, "head.weight": torch.zeros(12, 16)}  # 12 classes: a fixed axis
    with pytest.raises(CheckpointError, match=r"'head.weight'.*\(12, 16\)"):
        match_state_dict(fixed_axis_changed, spec, allow_other_widths=True)
    state["convs.0.bias"][0] = float("nan")
    with pytest.raises(CheckpointError, match="non-finite"):
        match_state_dict(state, spec, allow_other_widths=True)
    state["convs.0.bias"][0] = 0.0
    torch.save({"state_dict": {f"model.{k}": v.half() for k, v in state.items()}}, tmp_path / "half.pt")
    loaded = load_checkpoint(tmp_path / "half.pt")
    assert loaded.wrapper == "state_dict" and loaded.format == "torch"
    matched = match_state_dict(loaded.state, spec, allow_other_widths=False)  # float16 weights become float32
    assert matched.stripped_prefix == "model." and all(t.dtype == torch.float32 for t in matched.tensors.values())
    # a matcher travels to Dask workers as the spec's JSON dict and matches the same way there
    clone = pickle.loads(pickle.dumps(SpecMatcher(spec, True)))
    assert clone.spec == spec and clone.allow_other_widths


def test_inputs_resolve_dirs_globs_zoos_and_duplicates(tmp_path: Path, score_zoo) -> None:
    (tmp_path / "runs" / "a" / "deep").mkdir(parents=True)
    for rel in ("runs/a/x.pt", "runs/a/deep/y.safetensors", "runs/b.ckpt", "runs/notes.txt", "weights.custom"):
        (tmp_path / rel).write_bytes(b"")
    found = discover_inputs([tmp_path / "runs", str(tmp_path / "runs" / "**" / "*.pt"), tmp_path / "weights.custom",
                             score_zoo.url, tmp_path / "nope.pt", str(tmp_path / "none*.pt")])
    names = [p.relative_to(tmp_path).as_posix() for p in found.files]
    assert names == ["runs/b.ckpt", "runs/a/x.pt", "runs/a/deep/y.safetensors", "weights.custom"]
    assert found.zoos == [Path(score_zoo.url)]
    assert [why for _, why in found.missing] == ["no such file or directory", "the pattern matches no checkpoint file"]


def test_batches_stay_within_batch_size_and_errors_keep_their_rows(tmp_path: Path, score_zoo, score_predictors) -> None:
    unf = score_predictors["unf"]
    sizes: list[int] = []

    class Counting:
        spec, width_agnostic = unf.spec, unf.width_agnostic

        def predict(self, weights):
            sizes.append(len(weights["head.bias"]))
            return unf.predict(weights)

    for m in range(1, 12):
        torch.save(_member_state(score_zoo, m), tmp_path / f"m{m:02d}.pt")
    (tmp_path / "m99.pt").write_bytes(b"not a checkpoint")
    frame = score_checkpoints(Counting(), [tmp_path], batch_size=4)
    assert max(sizes) <= 4 and sum(sizes) == 11
    assert frame["status"].tolist() == ["ok"] * 11 + ["error"]
    np.testing.assert_allclose(frame["prediction"][:11], unf.predict(score_zoo.weights(np.arange(1, 12), -1)),
                               rtol=1e-5, atol=1e-7)


def test_dask_scheduler_paths_match_in_process(tmp_path: Path, score_zoo, score_predictors) -> None:
    from distributed import Client, LocalCluster

    for m in range(1, 7):
        torch.save(_member_state(score_zoo, m), tmp_path / f"m{m}.pt")
    (tmp_path / "bad.pt").write_bytes(b"\x80\x02garbage")
    unf = score_predictors["unf"]
    local = score_checkpoints(unf, [tmp_path], workers=0)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        via_client = score_checkpoints(unf, [tmp_path], scheduler=client)
        via_address = score_checkpoints(unf, [tmp_path], scheduler=cluster.scheduler_address)
    pd.testing.assert_frame_equal(via_client, local)
    pd.testing.assert_frame_equal(via_address, local)
    assert local["status"].tolist() == ["error"] + ["ok"] * 6


def test_no_inputs_is_a_usage_error(tmp_path: Path, score_predictors) -> None:
    with pytest.raises(ConfigError, match="no checkpoints found"):
        score_checkpoints(score_predictors["unf"], [tmp_path])
    with pytest.raises(ConfigError, match="no such file"):
        score_checkpoints(score_predictors["unf"], [tmp_path / "missing.pt"])
    with pytest.raises(ConfigError, match="--batch-size"):
        score_checkpoints(score_predictors["unf"], [tmp_path], batch_size=0)


@contextmanager
def _deadline(seconds: int):
    """Fail instead of hanging (e.g. on opening a named pipe nobody writes to): SIGALRM interrupts the blocked open."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _odd_tensor_files(folder: Path, state: dict[str, torch.Tensor]) -> dict[str, str]:
    """Files whose convs.0.weight cannot be scored, by name -> the error they must get."""
    w = state["convs.0.weight"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantize_per_tensor is deprecated; such files still exist
        odd = {
            "sparse.pt": (w.to_sparse(), "is a sparse_coo tensor"),
            "meta.pt": (torch.empty(w.shape, device="meta"), "is on the meta device"),
            "quantized.pt": (torch.quantize_per_tensor(w, 0.01, 0, torch.qint8), "is quantized (torch.qint8)"),
            "complex.pt": (w.to(torch.complex64), "has dtype torch.complex64"),
            "integer.pt": (w.to(torch.int64), "has dtype torch.int64"),
        }
        for name, (tensor, _) in odd.items():
            torch.save({**state, "convs.0.weight": tensor}, folder / name)
    return {name: why for name, (_, why) in odd.items()}


def test_pipes_odd_tensors_and_non_utf8_names_fail_alone(tmp_path: Path, score_zoo, score_predictors) -> None:
    """A named pipe is not opened (it would block forever), every tensor is converted inside the file's own guard
    (sparse, meta, quantized, complex, integer: error rows), any file name reaches the table, the rest are scored."""
    state = _member_state(score_zoo, 1)
    torch.save(state, tmp_path / "good.pt")
    torch.save(state, tmp_path / os.fsdecode(b"caf\xe9.pt"))  # a Latin-1 name: not valid UTF-8
    os.mkfifo(tmp_path / "pipe.pt")
    os.symlink(tmp_path / "gone.pt", tmp_path / "dangling.pt")
    expected = {**_odd_tensor_files(tmp_path, state), "pipe.pt": "is a named pipe, not a regular file",
                "dangling.pt": "No such file"}
    with _deadline(60):
        frame = score_checkpoints(score_predictors["unf"], [tmp_path], workers=0)
    by_name = {Path(p).name: row for p, row in zip(frame["path"], frame.to_dict("records"))}
    assert set(by_name) == {"good.pt", "caf\\xe9.pt", *expected}
    for name in ("good.pt", "caf\\xe9.pt"):
        assert by_name[name]["status"] == "ok" and np.isfinite(by_name[name]["prediction"]), by_name[name]
    assert by_name["good.pt"]["prediction"] == by_name["caf\\xe9.pt"]["prediction"]
    for name, why in expected.items():
        row = by_name[name]
        assert row["status"] == "error" and why in row["error"] and name in row["error"], row
        assert np.isnan(row["prediction"])
    for text in frame["path"].tolist() + frame["error"].tolist():
        text.encode("utf-8")  # strict: every cell is valid UTF-8, so CSV/Parquet writers and terminals take it
