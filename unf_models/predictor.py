"""`UNFPredictor`: UNF layers + pointwise nonlinearity + invariant pooling + MLP head (invariant to the symmetry)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from unf_models.activation import ReLU
from unf_models.errors import SpecError
from unf_models.layers import FixedAxes, UNFLinear, UNFPool
from unf_models.spec import WeightSpec

__all__ = ["UNFPredictor"]


class UNFPredictor(nn.Module):
    """Maps weights ``{name: (B, *shape)}`` (or ``(B, in_channels, *shape)``) to ``(B, out_features)``.

    ``hidden`` are the UNF layers' channels, ``head`` the MLP's hidden sizes; outputs are raw (logits): apply a
    sigmoid etc. in the loss. Invariant to ``spec``'s permutations and width-agnostic along permutable axes.
    """

    def __init__(self, spec: WeightSpec, hidden: Sequence[int] = (16, 16), head: Sequence[int] = (512,),
                 out_features: int = 1, in_channels: int = 1, fixed_axes: FixedAxes = "exact",
                 pos_embed: bool = False, pool: Literal["maximal", "mean"] = "maximal",
                 activation: type[nn.Module] = ReLU) -> None:
        super().__init__()
        if not hidden:
            raise SpecError("UNFPredictor needs at least one UNF layer: hidden=(16, ...)")
        self.spec, self.in_channels = spec, in_channels
        widths = [in_channels, *hidden]
        self.layers = nn.ModuleList(
            UNFLinear(spec, c_in, c_out, fixed_axes=fixed_axes, pos_embed=pos_embed and i == 0)
            for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])))
        self.act = activation()
        self.pool = UNFPool(spec, widths[-1], fixed_axes=fixed_axes, mode=pool)
        sizes = [self.pool.num_features, *head]
        mlp: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            mlp += [nn.Linear(a, b), activation()]
        mlp.append(nn.Linear(sizes[-1], out_features))
        self.head = nn.Sequential(*mlp)

    @property
    def num_terms(self) -> int:
        return sum(layer.num_terms for layer in self.layers)

    def forward(self, x: Mapping[str, Tensor]) -> Tensor:
        return self.forward_prepared(self.prepare(x))

    def prepare(self, x: Mapping[str, Tensor]) -> list[Tensor]:
        """The inputs in the first layer's working layout, batch on dim 1 (parameter-free: a fixed training set is
        prepared once, its batches taken with ``select``, and ``forward_prepared`` skips the per-call layout copies)."""
        layout = self.layers[0]._layout
        channel_dim = self.in_channels > 1
        sizes = layout.sizes(x, batch_dims=2 if channel_dim else 1)
        # pieces (B, C*fold, *perm_dims), copies channel-major: the layout `enter` makes
        h = layout.to_internal(x, sizes, channel_dim=channel_dim, channels_last=False)
        return self.layers[0].enter(h)

    @staticmethod
    def select(prepared: Sequence[Tensor], index: Tensor) -> list[Tensor]:
        """The members ``index`` of prepared inputs."""
        return [t.index_select(1, index) for t in prepared]

    def forward_prepared(self, h: list[Tensor]) -> Tensor:
        """``forward`` on ``prepare``-d inputs -> ``(B, out_features)``."""
        # in place on the layers' fresh outputs; not while torch.compile traces (the module's own compiled form)
        act_ = torch.relu_ if type(self.act) in (nn.ReLU, ReLU) and not torch.compiler.is_compiling() else None
        # pieces pass between layers (and into the pool) channel-major where both sides compute so: no transposes
        nxt = [layer.channel_major for layer in self.layers[1:]] + [True]
        h = self.layers[0].forward_entered(h, self.act, act_, channel_major=nxt[0])
        cm = nxt[0] and self.layers[0]._folded is None
        for layer, want in zip(self.layers[1:], nxt[1:]):
            run = layer.forward_entered if cm else layer.forward_internal
            h = run(h, self.act, act_, channel_major=want)
            cm = want and layer._folded is None
        return self.head(self.pool.forward_internal(h, channel_major=cm))  # (B, out_features)
