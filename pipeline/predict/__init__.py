"""Weight-space predictors (`unfzoo train`): UNF (and the UNF+statistics hybrid) and the STATNN / Deep Sets / flat
baselines, trained on one or several zoos with splits by run, configuration or held-out hyperparameter group,
selected on validation Kendall tau, evaluated on test and foreign eval zoos with bootstrap statistics
(`pipeline.predict.stats`), saved as reusable artifacts.

    from pipeline.predict import TrainConfig, train_predictor, load_predictor
    result = train_predictor("datasets/zoos/cnn-digits.zarr", TrainConfig(models=("unf", "statnn")), "runs/cnn")
    predictor = load_predictor("runs/cnn/unf")
    scores = predictor.predict_zoo(zoo, members)   # (N,) predicted test accuracy, each member at its own width
"""

from pipeline.predict.artifacts import EnsemblePredictor, Predictor, load_predictor, save_ensemble, save_predictor
from pipeline.predict.config import MODEL_KINDS, MODEL_NAMES, TrainConfig
from pipeline.predict.data import PredictData, available_targets, build_data
from pipeline.predict.features import statnn_features
from pipeline.predict.stats import paired_tau_difference, split_statistics, tau_interval
from pipeline.predict.train import RunResult, TrainResult, kendall_tau, train_predictor

__all__ = [
    "MODEL_KINDS",
    "MODEL_NAMES",
    "TrainConfig",
    "PredictData",
    "available_targets",
    "build_data",
    "statnn_features",
    "split_statistics",
    "tau_interval",
    "paired_tau_difference",
    "Predictor",
    "EnsemblePredictor",
    "load_predictor",
    "save_predictor",
    "save_ensemble",
    "RunResult",
    "TrainResult",
    "kendall_tau",
    "train_predictor",
]
