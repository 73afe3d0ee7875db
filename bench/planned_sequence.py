"""Planned testing sequence vs fixed-sequence over the whole grid: certified sparsity, validity, passes.

Digits (scikit-learn, no download), the benchmarks' MLP and pool (``bench/efficiency.py``): each job
draws N samples i.i.d. from the pool (the population). ``fixed_sequence`` puts all N into D_cal and
walks the 100-level grid from the bottom; ``planned`` splits them as the engine does (10 % D_tune,
90 % D_cal), plans on D_tune (``calibration.planned_sequence``) and tests only the plan on D_cal.
Magnitude scores need no data, so every candidate is the same in both arms and the pool's per-level
losses are exact for any draw.

Prints per (N, ε): median certified sparsity, the pool oracle, violation frequency P(R_pool(λ̂) > ε)
(must be ≤ δ up to Monte-Carlo error), levels evaluated on D_cal and D_tune, and sample-forwards
(levels × samples, the work a GPU does) per job.
Run: ``python bench/planned_sequence.py [--draws 100] [--bound auto]``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from efficiency import common_parser, digits_case, level_predictions, oracle  # noqa: E402

from calibration.p_values import p_value, resolve_bound  # noqa: E402
from calibration.planned_sequence import plan_sequence, predict_pass  # noqa: E402
from calibration.config import PLANNING_TUNE_FRACTION  # noqa: E402
from calibration.risks import per_sample_losses  # noqa: E402


def fixed_sequence_job(losses, idx, bound, risk, eps, delta) -> tuple[int, int]:
    """(certified index, levels evaluated on D_cal); level 0 is the dense model (risk 0, not tested)."""
    last = 0
    for j in range(1, losses.shape[0]):
        if p_value(bound, risk, losses[j, idx], eps, alpha=delta) > delta:
            return last, j
        last = j
    return last, losses.shape[0] - 1


def planned_job(losses, cal_idx, tune_idx, bound, risk, eps, delta) -> tuple[int, int, int]:
    """(certified index, levels on D_cal, levels on D_tune)."""
    n_cal = len(cal_idx)
    plan = plan_sequence(losses.shape[0], lambda j: j == 0 or predict_pass(bound, risk, losses[j, tune_idx], n_cal,
                                                                         eps, delta))
    last, tested = 0, 0
    for j in plan.sequence:
        if j == 0:
            continue
        tested += 1
        if p_value(bound, risk, losses[j, cal_idx], eps, alpha=delta) > delta:
            break
        last = j
    return last, tested, len(plan.tune_evaluated)


def main() -> None:
    ap = common_parser(__doc__, criteria="magnitude", bounds="auto")
    ap.set_defaults(n_cal_grid="600,2000,10000", epsilon_grid="0.01,0.02", draws=100)
    ap.add_argument("--bound", default="auto")
    args = ap.parse_args()
    model, xp, xt, yt, y_pool, dense = digits_case()
    grid = np.round(np.arange(100) / 100, 2)
    _, preds = level_predictions(model, xp, xt, yt, "magnitude", grid)
    risk = args.risk
    bound = resolve_bound(args.bound, risk)
    losses = np.stack([per_sample_losses(risk, p, dense, y_pool) for p in preds])
    pool_risk = losses.mean(axis=1)
    rng = np.random.default_rng(2026)
    print(f"digits pool {len(y_pool)}, grid of {len(grid)} levels, risk {risk}, bound {bound}, δ = {args.delta}, "
          f"{args.draws} jobs per row; planned: {PLANNING_TUNE_FRACTION:.0%} of N for D_tune")
    print(f"{'N':>6} {'ε':>6} {'oracle':>6} | {'fixed: median':>13} {'viol':>5} {'cal lv':>6} {'fwd/job':>9} | "
          f"{'planned: median':>15} {'viol':>5} {'cal lv':>6} {'tune lv':>7} {'fwd/job':>9} | {'fwd ratio':>9}")
    for n in (int(v) for v in args.n_cal_grid.split(",")):
        n_tune = int(round(PLANNING_TUNE_FRACTION * n))
        for eps in (float(v) for v in args.epsilon_grid.split(",")):
            orc = oracle(pool_risk, grid, eps)
            f_cert, f_viol, f_lv, p_cert, p_viol, p_lv, p_tlv = [], 0, [], [], 0, [], []
            t0 = time.perf_counter()
            for _ in range(args.draws):
                idx = rng.integers(0, len(y_pool), n)
                j, lv = fixed_sequence_job(losses, idx, bound, risk, eps, args.delta)
                f_cert.append(grid[j]), f_lv.append(lv)
                f_viol += pool_risk[j] > eps
                j, lv, tlv = planned_job(losses, idx[n_tune:], idx[:n_tune], bound, risk, eps, args.delta)
                p_cert.append(grid[j]), p_lv.append(lv), p_tlv.append(tlv)
                p_viol += pool_risk[j] > eps
            f_fwd = np.mean(f_lv) * n
            p_fwd = np.mean(p_lv) * (n - n_tune) + np.mean(p_tlv) * n_tune
            print(f"{n:>6} {eps:>6.3f} {orc:>6.2f} | {np.median(f_cert):>13.2f} {f_viol / args.draws:>5.2f} "
                  f"{np.mean(f_lv):>6.1f} {f_fwd:>9.0f} | {np.median(p_cert):>15.2f} {p_viol / args.draws:>5.2f} "
                  f"{np.mean(p_lv):>6.1f} {np.mean(p_tlv):>7.1f} {p_fwd:>9.0f} | {f_fwd / p_fwd:>8.1f}×"
                  f"   ({time.perf_counter() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
