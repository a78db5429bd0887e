"""WeightStats: per-tensor statistics from a zoo sample, apply/invert, JSON, and invariance preserved."""

from __future__ import annotations

import json

import pytest
import torch

import unf_models as um
from unf_models.basis import bell, reads, set_partitions, writes


def test_bell_numbers_and_partitions() -> None:
    assert [bell(n) for n in range(8)] == [1, 1, 2, 5, 15, 52, 203, 877]
    assert len(list(set_partitions(range(5)))) == 52
    assert len(reads(("h", "h"))) == len(writes(("h", "h"))) == 6  # {0}{1}: 4 keep-subsets, {01}: 2


def test_stats_estimate_apply_invert_json() -> None:
    g = torch.Generator().manual_seed(0)
    zoo = {"w": torch.randn(50, 4, 3, generator=g, dtype=torch.float64) * 3 + 1,
           "b": torch.randn(50, 4, generator=g, dtype=torch.float64) * 0.1}
    zoo["w"][0, 0, 0] = float("nan")  # a diverged member does not poison the statistics
    stats = um.WeightStats.estimate(zoo)
    assert abs(stats.mean["w"] - 1) < 0.3 and abs(stats.std["w"] - 3) < 0.3 and abs(stats.std["b"] - 0.1) < 0.02
    normed = stats.apply({"w": zoo["w"][1:], "b": zoo["b"][1:]})
    assert abs(float(normed["w"].mean())) < 0.05 and abs(float(normed["w"].std()) - 1) < 0.05
    back = stats.invert(normed)
    assert torch.allclose(back["w"], zoo["w"][1:])
    again = um.WeightStats.from_dict(json.loads(json.dumps(stats.to_dict())))
    assert again == stats
    # the same statistics from an iterable of per-member state dicts
    members = [{"w": zoo["w"][i], "b": zoo["b"][i]} for i in range(50)]
    assert abs(um.WeightStats.estimate(members).mean["w"] - stats.mean["w"]) < 1e-12
    with pytest.raises(um.SpecMismatchError, match="'c'"):
        stats.apply({"c": torch.zeros(1)})
    with pytest.raises(um.SpecError, match="malformed"):
        um.WeightStats.from_dict({"mean": {}})


def test_normalized_predictor_stays_invariant() -> None:
    spec = um.WeightSpec({"w": ("h", "in"), "b": ("h",)}, sizes={"h": 4, "in": 3}, fixed=("in",))
    g = torch.Generator().manual_seed(1)
    w = {n: torch.randn(5, *s, generator=g, dtype=torch.float64) for n, s in spec.shapes.items()}
    stats = um.WeightStats.estimate(w)
    torch.manual_seed(0)
    model = um.UNFPredictor(spec, hidden=(4,), head=(8,)).double()
    perm = spec.random_permutation(g)
    a = model(stats.apply(w))
    b = model(stats.apply(spec.permute(w, perm)))
    assert float((a - b).detach().abs().max()) < 1e-10
