"""Pruning criteria: weights (+ statistics from D_tune) → scores, higher = keep.

Each criterion is one module with one function ``scores(ctx) -> list[Tensor]`` (one tensor per
prunable weight, same shape). How scores become masks lives in ``calibration.masks``.
Anything data-dependent here may only look at D_tune (SPEC §1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import ConfigError
from ..model import PrunableWeight


@dataclass
class ScoreContext:
    """What a criterion may use. ``tune_x``/``tune_y`` are D_tune only (never D_cal)."""

    module: torch.nn.Module
    weights: list[PrunableWeight]
    tune_x: torch.Tensor | None = None  # (n_tune, *input_shape), on the evaluation device
    tune_y: torch.Tensor | None = None  # (n_tune,) labels, or dense predictions when unlabeled
    batch_size: int = 512
    seed: int = 0
    uncertainty: dict[str, torch.Tensor] | None = None  # param name → variance of the weight during training
    mu_steps: int = 64
    mu_lr: float = 1e-3
    obd_samples: int = 256
    output: int | str | None = None  # which entry of a tuple/dict output is the logits (calibration.inputs)


Criterion = Callable[[ScoreContext], list[torch.Tensor]]


CRITERION_MODULES = {"magnitude": "magnitude", "random": "random", "mu": "mu", "obd": "obd"}


def get_criterion(name: str) -> Criterion:
    """Look a criterion up by its public name (modules imported on demand)."""
    import importlib

    if name not in CRITERION_MODULES:
        raise ConfigError(f"Unknown criterion {name!r}. Valid criteria: {', '.join(sorted(CRITERION_MODULES))}.")
    return importlib.import_module(f"{__name__}.{CRITERION_MODULES[name]}").scores


__all__ = ["Criterion", "ScoreContext", "get_criterion"]
