"""Which form of M&U (mu) works one-shot? A study on scikit-learn's digits (issue 14, item 2).

Setup (per seed): digits shuffled by the seed; 600 samples train a 64→256→256→10 ReLU MLP with
SGD + momentum (lr 0.05, momentum 0.9, batch 32, 40 epochs, weight decay ``--wd``); the other
1197 are the calibration file. While training, per-weight statistics are recorded:

- ``TrainingStatsRecorder(start_after=half)`` — what a user uploads (σ of the iterates, 2nd half);
- the same over the whole run, and over the last epoch only;
- the spread of the iterates around a per-weight linear trend (2nd half): noise without drift;
- the spread of the updates Δw_t, and of the mini-batch gradients g_t (2nd half).

Every variant is certified by the engine (``calibration.certify``; ε = 0.02, δ = 0.1, one criterion
per call so each gets the whole δ, fixed-sequence testing over the default grid, scope global unless
named) by substituting its score function for ``calibration.criteria.mu.scores`` for that call.
Reported: median certified sparsity over the seeds (and its min–max), and the mean accuracy on the
calibration samples at 50/70/80/90 % global sparsity (a cheap proxy, no certification).

Rows marked ``[tune .25]`` need D_tune: the engine holds out 25 % of the 1197 (n_cal = 898); magnitude
is repeated there for reference.

    python bench/mu_study.py              # 10 seeds, weight decay 5e-4 (≈ 2.5 min on 2 busy cores)
    python bench/mu_study.py --wd 0 --seeds 5
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from calibration import certify  # noqa: E402
from calibration.criteria import mu as mu_module  # noqa: E402
from calibration.uncertainty import TrainingStatsRecorder  # noqa: E402

N_TRAIN = 600
EPOCHS, BATCH, LR, MOMENTUM = 40, 32, 0.05, 0.9
LEVELS = (0.5, 0.7, 0.8, 0.9)
#: Levels 0.10, 0.11, …, 0.99 (the default grid less its first ten, all far below any certified level here),
#: one batch per evaluation: the same test, a third of the engine's time.
GRID = [round(0.10 + 0.01 * i, 2) for i in range(90)]
BASE_CFG = {"epsilon": 0.02, "delta": 0.1, "sparsities": GRID, "batch_size": 2048, "tune_fraction": 0.0}


class Welford:
    """Running mean/variance of a list of tensors (float64)."""

    def __init__(self, shapes):
        self.n = 0
        self.mean = [torch.zeros(s, dtype=torch.float64) for s in shapes]
        self.m2 = [torch.zeros(s, dtype=torch.float64) for s in shapes]

    def add(self, xs):
        self.n += 1
        for x, m, m2 in zip(xs, self.mean, self.m2):
            x = x.double()
            d = x - m
            m.add_(d / self.n)
            m2.add_(d * (x - m))

    def var(self):
        return [(m2 / max(self.n - 1, 1)).float() for m2 in self.m2]


class TrendVar:
    """Variance of w_t around its least-squares line in t (online sums)."""

    def __init__(self, shapes):
        self.n, self.st, self.stt = 0, 0.0, 0.0
        self.sw = [torch.zeros(s, dtype=torch.float64) for s in shapes]
        self.sww = [torch.zeros(s, dtype=torch.float64) for s in shapes]
        self.swt = [torch.zeros(s, dtype=torch.float64) for s in shapes]
        self.origin = None

    def add(self, xs):
        if self.origin is None:
            self.origin = [x.detach().double().clone() for x in xs]
        t = float(self.n)
        self.n += 1
        self.st += t
        self.stt += t * t
        for x, o, sw, sww, swt in zip(xs, self.origin, self.sw, self.sww, self.swt):
            d = x.double() - o
            sw.add_(d)
            sww.add_(d * d)
            swt.add_(d * t)

    def var(self):
        n = self.n
        vt = self.stt - self.st ** 2 / n
        out = []
        for sw, sww, swt in zip(self.sw, self.sww, self.swt):
            vw = sww - sw ** 2 / n
            cwt = swt - sw * self.st / n
            out.append(((vw - cwt ** 2 / vt) / (n - 2)).clamp(min=0).float())
        return out


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def train(seed: int, wd: float, folder: str):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1000 + seed))
    tr, cal = order[:N_TRAIN], order[N_TRAIN:]
    torch.manual_seed(seed)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=wd)
    weights = [p for n, p in model.named_parameters() if p.dim() >= 2]
    shapes = [p.shape for p in weights]
    steps_per_epoch = math.ceil(N_TRAIN / BATCH)
    total = EPOCHS * steps_per_epoch
    half = total // 2
    rec_half = TrainingStatsRecorder(model, start_after=half)
    rec_all = TrainingStatsRecorder(model, start_after=0)
    rec_last = TrainingStatsRecorder(model, start_after=total - steps_per_epoch)
    trend, upd, grad = TrendVar(shapes), Welford(shapes), Welford(shapes)
    g2 = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    step = 0
    gen = torch.Generator().manual_seed(seed)
    for _ in range(EPOCHS):
        for batch in torch.randperm(N_TRAIN, generator=gen).split(BATCH):
            before = [p.detach().clone() for p in weights]
            loss = nn.functional.cross_entropy(model(x[tr][batch]), y[tr][batch])
            opt.zero_grad()
            loss.backward()
            grads = [p.grad.detach().clone() for p in weights]
            opt.step()
            for r in (rec_half, rec_all, rec_last):
                r.update()
            step += 1
            if step > half:
                now = [p.detach() for p in weights]
                trend.add(now)
                upd.add([a - b for a, b in zip(now, before)])
                grad.add(grads)
                for acc, g in zip(g2, grads):
                    acc.add_(g.double() ** 2)
    model.eval()
    names = rec_half.names
    model_path = os.path.join(folder, f"model{seed}.pt")
    data_path = os.path.join(folder, f"cal{seed}.npz")
    stats_path = os.path.join(folder, f"stats{seed}.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(model), model_path)
    np.savez(data_path, x=x[cal].numpy(), y=y[cal].numpy())
    rec_half.save(stats_path)
    n_recorded = step - half
    sig = {
        "half": [rec_half.variance()[n].float().sqrt() for n in names],
        "all": [rec_all.variance()[n].float().sqrt() for n in names],
        "last": [rec_last.variance()[n].float().sqrt() for n in names],
        "trend": [v.sqrt() for v in trend.var()],
        "upd": [v.sqrt() for v in upd.var()],
        "grad": [v.sqrt() for v in grad.var()],
        "g2": [(a / n_recorded).float().sqrt() for a in g2],
    }
    return {"model": model, "weights": [p.detach().clone() for p in weights], "sig": sig,
            "model_path": model_path, "data_path": data_path, "stats_path": stats_path,
            "x_cal": x[cal], "y_cal": y[cal]}


# --- score variants: (weights, σ dict) → list of score tensors ---------------------------------------


def _per_layer(sigma_key, q):
    def f(ws, sig):
        return [mu_module.wald_scores(w, s, fudge_quantile=q) for w, s in zip(ws, sig[sigma_key])]
    return f


def _global_fudge(sigma_key, q):
    def f(ws, sig):
        pooled = torch.cat([s.flatten() for s in sig[sigma_key]])
        pooled = pooled[pooled > 0]
        s0 = float(pooled.kthvalue(max(1, math.ceil(q * pooled.numel()))).values)
        return [w.abs() / (s + s0) for w, s in zip(ws, sig[sigma_key])]
    return f


def _times(sigma_key):
    def f(ws, sig):
        return [w.abs() * s for w, s in zip(ws, sig[sigma_key])]
    return f


VARIANTS = [
    # name, score fn (None: the library's mu as it stands), scope
    ("mu (library, uploaded)", None, "global"),
    ("|w|/σ plain, σ iter 2nd half", _per_layer("half", None), "global"),
    ("|w|/(σ+s0) q.5/layer, 2nd half", _per_layer("half", 0.5), "global"),
    ("|w|/(σ+s0) q.9/layer, 2nd half", _per_layer("half", 0.9), "global"),
    ("|w|/(σ+s0) max/layer, 2nd half", _per_layer("half", 1.0), "global"),
    ("|w|/(σ+s0) q.9 global, 2nd half", _global_fudge("half", 0.9), "global"),
    ("|w|/(σ+s0) max global, 2nd half", _global_fudge("half", 1.0), "global"),
    ("|w|/σ plain, σ iter whole run", _per_layer("all", None), "global"),
    ("|w|/(σ+s0) q.9/layer, whole run", _per_layer("all", 0.9), "global"),
    ("|w|/σ plain, σ iter last epoch", _per_layer("last", None), "global"),
    ("|w|/(σ+s0) q.9/layer, last epoch", _per_layer("last", 0.9), "global"),
    ("|w|/σ plain, σ detrended 2nd half", _per_layer("trend", None), "global"),
    ("|w|/(σ+s0) q.9/layer, detrended", _per_layer("trend", 0.9), "global"),
    ("|w|/σ plain, σ of updates Δw", _per_layer("upd", None), "global"),
    ("|w|·σ iter 2nd half (inverted M&U)", _times("half"), "global"),
    ("|w|·σ detrended (inverted M&U)", _times("trend"), "global"),
    ("|w|·σ of updates Δw", _times("upd"), "global"),
    ("|w|·σ of gradients (training)", _times("grad"), "global"),
    ("|w|·rms gradient (training)", _times("g2"), "global"),
    ("mu (library, uploaded) layerwise", None, "layerwise"),
]


def certify_with(run, variant_fn, scope, extra=None, criterion="mu", uncertainty=True):
    cfg = {**BASE_CFG, "criterion": [criterion], "scope": scope, **(extra or {})}
    original = mu_module.scores
    if variant_fn is not None:
        ws, sig = run["weights"], run["sig"]
        mu_module.scores = lambda ctx: [s.to(torch.float32).contiguous() for s in variant_fn(ws, sig)]
    try:
        cert = certify(run["model_path"], run["data_path"], cfg,
                       uncertainty=run["stats_path"] if uncertainty and criterion == "mu" else None)
    finally:
        mu_module.scores = original
    return cert.result["certified_sparsity"], cert.result["n_calibration"]


def accuracy_curve(run, scores, scope="global"):
    model = run["model"]
    params = [p for p in model.parameters() if p.dim() >= 2]
    accs = []
    for lam in LEVELS:
        masks = []
        if scope == "global":
            flat = torch.cat([s.flatten() for s in scores])
            order = torch.argsort(flat, stable=True)
            keep = torch.ones(flat.numel(), dtype=torch.bool)
            keep[order[: int(round(lam * flat.numel()))]] = False
            off = 0
            for w in run["weights"]:
                masks.append(keep[off: off + w.numel()].view_as(w))
                off += w.numel()
        else:
            for s in scores:
                order = torch.argsort(s.flatten(), stable=True)
                keep = torch.ones(s.numel(), dtype=torch.bool)
                keep[order[: int(round(lam * s.numel()))]] = False
                masks.append(keep.view_as(s))
        with torch.no_grad():
            for p, w, m in zip(params, run["weights"], masks):
                p.copy_(w * m)
            accs.append((model(run["x_cal"]).argmax(1) == run["y_cal"]).float().mean().item())
    with torch.no_grad():
        for p, w in zip(params, run["weights"]):
            p.copy_(w)
    return accs


def library_mu_scores(run):
    from calibration.criteria import ScoreContext
    from calibration.model import find_prunable, load_model
    from calibration.uncertainty import load_uncertainty

    module = load_model(run["model_path"])
    weights = find_prunable(module)
    ctx = ScoreContext(module=module, weights=weights, uncertainty=load_uncertainty(run["stats_path"], weights))
    return [s.detach().float() for s in mu_module.scores(ctx)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--wd", type=float, default=5e-4)
    ap.add_argument("--no-tune-rows", action="store_true", help="skip the rows that need D_tune")
    args = ap.parse_args()
    torch.set_num_threads(1)  # small tensors: one thread is fastest, and leaves a core to others
    rows: dict[str, dict[str, list]] = {}

    def put(name, sparsity, n, accs):
        r = rows.setdefault(name, {"cert": [], "n": n, "acc": []})
        r["cert"].append(sparsity)
        r["acc"].append(accs)

    t0 = time.time()
    with tempfile.TemporaryDirectory() as folder:
        for seed in range(args.seeds):
            run = train(seed, args.wd, folder)
            with torch.no_grad():
                dense = (run["model"](run["x_cal"]).argmax(1) == run["y_cal"]).float().mean().item()
            rows.setdefault("dense (no pruning)", {"cert": [], "n": 1197, "acc": []})["acc"].append([dense] * 4)
            rows["dense (no pruning)"]["cert"].append(0.0)
            mags = [w.abs() for w in run["weights"]]
            for scope in ("global", "layerwise"):
                sp, n = certify_with(run, None, scope, criterion="magnitude")
                put(f"magnitude {scope}", sp, n, accuracy_curve(run, mags, scope))
            lib = library_mu_scores(run)
            for name, fn, scope in VARIANTS:
                sp, n = certify_with(run, fn, scope)
                scores = lib if fn is None else fn(run["weights"], run["sig"])
                put(name, sp, n, accuracy_curve(run, scores, scope))
            if not args.no_tune_rows:
                tune = {"tune_fraction": 0.25}
                sp, n = certify_with(run, None, "global", tune, criterion="magnitude")
                put("magnitude [tune .25]", sp, n, accuracy_curve(run, mags))
                sp, n = certify_with(run, None, "global", tune, criterion="obd")
                put("obd [tune .25]", sp, n, [float("nan")] * 4)
                sp, n = certify_with(run, None, "global", tune, criterion="mu", uncertainty=False)
                put("mu re-created trajectory [tune .25]", sp, n, [float("nan")] * 4)
            print(f"seed {seed} done ({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)

    print(f"\ndigits, MLP 64-256-256-10, SGD lr {LR} momentum {MOMENTUM} wd {args.wd}, {EPOCHS} epochs on "
          f"{N_TRAIN}; ε={BASE_CFG['epsilon']} δ={BASE_CFG['delta']}; {args.seeds} seeds")
    head = f"{'variant':40s} {'n_cal':>5s} {'cert med':>8s} {'[min,max]':>11s}  " + " ".join(
        f"acc@{int(l * 100)}%" for l in LEVELS)
    print(head)
    print("-" * len(head))
    for name, r in rows.items():
        c = r["cert"]
        a = np.array(r["acc"], dtype=float)
        acc = a.mean(axis=0) if not np.isnan(a).all() else [float("nan")] * 4
        accs = " ".join(f"{a:7.3f}" if not math.isnan(a) else "      -" for a in acc)
        print(f"{name:40s} {r['n']:5d} {statistics.median(c):8.2f} [{min(c):.2f},{max(c):.2f}]  {accs}")
    print(f"\n({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
