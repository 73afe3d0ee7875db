"""Validity of the certificate by simulation: P(R(λ̂) > ε) ≤ δ (SPEC §1; LTT, Angelopoulos et al. 2021).

Every bound (binomial, hb, wsr) × risk is checked on seeded draws of D_cal, with the
observed violation frequency allowed up to δ + 3·SE, SE = sqrt(δ(1 − δ)/draws):

(a) one hypothesis whose true risk is EXACTLY ε (the boundary of the closed null),
(b) a K = 20 grid with a monotone risk curve crossing ε, under fixed_sequence and bonferroni,
(c) the global null (every level's risk ≥ ε, the first exactly ε): nothing may be certified.

Losses of all levels come from one uniform V_i per sample, so they are nested across levels
(as in real pruning) and the p-values are strongly dependent — the procedures must cope.
For accuracy_drop, D_i = 1[V_i < f] − 1[V_i > 1 − g] with P(new error) = f and
P(fixed error) = g, so R = f − g. With g = 0 the binomial test on F is tight; with g > 0 it is
conservative but must stay valid. Run with ``-s`` to see the measured frequencies.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pytest

from calibration.errors import ConfigError
from calibration.p_values import p_value, wsr_p_value_batch
from calibration.procedures import get_procedure, split_delta

pytestmark = pytest.mark.timeout(300)  # the budget for the whole file (it takes ≈ 30 s on 2 cores)

DELTA = 0.1
DRAWS = 2000
SE = math.sqrt(DELTA * (1 - DELTA) / DRAWS)
LIMIT = DELTA + 3 * SE
N = 800
K = 20
J_STAR = 12  # first level with true risk ≥ ε in case (b)
SPARSITIES = np.round(np.linspace(0.05, 0.95, K), 4)
BOUNDS = ("binomial", "hb", "wsr")
PROCEDURES = ("fixed_sequence", "bonferroni")


@dataclass(frozen=True)
class Scenario:
    name: str
    risk: str
    eps: float
    fix: float = 0.0  # P(fixed error) for accuracy_drop


SCENARIOS = (
    Scenario("disagreement", "disagreement", 0.05),
    Scenario("error_rate", "error_rate", 0.20),
    Scenario("acc_drop_nofix", "accuracy_drop", 0.10, 0.0),
    Scenario("acc_drop_fix", "accuracy_drop", 0.10, 0.03),
)
SCN = {s.name: s for s in SCENARIOS}


def _rng(*keys: str) -> np.random.Generator:
    return np.random.default_rng([zlib.crc32(k.encode()) for k in keys])


def _losses(scn: Scenario, v: np.ndarray, risk_value: float) -> np.ndarray:
    """int8 losses of shape v.shape for a level whose true risk is ``risk_value``."""
    if scn.risk == "accuracy_drop":
        f = risk_value + scn.fix
        assert 0.0 <= f and f + scn.fix <= 1.0
        return (v < f).astype(np.int8) - (v > 1.0 - scn.fix).astype(np.int8)
    return (v < risk_value).astype(np.int8)


def _p_matrix(bound: str, scn: Scenario, v: np.ndarray, curve: tuple[float, ...]) -> np.ndarray:
    """p-values of shape (draws, levels). Binomial and hb go through the ``p_value`` front
    door draw by draw; wsr through the vectorised batch function, checked against the door."""
    out = np.empty((v.shape[0], len(curve)))
    for j, r in enumerate(curve):
        losses = _losses(scn, v, r)
        if bound == "wsr":
            shifted = scn.risk == "accuracy_drop"
            x = (losses + 1.0) / 2.0 if shifted else losses.astype(np.float64)
            eps_t = (1.0 + scn.eps) / 2.0 if shifted else scn.eps
            out[:, j] = wsr_p_value_batch(x, eps_t)
            for d in range(3):
                assert out[d, j] == pytest.approx(p_value("wsr", scn.risk, losses[d], scn.eps), rel=1e-12)
        else:
            out[:, j] = [p_value(bound, scn.risk, row, scn.eps) for row in losses]
    return out


def _grid_curve(eps: float) -> tuple[float, ...]:
    """Monotone risk curve: 0 → 0.3ε below J_STAR, exactly ε at J_STAR, then up to 2ε."""
    low = [0.3 * eps * j / (J_STAR - 1) for j in range(J_STAR)]
    high = [eps * (1.0 + (j - J_STAR) / (K - 1 - J_STAR)) for j in range(J_STAR, K)]
    return tuple(low + high)


def _null_curve(eps: float) -> tuple[float, ...]:
    return tuple(eps * (1.0 + j / (K - 1)) for j in range(K))


@lru_cache(maxsize=None)
def _case_p(case: str, bound: str, scn_name: str) -> tuple[np.ndarray, tuple[float, ...]]:
    scn = SCN[scn_name]
    curve = {"a": (scn.eps,), "b": _grid_curve(scn.eps), "c": _null_curve(scn.eps)}[case]
    v = _rng(case, scn_name).random((DRAWS, N))
    return _p_matrix(bound, scn, v, curve), curve


def _report(case: str, bound: str, scn: str, what: str, freq: float, extra: str = "") -> None:
    print(f"\nVALIDITY case={case} bound={bound:8s} scenario={scn:15s} {what}={freq:.4f} "
          f"limit={LIMIT:.4f} {extra}")


# ----------------------------------------------------------------------------- (a)


@pytest.mark.parametrize("scn_name", list(SCN))
@pytest.mark.parametrize("bound", BOUNDS)
def test_single_hypothesis_at_boundary(bound: str, scn_name: str) -> None:
    p, _ = _case_p("a", bound, scn_name)
    freq = float(np.mean(p[:, 0] <= DELTA))
    _report("a", bound, scn_name, "P(p<=delta)", freq)
    assert freq <= LIMIT
    # Validity is P(p ≤ u) ≤ u for every u, not only at δ.
    for u in (0.01, 0.05, 0.2, 0.5):
        assert np.mean(p[:, 0] <= u) <= u + 3 * math.sqrt(u * (1 - u) / DRAWS), u


# ----------------------------------------------------------------------------- (b)


def _select_all(proc_name: str, p: np.ndarray, delta: float) -> list[int | None]:
    proc = get_procedure(proc_name)
    return [proc.select(proc.rejected(row, delta), SPARSITIES) for row in p]


@pytest.mark.parametrize("proc_name", PROCEDURES)
@pytest.mark.parametrize("scn_name", list(SCN))
@pytest.mark.parametrize("bound", BOUNDS)
def test_grid_crossing_epsilon(bound: str, scn_name: str, proc_name: str) -> None:
    scn = SCN[scn_name]
    p, curve = _case_p("b", bound, scn_name)
    sel = _select_all(proc_name, p, DELTA)
    # Violation: the certified level's true risk is ≥ ε (stricter than the guarantee's > ε).
    bad = [s is not None and curve[s] >= scn.eps for s in sel]
    freq = float(np.mean(bad))
    certified = float(np.mean([s is not None for s in sel]))
    mean_level = float(np.mean([s if s is not None else -1 for s in sel]))
    _report("b", bound, scn_name, f"{proc_name}:P(R(sel)>=eps)", freq,
            f"P(certified)={certified:.3f} mean_index={mean_level:.2f}")
    assert freq <= LIMIT
    if bound == "binomial":
        assert certified >= 0.9  # not vacuous: the levels at ≤ 0.3ε are certified
    if proc_name == "fixed_sequence":
        # The engine leaves levels after the first non-rejection unevaluated (NaN).
        stopped = p.copy()
        for row in stopped:
            over = np.flatnonzero(~(row <= DELTA))
            if over.size:
                row[over[0] + 1:] = np.nan
        assert _select_all(proc_name, stopped, DELTA) == sel


# ----------------------------------------------------------------------------- (c)


@pytest.mark.parametrize("proc_name", PROCEDURES)
@pytest.mark.parametrize("scn_name", list(SCN))
@pytest.mark.parametrize("bound", BOUNDS)
def test_global_null_certifies_nothing(bound: str, scn_name: str, proc_name: str) -> None:
    p, _ = _case_p("c", bound, scn_name)
    sel = _select_all(proc_name, p, DELTA)
    freq = float(np.mean([s is not None for s in sel]))
    _report("c", bound, scn_name, f"{proc_name}:P(certified)", freq)
    assert freq <= LIMIT  # i.e. nothing certified in ≥ 1 − δ − 3·SE of the draws


# ----------------------------------------------------------------------------- power


@pytest.mark.parametrize("scn_name", list(SCN))
@pytest.mark.parametrize("bound", BOUNDS)
def test_power_at_quarter_epsilon(bound: str, scn_name: str) -> None:
    """True risk ε/4, n = 2000: a useful test rejects nearly always (fails if p ≡ 1)."""
    scn = SCN[scn_name]
    draws, n = 500, 2000
    v = _rng("power", scn_name).random((draws, n))
    p = _p_matrix(bound, scn, v, (scn.eps / 4,))[:, 0]
    power = float(np.mean(p <= DELTA))
    _report("power", bound, scn_name, "P(reject)", power)
    assert power >= 0.9


# ----------------------------------------------------------------------------- one-sidedness


def _two_sided_wsr_batch(x: np.ndarray, eps: float) -> np.ndarray:
    """Hedged two-sided capital (the invalid LTT-code style): bets on both sides of ε."""
    n = x.shape[1]
    t = np.arange(1, n + 1)
    mu = (0.5 + np.cumsum(x, 1)) / (t + 1)
    s2 = (0.25 + np.cumsum((x - mu) ** 2, 1)) / (t + 1)
    s2p = np.concatenate([np.full((x.shape[0], 1), 0.25), s2[:, :-1]], 1)
    lam = np.sqrt(2 * np.log(10) / (n * s2p))
    up = np.cumsum(np.log1p(np.minimum(lam, 0.75 / (1 - eps)) * (eps - x)), 1)
    down = np.cumsum(np.log1p(-np.minimum(lam, 0.75 / eps) * (eps - x)), 1)
    log_k = np.logaddexp(up, down) + np.log(0.5)
    return np.minimum(1.0, np.exp(-log_k.max(1)))


def test_two_sided_wsr_would_fail_this_harness() -> None:
    """True risk 1.5ε (H0 true): the two-sided test 'certifies' often, the one-sided never."""
    eps = 0.05
    x = (_rng("two-sided").random((DRAWS, N)) < 1.5 * eps).astype(np.float64)
    bad = float(np.mean(_two_sided_wsr_batch(x, eps) <= DELTA))
    good = float(np.mean(wsr_p_value_batch(x, eps) <= DELTA))
    _report("one-sided", "wsr", "R=1.5eps", "P(p<=delta)", good, f"two-sided={bad:.4f}")
    assert bad > LIMIT
    assert good <= LIMIT


# ----------------------------------------------------------------------------- procedures


def test_fixed_sequence_unit() -> None:
    fs = get_procedure("fixed_sequence")
    assert fs.name == "fixed_sequence" and fs.stops_early is True
    p = np.array([0.001, 0.05, 0.2, 0.01, np.nan])
    r = fs.rejected(p, 0.1)
    assert r.tolist() == [True, True, False, False, False]
    assert fs.select(r, np.arange(5) / 10) == 1
    assert fs.rejected(np.array([0.1, 0.1]), 0.1).tolist() == [True, True]  # p ≤ δ rejects
    assert fs.select(fs.rejected(np.array([0.5, 0.01]), 0.1), [0.1, 0.2]) is None
    assert fs.select(fs.rejected(np.array([np.nan, 0.01]), 0.1), [0.1, 0.2]) is None
    assert fs.select(np.array([True, True, True]), [0.1, 0.2, 0.3]) == 2
    # select only trusts the leading run, whatever array it is given.
    assert fs.select(np.array([True, False, True]), [0.1, 0.2, 0.3]) == 0
    assert fs.continues(0.05, 0.1) and not fs.continues(0.2, 0.1) and not fs.continues(float("nan"), 0.1)
    assert fs.rejected(np.array([]), 0.1).shape == (0,)


def test_bonferroni_unit() -> None:
    bf = get_procedure("bonferroni")
    assert bf.name == "bonferroni" and bf.stops_early is False
    p = np.array([0.001, 0.5, 0.02, 0.004, np.nan])
    r = bf.rejected(p, 0.1)  # threshold 0.02
    assert r.tolist() == [True, False, True, True, False]
    assert bf.select(r, [0.1, 0.2, 0.3, 0.4, 0.5]) == 3
    assert bf.select(np.zeros(3, bool), [0.1, 0.2, 0.3]) is None
    assert bf.continues(0.9, 0.1)


def test_procedure_errors_and_split_delta() -> None:
    with pytest.raises(ConfigError, match="fixed_sequence.*bonferroni"):
        get_procedure("holm")
    with pytest.raises(ConfigError):
        get_procedure("fixed_sequence").rejected(np.zeros((2, 2)), 0.1)
    with pytest.raises(ConfigError):
        get_procedure("bonferroni").rejected(np.zeros(3), 1.0)
    with pytest.raises(ConfigError):
        get_procedure("bonferroni").select(np.zeros(3, bool), [0.1, 0.2])
    assert split_delta(0.1, 4) == pytest.approx(0.025)
    assert split_delta(0.1, 1) == 0.1
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError):
            split_delta(0.1, bad)
    with pytest.raises(ConfigError):
        split_delta(0.0, 2)
