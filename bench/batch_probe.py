"""Which batch size should a GPU job use? Time the Predictor on one model over a few batch sizes.

The engine's batch size is the user's ``batch_size`` (SPEC §3); this probe says what to
recommend for large conv nets. Per batch size: seconds per full pass over n samples (median of
``--passes`` after warm-up and graph capture) and the peak memory of the pass, in the precision asked.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _models import SPECS, build  # noqa: E402

from calibration.engine import evaluation_precision  # noqa: E402
from calibration.fast_eval import Predictor  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="resnet50", choices=sorted(SPECS))
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--batches", default="250,500,1000,2000")
    ap.add_argument("--passes", type=int, default=3)
    args = ap.parse_args()
    device = torch.device("cuda")
    spec = SPECS[args.model]
    module = torch.jit.script(build(args.model)).to(device).eval()
    x_host = torch.randn(args.n, *spec.input_shape)
    print(f"{'batch':>6} {'s/pass':>8} {'ms/batch':>9} {'peak GiB':>9} layout", flush=True)
    for b in (int(v) for v in args.batches.split(",")):
        torch.cuda.empty_cache()
        with evaluation_precision(args.precision, device), \
                Predictor(module, b, device=device, precision=args.precision) as pred:
            x = pred.resident(x_host).to(device)
            pred.predict(x)  # layout choice, warm-up, capture
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(args.passes):
                t = time.perf_counter()
                pred.predict(x).cpu()
                times.append(time.perf_counter() - t)
            peak = torch.cuda.max_memory_allocated() / 1024**3
            s = statistics.median(times)
            print(f"{b:>6} {s:>8.3f} {1000 * s / -(-args.n // b):>9.2f} {peak:>9.2f} "
                  f"{'NHWC' if pred.channels_last else 'NCHW'}", flush=True)
            del x


if __name__ == "__main__":
    main()
