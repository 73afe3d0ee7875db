"""Valid p-values for H_j: R(λ_j) > ε, one per sparsity level (SPEC §1).

A p-value p is valid for H_j when P(p ≤ u) ≤ u for every u ∈ [0, 1] whenever H_j holds
(Angelopoulos et al. 2021, "Learn then Test", arXiv 2110.01052, Def. 1). All three tests below
are valid under the *closed* null R ≥ ε, so a risk sitting exactly at ε is controlled too.

- ``binomial``: the exact tail P(Bin(n, ε) ≤ k) for 0/1 losses (LTT §3; Clopper–Pearson).
- ``hb``: Hoeffding–Bentkus for [0, 1] losses (Bates et al. 2021, "Distribution-free,
  risk-controlling prediction sets", arXiv 2101.02703, Prop. 3; Bentkus 2004).
- ``wsr``: a one-sided Waudby-Smith–Ramdas betting test (Waudby-Smith & Ramdas 2023,
  "Estimating means of bounded random variables by betting", JRSS-B, arXiv 2010.09686). Its bets are
  tuned to the per-test level in use (``alpha``), fixed before D_cal is seen.
- ``paired_exact`` (accuracy_drop only): the exact unconditional test on the paired counts (b new
  errors, c fixed errors), anchored on the binomial cut, computed at the per-test level ``alpha``
  (``paired_test.py``: statistic, proof and algorithm). ``auto`` for accuracy_drop.

``hb`` on accuracy_drop tests the mean of (D + 1)/2 ∈ {0, ½, 1} against (1 + ε)/2 with a factor e: at
small ε it is vacuous in practice (n = 2000, ε = 0.01 needs b − c ≤ −62, i.e. pruning must fix
many more errors than it makes); prefer ``paired_exact``.

Counts are integers throughout: k and the loss total come from integer sums of int8 losses,
never from a float mean multiplied by n (which can round ⌈n r̂⌉ the wrong way).

Mapping of per-sample losses (``risks.py``) to tests, the MAPIE-style front door ``p_value``:

=============  ==========================================  ===================================
risk           binomial                                    hb / wsr
=============  ==========================================  ===================================
accuracy_drop  F_i = 1[D_i = 1] (new errors), k = #F;      (D_i + 1)/2 ∈ {0, ½, 1}
               D_i ≤ F_i, so E[F] ≤ ε ⇒ R ≤ ε              tested against (1 + ε)/2
disagreement   k = Σ A_i                                   A_i as is, against ε
error_rate     k = Σ E_i                                   E_i as is, against ε
=============  ==========================================  ===================================
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from scipy import special

from .errors import ConfigError, DataError
from .risks import LOSS_VALUES, SEQUENCE_RISKS, check_risk

BOUNDS: tuple[str, ...] = ("auto", "binomial", "hb", "wsr", "paired_exact")
CONCRETE_BOUNDS: tuple[str, ...] = ("binomial", "hb", "wsr", "paired_exact")
PAIRED_RISKS: tuple[str, ...] = ("accuracy_drop",)

WSR_DELTA_REF = 0.1  # default level the bets are tuned for when none is given (not a validity knob)
WSR_C = 0.75  # bets λ_t ≤ c/(1 − ε): every capital factor stays ≥ 1 − c > 0


# ----------------------------------------------------------------------------- checks


def _count(name: str, value: int) -> int:
    """An exact non-negative Python int (rejects floats and bools: counts must be integers)."""
    if isinstance(value, (bool, np.bool_)):
        raise DataError(f"'{name}' must be an integer count. Got {value!r}.")
    try:
        out = operator.index(value)
    except TypeError:
        raise DataError(f"'{name}' must be an integer count. Got {value!r}.") from None
    if out < 0:
        raise DataError(f"'{name}' must be ≥ 0. Got {out}.")
    return out


def _level(name: str, value: float) -> float:
    """A number in the open interval (0, 1)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ConfigError(f"The '{name}' parameter must be a number in (0, 1). Got {value!r}.")
    v = float(value)
    if not (math.isfinite(v) and 0.0 < v < 1.0):
        raise ConfigError(f"The '{name}' parameter must be a number in the open interval (0, 1). Got {value!r}.")
    return v


def check_bound(bound: str) -> str:
    """Return ``bound`` unchanged, or raise ConfigError naming the valid bounds."""
    if not isinstance(bound, str) or bound not in BOUNDS:
        valid = ", ".join(repr(b) for b in BOUNDS)
        raise ConfigError(f"The 'bound' parameter must be one of {valid}. Got {bound!r}.")
    return bound


def resolve_bound(bound: str, risk: str) -> str:
    """Resolve ``auto`` by a FIXED rule, decided before D_cal is seen (SPEC §1).

    ``accuracy_drop`` → ``paired_exact`` (it uses the errors pruning fixes, which the binomial on F
    discards, and contains the binomial's rejections by construction); ``disagreement`` and
    ``error_rate`` → ``binomial`` (exact for 0/1 losses). The rule depends on the risk only, never on
    the losses: picking the smallest of several p-values after seeing the data would break validity
    (LTT §3; combining tests needs a Bonferroni factor).
    """
    check_bound(bound)
    check_risk(risk)
    if risk in SEQUENCE_RISKS:  # bounded, not 0/1, losses: only tests valid for bounded losses
        if bound == "auto":
            return "wsr"
        if bound not in ("wsr", "hb"):
            raise ConfigError(f"The risk {risk!r} has bounded per-sample losses (fractions of positions), not 0/1 "
                              f"ones: the {bound!r} bound is not valid for them; use 'wsr' (default) or 'hb'.",
                              code="bound_not_valid_for_risk")
        return bound
    if bound == "auto":
        return "paired_exact" if risk in PAIRED_RISKS else "binomial"
    if bound == "paired_exact" and risk not in PAIRED_RISKS:
        raise ConfigError(f"The 'paired_exact' bound tests paired counts of accuracy_drop; the risk {risk!r} has "
                          "0/1 losses: use 'binomial' (exact for them) or 'auto'.")
    return bound


# ----------------------------------------------------------------------------- the tests


def _binom_cdf(k: int, n: int, p: float) -> float:
    """P(Bin(n, p) ≤ k) through the regularised incomplete beta (scipy.special.bdtr)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return float(min(1.0, max(0.0, special.bdtr(k, n, p))))


def binomial_p_value(k: int, n: int, epsilon: float) -> float:
    """Exact binomial p-value P(Bin(n, ε) ≤ k) for H: E[L] ≥ ε with 0/1 losses.

    ``k`` is the number of losses equal to 1 among ``n``. Valid (and tight up to
    discreteness) because Bin(n, R) is stochastically larger than Bin(n, ε) when R ≥ ε.
    """
    k, n = _count("k", k), _count("n", n)
    if k > n:
        raise DataError(f"The count k={k} cannot exceed the number of samples n={n}.")
    eps = _level("epsilon", epsilon)
    if n == 0:
        return 1.0
    return _binom_cdf(k, n, eps)


def _h1(a: float, b: float) -> float:
    """Bernoulli KL divergence h1(a, b) = a log(a/b) + (1−a) log((1−a)/(1−b)), 0·log 0 = 0."""
    return float(special.rel_entr(a, b) + special.rel_entr(1.0 - a, 1.0 - b))


def hb_p_value(
    total: int,
    n: int,
    epsilon: float,
    scale: int = 1,
    *,
    binary: bool | None = None,
) -> float:
    """Hoeffding–Bentkus p-value for H: E[L] ≥ ε, losses L_i ∈ [0, 1] (Bates et al. 2021, Prop. 3).

    The losses are multiples of 1/``scale`` and ``total`` = Σ scale·L_i is their exact integer
    numerator, so r̂ = total / (scale·n) and ⌈n r̂⌉ = ⌈total / scale⌉ in integer arithmetic.

        p = min(exp(−n·h1(min(r̂, ε), ε)),  e · P(Bin(n, ε) ≤ ⌈n r̂⌉))

    ``binary`` (default: ``scale == 1``) says the losses are 0/1 *by construction*; then the
    Bentkus term is the exact binomial tail and the factor e is dropped. It is a property of
    the risk, never read off the observed values (that would be a data-dependent choice).
    """
    total, n, scale = _count("total", total), _count("n", n), _count("scale", scale)
    if scale == 0:
        raise DataError("'scale' must be ≥ 1.")
    if total > scale * n:
        raise DataError(f"The loss total {total}/{scale} exceeds n={n}: losses must lie in [0, 1].")
    eps = _level("epsilon", epsilon)
    if n == 0:
        return 1.0
    if binary is None:
        binary = scale == 1
    if binary and scale != 1:
        raise DataError("binary=True needs scale=1 (0/1 losses have an integer total).")
    r_hat = total / (scale * n)  # only enters the Hoeffding exponent
    hoeffding = math.exp(-n * _h1(min(r_hat, eps), eps))
    k_ceil = -((-total) // scale)  # ⌈total / scale⌉, exact
    bentkus = _binom_cdf(k_ceil, n, eps)
    if not binary:
        bentkus *= math.e
    return float(min(1.0, hoeffding, bentkus))


def _check_wsr_params(delta_ref: float, c: float) -> tuple[float, float]:
    return _level("delta_ref", delta_ref), _level("c", c)


def wsr_p_value_batch(
    losses01: np.ndarray,
    epsilon: float,
    *,
    delta_ref: float = WSR_DELTA_REF,
    c: float = WSR_C,
) -> np.ndarray:
    """One-sided WSR p-values for many sequences at once: ``losses01`` (n_draws, n) → (n_draws,).

    Each row is tested on its own, in the given order; see ``wsr_p_value``. Exists so that
    simulations can vectorise across draws; it computes exactly what ``wsr_p_value`` does.
    """
    x = np.asarray(losses01, dtype=np.float64)
    if x.ndim != 2:
        raise DataError(f"losses01 must have shape (n_draws, n_samples). Got {x.shape}.")
    eps = _level("epsilon", epsilon)
    delta_ref, c = _check_wsr_params(delta_ref, c)
    n = x.shape[1]
    if n == 0:
        return np.ones(x.shape[0])
    if not np.all(np.isfinite(x)) or x.min() < 0.0 or x.max() > 1.0:
        raise DataError("WSR losses must be finite and lie in [0, 1]; map them there first.")
    t = np.arange(1, n + 1, dtype=np.float64)
    # Predictable plug-in (WSR 2023, §5.1 / fixed-n form): running mean and variance with
    # priors 1/2 and 1/4; the bet at time t uses σ̂²_{t−1} only.
    mu_hat = (0.5 + np.cumsum(x, axis=1)) / (t + 1.0)
    sigma2 = (0.25 + np.cumsum((x - mu_hat) ** 2, axis=1)) / (t + 1.0)
    sigma2_prev = np.empty_like(sigma2)
    sigma2_prev[:, 0] = 0.25
    sigma2_prev[:, 1:] = sigma2[:, :-1]
    lam = np.sqrt(2.0 * math.log(1.0 / delta_ref) / (n * sigma2_prev))
    # λ_t ∈ [0, c/(1−ε)]: non-negative bets only (one-sided), and 1 + λ(ε − L) ≥ 1 − c > 0.
    lam = np.minimum(lam, c / (1.0 - eps))
    log_capital = np.cumsum(np.log1p(lam * (eps - x)), axis=1)
    # K_0 = 1, so max_t K_t ≥ 1 and p ≤ 1. Ville: P(max_t K_t ≥ 1/u) ≤ u under E[L] ≥ ε.
    log_max = np.maximum(log_capital.max(axis=1), 0.0)
    return np.exp(-log_max)


def wsr_p_value(
    losses01: np.ndarray,
    epsilon: float,
    *,
    delta_ref: float = WSR_DELTA_REF,
    c: float = WSR_C,
) -> float:
    """One-sided Waudby-Smith–Ramdas betting p-value for H0: E[L] ≥ ε (vs E[L] < ε).

    ``losses01`` has shape (n_samples,), values in [0, 1], in the (already shuffled, with the
    recorded seed) order in which they are bet on. Capital K_t = Π_{i≤t} (1 + λ_i (ε − L_i))
    with predictable λ_i ∈ [0, c/(1−ε)]. Under H0 each factor has conditional mean ≤ 1, so
    K is a non-negative supermartingale and Ville's inequality gives p = min(1, 1/max_t K_t).

    Never negative bets: a two-sided (hedged) capital, as in the public LTT code, also grows
    when E[L] ≫ ε and so rejects H0 when it is true — an invalid p-value for LTT.
    ``delta_ref`` only tunes the bet sizes (λ_t = sqrt(2 log(1/δ_ref) / (n σ̂²_{t−1}))).
    """
    x = np.asarray(losses01, dtype=np.float64)
    if x.ndim != 1:
        raise DataError(f"losses01 must have shape (n_samples,). Got {x.shape}.")
    return float(wsr_p_value_batch(x[None, :], epsilon, delta_ref=delta_ref, c=c)[0])


# ----------------------------------------------------------------------------- bounded (sequence) losses


def _bounded01(risk: str, losses: np.ndarray) -> np.ndarray:
    """A sequence risk's float losses mapped affinely onto [0, 1] (token_accuracy_drop: (D + 1)/2)."""
    lo, hi = SEQUENCE_RISKS[risk]
    arr = np.asarray(losses, dtype=np.float64)
    if arr.ndim != 1:
        raise DataError(f"losses must have shape (n_samples,). Got {arr.shape}.")
    if arr.size and (not np.all(np.isfinite(arr)) or arr.min() < lo or arr.max() > hi):
        raise DataError(f"Losses for {risk!r} must lie in [{lo:g}, {hi:g}].")
    return (arr - lo) / (hi - lo)


def _bounded_test_level(risk: str, epsilon: float) -> float:
    lo, hi = SEQUENCE_RISKS[risk]
    return (epsilon - lo) / (hi - lo)


def _exact_total(x01: np.ndarray) -> Fraction:
    """Σ x_i exactly: every loss is j/m (or (j + m)/2m) with m ≤ 2^16 positions, recovered from its float."""
    values, counts = np.unique(x01, return_counts=True)
    total = Fraction(0)
    for v, c in zip(values, counts):
        exact = Fraction(float(v)).limit_denominator(1 << 17)
        if abs(float(exact) - float(v)) > 4 * np.spacing(float(v)):  # not j/m with m ≤ 2^17: round up
            exact = Fraction(float(v)) + Fraction(1, 1 << 50)
        total += exact * int(c)
    return total


def hb_p_value_bounded(x01: np.ndarray, epsilon: float) -> float:
    """Hoeffding–Bentkus p-value for H: E[L] ≥ ε, L_i ∈ [0, 1] not 0/1 (Bates et al. 2021, Prop. 3):
    min(exp(−n·h1(min(r̂, ε), ε)), e·P(Bin(n, ε) ≤ ⌈n r̂⌉)), n r̂ summed exactly (``_exact_total``)."""
    eps = _level("epsilon", epsilon)
    n = int(x01.shape[0])
    if n == 0:
        return 1.0
    total = _exact_total(x01)
    r_hat = float(total / n)
    hoeffding = math.exp(-n * _h1(min(r_hat, eps), eps))
    k_ceil = -((-total.numerator) // total.denominator)
    return float(min(1.0, hoeffding, math.e * _binom_cdf(k_ceil, n, eps)))


def _bounded_p(bound: str, x01: np.ndarray, eps_test: float, alpha: float | None) -> float:
    if x01.shape[0] == 0:
        return 1.0
    if bound == "hb":
        return hb_p_value_bounded(x01, eps_test)
    return wsr_p_value(x01, eps_test, delta_ref=alpha if alpha is not None else WSR_DELTA_REF)


# ----------------------------------------------------------------------------- front door


@dataclass(frozen=True)
class _Sample:
    """Sufficient statistics of one level's losses for the chosen test."""

    bound: str
    risk: str
    n: int
    new_errors: int  # #{L_i = 1}: k for binomial
    fixed_errors: int  # #{L_i = −1} (accuracy_drop): c for paired_exact
    total: int  # Σ scale·L'_i of the [0, 1]-mapped losses L' (hb)
    scale: int  # 2 for accuracy_drop ((D+1)/2 ∈ {0, ½, 1}), else 1
    x01: np.ndarray | None  # the mapped losses in order, shape (n,), for wsr only


def _as_losses(risk: str, losses: np.ndarray) -> np.ndarray:
    """Validated integer losses of shape (n_samples,) with values in LOSS_VALUES[risk]."""
    arr = np.asarray(losses)
    if arr.ndim != 1:
        raise DataError(f"losses must have shape (n_samples,). Got {arr.shape}.")
    if arr.dtype.kind == "b":
        arr = arr.astype(np.int8)
    elif arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise DataError(f"Losses for '{risk}' must be integers {LOSS_VALUES[risk]}.")
        arr = arr.astype(np.int64)
    elif arr.dtype.kind not in "iu":
        raise DataError(f"losses must be an integer array. Got dtype {arr.dtype}.")
    lo, hi = LOSS_VALUES[risk][0], LOSS_VALUES[risk][-1]
    if arr.size and (arr.min() < lo or arr.max() > hi):
        raise DataError(
            f"Losses for '{risk}' must take values in {LOSS_VALUES[risk]}. "
            f"Got values in [{arr.min()}, {arr.max()}]."
        )
    return arr


def _prepare(bound: str, risk: str, losses: np.ndarray) -> _Sample:
    """Integer counts (and, for wsr, the mapped sequence) of one level's losses."""
    arr = _as_losses(risk, losses)
    n = int(arr.shape[0])
    new_errors = int(np.count_nonzero(arr == 1))
    if risk == "accuracy_drop":
        scale = 2
        total = int(arr.sum(dtype=np.int64)) + n  # Σ (D_i + 1) = 2 Σ (D_i + 1)/2
    else:
        scale = 1
        total = new_errors
    x01 = None
    if bound == "wsr":
        x01 = (arr.astype(np.float64) + 1.0) / 2.0 if scale == 2 else arr.astype(np.float64)
    fixed_errors = int(np.count_nonzero(arr == -1)) if risk == "accuracy_drop" else 0
    return _Sample(bound, risk, n, new_errors, fixed_errors, total, scale, x01)


def _test_level(bound: str, risk: str, epsilon: float) -> float:
    """ε on the scale of the test: (1 + ε)/2 for hb/wsr on accuracy_drop, else ε."""
    return (1.0 + epsilon) / 2.0 if (risk == "accuracy_drop" and bound in ("hb", "wsr")) else epsilon


def _p_on_test_scale(s: _Sample, eps_test: float, alpha: float | None) -> float:
    if s.n == 0:
        return 1.0
    if s.bound == "binomial":
        return binomial_p_value(s.new_errors, s.n, eps_test)
    if s.bound == "hb":
        return hb_p_value(s.total, s.n, eps_test, s.scale, binary=s.scale == 1)
    if s.bound == "paired_exact":
        from .paired_test import paired_exact_p_value

        assert alpha is not None
        return paired_exact_p_value(s.new_errors, s.fixed_errors, s.n, eps_test, alpha)
    assert s.x01 is not None
    return wsr_p_value(s.x01, eps_test, delta_ref=alpha if alpha is not None else WSR_DELTA_REF)


def _alpha_for(bound: str, alpha: float | None) -> float | None:
    if alpha is None:
        if bound == "paired_exact":
            raise ConfigError("The 'paired_exact' bound is computed at the per-test level in use: pass alpha "
                              "(δ for fixed-sequence, δ/K for Bonferroni, each divided by the number of criteria).")
        return None
    return _level("alpha", alpha)


def p_value(bound: str, risk: str, losses: np.ndarray, epsilon: float, *, alpha: float | None = None) -> float:
    """Valid p-value for H: R(λ) > ε from one level's per-sample losses (shape (n_samples,)).

    ``losses`` come from ``risks.per_sample_losses`` (int8; {−1, 0, 1} for accuracy_drop,
    {0, 1} otherwise). ``bound`` ∈ {auto, binomial, hb, wsr, paired_exact}; ``auto`` →
    ``resolve_bound``. ``alpha`` is the per-test level the procedure uses (fixed before D_cal is
    seen): required by paired_exact (its rejection region is calibrated at α; the p-value is valid
    at every level and ≤ α exactly when it rejects), and it tunes the wsr bets. For wsr the losses
    are bet on in the given order: shuffle D_cal once, with the recorded seed, before calling. An
    empty sample gives p = 1 (no evidence, nothing certified).
    """
    b = resolve_bound(bound, risk)
    eps = _level("epsilon", epsilon)
    a = _alpha_for(b, alpha)
    if risk in SEQUENCE_RISKS:
        return _bounded_p(b, _bounded01(risk, losses), _bounded_test_level(risk, eps), a)
    s = _prepare(b, risk, losses)
    return _p_on_test_scale(s, _test_level(b, risk, eps), a)


def _smallest_rejected(p_at: Callable[[float], float], alpha: float, tol: float) -> float:
    """Bisection on the test's scale for the smallest ε′ in (0, 1] with p(ε′) ≤ α (1: none below 1 rejects).
    Invariant: p(lo) > α (p → 1 as ε′ → 0); hi rejects or is the top."""
    lo, hi = 0.0, 1.0
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if mid <= 0.0 or mid >= 1.0:
            break
        if p_at(mid) <= alpha:
            hi = mid
        else:
            lo = mid
    return hi


def upper_confidence_bound(
    bound: str,
    risk: str,
    losses: np.ndarray,
    alpha: float,
    *,
    epsilon: float | None = None,
    tol: float = 1e-9,
) -> float:
    """The (1 − α) upper confidence bound of the risk by inverting ``p_value`` (for plots).

    Smallest ε' (bisection to ``tol``) with p(ε') ≤ α on the test's scale, mapped back to the
    risk's scale: for binomial on accuracy_drop it bounds E[F] (≥ the accuracy drop), for
    hb/wsr on accuracy_drop ε = 2ε' − 1. Returns the top of the range (1) when no ε' < 1
    rejects. binomial and hb p-values decrease in ε, so bisection finds the exact crossing;
    the wsr p-value is not guaranteed monotone in ε (the bet cap moves with ε), so for wsr it
    is a crossing, good for plotting but not the basis of any certificate. For paired_exact
    (``epsilon`` required: the ε the test certifies at) it is the smallest ε′ on the grid ε·1.1^j that
    the test at level α rejects, ≤ ε exactly when the level is rejected at ε (``paired_test``).
    """
    b = resolve_bound(bound, risk)
    a = _level("alpha", alpha)
    if risk in SEQUENCE_RISKS:
        x01 = _bounded01(risk, losses)
        hi = _smallest_rejected(lambda e: _bounded_p(b, x01, e, a), a, tol) if x01.shape[0] > 0 else 1.0
        low, high = SEQUENCE_RISKS[risk]
        return low + (high - low) * hi
    s = _prepare(b, risk, losses)
    if b == "paired_exact":
        from .paired_test import paired_exact_upper_bound

        if epsilon is None:
            raise ConfigError("upper_confidence_bound for 'paired_exact' needs the epsilon the test is run at.")
        return paired_exact_upper_bound(s.new_errors, s.fixed_errors, s.n, _level("epsilon", epsilon), a)
    hi = _smallest_rejected(lambda e: _p_on_test_scale(s, e, a), a, tol) if s.n > 0 else 1.0
    if risk == "accuracy_drop" and b in ("hb", "wsr"):
        return 2.0 * hi - 1.0
    return hi


__all__ = [
    "BOUNDS",
    "CONCRETE_BOUNDS",
    "binomial_p_value",
    "check_bound",
    "hb_p_value",
    "p_value",
    "resolve_bound",
    "upper_confidence_bound",
    "wsr_p_value",
    "wsr_p_value_batch",
]
