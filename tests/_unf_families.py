"""Architectures in the style of the common vision / sequence families, for WeightSpec.from_module's tests.

Small widths (seconds on a CPU), but the ops the libraries use: BatchNorm residual blocks, concatenation, grouped and
depthwise convolutions, squeeze-excitation, ConvNeXt blocks, a ViT with fused qkv, torch.nn's own Transformer and RNN
modules. Each entry: (name, constructor, example input builder, expected outcome) where the outcome is "derived"
(at least one permutable label, verified real) or "all-fixed" (derived and verified, but nothing may move).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------------------------------------- residual (ResNet)
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision-style ResNet: stem, stages of blocks, global average pool, flatten, fc."""

    def __init__(self, block: str = "basic", layers: tuple[int, ...] = (1, 1), widths: tuple[int, ...] = (4, 6),
                 num_classes: int = 3, groups: int = 1, in_ch: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.maxpool = nn.MaxPool2d(2)
        blocks: list[nn.Module] = []
        cin = widths[0]
        for i, (n, w) in enumerate(zip(layers, widths)):
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                if block == "basic":
                    blocks.append(BasicBlock(cin, w, stride))
                    cin = w
                else:
                    blocks.append(Bottleneck(cin, w, stride, groups))
                    cin = w * Bottleneck.expansion
        self.layers = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layers(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ----------------------------------------------------------------------------------------------- concatenation
class Inception(nn.Module):
    """Four branches concatenated (1x1; 1x1->3x3; 1x1->5x5; pool->1x1), BN-ReLU convs, then a classifier."""

    def __init__(self) -> None:
        super().__init__()

        def conv(cin: int, cout: int, k: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout),
                                 nn.ReLU())

        self.stem = conv(3, 6, 3)
        self.b1 = conv(6, 3, 1)
        self.b2 = nn.Sequential(conv(6, 2, 1), conv(2, 4, 3))
        self.b3 = nn.Sequential(conv(6, 2, 1), conv(2, 3, 5))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv(6, 2, 1))
        self.mix = conv(12, 5, 3)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)
        return self.fc(F.adaptive_avg_pool2d(self.mix(x), 1).flatten(1))


class Fire(nn.Module):
    """SqueezeNet's Fire module: squeeze 1x1, expand 1x1 and 3x3 concatenated."""

    def __init__(self, cin: int, squeeze: int, e1: int, e3: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, e1, 1)
        self.expand3x3 = nn.Conv2d(squeeze, e3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.expand1x1(x)), F.relu(self.expand3x3(x))], 1)


class SqueezeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, 2), nn.ReLU(), Fire(6, 2, 3, 3), Fire(6, 3, 4, 4))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(8, 3, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.classifier(self.features(x)), 1)


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, 2 * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(2 * growth)
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1)
        return self.conv2(F.relu(self.norm2(self.conv1(F.relu(self.norm1(x))))))


class DenseNet(nn.Module):
    """DenseNet-style: each layer reads the concatenation of all earlier features; a transition; classifier."""

    def __init__(self, growth: int = 3, n: int = 3) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.layers = nn.ModuleList(DenseLayer(4 + i * growth, growth) for i in range(n))
        c = 4 + n * growth
        self.trans_norm = nn.BatchNorm2d(c)
        self.trans_conv = nn.Conv2d(c, 5, 1, bias=False)
        self.norm5 = nn.BatchNorm2d(5)
        self.classifier = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [self.conv0(x)]
        for layer in self.layers:
            features.append(layer(features))
        x = self.trans_conv(F.relu(self.trans_norm(torch.cat(features, 1))))
        x = F.avg_pool2d(x, 2)
        x = F.relu(self.norm5(x))
        return self.classifier(F.adaptive_avg_pool2d(x, (1, 1)).flatten(1))


# ----------------------------------------------------------------------------------------------- depthwise / grouped
def stochastic_depth(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """torchvision's row-mode stochastic depth (fx-wrapped there as here): the identity in eval mode."""
    if not training or p == 0.0:
        return x
    keep = torch.empty(x.shape[0], 1, 1, 1, dtype=x.dtype).bernoulli_(1 - p)
    return x * keep / (1 - p)


torch.fx.wrap("stochastic_depth")


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, r: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(c, r, 1)
        self.fc2 = nn.Conv2d(r, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class InvertedResidual(nn.Module):
    """MobileNetV2/V3 / EfficientNet block: expand 1x1, depthwise 3x3, squeeze-excitation, project 1x1, residual."""

    def __init__(self, c: int, expand: int) -> None:
        super().__init__()
        h = c * expand
        self.expand = nn.Sequential(nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h), nn.SiLU())
        self.se = SqueezeExcite(h, 3)
        self.project = nn.Sequential(nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + stochastic_depth(self.project(self.se(self.dw(self.expand(x)))), 0.2, self.training)


class MobileNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU6())
        self.sep = nn.Sequential(nn.Conv2d(4, 8, 3, 1, 1, groups=4, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.Conv2d(8, 5, 1, bias=False), nn.BatchNorm2d(5))  # depthwise x2, pointwise
        self.blocks = nn.Sequential(InvertedResidual(5, 2), InvertedResidual(5, 3))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(5, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.sep(self.stem(x))))


class ResNeXt(nn.Module):
    """Grouped 3x3 convolutions (groups=2) with GroupNorm, residual: ResNeXt / RegNet style."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.gn0 = nn.GroupNorm(2, 8)
        self.conv1 = nn.Conv2d(8, 6, 1)
        self.gn1 = nn.GroupNorm(3, 6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, groups=2)
        self.gn2 = nn.GroupNorm(1, 6)
        self.conv3 = nn.Conv2d(6, 8, 1, groups=2)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.gn0(self.stem(x)))
        y = F.relu(self.gn1(self.conv1(x)))
        y = F.relu(self.gn2(self.conv2(y)))
        x = F.relu(x + self.conv3(y))
        return self.fc(x.mean((2, 3)))


# ----------------------------------------------------------------------------------------------- ConvNeXt
class LayerNorm2d(nn.LayerNorm):
    """ConvNeXt's channels-first LayerNorm: permute, normalize the channels, permute back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 2, 2), LayerNorm2d(4))
        self.stage1 = nn.Sequential(ConvNeXtBlock(4), ConvNeXtBlock(4))
        self.down = nn.Sequential(LayerNorm2d(4), nn.Conv2d(4, 6, 2, 2))
        self.stage2 = ConvNeXtBlock(6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(self.norm(x.mean([-2, -1])))


# ----------------------------------------------------------------------------------------------- attention
class FusedAttention(nn.Module):
    """timm's ViT attention: one qkv Linear, reshape to (3, heads, head_dim), permute, unbind."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = FusedAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """Patch embedding conv, class token, learned positions, fused-qkv blocks, final norm, head on the class token."""

    def __init__(self, dim: int = 8, heads: int = 2, depth: int = 2) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 4, 4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.1)
        self.pos_embed = nn.Parameter(torch.randn(1, 5, dim) * 0.1)
        self.blocks = nn.Sequential(*(ViTBlock(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


class SDPAGLU(nn.Module):
    """F.scaled_dot_product_attention with separate q/k/v, RMSNorm, and a SwiGLU feed-forward (chunk)."""

    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.inp = nn.Linear(4, dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm = nn.RMSNorm(dim)
        self.up = nn.Linear(dim, 2 * 6)
        self.down = nn.Linear(6, dim)
        self.head = nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        B, N, C = h.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, N, self.heads, C // self.heads).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)))
        h = h + self.o(a.transpose(1, 2).reshape(B, N, C))
        gate, up = self.up(self.norm(h)).chunk(2, dim=-1)
        h = h + self.down(F.silu(gate) * up)
        return self.head(h.mean(1))


# ----------------------------------------------------------------------------------------------- torch.nn modules
class TorchEncoderClassifier(nn.Module):
    """nn.TransformerEncoder as shipped (batch_first, norm_first, fast path possible in eval)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(8), enable_nested_tensor=False)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.inp(x)).mean(1))


class TorchSeq2Seq(nn.Module):
    """nn.Transformer (encoder-decoder) between token embeddings and an output projection."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 8)
        self.transformer = nn.Transformer(8, 2, 1, 1, 16, dropout=0.0, batch_first=True)
        self.out = nn.Linear(8, 7)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        return self.out(self.transformer(self.emb(src), self.emb(tgt)))


class BiLSTMClassifier(nn.Module):
    """Two-layer bidirectional LSTM; the head reads both directions' last states and the mean output."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(9, 4)
        self.rnn = nn.LSTM(4, 5, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(10, 3)
        self.head2 = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, (h, _) = self.rnn(self.emb(x))
        last = torch.cat([h[-2], h[-1]], dim=1)
        return self.head(last) + self.head2(out.mean(1))


class StackedGRU(nn.Module):
    """GRU -> bidirectional GRU -> LSTM with projections -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.GRU(3, 4, batch_first=True)
        self.b = nn.GRU(4, 3, bidirectional=True, batch_first=True)
        self.c = nn.LSTM(6, 5, proj_size=2, batch_first=True)
        self.head = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.a(x)
        x, _ = self.b(x)
        x, _ = self.c(x)
        return self.head(x[:, -1])


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _img(size: int = 16) -> Callable[[], tuple[torch.Tensor, ...]]:
    return lambda: (torch.randn(2, 3, size, size, generator=_g(1)),)


Family = tuple[str, Callable[[], nn.Module], Callable[[], tuple[torch.Tensor, ...]], str]

FAMILIES: list[Family] = [
    ("resnet_basic", lambda: ResNet("basic", (2, 1), (4, 6)), _img(), "derived"),
    ("resnet_bottleneck", lambda: ResNet("bottleneck", (2, 1), (2, 3)), _img(), "derived"),
    ("resnext_groupnorm", ResNeXt, _img(8), "derived"),
    ("inception", Inception, _img(8), "derived"),
    ("squeezenet_fire", SqueezeNet, _img(17), "derived"),
    ("densenet", DenseNet, _img(8), "derived"),
    ("mobilenet_se", MobileNet, _img(8), "derived"),
    ("convnext", ConvNeXt, _img(16), "derived"),  # 16: the LayerNorm2d input's last dim (8) is not its channels
    ("vit_fused_qkv", ViT, _img(8), "derived"),
    ("sdpa_swiglu_rmsnorm", SDPAGLU, lambda: (torch.randn(2, 5, 4, generator=_g(1)),), "derived"),
    ("torch_encoder", TorchEncoderClassifier, lambda: (torch.randn(2, 5, 4, generator=_g(1)),), "derived"),
    ("torch_transformer", TorchSeq2Seq, lambda: (torch.randint(0, 7, (2, 5), generator=_g(1)),
                                                 torch.randint(0, 7, (2, 4), generator=_g(2))), "derived"),
    ("torch_encoder_root", lambda: nn.TransformerEncoder(
        nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 2, enable_nested_tensor=False),
     lambda: (torch.randn(2, 5, 8, generator=_g(1)),), "derived"),
    ("bilstm", BiLSTMClassifier, lambda: (torch.randint(0, 9, (2, 6), generator=_g(1)),), "derived"),
    ("gru_stack_proj", StackedGRU, lambda: (torch.randn(2, 6, 3, generator=_g(1)),), "derived"),
    ("lstm_root", lambda: nn.LSTM(3, 4, num_layers=2), lambda: (torch.randn(6, 2, 3, generator=_g(1)),),
     "all-fixed"),
    ("gru_root_bidirectional", lambda: nn.GRU(3, 4, bidirectional=True, batch_first=True),
     lambda: (torch.randn(2, 6, 3, generator=_g(1)),), "all-fixed"),
]
