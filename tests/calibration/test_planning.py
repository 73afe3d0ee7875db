"""planning.samples_needed: checked against a brute-force scan with scipy's binomial tail."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from calibration.p_values import p_value
from calibration.planning import samples_needed


def _spread(n: int, ones: int) -> np.ndarray:
    """n losses with exactly ``ones`` ones, evenly spread."""
    losses = np.zeros(n, dtype=np.int8)
    losses[np.linspace(0, n - 1, ones).astype(int)] = 1
    return losses


@pytest.mark.parametrize(("n", "ones", "eps", "alpha"), [(200, 6, 0.05, 0.1), (300, 24, 0.1, 0.05),
                                                          (1000, 15, 0.02, 0.1)])
def test_binomial_estimate_is_where_rejection_becomes_permanent(n: int, ones: int, eps: float, alpha: float) -> None:
    """Independent: scipy's binomial tail at every integer size up to 64 n; the estimate must lie just past
    the last size that does not reject, up to the 2 % grid it searches (the saw-tooth of integer counts
    can hide a last failure between two grid sizes: within 10 %), and reject there."""
    losses = _spread(n, ones)
    m = samples_needed("binomial", "disagreement", losses, eps, alpha)
    sizes = np.arange(n, 64 * n + 1)
    counts = ones * (sizes // n) + np.array([int(losses[: r].sum()) for r in sizes % n])
    p = stats.binom.cdf(counts, sizes, eps)
    assert p[-1] <= alpha
    stable = int(sizes[np.flatnonzero(p > alpha).max()]) + 1  # from here on every size rejects
    assert p[0] > alpha  # not rejected at n: more data is what it needs
    assert m is not None and stable / 1.1 <= m <= stable * 1.03 + 1, (m, stable)
    assert stats.binom.cdf(ones * (m // n) + int(losses[: m % n].sum()), m, eps) <= alpha


def test_already_rejected_levels_need_no_more_and_hopeless_ones_say_none() -> None:
    low = _spread(2000, 20)  # 1 % against ε = 5 %
    assert samples_needed("binomial", "error_rate", low, 0.05, 0.1) == 2000
    high = _spread(2000, 120)  # 6 %: never below 5 %
    assert samples_needed("binomial", "error_rate", high, 0.05, 0.1) is None
    assert samples_needed("binomial", "error_rate", np.zeros(0, dtype=np.int8), 0.05, 0.1) is None


@pytest.mark.parametrize("bound", ["hb", "wsr", "binomial"])
def test_accuracy_drop_with_every_bound(bound: str) -> None:
    d = np.zeros(200, dtype=np.int8)
    d[::14] = 1  # 15 new errors (7.5 %)
    d[7::100] = -1  # 2 fixed ones
    m = samples_needed(bound, "accuracy_drop", d, 0.1, 0.1)
    assert m is not None and m > 200
    for bigger in (m, int(m * 1.5), 2 * m):
        assert p_value(bound, "accuracy_drop", np.resize(d, bigger), 0.1) <= 0.1
    assert p_value(bound, "accuracy_drop", np.resize(d, int(m / 1.05)), 0.1) > 0.1


@pytest.mark.parametrize(("n", "b", "c", "eps", "alpha"), [(600, 9, 2, 0.02, 0.1), (800, 24, 6, 0.03, 0.05),
                                                            (500, 4, 0, 0.015, 0.1)])
def test_paired_exact_estimate_is_a_size_the_paired_test_rejects_at(n: int, b: int, c: int, eps: float,
                                                                         alpha: float) -> None:
    """paired_exact: at the estimate m, the paired test's own p-value (the rigorous decision, not the quick
    region the search uses) on the counts scaled to m is ≤ α, where at n it was not (the level was not
    certified); m is within 3× of the normal approximation's size; an observed risk above ε gets no estimate."""
    from calibration.paired_test import paired_exact_p_value

    losses = np.zeros(n, dtype=np.int8)
    losses[:b], losses[b:b + c] = 1, -1
    assert paired_exact_p_value(b, c, n, eps, alpha) > alpha
    m = samples_needed("paired_exact", "accuracy_drop", losses, eps, alpha)
    assert m is not None and m > n
    bm, cm = round(b / n * m), round(c / n * m)
    assert paired_exact_p_value(bm, cm, m, eps, alpha) <= alpha
    # the one-sided normal approximation of the same test says m is not absurdly large either
    z = stats.norm.ppf(alpha)
    gap, pc = eps - (b - c) / n, c / n
    assert m <= 3 * z * z * (2 * pc + eps) / gap ** 2 + n
    risky = np.zeros(n, dtype=np.int8)
    risky[: int(eps * n) + 3] = 1
    assert samples_needed("paired_exact", "accuracy_drop", risky, eps, alpha) is None
