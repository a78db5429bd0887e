"""Weight-space predictors (`unfzoo train`): UNF and the STATNN / Deep Sets / flat baselines, trained on a zoo with
splits by run or configuration, selected on validation Kendall tau, saved as reusable artifacts.

    from pipeline.predict import TrainConfig, train_predictor, load_predictor
    result = train_predictor("datasets/zoos/cnn-digits.zarr", TrainConfig(models=("unf", "statnn")), "runs/cnn")
    predictor = load_predictor("runs/cnn/unf")
    scores = predictor.predict(zoo.weights(members, -1))   # (N,) predicted test accuracy
"""

from pipeline.predict.artifacts import Predictor, load_predictor, save_predictor
from pipeline.predict.config import MODEL_KINDS, MODEL_NAMES, TrainConfig
from pipeline.predict.data import PredictData, available_targets, build_data
from pipeline.predict.features import statnn_features
from pipeline.predict.train import RunResult, TrainResult, kendall_tau, train_predictor

__all__ = [
    "MODEL_KINDS",
    "MODEL_NAMES",
    "TrainConfig",
    "PredictData",
    "available_targets",
    "build_data",
    "statnn_features",
    "Predictor",
    "load_predictor",
    "save_predictor",
    "RunResult",
    "TrainResult",
    "kendall_tau",
    "train_predictor",
]
