"""Magnitude pruning: keep the weights of largest |w|."""

from __future__ import annotations

import torch

from . import ScoreContext


def scores(ctx: ScoreContext) -> list[torch.Tensor]:
    return [w.param.detach().abs().float() for w in ctx.weights]
