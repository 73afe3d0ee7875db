"""Random pruning from the recorded seed: the baseline every criterion must beat."""

from __future__ import annotations

import torch

from . import ScoreContext


def scores(ctx: ScoreContext) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(ctx.seed)
    return [torch.rand(w.param.shape, generator=gen).to(w.param.device) for w in ctx.weights]
