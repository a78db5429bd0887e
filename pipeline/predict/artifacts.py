"""Saved predictors: `predictor.json` (kind, target, spec, normalization, zoo identity, hyperparameters) next to
`model.safetensors` (the state); or a seed ensemble: a `predictor.json` of kind "ensemble" naming member sub-folders
(each a saved predictor) whose predictions it averages. Loading never unpickles anything."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.errors import PredictorError
from pipeline.predict.config import SELECTED_UNF
from pipeline.predict.features import statnn_features
from pipeline.predict.models import WIDTH_AGNOSTIC, TensorNormalizer, build_net
from pipeline.predict.statnn import StatNNModel

__all__ = ["FORMAT", "ENSEMBLE_FORMAT", "Predictor", "EnsemblePredictor", "save_predictor", "save_ensemble",
           "load_predictor", "resolve_predictor_dir", "predict_zoo_members"]

FORMAT = "unfzoo.predictor/1"
# its own format name, so an unfzoo from before ensembles refuses such a folder in one line instead of misreading it
ENSEMBLE_FORMAT = "unfzoo.ensemble/1"
CONFIG_FILE, STATE_FILE = "predictor.json", "model.safetensors"


class Predictor:
    """A trained weight-space predictor: `predict({name: (N, *shape)}) -> (N,)` target values.

    Attributes: `spec` (WeightSpec of the zoo it was trained on), `config` (the JSON dict saved with it), `target`,
    `kind` ("unf" | "statnn" | "deepsets" | "flat"), `width_agnostic`, `device`.
    """

    def __init__(self, spec: Any, config: dict[str, Any], net: nn.Module | None = None,
                 statnn: StatNNModel | None = None, device: torch.device | str = "cpu") -> None:
        if (net is None) == (statnn is None):
            raise ValueError("a Predictor holds either a torch net or a STATNN model")
        self.spec = spec
        self.config = config
        self.net = net
        self.statnn = statnn
        self.device = torch.device(device)
        if self.net is not None:
            self.net.to(self.device).eval()

    @property
    def kind(self) -> str:
        return str(self.config["kind"])

    @property
    def target(self) -> str:
        return str(self.config["target"])

    @property
    def width_agnostic(self) -> bool:
        return WIDTH_AGNOSTIC[self.kind]

    def __repr__(self) -> str:
        return (f"Predictor(kind={self.kind!r}, model={self.config.get('model')!r}, target={self.target!r}, "
                f"device={str(self.device)!r})")

    def to(self, device: torch.device | str) -> Predictor:
        self.device = torch.device(device)
        if self.net is not None:
            self.net.to(self.device)
        return self

    def _outputs_to_target(self, raw: torch.Tensor) -> torch.Tensor:
        out = self.config["output"]
        y = torch.sigmoid(raw) if out["transform"] == "sigmoid" else raw * out["y_std"] + out["y_mean"]
        clip = out.get("clip")
        return y.clamp(clip[0], clip[1]) if clip else y

    @torch.no_grad()
    def predict(self, weights: Mapping[str, torch.Tensor | np.ndarray], batch_size: int | None = None) -> np.ndarray:
        """Predicted target for every member in `weights` ({name: (N, *shape)}); raises SpecMismatchError when the
        keys or shapes do not fit the spec (other widths pass for width-agnostic kinds; flat also reads narrower
        members, zero-padded)."""
        tensors = {k: torch.as_tensor(v) for k, v in weights.items()}
        self.spec.check(tensors, batch_dims=1, allow_other_widths=self.width_agnostic or self.kind == "flat")
        if not self.width_agnostic:  # flat: narrower members are zero-padded (the same network), wider ones refused
            for n in self.spec.names:
                if any(a > b for a, b in zip(tensors[n].shape[1:], self.spec.shapes[n])):
                    from unf_models import SpecMismatchError

                    raise SpecMismatchError(f"tensor '{n}': shape {tuple(tensors[n].shape[1:])} is wider than "
                                            f"{tuple(self.spec.shapes[n])}, which this {self.kind} predictor reads")
        names = list(self.spec.names)
        n = int(tensors[names[0]].shape[0])
        batch_size = batch_size or int(self.config.get("eval_batch_size", 256))
        out = np.empty(n, dtype=np.float64)
        for start in range(0, n, batch_size):
            batch = {k: tensors[k][start:start + batch_size].to(self.device, torch.float32) for k in names}
            if self.statnn is not None:
                out[start:start + batch_size] = self.statnn.predict(statnn_features(batch, names).cpu().numpy())
            else:
                raw = self.net(batch)  # (b,)
                out[start:start + batch_size] = self._outputs_to_target(raw.double()).cpu().numpy()
        return out

    def predict_zoo(self, zoo: Any, members: Any, checkpoint: int = -1, *, epoch: int | str | None = None,
                    batch_size: int | None = None) -> np.ndarray:
        """`predict` on `members` of an opened `Zoo` at a checkpoint index or `epoch`, each member read as
        `unfzoo train` and `unfzoo score` read it (`predict_zoo_members`) -> (len(members),)."""
        return predict_zoo_members(self, zoo, members, checkpoint, epoch=epoch, batch_size=batch_size)


def predict_zoo_members(predictor: Any, zoo: Any, members: Any, checkpoint: int = -1, *,
                        epoch: int | str | None = None, batch_size: int | None = None) -> np.ndarray:
    """`predictor.predict` on `members` of a `Zoo`, in their order. A width-agnostic predictor reads each member at
    its own width (`Zoo.weight_groups`: a zoo with a `width` hyperparameter stores narrower members zero-padded,
    which computes the same function from other weights, so padded inputs would get other predictions than the
    ones `unfzoo train` reported); a fixed-width one (flat) reads them padded, as it was trained."""
    if not predictor.width_agnostic:
        return predictor.predict(zoo.weights(members, checkpoint, epoch=epoch), batch_size)
    groups = zoo.weight_groups(members, checkpoint, epoch=epoch)
    out = np.empty(sum(len(rows) for rows, _ in groups), dtype=np.float64)
    for rows, weights in groups:
        out[rows] = predictor.predict(weights, batch_size)
    return out


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_predictor(predictor: Predictor, directory: str | os.PathLike[str]) -> Path:
    """Write `predictor.json` + `model.safetensors` into `directory` (created); returns the directory."""
    from safetensors.numpy import save_file as save_numpy
    from safetensors.torch import save_file as save_torch

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state_tmp = directory / (STATE_FILE + ".tmp")
    if predictor.net is not None:
        state = {k: v.detach().cpu().contiguous() for k, v in predictor.net.state_dict().items()}
        save_torch(state, str(state_tmp))
    else:
        assert predictor.statnn is not None
        save_numpy({k: np.ascontiguousarray(v) for k, v in predictor.statnn.tensors().items()}, str(state_tmp))
    os.replace(state_tmp, directory / STATE_FILE)
    _atomic_write_text(directory / CONFIG_FILE, json.dumps({"format": FORMAT, **predictor.config}, indent=2))
    return directory


def resolve_predictor_dir(directory: str | os.PathLike[str]) -> Path:
    """The folder holding predictor.json: `directory` itself, or its only model sub-folder (an `unfzoo train --out`
    folder with a single model)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PredictorError(f"predictor directory {directory} does not exist; train one with `unfzoo train ZOO --out "
                             f"{directory}`")
    if (directory / CONFIG_FILE).is_file():
        return directory
    subdirs = sorted(p for p in directory.iterdir() if (p / CONFIG_FILE).is_file())
    if len(subdirs) == 1:
        return subdirs[0]
    if subdirs:
        names = [p.name for p in subdirs]
        hint = directory / (SELECTED_UNF if SELECTED_UNF in names else names[0])
        raise PredictorError(f"{directory} holds several predictors ({', '.join(names)}); pass one of them, e.g. "
                             f"{hint}" + (" (the UNF form chosen on validation)" if hint.name == SELECTED_UNF else ""))
    raise PredictorError(f"{directory} holds no {CONFIG_FILE}; is it the --out folder of `unfzoo train`?")


class EnsemblePredictor:
    """A seed ensemble: `predict` is the mean of its members' predictions (each in target units and already clipped,
    so the mean stays in the target's range). The same interface as `Predictor` for scoring: `spec`, `config` (the
    ensemble's JSON dict), `target`, `kind` (the members' kind), `width_agnostic`, `device`, `to()`, `predict()`;
    `members` holds the member `Predictor`s."""

    def __init__(self, config: dict[str, Any], members: Sequence[Predictor]) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.config = config
        self.members = list(members)
        self.spec = self.members[0].spec
        self.device = self.members[0].device

    @property
    def kind(self) -> str:
        return self.members[0].kind

    @property
    def target(self) -> str:
        return self.members[0].target

    @property
    def width_agnostic(self) -> bool:
        return self.members[0].width_agnostic

    def __repr__(self) -> str:
        return (f"EnsemblePredictor(kind={self.kind!r}, model={self.config.get('model')!r}, target={self.target!r}, "
                f"members={len(self.members)}, device={str(self.device)!r})")

    def to(self, device: torch.device | str) -> EnsemblePredictor:
        self.device = torch.device(device)
        for m in self.members:
            m.to(self.device)
        return self

    def predict(self, weights: Mapping[str, torch.Tensor | np.ndarray], batch_size: int | None = None) -> np.ndarray:
        """The mean over members of `Predictor.predict` (raises as that does when the weights do not fit)."""
        return np.mean([m.predict(weights, batch_size) for m in self.members], axis=0)

    def predict_zoo(self, zoo: Any, members: Any, checkpoint: int = -1, *, epoch: int | str | None = None,
                    batch_size: int | None = None) -> np.ndarray:
        """As `Predictor.predict_zoo`: the mean over members, each member of the zoo at its own width."""
        return predict_zoo_members(self, zoo, members, checkpoint, epoch=epoch, batch_size=batch_size)


def save_ensemble(directory: str | os.PathLike[str], members: Sequence[str],
                  extra: Mapping[str, Any] | None = None) -> Path:
    """Write the `predictor.json` of a seed ensemble into `directory`, naming `members`: sub-folders of `directory`
    (plain names such as "seed0") that already hold saved predictors of one kind, target and spec. `extra` is added
    to the JSON (e.g. validation taus). Any single predictor's `model.safetensors` left in `directory` is removed
    afterwards; returns the directory."""
    directory = Path(directory)
    configs = [_read_config(directory / _member_name(directory, m)) for m in members]
    if not configs:
        raise ValueError("an ensemble needs at least one member")
    first = configs[0]
    for m, c in zip(members, configs):
        if c.get("kind") == "ensemble" or any(c.get(k) != first.get(k) for k in ("kind", "target", "spec")):
            raise PredictorError(f"{directory / m} is not a predictor of the same kind, target and spec as "
                                 f"{directory / members[0]}; an ensemble's members must be seeds of one model")
    shared = {k: first[k] for k in ("model", "target", "loss", "output", "spec", "zoo", "eval_batch_size",
                                     "package_version") if k in first}
    seeds = [c.get("training", {}).get("seed") for c in configs]
    config = {"format": ENSEMBLE_FORMAT, "kind": "ensemble", "member_kind": first["kind"], **shared,
              "members": list(members), "combine": "mean", "seeds": seeds, **(extra or {})}
    _atomic_write_text(directory / CONFIG_FILE, json.dumps(config, indent=2))
    (directory / STATE_FILE).unlink(missing_ok=True)  # a single predictor's state, no longer what this folder holds
    return directory


def _member_name(folder: Path, name: Any) -> str:
    """`name` when it is a plain sub-folder name (the ensemble folder stays self-contained and movable)."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise PredictorError(f"{folder / CONFIG_FILE}: member {name!r} is not a sub-folder name such as 'seed0'")
    return name


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise PredictorError(f"{path} is missing; the predictor folder {folder} is incomplete (copy it whole or "
                             "retrain it)")
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PredictorError(f"{path} is not readable JSON: {err}") from err
    if not isinstance(config, dict):
        raise PredictorError(f"{path} is not a predictor description (a JSON object)")
    return config


def load_predictor(directory: str | os.PathLike[str], device: str | torch.device = "auto"
                   ) -> Predictor | EnsemblePredictor:
    """Load a predictor saved by `save_predictor` / `unfzoo train` (safetensors + JSON; nothing unpickled); a seed
    ensemble folder (`save_ensemble`) loads as an `EnsemblePredictor` of its members."""
    from pipeline.device import resolve_device

    folder = resolve_predictor_dir(directory)
    config = _read_config(folder)
    dev = resolve_device(device if isinstance(device, str) else str(device))
    if config.get("format") == ENSEMBLE_FORMAT:
        if config.get("kind") != "ensemble" or not isinstance(config.get("members"), list) or not config["members"]:
            raise PredictorError(f"{folder / CONFIG_FILE} is an ensemble without a list of members; retrain it")
        config.pop("format")
        paths = [folder / _member_name(folder, name) for name in config["members"]]
        for member in paths:  # every member is checked before any is loaded
            if not member.is_dir():
                raise PredictorError(f"{member} (a member of the seed ensemble {folder}) is missing; copy the "
                                     "ensemble folder whole or retrain it")
        members = [_load_single(member, _read_config(member), dev) for member in paths]
        for name, m in zip(config["members"], members):
            if (m.kind, m.target, m.spec) != (members[0].kind, members[0].target, members[0].spec):
                raise PredictorError(f"{folder / name} is not a predictor of the same kind, target and spec as "
                                     f"{folder / config['members'][0]}; retrain the ensemble")
        return EnsemblePredictor(config, members)
    return _load_single(folder, config, dev)


def _load_single(folder: Path, config: dict[str, Any], dev: torch.device) -> Predictor:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file as load_numpy
    from safetensors.torch import load_file as load_torch

    from unf_models import WeightSpec

    if config.get("format") != FORMAT:
        raise PredictorError(f"{folder / CONFIG_FILE} has format {config.get('format')!r}, expected {FORMAT!r}")
    config.pop("format")
    state_path = folder / STATE_FILE
    if not state_path.is_file():
        raise PredictorError(f"{state_path} is missing; the predictor folder is incomplete (retrain it)")
    spec = WeightSpec.from_dict(config["spec"])
    try:
        if config["kind"] == "statnn":
            arrays = load_numpy(str(state_path))
            model = StatNNModel.from_tensors(config["hyperparameters"]["family"], config["hyperparameters"]["name"],
                                             arrays)
            return Predictor(spec, config, statnn=model, device=dev)
        norm = config["normalization"]
        net = build_net(config["kind"], spec, config["hyperparameters"],
                        TensorNormalizer(norm["names"], norm["mean"], norm["std"]))
        net.load_state_dict(load_torch(str(state_path)))
    except (SafetensorError, KeyError, RuntimeError) as err:
        raise PredictorError(f"{folder} does not hold a loadable {config.get('kind')} predictor: {err}") from err
    return Predictor(spec, config, net=net, device=dev)
