"""``paired_exact``: an exact unconditional test on the paired counts for ``accuracy_drop`` (SPEC §1).

At one sparsity level, on D_cal (n samples): b = #new errors (pruned wrong, dense right), c = #fixed
errors (pruned right, dense wrong). (B, C, n − B − C) ~ Multinomial(n; p_b, p_c, 1 − p_b − p_c) and the
risk is R = p_b − p_c. The hypothesis H: R ≥ ε (the boundary R = ε counts as null) is tested at a level α
fixed before D_cal is seen (the procedure's per-test level).

Statistic
---------
    Z(b, c) = (b − c − nε) / √(2c + nε)

a score-type statistic: under the boundary p_b = p_c + ε, Var(B − C) = n(2p_c + ε − ε²), and 2c + nε
estimates it from the fixed errors alone. Two reasons for the choice: (i) it is nondecreasing in b and
nonincreasing in c (∂Z/∂c = −(b + c)/(2c + nε)^{3/2} ≤ 0), which the validity proof needs; (ii) it
standardises B − C across the whole nuisance range, so its null distribution is nearly the same for every
p_c and the sup over the nuisance costs little (a raw b − c would be calibrated at the worst, largest p_c
and lose most of its power at the small p_c typical of pruning).

The anchored test (what is used)
--------------------------------
    reject  ⇔  b ≤ k_α   or   Z(b, c) ≤ z*_α

k_α is the binomial-on-F cut (the largest k with P(Bin(n, ε) ≤ k) ≤ α), so every rejection of the
binomial test is a rejection here. z*_α is the largest threshold for which the *union* has size ≤ α,
found by the search below. Equivalently it is the test "T_α ≤ t" for the fixed statistic
T_α(b, c) = Z(b, c) − M·1[b ≤ k_α] (M large), which is again nondecreasing in b and nonincreasing in c;
everything depends on (n, ε, α) only, all fixed before D_cal is seen, so a rule choosing this test is a
fixed rule. For each c the rejected b are {0, …, b_crit(c)}: only this critical boundary is computed
(and cached per (n, ε, α)).

Why it is valid (proof sketch)
------------------------------
1. Monotone coupling. Draw U_i ~ U(0, 1) per sample: new error if U_i < p_b, fixed error if
   U_i > 1 − p_c. Raising p_b or lowering p_c raises B and lowers C sample by sample, so any rejection
   region A that is a lower set in b and an upper set in c (ours is) has P_{p_b,p_c}(A) nonincreasing in
   p_b and nondecreasing in p_c.
2. Hence the sup of P(A) over the null {p_b − p_c ≥ ε} is attained on the boundary p_b = p_c + ε:
   g(t) = P_{t+ε, t}(A), t ∈ [0, (1 − ε)/2].
3. Cell bound. On a cell t ∈ [a, a′]: p_b = t + ε ≥ a + ε and p_c = t ≤ a′, so by 1.
   g(t) ≤ P_{a+ε, a′}(A) (a valid point: a + ε + a′ ≤ 1). Covering [0, (1 − ε)/2] by cells and taking
   the largest cell bound gives a rigorous upper bound on the sup; any g(t) is a lower bound. A sup
   taken on a finite grid of t only is NOT an upper bound — the cells are what make it rigorous.
4. Each P_{p_b,p_c}(A) = Σ_c P(C = c) · P(Bin(n − c, p_b/(1 − p_c)) ≤ b_crit(c)) is computed in log
   space (gammaln, regularised incomplete beta), over a window of c around n·p_c; the mass of C outside
   the window is added to the upper bound (exactly, through its binomial tail), and a relative margin of
   1e-8 absorbs floating-point error.
5. The family A_k = {b ≤ k_α} ∪ {Z ≤ z_first + k·0.001} is nested in k (A_{−1}: the anchor alone,
   whose size is the binomial's, at t = 0). The ideal test rejects (b, c) iff the size of A_{k(b,c)},
   the smallest region containing it, is ≤ α; its rejection set is A_{K} with K the largest such k, of
   size ≤ α. Once per (n, ε, α): (i) a coarse grid of t (lower bounds of the sup) finds the largest k
   whose grid size is ≤ α; k + 1 is then *disproved* (k_hi: some g(t) > α); (ii) a region a margin
   below is *proved* with cells (k_lo). Per observation: region k(b, c) ≤ k_lo is rejected, ≥ k_hi is
   not, and one in between gets its own rigorous decision (one pass of coarse cells, then cells refined
   from a finer grid, split where their bound exceeds α, within a budget): rejected only when *proved*.
   Decisions are cached, and a proved k′ ≥ k proves k, a disproved k′ ≤ k disproves it (nesting).
   Validity: every rejected (b, c) lies in a region proved to have size ≤ α, so the procedure rejects
   only where the ideal test does; its rejection set is contained in A_{K}, whatever the order of the
   observations or the budget, and P_null(reject) ≤ P_null(A_{K}) ≤ α. When the budget runs out (a
   size within a hair of α, typical at n ≳ 10,000) the decision is 'not rejected': conservative, a few
   thousandths in z. Observations away from the exact boundary resolve in one or two passes.
   (``settle`` bisects the same decisions over the band to get the whole boundary, for tests and
   tables; the test itself never needs it.)
6. p-value. The reported p-value is a rigorous upper bound on sup_null P(T_α ≤ T_α(b, c)) — the exact
   unconditional p-value of the fixed statistic T_α — so it is valid for every u (P(p ≤ u) ≤ u), and it
   is ≤ α exactly when the anchored test rejects. It is the one used for the decision at level α; at
   another level it is still valid, only not tuned for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from scipy import special

from .errors import ConfigError, DataError

REL_MARGIN = 1e-8  # relative floating-point margin on every rigorous upper bound
ABS_MARGIN = 1e-14
MAX_EVALS = 6000  # cell evaluations one rigorous decision may spend before it settles conservatively
WINDOW_SD = 6.0  # the window of C summed term by term: n·p_c ± 6 sd (+3); the exact tail mass outside is added


@lru_cache(maxsize=8)
def _log_factorials(n: int) -> np.ndarray:
    """log k! for k = 0 … n (a table: every pmf below is looked up, not recomputed)."""
    return special.gammaln(np.arange(n + 1, dtype=np.float64) + 1.0)


def _xlog(k: np.ndarray, logp: np.ndarray) -> np.ndarray:
    """k·log p with 0·log 0 = 0 (``logp`` broadcast over rows; k ≥ 0)."""
    with np.errstate(invalid="ignore"):
        return np.where(k > 0, k * logp, 0.0)


# ----------------------------------------------------------------------------- one multinomial probability


def _region_probs(n: int, bcrit: np.ndarray, pb: np.ndarray, pc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper bounds of P_{pb,pc}(B ≤ bcrit[C]) for arrays of points, each shape (P,).

    ``bcrit`` (n + 1,) int64: the largest rejected b for each c (−1: none). Points are processed in
    chunks of similar window width (no padding waste).
    """
    pb = np.atleast_1d(np.asarray(pb, dtype=np.float64))
    pc = np.atleast_1d(np.asarray(pc, dtype=np.float64))
    sd = np.sqrt(n * pc * (1.0 - pc))
    c0 = np.clip(np.floor(n * pc - WINDOW_SD * sd - 3.0), 0, n).astype(np.int64)
    c1 = np.clip(np.ceil(n * pc + WINDOW_SD * sd + 3.0), 0, n).astype(np.int64)
    widths = c1 - c0 + 1
    order = np.argsort(widths, kind="stable")
    lower = np.empty(pb.size)
    upper = np.empty(pb.size)
    lg_n = special.gammaln(n + 1.0)
    sw = widths[order]
    s0 = 0
    while s0 < order.size:  # a chunk: widths within 1.5× of its first (each padded only to its own max)
        s1 = max(s0 + 1, int(np.searchsorted(sw, 1.5 * sw[s0] + 8, side="right")))
        s1 = min(s1, s0 + max(8, int(2e5 // max(1, int(sw[s1 - 1])))))
        idx = order[s0:s1]
        lo_i, up_i = _probs_chunk(n, bcrit, pb[idx], pc[idx], c0[idx], c1[idx], lg_n)
        lower[idx], upper[idx] = lo_i, up_i
        s0 = s1
    return lower, upper


def _bracket(n, pc, c0, c1, s, width):
    """[lower, upper] around the probability whose in-window part is ``s``: the rounding margins, plus the
    exact mass of C outside [c0, c1] on the upper side, P(C ≤ c0 − 1) + P(C ≥ c1 + 1)."""
    lo_tail = np.where(c0 > 0, special.betainc(np.maximum(n - c0 + 1.0, 1.0), np.maximum(c0, 1.0), 1.0 - pc), 0.0)
    hi_tail = np.where(c1 < n, special.betainc(c1 + 1.0, np.maximum(n - c1, 1.0), pc), 0.0)
    lower = np.maximum(s * (1.0 - REL_MARGIN) - ABS_MARGIN * width, 0.0)
    upper = np.minimum(s * (1.0 + REL_MARGIN) + ABS_MARGIN * width + lo_tail + hi_tail, 1.0)
    return lower, upper


def _chunk_grid(n, bcrit, pb, pc, c0, c1, lg_n):
    """Per point (rows) and fixed-error count c in [c0, c1] (columns): c, its validity mask, the binomial
    weight P(C = c), the conditional new-error rate q = p_b / (1 − p_c), m = n − c and k = b_crit(c).
    (``lg_n`` is unused: the log-factorials come from a table per n.)"""
    lf = _log_factorials(n)
    width = int((c1 - c0).max()) + 1
    c = c0[:, None] + np.arange(width, dtype=np.int64)[None, :]
    valid = c <= c1[:, None]
    c = np.minimum(c, n)
    cf = c.astype(np.float64)
    with np.errstate(divide="ignore"):
        lpc, l1pc = np.log(pc)[:, None], np.log1p(-pc)[:, None]
    logw = lf[n] - lf[c] - lf[n - c] + _xlog(cf, lpc) + _xlog(n - cf, l1pc)
    w = np.where(valid, np.exp(logw), 0.0)
    q = np.clip(pb / np.maximum(1.0 - pc, 1e-300), 0.0, 1.0)[:, None]
    return c, valid, w, q, n - c, bcrit[c]


def _probs_chunk(n, bcrit, pb, pc, c0, c1, lg_n):
    """Σ_c P(C = c)·P(Bin(n − c, q) ≤ k_c) for a chunk of points, q = p_b/(1 − p_c).

    The conditional CDFs along c come from one incomplete beta at c0 and the exact recurrence
    F_{m−1}(k′) = F_m(k) + q·P(Bin(m − 1, q) = k) + Σ_{k<j≤k′} P(Bin(m − 1, q) = j)  (k ≤ k′),
    from Bin(m) = Bin(m − 1) + Bernoulli(q): every increment is a non-negative pmf value, so the
    running sum loses no precision to cancellation (relative error ~1e-10 at n = 1e5, inside
    REL_MARGIN). k_c = b_crit(c) is nondecreasing in c until it reaches m = n − c, after which F = 1.
    """
    c, valid, w, q, m, k = _chunk_grid(n, bcrit, pb, pc, c0, c1, lg_n)
    width = c.shape[1]
    capped = k >= m
    # q = 1 (the end of the nuisance line): B = n − C surely, so the CDF is exactly 1[k ≥ m] = ``capped``;
    # such rows run the recurrence with a placeholder q and are overwritten below.
    certain = q[:, 0] >= 1.0
    if certain.any():
        q = np.where(certain[:, None], 0.5, q)
    krec = np.maximum.accumulate(np.where(capped, -1, k), axis=1)  # nondecreasing; capped entries → F = 1
    # F at the first column: P(Bin(m, q) ≤ k) = I_{1−q}(m − k, k + 1) for 0 ≤ k < m.
    k0, m0 = krec[:, 0], m[:, 0]
    inside0 = (k0 >= 0) & (k0 < m0)
    kk0 = np.where(inside0, k0, 0).astype(np.float64)
    mm0 = np.where(inside0, m0, 1).astype(np.float64)
    f0 = np.where(inside0, special.betainc(mm0 - kk0, kk0 + 1.0, 1.0 - q[:, 0]), np.where(k0 >= m0, 1.0, 0.0))
    if width > 1:
        m1 = m[:, 1:]  # = m_prev − 1
        kp, kn = krec[:, :-1], krec[:, 1:]
        delta = kn - kp
        dmax = int(delta.max()) if delta.size else 0
        # pmf at s = max(k, 0) once (gammaln), the next ones by the ratio (m − j)/(j + 1) · q/(1 − q).
        s0 = np.maximum(kp, 0)
        lf = _log_factorials(n)
        ok = s0 <= m1
        s0c = np.minimum(s0, m1)
        lq, l1q = np.log(q), np.log1p(-q)  # 0 < q < 1 here (p_b ≥ ε > 0)
        pmf = np.where(ok, np.exp(lf[m1] - lf[s0c] - lf[m1 - s0c] + s0c * lq + (m1 - s0c) * l1q), 0.0)
        inc = np.where(kp >= 0, q * pmf, 0.0)
        r = q / (1.0 - q)
        j = s0.astype(np.float64)
        m1f = m1.astype(np.float64)
        first = kp < 0  # the sum over (k, k′] starts at j = 0 itself
        inc = inc + np.where(first & (kn >= 0), pmf, 0.0)
        for _ in range(dmax):
            pmf = pmf * np.maximum(m1f - j, 0.0) / (j + 1.0) * r
            j = j + 1.0
            inc = inc + np.where(j <= kn, pmf, 0.0)
        f = np.concatenate([f0[:, None], f0[:, None] + np.cumsum(inc, axis=1)], axis=1)
    else:
        f = f0[:, None]
    cdf = np.where(capped, 1.0, np.where(k < 0, 0.0, np.minimum(f, 1.0)))
    if certain.any():
        cdf[certain] = capped[certain]
    return _bracket(n, pc, c0, c1, (w * cdf).sum(axis=1), width)


def _probs_chunk_direct(n, bcrit, pb, pc, c0, c1, lg_n):
    """Reference version of ``_probs_chunk``: one incomplete beta per (point, c). Used by the tests."""
    c, valid, w, q, m, k = _chunk_grid(n, bcrit, pb, pc, c0, c1, lg_n)
    width = c.shape[1]
    inside = (k >= 0) & (k < m) & valid
    kk = np.where(inside, k, 0).astype(np.float64)
    mm = np.where(inside, m, 1).astype(np.float64)
    # P(Bin(m, q) ≤ k) = I_{1−q}(m − k, k + 1) for 0 ≤ k < m.
    cdf = np.where(inside, special.betainc(mm - kk, kk + 1.0, np.broadcast_to(1.0 - q, kk.shape)), 0.0)
    cdf = np.where(k >= m, 1.0, cdf)
    return _bracket(n, pc, c0, c1, (w * cdf).sum(axis=1), width)


# ----------------------------------------------------------------------------- the nuisance line


@dataclass
class _Line:
    """The boundary t ∈ [0, (1 − ε)/2] (p_c = t, p_b = t + ε), cut into cells at ``edges``.

    Edges are placed uniformly in u = √(2t + ε): the null sd of (B − C)/n is √((2t + ε)/n) up to ε², so
    equal steps in u are equal steps in standard deviations of the statistic.
    """

    n: int
    eps: float
    edges: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def t_max(self) -> float:
        return (1.0 - self.eps) / 2.0

    def init(self, m: int) -> None:
        u = np.linspace(math.sqrt(self.eps), 1.0, m + 1)
        t = (u * u - self.eps) / 2.0
        t[0], t[-1] = 0.0, self.t_max
        self.edges = np.unique(np.clip(t, 0.0, self.t_max))

    def split(self, idx: np.ndarray) -> None:
        """Split cells ``idx`` at their midpoint in u."""
        a, b = self.edges[idx], self.edges[idx + 1]
        mid = ((np.sqrt(2 * a + self.eps) + np.sqrt(2 * b + self.eps)) / 2.0) ** 2
        mid = np.clip((mid - self.eps) / 2.0, a, b)
        self.edges = np.unique(np.concatenate([self.edges, mid]))


def _cell_bounds(line: _Line, bcrit: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Rigorous upper bound of g on the cells [a, b]: P at (p_b, p_c) = (a + ε, b)."""
    return _region_probs(line.n, bcrit, a + line.eps, b)[1]


def _boundary_lower(line: _Line, bcrit: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Lower bounds of g(t) = P_{t+ε, t}(A) at the points ``t``."""
    return _region_probs(line.n, bcrit, t + line.eps, t)[0]


def _mid_u(line: _Line, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    mid = ((np.sqrt(2 * a + line.eps) + np.sqrt(2 * b + line.eps)) / 2.0) ** 2
    return np.clip((mid - line.eps) / 2.0, a, b)


def _refine(line: _Line, bcrit: np.ndarray, target: float, *, stop_above: float | None,
            budget: int) -> tuple[str, float, float]:
    """Split cells (starting from ``line.edges``) whose bound exceeds ``target`` until none does.

    Returns ('proved' | 'disproved' | 'undecided', the largest cell bound, the largest g(t) seen).
    'disproved': some g(t) > ``stop_above``. Each cell is evaluated once: only new cells cost.
    """
    edges = line.edges
    lower = float(_boundary_lower(line, bcrit, edges).max())
    if stop_above is not None and lower > stop_above:
        return "disproved", 1.0, lower
    a, b = edges[:-1], edges[1:]
    ub = _cell_bounds(line, bcrit, a, b)
    spent = edges.size + a.size
    while True:
        bad = ub > target
        if not bad.any():
            return "proved", float(ub.max()), lower
        if spent > budget:
            return "undecided", float(ub.max()), lower
        ba, bb = a[bad], b[bad]
        mid = _mid_u(line, ba, bb)
        splittable = (mid > ba) & (mid < bb)
        if not splittable.any():  # floating point cannot split these cells further
            return "undecided", float(ub.max()), lower
        ba, bb, mid = ba[splittable], bb[splittable], mid[splittable]
        lower = max(lower, float(_boundary_lower(line, bcrit, mid).max()))
        spent += 3 * mid.size
        if stop_above is not None and lower > stop_above:
            return "disproved", float(ub.max()), lower
        keep = ~bad
        keep[np.flatnonzero(bad)[~splittable]] = True  # unsplittable bad cells stay (and stay bad)
        na = np.concatenate([ba, mid])
        nb = np.concatenate([mid, bb])
        nub = _cell_bounds(line, bcrit, na, nb)
        a = np.concatenate([a[keep], na])
        b = np.concatenate([b[keep], nb])
        ub = np.concatenate([ub[keep], nub])
        if not splittable.all() and not (nub > target).any() and (ub > target).sum() == (~splittable).sum():
            return "undecided", float(ub.max()), lower


def _decide(line: _Line, bcrit: np.ndarray, alpha: float, budget: int = MAX_EVALS) -> tuple[str, float, float]:
    """Is sup_t g(t) ≤ α for the region ``bcrit``? ('proved' | 'disproved' | 'undecided', upper, lower)."""
    return _refine(line, bcrit, alpha, stop_above=alpha, budget=budget)


def _sup_upper(line: _Line, bcrit: np.ndarray, *, rel_tol: float = 0.05, budget: int = 400) -> tuple[float, float]:
    """(upper, lower) bounds of sup_t g(t): cells split until each bound is ≤ (1 + rel_tol)·(best g seen).
    ``budget=0``: one pass over the cells, no refinement (lower returned as 0)."""
    if budget <= 0:
        edges = line.edges
        return float(_cell_bounds(line, bcrit, edges[:-1], edges[1:]).max()), 0.0
    lower = float(_boundary_lower(line, bcrit, line.edges).max())
    _, upper, lower2 = _refine(line, bcrit, (1.0 + rel_tol) * lower + 1e-12, stop_above=None, budget=budget)
    return upper, max(lower, lower2)


# ----------------------------------------------------------------------------- the cut at level α


def _statistic(b: np.ndarray | int, c: np.ndarray | int, n: int, eps: float) -> np.ndarray | float:
    return (np.asarray(b, dtype=np.float64) - c - n * eps) / np.sqrt(2.0 * np.asarray(c, dtype=np.float64) + n * eps)


Z_STEP = 1e-3  # the family's thresholds z_k = z_first + k·Z_STEP (fixed by (n, ε, α), like everything else)


def _bcrit_for(n: int, eps: float, k_alpha: int, z: float) -> np.ndarray:
    cidx = np.arange(n + 1)
    if math.isinf(z) and z < 0:
        top = np.full(n + 1, -1, dtype=np.int64)
    else:
        c = cidx.astype(np.float64)
        top = np.clip(np.floor(c + n * eps + z * np.sqrt(2.0 * c + n * eps)), -1, n).astype(np.int64)
    out = np.maximum(top, k_alpha)
    return np.clip(np.minimum(out, n - cidx), -1, None).astype(np.int64)


@lru_cache(maxsize=1024)
def _k_alpha(n: int, eps: float, alpha: float) -> tuple[int, float]:
    """Largest k with P(Bin(n, ε) ≤ k) ≤ α (−1 if none) and that probability (bisection: the CDF is
    increasing in k)."""
    if special.bdtr(0.0, n, eps) > alpha:
        return -1, 0.0
    lo, hi = 0, n + 1  # cdf(lo) ≤ α; hi: cdf(n) = 1 > α
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if special.bdtr(float(mid), n, eps) <= alpha:
            lo = mid
        else:
            hi = mid
    return lo, float(special.bdtr(float(lo), n, eps))


def _grid_line(n: int, eps: float, per_sd: float, lo: int, hi: int) -> _Line:
    line = _Line(n, eps)
    line.init(int(min(hi, max(lo, math.ceil(per_sd * math.sqrt(n))))))
    return line


class PairedCut:
    """The anchored paired test at (n, ε, α): the nested family of regions and what is known of their sizes.

    Region k ≥ 0: {b ≤ k_α} ∪ {Z ≤ z_first + k·Z_STEP}; region −1 is the anchor {b ≤ k_α} alone. The
    ideal test rejects (b, c) iff the size (sup over the null) of the smallest region containing it is
    ≤ α. ``k_lo`` is proved (size ≤ α), ``k_hi`` disproved (some g(t) > α, or the whole space); an
    observation whose region lies strictly between gets its own rigorous decision (cells refined until
    proved or disproved, within a budget), remembered here (``proved``, ``failed``). Rejection therefore
    always implies the ideal test rejects (module docstring, 5.).
    """

    def __init__(self, n: int, eps: float, alpha: float, *, quick: bool = False) -> None:
        self.n, self.epsilon, self.alpha = n, eps, alpha
        self.k_alpha, self.binomial_size = _k_alpha(n, eps, alpha)
        self.coarse = _grid_line(n, eps, 0.5, 24, 200)
        self.fine_edges = _grid_line(n, eps, 2.0, 48, 800).edges
        anchor = _bcrit_for(n, eps, self.k_alpha, -math.inf)
        cidx = np.arange(n + 1)
        feasible = anchor < n - cidx
        self._anchor = anchor
        self.k_star: int | None = None
        self.exact: bool | None = None
        self.proved: dict[int, float] = {-1: self.binomial_size}  # k → upper bound of its size (≤ α)
        self.failed: dict[int, tuple[str, float]] = {}  # k → ('disproved' | 'undecided', lower bound)
        self.upper_seen: dict[int, float] = {}  # k → the rigorous size bound its failed decision reached
        if not feasible.any():  # the anchor alone already rejects every (b, c)
            self.z_first, self.k_top, self.k_lo, self.k_hi = math.inf, -1, -1, 0
            self.k_star, self.exact = -1, True
            return
        self.z_first = float(np.min(_statistic(anchor[feasible] + 1, cidx[feasible], n, eps)))
        z_top = float(np.max(_statistic(n - cidx, cidx, n, eps)))
        self.k_top = int(math.ceil((z_top - self.z_first) / Z_STEP)) + 1
        self._search(quick)

    # -- the family
    def z_of(self, k: int) -> float:
        return -math.inf if k < 0 else self.z_first + k * Z_STEP

    def region(self, k: int) -> np.ndarray:
        return self._anchor if k < 0 else _bcrit_for(self.n, self.epsilon, self.k_alpha, self.z_of(k))

    def k_of(self, b: int, c: int) -> int:
        """The smallest k whose region contains (b, c) (−1: the anchor; k_top + 1: none)."""
        if b <= self.k_alpha:
            return -1
        n, eps = self.n, self.epsilon
        z = (b - c - n * eps) / math.sqrt(2.0 * c + n * eps)
        k = max(0, int(math.floor((z - self.z_first) / Z_STEP)) - 2)

        def contains(kk: int) -> bool:
            zz = self.z_first + kk * Z_STEP
            top = np.floor(np.float64(c) + n * eps + zz * np.sqrt(2.0 * np.float64(c) + n * eps))
            return b <= top
        while not contains(k):
            k += 1
            if k > self.k_top + 1:
                return self.k_top + 1
        while k > 0 and contains(k - 1):
            k -= 1
        return k

    # -- sizes
    def _grid_size(self, k: int, edges: np.ndarray) -> float:
        line = _Line(self.n, self.epsilon, edges)
        return float(_boundary_lower(line, self.region(k), edges).max())

    def _decide_k(self, k: int, budget: int = MAX_EVALS) -> str:
        """Rigorous decision on region k: 'proved' (size ≤ α), 'disproved' (some g(t) > α) or 'undecided'.

        Uses what is known: a proved k′ ≥ k proves k, a disproved k′ ≤ k disproves it (the regions are
        nested). Otherwise one pass of coarse cells (cheap; enough away from the boundary), then cells
        refined from the fine grid within ``budget``. Results are remembered; an 'undecided' k is retried
        only through a later proof of some k′ ≥ k.
        """
        if k < 0 or any(kp >= k for kp in self.proved):
            return "proved"
        if k > self.k_top or any(kp <= k and st == "disproved" for kp, (st, _) in self.failed.items()):
            return "disproved"
        if k in self.failed:
            return self.failed[k][0]
        bcrit = self.region(k)
        edges = self.coarse.edges
        first = _cell_bounds(self.coarse, bcrit, edges[:-1], edges[1:])
        if float(first.max()) <= self.alpha:
            self.proved[k] = float(first.max())
            return "proved"
        line = _Line(self.n, self.epsilon, self.fine_edges.copy())
        status, upper, lower = _decide(line, bcrit, self.alpha, budget=budget)
        if status == "proved":
            self.proved[k] = upper
        else:
            self.failed[k] = (status, lower)
            self.upper_seen[k] = upper
        return status

    def settle(self, budget: int = MAX_EVALS) -> int:
        """The largest k of the family whose rigorous decision proves it (bisection over (k_lo, k_hi) with
        the same per-region decisions ``rejects`` uses). Not needed by the test itself (each observation
        gets its own decision); tests and tables use it to get the whole rejection boundary. ``exact`` then
        says whether k + 1 was shown to exceed α (the ideal test's boundary) or only not proved."""
        if self.k_star is None:
            lo, hi = self.k_lo, self.k_hi
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if self._decide_k(mid, budget) == "proved":
                    lo = mid
                else:
                    hi = mid
            self.k_star = max(lo, max(self.proved))
            self.exact = hi > self.k_top or self._decide_k(hi, budget) == "disproved"
        return self.k_star

    def _search(self, quick: bool) -> None:
        self._spent_budget: dict[int, int] = {}
        alpha = self.alpha
        coarse = self.coarse.edges

        def grid_ok(k: int) -> bool:
            return k < 0 or self._grid_size(k, coarse) <= alpha

        # Phase 1 (a coarse grid of t: lower bounds of the sup): the largest k whose grid size is ≤ α.
        k0 = int(min(max(round((float(special.ndtri(alpha)) - self.z_first) / Z_STEP), 0), self.k_top))
        step = 64
        if grid_ok(k0):
            lo, hi = k0, k0 + step
            while hi <= self.k_top and grid_ok(hi):
                lo, hi, step = hi, hi + 2 * step, 2 * step
            hi = min(hi, self.k_top + 1)
        else:
            lo, hi = k0 - step, k0
            while lo >= 0 and not grid_ok(lo):
                hi, lo, step = lo, lo - 2 * step, 2 * step
            lo = max(lo, -1)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if grid_ok(mid):
                lo = mid
            else:
                hi = mid
        if hi <= self.k_top:
            self.failed[hi] = ("disproved", self._grid_size(hi, coarse))
        # Phase 2 (rigorous): prove a region a margin below, widening the margin until proved.
        margin = int(round((80 if quick else 60) * max(1.0, math.sqrt(self.n / 2000))))
        budget = 1500
        k = lo
        while k >= 0:
            line = _Line(self.n, self.epsilon, self.fine_edges.copy())
            status, upper, lower = _decide(line, self.region(k - margin if k == lo else k), alpha, budget=budget)
            kk = k - margin if k == lo else k
            if status == "proved":
                self.proved[max(kk, -1)] = upper
                break
            if status == "disproved":
                self.failed[kk] = (status, lower)
            k = kk - margin
            margin *= 2
        self.k_lo = max(self.proved)
        self.k_hi = hi

    # -- the test
    @property
    def size_upper(self) -> float:
        return self.proved[max(self.proved)]

    def rejects(self, b: int, c: int) -> bool:
        """The anchored test at level α: reject iff the smallest region containing (b, c) is proved ≤ α
        (b ≤ k_α always is); between ``k_lo`` and ``k_hi`` by its own rigorous decision (cached)."""
        return self.rejects_k(self.k_of(b, c))

    def rejects_k(self, k: int) -> bool:
        if k <= self.k_lo:
            return True
        if k >= self.k_hi:
            return False
        return self._decide_k(k) == "proved"

    def proved_bound(self, k: int) -> float:
        """The smallest proved size bound of a region ⊇ region k (1 when none is proved)."""
        return min((v for kp, v in self.proved.items() if kp >= k), default=1.0)

    def final_b_crit(self) -> np.ndarray:
        """The critical boundary of the settled test: reject (b, c) iff b ≤ b_crit[c]."""
        return self.region(self.settle())

    def quick_rejects(self, b: int, c: int) -> bool:
        """Reject only inside a region already proved (no refinement): valid, conservative."""
        return self.k_of(b, c) <= max(self.proved)



@lru_cache(maxsize=512)
def paired_cut(n: int, epsilon: float, alpha: float, quick: bool = False) -> PairedCut:
    """The anchored paired test at level α (cached per (n, ε, α))."""
    n, eps, alpha = int(n), float(epsilon), float(alpha)
    if n < 1:
        raise DataError("paired_cut needs n ≥ 1.")
    if not (0.0 < eps < 1.0 and 0.0 < alpha < 1.0):
        raise ConfigError(f"epsilon and alpha must lie in (0, 1). Got {epsilon!r}, {alpha!r}.")
    return PairedCut(n, eps, alpha, quick=quick)


# ----------------------------------------------------------------------------- p-value and bound


def _check(b: int, c: int, n: int) -> None:
    if b < 0 or c < 0 or b + c > n:
        raise DataError(f"Paired counts need 0 ≤ b, c and b + c ≤ n. Got b={b}, c={c}, n={n}.")


def paired_exact_p_value(b: int, c: int, n: int, epsilon: float, alpha: float) -> float:
    """Valid p-value of the anchored paired test at level α: a rigorous upper bound on its exact sup.

    ≤ α exactly when the test at level α rejects H: p_b − p_c ≥ ε. ``b`` new errors, ``c`` fixed errors.
    Rejected: the smallest proved size bound of a region containing the observation's own, or one pass of
    coarse cells over it; not rejected: cells refined to ~5 % (a small budget) or the bound its own failed
    decision reached, whichever is smaller, and never ≤ α. Cached.
    """
    _check(b, c, n)
    return _p_value_cached(int(b), int(c), int(n), float(epsilon), float(alpha))


@lru_cache(maxsize=65536)
def _p_value_cached(b: int, c: int, n: int, epsilon: float, alpha: float) -> float:
    if n == 0:
        return 1.0
    cut = paired_cut(n, epsilon, alpha)
    k = cut.k_of(b, c)
    if k < 0:  # inside the binomial anchor: {T ≤ T(b, c)} ⊆ {b′ ≤ k_α} ∩ {Z ≤ Z(b, c)}
        z_obs = (b - c - n * cut.epsilon) / math.sqrt(2.0 * c + n * cut.epsilon)
        sub = np.minimum(_bcrit_for(n, cut.epsilon, -1, z_obs + 1e-9 * max(1.0, abs(z_obs))), cut.k_alpha)
        sub[c] = max(sub[c], b)
        sub = np.maximum.accumulate(sub)  # an upper set in c again (only enlarges the region)
        line = _Line(n, cut.epsilon, cut.coarse.edges.copy())
        upper, _ = _sup_upper(line, np.minimum(sub, n - np.arange(n + 1)), budget=0)
        return float(min(upper, cut.binomial_size, cut.size_upper))
    rejected = cut.rejects(b, c)
    if k > cut.k_top:
        upper = 1.0
    else:
        line = _Line(n, cut.epsilon, cut.coarse.edges.copy())
        region = cut.region(k)
        if not rejected:  # far out (the sup is ≥ 0.99 at the observed rate of fixed errors): report 1
            t_hat = np.array([min(c / n, line.t_max)])
            if float(_boundary_lower(line, region, t_hat)[0]) >= 0.99:
                return 1.0
        upper, _ = _sup_upper(line, region, budget=0)
        if not rejected and upper < 0.9:  # refine the bound for the table (not needed for far-out levels)
            upper = min(upper, _sup_upper(_Line(n, cut.epsilon, cut.coarse.edges.copy()), region, budget=150)[0])
        upper = min(upper, cut.upper_seen.get(k, 1.0))
    if rejected:
        # region k ⊆ every proved region k′ ≥ k: their size bounds apply too.
        return float(min(upper, cut.proved_bound(k)))
    # Not rejected: never report ≤ α (an inflated p-value stays valid).
    return float(max(upper, np.nextafter(cut.alpha, 1.0)))


def paired_exact_rejects(b: int, c: int, n: int, epsilon: float, alpha: float) -> bool:
    _check(b, c, n)
    return paired_cut(n, epsilon, alpha).rejects(b, c) if n > 0 else False


UCB_RATIO = 1.1  # the confidence bound's ε′ grid: ε·1.1^j
UCB_BUDGET = 250  # cell evaluations per ε′ of the confidence bound (undecided → not rejected: conservative)


@lru_cache(maxsize=4096)
def _rejects_at(b: int, c: int, n: int, eps: float, alpha: float) -> bool:
    """Does the ideal sup test at (n, ε′, α) reject (b, c), *as far as a small budget can prove*?

    Rigorous decision on the smallest region of the family containing (b, c), from coarse cells:
    'proved' → True; 'disproved' or 'undecided' → False. Valid (it rejects only where the ideal test does),
    conservative near the crossing. Used for the confidence bound's ε′ ≠ ε only.
    """
    k_alpha, _ = _k_alpha(n, eps, alpha)
    if b <= k_alpha:
        return True
    anchor = _bcrit_for(n, eps, k_alpha, -math.inf)
    cidx = np.arange(n + 1)
    feasible = anchor < n - cidx
    z_first = float(np.min(_statistic(anchor[feasible] + 1, cidx[feasible], n, eps)))
    z = (b - c - n * eps) / math.sqrt(2.0 * c + n * eps)
    k = max(0, int(math.ceil((z - z_first) / Z_STEP)))
    bcrit = _bcrit_for(n, eps, k_alpha, z_first + k * Z_STEP)
    while bcrit[c] < b:
        k += 1
        bcrit = _bcrit_for(n, eps, k_alpha, z_first + k * Z_STEP)
    line = _grid_line(n, eps, 0.5, 24, 200)
    return _decide(line, bcrit, alpha, budget=UCB_BUDGET)[0] == "proved"


def paired_exact_upper_bound(b: int, c: int, n: int, epsilon: float, alpha: float) -> float:
    """The matching one-sided (1 − α) upper confidence bound of R = p_b − p_c (for plots and tables).

    The smallest ε′ on the grid ε·1.1^j at which the test rejects: at ε′ = ε the test in use (so the bound
    is ≤ ε exactly when the level is certified), elsewhere the ideal test as far as a small refinement
    budget proves it (valid, a little conservative near the crossing). Returns 1 when no ε′ < 1 rejects.
    A crossing of the inverted test, like the wsr bound: good for plots, not the basis of any certificate.
    """
    _check(b, c, n)
    if n == 0:
        return 1.0
    eps = float(epsilon)
    j_min = -int(math.floor(math.log(eps * n * 10) / math.log(UCB_RATIO))) if eps * n * 10 > 1 else 0
    j_max = int(math.ceil(math.log(0.999 / eps) / math.log(UCB_RATIO)))

    def e(j: int) -> float:
        return float(min(eps * UCB_RATIO ** j, 0.999))

    def rej(j: int) -> bool:
        if j == 0:
            return paired_cut(n, eps, alpha).rejects(b, c)
        return _rejects_at(b, c, n, e(j), alpha)

    # A first guess from the normal approximation, z ≈ Φ⁻¹(α): b − c − nε′ = z·√(2c + nε′).
    z = float(special.ndtri(alpha))
    lo_e, hi_e = 1e-12, 1.0
    for _ in range(60):
        mid = 0.5 * (lo_e + hi_e)
        if b - c - n * mid <= z * math.sqrt(2 * c + n * mid):
            hi_e = mid
        else:
            lo_e = mid
    guess = int(round(math.log(max(hi_e, 1e-12) / eps) / math.log(UCB_RATIO)))
    if rej(0):
        j_hi = 0
        start = min(max(guess, j_min), -1)
        j_lo = None
        step = 1
        j = start
        while True:  # find a j that does not reject, below j_hi
            if rej(j):
                j_hi = j
                if j <= j_min:
                    return e(j)
                j = max(j - step, j_min)
                step *= 2
            else:
                j_lo = j
                break
    else:
        j_lo = 0
        start = max(guess, 1)
        step = 1
        j = min(start, j_max)
        while True:  # find a j that rejects, above j_lo
            if not rej(j):
                j_lo = j
                if j >= j_max:
                    return 1.0
                j = min(j + step, j_max)
                step *= 2
            else:
                j_hi = j
                break
    # Bisection between j_lo (not rejected) and j_hi (rejected), keeping the side of 0 they are on.
    while j_hi - j_lo > 1:
        mid = (j_lo + j_hi) // 2
        if rej(mid):
            j_hi = mid
        else:
            j_lo = mid
    return e(j_hi)


__all__ = ["PairedCut", "paired_cut", "paired_exact_p_value", "paired_exact_rejects", "paired_exact_upper_bound"]
