"""How much sparsity does each criterion × bound certify on real data, against the pool oracle?

Digits (scikit-learn, no download): a model trained on 600 images; the remaining 1197 images are
the *pool*, treated as the population. Each draw samples n_cal calibration points i.i.d. (with
replacement) from the pool, so the pool's risk curve is the true one and violations are exact.
D_tune for the data-driven criteria (mu, obd) is the training set — never the pool — so it is
disjoint from every D_cal draw.

Prints, per criterion × bound × procedure: median certified sparsity over the draws, the pool
oracle (largest level, scanning the grid in the same fixed order, whose pool risk is ≤ ε: exactly
what fixed-sequence testing could find with infinite data), the ratio, and the violation
frequency P(R_pool(λ̂) > ε), which must be ≤ δ up to Monte-Carlo error.

``--n-cal-grid 600,2000,10000 --epsilon-grid 0.005,0.01,0.02`` prints instead one row per
(n_cal, ε, procedure) with a column group per bound (median certified sparsity, violation
frequency, mean test time per draw), beside the pool oracle: the table in the README.
``--models mlp,cnn`` adds the same table for a CNN with BatchNorm (trained here on the same 600
images; BN statistics re-estimated on D_tune at every pruned level, as the engine does, which is
where pruning *fixes* errors and the paired test gains most).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from calibration import batchnorm  # noqa: E402
from calibration.criteria import ScoreContext, get_criterion  # noqa: E402
from calibration.engine import predict  # noqa: E402
from calibration.masks import NestedMasks, apply_masks, restore  # noqa: E402
from calibration.model import find_prunable  # noqa: E402
from calibration.patterns import PatternMasks  # noqa: E402
from calibration.p_values import p_value  # noqa: E402
from calibration.procedures import get_procedure  # noqa: E402
from calibration.reconstruct import Reconstructor  # noqa: E402
from calibration.risks import per_sample_losses  # noqa: E402
from make_digits_example import digits_split, train_mlp  # noqa: E402


def level_predictions(module, x_pool, x_tune, y_tune, criterion, grid, *, pattern=None, reconstruct=False, seed=0,
                      bn_tune=False):
    """(grid, (n_levels, n_pool) predictions): masks from ``criterion``, optionally reconstructed on D_tune;
    ``bn_tune``: BatchNorm statistics re-estimated on D_tune at every pruned level (as the engine does)."""
    weights = find_prunable(module)
    params = [w.param for w in weights]
    originals = [p.detach().clone() for p in params]
    ctx = ScoreContext(module=module, weights=weights, tune_x=x_tune, tune_y=y_tune, batch_size=256, seed=seed)
    scores = get_criterion(criterion)(ctx)
    restore(params, originals)
    if pattern:
        masks = PatternMasks.from_scores(scores, "global", [w.module_type for w in weights])
        grid = np.asarray(masks.sparsities)
    else:
        masks = NestedMasks.from_scores(scores, "global")
    rec = Reconstructor.from_tune(module, weights, x_tune, 256) if reconstruct else None
    bn_dense = batchnorm.snapshot(module) if bn_tune else None
    preds = []
    for s in grid:
        keep = masks.keep_masks(float(s))
        apply_masks(params, originals, keep)
        if rec is not None:
            rec.apply(params, originals, keep)
        if bn_dense is not None and s > 0:
            batchnorm.reestimate(module, x_tune, 256)
        preds.append(predict(module, x_pool, 1024).numpy())
        if bn_dense is not None:
            batchnorm.load_snapshot(module, bn_dense)
    restore(params, originals)
    return grid, np.stack(preds)


def oracle(pool_risk: np.ndarray, grid: np.ndarray, eps: float) -> float:
    """Largest level of the leading run whose pool risk is ≤ ε (the fixed-sequence ideal)."""
    ok = pool_risk <= eps
    run = np.argmin(ok) if not ok.all() else len(ok)
    return float(grid[run - 1]) if run > 0 else 0.0


def certify_draws(losses_pool, pool_risk, grid, draws, bound, proc_name, risk, eps, delta, *, timings=None):
    """Median certified sparsity and violation frequency over the D_cal draws (fixed grid, LTT).

    Every test runs at the procedure's per-test level (δ for fixed-sequence, δ/K for Bonferroni), as
    in the engine; ``timings`` (a list) receives the seconds the tests of each draw took.
    """
    proc = get_procedure(proc_name)
    alpha = proc.level_alpha(delta, len(grid))
    certified, violations = [], 0
    for idx in draws:
        t0 = time.perf_counter()
        pv = np.full(len(grid), np.nan)
        start = 0
        if risk != "error_rate":
            pv[0] = 0.0  # level 0 is the dense model: risk 0 by definition
            start = 1
        for j in range(start, len(grid)):
            pv[j] = p_value(bound, risk, losses_pool[j, idx], eps, alpha=alpha)
            if proc.stops_early and pv[j] > delta:
                break
        if timings is not None:
            timings.append(time.perf_counter() - t0)
        sel = proc.select(proc.rejected(pv, delta), grid)
        j = sel if sel is not None else 0
        violations += pool_risk[j] > eps
        certified.append(float(grid[j]))
    return float(np.median(certified)), violations / len(draws)


class DigitsCNN(torch.nn.Module):
    """An MNIST-style CNN with BatchNorm for the 8×8 digits: (N, 64) → (N, 10)."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        nn = torch.nn
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2))
        self.head = nn.Linear(2 * width * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x.reshape(-1, 1, 8, 8)), 1))


def train_cnn(x: np.ndarray, y: np.ndarray, *, epochs: int = 15, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(yt)).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


MODELS = {"mlp": "64→256→256→10 MLP", "cnn": "CNN + BatchNorm (3 conv, BN re-estimated on D_tune per level)"}


def digits_case(model_name: str = "mlp"):
    """The scripted digits model, pool inputs, D_tune (the training set) and the dense pool predictions."""
    torch.manual_seed(0)
    x_train, y_train, x_pool, y_pool = digits_split()
    trained = train_cnn(x_train, y_train) if model_name == "cnn" else train_mlp(x_train, y_train)
    model = torch.jit.script(trained)
    for p in model.parameters():
        p.requires_grad_(False)
    xp, xt, yt = torch.from_numpy(x_pool), torch.from_numpy(x_train), torch.from_numpy(y_train)
    return model, xp, xt, yt, y_pool, predict(model, xp, 1024).numpy()


def common_parser(doc: str | None, *, criteria: str, bounds: str) -> argparse.ArgumentParser:
    """The digits benchmarks' shared options (draws, n_cal, ε, δ, criteria, bounds, risk)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draws", type=int, default=50)
    ap.add_argument("--n-cal", type=int, default=600)
    ap.add_argument("--epsilon", type=float, default=0.02)
    ap.add_argument("--delta", type=float, default=0.1)
    ap.add_argument("--criteria", default=criteria)
    ap.add_argument("--bounds", default=bounds)
    ap.add_argument("--risk", default="accuracy_drop")
    ap.add_argument("--n-cal-grid", default="", help="comma list: run the (n_cal, ε) table instead")
    ap.add_argument("--epsilon-grid", default="0.005,0.01,0.02")
    ap.add_argument("--procedures", default="fixed_sequence,bonferroni")
    ap.add_argument("--models", default="mlp", help="comma list of mlp, cnn (the (n_cal, ε) table only)")
    return ap


def pool_draws(n_pool: int, n_cal: int, draws: int) -> list[np.ndarray]:
    """The calibration draws (indices into the pool, with replacement), fixed for every row."""
    rng = np.random.default_rng(12345)
    return [rng.integers(0, n_pool, n_cal) for _ in range(draws)]


def grid_table(args, model, xp, xt, yt, y_pool, dense, *, bn_tune=False) -> None:
    """One row per (n_cal, ε, procedure): each bound's median certified sparsity, violation frequency and
    mean test time per draw, against the pool oracle (magnitude criterion, the first of --criteria)."""
    grid = np.round(np.arange(0, 1.0, 0.01), 2)
    criterion = args.criteria.split(",")[0]
    grid, preds = level_predictions(model, xp, xt, yt, criterion, grid, bn_tune=bn_tune)
    losses_pool = np.stack([per_sample_losses(args.risk, p, dense, y_pool) for p in preds])
    pool_risk = losses_pool.mean(axis=1)
    bounds = args.bounds.split(",")
    head = f"{'n_cal':>6} {'ε':>6} {'procedure':<15} {'oracle':>6} " + " ".join(
        f"{b + ' med':>17} {'viol':>5} {'s/draw':>7}" for b in bounds)
    print(f"criterion {criterion}, risk {args.risk}, δ = {args.delta}, draws = {args.draws}")
    print(head, flush=True)
    for n_cal in [int(v) for v in args.n_cal_grid.split(",")]:
        draws = pool_draws(len(y_pool), n_cal, args.draws)
        for eps in [float(v) for v in args.epsilon_grid.split(",")]:
            orc = oracle(pool_risk, grid, eps)
            for proc_name in args.procedures.split(","):
                cells = []
                for bound in bounds:
                    times: list[float] = []
                    med, freq = certify_draws(losses_pool, pool_risk, grid, draws, bound, proc_name, args.risk,
                                              eps, args.delta, timings=times)
                    cells.append(f"{med:>17.2f} {freq:>5.3f} {np.mean(times):>7.3f}")
                print(f"{n_cal:>6} {eps:>6} {proc_name:<15} {orc:>6.2f} " + " ".join(cells), flush=True)


def main(argv: list[str] | None = None) -> None:
    args = common_parser(__doc__, criteria="magnitude,mu,obd,random", bounds="binomial,hb,wsr,paired_exact").parse_args(argv)
    t0 = time.perf_counter()
    if args.n_cal_grid:
        for name in args.models.split(","):
            t0 = time.perf_counter()
            model, xp, xt, yt, y_pool, dense = digits_case(name)
            print(f"{MODELS[name]}: trained in {time.perf_counter() - t0:.1f}s; dense pool accuracy "
                  f"{np.mean(dense == y_pool):.4f}; pool n={len(y_pool)}")
            grid_table(args, model, xp, xt, yt, y_pool, dense, bn_tune=name == "cnn")
        return
    model, xp, xt, yt, y_pool, dense = digits_case()
    grid = np.round(np.arange(0, 1.0, 0.01), 2)
    print(f"model trained in {time.perf_counter() - t0:.1f}s; dense pool accuracy {np.mean(dense == y_pool):.4f}; "
          f"pool n={len(y_pool)}, n_cal={args.n_cal}, ε={args.epsilon}, δ={args.delta}, draws={args.draws}, "
          f"risk={args.risk}")
    draws = pool_draws(len(y_pool), args.n_cal, args.draws)
    rows = []
    best_valid = (0.0, "")
    for criterion in args.criteria.split(","):
        t = time.perf_counter()
        grid, preds = level_predictions(model, xp, xt, yt, criterion, grid)
        losses_pool = np.stack([per_sample_losses(args.risk, p, dense, y_pool) for p in preds])
        pool_risk = losses_pool.mean(axis=1)
        orc = oracle(pool_risk, grid, args.epsilon)
        for bound in args.bounds.split(","):
            for proc_name in ("fixed_sequence", "bonferroni"):
                med, freq = certify_draws(losses_pool, pool_risk, grid, draws, bound, proc_name, args.risk,
                                          args.epsilon, args.delta)
                rows.append((criterion, bound, proc_name, med, orc, med / orc if orc else float("nan"), freq))
                if med > best_valid[0] and freq <= args.delta + 3 * np.sqrt(args.delta * (1 - args.delta) / len(draws)):
                    best_valid = (med, f"{criterion}/{bound}/{proc_name}")
        print(f"  {criterion}: scored and evaluated 100 levels on the pool in {time.perf_counter() - t:.1f}s")
    print()
    print(f"{'criterion':<10} {'bound':<9} {'procedure':<15} {'certified(med)':>14} {'pool oracle':>11} "
          f"{'ratio':>6} {'violations':>10}")
    for c, b, p, med, orc, ratio, freq in rows:
        print(f"{c:<10} {b:<9} {p:<15} {med:>14.2f} {orc:>11.2f} {ratio:>6.2f} {freq:>10.3f}")
    mag_oracle = next(r[4] for r in rows if r[0] == "magnitude") if any(r[0] == "magnitude" for r in rows) else float("nan")
    print()
    print(f"best valid configuration: {best_valid[1]} certifies {best_valid[0]:.2f} "
          f"(= {best_valid[0] / mag_oracle:.2f} × the magnitude pool oracle {mag_oracle:.2f})")


if __name__ == "__main__":
    main()
