"""Learned optimizers (UNF, per-parameter, meta-tuned SGDM) meta-trained with ES and evaluated on zoo members."""

from pipeline.lopt.es import ESConfig, antithetic_gradient, es_gradient, es_step, sanitize_losses
from pipeline.lopt.features import build_features, time_features
from pipeline.lopt.inner import InnerProblem, problems_from_zoo
from pipeline.lopt.meta_train import MetaTrainConfig, MetaTrainResult, load_optimizer, meta_train
from pipeline.lopt.optimizers import Adam, LearnedOptimizer, LOptConfig, ResidualLOpt, flatten_meta, unflatten_meta

__all__ = [
    "Adam",
    "ESConfig",
    "InnerProblem",
    "LOptConfig",
    "LearnedOptimizer",
    "MetaTrainConfig",
    "MetaTrainResult",
    "ResidualLOpt",
    "antithetic_gradient",
    "build_features",
    "es_gradient",
    "es_step",
    "flatten_meta",
    "load_optimizer",
    "meta_train",
    "problems_from_zoo",
    "sanitize_losses",
    "time_features",
    "unflatten_meta",
]
