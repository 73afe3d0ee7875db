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
                   *, max_factor: int = 64, step: float = 1.02) -> int | None:
    """Calibration size from which the test keeps rejecting this level, at the observed loss frequencies.

    ``losses``: one level's per-sample losses on D_cal, shape (n,), in D_cal's order; m samples are
    the sequence repeated (``np.resize``: the same frequencies, and the same order for wsr). Sizes
    m = n · step^i up to ``max_factor`` × n are tried; the answer is the smallest from which every
    larger one rejects (integer counts make p(m) saw-toothed, so a first dip below ``alpha`` would
    promise too much; between grid sizes a failure can hide, so read it as ± 10 %). None when ``max_factor`` × n does not reject: typically the observed risk is
    not below ε, and then no amount of data certifies.
    """
    arr = np.asarray(losses)
    n = int(arr.shape[0])
    if n == 0:
        return None
    sizes = sorted({int(round(n * step ** i)) for i in range(int(np.ceil(np.log(max_factor) / np.log(step))) + 1)})
    sizes = [m for m in sizes if m <= max_factor * n]
    rejects = [p_value(bound, risk, np.resize(arr, m), epsilon) <= alpha for m in sizes]
    if not rejects[-1]:
        return None
    last_fail = max((i for i, r in enumerate(rejects) if not r), default=-1)
    return sizes[last_fail + 1]


__all__ = ["samples_needed"]
