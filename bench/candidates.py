"""Better candidates, same guarantee: criterion × {one-shot, +reconstruct, +finetune, both} (issue 14).

Learn then Test holds for any candidate that is a function of D_tune alone (``calibration.candidates``),
so every grid level's pruned model may be reconstructed (``calibration.reconstruct``) and/or fine-tuned
with its mask fixed (``calibration.finetune``) before its one test. This measures what that buys, on the
pool / draw / oracle method of ``bench/efficiency.py``:

Data. scikit-learn digits, ``digits_split()`` (seed 0), exactly as efficiency.py: the first 600 images of
the permutation are for training, the other 1197 are the *pool*, treated as the population. Unlike
efficiency.py (whose D_tune is the training set itself), the 600 are split: the model is trained on the
first ``--n-train`` (450) and the remaining 150 are D_tune, held out from training and disjoint from the
pool, so fine-tuning, reconstruction, BN statistics and the data criteria see images the model was not
trained on, and never a calibration point.

Models (trained here, ``torch.manual_seed(0)``, SGD + momentum as ``bench/mu_study.py``: lr 0.05,
momentum 0.9, weight decay 5e-4, batch 32, 40 epochs; ``TrainingStatsRecorder(start_after=half)``
records the σ of the iterates over the second half of training, the file a user uploads for ``mu``):
``mlp``: mu_study's 64→256→256→10 ReLU MLP; ``cnn``: efficiency.py's ``DigitsCNN`` (3 conv + BatchNorm).
Each is saved as TorchScript and loaded back with ``calibration.model.load_model``, as the engine sees it.

Candidates. For each criterion (magnitude; mu with the uploaded statistics; obd on D_tune; random
optional) the scores and global nested masks are computed once, then every variant's candidate of every
grid level is built ONCE from D_tune with the engine's own wiring (``engine._candidate_builder`` → the real
``CandidateBuilder``; for the CNN its ``BatchNormChooser``, bn_statistics "choose", in every variant, as
the engine does by default) and the default ``FinetuneConfig`` (200 steps, relative lr 0.02, batch 64,
loss auto → distillation to the dense outputs); fine-tuning seeds are (job seed 0, level index) as in the engine.
Each candidate predicts the whole pool: per pool sample 0/1-based accuracy_drop losses against the labels
and the dense model (∈ {−1, 0, 1}).

Certification. ≥ 50 draws (``pool_draws``: n_cal = 1000 indices with replacement from the pool, the same
draws for every row); per draw the fixed-sequence test over the grid with the default bound for
accuracy_drop (``resolve_bound("auto", "accuracy_drop")`` = paired_exact), δ = 0.1, ε ∈ {0.01, 0.02}
(``efficiency.certify_draws``). Reported per row and ε: the median certified sparsity, the pool oracle
(``efficiency.oracle``: the end of the leading run of grid levels whose pool risk is ≤ ε — what
fixed-sequence testing finds with infinite data) and the violation frequency P(R_pool(λ̂) > ε) (must be
≤ δ up to Monte-Carlo error). "build s": seconds to build all the row's candidates over the full grid
and predict the pool (no early stop). "job s": wall time of one real end-to-end ``calibration.certify``
job on the saved TorchScript model and an npz of the 1197 pool rows (tune_fraction 0.25, so D_tune =
299 pool rows and n_cal = 898; same grid, ε = the largest of --epsilons, fixed-sequence, early stop), and
"job λ̂" the sparsity that job certified — a single draw, a different D_tune, for scale only.

Grid (``GRID``): 0, 0.3, 0.4, 0.5, 0.55, then 0.60, 0.61, …, 0.98 (44 levels; the CNN's risk rises
from 0.6 on, so the fine part starts there). "R@.3": the pool risk at 0.3 (a fine-tuning floor shows
there); "acc@.9": the pool accuracy at 0.9.

    python bench/candidates.py                   # both models, 100 draws (≈ 15 min on 2 busy cores)
    python bench/candidates.py --models mlp --draws 50 --criteria magnitude,mu,obd,random
    python bench/candidates.py --quick           # smoke test: coarse grid, 20 fine-tuning steps, 10 draws
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "bench"))

from calibration import certify  # noqa: E402
from calibration.config import FinetuneConfig, validate_config  # noqa: E402
from calibration.criteria import ScoreContext, get_criterion  # noqa: E402
from calibration.engine import _candidate_builder  # noqa: E402
from calibration.fast_eval import Predictor  # noqa: E402
from calibration.masks import NestedMasks, restore  # noqa: E402
from calibration.model import batchnorm_modules, discover_prunable, load_model  # noqa: E402
from calibration.p_values import resolve_bound  # noqa: E402
from calibration.reconstruct import Reconstructor  # noqa: E402
from calibration.risks import per_sample_losses  # noqa: E402
from calibration.uncertainty import TrainingStatsRecorder, load_uncertainty  # noqa: E402
from efficiency import DigitsCNN, certify_draws, oracle, pool_draws  # noqa: E402
from make_digits_example import digits_split  # noqa: E402
from mu_study import BATCH, EPOCHS, LR, MOMENTUM, mlp  # noqa: E402

RISK = "accuracy_drop"
PROCEDURE = "fixed_sequence"
WEIGHT_DECAY = 5e-4
GRID = [0.0, 0.3, 0.4, 0.5, 0.55] + [round(0.60 + 0.01 * i, 2) for i in range(39)]
QUICK_GRID = [0.0, 0.3, 0.5, 0.7, 0.8, 0.85, 0.9, 0.95]
VARIANTS = {  # name → (reconstruct, finetune)
    "one-shot": (False, False),
    "+reconstruct": (True, False),
    "+finetune": (False, True),
    "both": (True, True),
}
MODEL_NAMES = {"mlp": "64→256→256→10 MLP", "cnn": "DigitsCNN (3 conv + BatchNorm, BN statistics chosen per level)"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def train_recorded(name: str, x: np.ndarray, y: np.ndarray, *, seed: int = 0):
    """mu_study's recipe (SGD + momentum) with a TrainingStatsRecorder over the second half: (eager model, recorder)."""
    torch.manual_seed(seed)
    model = mlp() if name == "mlp" else DigitsCNN()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    n = len(yt)
    total = EPOCHS * math.ceil(n / BATCH)
    rec = TrainingStatsRecorder(model, start_after=total // 2)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(EPOCHS):
        for idx in torch.randperm(n, generator=gen).split(BATCH):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
            rec.update()
    return model.eval(), rec


@dataclass
class Case:
    name: str
    model_path: str
    stats_path: str
    pool_path: str
    x_pool: torch.Tensor
    y_pool: np.ndarray
    x_tune: torch.Tensor
    y_tune: torch.Tensor
    dense_pool: np.ndarray
    train_s: float


def make_case(name: str, folder: Path, n_train: int) -> Case:
    """Train, save (TorchScript, training statistics, pool npz), and the dense pool predictions."""
    t = time.perf_counter()
    x_train, y_train, x_pool, y_pool = digits_split()
    model, rec = train_recorded(name, x_train[:n_train], y_train[:n_train])
    train_s = time.perf_counter() - t
    model_path, stats_path, pool_path = (str(folder / f"{name}{s}") for s in (".pt", ".safetensors", "_pool.npz"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(model), model_path)
    rec.save(stats_path)
    np.savez(pool_path, x=x_pool, y=y_pool)
    module = load_model(model_path)
    xp = torch.from_numpy(x_pool)
    with Predictor(module, 512, device="cpu") as predictor:
        dense = predictor.predict(xp).numpy()
    return Case(name, model_path, stats_path, pool_path, xp, y_pool, torch.from_numpy(x_train[n_train:]),
                torch.from_numpy(y_train[n_train:]), dense, train_s)


def candidate_losses(case: Case, criterion: str, variant: str, grid: list[float],
                     finetune: FinetuneConfig) -> tuple[np.ndarray, float, dict[str, int]]:
    """(n_levels, n_pool) accuracy_drop losses of every level's candidate (built once, from D_tune only),
    the seconds it took, and the BN statistics chosen (CNN)."""
    reconstruct, tune = VARIANTS[variant]
    cfg = validate_config({"criterion": [criterion], "sparsities": grid, "reconstruct": reconstruct,
                           "finetune": None if not tune else {"steps": finetune.steps, "lr": finetune.lr,
                                                              "batch_size": finetune.batch_size,
                                                              "loss": finetune.loss},
                           "seed": 0})
    t0 = time.perf_counter()
    module = load_model(case.model_path)
    weights = discover_prunable(module, exclude_first_last=cfg.exclude_first_last).weights
    params = [w.param for w in weights]
    originals = [p.detach().clone() for p in params]
    use_bn = bool(batchnorm_modules(module))
    x_tune, y_tune = case.x_tune, case.y_tune
    unc = load_uncertainty(case.stats_path, weights) if criterion == "mu" else None
    ctx = ScoreContext(module=module, weights=weights, tune_x=x_tune, tune_y=y_tune, batch_size=cfg.batch_size,
                       seed=cfg.seed, uncertainty=unc, mu_steps=cfg.mu_steps, mu_lr=cfg.mu_lr,
                       obd_samples=cfg.obd_samples, output=cfg.output)
    scores = get_criterion(criterion)(ctx)
    restore(params, originals)
    masks = NestedMasks.from_scores(scores, cfg.scope)
    reconstructor = Reconstructor.from_tune(module, weights, x_tune, cfg.batch_size) if reconstruct else None
    chosen: dict[str, int] = {}
    losses = []
    with Predictor(module, cfg.batch_size, device="cpu") as predictor:
        dense_tune_np = predictor.predict(x_tune).numpy()
        builder = _candidate_builder(cfg, module, params, None, reconstructor, predictor, x_tune, use_bn=use_bn,
                                     risk=RISK, dense_tune_np=dense_tune_np, y_tune=y_tune,
                                     y_tune_np=y_tune.numpy(), mask_tune=None)
        for j, s in enumerate(grid):
            if s == 0.0:
                pred = case.dense_pool  # λ = 0 is the dense model itself, as in the engine
            else:
                builder.build(masks.keep_masks(s), j)
                pred = predictor.predict(case.x_pool).numpy()
            losses.append(per_sample_losses(RISK, pred, case.dense_pool, case.y_pool))
        if builder.bn is not None:
            chosen = dict(builder.bn.chosen)
        builder.reset()
    return np.stack(losses), time.perf_counter() - t0, chosen


def engine_job(case: Case, criterion: str, variant: str, grid: list[float], eps: float, delta: float,
               finetune: FinetuneConfig) -> tuple[float, float, int]:
    """One real end-to-end job: (wall seconds, certified sparsity, levels evaluated)."""
    reconstruct, tune = VARIANTS[variant]
    cfg = {"criterion": [criterion], "epsilon": eps, "delta": delta, "sparsities": grid, "tune_fraction": 0.25,
           "reconstruct": reconstruct, "seed": 0,
           "finetune": ({"steps": finetune.steps, "lr": finetune.lr, "batch_size": finetune.batch_size,
                         "loss": finetune.loss} if tune else None)}
    t = time.perf_counter()
    cert = certify(case.model_path, case.pool_path, cfg, uncertainty=case.stats_path if criterion == "mu" else None)
    return time.perf_counter() - t, cert.certified_sparsity, int(cert.result["levels_evaluated"])


def run_model(args, name: str, folder: Path, grid: list[float], finetune: FinetuneConfig) -> None:
    case = make_case(name, folder, args.n_train)
    epsilons = [float(e) for e in args.epsilons.split(",")]
    job_eps = max(epsilons)
    bound = resolve_bound("auto", RISK)
    draws = pool_draws(len(case.y_pool), args.n_cal, args.draws)
    dense_acc = float(np.mean(case.dense_pool == case.y_pool))
    print(f"\n== {MODEL_NAMES[name]}: trained on {args.n_train} in {case.train_s:.1f}s; dense pool accuracy "
          f"{dense_acc:.4f}; pool n={len(case.y_pool)}; D_tune = {len(case.y_tune)} held-out training images", flush=True)
    rows = []
    for criterion in args.criteria.split(","):
        for variant in VARIANTS:
            losses, build_s, chosen = candidate_losses(case, criterion, variant, grid, finetune)
            pool_risk = losses.mean(axis=1)
            acc = 1.0 - (losses + (case.dense_pool != case.y_pool)).mean(axis=1)  # pool accuracy per level
            cells = {}
            for eps in epsilons:
                med, freq = certify_draws(losses, pool_risk, np.asarray(grid), draws, bound, PROCEDURE, RISK, eps,
                                          args.delta)
                cells[eps] = (med, oracle(pool_risk, np.asarray(grid), eps), freq)
            job = engine_job(case, criterion, variant, grid, job_eps, args.delta, finetune) if not args.no_jobs \
                else (float("nan"), float("nan"), 0)
            acc90 = float(acc[grid.index(0.9)]) if 0.9 in grid else float("nan")
            r30 = float(pool_risk[grid.index(0.3)]) if 0.3 in grid else float("nan")
            rows.append((criterion, variant, cells, build_s, job, (r30, acc90), chosen))
            log(f"  {name} {criterion:<9} {variant:<12} build {build_s:6.1f}s  job {job[0]:6.1f}s  "
                + "  ".join(f"ε={e}: med {c[0]:.2f} oracle {c[1]:.2f} viol {c[2]:.3f}" for e, c in cells.items())
                + (f"  BN {chosen}" if chosen else ""))
    print(f"n_cal={args.n_cal} (with replacement from the pool), draws={args.draws}, δ={args.delta}, bound={bound}, "
          f"{PROCEDURE}, grid {len(grid)} levels; fine-tuning {finetune.steps} steps lr {finetune.lr} batch "
          f"{finetune.batch_size} loss {finetune.loss}; job: ε={job_eps}, tune_fraction 0.25 of the pool")
    head = f"{'criterion':<10} {'variant':<13}" + "".join(
        f" | ε={eps:<5} {'med':>5} {'oracle':>6} {'viol':>5}" for eps in epsilons) + \
        f" | {'R@.3':>6} {'acc@.9':>6} {'build s':>7} {'job s':>6} {'job λ̂':>6}"
    print(head)
    print("-" * len(head))
    for criterion, variant, cells, build_s, job, (r30, acc90), _ in rows:
        print(f"{criterion:<10} {variant:<13}" + "".join(
            f" | {'':<7} {c[0]:>5.2f} {c[1]:>6.2f} {c[2]:>5.3f}" for c in cells.values())
            + f" | {r30:>+6.3f} {acc90:>6.3f} {build_s:>7.1f} {job[0]:>6.1f} {job[1]:>6.2f}", flush=True)
    if any(r[6] for r in rows):
        print("BN statistics chosen per row (dense/blended/reestimated over the pruned levels): " + "; ".join(
            f"{c}/{v}: {ch['dense']}/{ch['blended']}/{ch['reestimated']}" for c, v, _, _, _, _, ch in rows if ch))
    # The goals of issue 14
    tol = args.delta + 3 * math.sqrt(args.delta * (1 - args.delta) / args.draws)
    by_key = {(c, v): cells for c, v, cells, *_ in rows}
    for eps in epsilons:
        parts = []
        base = by_key.get(("magnitude", "one-shot"), {}).get(eps)
        valid = [(cells[eps][0], c, v) for (c, v), cells in by_key.items() if cells[eps][2] <= tol]
        if base is not None and valid:
            best_med, bc, bv = max(valid, key=lambda r: (r[0], -list(VARIANTS).index(r[2])))
            ratio = best_med / base[0] if base[0] else float("inf")
            parts.append(f"best {bc}/{bv} {best_med:.2f} = {ratio:.3f}× magnitude one-shot {base[0]:.2f} "
                         f"[≥1.1: {'PASS' if ratio >= 1.1 else 'FAIL'}], vs its pool oracle {base[1]:.2f} "
                         f"[{'PASS' if best_med >= base[1] else 'FAIL'}]")
        mags = [(cells[eps][0], v) for (c, v), cells in by_key.items() if c == "magnitude" and cells[eps][2] <= tol]
        if base is not None and mags:
            m_med, m_v = max(mags, key=lambda r: (r[0], -list(VARIANTS).index(r[1])))
            parts.append(f"best magnitude variant {m_v} {m_med:.2f}")
        mu_ft, mag_ft = by_key.get(("mu", "+finetune"), {}).get(eps), by_key.get(("magnitude", "+finetune"), {}).get(eps)
        if mu_ft is not None and mag_ft is not None:
            parts.append(f"mu+finetune {mu_ft[0]:.2f} (oracle {mu_ft[1]:.2f}) vs magnitude+finetune {mag_ft[0]:.2f} "
                         f"(oracle {mag_ft[1]:.2f}) [{'PASS' if mu_ft[0] >= mag_ft[0] else 'FAIL'}]")
        print(f"goals {name} ε={eps}: " + "; ".join(parts))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mlp,cnn", help="comma list of mlp, cnn")
    ap.add_argument("--criteria", default="magnitude,mu,obd,random", help="comma list of magnitude, mu, obd, random")
    ap.add_argument("--draws", type=int, default=100)
    ap.add_argument("--n-cal", type=int, default=1000)
    ap.add_argument("--epsilons", default="0.01,0.02")
    ap.add_argument("--delta", type=float, default=0.1)
    ap.add_argument("--n-train", type=int, default=450, help="of the 600 training images; the rest are D_tune")
    ap.add_argument("--no-jobs", action="store_true", help="skip the end-to-end certify() jobs")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: coarse grid, 20 fine-tuning steps, 10 draws, magnitude and mu only")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # small models: one thread is fastest on this shared box
    grid = GRID
    finetune = FinetuneConfig()
    if args.quick:
        grid, finetune = QUICK_GRID, FinetuneConfig(steps=20)
        args.draws = min(args.draws, 10)
        args.criteria = "magnitude,mu"
    t0 = time.perf_counter()
    print(f"bench/candidates.py: digits, pool/draw/oracle (bench/efficiency.py); grid {grid}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            run_model(args, name, Path(tmp), grid, finetune)
    print(f"\ntotal {time.perf_counter() - t0:.0f}s (torch threads 1)")


if __name__ == "__main__":
    main()
