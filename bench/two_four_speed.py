"""Does 2:4 semi-structured sparsity make inference faster on this GPU? Dense vs 2:4 linear layers.

Times y = x Wᵀ with W dense and with W as ``torch.sparse.to_sparse_semi_structured`` (the kernels a
2:4 artifact from ``pattern: "2:4"`` can use), fp16 or bf16, over a few layer shapes and batch sizes
(``calibration.patterns.semi_structured_speedup``: CUDA events, mean of 50 calls after 5 warm-ups).
Needs a CUDA GPU of compute capability ≥ 8.0; on a machine without one it says so and exits 0.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibration.patterns import semi_structured_speedup  # noqa: E402

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", default="128,2048,8192")
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("2:4 kernels need a CUDA device; none here, nothing measured.")
        return
    dtype = getattr(torch, args.dtype)
    print(f"{'weight (out×in)':>16} {'batch':>6} {'dense ms':>9} {'2:4 ms':>8} {'speed-up':>9} backend")
    for shape in SHAPES:
        for batch in (int(b) for b in args.batches.split(",")):
            r = semi_structured_speedup(shape, batch, dtype)
            assert r is not None
            print(f"{shape[0]:>7}×{shape[1]:<8} {batch:>6} {r['dense_ms']:>9.3f} {r['sparse_ms']:>8.3f} "
                  f"{r['speedup']:>8.2f}× {r['backend']} ({r['device']}, max |Δ| {r['max_abs_diff']:.2g})")


if __name__ == "__main__":
    main()
