"""Real models trained on real data a package ships (scikit-learn's digits), made once per session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn


@dataclass
class Digits:
    x_train: np.ndarray
    y_train: np.ndarray
    x_cal: np.ndarray
    y_cal: np.ndarray


@pytest.fixture(scope="session")
def digits() -> Digits:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    x, y = x[order], y[order].astype(np.int64)
    return Digits(x[:900], y[:900], x[900:], y[900:])


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int = 60, lr: float = 1e-2) -> nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(yt)).split(128):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


class DigitsCNN(nn.Module):
    """Small conv net with BatchNorm: inputs (N, 1, 8, 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Linear(32 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


@pytest.fixture(scope="session")
def mlp_eager(digits: Digits) -> nn.Module:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    return train(model, digits.x_train, digits.y_train, epochs=40)


@pytest.fixture(scope="session")
def cnn_eager(digits: Digits) -> nn.Module:
    torch.manual_seed(2)
    return train(DigitsCNN(), digits.x_train.reshape(-1, 1, 8, 8), digits.y_train, epochs=25)


@pytest.fixture(scope="session")
def files(tmp_path_factory: pytest.TempPathFactory, digits: Digits, mlp_eager: nn.Module,
          cnn_eager: nn.Module) -> dict[str, Path]:
    """TorchScript archives (MLP traced, CNN scripted) and calibration sets on disk."""
    d = tmp_path_factory.mktemp("calib")
    out = {
        "mlp": d / "mlp_traced.pt",
        "cnn": d / "cnn_scripted.pt",
        "cnn_traced": d / "cnn_traced.pt",
        "data_flat": d / "cal_flat.npz",
        "data_img": d / "cal_img.npz",
    }
    torch.jit.trace(mlp_eager, torch.from_numpy(digits.x_cal[:4])).save(str(out["mlp"]))
    torch.jit.script(cnn_eager).save(str(out["cnn"]))
    torch.jit.trace(cnn_eager, torch.from_numpy(digits.x_cal[:4].reshape(-1, 1, 8, 8))).save(str(out["cnn_traced"]))
    np.savez(out["data_flat"], x=digits.x_cal, y=digits.y_cal)
    np.savez(out["data_img"], x=digits.x_cal.reshape(-1, 1, 8, 8), y=digits.y_cal)
    return out
