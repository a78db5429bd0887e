"""STATNN features (Unterthiner et al. 2020): per tensor mean, variance and the 0/25/50/75/100 percentiles.

Width-agnostic and permutation invariant by construction: each feature is a statistic of one tensor's entries.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = ["STAT_NAMES", "statnn_features", "statnn_feature_names"]

STAT_NAMES = ("mean", "var", "q0", "q25", "q50", "q75", "q100")
_QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)


def statnn_features(weights: Mapping[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    """{name: (N, *shape)} -> (N, 7 * len(names)) float64 features, tensors in `names` order."""
    columns = []
    for name in names:
        flat = weights[name].detach().reshape(weights[name].shape[0], -1).double()  # (N, n)
        q = torch.quantile(flat, torch.tensor(_QUANTILES, dtype=flat.dtype, device=flat.device), dim=1).T  # (N, 5)
        var = flat.var(dim=1, unbiased=False) if flat.shape[1] > 1 else torch.zeros_like(flat[:, 0])
        columns.append(torch.cat([flat.mean(dim=1, keepdim=True), var[:, None], q], dim=1))  # (N, 7)
    return torch.cat(columns, dim=1)


def statnn_feature_names(names: Sequence[str]) -> list[str]:
    """Column names matching `statnn_features`: '<tensor>:<stat>'."""
    return [f"{name}:{stat}" for name in names for stat in STAT_NAMES]
