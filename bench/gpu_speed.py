"""How fast is certification on a GPU — against a naive peer pipeline and against the roofline?

For each model (torchvision ResNet-18 at 32×32 / 10 classes and ResNet-50 at 224×224 / 1000
classes, random weights with BatchNorm statistics from the data, scripted to TorchScript), with
n random samples (labels = dense predictions with 5 % noise, so ``accuracy_drop`` is defined)
and a 100-level grid (magnitude, global), this measures:

- **ours**: ``calibration.certify(...)`` end to end (load → dense → scores → levels), with
  ``full_curve: True`` (every level evaluated: the worst case) and the typical case (fixed-sequence
  stops early; ε is picked from the full curve's upper confidence bounds so that it stops near
  the middle of the grid, or, with a ``curve@N`` case first, from a full curve on N samples projected
  to n), the same ε with ``procedure: "planned"`` (``planned``: D_tune plans the levels D_cal tests;
  the table's case says how many levels D_tune evaluated, e.g. ``planned+7t``), BN re-estimation off for the like-for-like comparison, and one run with
  it on; in fp32 (exact, tf32 off) and, reported separately, in reduced precisions (the model as
  run in that precision).
- **peer**: the naive pipeline people write today, in ``naive_level`` below: an eager twin, for
  each level a deep copy pruned by ``torch.nn.utils.prune.global_unstructured(L1Unstructured,
  amount=λ)``, evaluated through a ``DataLoader`` over CPU tensors (batch 256, pin_memory False),
  each batch moved to the GPU. Same weights, data, grid, criterion. Its predictions must equal
  ours at a few levels (up to exact ties of the logits). Where a peer run over all 100 levels would
  take minutes, it is timed on a spread of levels (always λ = 0) and extrapolated per level
  (its per-level cost is constant: a full pass over the data); the table says which.
- **floor**: forward FLOPs (``FlopCounterMode`` on the eager model) × samples × passes ÷ the
  matmul rate measured here (8192³, events, median), and bytes (inputs + weights per pass) ÷ the
  measured device-to-device copy bandwidth; the larger of the two. % of roofline = floor / ours.
- **memory**: peak ``torch.cuda.max_memory_allocated`` over the job (and from the dense pass on)
  against 3 × model bytes + resident calibration bytes + one batch of activations (measured).

Prints a table and, last, ``ratio_vs_naive=<x>``: the smaller of the models' full-curve fp32
peer/ours ratios. ``--device cpu --quick`` runs a tiny torchvision-free ResNet on 512 samples
and 10 levels in well under two minutes (CI runs it so this cannot rot).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _models import SPECS, build, calibrate, prunable_modules, torchvision_available  # noqa: E402

from calibration import certify  # noqa: E402
from calibration.candidates import CandidateBuilder  # noqa: E402
from calibration.data import CalibrationSet  # noqa: E402
from calibration.engine import evaluation_precision, tf32_flags  # noqa: E402
from calibration.fast_eval import Predictor  # noqa: E402
from calibration.levels import Candidates, LevelData, LevelTest, evaluate_level  # noqa: E402
from calibration.masks import NestedMasks  # noqa: E402
from calibration.model import find_prunable, load_model, quiet_torchscript_warnings  # noqa: E402
from calibration.p_values import p_value, resolve_bound  # noqa: E402
from calibration.risks import per_sample_losses  # noqa: E402

GiB = 1024**3
DEFAULT_CASES = {
    "tiny": "fp32:full,fp32:typical,fp32:planned,fp32:typical:bn",
    "resnet18": "fp32:full,fp32:typical,fp32:typical:bn,tf32:full,bf16:full,bf16:typical",
    "resnet50": "fp32:full,fp32:typical,bf16:full,bf16:typical,bf16:typical:bn",
}
DEFAULT_PEER = {"tiny": "fp32:all", "resnet18": "fp32:all,bf16:3", "resnet50": "fp32:5,bf16:3"}
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def log(*a: Any) -> None:
    print(*a, flush=True)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def wall(fn: Callable[[], Any], dev: torch.device) -> tuple[Any, float]:
    sync(dev)
    t = time.perf_counter()
    out = fn()
    sync(dev)
    return out, time.perf_counter() - t


def free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


tf32 = tf32_flags  # TF32 on or off for a while (calibration.engine)


# ----------------------------------------------------------------------------- ceilings


def time_median(fn: Callable[[], Any], dev: torch.device, warm: int = 3, reps: int = 10) -> float:
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure_ceilings(dev: torch.device, quick: bool) -> dict[str, float]:
    """Matmul FLOP/s per precision and device-to-device copy bandwidth (bytes read + written / s)."""
    out: dict[str, float] = {}
    size = 8192 if dev.type == "cuda" else (512 if quick else 2048)
    g = torch.Generator(device=dev).manual_seed(0)
    precisions = ("fp32", "tf32", "bf16") if dev.type == "cuda" else ("fp32",)
    for prec in precisions:
        dtype = torch.bfloat16 if prec == "bf16" else torch.float32
        ab = [torch.randn(size, size, device=dev, dtype=dtype, generator=g) for _ in range(2)]
        with tf32(prec == "tf32"):
            t = time_median(lambda ab=ab: ab[0] @ ab[1], dev, warm=3, reps=10 if dev.type == "cuda" else 3)
        out[prec] = 2 * size**3 / t
        ab.clear()
    if dev.type != "cuda":  # reduced precisions run as fp32 off the GPU (fast_eval.effective_precision)
        out["tf32"] = out["bf16"] = out["fp32"]
    out["fp16"] = out["bf16"]
    nbytes = (1 << 30) if dev.type == "cuda" else (64 << 20)
    buf = [torch.empty(nbytes // 4, device=dev).uniform_()]
    buf.append(torch.empty_like(buf[0]))
    t = time_median(lambda: buf[1].copy_(buf[0]), dev, warm=2, reps=10 if dev.type == "cuda" else 3)
    out["copy_bw"] = 2 * nbytes / t
    buf.clear()
    free(dev)
    return out


@torch.no_grad()
def flops_per_sample(model: nn.Module, shape: tuple[int, ...], dev: torch.device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, *shape, device=dev)
    with FlopCounterMode(display=False) as fc:
        model(x)
    return fc.get_total_flops() / 2


@torch.no_grad()
def activation_bytes(model_path: Path, x: torch.Tensor, precision: str, dev: torch.device) -> int:
    """Steady-state peak extra memory of one batch's forward as the engine runs it (same Predictor
    settings, cuDNN workspaces of the chosen algorithms included; the one-time autotuning is not)."""
    if dev.type != "cuda":
        return 0
    module = load_model(model_path, dev)
    with evaluation_precision(precision, dev), \
            Predictor(module, x.shape[0], device=dev, precision=precision, cuda_graph=False) as pred:
        xr = pred.resident(x)
        pred.predict(xr)
        free(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        pred.predict(xr)
        sync(dev)
        peak = torch.cuda.max_memory_allocated(dev) - base
    del module, xr
    free(dev)
    return int(peak)


@torch.no_grad()
def activation_elements(model: nn.Module, shape: tuple[int, ...], dev: torch.device) -> float:
    """Per sample: Σ over leaf modules of inputs read + outputs written (the unfused graph's traffic)."""
    total = 0

    def hook(_m: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        nonlocal total
        total += sum(t.numel() for t in inputs if isinstance(t, torch.Tensor))
        total += output.numel() if isinstance(output, torch.Tensor) else 0

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        model(torch.randn(2, *shape, device=dev))
    finally:
        for h in handles:
            h.remove()
    return total / 2


def tensor_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


# ----------------------------------------------------------------------------- the naive peer


def naive_level(dense_model: nn.Module, lam: float, x_cpu: torch.Tensor, y_cpu: torch.Tensor, dev: torch.device,
                precision: str, keep_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The way it is usually done: copy the model, prune it with torch's pruning utility, DataLoader."""
    model = copy.deepcopy(dense_model)
    if lam > 0:
        params = [(m, "weight") for m in prunable_modules(model)]
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=lam)
    loader = DataLoader(TensorDataset(x_cpu, y_cpu), batch_size=256, shuffle=False, pin_memory=False)
    preds, logits_all = [], []
    ctx = torch.autocast("cuda", dtype=AUTOCAST[precision]) if (precision in AUTOCAST and dev.type == "cuda") \
        else contextlib.nullcontext()
    with torch.no_grad(), ctx, tf32(precision == "tf32"):
        for xb, _yb in loader:
            logits = model(xb.to(dev))
            preds.append(logits.argmax(dim=1).cpu())
            if keep_logits:
                logits_all.append(logits.float().cpu())
    return torch.cat(preds), (torch.cat(logits_all) if keep_logits else None)


def naive_curve(dense_model: nn.Module, grid: list[float], measure: list[int], x_cpu: torch.Tensor,
                y_cpu: torch.Tensor, dev: torch.device, precision: str, epsilon: float,
                keep: set[int]) -> dict[str, Any]:
    """Run the peer on the grid indices ``measure`` (0 first: the dense model); time each level."""
    times: dict[int, float] = {}
    preds_kept: dict[int, torch.Tensor] = {}
    logits_kept: dict[int, torch.Tensor] = {}
    dense = None
    y_np = y_cpu.numpy()
    for j in measure:
        def one() -> tuple[torch.Tensor, torch.Tensor | None, float]:
            preds, logits = naive_level(dense_model, grid[j], x_cpu, y_cpu, dev, precision, keep_logits=j in keep)
            p = float("nan")
            if dense is not None:
                losses = per_sample_losses("accuracy_drop", preds.numpy(), dense, y_np)
                p = float(p_value("binomial", "accuracy_drop", losses, epsilon))
            return preds, logits, p
        (preds, logits, _p), t = wall(one, dev)
        times[j] = t
        if j == 0:
            dense = preds.numpy()
        if j in keep:
            preds_kept[j] = preds
            if logits is not None:
                logits_kept[j] = logits
        log(f"    peer {precision} λ={grid[j]:.2f}: {t:.3f} s")
    return {"times": times, "preds": preds_kept, "logits": logits_kept, "dense": dense}


def peer_time(times: dict[int, float], n_levels_evaluated: int, n_grid: int) -> tuple[float, str]:
    """Peer time for the dense pass + ``n_levels_evaluated`` pruned levels; extrapolated if not all measured."""
    t0 = times[0]
    nonzero = {j: t for j, t in times.items() if j > 0}
    needed = list(range(1, n_levels_evaluated + 1))
    if all(j in nonzero for j in needed):
        return t0 + sum(nonzero[j] for j in needed), "measured"
    mean = statistics.mean(nonzero.values()) if nonzero else t0
    return t0 + mean * n_levels_evaluated, f"extrapolated from {len(times)}/{n_grid} levels"


# ----------------------------------------------------------------------------- ours, by components (for the equality check)


@torch.no_grad()
def ours_predictions(model_path: Path, x_dev: torch.Tensor, grid: list[float], idx: list[int], batch: int,
                     dev: torch.device, precision: str) -> dict[int, torch.Tensor]:
    """Our engine's own one-level step (``calibration.levels.evaluate_level``: masks from one sort applied in
    place by the ``CandidateBuilder``, the ``Predictor``) at grid indices ``idx``; untimed, for the equality check.
    Plain candidates (no reconstruction, BN statistics or fine-tuning), tested for disagreement with the dense
    model, whose predictions are made once first."""
    module = load_model(model_path, dev)
    params = [w.param for w in find_prunable(module)]
    masks = NestedMasks.from_scores([p.detach().abs().float() for p in params], "global")
    out = {}
    with evaluation_precision(precision, dev), Predictor(module, batch, device=dev, precision=precision) as pred:
        x = pred.resident(x_dev)
        candidates = Candidates(masks, CandidateBuilder(module, params), pred)
        data = LevelData(x, dense=pred.predict(x).cpu().numpy())
        test = LevelTest(risk="disagreement", bound=resolve_bound("auto", "disagreement"), epsilon=0.05, alpha=0.1)
        for j in idx:
            level = evaluate_level(candidates, j, grid[j], data, test)
            out[j] = torch.from_numpy(level.predictions)
            log(f"    ours {precision} λ={grid[j]:.2f}: disagreement with dense {level.empirical_risk:.4f}, "
                f"upper bound {level.upper_bound:.4f}")
    return out


def compare(ours: torch.Tensor, peer: torch.Tensor, peer_logits: torch.Tensor | None, rel_tol: float) -> dict[str, Any]:
    """Agreement of top-1 predictions; disagreements must be ties (margin ≤ rel_tol·max|logit|)."""
    diff = (ours != peer).nonzero().flatten()
    res: dict[str, Any] = {"n": int(ours.numel()), "disagree": int(diff.numel())}
    if peer_logits is not None and diff.numel():
        rows = peer_logits[diff]
        margin = rows.gather(1, peer[diff].view(-1, 1)) - rows.gather(1, ours[diff].view(-1, 1))
        scale = rows.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
        rel = (margin / scale).flatten()
        res["max_rel_margin"] = float(rel.max())
        res["non_ties"] = int((rel > rel_tol).sum())
    else:
        res["non_ties"] = 0 if diff.numel() == 0 else None
    return res


# ----------------------------------------------------------------------------- ours, end to end


def pick_typical_epsilon(levels: list[dict[str, Any]], target: float) -> tuple[float, int]:
    """ε such that fixed-sequence testing (p ≤ δ ⇔ UCB ≤ ε) stops nearest ``target`` of the grid."""
    ub = [lvl.get("upper_bound") for lvl in levels]
    ub = [0.0 if u is None or (isinstance(u, float) and math.isnan(u)) else float(u) for u in ub]
    k = len(ub)
    want = max(1, int(round(target * (k - 1))))
    best = (float("inf"), 0.5, k)
    for j in range(1, k):
        eps = min(max(max(ub[1:j + 1]) * 1.0001 + 1e-6, 1e-4), 0.999)
        stop = next((i for i in range(1, k) if ub[i] > eps), k)
        if abs(stop - want) < best[0]:
            best = (abs(stop - want), eps, stop)
    return best[1], best[2]


def projected_epsilon(levels: list[dict[str, Any]], n_sub: int, n: int, target: float, delta: float = 0.1
                      ) -> tuple[float, int]:
    """The typical ε from a full curve measured on a subsample of ``n_sub`` samples (a ``curve@N`` case: a
    full fp32 ResNet-50 curve on all n costs minutes): each level's one-sided binomial upper bound at the
    job's n is projected from the subsample's empirical risk r as r + z_{1−δ}·√(r(1 − r)/n), then ε is
    picked as :func:`pick_typical_epsilon` does. Only the number of levels the typical job evaluates
    depends on this, and the table reports that number."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf(1 - delta)
    projected = []
    for lvl in levels:
        r = lvl.get("empirical_risk")
        r = 0.0 if r is None else float(r)
        projected.append({"upper_bound": r + z * math.sqrt(max(r * (1 - r), 1.0 / n_sub) / n)})
    return pick_typical_epsilon(projected, target)


def run_certify(model_path: Path, data: CalibrationSet, cfg: dict[str, Any], dev: torch.device) -> dict[str, Any]:
    free(dev)
    state: dict[str, Any] = {}
    if dev.type == "cuda":
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)

    def progress(ev: Any) -> None:
        # Peaks by phase: load (→ dense), dense pass + scoring (autotuning, capture), testing.
        if dev.type != "cuda":
            return
        if ev.stage == "dense" and "load_peak" not in state:
            state["load_peak"] = torch.cuda.max_memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        elif ev.stage == "testing" and "dense_peak" not in state:
            state["dense_peak"] = torch.cuda.max_memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)

    cert, t = wall(lambda: certify(model_path, data, cfg, progress=progress), dev)
    r = cert.result
    rec = {"ours_s": t, "levels_evaluated": r["levels_evaluated"], "n_cal": r["n_calibration"], "n_tune": r["n_tune"],
           "levels_tune": int(r.get("levels_evaluated_tune") or 0),
           "certified_sparsity": r["certified_sparsity"], "device": r["device"], "precision": r["precision"],
           "bn": r["bn_recalibration"], "timings": r["timings"], "evaluator": r.get("evaluator"),
           "levels": [{k: lvl.get(k) for k in ("sparsity", "empirical_risk", "upper_bound", "evaluated", "rejected")}
                      for lvl in r["levels"]]}
    if dev.type == "cuda":
        test_peak = torch.cuda.max_memory_allocated(dev) - base
        rec["peak_load"] = int(state.get("load_peak", base) - base)
        rec["peak_dense"] = int(state.get("dense_peak", base) - base)
        rec["peak_test"] = int(test_peak)
        rec["peak_eval"] = max(rec["peak_dense"], rec["peak_test"])
        rec["peak_job"] = max(rec["peak_load"], rec["peak_eval"])
    del cert
    free(dev)
    return rec


def probe(model_path: Path, x_cpu: torch.Tensor, batch: int, fps: float, dev: torch.device) -> list[dict[str, Any]]:
    """Per-batch forward time through the Predictor: eager vs CUDA graph, NCHW vs channels_last."""
    rows = []
    module = load_model(model_path, dev)
    xb = x_cpu[:2 * batch].to(dev)
    for prec in ("fp32", "tf32", "bf16"):
        for graph, cl in ((False, False), (True, False), (True, True)):
            with evaluation_precision(prec, dev), \
                    Predictor(module, batch, device=dev, precision=prec, cuda_graph=graph, channels_last=cl) as p:
                x = p.resident(xb)
                p.predict(x)
                t = time_median(lambda: p.predict(x), dev, warm=1, reps=3) / 2
                rows.append({"precision": prec, "cuda_graph": graph and p.graph_replays > 0, "channels_last": cl,
                             "ms_per_batch": t * 1e3, "samples_per_s": batch / t, "tflops": fps * batch / t / 1e12,
                             "graph_error": p.graph_error})
            log(f"    probe {prec:5s} graph={str(graph):5s} channels_last={str(cl):5s}: "
                f"{rows[-1]['ms_per_batch']:8.2f} ms/batch  {rows[-1]['tflops']:6.1f} TFLOP/s")
    del module, xb
    free(dev)
    return rows


# ----------------------------------------------------------------------------- per model


def parse_map(text: str | None, default: dict[str, str]) -> dict[str, str]:
    out = dict(default)
    if text:
        for part in text.split(";"):
            if part.strip():
                name, _, spec = part.partition("=")
                out[name.strip()] = spec.strip()
    return out


def bench_model(name: str, args: argparse.Namespace, dev: torch.device, ceil: dict[str, float],
                cases: str, peers: str, sink: Callable[[dict[str, Any]], None]) -> None:
    spec = SPECS[name]
    batch = args.batch_size or (spec.batch_size if dev.type == "cuda" else min(spec.batch_size, 128))
    grid = [round(i / args.levels, 4) for i in range(args.levels)] if args.levels != 100 else \
        [round(i / 100, 2) for i in range(100)]
    n = args.n
    log(f"\n=== {name}: n={n}, {len(grid)} levels, batch {batch}, device {dev.type} ===")
    g = torch.Generator().manual_seed(args.seed)
    t = time.perf_counter()
    x_cpu = torch.randn(n, *spec.input_shape, generator=g)
    eager = build(name, seed=args.seed).to(dev)
    with tf32(False):
        calibrate(eager, x_cpu[: min(n, 4 * batch)].to(dev), batch)
        dense = torch.cat([eager(x_cpu[s:s + batch].to(dev)).argmax(1).cpu() for s in range(0, n, batch)])
    noise = torch.rand(n, generator=g) < 0.05
    y_cpu = torch.where(noise, torch.randint(0, spec.num_classes, (n,), generator=g), dense)
    tmp = Path(tempfile.mkdtemp(prefix="gpu_speed_"))
    model_path = tmp / f"{name}.pt"
    with quiet_torchscript_warnings():
        torch.jit.script(copy.deepcopy(eager).cpu()).save(str(model_path))
    data = CalibrationSet(x=x_cpu.numpy(), y=y_cpu.numpy())
    fps = flops_per_sample(eager, spec.input_shape, dev)
    model_bytes = tensor_bytes(eager)
    weight_bytes = sum(m.weight.numel() * 4 for m in prunable_modules(eager))
    sample_elems = math.prod(spec.input_shape)
    dense_classes = int(torch.unique(dense).numel())
    log(f"  setup {time.perf_counter() - t:.1f} s: {fps / 1e9:.3f} GFLOP/sample, model {model_bytes / 2**20:.1f} MiB, "
        f"data {x_cpu.numel() * 4 / GiB:.2f} GiB, dense predictions use {dense_classes} classes")
    meta = {"kind": "model", "model": name, "n": n, "levels": len(grid), "batch": batch, "flops_per_sample": fps,
            "model_bytes": model_bytes, "dense_classes": dense_classes}
    act: dict[str, int] = {}
    for prec in sorted({c.split(":")[0] for c in cases.split(",") if c} | {"fp32"}):
        act[prec] = activation_bytes(model_path, x_cpu[:batch].to(dev), prec, dev)
    meta["activation_bytes"] = act
    act_elems = activation_elements(eager, spec.input_shape, dev)
    meta["activation_elements_per_sample"] = act_elems
    if args.probe and dev.type == "cuda":
        meta["probe"] = probe(model_path, x_cpu, batch, fps, dev)
    sink(meta)

    # --- the naive peer (and the equality check against our building blocks)
    peer: dict[str, dict[str, Any]] = {}
    eps_peer = 0.05
    for item in [p for p in peers.split(",") if p]:
        prec, _, k = item.partition(":")
        measure = list(range(len(grid))) if k in ("all", "") else \
            sorted({int(round(v)) for v in np.linspace(0, len(grid) - 1, max(2, int(k)))})
        check = [j for j in measure if j > 0]
        check = [check[i] for i in sorted({int(round(v)) for v in np.linspace(0, len(check) - 1, min(3, len(check)))})]
        log(f"  peer {prec}: levels {[grid[j] for j in measure] if len(measure) < 12 else f'{len(measure)} levels'}")
        res = naive_curve(eager, grid, measure, x_cpu, y_cpu, dev, prec, eps_peer, set(check))
        free(dev)
        x_dev = x_cpu.to(dev)
        ours = ours_predictions(model_path, x_dev, grid, check, batch, dev, prec)
        del x_dev
        free(dev)
        checks = {}
        for j in check:
            c = compare(ours[j], res["preds"][j], res["logits"].get(j), rel_tol=args.tie_tol)
            checks[grid[j]] = c
            log(f"    check λ={grid[j]:.2f}: {c['disagree']}/{c['n']} predictions differ "
                f"(non-ties {c['non_ties']}, max relative margin {c.get('max_rel_margin', 0):.2e})")
            if prec == "fp32" and not args.no_assert:
                assert c["non_ties"] == 0 and c["disagree"] <= max(2, 0.005 * c["n"]), \
                    f"peer and ours disagree beyond ties at λ={grid[j]}: {c}"
        peer[prec] = {"times": res["times"], "checks": checks}
        sink({"kind": "peer", "model": name, "precision": prec,
              "times": {grid[j]: t for j, t in res["times"].items()}, "checks": checks})

    # --- ours, end to end
    eps_typ: float | None = args.typical_epsilon
    for case in [c for c in cases.split(",") if c]:
        parts = case.split(":")
        prec, kind, bn = parts[0], parts[1], len(parts) > 2 and parts[2] == "bn"
        if kind.startswith("curve@"):  # a full curve on a subsample, only to choose the typical ε
            n_sub = min(n, int(kind.split("@")[1]))
            sub = CalibrationSet(x=data.x[:n_sub], y=data.y[:n_sub])
            cfg_sub = {"criterion": "magnitude", "scope": "global", "sparsities": grid, "risk": "accuracy_drop",
                       "bound": "binomial", "procedure": "fixed_sequence", "delta": 0.1, "epsilon": 0.05,
                       "full_curve": True, "device": dev.type, "precision": prec, "batch_size": batch,
                       "seed": args.seed, "bn_recalibration": False}
            rec = run_certify(model_path, sub, cfg_sub, dev)
            eps_typ, stop = projected_epsilon(rec["levels"], n_sub, n, args.typical_target)
            log(f"  {case}: {rec['ours_s']:.1f} s; typical ε projected to n={n}: {eps_typ:.4g} "
                f"(expected stop at level {stop})")
            continue
        if kind in ("typical", "planned") and eps_typ is None:
            log("  (no full-curve run yet to pick the typical ε from; using ε = 0.05)")
            eps_typ = 0.05
        cfg: dict[str, Any] = {"criterion": "magnitude", "scope": "global", "sparsities": grid,
                               "risk": "accuracy_drop", "bound": "binomial",
                               "procedure": "planned" if kind == "planned" else "fixed_sequence",
                               "delta": 0.1, "epsilon": eps_typ if kind in ("typical", "planned") else 0.05,
                               "full_curve": kind == "full", "device": dev.type, "precision": prec,
                               "batch_size": batch, "seed": args.seed}
        cfg.update({"bn_recalibration": True, "tune_fraction": 0.25} if bn else {"bn_recalibration": False})
        log(f"  ours {case}: ε={cfg['epsilon']:.4g} ...")
        rec = run_certify(model_path, data, cfg, dev)
        assert rec["device"] == dev.type, f"certify ran on {rec['device']}, not {dev.type}"
        if kind == "full" and eps_typ is None:
            eps_typ, stop = pick_typical_epsilon(rec["levels"], args.typical_target)
            log(f"    typical ε chosen from this curve: {eps_typ:.4g} (expected stop at level {stop})")
        lv = rec["levels_evaluated"]
        lv_tune = rec["levels_tune"]
        eff = (rec.get("evaluator") or {}).get("effective_precision", prec)
        passes = (lv + 1) * rec["n_cal"] + (lv + 1) * rec["n_tune"] * (1 if bn else 0) + lv_tune * rec["n_tune"]
        resident = (rec["evaluator"] or {}).get("resident_dtype") or "float32"
        elem = 2 if resident in ("bfloat16", "float16") else 4
        data_bytes = rec["n_cal"] * sample_elems * elem + rec["n_tune"] * sample_elems * 4
        floor_flops = fps * passes / ceil[eff]
        floor_bytes = (lv + 1) * (data_bytes + weight_bytes) / ceil["copy_bw"]
        floor = max(floor_flops, floor_bytes)
        act_elem = 2 if eff in ("bf16", "fp16") else 4
        floor_act = act_elems * act_elem * passes / ceil["copy_bw"]
        floor_unfused = max(floor, floor_act)
        row = {"kind": "case", "model": name, "precision": prec, "case": kind + ("+bn" if bn else ""),
               "epsilon": cfg["epsilon"], **rec, "floor_s": floor, "floor_flops_s": floor_flops,
               "floor_bytes_s": floor_bytes, "roof_pct": 100 * floor / rec["ours_s"],
               "floor_act_s": floor_act, "floor_unfused_s": floor_unfused,
               "roof_unfused_pct": 100 * floor_unfused / rec["ours_s"]}
        if prec in peer and not bn:
            pt, how = peer_time(peer[prec]["times"], lv, len(grid))
            row.update({"peer_s": pt, "peer_how": how, "ratio": pt / rec["ours_s"]})
        if dev.type == "cuda":
            budget = 3 * model_bytes + data_bytes + act.get(prec, act["fp32"])
            row.update({"mem_budget": budget, "act_bytes": act.get(prec, act["fp32"]), "mem_ok_eval": rec["peak_eval"] <= budget,
                        "mem_ok_job": rec["peak_job"] <= budget, "mem_ok_test": rec["peak_test"] <= budget})
        log(f"    {rec['ours_s']:.2f} s (testing {rec['timings'].get('testing_s', 0):.2f} s), {lv} levels, "
            f"certified {rec['certified_sparsity']:.2f}, evaluator {rec['evaluator']}")
        sink(row)


# ----------------------------------------------------------------------------- table


def fmt_table(records: list[dict[str, Any]]) -> str:
    """One row per run. floor: FLOPs ÷ matmul rate vs (inputs + weights) ÷ copy bandwidth, the larger;
    floorU: also the unfused graph's activation traffic (every leaf module reads its input and
    writes its output once) ÷ copy bandwidth. peak: load / dense+scoring / testing phases;
    steady: (testing peak + one batch of activations) vs the budget."""
    head = (f"{'model':9s} {'prec':5s} {'case':11s} {'lv':>3s} {'ours_s':>8s} {'peer_s':>8s} {'ratio':>7s} "
            f"{'floor_s':>8s} {'roof%':>6s} {'floorU_s':>8s} {'roofU%':>6s} {'peak GiB load/dense/test':>24s} "
            f"{'budget':>7s} {'steady':>9s}  peer")
    lines = [head, "-" * len(head)]
    for r in records:
        if r.get("kind") != "case":
            continue
        peer = f"{r['peer_s']:8.2f}" if "peer_s" in r else f"{'-':>8s}"
        ratio = f"{r['ratio']:6.1f}x" if "ratio" in r else f"{'-':>7s}"
        if "peak_test" in r:
            mem = f"{r['peak_load'] / GiB:.2f}/{r['peak_dense'] / GiB:.2f}/{r['peak_test'] / GiB:.2f}"
            budget = f"{r['mem_budget'] / GiB:7.2f}"
            # The graph's activations sit in its private pool, allocated at capture and not
            # re-counted while testing: the steady state is about test + one batch of activations.
            # (+bn rows: the eager train-mode BN pass is already a counted batch of activations.)
            steady = r["peak_test"] + (0 if r["case"].endswith("+bn") else r.get("act_bytes", 0))
            ok = f"{100 * (steady / r['mem_budget'] - 1):+.0f}%"
        elif "peak_job" in r:
            mem = f"{r['peak_job'] / GiB:.2f} (job)"
            budget = f"{r['mem_budget'] / GiB:7.2f}"
            ok = "ok" if r["mem_ok_job"] else "over"
        else:
            mem, budget, ok = "-", f"{'-':>7s}", "-"
        fu = r.get("floor_unfused_s", r["floor_s"])
        ru = r.get("roof_unfused_pct", r["roof_pct"])
        case = r["case"] + (f"+{r['levels_tune']}t" if r.get("levels_tune") else "")
        lines.append(f"{r['model']:9s} {r['precision']:5s} {case:11s} {r['levels_evaluated']:3d} "
                     f"{r['ours_s']:8.2f} {peer} {ratio} {r['floor_s']:8.2f} {r['roof_pct']:5.0f}% "
                     f"{fu:8.2f} {ru:5.0f}% {mem:>24s} {budget} {ok:>9s}  {r.get('peer_how', '')}")
    return "\n".join(lines)


def merge_records(paths: list[str]) -> list[dict[str, Any]]:
    """Records of several runs (e.g. device calls that split the work): a later run's row for the
    same model × precision × case replaces an earlier one; rows without a peer time get one from
    any run's peer timings of the same model and precision."""
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    peers: dict[tuple[str, str], dict[int, float]] = {}
    levels: dict[str, int] = {}
    acts: dict[str, dict[str, int]] = {}
    for path in paths:
        for r in json.loads(Path(path).read_text())["records"]:
            if r.get("kind") == "case":
                rows[(r["model"], r["precision"], r["case"])] = r
            elif r.get("kind") == "peer":
                k_levels = levels.get(r["model"], 100)
                peers[(r["model"], r["precision"])] = {round(float(k) * k_levels): v for k, v in r["times"].items()}
            elif r.get("kind") == "model":
                levels[r["model"]] = r["levels"]
                acts[r["model"]] = r.get("activation_bytes", {})
    out = []
    for (model, prec, case), r in rows.items():
        if "act_bytes" not in r and "mem_budget" in r and model in acts:
            r = {**r, "act_bytes": acts[model].get(prec, acts[model].get("fp32", 0))}
        if "peer_s" not in r and not case.endswith("+bn") and (model, prec) in peers:
            pt, how = peer_time(peers[(model, prec)], r["levels_evaluated"], levels.get(model, 100))
            r = {**r, "peer_s": pt, "peer_how": how + " (other run)", "ratio": pt / r["ours_s"]}
        out.append(r)
    return out


def ratio_vs_naive(records: list[dict[str, Any]]) -> float | None:
    ratios = [r["ratio"] for r in records if r.get("kind") == "case" and r["precision"] == "fp32"
              and r["case"] == "full" and "ratio" in r]
    return min(ratios) if ratios else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--quick", action="store_true", help="tiny model, n=512, 10 levels (CI smoke run)")
    ap.add_argument("--models", default=None, help="comma list (default resnet18,resnet50; tiny with --quick)")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--levels", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--cases", default=None, help="per model: 'resnet50=fp32:full,bf16:typical:bn;resnet18=...'")
    ap.add_argument("--peer", default=None, help="per model: 'resnet50=fp32:5,bf16:3' (levels timed, or all)")
    ap.add_argument("--typical-target", type=float, default=0.5, help="where in the grid the typical case stops")
    ap.add_argument("--typical-epsilon", type=float, default=None)
    ap.add_argument("--tie-tol", type=float, default=1e-3)
    ap.add_argument("--probe", action="store_true", help="also time eager/graph/channels_last per batch")
    ap.add_argument("--no-assert", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for gpu_speed.json")
    ap.add_argument("--merge", nargs="*", default=None, help="only print the table of these JSON files")
    args = ap.parse_args(argv)

    if args.merge is not None:
        print(fmt_table(merge_records(args.merge)))
        records = merge_records(args.merge)
        r = ratio_vs_naive(records)
        print(f"ratio_vs_naive={r:.2f}" if r is not None else "ratio_vs_naive=nan")
        return 0

    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
    if args.quick:
        args.n = args.n or 512
        args.levels = args.levels or 10
        models = (args.models or "tiny").split(",")
    else:
        args.n = args.n or 10_000
        args.levels = args.levels or 100
        models = (args.models or "resnet18,resnet50").split(",")
    if not torchvision_available():
        missing = [m for m in models if m != "tiny"]
        if missing:
            log(f"torchvision is not installed: running 'tiny' instead of {missing}")
            models = ["tiny"]
    torch.manual_seed(args.seed)
    if dev.type == "cpu":
        torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "threads": torch.get_num_threads()}
    log(f"environment: {env}")
    ceil = measure_ceilings(dev, args.quick)
    log("ceilings: " + ", ".join(f"{k} {v / 1e12:.3g} TFLOP/s" for k, v in ceil.items() if k != "copy_bw")
        + f", copy {ceil['copy_bw'] / 1e9:.0f} GB/s (read + write)")
    records: list[dict[str, Any]] = [{"kind": "env", **env, "ceilings": ceil}]
    out = Path(args.out) if args.out else None

    def sink(rec: dict[str, Any]) -> None:
        records.append(rec)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / "gpu_speed.json").write_text(json.dumps({"records": records}, indent=1, default=str))

    cases = parse_map(args.cases, DEFAULT_CASES)
    peers = parse_map(args.peer, DEFAULT_PEER)
    for name in models:
        c = cases[name]
        if dev.type != "cuda":
            c = ",".join(x for x in c.split(",") if x.startswith("fp32"))
        p = peers[name] if dev.type == "cuda" else ",".join(x for x in peers[name].split(",") if x.startswith("fp32"))
        bench_model(name, args, dev, ceil, c, p, sink)
    print()
    print(fmt_table(records))
    r = ratio_vs_naive(records)
    print(f"ratio_vs_naive={r:.2f}" if r is not None else "ratio_vs_naive=nan")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
