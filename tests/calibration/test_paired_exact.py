"""paired_exact: validity by simulation, exact size from the multinomial pmf, agreement with a brute-force sup,
the anchor (it contains the binomial test's rejections), and its wiring into the front door.

References here never call the module's probability code: multinomial pmfs come from scipy.stats (or
gammaln written out), the nuisance sup from a fine grid (a check, never the method).
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from scipy import special, stats

from calibration import paired_test as pt
from calibration.p_values import binomial_p_value, p_value, upper_confidence_bound

EPS = 0.01


def _boundary_nuisance(eps: float) -> list[float]:
    """≥ 8 values of p_c on the boundary p_b = p_c + ε, from 0 to a large p_c."""
    top = (1.0 - eps) / 2.0
    return [0.0, 0.001, 0.003, 0.01, 0.03, 0.1, 0.25, 0.9 * top]


def _region_matrix(bcrit: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (b, c) with b + c ≤ n as flat arrays, and whether the test rejects each."""
    b, c = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    ok = b + c <= n
    b, c = b[ok], c[ok]
    return b, c, b <= bcrit[c]


def _multinomial_logpmf(b: np.ndarray, c: np.ndarray, n: int, pb: float, pc: float) -> np.ndarray:
    r = n - b - c
    pr = 1.0 - pb - pc
    return (special.gammaln(n + 1.0) - special.gammaln(b + 1.0) - special.gammaln(c + 1.0)
            - special.gammaln(r + 1.0) + special.xlogy(b, pb) + special.xlogy(c, pc) + special.xlogy(r, pr))


def _size_on_grid(reject_b: np.ndarray, reject_c: np.ndarray, n: int, eps: float, ts: np.ndarray) -> np.ndarray:
    """P_{t+ε, t}(rejection region) from the multinomial pmf, for each t in ``ts``."""
    return np.array([np.exp(_multinomial_logpmf(reject_b, reject_c, n, t + eps, t)).sum() for t in ts])


# ----------------------------------------------------------------------------- validity


@pytest.mark.parametrize("n", [200, 2000])
@pytest.mark.parametrize("alpha", [0.1, 0.001])
def test_rejection_frequency_on_the_boundary_is_at_most_alpha(n: int, alpha: float) -> None:
    """5000 multinomial draws at each of 8 boundary points: rejection frequency ≤ α + 3 SE."""
    cut = pt.paired_cut(n, EPS, alpha)
    bcrit = cut.final_b_crit()
    rng = np.random.default_rng(20240 + n)
    draws = 5000
    se = math.sqrt(alpha * (1 - alpha) / draws)
    worst = 0.0
    for pc in _boundary_nuisance(EPS):
        pb = pc + EPS
        counts = rng.multinomial(n, [pb, pc, 1.0 - pb - pc], size=draws)
        b, c = counts[:, 0], counts[:, 1]
        freq = float(np.mean(b <= bcrit[c]))
        worst = max(worst, freq)
        assert freq <= alpha + 3 * se, (n, alpha, pc, freq)
    # The test is not trivially conservative either: somewhere on the boundary it rejects at a rate near α.
    assert worst >= 0.3 * alpha or alpha < 0.01


def test_the_simulation_harness_catches_an_invalid_test() -> None:
    """A plain Z ≤ Φ⁻¹(α) cut (normal theory, no sup) over-rejects at p_c = 0 for n = 200: the harness sees it."""
    n, alpha, draws = 200, 0.1, 5000
    z = special.ndtri(alpha)
    rng = np.random.default_rng(1)
    counts = rng.multinomial(n, [EPS, 0.0, 1.0 - EPS], size=draws)
    b, c = counts[:, 0], counts[:, 1]
    naive = (b - c - n * EPS) / np.sqrt(2 * c + n * EPS) <= z + 0.1
    assert np.mean(naive) > alpha + 3 * math.sqrt(alpha * (1 - alpha) / draws)


@pytest.mark.parametrize("n,alpha", [(60, 0.1), (150, 0.05), (300, 0.1), (300, 0.01)])
def test_exact_size_from_the_multinomial_pmf(n: int, alpha: float) -> None:
    """Size on a fine nuisance grid (scipy/gammaln pmf summed over the whole region) ≤ α, and ≤ the
    module's rigorous bound on it."""
    cut = pt.paired_cut(n, EPS, alpha)
    b, c, rej = _region_matrix(cut.final_b_crit(), n)
    ts = np.concatenate([np.linspace(0.0, 0.05, 201), np.linspace(0.05, (1 - EPS) / 2, 200)])
    size = _size_on_grid(b[rej], c[rej], n, EPS, ts)
    assert size.max() <= alpha, (n, alpha, size.max())
    assert size.max() <= cut.proved[cut.settle()] + 1e-12
    # scipy.stats agrees with the gammaln pmf at a few points
    for t in (0.0, 0.02, 0.3):
        ref = stats.multinomial.pmf(np.stack([b[rej], c[rej], n - b[rej] - c[rej]], 1), n, [t + EPS, t, 1 - 2 * t - EPS])
        assert ref.sum() == pytest.approx(_size_on_grid(b[rej], c[rej], n, EPS, np.array([t]))[0], rel=1e-9)


@pytest.mark.parametrize("n,alpha,eps", [(40, 0.1, 0.05), (100, 0.1, 0.01), (120, 0.01, 0.03)])
def test_decision_agrees_with_a_brute_force_sup(n: int, alpha: float, eps: float) -> None:
    """For every (b, c): the module's decision equals 'sup over a fine nuisance grid of P(smallest family
    region containing (b, c)) ≤ α', except within the grid's resolution of α. Never rejects where the grid
    already shows a size > α (that would be invalid)."""
    cut = pt.paired_cut(n, eps, alpha)
    k_star = cut.settle()
    ts = np.linspace(0.0, (1 - eps) / 2, 1501)
    allb, allc = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    ok = allb + allc <= n
    allb, allc = allb[ok], allc[ok]
    logpmf = np.stack([_multinomial_logpmf(allb, allc, n, t + eps, t) for t in ts])  # (grid, points)
    pmf = np.exp(logpmf)
    # Brute force: sizes of the family's regions around the boundary, region by region.
    checked = 0
    for k in range(max(-1, k_star - 30), min(cut.k_top, k_star + 30) + 1):
        bcrit = cut.region(k)
        size = float(pmf[:, allb <= bcrit[allc]].sum(axis=1).max())
        # Points whose smallest region is k.
        prev = cut.region(k - 1) if k >= 0 else np.full(n + 1, -1)
        new = (allb <= bcrit[allc]) & (allb > prev[allc])
        if not new.any():
            continue
        decisions = {cut.rejects(int(b), int(c)) for b, c in zip(allb[new][:5], allc[new][:5])}
        assert len(decisions) == 1
        mine = decisions.pop()
        if size > alpha:
            assert not mine, (k, size)
        elif size < alpha * (1 - 1e-3):
            assert mine, (k, size)
        checked += 1
    assert checked >= 4
    assert cut.exact


@pytest.mark.parametrize("n,alpha,eps", [(80, 0.1, 0.02), (150, 0.05, 0.01), (200, 0.01, 0.03)])
def test_per_observation_decisions_agree_with_a_brute_force_sup_in_any_order(n: int, alpha: float, eps: float) -> None:
    """Each observation gets its own rigorous decision on its own region (no settle first), asked in a
    random order on a fresh cut: rejected ⇒ the brute-force size of its region is ≤ α (validity), and
    clearly-below-α regions are rejected (power); the decisions form a lower set in the family's k."""
    cut = pt.PairedCut(n, eps, alpha)
    ts = np.linspace(0.0, (1 - eps) / 2, 601)
    allb, allc = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    ok = allb + allc <= n
    allb, allc = allb[ok], allc[ok]
    pmf = np.exp(np.stack([_multinomial_logpmf(allb, allc, n, t + eps, t) for t in ts]))
    rng = np.random.default_rng(11)
    # one observation per region of the family around the band (a point of region k not in k − 1, or of
    # the anchor), and a few far inside and outside; asked in a random order
    obs = []
    for k in range(max(0, cut.k_lo - 20), min(cut.k_top, cut.k_hi + 20) + 1):
        new = (allb <= cut.region(k)[allc]) & (allb > cut.region(k - 1)[allc])
        if new.any():
            i = int(rng.choice(np.flatnonzero(new)))
            obs.append((int(allb[i]), int(allc[i])))
    obs += [(0, 0), (max(cut.k_alpha, 0), 0), (n // 2, 0), (int(3 * n * eps), 2)]
    obs = [obs[i] for i in rng.permutation(len(obs))]
    decided: dict[int, bool] = {}
    for b, c in obs:
        k = cut.k_of(b, c)
        mine = cut.rejects(b, c)
        if 0 <= k <= cut.k_top:
            bcrit = cut.region(k)
            size = float(pmf[:, allb <= bcrit[allc]].sum(axis=1).max())
            if mine:
                assert size <= alpha * (1 + 1e-6), (b, c, k, size)  # the grid is a lower bound of the sup
            elif size < alpha * (1 - 1e-3):
                raise AssertionError(f"not rejected although size {size} < α: {(b, c, k)}")
            assert (pt.paired_exact_p_value(b, c, n, eps, alpha) <= alpha) == mine
        decided[k] = mine
    ks = sorted(decided)
    flags = [decided[k] for k in ks]
    assert flags == sorted(flags, reverse=True), "decisions must be a lower set in k"
    assert any(flags) and not all(flags)


# ----------------------------------------------------------------------------- the anchor and the region


def test_anchored_region_contains_the_binomial_region() -> None:
    for n in (50, 200, 800, 3000):
        for eps in (0.005, 0.01, 0.05):
            for alpha in (0.1, 0.01, 0.001):
                cut = pt.paired_cut(n, eps, alpha)
                bcrit = cut.final_b_crit()
                k_bin = max((k for k in range(n + 1) if binomial_p_value(k, n, eps) <= alpha), default=-1)
                assert cut.k_alpha == k_bin
                cs = np.arange(0, n + 1 - max(k_bin, 0))
                assert np.all(bcrit[cs] >= k_bin), (n, eps, alpha)
                # and the p-values say so too
                if k_bin >= 0:
                    assert pt.paired_exact_p_value(k_bin, 0, n, eps, alpha) <= alpha


def test_region_is_monotone_and_beats_the_binomial_where_pruning_fixes_errors() -> None:
    cut = pt.paired_cut(2000, EPS, 0.1)
    bcrit = cut.final_b_crit()
    cs = np.arange(2001)
    uncapped = bcrit < 2000 - cs  # beyond the cap b ≤ n − c every feasible b is rejected anyway
    assert uncapped[:900].all()
    assert np.all(np.diff(bcrit[uncapped]) >= 0)  # an upper set in c (the proof needs it)
    # With 20 fixed errors, far more new errors are allowed than the binomial's k_α.
    assert bcrit[20] > cut.k_alpha + 10


def test_probability_recurrence_matches_the_incomplete_beta() -> None:
    rng = np.random.default_rng(3)
    for n in (30, 500, 5000):
        k_alpha, _ = pt._k_alpha(n, EPS, 0.1)
        for z in (-3.0, -1.3, 0.7):
            bcrit = pt._bcrit_for(n, EPS, k_alpha, z)
            t = np.concatenate([[0.0, (1 - EPS) / 2], rng.random(20) * 0.49])
            pb, pc = t + EPS, t
            sd = np.sqrt(n * pc * (1 - pc))
            c0 = np.clip(np.floor(n * pc - 7 * sd - 3), 0, n).astype(np.int64)
            c1 = np.clip(np.ceil(n * pc + 7 * sd + 3), 0, n).astype(np.int64)
            lg = special.gammaln(n + 1.0)
            fast = pt._probs_chunk(n, bcrit, pb, pc, c0, c1, lg)[0]
            ref = pt._probs_chunk_direct(n, bcrit, pb, pc, c0, c1, lg)[0]
            np.testing.assert_allclose(fast, ref, rtol=1e-9, atol=1e-15)


# ----------------------------------------------------------------------------- p-values and bounds


def test_p_value_is_consistent_with_the_decision_and_valid_at_its_level() -> None:
    n, alpha = 400, 0.1
    cut = pt.paired_cut(n, EPS, alpha)
    rng = np.random.default_rng(5)
    for b, c in [(0, 0), (2, 0), (4, 3), (8, 5), (12, 10), (6, 0), (20, 5), (40, 2)] + [
            tuple(x) for x in rng.integers(0, 25, (20, 2))]:
        p = pt.paired_exact_p_value(int(b), int(c), n, EPS, alpha)
        assert 0.0 <= p <= 1.0
        assert (p <= alpha) == cut.rejects(int(b), int(c)), (b, c, p)
    # The exact size of {p ≤ u} stays ≤ u for a smaller u too (valid at every level, not only at α).
    b, c, _ = _region_matrix(np.zeros(n + 1, dtype=np.int64), 60)
    n_small = 60
    cut60 = pt.paired_cut(n_small, 0.05, 0.1)
    ps = np.array([pt.paired_exact_p_value(int(x), int(y), n_small, 0.05, 0.1) if x <= 12 else 1.0
                   for x, y in zip(b, c)])
    ts = np.linspace(0, 0.475, 300)
    for u in (0.1, 0.05, 0.02):
        sel = ps <= u
        assert _size_on_grid(b[sel], c[sel], n_small, 0.05, ts).max() <= u + 1e-12, u
    cut60.settle()
    assert cut60.exact


def test_front_door_counts_new_and_fixed_errors() -> None:
    losses = np.array([1] * 7 + [-1] * 12 + [0] * 481, dtype=np.int8)
    p = p_value("paired_exact", "accuracy_drop", losses, EPS, alpha=0.1)
    assert p == pt.paired_exact_p_value(7, 12, 500, EPS, 0.1)
    assert p_value("auto", "accuracy_drop", losses, EPS, alpha=0.1) == p
    # the binomial on F = 7 new errors at n = 500 does not certify; the paired test, using the 12 fixes, does
    assert binomial_p_value(7, 500, EPS) > 0.1 and p <= 0.1


def test_upper_bound_matches_the_decision() -> None:
    n, alpha = 1000, 0.1
    for b, c in [(3, 0), (8, 2), (12, 8), (15, 3), (30, 10), (60, 5)]:
        losses = np.array([1] * b + [-1] * c + [0] * (n - b - c), dtype=np.int8)
        u = upper_confidence_bound("paired_exact", "accuracy_drop", losses, alpha, epsilon=EPS)
        rejected = pt.paired_cut(n, EPS, alpha).rejects(b, c)
        assert (u <= EPS) == rejected, (b, c, u)
        assert u > (b - c) / n  # above the empirical risk
        assert u < 1.0


def test_speed_per_job_and_large_n() -> None:
    """A job's worth of tests at n = 10,000 (one level per 1% of sparsity until the first stop), and a
    calibration at n = 100,000 that works (budget generous: this 2-core CI box is shared)."""
    pt.paired_cut.cache_clear()
    pt._rejects_at.cache_clear()
    n = 10_000
    t0 = time.perf_counter()
    for j in range(1, 40):
        b, c = int(n * 0.0004 * j ** 1.5), int(n * 0.002 * min(j, 10) / 10)
        p = pt.paired_exact_p_value(b, c, n, EPS, 0.1)
        pt.paired_exact_upper_bound(b, c, n, EPS, 0.1)
        if p > 0.1:
            break
    # and one observation in the band between the proved and the disproved region (its own decision)
    cut = pt.paired_cut(n, EPS, 0.1)
    c = 30
    b = int(cut.region((cut.k_lo + cut.k_hi) // 2)[c])
    pt.paired_exact_p_value(b, c, n, EPS, 0.1)
    elapsed = time.perf_counter() - t0
    assert elapsed < 4.0, elapsed  # ≈ 0.5 s on an idle core
    t0 = time.perf_counter()
    cut = pt.paired_cut(100_000, EPS, 0.1)
    assert cut.rejects(900, 50) and not cut.rejects(1100, 50)
    assert pt.paired_exact_upper_bound(900, 50, 100_000, EPS, 0.1) <= EPS
    assert time.perf_counter() - t0 < 30.0
