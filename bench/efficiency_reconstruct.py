"""How much more sparsity does weight reconstruction (and 2:4) certify on digits?

Same set-up as ``bench/efficiency.py`` (whose helpers this reuses): a model trained on 600
digits images; the other 1197 images are the *pool*, treated as the population; each draw
samples n_cal calibration points i.i.d. from the pool. D_tune — for the reconstruction's layer
statistics and for data-driven criteria — is the training set, never the pool, so every
candidate model is fixed before any D_cal draw (SPEC §1) and its pool risk is its true risk.

Rows: plain masking vs masking + reconstruction (``calibration.reconstruct``), unstructured
(grid 0.00 … 0.99) and 2:4 (``calibration.patterns``: level j = the j cheapest layers made 2:4).
Columns: median certified sparsity over the draws, the row's own pool oracle, the *magnitude
pool oracle* (plain magnitude, unstructured — the goal to beat), and the violation frequency
P(R_pool(λ̂) > ε), which must stay ≤ δ up to Monte-Carlo error.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from efficiency import certify_draws, common_parser, digits_case, level_predictions, oracle, pool_draws

from calibration.risks import per_sample_losses


def main(argv: list[str] | None = None) -> None:
    ap = common_parser(__doc__, criteria="magnitude", bounds="binomial")
    ap.add_argument("--procedures", default="fixed_sequence")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    model, xp, xt, yt, y_pool, dense = digits_case()
    print(f"model trained in {time.perf_counter() - t0:.1f}s; dense pool accuracy {np.mean(dense == y_pool):.4f}; "
          f"pool n={len(y_pool)}, n_cal={args.n_cal}, n_tune={len(yt)} (training set), ε={args.epsilon}, "
          f"δ={args.delta}, draws={args.draws}, risk={args.risk}")
    draws = pool_draws(len(y_pool), args.n_cal, args.draws)
    unstructured = np.round(np.arange(0, 1.0, 0.01), 2)
    rows = []
    for criterion in args.criteria.split(","):
        for pattern in (None, "2:4"):
            for reconstruct in (False, True):
                t = time.perf_counter()
                grid, preds = level_predictions(model, xp, xt, yt, criterion, unstructured, pattern=pattern,
                                                reconstruct=reconstruct)
                losses_pool = np.stack([per_sample_losses(args.risk, p, dense, y_pool) for p in preds])
                pool_risk = losses_pool.mean(axis=1)
                orc = oracle(pool_risk, grid, args.epsilon)
                method = ("masking + reconstruction" if reconstruct else "masking") + (f", {pattern}" if pattern else "")
                elapsed = time.perf_counter() - t
                print(f"  {criterion} / {method}: {len(grid)} levels on the pool in {elapsed:.1f}s")
                for bound in args.bounds.split(","):
                    for proc_name in args.procedures.split(","):
                        med, freq = certify_draws(losses_pool, pool_risk, grid, draws, bound, proc_name, args.risk,
                                                  args.epsilon, args.delta)
                        rows.append((criterion, method, bound, proc_name, med, orc, freq, elapsed))
    mag_oracle = next((r[5] for r in rows if r[0] == "magnitude" and r[1] == "masking"), float("nan"))
    print()
    print(f"{'criterion':<10} {'method':<31} {'bound':<9} {'procedure':<15} {'certified(med)':>14} "
          f"{'pool oracle':>11} {'/ mag. oracle':>13} {'violations':>10} {'levels s':>8}")
    for c, m, b, p, med, orc, freq, el in rows:
        print(f"{c:<10} {m:<31} {b:<9} {p:<15} {med:>14.3f} {orc:>11.3f} {med / mag_oracle:>13.2f} {freq:>10.3f} "
              f"{el:>8.1f}")
    best = max((r for r in rows if "reconstruction" in r[1] and "2:4" not in r[1]), key=lambda r: r[4], default=None)
    if best is not None:
        verdict = "meets" if best[4] >= mag_oracle else "misses"
        print(f"\ngoal: certified sparsity with reconstruction ({best[0]}/{best[2]}/{best[3]}) {best[4]:.3f} "
              f"{verdict} the magnitude pool oracle {mag_oracle:.3f}")


if __name__ == "__main__":
    main()
