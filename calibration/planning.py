"""How much calibration data would certify the next level? A planning estimate for the report.

The level that stopped the certification (the first one above λ̂ that was not rejected) failed
either because its risk is too high or because n was too small to show that it is low enough.
:func:`samples_needed` tells the two apart: it asks how many calibration samples the same test
would need to reject that level *if its losses kept the frequencies observed on D_cal*. The
answer is an estimate for planning the next run (collect more data, or accept a larger ε), never
part of the guarantee: a new run on new data is what certifies.
"""

from __future__ import annotations

import numpy as np

from .p_values import p_value


def samples_needed(bound: str, risk: str, losses: np.ndarray, epsilon: float, alpha: float,
                   *, max_factor: int = 64, step: float = 1.02, settle: float = 1.25) -> int | None:
    """Calibration size from which the test keeps rejecting this level, at the observed loss frequencies.

    ``losses``: one level's per-sample losses on D_cal, shape (n,), in D_cal's order; m samples are
    the sequence repeated (``np.resize``: the same frequencies, and the same order for wsr). Sizes
    m = n · step^i are tried in ascending order; the answer is the first from which every size up to
    ``settle`` × m rejects too (integer counts make p(m) saw-toothed, so a first dip below ``alpha``
    would promise too much; a failure can still hide between grid sizes, so read it as ± 10 %). The
    scan stops there, so its cost grows with the answer, not with ``max_factor``. None when no size
    up to ``max_factor`` × n settles: typically the observed risk is not below ε, and then no
    amount of data certifies.
    """
    arr = np.asarray(losses)
    n = int(arr.shape[0])
    if n == 0:
        return None
    if bound == "paired_exact":
        return _paired_samples_needed(arr, epsilon, alpha, max_factor=max_factor)
    first_ok: int | None = None
    m = float(n)
    while m <= max_factor * n:
        size = int(round(m))
        if p_value(bound, risk, np.resize(arr, size), epsilon, alpha=alpha) <= alpha:
            first_ok = size if first_ok is None else first_ok
            if size >= settle * first_ok:
                return first_ok
        else:
            first_ok = None
        m = max(m * step, m + 1)
    return first_ok if first_ok is not None and first_ok * settle > max_factor * n else None


def _paired_samples_needed(arr: np.ndarray, epsilon: float, alpha: float, *, max_factor: int) -> int | None:
    """paired_exact: solve Z(m·p̂_b, m·p̂_c) = z*_α(n) for m, then confirm with the proved region at m.

    Each size needs its own calibration, so instead of a scan the closed form gives the candidate and a
    few 5 % steps confirm it (the proved region, no per-observation refinement: a little conservative).
    """
    from .paired_test import paired_cut

    n = int(arr.shape[0])
    pb = float(np.count_nonzero(arr == 1)) / n
    pc = float(np.count_nonzero(arr == -1)) / n
    gap = epsilon - (pb - pc)
    if gap <= 0:
        return None
    cut = paired_cut(n, epsilon, alpha, quick=True)
    z = cut.z_of(max(cut.proved)) if max(cut.proved) >= 0 else -3.0
    # (m·gap)/√(m(2p̂_c + ε)) ≥ −z  ⇔  m ≥ z²(2p̂_c + ε)/gap²
    m = int(np.ceil(z * z * (2 * pc + epsilon) / gap ** 2))
    m = max(m, n)
    for _ in range(12):
        if m > max_factor * n:
            return None
        b, c = int(round(pb * m)), int(round(pc * m))
        if paired_cut(m, epsilon, alpha, quick=True).quick_rejects(b, c):
            return m
        m = int(np.ceil(m * 1.05))
    return None


__all__ = ["samples_needed"]
