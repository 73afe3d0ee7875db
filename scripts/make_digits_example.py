"""Train a small model on scikit-learn's digits (shipped with the package: no download) and write
a TorchScript archive plus a calibration set, the inputs a certiprune user would upload."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn


def digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_pool, y_pool): 600 training images, the rest held out."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order], y[order].astype(np.int64)
    return x[:600], y[:600], x[600:], y[600:]


def train_mlp(x: np.ndarray, y: np.ndarray, *, hidden: int = 256, epochs: int = 60, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        for idx in torch.randperm(len(yt)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out-dir", default="demo-out")
    args = parser.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_pool, y_pool = digits_split()
    model = train_mlp(x_train, y_train)
    torch.jit.script(model).save(str(out / "model.pt"))
    np.savez(out / "calibration.npz", x=x_pool, y=y_pool)
    with torch.no_grad():
        acc = (model(torch.from_numpy(x_pool)).argmax(1).numpy() == y_pool).mean()
    print(f"wrote {out / 'model.pt'} (held-out accuracy {acc:.3f}) and {out / 'calibration.npz'} ({len(y_pool)} samples)")


if __name__ == "__main__":
    main()
