"""Masked fine-tuning on D_tune: train a level's kept weights with its mask held fixed.

Pruning practice recovers accuracy by fine-tuning the pruned network with the mask fixed (the seed
paper "Magnificent Minified Models" found that better than retraining). Learn then Test allows any
candidate built from D_tune alone (SPEC §1), so every level's candidate may be fine-tuned before its
single test on D_cal: the guarantee is untouched, only the candidates get better.

What is trained: the prunable weights (``PrunableWeight.param``) and nothing else — biases, norms and
embeddings keep their dense values, so the candidate stays "the dense model with some weights
zeroed and the rest adjusted". The module runs in eval mode: BatchNorm normalises with the
statistics chosen for the level (running statistics are never updated by the training), dropout is
off, the loss is a deterministic function of the weights.

The loss (``loss``):
- ``labels``: cross-entropy against D_tune's labels (per position for sequence models; labels −100
  ignored);
- ``distill``: KL divergence to the dense model's logits on D_tune (soft targets), so it needs no
  labels and aims at exactly what ``disagreement`` measures. Where the dense logits of D_tune would
  not fit (more than ``SOFT_TARGET_ELEMENTS`` numbers, e.g. a language model's (N, T, V)) the targets
  are the dense top-1 predictions (cross-entropy on them; the hard form of the same distillation);
- ``auto`` (default): ``distill``, for every risk. Measured on digits (4 seeds, 299 tuning samples,
  ε = 0.01 / 0.02, accuracy_drop): distillation certified 0.855 / 0.955 (MLP; one-shot 0.78 / 0.87) and
  0.80 / 0.885 (CNN + BN; one-shot 0.64 / 0.80); cross-entropy on the labels 0.70 / 0.94 and
  0.00 / 0.86 — it moves the model away from the dense one (≈ +0.008 accuracy drop at 30 %
  sparsity), and fixed-sequence testing stops at the first level that shows it.

The optimiser is Adam, each layer with its own learning rate ``lr × RMS(dense weights of the layer)``
and a cosine decay to 0 over ``steps``: a relative step size, so one default serves layers and
models of any scale (a 64-256-256-10 MLP on digits pruned to 95 % recovered from 0.72 to 0.95–0.96
accuracy with 200 steps, relative lr 0.01–0.02). Gradients of pruned weights are zeroed before
each step and the mask is re-applied after it, so pruned weights stay exactly zero.

Math: fp32 weights and loss, whatever the evaluation precision (fp16 autocast would need loss scaling); on
CUDA with TF32 convolutions and matmuls (``math``, from ``engine.finetune_math``), as training usually runs:
fine-tuning builds the candidate from D_tune and is not the test, which keeps the job's own precision.

Determinism: the mini-batches come from a CPU generator seeded by (job seed, level index), so a
level's candidate is the same whenever it is built; the engine nevertheless keeps the tested weights
and writes exactly those into the artifact (GPU kernels need not be bit-reproducible).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import numpy as np
import torch
import torch.nn.functional as F

from .config import FinetuneConfig
from .criteria._tune import differentiable
from .errors import ConfigError
from .inputs import call, select_output
from .risks import IGNORE_INDEX

#: Largest dense-logit table of D_tune kept for soft distillation (numbers; 2^27 fp32 = 512 MiB)
SOFT_TARGET_ELEMENTS = 1 << 27


@dataclass
class Targets:
    """What D_tune's samples are trained towards: ``kind`` labels | soft | hard; ``values`` (n_tune, …)."""

    kind: str
    values: torch.Tensor
    position_mask: torch.Tensor | None = None  # (n_tune, T) bool for sequence models with an attention mask

    @property
    def description(self) -> str:
        return {"labels": "cross-entropy on D_tune's labels",
                "soft": "distillation to the dense model's logits on D_tune (KL divergence)",
                "hard": "distillation to the dense model's top-1 predictions on D_tune"}[self.kind]


@torch.no_grad()
def dense_targets(module: torch.nn.Module, x_tune: Any, batch_size: int, output: int | str | None,
                  *, loss: str, labels: torch.Tensor | None, position_mask: torch.Tensor | None) -> Targets:
    """The training targets, computed once from the dense model (before any level is built)."""
    if loss == "labels":
        if labels is None:
            raise ValueError("labels fine-tuning needs D_tune's labels")
        return Targets("labels", labels.long(), position_mask)
    logits: list[torch.Tensor] = []
    preds: list[torch.Tensor] = []
    kept = 0
    for start in range(0, x_tune.shape[0], batch_size):
        out = select_output(call(module, x_tune[start:start + batch_size]), output).float()
        preds.append(out.argmax(dim=-1))
        kept += out.numel()
        if kept <= SOFT_TARGET_ELEMENTS:
            logits.append(out.log_softmax(dim=-1))
    if kept <= SOFT_TARGET_ELEMENTS:
        return Targets("soft", torch.cat(logits), position_mask)
    return Targets("hard", torch.cat(preds), position_mask)


def _batch_loss(logits: torch.Tensor, targets: Targets, idx: torch.Tensor) -> torch.Tensor:
    """Mean loss of one mini-batch; sequence models average over the positions that count."""
    target = targets.values[idx]
    logits = logits.float()
    if logits.dim() == 3:  # (B, T, V): flatten positions; drop masked / ignored ones
        valid = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
        if targets.position_mask is not None:
            valid &= targets.position_mask[idx].to(torch.bool)
        if targets.kind == "labels":
            valid &= target != IGNORE_INDEX
        logits, target = logits[valid], target[valid]
        if logits.shape[0] == 0:
            return logits.sum() * 0.0
    if targets.kind == "soft":
        return F.kl_div(logits.log_softmax(dim=-1), target, log_target=True, reduction="batchmean")
    return F.cross_entropy(logits, target)


#: Share of D_tune held out to judge the fine-tuning (early stopping; never trained on)
HOLD_FRACTION = 0.25
#: Smallest D_tune that is split into a training part and a held-out part (else: all steps, no check)
MIN_TUNE_FOR_HOLD = 8
#: Held-out checks per run (and one before the first step)
CHECKS = 10


class Finetuner:
    """Fine-tunes the live module's prunable weights in place for one level's keep-masks.

    Fine-tuning that cannot hurt (on held-out data): a seeded ``HOLD_FRACTION`` of D_tune is never
    trained on; the training loss on it is measured before the first step and ``CHECKS`` times during
    the run, and the weights with the lowest held-out loss are kept — the masked candidate itself when
    no step helped. Without it, 200 steps of cross-entropy on the 299 tuning images of the digits CNN
    overfit them and lost accuracy even at 30 % sparsity. Still a function of D_tune alone.
    """

    def __init__(self, module: torch.nn.Module, params: list[torch.Tensor], x_tune: Any, targets: Targets,
                 cfg: FinetuneConfig, *, seed: int, output: int | str | None = None,
                 math: tuple[str, Callable[[], ContextManager[Any]]] | None = None) -> None:
        """``math``: (its name, a context) the training runs in, when not the job's own precision."""
        self.module = module
        self.math_name, self._math = math if math is not None else (None, contextlib.nullcontext)
        self.params = params
        self.x_tune = x_tune
        self.targets = targets
        self.cfg = cfg
        self.seed = int(seed)
        self.output = output
        # The relative step size is fixed from the dense weights: every level trains at the same scale.
        self.lrs = [cfg.lr * (float(p.detach().float().pow(2).mean().sqrt()) or 1.0) for p in params]
        n = int(x_tune.shape[0])
        order = torch.from_numpy(np.random.default_rng([self.seed, 0xF7]).permutation(n))
        n_hold = int(round(HOLD_FRACTION * n)) if n >= MIN_TUNE_FOR_HOLD else 0
        self.hold_rows, self.fit_rows = order[:n_hold].sort().values, order[n_hold:].sort().values
        self.last_loss: float | None = None
        self.last_kept_step: int | None = None

    def _loss(self, idx: torch.Tensor) -> torch.Tensor:
        xb = self.x_tune[idx.to(self.x_tune.device)]
        # fp32 whatever the evaluation precision (fp16 autocast would need loss scaling)
        with torch.autocast(self.params[0].device.type, enabled=False):
            return _batch_loss(select_output(call(self.module, xb), self.output), self.targets,
                               idx.to(self.targets.values.device))

    @torch.no_grad()
    def _held_out_loss(self) -> float:
        total, rows = 0.0, self.hold_rows
        for start in range(0, rows.numel(), 512):
            chunk = rows[start:start + 512]
            total += float(self._loss(chunk)) * chunk.numel()
        return total / max(1, rows.numel())

    def run(self, keep_masks: list[torch.Tensor], level: int) -> None:
        """Train the kept weights (whatever the live weights are now: masked, maybe reconstructed)."""
        with self._math():
            self._run(keep_masks, level)

    def _run(self, keep_masks: list[torch.Tensor], level: int) -> None:
        n = int(self.fit_rows.numel())
        steps = int(self.cfg.steps)
        if n == 0 or steps == 0:
            return
        batch = min(int(self.cfg.batch_size), n)
        # A stream per level, from the job's seed: the same level gets the same batches on every run.
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + int(level)) % (2**63 - 1))
        device = self.params[0].device
        keep = [m.to(device=device, dtype=p.dtype) for m, p in zip(keep_masks, self.params)]
        checking = self.hold_rows.numel() > 0
        check_every = max(1, steps // CHECKS)
        best_loss = self._held_out_loss() if checking else math.inf
        best: list[torch.Tensor] | None = [p.detach().clone() for p in self.params] if checking else None
        best_step = 0
        with differentiable(self.module, self.params):
            optimizer = torch.optim.Adam([{"params": [p], "lr": lr} for p, lr in zip(self.params, self.lrs)],
                                         betas=(0.9, 0.999), foreach=True)
            loss_value = float("nan")
            for step in range(steps):
                idx = self.fit_rows[torch.randperm(n, generator=gen)[:batch]]
                # cosine decay from the full rate to 0 over the run
                scale = 0.5 * (1.0 + math.cos(math.pi * step / steps))
                for group, lr in zip(optimizer.param_groups, self.lrs):
                    group["lr"] = lr * scale
                loss = self._loss(idx)
                grads = [torch.zeros_like(p) if g is None else g
                         for p, g in zip(self.params, torch.autograd.grad(loss, self.params, allow_unused=True))]
                with torch.no_grad():
                    torch._foreach_mul_(grads, keep)  # pruned weights get no gradient ...
                    for p, g in zip(self.params, grads):
                        p.grad = g
                    optimizer.step()
                    torch._foreach_mul_(self.params, keep)  # ... and stay exactly zero
                    for p in self.params:
                        p.grad = None
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    raise ConfigError(f"Fine-tuning diverged at level {level} (loss {loss_value}). Lower the "
                                      f"fine-tuning 'lr' (now {self.cfg.lr}).", code="finetune_diverged")
                if checking and ((step + 1) % check_every == 0 or step + 1 == steps):
                    held = self._held_out_loss()
                    if held < best_loss:
                        best_loss, best_step = held, step + 1
                        for b, p in zip(best, self.params):  # type: ignore[arg-type]
                            b.copy_(p.detach())
            if best is not None:
                with torch.no_grad():
                    for p, b in zip(self.params, best):
                        p.copy_(b)
        self.last_loss = best_loss if checking else loss_value
        self.last_kept_step = best_step if checking else steps

    def describe(self) -> dict[str, Any]:
        return {"steps": self.cfg.steps, "lr": self.cfg.lr, "batch_size": self.cfg.batch_size, "chain": self.cfg.chain,
                "loss": self.targets.kind, "loss_description": self.targets.description,
                "optimizer": "Adam, per-layer lr = lr × RMS(dense weights), cosine decay to 0",
                "trained": "prunable weights (mask fixed); biases, norms, embeddings unchanged",
                "n_train": int(self.fit_rows.numel()), "n_held_out": int(self.hold_rows.numel()),
                **({"math": self.math_name} if self.math_name else {}),
                "kept": ("per level, the weights after the step with the lowest loss on the held-out part of "
                         "D_tune (0: the masked candidate)" if self.hold_rows.numel() else "the last step")}


__all__ = ["CHECKS", "HOLD_FRACTION", "MIN_TUNE_FOR_HOLD", "Finetuner", "SOFT_TARGET_ELEMENTS", "Targets", "dense_targets"]
