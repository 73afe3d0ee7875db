"""Models for the GPU speed benchmark (``bench/gpu_speed.py``).

``resnet18`` (32×32 inputs, 10 classes) and ``resnet50`` (224×224, 1000 classes) come from
torchvision (random weights) where it is installed; ``tiny`` is a torchvision-free ResNet-ish
CNN (BasicBlocks with BatchNorm, a residual shortcut, global pooling, a linear head) for the
CPU ``--quick`` mode that CI runs, so the benchmark cannot rot on a machine without torchvision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class TinyResNet(nn.Module):
    """A small CIFAR-style ResNet: (N, 3, 32, 32) → (N, num_classes)."""

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.layer3 = BasicBlock(2 * width, 4 * width, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


@dataclass(frozen=True)
class ModelSpec:
    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    batch_size: int  # the engine's batch size for this model on a GPU


SPECS: dict[str, ModelSpec] = {
    "tiny": ModelSpec("tiny", (3, 32, 32), 10, 128),
    "resnet18": ModelSpec("resnet18", (3, 32, 32), 10, 2500),
    "resnet50": ModelSpec("resnet50", (3, 224, 224), 1000, 500),
}


def torchvision_available() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


def build(name: str, seed: int = 0) -> nn.Module:
    """A freshly initialised (random-weight) eager model in eval mode."""
    torch.manual_seed(seed)
    spec = SPECS[name]
    if name == "tiny":
        model: nn.Module = TinyResNet(spec.num_classes)
    else:
        import torchvision

        model = getattr(torchvision.models, name)(weights=None, num_classes=spec.num_classes)
    return model.eval()


@torch.no_grad()
def calibrate(model: nn.Module, x: torch.Tensor, batch_size: int) -> nn.Module:
    """Make a random-weight model behave like a trained one on ``x``: data BN statistics, centred head.

    With the default running statistics (mean 0, var 1) a deep random ResNet's activations grow
    layer by layer, and after global pooling one direction dominates: nearly every input gets
    the same class. We set BatchNorm statistics from ``x`` (cumulative average) and subtract the
    mean logit from the last Linear layer's bias, so predictions vary with the input (ResNet-50:
    ~90 of 1000 classes on 96 random inputs instead of 3) and the risk curve is not degenerate.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    for start in range(0, x.shape[0], batch_size):
        model(x[start:start + batch_size])
    for bn in bns:
        bn.momentum = 0.1
    model.eval()
    heads = [m for m in model.modules() if isinstance(m, nn.Linear) and m.bias is not None]
    if heads:
        mean = torch.cat([model(x[s:s + batch_size]) for s in range(0, x.shape[0], batch_size)]).mean(0)
        heads[-1].bias -= mean
    return model


def prunable_modules(model: nn.Module) -> list[nn.Module]:
    """The modules whose weight certiprune prunes (SPEC §2): Conv*, ConvTranspose*, Linear."""
    kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
    return [m for m in model.modules() if isinstance(m, kinds) and m.weight.dim() >= 2]


__all__ = ["SPECS", "ModelSpec", "TinyResNet", "build", "calibrate", "prunable_modules", "torchvision_available"]
