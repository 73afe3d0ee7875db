"""Magnitude & Uncertainty (M&U): keep weights whose magnitude is large relative to their spread.

Ko, Oehmcke, Gieseke, "Magnitude and Uncertainty Pruning Criterion for Neural Networks",
arXiv 1912.04845. The paper's score is the Wald-type statistic |w| / σ̂(w), dimensionless and
invariant to rescaling a layer (|w| and σ̂ scale together); ours is that statistic moderated by one
constant, |w| / (σ̂ + s0), for the reasons below. σ̂ is a pseudo-bootstrap estimate — the spread
of the weight over successive optimisation updates — from one of two sources:

(a) statistics the user recorded during training (``ctx.uncertainty``, variances loaded by
    ``calibration.uncertainty.load_uncertainty``): σ̂ = sqrt(var);
(b) otherwise a short trajectory re-created from the trained weights on D_tune only (SPEC §1):
    ``ctx.mu_steps`` steps of constant-learning-rate SGD on the cross-entropy against
    ``ctx.tune_y``, model in eval mode (BatchNorm running statistics and dropout untouched),
    updating the prunable weights only; Welford mean/variance over the iterates. The weights
    are then restored bit for bit and the *original* weights are scored.

Learning rate in (b): each layer ℓ takes steps of size
``lr_ℓ = ctx.mu_lr · ‖w_ℓ‖ / ‖g_ℓ‖`` (Frobenius norms; g_ℓ the layer's gradient on the first
mini-batch), fixed for the whole trajectory — a LARS-style trust ratio. Two reasons:
(1) a plain shared lr is not scale invariant: rescaling a layer by c (compensated downstream,
e.g. through a ReLU) scales its gradient by 1/c, so SGD moves it by 1/c while |w| grows by c and
the statistic changes by c²; with the trust ratio σ̂ scales by c like |w| (the plain statistic is
then unchanged; the moderated one, with its single s0, is not, like magnitude: see below).
(2) ``mu_lr`` gets a model-independent meaning: the relative size of one update
(default 1e-3: each step moves a layer by 0.1 % of its norm), so no knowledge of the user's
training learning rate is needed. In the small-step regime the ranking does not depend on
``mu_lr`` at all, since every σ̂ scales with it.

What the paper does, and what we do differently. The paper (abstract and introduction, the only
parts of it reachable from here: arXiv 1912.04845 / IEEE BigData 2019 pp. 2317–2326) takes the
statistic from the Wald test, |θ̂| / se(θ̂), and estimates the uncertainty by a "pseudo bootstrap" from
the weight's update information during training; it compares against magnitude pruning in the
prune-and-retrain setting of Han et al. (2015), which its introduction builds on. Here pruning is
one-shot and certified without retraining, and there the plain statistic fails. ``bench/mu_study.py``
(digits, 64-256-256-10 MLP, SGD + momentum, σ̂ recorded over the second half of training, ε = 0.02,
δ = 0.1, n = 1197; certified sparsity, median of 10 seeds, without / with weight decay 5e-4):
global magnitude 0.87 / 0.88; plain |w|/σ̂ 0.15 / 0.43; σ̂ over the whole run, the last epoch, around
a linear trend, or of the updates: 0.10–0.20 either way. The reason: the spread of SGD iterates over
a window is not a standard error. In the many low-curvature directions the weight does not
equilibrate within the window; its spread is a random walk driven by the gradient noise,
σ̂² ≈ η²·T·Var(g), large where the loss is *sensitive* (the gradient-noise variance is the empirical
Fisher information over the batch size), while a Wald standard error is 1/√(N·F), the reciprocal.
Dividing by σ̂ demotes the weights the loss depends on most: |w|·σ̂ of the detrended iterates, an
information-like score, certified 0.84 / 0.84, |w|/σ̂ of the same σ̂ 0.15 / 0.18.

So σ̂ may only break near-ties of magnitude, never reverse a clear magnitude order. The score is
moderated by one fudge constant for all prunable weights (a SAM-type moderated statistic, Tusher,
Tibshirani, Chu 2001): score = |w| / (σ̂ + s0), s0 = the largest σ̂ of all prunable weights, so σ̂
changes a score by at most a factor of 2. Same setup, without / with weight decay: s0 = max over all
weights 0.86 / 0.89 (magnitude 0.87 / 0.88); 90th percentile over all weights 0.56 / 0.84; per-layer
maximum 0.69 / 0.80; per-layer 90th percentile (the previous choice) 0.40 / 0.72; per-layer median
0.22 / 0.70. The price: the statistic is no longer invariant to rescaling one layer (one s0 in weight
units, like magnitude's single threshold); per-layer fudges keep that invariance and cost here, as
layerwise magnitude (0.72 / 0.75) does against global. No form of |w|/σ̂ beat magnitude by more
than the seeds' noise: M&U one-shot is at best magnitude with an uncertainty tie-break.
Properties kept: (i) weights with σ̂ = 0 rank by |w| among themselves and above moved weights of the
same |w|; (ii) rescaling *all* weights and σ̂ together leaves the scores' order unchanged; (iii) a
weight that is exactly zero scores 0. If no weight moved at all, s0 = 1e-6 × the RMS of all |w|
(a pure magnitude ranking). ``wald_scores(..., fudge_quantile=None)`` gives the unmoderated
statistic (τ = 1e-6 × the median positive σ̂) for experiments; ``fudge_quantile=q`` takes the
q-quantile of the pooled positive σ̂ instead of the maximum.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError, UncertaintyError
from ..model import PrunableWeight
from . import ScoreContext
from ._tune import differentiable, require_tune_data, tune_loss

#: Quantile of the pooled positive σ̂ of all prunable weights used as the fudge s0 (1.0: the maximum).
FUDGE_QUANTILE = 1.0
#: Relative size of the floor used where no moderation is possible or wanted.
TINY_RELATIVE = 1e-6
#: Mini-batch size of the re-created trajectory (capped by ctx.batch_size and n_tune).
MU_BATCH_SIZE = 32


def scores(ctx: ScoreContext) -> list[torch.Tensor]:
    """M&U scores, one float32 tensor per prunable weight (its shape, its device); higher = keep."""
    if ctx.uncertainty is not None:
        sigmas = _sigmas_from_statistics(ctx.weights, ctx.uncertainty)
    else:
        sigmas = trajectory_sigmas(ctx)
    return wald_scores([w.param.detach() for w in ctx.weights], sigmas)


def fudge(weights: list[torch.Tensor], sigmas: list[torch.Tensor], *,
          fudge_quantile: float | None = FUDGE_QUANTILE) -> float:
    """The moderation s0, one for all the given layers (see the module docstring).

    The ``fudge_quantile``-quantile of the pooled positive σ̂ (1.0: the largest); ``None``:
    TINY_RELATIVE × their median (the plain Wald statistic). No σ̂ positive: TINY_RELATIVE × the
    RMS of all |w| (a magnitude ranking), or 1.0 when every weight is zero.
    """
    moved = torch.cat([s.detach().flatten().float().cpu() for s in sigmas])
    moved = moved[moved > 0]
    if moved.numel():
        q = 0.5 if fudge_quantile is None else float(fudge_quantile)
        if not 0.0 < q <= 1.0:
            raise ValueError(f"fudge_quantile must be in (0, 1] or None. Got {fudge_quantile!r}.")
        k = min(moved.numel(), max(1, math.ceil(q * moved.numel())))
        s0 = float(moved.kthvalue(k).values)
        if fudge_quantile is None:
            s0 *= TINY_RELATIVE
    else:  # nothing moved (frozen during training, or no gradient on D_tune): magnitude order
        square_sum = sum(float(w.detach().float().pow(2).sum()) for w in weights)
        count = sum(w.numel() for w in weights)
        s0 = TINY_RELATIVE * (math.sqrt(square_sum / max(count, 1)) or 1.0)
    return max(s0, 1e-30)


def wald_scores(weights: torch.Tensor | list[torch.Tensor], sigmas: torch.Tensor | list[torch.Tensor], *,
                fudge_quantile: float | None = FUDGE_QUANTILE) -> torch.Tensor | list[torch.Tensor]:
    """|w| / (σ̂ + s0) with one s0 (:func:`fudge`) for all the given layers.

    Takes one tensor (one layer: s0 from that layer alone) or lists (every prunable weight: s0
    pooled over all of them) and returns the same form, float32.
    """
    single = isinstance(weights, torch.Tensor)
    ws = [weights] if single else list(weights)
    ss = [sigmas] if single else list(sigmas)
    if len(ws) != len(ss):
        raise ValueError(f"{len(ws)} weight tensors but {len(ss)} sigma tensors.")
    s0 = fudge(ws, ss, fudge_quantile=fudge_quantile)
    out = []
    for w, s in zip(ws, ss):
        magnitude = w.detach().abs().float()
        out.append(magnitude / (s.to(device=magnitude.device, dtype=torch.float32) + s0))
    return out[0] if single else out


def _sigmas_from_statistics(weights: list[PrunableWeight], variances: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    sigmas = []
    for w in weights:
        var = variances.get(w.name)
        if var is None:  # load_uncertainty validates uploads; this guards direct callers
            raise UncertaintyError(
                f"The training statistics have no variance for the prunable weight {w.name!r}.",
                code="uncertainty_missing_parameter",
            )
        if tuple(var.shape) != tuple(w.param.shape):
            raise UncertaintyError(
                f"The variance for {w.name!r} has shape {list(var.shape)}, the weight {list(w.param.shape)}.",
                code="uncertainty_shape_mismatch",
            )
        sigmas.append(var.float().clamp(min=0).sqrt())
    return sigmas


def trajectory_sigmas(ctx: ScoreContext) -> list[torch.Tensor]:
    """σ̂ per prunable weight from a re-created SGD trajectory on D_tune (source (b)).

    Returns float32 tensors of the weights' shapes. The weights, their ``requires_grad`` flags
    and the module's train/eval mode are restored exactly before returning (also on error).
    """
    tune_x, tune_y = require_tune_data(ctx, "mu")
    steps = int(ctx.mu_steps)
    if steps < 2:
        raise ConfigError(f"The 'mu_steps' parameter must be an integer >= 2. Got {steps!r}.")
    params = [w.param for w in ctx.weights]
    device = params[0].device
    n_tune = tune_x.shape[0]
    # Small mini-batches as in training: the pseudo-bootstrap needs their gradient noise (a
    # full-batch trajectory is deterministic and measures only drift; on digits, batches of 32
    # ranked better than full batches). Drawn without replacement within a batch, a fresh draw
    # per step, from a CPU generator so the trajectory is the same on every device for one seed.
    batch = min(int(ctx.batch_size), n_tune, MU_BATCH_SIZE)
    gen = torch.Generator().manual_seed(int(ctx.seed))
    lrs: list[float] | None = None
    # Everything allocated inside the block: callers may be in inference mode.
    with differentiable(ctx.module, params):
        origin = [p.detach().clone() for p in params]
        # Welford on the displacement w_t − w_0: the variance is shift invariant and the
        # displacements are small, so float32 accumulators lose nothing to cancellation.
        mean = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
        m2 = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
        try:
            for step in range(1, steps + 1):
                idx = torch.randperm(n_tune, generator=gen)[:batch]
                loss = tune_loss(ctx.module, tune_x, tune_y, idx, device, output=ctx.output)
                if not torch.isfinite(loss):
                    raise ConfigError(
                        f"The mu trajectory diverged (loss {float(loss)} at step {step}). Lower 'mu_lr' "
                        f"(now {ctx.mu_lr}) or upload training statistics instead.",
                        code="mu_diverged",
                    )
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
                if lrs is None:
                    lrs = [_trust_ratio_lr(ctx.mu_lr, p, g) for p, g in zip(params, grads)]
                with torch.no_grad():
                    for k, (p, g) in enumerate(zip(params, grads)):
                        p.sub_(g, alpha=lrs[k])
                        x = (p - origin[k]).float()
                        delta = x - mean[k]
                        mean[k].add_(delta, alpha=1.0 / step)
                        m2[k].add_(delta * (x - mean[k]))
        finally:
            with torch.no_grad():
                for p, o in zip(params, origin):
                    p.copy_(o)
        sigmas = [(v / (steps - 1)).clamp_(min=0).sqrt_() for v in m2]
    for w, s in zip(ctx.weights, sigmas):
        if not bool(torch.isfinite(s).all()):
            raise ConfigError(
                f"The mu trajectory gave a non-finite spread for {w.name!r}. Lower 'mu_lr' (now {ctx.mu_lr}).",
                code="mu_diverged",
            )
    return sigmas


def _trust_ratio_lr(mu_lr: float, param: torch.Tensor, grad: torch.Tensor) -> float:
    """lr_ℓ = mu_lr · ‖w_ℓ‖ / ‖g_ℓ‖; 0 when the layer has no gradient or no weight."""
    g_norm = float(grad.float().norm())
    w_norm = float(param.detach().float().norm())
    if g_norm == 0.0 or w_norm == 0.0:
        return 0.0
    return float(mu_lr) * w_norm / g_norm


__all__ = ["FUDGE_QUANTILE", "MU_BATCH_SIZE", "TINY_RELATIVE", "fudge", "scores", "trajectory_sigmas", "wald_scores"]
