"""Small architectures for the unf_models tests: each is (name, constructor, example inputs) in float64."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Dropout(0.1), nn.Linear(5, 4), nn.Tanh(),
                                 nn.Linear(4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    """Small-CNN-Zoo shape: conv, BatchNorm, conv, global average pooling, linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 5, 3, padding=1)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.c1(x)))
        x = F.relu(self.c2(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class CNNFlatten(nn.Module):
    """Flatten of a spatial map: the head's input axis is (channel, fixed position)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.c1(x)))
        return self.fc(x.view(x.size(0), -1))


class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(1, 3, 5, padding=2)
        self.bn = nn.BatchNorm1d(3)
        self.c2 = nn.Conv1d(3, 4, 3)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.flat = nn.Flatten()
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flat(self.pool(F.gelu(self.c2(self.bn(self.c1(x)))))))


class Residual(nn.Module):
    """Residual additions tie every block's output to the stream."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 5)
        self.b1 = nn.Linear(5, 5)
        self.b2 = nn.Linear(5, 5)
        self.ln = nn.LayerNorm(5)
        self.out = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = h + torch.relu(self.b1(h))
        h = h + torch.relu(self.b2(h))
        return self.out(self.ln(h))


class GRUSeq2Seq(nn.Module):
    """Tiny RNN Zoo shape: shared embedding, GRU encoder whose state starts the GRU decoder, output projection."""

    def __init__(self, vocab: int = 7, emb: int = 4, hidden: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.enc = nn.GRU(emb, hidden, batch_first=True)
        self.dec = nn.GRU(emb, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        _, h = self.enc(self.emb(src))
        out, _ = self.dec(self.emb(tgt), h)
        return self.head(out)


class VmapGRU(nn.GRU):
    """A subclass with its own forward (as the zoo engine writes): must be a leaf with nn.GRU's rule."""

    def forward(self, x: torch.Tensor, hx: torch.Tensor | None = None):  # type: ignore[override]
        out, h = super().forward(x, hx)
        return out, h


class LSTMNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(3, 5, num_layers=2, batch_first=True)
        self.cell = VmapGRU(5, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        out, _ = self.cell(out)
        return self.head(out[:, -1])


class ElmanRNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, h = self.rnn(x)
        return self.head(h[0])


class Transformer(nn.Module):
    """Embedding + learned positions + TransformerEncoder + LayerNorm + head: one residual label throughout."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(9, 8)
        self.pos = nn.Parameter(torch.randn(1, 5, 8) * 0.1)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.enc(self.emb(x) + self.pos)
        return self.head(self.norm(h).mean(1))


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        a, _ = self.attn(h, h, h)
        return self.head((h + a).mean(1))


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


Example = tuple[str, Callable[[], nn.Module], Callable[[], tuple[torch.Tensor, ...]]]

ARCHS: list[Example] = [
    ("mlp", MLP, lambda: (torch.randn(4, 6, generator=_g(1), dtype=torch.float64),)),
    ("cnn", CNN, lambda: (torch.randn(4, 2, 8, 8, generator=_g(1), dtype=torch.float64),)),
    ("cnn_flatten", CNNFlatten, lambda: (torch.randn(4, 2, 8, 8, generator=_g(1), dtype=torch.float64),)),
    ("conv1d", Conv1dNet, lambda: (torch.randn(4, 1, 16, generator=_g(1), dtype=torch.float64),)),
    ("residual", Residual, lambda: (torch.randn(4, 6, generator=_g(1), dtype=torch.float64),)),
    ("gru_seq2seq", GRUSeq2Seq, lambda: (torch.randint(0, 7, (4, 5), generator=_g(1)),
                                         torch.randint(0, 7, (4, 3), generator=_g(2)))),
    ("lstm_gru", LSTMNet, lambda: (torch.randn(4, 5, 3, generator=_g(1), dtype=torch.float64),)),
    ("rnn", ElmanRNN, lambda: (torch.randn(5, 4, 3, generator=_g(1), dtype=torch.float64),)),
    ("transformer", Transformer, lambda: (torch.randint(0, 9, (4, 5), generator=_g(1)),)),
    ("attention", Attention, lambda: (torch.randn(4, 5, 3, generator=_g(1), dtype=torch.float64),)),
]


# The zoo's member architectures (pipeline.zoo.members.build_member), tiny resolved arch dicts and example inputs.
ZOO_ARCHS = [
    ("cnn", {"name": "cnn", "activation": "relu", "channels": [4, 5], "kernel_size": 3, "stride": 2, "padding": 1,
             "in_channels": 2, "num_classes": 3},
     lambda: (torch.randn(4, 2, 8, 8, generator=_g(1), dtype=torch.float64),)),
    ("mlp", {"name": "mlp", "activation": "tanh", "hidden": [5, 4], "in_features": 6, "num_classes": 3},
     lambda: (torch.randn(4, 6, generator=_g(1), dtype=torch.float64),)),
    ("gru_seq2seq", {"name": "gru_seq2seq", "activation": "tanh", "embed_dim": 4, "hidden_size": 6,
                     "vocab_size": 7, "pad_id": 0, "bos_id": 1},
     lambda: (torch.randint(0, 7, (4, 5), generator=_g(1)), torch.randint(0, 7, (4, 3), generator=_g(2)))),
    ("transformer", {"name": "transformer", "activation": "gelu", "d_model": 8, "n_heads": 2, "n_layers": 2,
                     "d_ff": 16, "vocab_size": 9, "seq_len": 5, "num_classes": 4},
     lambda: (torch.randint(0, 9, (4, 5), generator=_g(1)),)),
]


class StackedSeq2Seq(nn.Module):
    """Two-layer GRU encoder whose stacked state (and its tanh) starts a two-layer LSTM decoder; last-layer readout."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.enc = nn.GRU(4, 5, 2, batch_first=True)
        self.dec = nn.LSTM(4, 5, 2, batch_first=True)
        self.head = nn.Linear(5, 7)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        _, h = self.enc(self.emb(src))
        out, (hn, _) = self.dec(self.emb(tgt), (h, torch.tanh(h)))
        return self.head(out) + self.head(hn[-1]).unsqueeze(1)


ARCHS.append(("stacked_seq2seq", StackedSeq2Seq, lambda: (torch.randint(0, 7, (3, 4), generator=_g(1)),
                                                          torch.randint(0, 7, (3, 2), generator=_g(2)))))
