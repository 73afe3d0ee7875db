"""Evaluate one level: build its candidate → predict → per-sample losses → p-value, empirical risk, bound.

The one step every caller of the grid shares: the engine's test of D_cal (``calibration.engine``), the
planned procedure's plan on D_tune (only losses and risk there: ``planned_sequence.predict_pass`` resizes
the losses to D_cal's size itself) and the benchmarks. The data flow is MAPIE's: predictions →
per-sample losses (``risks``) → p-value (``p_values``); which levels are tested and what is rejected is
the procedure's business (``procedures``), not this module's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .candidates import CandidateBuilder
from .certificate import LevelResult, level_details
from .fast_eval import Predictor
from .masks import NestedMasks
from .p_values import p_value, upper_confidence_bound
from .patterns import PatternMasks
from .risks import empirical_risk, per_sample_losses, prediction_accuracy


@dataclass(frozen=True)
class LevelData:
    """One split as a level is evaluated on it: inputs on the device and what its losses compare against.

    ``dense``: the dense model's top-1 predictions, shape (n_samples,) or (n_samples, positions);
    ``labels``: the same shape, or None (risks relative to the dense model need none); ``mask``: the
    positions the sequence risks count, or None."""

    x: Any
    dense: np.ndarray
    labels: np.ndarray | None = None
    mask: np.ndarray | None = None


@dataclass(frozen=True)
class LevelTest:
    """The test a level faces, fixed before D_cal is seen: H: R(λ) > ε with ``bound`` at per-test level ``alpha``."""

    risk: str
    bound: str
    epsilon: float
    alpha: float


@dataclass
class Candidates:
    """One criterion's candidates: its nested masks, the builder that makes the live module a level's candidate
    in place (``calibration.candidates``, D_tune only) and the predictor that runs it."""

    masks: NestedMasks | PatternMasks
    builder: CandidateBuilder
    predictor: Predictor

    def build(self, level: int, sparsity: float) -> dict[str, Any]:
        """Make the live module grid index ``level``'s candidate; what the build chose (``CandidateBuilder.build``)."""
        return self.builder.build(self.masks.keep_masks(sparsity), level)


def evaluate_level(candidates: Candidates, level: int, sparsity: float, data: LevelData, test: LevelTest, *,
                   with_p_value: bool = True, should_stop: Callable[[], bool] | None = None) -> LevelResult:
    """Grid index ``level`` (at ``sparsity``) of one criterion, evaluated on ``data`` under ``test``.

    ``with_p_value`` (testing D_cal): p-value, empirical risk and upper confidence bound; the dense level
    (sparsity 0) is ``data.dense`` itself — under the risks relative to the dense model its risk is 0 by
    definition and no test is spent on it (``tested`` False), under ``error_rate`` it is tested like any
    level. Without (planning on D_tune): losses and empirical risk only; the dense level resets the builder
    (whichever level was built before) and is ``data.dense``, with no second pass. The live module is left as the
    level's candidate (``candidates.builder.snapshot()`` keeps it). The result is not yet ``rejected``:
    that is the procedure's decision over the grid.
    """
    predictor = candidates.predictor
    info: dict[str, Any] | None = None
    if with_p_value and sparsity == 0.0:
        if test.risk != "error_rate":
            return LevelResult(sparsity=sparsity, evaluated=True, empirical_risk=0.0, p_value=0.0, upper_bound=0.0)
        predictions = data.dense
    elif sparsity > 0.0:
        info = candidates.build(level, sparsity)
        predictions = predictor.predict(data.x, should_stop).cpu().numpy()
    else:  # planning: the dense model again (a chain restarts), whose predictions are data.dense already
        candidates.builder.reset()
        predictions = data.dense
    losses = per_sample_losses(test.risk, predictions, data.dense, data.labels, data.mask)
    accuracy = (prediction_accuracy(predictions, data.labels, data.mask)
                if with_p_value and info is not None and data.labels is not None else None)
    if not with_p_value:
        return LevelResult(sparsity=sparsity, evaluated=True, empirical_risk=float(empirical_risk(losses)),
                           details=level_details(info), losses=losses, predictions=predictions, tested=True)
    p = float(p_value(test.bound, test.risk, losses, test.epsilon, alpha=test.alpha))
    risk_hat = float(empirical_risk(losses))
    ucb = float(upper_confidence_bound(test.bound, test.risk, losses, test.alpha, epsilon=test.epsilon))
    return LevelResult(sparsity=sparsity, evaluated=True, empirical_risk=risk_hat, p_value=p, upper_bound=ucb,
                       details=level_details(info), losses=losses, predictions=predictions, accuracy=accuracy,
                       tested=True)


__all__ = ["Candidates", "LevelData", "LevelTest", "evaluate_level"]
