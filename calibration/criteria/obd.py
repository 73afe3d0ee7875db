"""Optimal Brain Damage: keep the weights whose removal would raise the loss most.

LeCun, Denker, Solla, "Optimal Brain Damage", NIPS 1989. Deleting weight w_i raises the loss by
about ½ · H_ii · w_i² (a second-order Taylor expansion at a minimum, diagonal Hessian). H_ii is
replaced by the empirical Fisher diagonal on D_tune only (SPEC §1):

    F_ii = (1/m) Σ_{n ≤ m} (∂ℓ(f(x_n), y_n) / ∂w_i)²,

ℓ the cross-entropy against ``ctx.tune_y``, over m = min(``ctx.obd_samples``, n_tune) samples
drawn without replacement with ``ctx.seed``. The square is of the *per-sample* gradient (the
square of a batch-mean gradient would be a different, much smaller quantity). TorchScript
modules admit no functorch per-sample gradients, so gradients are taken one sample at a time
(exact; for a small CNN 256 samples take about a second on a CPU). The model runs in eval
mode, so BatchNorm uses its running statistics and a batch of one is well defined.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from . import ScoreContext
from ._tune import differentiable, require_tune_data, tune_loss


def scores(ctx: ScoreContext) -> list[torch.Tensor]:
    """½ · F_ii · w_i², one float32 tensor per prunable weight (its shape, its device); higher = keep."""
    fisher = fisher_diagonal(ctx)
    return [0.5 * f * w.param.detach().float().pow(2) for w, f in zip(ctx.weights, fisher)]


def fisher_diagonal(ctx: ScoreContext) -> list[torch.Tensor]:
    """Empirical Fisher diagonal per prunable weight, float32 tensors of the weights' shapes.

    Restores the ``requires_grad`` flags and train/eval mode; writes no ``.grad``.
    """
    tune_x, tune_y = require_tune_data(ctx, "obd")
    params = [w.param for w in ctx.weights]
    device = params[0].device
    n_tune = tune_x.shape[0]
    m = min(int(ctx.obd_samples), n_tune)
    if m < 1:
        raise ConfigError(f"The 'obd_samples' parameter must be an integer >= 1. Got {ctx.obd_samples!r}.")
    gen = torch.Generator().manual_seed(int(ctx.seed))
    # Sorted for memory locality; the Fisher is a mean, the order does not matter.
    chosen = torch.randperm(n_tune, generator=gen)[:m].sort().values
    with differentiable(ctx.module, params):  # allocate inside: callers may be in inference mode
        total = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
        for i in chosen.tolist():
            idx = torch.tensor([i])
            loss = tune_loss(ctx.module, tune_x, tune_y, idx, device, output=ctx.output)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            with torch.no_grad():
                for acc, g in zip(total, grads):
                    if g is not None:
                        g = g.float()
                        acc.addcmul_(g, g)
        return [acc.div_(m) for acc in total]


__all__ = ["fisher_diagonal", "scores"]
