"""One level's candidate, built from D_tune alone: mask → reconstruction → BN statistics → fine-tuning.

Learn then Test holds for any candidate that is a function of D_tune (and the model) only, fixed
before D_cal is looked at (SPEC §1). ``CandidateBuilder.build`` makes the live module that candidate
in place; the engine then tests it on D_cal once. What it may use: the dense weights, the level's
keep-masks, the layer-input statistics of the dense model on D_tune (``reconstruct``), D_tune's
inputs (BN statistics), D_tune's labels or the dense model's logits on D_tune (``finetune``).

BN statistics that cannot hurt (``BatchNormChooser``). Re-estimating BatchNorm statistics after
pruning repairs the shift pruning causes, but from a small D_tune it is noisy: on ResNet-18 with 100
tuning samples, statistics re-estimated at a sparsity of 1e-6 alone changed 21 % of the predictions.
So D_tune is split once (seeded) into an estimation half and a check half; for every level the
dense statistics, the statistics re-estimated on the estimation half, and their average are each
scored on the check half by how far the candidate's outputs are from the dense model's (mean KL
divergence of the softmax outputs: smooth, so a 150-sample check half still ranks them, where a 0/1
risk mostly ties), and the best one (ties: dense, then blended) serves the level — re-estimated or
blended on the whole of D_tune. Where the dense outputs of the check half are too large to keep (a
language model's (N, T, V)), the job's own risk on top-1 predictions scores them instead. It is still
a function of D_tune alone, so the guarantee is unchanged; each level reports what it chose.

The chooser's passes may run in faster math than the test (``math``): in an fp32 job on CUDA the engine runs
them with TF32 convolutions and matmuls (``engine.chooser_math``). On an H200 they were half of a ResNet-50 job's
level time in strict fp32 (7.7 of 15.4 s, ``bench/level_profile.py``). What TF32 changes is the candidate's BN
statistics and the choice, by far less than the sampling noise of a few hundred tuning samples; they are still
computed from D_tune alone before D_cal is looked at, and the candidate is then tested in the job's own
precision — so the guarantee is the same, for the candidate as built (the artifact, bit for bit).

The artifact is exactly the tested candidate: ``snapshot`` copies what ``build`` changed (the
prunable weights and the BN statistics) and ``load`` puts it back, bit for bit.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import numpy as np
import torch

from . import batchnorm
from .finetune import Finetuner
from .masks import apply_masks, restore
from .reconstruct import Reconstructor

BN_CHOICES = ("dense", "blended", "reestimated")  # also the preference order on ties
#: Smallest D_tune that is split into estimation and check halves (else: re-estimate, no check)
MIN_TUNE_FOR_CHOICE = 8


@dataclass
class CandidateState:
    """What a built candidate changed: the prunable weights and the BN running statistics (host copies)."""

    weights: list[torch.Tensor]
    bn: list[tuple[torch.Tensor, ...]]


def _blend(a: list[tuple[torch.Tensor, ...]], b: list[tuple[torch.Tensor, ...]]) -> list[tuple[torch.Tensor, ...]]:
    """The average of two sets of BN statistics (means and variances; the batch count of ``b``)."""
    return [((ma + mb) / 2, (va + vb) / 2, cb.clone()) for (ma, va, _), (mb, vb, cb) in zip(a, b)]


class BatchNormChooser:
    """Per level: dense, re-estimated or blended BN statistics, whichever serves the check half of D_tune."""

    def __init__(self, module: torch.nn.Module, x_tune: Any, batch_size: int, *, seed: int,
                 forward: Callable[[Any], Any], momentum: float | None,
                 check_risk: Callable[[np.ndarray, np.ndarray], float] | None,
                 predict: Callable[[Any], np.ndarray],
                 log_probs: Callable[[Any], torch.Tensor | None] | None = None,
                 math: tuple[str, Callable[[], ContextManager[Any]]] | None = None) -> None:
        """``check_risk(rows, preds)``: the job's risk of the predictions ``preds`` on D_tune rows ``rows``;
        None: no choice, always re-estimate on the whole of D_tune (the historical behaviour).
        ``log_probs(x)``: the live module's log-softmax outputs on ``x`` (None when too large to keep).
        ``math``: (its name, a context) the chooser's passes run in, when not the job's own precision."""
        self.module = module
        self.math_name, self._math = math if math is not None else (None, contextlib.nullcontext)
        self.x_tune = x_tune
        self.batch_size = batch_size
        self.forward = forward
        self.momentum = momentum
        self.predict = predict
        self.check_risk = check_risk
        n = int(x_tune.shape[0])
        self.choosing = check_risk is not None and n >= MIN_TUNE_FOR_CHOICE
        if self.choosing:
            order = np.random.default_rng([int(seed), 0xB17]).permutation(n)
            self.est_rows, self.chk_rows = np.sort(order[: n // 2]), np.sort(order[n // 2:])
            self.x_est = x_tune[torch.from_numpy(self.est_rows).to(x_tune.device)]
            self.x_chk = x_tune[torch.from_numpy(self.chk_rows).to(x_tune.device)]
        self.log_probs = log_probs
        with self._math():
            self.dense_log_probs = log_probs(self.x_chk) if self.choosing and log_probs is not None else None
        self.dense = batchnorm.snapshot(module)
        self.available = True  # False once the graph turns out to ignore train mode
        self.chosen: dict[str, int] = {c: 0 for c in BN_CHOICES}

    def _reestimate(self, x: Any) -> bool:
        ok = batchnorm.reestimate(self.module, x, self.batch_size, self.forward, self.momentum)
        if not ok:
            self.available = False
            batchnorm.load_snapshot(self.module, self.dense)
        return ok

    def apply(self) -> dict[str, Any]:
        """Set the live module's BN statistics for the candidate as it is now; what was chosen and why."""
        with self._math():
            return self._apply()

    def _apply(self) -> dict[str, Any]:
        if not self.available:
            return {"bn_statistics": "dense"}
        if not self.choosing:
            batchnorm.load_snapshot(self.module, self.dense)
            if not self._reestimate(self.x_tune):
                return {"bn_statistics": "dense"}
            self.chosen["reestimated"] += 1
            return {"bn_statistics": "reestimated"}
        batchnorm.load_snapshot(self.module, self.dense)
        risks = {"dense": self._check()}
        if not self._reestimate(self.x_est):
            return {"bn_statistics": "dense"}
        half = batchnorm.snapshot(self.module)
        risks["reestimated"] = self._check()
        batchnorm.load_snapshot(self.module, _blend(self.dense, half))
        risks["blended"] = self._check()
        choice = min(BN_CHOICES, key=lambda c: (risks[c], BN_CHOICES.index(c)))
        batchnorm.load_snapshot(self.module, self.dense)
        if choice != "dense":
            self._reestimate(self.x_tune)  # the chosen kind, from all of D_tune
            if choice == "blended":
                batchnorm.load_snapshot(self.module, _blend(self.dense, batchnorm.snapshot(self.module)))
        self.chosen[choice] += 1
        return {"bn_statistics": choice, "bn_check": {k: float(v) for k, v in risks.items()}}

    def _check(self) -> float:
        """How far the candidate as it is now is from the dense model on the check half (lower is better)."""
        if self.dense_log_probs is None or self.log_probs is None:
            return self.check_risk(self.chk_rows, self.predict(self.x_chk))  # type: ignore[misc]
        cand = self.log_probs(self.x_chk)
        assert cand is not None
        # KL(dense ‖ candidate) per output row (sample or position), averaged
        kl = (self.dense_log_probs.exp() * (self.dense_log_probs - cand)).sum(dim=-1)
        return float(kl.mean())

    def summary(self) -> dict[str, Any]:
        return {"mode": "choose" if self.choosing else "reestimate",
                **({"math": self.math_name} if self.math_name else {}),
                "check": ("KL divergence to the dense outputs" if self.dense_log_probs is not None
                          else "the job's risk") if self.choosing else None,
                "chosen": dict(self.chosen),
                **({"n_estimate": int(self.est_rows.size), "n_check": int(self.chk_rows.size)}
                   if self.choosing else {})}


class CandidateBuilder:
    """Makes the live module a level's candidate in place; restores the dense model on ``reset``."""

    def __init__(self, module: torch.nn.Module, params: list[torch.Tensor], *,
                 originals: list[torch.Tensor] | None = None,
                 reconstructor: Reconstructor | None = None, bn: BatchNormChooser | None = None,
                 finetuner: Finetuner | None = None) -> None:
        """``originals``: copies of the dense weights when the caller already holds them (not copied again)."""
        self.module = module
        self.params = params
        self.originals = originals if originals is not None else [p.detach().clone() for p in params]
        self.bn_dense = batchnorm.snapshot(module)
        self.reconstructor = reconstructor
        self.bn = bn
        self.finetuner = finetuner
        # Chained fine-tuning: the last level built (grid index) and its fine-tuned weights.
        self.chaining = finetuner is not None and finetuner.cfg.chain and reconstructor is None
        self._chain: tuple[int, list[torch.Tensor]] | None = None

    def build(self, keep_masks: list[torch.Tensor], level: int) -> dict[str, Any]:
        """The candidate of grid index ``level`` with ``keep_masks``; returns what was done (for the report).

        With chained fine-tuning a level starts from the fine-tuned weights of the level built just before it
        when that one is lower (masks are nested, so its zeros stay zero), like iterative pruning with
        retraining; otherwise from the dense weights. The engine builds levels in ascending grid order from a
        reset, whatever D_cal says (it only decides whether to go on), so every candidate is still a fixed
        function of D_tune and the grid — and the planned procedure's bisection on D_tune, which builds out of
        order, only plans with the chains it builds, from D_tune too."""
        start = self.originals
        if self.chaining and self._chain is not None and self._chain[0] < level:
            start = self._chain[1]
        apply_masks(self.params, start, keep_masks)
        if self.reconstructor is not None:
            self.reconstructor.apply(self.params, self.originals, keep_masks)
        info: dict[str, Any] = {}
        if self.bn is not None:
            info.update(self.bn.apply())
        if self.finetuner is not None:
            self.finetuner.run(keep_masks, level)
            info["finetune_loss"] = self.finetuner.last_loss
            info["finetune_step"] = self.finetuner.last_kept_step
            if self.chaining:
                self._chain = (level, [p.detach().clone() for p in self.params])
        return info

    def reset(self) -> None:
        """The dense model again (weights and BN statistics); a chain starts afresh."""
        self._chain = None
        restore(self.params, self.originals)
        batchnorm.load_snapshot(self.module, self.bn_dense)

    @torch.no_grad()
    def snapshot(self) -> CandidateState:
        return CandidateState([p.detach().to("cpu", copy=True) for p in self.params],
                              [tuple(t.to("cpu", copy=True) for t in s) for s in batchnorm.snapshot(self.module)])

    @torch.no_grad()
    def load(self, state: CandidateState) -> None:
        for p, w in zip(self.params, state.weights):
            p.data.copy_(w)
        device_bn = [tuple(t.to(ref.device) for t, ref in zip(s, r))
                     for s, r in zip(state.bn, batchnorm.snapshot(self.module))]
        batchnorm.load_snapshot(self.module, device_bn)


__all__ = ["BN_CHOICES", "BatchNormChooser", "CandidateBuilder", "CandidateState", "MIN_TUNE_FOR_CHOICE"]
