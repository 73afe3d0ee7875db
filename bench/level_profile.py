"""Where a job's seconds go inside the engine: the load phase and one level, step by step (issue 17).

``bench/job_cost.py`` times a job by phase (``load_s``, ``testing_s``…). This runs the same job in-process
(``calibration.certify`` on the same scripted ResNet-50 and data as ``job_cost.py``) with a timer around each
step a phase is made of — reading the .npz, validating it, gathering the splits; per level: the masks, their
application, each of the BatchNorm chooser's checks and re-estimations, the test pass over D_cal, the p-value,
the candidate's snapshot — and prints the time and calls of each. Each timer synchronises CUDA before and
after its step, so a step owns its kernels (the whole job runs a little slower than unprofiled; its
``testing_s`` is printed beside the sum). Times are inclusive: ``bn.check`` contains its own ``predict``.

    python bench/level_profile.py --device cuda --size 224 --n 2000      # the job_cost.py job (torchvision)
    python bench/level_profile.py --device cpu --arch tiny --size 32 --n 400   # a smoke test anywhere
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

TOTALS: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])


def _sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(owner: Any, name: str, label: str) -> None:
    """Replace ``owner.name`` by a wrapper that adds its synchronised wall time to ``TOTALS[label]``."""
    inner: Callable[..., Any] = getattr(owner, name)

    @functools.wraps(inner)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _sync()
        t = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            _sync()
            TOTALS[label][0] += time.perf_counter() - t
            TOTALS[label][1] += 1

    setattr(owner, name, wrapper)


def instrument() -> None:
    from calibration import candidates, data, engine, fast_eval, grid, levels, masks

    timed(data, "_read_stored_members", "load: read .npz members")
    timed(data, "_check_npz_members", "load: check .npz members")
    timed(data, "validate_arrays", "load: validate arrays")
    timed(engine, "load_model", "load: model")
    timed(engine, "gather", "load: gather splits (host)")
    timed(masks.NestedMasks, "keep_masks", "level: keep masks")
    timed(candidates, "apply_masks", "level: apply masks")
    timed(candidates.BatchNormChooser, "_check", "level: bn check (3 per level)")
    timed(candidates.BatchNormChooser, "_reestimate", "level: bn re-estimate (half, then all)")
    timed(candidates.batchnorm, "snapshot", "level: bn snapshot")
    timed(candidates.batchnorm, "load_snapshot", "level: bn load snapshot")
    timed(candidates.BatchNormChooser, "apply", "level: bn choice, all of it")
    timed(candidates.CandidateBuilder, "build", "level: build candidate, all of it")
    timed(fast_eval.Predictor, "predict", "predict (every pass)")
    timed(levels, "per_sample_losses", "level: losses")
    timed(levels, "p_value", "level: p-value")
    timed(levels, "upper_confidence_bound", "level: upper bound")
    timed(candidates.CandidateBuilder, "snapshot", "level: keep candidate (to host)")
    timed(candidates.Finetuner, "run", "level: fine-tune")
    timed(grid, "evaluate_level", "level: evaluate, all of it")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--arch", default="resnet50", choices=["resnet50", "tiny"])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--strict-candidates", action="store_true",
                   help="build candidates in the job's precision (no TF32 for the BN chooser of an fp32 job, nor "
                        "for fine-tuning: the code before)")
    p.add_argument("--finetune", type=int, default=0, help="fine-tune every level for this many steps (0: off)")
    p.add_argument("--out", help="write the totals and the job's timings here as JSON")
    args = p.parse_args()

    from job_cost import GRID, make_inputs

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        meta = make_inputs(folder, args.size, args.n, args.device, args.arch)
        instrument()
        from calibration import certify, engine

        if args.strict_candidates:
            engine.chooser_math = lambda precision, device: None
            engine.finetune_math = lambda device: None

        config = {"device": args.device, "precision": args.precision, "sparsities": GRID, "full_curve": True,
                  "epsilon": 0.05, "batch_size": 500, **({"finetune": args.finetune} if args.finetune else {})}
        t = time.perf_counter()
        cert = certify(folder / "model.pt", folder / "data.npz", config, out=folder / "artifact.pt")
        wall = time.perf_counter() - t
    result = cert.result
    timings = result.get("timings", {})
    levels = [(lvl["sparsity"], (lvl.get("bn_statistics") or "-"), lvl["empirical_risk"]) for lvl in result["levels"]]
    print("levels (sparsity, BN statistics chosen, empirical risk):", levels)
    rows = sorted(TOTALS.items(), key=lambda kv: kv[0])
    print(f"\n{args.arch} {args.size}², n = {args.n}, {len(GRID)} levels, {args.precision} on {args.device}: "
          f"certify {wall:.2f} s (testing_s {timings.get('testing_s', float('nan')):.2f}, "
          f"load_s {timings.get('load_s', float('nan')):.2f})")
    print(f"{'step':<45} {'seconds':>8} {'calls':>6} {'ms/call':>8}")
    for label, (seconds, calls) in rows:
        print(f"{label:<45} {seconds:8.3f} {calls:6d} {1000 * seconds / max(calls, 1):8.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": {**meta, **vars(args), "certify_s": wall},
                                              "steps": {k: {"s": v[0], "calls": v[1]} for k, v in rows},
                                              "timings": timings, "levels": levels,
                                              "bn_statistics": result.get("bn_statistics")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
