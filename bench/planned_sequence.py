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
Run: ``python bench/planned_sequence.py [--draws 100] [--bound auto] [--tune-sizes 0.05,0.1,0.15,200]``
(the D_tune sizes of the planned arm; every arm sees the same drawn jobs).
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


def planned_job(losses, cal_idx, tune_idx, bound, risk, eps, delta, **shape) -> tuple[int, int, int]:
    """(certified index, levels on D_cal, levels on D_tune); ``shape``: plan_sequence's window and ladder."""
    n_cal = len(cal_idx)
    plan = plan_sequence(losses.shape[0], lambda j: j == 0 or predict_pass(bound, risk, losses[j, tune_idx], n_cal,
                                                                         eps, delta), **shape)
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
    ap.add_argument("--tune-sizes", default=str(PLANNING_TUNE_FRACTION),
                    help="comma list of D_tune sizes for the planned arm: a fraction of N (< 1) or a count (≥ 1), "
                         "e.g. 0.05,0.1,0.15,200 (the sweep behind the default tune fraction)")
    ap.add_argument("--shapes", default="",
                    help="semicolon list of plan shapes window_below/window_above/ladder_steps, e.g. '2/3/3;8/3/3' "
                         "(default: plan_sequence's defaults)")
    args = ap.parse_args()
    shapes = [dict(zip(("window_below", "window_above", "ladder_steps"), map(int, v.split("/"))))
              for v in args.shapes.split(";") if v] or [{}]
    tune_sizes = [float(v) for v in args.tune_sizes.split(",")]
    model, xp, xt, yt, y_pool, dense = digits_case()
    grid = np.round(np.arange(100) / 100, 2)
    _, preds = level_predictions(model, xp, xt, yt, "magnitude", grid)
    risk = args.risk
    bound = resolve_bound(args.bound, risk)
    losses = np.stack([per_sample_losses(risk, p, dense, y_pool) for p in preds])
    pool_risk = losses.mean(axis=1)
    rng = np.random.default_rng(2026)
    print(f"digits pool {len(y_pool)}, grid of {len(grid)} levels, risk {risk}, bound {bound}, δ = {args.delta}, "
          f"{args.draws} jobs per row; planned: D_tune sizes {args.tune_sizes} (fraction of N, or a count)")
    print(f"{'N':>6} {'ε':>6} {'oracle':>6} | {'fixed':>6} {'mean':>5} {'viol':>5} {'cal lv':>6} {'fwd/job':>9} | "
          f"{'n_tune':>6} {'shape':>7} {'median':>6} {'mean':>5} {'viol':>5} {'cal lv':>6} {'tune lv':>7} "
          f"{'fwd/job':>9} | {'fwd ratio':>9}")
    for n in (int(v) for v in args.n_cal_grid.split(",")):
        for eps in (float(v) for v in args.epsilon_grid.split(",")):
            orc = oracle(pool_risk, grid, eps)
            draws = [rng.integers(0, len(y_pool), n) for _ in range(args.draws)]  # the same jobs for every arm
            f_cert, f_viol, f_lv = [], 0, []
            for idx in draws:
                j, lv = fixed_sequence_job(losses, idx, bound, risk, eps, args.delta)
                f_cert.append(grid[j]), f_lv.append(lv)
                f_viol += pool_risk[j] > eps
            f_fwd = np.mean(f_lv) * n
            for size, shape in ((size, shape) for size in tune_sizes for shape in shapes):
                n_tune = int(round(size * n)) if size < 1 else min(int(size), n - 1)
                t0 = time.perf_counter()
                p_cert, p_viol, p_lv, p_tlv = [], 0, [], []
                for idx in draws:
                    j, lv, tlv = planned_job(losses, idx[n_tune:], idx[:n_tune], bound, risk, eps, args.delta,
                                             **shape)
                    p_cert.append(grid[j]), p_lv.append(lv), p_tlv.append(tlv)
                    p_viol += pool_risk[j] > eps
                p_fwd = np.mean(p_lv) * (n - n_tune) + np.mean(p_tlv) * n_tune
                label = "/".join(str(v) for v in shape.values()) or "default"
                print(f"{n:>6} {eps:>6.3f} {orc:>6.2f} | {np.median(f_cert):>6.2f} {np.mean(f_cert):>5.3f} "
                      f"{f_viol / args.draws:>5.2f} {np.mean(f_lv):>6.1f} {f_fwd:>9.0f} | {n_tune:>6} {label:>7} "
                      f"{np.median(p_cert):>6.2f} {np.mean(p_cert):>5.3f} {p_viol / args.draws:>5.2f} "
                      f"{np.mean(p_lv):>6.1f} {np.mean(p_tlv):>7.1f} {p_fwd:>9.0f} | "
                      f"{f_fwd / p_fwd:>8.1f}×   ({time.perf_counter() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
