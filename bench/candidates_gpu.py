"""Candidates on a GPU: BatchNorm statistics that cannot hurt, and masked fine-tuning on CUDA (issue 14).

Part A — the failure that motivated ``bn_statistics: "choose"``: a ResNet-18 / EfficientNet-B0
(torchvision when installed, random weights with BN statistics from data, ``_models.calibrate``; else
the small ``TinyResNet``) with the default D_tune of 100 samples (n = 400, tune_fraction 0.25).
Re-estimating BN statistics from 100 samples alone changes many predictions at a sparsity of 1e-6,
so nothing certifies. Runs ``certify`` with bn_statistics choose / reestimate and with
bn_recalibration off, and prints the certified sparsity, the risk at 1e-6, and what was chosen.

Part B — fine-tuning on CUDA: a TinyResNet job with and without ``finetune`` (distillation, no
labels), its wall time, and a check that the artifact reproduces the tested candidate on CUDA
exactly (the engine keeps the tested weights; GPU kernels need not be bit-reproducible).

    python bench/candidates_gpu.py [--device cuda] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _models import TinyResNet, calibrate, torchvision_available  # noqa: E402

from calibration import certify  # noqa: E402
from calibration.data import split_tune_cal  # noqa: E402


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "tiny" or not torchvision_available():
        return TinyResNet(10).eval()
    import torchvision

    return getattr(torchvision.models, name)(weights=None, num_classes=10).eval()


def _save(model: torch.nn.Module, x: torch.Tensor, folder: Path, name: str, *, n: int, flip: float = 0.05) -> tuple[Path, Path]:
    """Script the model, and write n inputs with labels = dense predictions, ``flip`` of them changed."""
    calibrate(model, x, 256)
    xs = torch.randn(n, *x.shape[1:])
    with torch.no_grad():
        y = torch.cat([model(xs[i:i + 256]).argmax(1) for i in range(0, n, 256)])
    rng = np.random.default_rng(0)
    flip_rows = rng.random(n) < flip
    y = y.numpy()
    y[flip_rows] = rng.integers(0, 10, size=int(flip_rows.sum()))
    mp, dp = folder / f"{name}.pt", folder / f"{name}.npz"
    torch.jit.script(model).save(str(mp))
    np.savez(dp, x=xs.numpy(), y=y.astype(np.int64))
    return mp, dp


def part_a(folder: Path, device: str, names: list[str]) -> None:
    print("\nA. BatchNorm statistics with 100 tuning samples (n = 400, risk disagreement, ε = 0.05, δ = 0.1)")
    print(f"{'model':<16} {'bn':<22} {'certified':>9} {'risk@1e-6':>10} {'risk@0.05':>10}  choices")
    grid = [0.0, 1e-6, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3]
    for name in names:
        model = _model(name)
        mp, dp = _save(model, torch.randn(2000, 3, 32, 32), folder, name, n=400)
        for label, extra in (("choose (default)", {}), ("reestimate", {"bn_statistics": "reestimate"}),
                             ("off", {"bn_recalibration": False})):
            r = certify(mp, dp, {"risk": "disagreement", "epsilon": 0.05, "sparsities": grid, "full_curve": True,
                                 "tune_fraction": 0.25, "device": device, "batch_size": 256, **extra}).result
            lv = {lvl["sparsity"]: lvl for lvl in r["levels"]}
            chosen = [lvl.get("bn_statistics", "-")[:5] for lvl in r["levels"][1:]]
            print(f"{name:<16} {label:<22} {r['certified_sparsity']:>9.4g} {lv[1e-6]['empirical_risk']:>10.3f} "
                  f"{lv[0.05]['empirical_risk']:>10.3f}  {' '.join(chosen)}")


def part_b(folder: Path, device: str, steps: int) -> None:
    print(f"\nB. Fine-tuning on {device} (TinyResNet, n = 2000, disagreement, ε = 0.05; distillation, {steps} steps)")
    model = _model("tiny")
    mp, dp = _save(model, torch.randn(2000, 3, 32, 32), folder, "tiny_ft", n=2000)
    grid = [0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5]
    base = {"risk": "disagreement", "epsilon": 0.05, "sparsities": grid, "device": device, "seed": 1,
            "tune_fraction": 0.25}
    for label, extra in (("one-shot", {}), ("finetune", {"finetune": {"steps": steps}})):
        out = folder / label / "pruned.pt"
        t = time.perf_counter()
        r = certify(mp, dp, {**base, **extra}, out=out).result
        wall = time.perf_counter() - t
        # The artifact on the same device gives exactly the tested predictions on D_cal.
        data = np.load(dp)
        split = split_tune_cal(len(data["y"]), 0.25, 1)
        x_cal = torch.from_numpy(data["x"][split.cal]).to(device)
        with torch.no_grad():
            dense = torch.jit.load(str(mp), map_location=device)
            pruned = torch.jit.load(str(out), map_location=device)
            d = torch.cat([dense(x_cal[i:i + 512]).argmax(1) for i in range(0, len(x_cal), 512)])
            p = torch.cat([pruned(x_cal[i:i + 512]).argmax(1) for i in range(0, len(x_cal), 512)])
        level = next(lvl for lvl in r["levels"] if lvl["sparsity"] == r["certified_sparsity"])
        reproduced = abs(float((p != d).float().mean()) - level["empirical_risk"]) < 1e-12
        print(f"{label:<10} certified {r['certified_sparsity']:.2f}  levels {r['levels_evaluated']}  "
              f"wall {wall:.1f} s  testing {r['timings'].get('testing_s', 0):.1f} s  "
              f"artifact reproduces the tested risk: {reproduced}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="TinyResNet only, fewer steps")
    args = p.parse_args()
    names = ["tiny"] if args.quick else ["resnet18", "efficientnet_b0"]
    print(f"device {args.device}; torch {torch.__version__}; torchvision {torchvision_available()}")
    with tempfile.TemporaryDirectory() as tmp:
        part_a(Path(tmp), args.device, names)
        part_b(Path(tmp), args.device, 20 if args.quick else 200)


if __name__ == "__main__":
    main()
