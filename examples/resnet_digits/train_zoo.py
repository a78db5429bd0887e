"""Train a small zoo of `model.py` networks on scikit-learn's digits and write what `unfzoo import checkpoints` reads.

Each member gets its own learning rate, weight decay, batch size and seed; its state dict is saved after epochs 1 and
`--epochs` as `m<k>_e<epoch>.pt`, and `metrics.csv` lists every file with its member, epoch, hyperparameters
(`hp.` columns) and metrics (test_acc, test_loss, train_loss). About a minute on one CPU core for 64 members.

Run: `python examples/resnet_digits/train_zoo.py --out runs/resnet-digits-ckpts [--members 64] [--epochs 4]`.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model import make_model  # noqa: E402


def _data() -> tuple[torch.Tensor, ...]:
    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 8.0 - 1.0)[:, None]  # (1797, 1, 8, 8) in [-1, 1]
    y = torch.from_numpy(digits.target.astype(np.int64))
    tr, te = train_test_split(np.arange(len(y)), test_size=0.2, random_state=0, stratify=digits.target)
    return x[tr], y[tr], x[te], y[te]


def _evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        logits = model(x)
    model.train()
    return float((logits.argmax(1) == y).float().mean()), float(F.cross_entropy(logits, y))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--members", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--width", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_test, y_test = _data()
    rng = np.random.default_rng(0)
    rows = []
    for k in range(args.members):
        lr = float(10 ** rng.uniform(-3.5, -1.0))
        wd = float(10 ** rng.uniform(-6, -2))
        batch = int(rng.choice([32, 64, 128]))
        seed = int(k)
        torch.manual_seed(seed)
        model = make_model(width=args.width)
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd)
        g = torch.Generator().manual_seed(seed)
        for epoch in range(1, args.epochs + 1):
            losses = []
            for idx in torch.randperm(len(y_train), generator=g).split(batch):
                loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss))
            if epoch in (1, args.epochs):
                name = f"m{k:03d}_e{epoch}.pt"
                torch.save(model.state_dict(), args.out / name)
                acc, test_loss = _evaluate(model, x_test, y_test)
                train_loss = float(np.mean(losses)) if losses else math.nan
                rows.append({"file": name, "member": f"m{k:03d}", "epoch": epoch, "hp.log_lr": math.log10(lr),
                             "hp.log_wd": math.log10(wd), "hp.batch_size": batch, "hp.seed": seed,
                             "test_acc": acc, "test_loss": test_loss, "train_loss": train_loss})
        print(f"member {k + 1}/{args.members}: lr={lr:.2g} test_acc={rows[-1]['test_acc']:.3f}", flush=True)
    with open(args.out / "metrics.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} checkpoints and metrics.csv to {args.out}")


if __name__ == "__main__":
    main()
