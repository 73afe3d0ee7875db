"""p-values and per-sample losses against independent computations (scipy.stats, fractions).

The library computes binomial tails through scipy.special; here every reference goes through
scipy.stats or plain Python, so a shared mistake cannot hide.
"""

from __future__ import annotations

import math
import time
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats

from calibration.errors import ConfigError, DataError
from calibration.p_values import (
    binomial_p_value,
    hb_p_value,
    p_value,
    resolve_bound,
    upper_confidence_bound,
    wsr_p_value,
    wsr_p_value_batch,
)
from calibration.risks import empirical_risk, per_sample_losses

RISKS = ("accuracy_drop", "disagreement", "error_rate")
BOUNDS = ("binomial", "hb", "wsr")


# ----------------------------------------------------------------------------- references


def ref_binomial(k: int, n: int, eps: float) -> float:
    return float(stats.binom.cdf(k, n, eps))


def ref_hb(s: Fraction, n: int, eps: float, *, binary: bool) -> float:
    """Bates et al. 2021, Prop. 3, written out from the exact loss sum s = Σ L_i (a Fraction)."""
    r_hat = float(s / n)
    a = min(r_hat, eps)

    def xlogx_over(u: float, v: float) -> float:
        return 0.0 if u == 0.0 else u * np.log(u / v)

    h1 = xlogx_over(a, eps) + xlogx_over(1.0 - a, 1.0 - eps)
    hoeffding = float(np.exp(-n * h1))
    bentkus = float(stats.binom.cdf(math.ceil(s), n, eps))  # math.ceil on a Fraction is exact
    if not binary:
        bentkus *= np.e
    return min(1.0, hoeffding, bentkus)


def ref_wsr(x: np.ndarray, eps: float, delta_ref: float = 0.1, c: float = 0.75) -> float:
    """Plain-Python loop version of the one-sided WSR predictable plug-in capital."""
    n = len(x)
    s = 0.0
    ss = 0.0
    sigma2_prev = 0.25
    logk = 0.0
    best = 0.0
    for t, xi in enumerate(map(float, x), start=1):
        lam = min(math.sqrt(2 * math.log(1 / delta_ref) / (n * sigma2_prev)), c / (1 - eps))
        assert lam >= 0
        logk += math.log(1 + lam * (eps - xi))
        best = max(best, logk)
        s += xi
        mu = (0.5 + s) / (t + 1)
        ss += (xi - mu) ** 2
        sigma2_prev = (0.25 + ss) / (t + 1)
    return min(1.0, math.exp(-best))


def two_sided_wsr(x: np.ndarray, eps: float, delta_ref: float = 0.1) -> float:
    """The *invalid* variant: hedged capital that also bets on L > ε (as in public LTT code)."""
    n = len(x)
    t = np.arange(1, n + 1)
    mu = (0.5 + np.cumsum(x)) / (t + 1)
    s2 = (0.25 + np.cumsum((x - mu) ** 2)) / (t + 1)
    s2p = np.concatenate([[0.25], s2[:-1]])
    lam = np.sqrt(2 * np.log(1 / delta_ref) / (n * s2p))
    up = np.cumsum(np.log1p(np.minimum(lam, 0.75 / (1 - eps)) * (eps - x)))
    down = np.cumsum(np.log1p(-np.minimum(lam, 0.75 / eps) * (eps - x)))
    k = 0.5 * np.exp(up) + 0.5 * np.exp(down)
    return float(min(1.0, 1.0 / k.max()))


# ----------------------------------------------------------------------------- binomial


@pytest.mark.parametrize(
    "k,n,eps",
    [
        (0, 1, 0.5),
        (1, 1, 0.5),
        (0, 1, 1e-6),
        (0, 10, 0.1),
        (10, 10, 0.1),
        (3, 100, 0.05),
        (5, 100, 0.05),
        (0, 1000, 0.01),
        (1, 1000, 1e-4),
        (999, 1000, 0.999),
        (500, 1000, 0.999),
        (10, 10_000, 1e-3),
        (9, 10_000, 1e-3),
        (0, 100_000, 1e-5),
        (973, 100_000, 0.01),
        (50_000, 100_000, 0.5),
        (99_999, 100_000, 0.99999),
        (7, 50, 0.9),
        (3, 3, 1e-12),
    ],
)
def test_binomial_matches_scipy_stats(k: int, n: int, eps: float) -> None:
    got = binomial_p_value(k, n, eps)
    want = ref_binomial(k, n, eps)
    assert 0.0 <= got <= 1.0
    assert got == pytest.approx(want, rel=1e-9, abs=1e-300)


def test_binomial_random_grid_matches_scipy_stats() -> None:
    rng = np.random.default_rng(1)
    for _ in range(300):
        n = int(rng.integers(1, 5000))
        k = int(rng.integers(0, n + 1))
        eps = float(rng.uniform(1e-4, 0.9999))
        assert binomial_p_value(k, n, eps) == pytest.approx(ref_binomial(k, n, eps), rel=1e-8, abs=1e-300)


def test_binomial_edge_cases() -> None:
    assert binomial_p_value(5, 5, 0.3) == 1.0  # k = n: no evidence at all
    assert binomial_p_value(0, 0, 0.3) == 1.0  # no data
    assert binomial_p_value(0, 1, 0.25) == pytest.approx(0.75)
    assert binomial_p_value(np.int64(2), np.int64(10), 0.2) == pytest.approx(ref_binomial(2, 10, 0.2))
    with pytest.raises(DataError):
        binomial_p_value(3.0, 10, 0.1)  # counts must be integers, never a float mean × n
    with pytest.raises(DataError):
        binomial_p_value(11, 10, 0.1)
    for bad in (0.0, 1.0, -0.1, float("nan")):
        with pytest.raises(ConfigError):
            binomial_p_value(1, 10, bad)


def test_binomial_monotone_in_k_and_eps() -> None:
    ps = [binomial_p_value(k, 200, 0.05) for k in range(0, 30)]
    assert all(a <= b for a, b in zip(ps, ps[1:]))
    qs = [binomial_p_value(8, 200, e) for e in np.linspace(0.01, 0.2, 40)]
    assert all(a >= b for a, b in zip(qs, qs[1:]))


# ----------------------------------------------------------------------------- Hoeffding–Bentkus


@pytest.mark.parametrize("n", [1, 2, 7, 100, 1000, 100_000])
@pytest.mark.parametrize("eps", [1e-4, 0.01, 0.1, 0.5, 0.95])
def test_hb_binary_matches_independent(n: int, eps: float) -> None:
    for k in sorted({0, 1, n // 3, int(n * eps), n - 1, n} - {-1}):
        if not 0 <= k <= n:
            continue
        want = ref_hb(Fraction(k), n, eps, binary=True)
        got = hb_p_value(k, n, eps)
        assert got == pytest.approx(want, rel=1e-9, abs=1e-300), (k, n, eps)
        # For 0/1 losses the Chernoff–Hoeffding term never beats the exact tail.
        assert got == pytest.approx(binomial_p_value(k, n, eps), rel=1e-12, abs=1e-300)


@pytest.mark.parametrize("seed", range(6))
def test_hb_three_valued_matches_independent(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 3000))
    d = rng.choice([-1, 0, 1], size=n, p=[0.05, 0.85, 0.10])
    eps = float(rng.uniform(0.01, 0.3))
    losses = [Fraction(int(v) + 1, 2) for v in d]
    want = ref_hb(sum(losses, Fraction(0)), n, (1 + eps) / 2, binary=False)
    got = p_value("hb", "accuracy_drop", d.astype(np.int8), eps)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-300)
    assert got == hb_p_value(int(np.sum(d + 1)), n, (1 + eps) / 2, 2)


def test_hb_keeps_factor_e_for_three_values() -> None:
    # Hoeffding is ~1 here (r̂ ≈ ε'), so the Bentkus term decides, with its factor e.
    n, total, eps_t = 50, 49, 0.6  # r̂ = 0.49
    tail = ref_binomial(math.ceil(total / 2), n, eps_t)
    hoeff = math.exp(-n * ((0.49 * math.log(0.49 / 0.6)) + 0.51 * math.log(0.51 / 0.4)))
    assert hb_p_value(total, n, eps_t, 2) == pytest.approx(min(1.0, hoeff, math.e * tail), rel=1e-10)
    assert hb_p_value(total, n, eps_t, 2) > tail


def test_hb_ceiling_from_integers_not_float_mean() -> None:
    """Find (total, n) where the float route ceil(n · (total/(2n))) rounds the wrong way."""
    found = None
    for n in range(1, 400):
        for total in range(0, 2 * n + 1, 2):  # even totals: n·r̂ is an exact integer
            r_hat = total / (2 * n)
            if math.ceil(n * r_hat) != total // 2:
                found = (total, n)
                break
        if found:
            break
    assert found is not None, "expected at least one float rounding trap in the search range"
    total, n = found
    eps_t = min(0.999, total / (2 * n) + 0.02)
    exact = min(1.0, math.e * ref_binomial(total // 2, n, eps_t))
    r = total / (2 * n)
    hoeff = math.exp(-n * ((r * math.log(r / eps_t) if r else 0.0) + (1 - r) * math.log((1 - r) / (1 - eps_t))))
    assert hb_p_value(total, n, eps_t, 2) == pytest.approx(min(exact, hoeff), rel=1e-12)


def test_hb_edge_cases() -> None:
    assert hb_p_value(0, 0, 0.1) == 1.0
    assert hb_p_value(10, 10, 0.1) == 1.0
    assert hb_p_value(20, 10, 0.1, 2) == 1.0
    assert 0.0 < hb_p_value(0, 1, 0.5) <= 1.0
    assert hb_p_value(0, 100_000, 1e-3) < 1e-40
    with pytest.raises(DataError):
        hb_p_value(21, 10, 0.1, 2)
    with pytest.raises(DataError):
        hb_p_value(2.5, 10, 0.1, 2)


# ----------------------------------------------------------------------------- WSR


@pytest.mark.parametrize("seed", range(5))
def test_wsr_matches_loop_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 600))
    x = rng.choice([0.0, 0.5, 1.0], size=n, p=[0.1, 0.8, 0.1])
    eps = float(rng.uniform(0.3, 0.7))
    assert wsr_p_value(x, eps) == pytest.approx(ref_wsr(x, eps), rel=1e-9)
    y = (rng.random(n) < 0.05).astype(float)
    assert wsr_p_value(y, 0.1) == pytest.approx(ref_wsr(y, 0.1), rel=1e-9)


def test_wsr_batch_equals_scalar() -> None:
    rng = np.random.default_rng(3)
    x = (rng.random((7, 300)) < 0.04).astype(float)
    batch = wsr_p_value_batch(x, 0.08)
    assert batch.shape == (7,)
    for row, p in zip(x, batch):
        assert p == wsr_p_value(row, 0.08)


def test_wsr_is_one_sided() -> None:
    rng = np.random.default_rng(0)
    n, eps = 1000, 0.1
    below = (rng.random(n) < 0.02).astype(float)  # mean ≪ ε: evidence for R < ε
    above = (rng.random(n) < 0.40).astype(float)  # mean ≫ ε: H0 true, must not reject
    assert wsr_p_value(below, eps) < 1e-6
    assert wsr_p_value(above, eps) == pytest.approx(1.0, abs=1e-12)
    # A two-sided (hedged) test rejects the true null "R ≥ ε" here: that is the invalid one.
    assert two_sided_wsr(above, eps) < 1e-6
    assert two_sided_wsr(below, eps) < 1e-6
    assert wsr_p_value(np.ones(n), eps) == 1.0
    # Same through the front door, on the shifted accuracy_drop scale.
    d_above = rng.choice([-1, 0, 1], size=n, p=[0.0, 0.6, 0.4]).astype(np.int8)
    assert p_value("wsr", "accuracy_drop", d_above, 0.1) == pytest.approx(1.0, abs=1e-12)


def test_wsr_edge_cases() -> None:
    assert wsr_p_value(np.zeros(0), 0.1) == 1.0
    assert 0.0 < wsr_p_value(np.zeros(1), 0.1) <= 1.0
    assert wsr_p_value(np.zeros(100_000), 1e-3) < 1e-6
    assert wsr_p_value(np.zeros(2000), 0.999) < 1e-50
    with pytest.raises(DataError):
        wsr_p_value(np.array([0.0, 1.5]), 0.1)
    with pytest.raises(DataError):
        wsr_p_value(np.array([0.0, np.nan]), 0.1)


def test_wsr_depends_on_order_only_through_the_sequence() -> None:
    x = np.array([1.0] * 20 + [0.0] * 480)
    assert wsr_p_value(x, 0.1) == pytest.approx(ref_wsr(x, 0.1))
    assert wsr_p_value(x[::-1].copy(), 0.1) == pytest.approx(ref_wsr(x[::-1], 0.1))


# ----------------------------------------------------------------------------- front door


def _sample(risk: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if risk == "accuracy_drop":
        return rng.choice([-1, 0, 1], size=n, p=[0.02, 0.9, 0.08]).astype(np.int8)
    return (rng.random(n) < 0.05).astype(np.int8)


@pytest.mark.parametrize("risk", RISKS)
def test_front_door_maps_losses_to_tests(risk: str) -> None:
    rng = np.random.default_rng(11)
    losses = _sample(risk, 500, rng)
    eps = 0.1
    k = int(np.count_nonzero(losses == 1))
    assert p_value("binomial", risk, losses, eps) == pytest.approx(ref_binomial(k, 500, eps), rel=1e-9)
    if risk == "accuracy_drop":
        assert p_value("auto", risk, losses, eps, alpha=0.1) == p_value("paired_exact", risk, losses, eps, alpha=0.1)
    else:
        assert p_value("auto", risk, losses, eps) == p_value("binomial", risk, losses, eps)
    if risk == "accuracy_drop":
        x = (losses.astype(float) + 1) / 2
        e2 = (1 + eps) / 2
        assert p_value("hb", risk, losses, eps) == hb_p_value(int(np.sum(losses, dtype=np.int64) + 500), 500, e2, 2)
        assert p_value("wsr", risk, losses, eps) == pytest.approx(ref_wsr(x, e2), rel=1e-9)
    else:
        assert p_value("hb", risk, losses, eps) == pytest.approx(ref_binomial(k, 500, eps), rel=1e-9)
        assert p_value("wsr", risk, losses, eps) == pytest.approx(ref_wsr(losses.astype(float), eps), rel=1e-9)


def test_front_door_accepts_bool_and_float_losses() -> None:
    a = np.array([0, 1, 0, 0, 0, 0, 0, 0, 0, 0] * 30, dtype=np.int8)
    p = p_value("binomial", "disagreement", a, 0.2)
    assert p_value("binomial", "disagreement", a.astype(bool), 0.2) == p
    assert p_value("binomial", "disagreement", a.astype(float), 0.2) == p


def test_resolve_bound_is_fixed() -> None:
    for risk in RISKS:
        assert resolve_bound("auto", risk) == ("paired_exact" if risk == "accuracy_drop" else "binomial")
        for b in BOUNDS:
            assert resolve_bound(b, risk) == b
    assert resolve_bound("paired_exact", "accuracy_drop") == "paired_exact"
    for risk in ("disagreement", "error_rate"):
        with pytest.raises(ConfigError, match="paired_exact"):
            resolve_bound("paired_exact", risk)
    with pytest.raises(ConfigError, match="alpha"):
        p_value("paired_exact", "accuracy_drop", np.zeros(10, dtype=np.int8), 0.1)


def test_unknown_names_raise_config_error() -> None:
    x = np.zeros(10, dtype=np.int8)
    with pytest.raises(ConfigError, match="binomial.*hb.*wsr"):
        p_value("clopper", "disagreement", x, 0.1)
    with pytest.raises(ConfigError, match="accuracy_drop.*disagreement.*error_rate"):
        p_value("binomial", "top5", x, 0.1)
    with pytest.raises(ConfigError, match="auto"):
        resolve_bound("best", "disagreement")
    with pytest.raises(ConfigError):
        p_value("binomial", "disagreement", x, 1.5)


def test_front_door_rejects_bad_losses() -> None:
    with pytest.raises(DataError):
        p_value("binomial", "disagreement", np.array([0, 1, 2]), 0.1)
    with pytest.raises(DataError):
        p_value("binomial", "disagreement", np.array([0, -1]), 0.1)
    with pytest.raises(DataError):
        p_value("hb", "accuracy_drop", np.array([0, 2]), 0.1)
    with pytest.raises(DataError):
        p_value("wsr", "error_rate", np.array([0.0, 0.5]), 0.1)
    with pytest.raises(DataError):
        p_value("wsr", "error_rate", np.zeros((2, 2)), 0.1)
    assert p_value("wsr", "error_rate", np.zeros(0, dtype=np.int8), 0.1) == 1.0


def test_p_value_is_fast() -> None:
    rng = np.random.default_rng(0)
    for risk in RISKS:
        losses = _sample(risk, 10_000, rng)
        for bound in BOUNDS:
            p_value(bound, risk, losses, 0.05)
            best = min(_timed(bound, risk, losses) for _ in range(5))
            assert best < 0.010, (bound, risk, best)


def _timed(bound: str, risk: str, losses: np.ndarray) -> float:
    t0 = time.perf_counter()
    p_value(bound, risk, losses, 0.05)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- UCB


def test_binomial_ucb_is_clopper_pearson() -> None:
    rng = np.random.default_rng(5)
    for risk in ("disagreement", "error_rate", "accuracy_drop"):
        losses = _sample(risk, 800, rng)
        k = int(np.count_nonzero(losses == 1))
        cp = float(stats.beta.ppf(0.9, k + 1, 800 - k))
        assert upper_confidence_bound("binomial", risk, losses, 0.1) == pytest.approx(cp, abs=1e-7)
        if risk != "accuracy_drop":
            assert upper_confidence_bound("auto", risk, losses, 0.1) == pytest.approx(cp, abs=1e-7)


@pytest.mark.parametrize("bound", BOUNDS)
@pytest.mark.parametrize("risk", RISKS)
def test_ucb_inverts_p_value(bound: str, risk: str) -> None:
    rng = np.random.default_rng(7)
    losses = _sample(risk, 1000, rng)
    u = upper_confidence_bound(bound, risk, losses, 0.1)
    r_hat = empirical_risk(losses)
    assert u > r_hat
    assert u < 1.0
    assert p_value(bound, risk, losses, u + 1e-6) <= 0.1
    if bound != "wsr":  # binomial and hb are monotone in ε
        assert p_value(bound, risk, losses, u - 1e-6) > 0.1


def test_ucb_without_evidence_is_top() -> None:
    ones = np.ones(20, dtype=np.int8)
    assert upper_confidence_bound("binomial", "error_rate", ones, 0.1) == 1.0
    assert upper_confidence_bound("hb", "accuracy_drop", ones, 0.1) == 1.0


# ----------------------------------------------------------------------------- risks


def test_per_sample_losses() -> None:
    y = np.array([0, 1, 2, 3, 0, 1])
    dense = np.array([0, 1, 2, 0, 1, 1])  # wrong at 3, 4
    pruned = np.array([0, 2, 2, 3, 1, 0])  # wrong at 1, 4, 5; fixes 3
    d = per_sample_losses("accuracy_drop", pruned, dense, y)
    assert d.dtype == np.int8 and d.shape == (6,)
    assert d.tolist() == [0, 1, 0, -1, 0, 1]
    assert per_sample_losses("disagreement", pruned, dense, None).tolist() == [0, 1, 0, 1, 0, 1]
    assert per_sample_losses("error_rate", pruned, dense, y).tolist() == [0, 1, 0, 0, 1, 1]
    assert empirical_risk(d) == pytest.approx(1 / 6)
    # E[D] = acc(dense) − acc(pruned)
    assert empirical_risk(d) == pytest.approx(np.mean(dense == y) - np.mean(pruned == y))
    # D ≤ A and D ≤ F pointwise
    a = per_sample_losses("disagreement", pruned, dense, y)
    assert np.all(d <= a)


def test_per_sample_losses_errors() -> None:
    p = np.array([0, 1])
    for risk in ("accuracy_drop", "error_rate"):
        with pytest.raises(ConfigError, match="labels"):
            per_sample_losses(risk, p, p, None)
    with pytest.raises(ConfigError, match="accuracy_drop.*disagreement.*error_rate"):
        per_sample_losses("top5", p, p, p)
    with pytest.raises(DataError):
        per_sample_losses("disagreement", p, np.array([0, 1, 2]), None)
    with pytest.raises(DataError):
        per_sample_losses("disagreement", np.zeros((2, 3)), p, None)
    with pytest.raises(DataError):
        empirical_risk(np.zeros(0, dtype=np.int8))


def test_wsr_bets_are_tuned_to_the_level_in_use() -> None:
    """At a Bonferroni-sized level, bets tuned for that level reject more often than bets tuned for 0.1."""
    rng = np.random.default_rng(8)
    eps, alpha, n = 0.02, 0.0005, 3000
    d = rng.choice([-1, 0, 1], size=(200, n), p=[0.02, 0.96, 0.02]).astype(np.int8)  # R = 0 < ε
    x = (d.astype(float) + 1) / 2
    tuned = wsr_p_value_batch(x, (1 + eps) / 2, delta_ref=alpha)
    untuned = wsr_p_value_batch(x, (1 + eps) / 2)
    assert np.mean(tuned <= alpha) > np.mean(untuned <= alpha) + 0.05
    # the front door passes the level through
    assert p_value("wsr", "accuracy_drop", d[0], eps, alpha=alpha) == pytest.approx(tuned[0], rel=1e-12)
    assert p_value("wsr", "accuracy_drop", d[0], eps) == pytest.approx(untuned[0], rel=1e-12)
