"""WeightSpec: validation, packed-tensor views, permutations, checks against state dicts (f), JSON, resizing."""

from __future__ import annotations

import json

import pytest
import torch

import unf_models as um

GRU_LIKE = um.WeightSpec(
    {"w_ih": ("gate", "h", "in"), "w_hh": ("gate", "h", "h"), "b": ("gate", "h"), "out": ("cls", "h")},
    shapes={"w_ih": (12, 3), "w_hh": (12, 4), "b": (12,), "out": (2, 4)},
    views={"w_ih": (3, 4, 3), "w_hh": (3, 4, 4), "b": (3, 4)},
    fixed=("gate", "in", "cls"),
)


def test_accessors() -> None:
    assert GRU_LIKE.names == ["w_ih", "w_hh", "b", "out"]
    assert GRU_LIKE.shapes["w_hh"] == (12, 4)
    assert GRU_LIKE.axes("w_hh") == ("gate", "h", "h")
    assert GRU_LIKE.permutable_labels == ["h"] and set(GRU_LIKE.fixed_labels) == {"gate", "in", "cls"}
    assert GRU_LIKE.sizes == {"gate": 3, "h": 4, "in": 3, "cls": 2}
    assert GRU_LIKE.symbolic_shape("w_hh") == "(3*h, h)"
    assert GRU_LIKE.num_params() == 12 * 3 + 12 * 4 + 12 + 8
    with pytest.raises(AttributeError):
        GRU_LIKE.fixed = ()  # type: ignore[misc]


@pytest.mark.parametrize("axes, kwargs, fragment", [
    ({"w": ("h", "h")}, {"shapes": {"w": (3, 4)}}, "label 'h' has size 3 in tensor 'w' but 4"),
    ({"w": ("h", "in")}, {"shapes": {"w": (3, 4)}, "fixed": ("out",)}, "fixed labels ['out']"),
    ({"w": ("gate", "h", "h")}, {"shapes": {"w": (12, 4)}}, "cannot tell its view shape"),
    ({"w": ("a", "b")}, {"shapes": {"w": (6,)}, "views": {"w": (4, 2)}}, "has 8 entries"),
    ({"w": ("a", "b")}, {"shapes": {"w": (2, 3)}, "views": {"w": (3, 2)}}, "does not reshape"),
    ({"w": [("a", "b"), ("a", "c")]}, {"shapes": {"w": (5, 2)}, "views": {"w": [(2, 2), (2, 2)]}}, "add up to 4"),
    ({"w": "ab"}, {"sizes": {"a": 1}}, "axes must be a tuple"),
])
def test_malformed_specs_name_the_tensor(axes, kwargs, fragment) -> None:
    with pytest.raises(um.SpecError, match=None) as info:
        um.WeightSpec(axes, **kwargs)
    assert fragment in str(info.value)


def test_packed_view_permutation_matches_manual_reshape() -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {n: torch.randn(*s, generator=g, dtype=torch.float64) for n, s in GRU_LIKE.shapes.items()}
    perm = GRU_LIKE.random_permutation(g)
    p = perm["h"]
    moved = GRU_LIKE.permute(tensors, perm)
    expect = tensors["w_hh"].view(3, 4, 4)[:, p][:, :, p].reshape(12, 4)
    assert torch.equal(moved["w_hh"], expect)
    assert torch.equal(moved["out"], tensors["out"][:, p])
    assert torch.equal(moved["w_ih"], tensors["w_ih"].view(3, 4, 3)[:, p].reshape(12, 3))
    # batch dims in front are carried along
    batched = {n: t.expand(2, *t.shape) for n, t in tensors.items()}
    assert torch.equal(GRU_LIKE.permute(batched, perm)["w_hh"][1], expect)


def test_split_parts_attention_layout() -> None:
    """An in_proj-like (3d, d) tensor split into Q, K, V parts with separate head_dim labels."""
    spec = um.WeightSpec({"qkv": [("H", "dqk", "d"), ("H", "dqk", "d"), ("H", "dv", "d")]},
                         views={"qkv": [(2, 3, 6)] * 3})
    assert spec.shapes["qkv"] == (18, 6)
    x = {"qkv": torch.arange(108.0).reshape(18, 6)}
    out = spec.permute(x, {"dv": torch.tensor([2, 0, 1])})["qkv"]
    assert torch.equal(out[:12], x["qkv"][:12])  # Q and K untouched
    assert torch.equal(out[12:15], x["qkv"][[14, 12, 13]])


def test_check_reports_missing_extra_and_wrong_shapes() -> None:
    """(f) A state dict that does not match: the error names the key and the expected vs found shape."""
    good = {n: torch.zeros(s) for n, s in GRU_LIKE.shapes.items()}
    assert GRU_LIKE.check(good)["h"] == 4
    with pytest.raises(um.SpecMismatchError, match=r"missing tensor\(s\) \['b'\]"):
        GRU_LIKE.check({k: v for k, v in good.items() if k != "b"})
    with pytest.raises(um.SpecMismatchError, match=r"unexpected tensor\(s\) \['extra'\]"):
        GRU_LIKE.check({**good, "extra": torch.zeros(1)})
    with pytest.raises(um.SpecMismatchError) as info:
        GRU_LIKE.check({**good, "w_ih": torch.zeros(12, 5)})  # input features are fixed: 3 only
    assert "'w_ih'" in str(info.value) and "(3*h, 3)" in str(info.value) and "(12, 5)" in str(info.value)
    with pytest.raises(um.SpecMismatchError, match="'w_hh'"):
        GRU_LIKE.check({**good, "w_hh": torch.zeros(12, 4, 1)})
    assert isinstance(um.SpecMismatchError("x"), ValueError)


def test_other_widths_only_along_permutable_axes() -> None:
    wide = {n: torch.zeros(s) for n, s in GRU_LIKE.resize({"h": 7}).shapes.items()}
    assert wide["w_hh"].shape == (21, 7)
    assert GRU_LIKE.check(wide)["h"] == 7
    with pytest.raises(um.SpecMismatchError):
        GRU_LIKE.check(wide, allow_other_widths=False)
    inconsistent = {**wide, "out": torch.zeros(2, 5)}
    with pytest.raises(um.SpecMismatchError, match="'out'"):
        GRU_LIKE.check(inconsistent)
    batched = {n: torch.zeros(3, *t.shape) for n, t in wide.items()}
    assert GRU_LIKE.check(batched, batch_dims=1)["h"] == 7
    assert GRU_LIKE.with_shapes({n: t.shape for n, t in wide.items()}) == GRU_LIKE.resize({"h": 7})
    with pytest.raises(um.SpecError, match="fixed"):
        GRU_LIKE.resize({"gate": 4})


def test_json_round_trip() -> None:
    d = json.loads(json.dumps(GRU_LIKE.to_dict()))
    back = um.WeightSpec.from_dict(d)
    assert back == GRU_LIKE and back.shapes == GRU_LIKE.shapes and back.axes("w_hh") == ("gate", "h", "h")
    with pytest.raises(um.SpecError, match="malformed"):
        um.WeightSpec.from_dict({"tensors": [{"name": "w"}]})


def test_random_permutation_is_seeded_and_covers_permutable_labels() -> None:
    a = GRU_LIKE.random_permutation(torch.Generator().manual_seed(3))
    b = GRU_LIKE.random_permutation(torch.Generator().manual_seed(3))
    assert set(a) == {"h"} and torch.equal(a["h"], b["h"]) and sorted(a["h"].tolist()) == [0, 1, 2, 3]
    with pytest.raises(um.SpecError, match="shape"):
        GRU_LIKE.permute({n: torch.zeros(s) for n, s in GRU_LIKE.shapes.items()}, {"h": torch.arange(5)})


def test_spec_survives_pickle_for_dask_workers() -> None:
    import pickle

    spec = um.WeightSpec({"w": ("h", "x"), "b": ("h",)}, shapes={"w": (4, 3), "b": (4,)}, fixed=("x",))
    restored = pickle.loads(pickle.dumps(spec))
    assert restored == spec
    assert restored.to_dict() == spec.to_dict()


CONCAT = um.WeightSpec(
    {"a": ("c1", "in"), "b": ("c2", "in"), "w": [("out", "c1", "k"), ("out", "c2", "k")]},
    sizes={"c1": 2, "c2": 3, "in": 2, "out": 4, "k": 2}, shapes={"w": (4, 5, 2)}, splits={"w": 1},
    fixed=("in", "out", "k"),
)


def test_split_along_another_dim_permutes_each_block_by_its_label() -> None:
    """A tensor split along dim 1 (a conv reading a concatenation): c1 moves columns 0-1, c2 columns 2-4."""
    w = torch.arange(40.0).reshape(4, 5, 2)
    tensors = {"a": torch.randn(2, 2), "b": torch.randn(3, 2), "w": w}
    p1, p2 = torch.tensor([1, 0]), torch.tensor([2, 0, 1])
    moved = CONCAT.permute(tensors, {"c1": p1, "c2": p2})["w"]
    assert torch.equal(moved[:, :2], w[:, p1]) and torch.equal(moved[:, 2:], w[:, 2 + p2])
    parts = CONCAT.split_parts("w", w, CONCAT.sizes, 0)
    assert [tuple(p.shape) for p in parts] == [(4, 2, 2), (4, 3, 2)]
    assert torch.equal(CONCAT.join_parts("w", parts, (4, 5, 2), 0), w)


def test_split_spec_other_widths_and_json() -> None:
    assert CONCAT.symbolic_shape("w") == "(4, c1 + c2, 2)"
    assert CONCAT.infer_sizes({"a": (2, 2), "b": (6, 2), "w": (4, 8, 2)})["c2"] == 6
    assert CONCAT.resize({"c1": 3})["w"].shape == (4, 6, 2)
    d = CONCAT.to_dict()
    assert d["version"] == 2 and d["tensors"][2]["split"] == 1
    assert um.WeightSpec.from_dict(json.loads(json.dumps(d))) == CONCAT
    assert GRU_LIKE.to_dict()["version"] == 1 and "split" not in GRU_LIKE.to_dict()["tensors"][0]
    with pytest.raises(um.SpecError, match="give shapes"):
        um.WeightSpec({"w": [("o", "a"), ("o", "b")]}, sizes={"o": 2, "a": 1, "b": 2}, splits={"w": 1})
