"""Saved predictors: `predictor.json` (kind, target, spec, normalization, zoo identity, hyperparameters) next to
`model.safetensors` (the state). Loading never unpickles anything."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
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

__all__ = ["FORMAT", "Predictor", "save_predictor", "load_predictor", "resolve_predictor_dir"]

FORMAT = "unfzoo.predictor/1"
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


def load_predictor(directory: str | os.PathLike[str], device: str | torch.device = "auto") -> Predictor:
    """Load a predictor saved by `save_predictor` / `unfzoo train` (safetensors + JSON; nothing unpickled)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file as load_numpy
    from safetensors.torch import load_file as load_torch

    from pipeline.device import resolve_device
    from unf_models import WeightSpec

    folder = resolve_predictor_dir(directory)
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PredictorError(f"{folder / CONFIG_FILE} is not readable JSON: {err}") from err
    if config.get("format") != FORMAT:
        raise PredictorError(f"{folder / CONFIG_FILE} has format {config.get('format')!r}, expected {FORMAT!r}")
    config.pop("format")
    state_path = folder / STATE_FILE
    if not state_path.is_file():
        raise PredictorError(f"{state_path} is missing; the predictor folder is incomplete (retrain it)")
    dev = resolve_device(device if isinstance(device, str) else str(device))
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
