"""Derivation + verification speed of `WeightSpec.from_module` on a ResNet-18-sized model.

The model is torchvision's ResNet-18 layout written out here (BasicBlocks [2, 2, 2, 2], widths 64-512, BatchNorm,
1000 classes: 11.69M parameters; torchvision is not a dependency). `from_module(model, x)` traces it, derives the spec
(parameters and BatchNorm running statistics) and verifies it: one float64 forward per permutable label plus one with
all labels together. Time scales with the example input (float64 convolutions dominate); the goal is measured at one
3x112x112 image (--size 224 for ImageNet size; --size changes
it). Also printed: derivation alone (`verify=False`) and verification alone (`spec.verify`), one run each after a
warm-up. Goal: derive + verify <= 5 s on CPU.

Run: `.venv/bin/python benchmarks/bench_derive.py [--size 224] [--batch 1] [--threads N]`.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import unf_models as um

GOAL_S = 5.0


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin, stages = 64, []
        for i, w in enumerate((64, 128, 256, 512)):
            stages.append(nn.Sequential(BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)))
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = ResNet18().eval()
    x = torch.randn(args.batch, 3, args.size, args.size)
    params = sum(p.numel() for p in model.parameters())
    um.WeightSpec.from_module(ResNet18().eval(), torch.randn(1, 3, 32, 32))  # warm-up (imports, fx, kernels)
    t0 = time.perf_counter()
    spec = um.WeightSpec.from_module(model, x)
    total = time.perf_counter() - t0
    t0 = time.perf_counter()
    um.WeightSpec.from_module(model, x, verify=False)
    derive = time.perf_counter() - t0
    t0 = time.perf_counter()
    spec.verify(model, x)
    verify = time.perf_counter() - t0
    print(f"resnet18: {params / 1e6:.2f}M parameters, {len(spec)} spec tensors (running stats included), "
          f"{len(spec.permutable_labels)} permutable labels, input {args.batch}x3x{args.size}x{args.size}, "
          f"{torch.get_num_threads()} threads")
    print(f"derive only {derive:.2f} s, verify only {verify:.2f} s ({len(spec.permutable_labels) + 2} float64 "
          f"forwards)")
    status = "PASS" if total <= GOAL_S else "MISS"
    print(f"BENCH derive_resnet18 seconds={total:.2f} goal=<={GOAL_S:g} {status}")


if __name__ == "__main__":
    main()
