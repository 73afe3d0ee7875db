"""Family-wise error control over the sparsity grid (SPEC §1; LTT, Angelopoulos et al. 2021).

Given valid p-values p_1 … p_K for H_j: R(λ_j) > ε on a grid fixed before D_cal is seen,
a procedure returns the set of rejected hypotheses with P(any true H_j rejected) ≤ δ, so the
certified level λ̂ satisfies R(λ̂) ≤ ε with probability ≥ 1 − δ.

- ``fixed_sequence`` (LTT §4, Bauer 1991): test λ_1 < λ_2 < … in order at level δ each and stop
  at the first p_j > δ. No multiplicity correction; valid for any risk curve, monotone or not,
  because the first true null met is the only one that can end the run.
- ``bonferroni``: reject every p_j ≤ δ/K.
- ``planned`` (``planned_sequence.py``): fixed-sequence over a short ascending sequence that D_tune
  chose (dense where the test should stop); the levels off it are never tested on D_cal.

MAPIE-style: a small base class with one abstract step (``_reject``), a string ``name`` per
member, and ``get_procedure(name)``. Shapes: p_values (n_levels,), rejected (n_levels,) bool.
A NaN p-value means "not evaluated" (fixed sequence stopped earlier) and is never rejected.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from .errors import ConfigError


def _delta(delta: float) -> float:
    if isinstance(delta, bool) or not isinstance(delta, (int, float, np.floating, np.integer)):
        raise ConfigError(f"The 'delta' parameter must be a number in (0, 1). Got {delta!r}.")
    d = float(delta)
    if not (math.isfinite(d) and 0.0 < d < 1.0):
        raise ConfigError(f"The 'delta' parameter must be a number in the open interval (0, 1). Got {delta!r}.")
    return d


def _p_array(p_values: np.ndarray) -> np.ndarray:
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1:
        raise ConfigError(f"p_values must have shape (n_levels,). Got {p.shape}.")
    return p


class Procedure(ABC):
    """A multiple-testing rule over the grid; subclasses implement ``_reject`` only."""

    name: ClassVar[str]
    stops_early: ClassVar[bool]  # True: levels after the first non-rejection need no evaluation

    @abstractmethod
    def _reject(self, p: np.ndarray, delta: float) -> np.ndarray:
        """Bool array (n_levels,) of rejections; ``p`` may contain NaN (= not evaluated)."""

    def rejected(self, p_values: np.ndarray, delta: float) -> np.ndarray:
        """Which H_j (R(λ_j) > ε) are rejected, bool array of shape (n_levels,)."""
        p = _p_array(p_values)
        d = _delta(delta)
        if p.size == 0:
            return np.zeros(0, dtype=bool)
        out = np.asarray(self._reject(p, d), dtype=bool)
        return out & ~np.isnan(p)

    def level_alpha(self, delta: float, n_levels: int) -> float:
        """The p-value at or below which one more level would be rejected (what a level must reach)."""
        return _delta(delta)

    def continues(self, p_value: float, delta: float) -> bool:
        """Whether testing should go on to the next level after seeing ``p_value``."""
        return (not self.stops_early) or (not math.isnan(p_value) and p_value <= _delta(delta))

    def select(self, rejected: np.ndarray, sparsities: np.ndarray) -> int | None:
        """Index of the certified level, or None when nothing is rejected.

        fixed_sequence: the last level of the leading run of rejections; bonferroni: the
        rejected level with the largest sparsity. ``rejected`` and ``sparsities`` (n_levels,).
        """
        r = np.asarray(rejected, dtype=bool)
        s = np.asarray(sparsities, dtype=np.float64)
        if r.ndim != 1 or s.shape != r.shape:
            raise ConfigError(
                f"rejected and sparsities must both have shape (n_levels,). Got {r.shape} and {s.shape}."
            )
        if not r.any():
            return None
        if self.stops_early:
            if not r[0]:
                return None
            run = int(np.argmin(r)) if not r.all() else r.size  # first False ends the run
            return run - 1
        idx = np.flatnonzero(r)
        return int(idx[np.argmax(s[idx])])


class FixedSequence(Procedure):
    """Test in ascending sparsity at level δ; stop at the first p_j > δ (or NaN)."""

    name = "fixed_sequence"
    stops_early = True

    def _reject(self, p: np.ndarray, delta: float) -> np.ndarray:
        ok = p <= delta  # NaN compares False
        return np.logical_and.accumulate(ok)


class Bonferroni(Procedure):
    """Reject every p_j ≤ δ/K, K = number of levels in the grid (evaluated or not)."""

    name = "bonferroni"
    stops_early = False

    def _reject(self, p: np.ndarray, delta: float) -> np.ndarray:
        return p <= delta / p.size

    def level_alpha(self, delta: float, n_levels: int) -> float:
        return _delta(delta) / max(1, n_levels)


PROCEDURES: dict[str, type[Procedure]] = {cls.name: cls for cls in (FixedSequence, Bonferroni)}


def get_procedure(name: str) -> Procedure:
    """The procedure called ``name``, or ConfigError naming the valid ones."""
    from . import planned_sequence  # noqa: F401  (registers "planned"; it builds on this module)

    if not isinstance(name, str) or name not in PROCEDURES:
        valid = ", ".join(repr(k) for k in PROCEDURES)
        raise ConfigError(f"The 'procedure' parameter must be one of {valid}. Got {name!r}.")
    return PROCEDURES[name]()


def split_delta(delta: float, n_criteria: int) -> float:
    """δ per criterion when C criteria are certified in one job (Bonferroni): δ / C.

    The best of C certificates is valid at level δ by the union bound.
    """
    d = _delta(delta)
    if isinstance(n_criteria, bool) or not isinstance(n_criteria, (int, np.integer)) or n_criteria < 1:
        raise ConfigError(f"n_criteria must be an integer ≥ 1. Got {n_criteria!r}.")
    return d / int(n_criteria)


__all__ = [
    "Bonferroni",
    "FixedSequence",
    "PROCEDURES",
    "Procedure",
    "get_procedure",
    "split_delta",
]
