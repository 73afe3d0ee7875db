"""Where a TorchScript model's first forwards go on a GPU, by graph-executor setting (issue 17).

The engine warms every batch shape up before it counts (``fast_eval.Predictor``: a first eager run, warm-ups,
a reference run, a CUDA-graph capture). For a traced Llama-style LM that set-up took 10.5 s of a 15.7 s job
(``bench/lm_gpu.py``). This times each of the first forwards, in a fresh process per setting, so that what
the profiling executor and its fuser cost shows, and what they buy in the steady state:

- ``default``: torch's settings (profiling executor, TensorExpr fuser on GPU);
- ``nofuse``: ``torch._C._jit_set_texpr_fuser_enabled(False)`` (no fused kernels to generate and compile);
- ``noopt``: ``torch._C._set_graph_executor_optimize(False)`` (the graph as traced: no profiling, no passes);
- ``legacy``: ``torch._C._jit_set_profiling_executor(False)`` (the legacy executor).

    python bench/jit_warmup.py --model lm --modes default,nofuse,noopt,legacy   # on the GPU (transformers)
    python bench/jit_warmup.py --model resnet50 --precision fp32 --size 224      # torchvision
    python bench/jit_warmup.py --model mlp --device cpu --runs 4                 # a smoke test anywhere
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(model: str, device: str, size: int, batch: int, seq: int):  # type: ignore[no-untyped-def]
    import torch

    torch.manual_seed(0)
    if model == "lm":
        sys.path.insert(0, str(ROOT / "bench"))
        from lm_gpu import build_lm

        module = build_lm(12, 768, 32000, 0).to(device).eval()
        ids = torch.randint(0, 32000, (batch, seq), device=device)
        mask = torch.ones(batch, seq, dtype=torch.int64, device=device)
        example: tuple = (ids, mask)
    elif model == "resnet50":
        import torchvision

        module = torchvision.models.resnet50().to(device).eval()
        example = (torch.randn(batch, 3, size, size, device=device),)
    else:
        module = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)).to(device)
        example = (torch.randn(batch, 64, device=device),)
    with torch.no_grad():
        traced = torch.jit.trace(module.eval(), example, check_trace=False, strict=False)
    return traced, example


def one_mode(args: argparse.Namespace) -> dict:
    import torch

    if args.mode == "nofuse":
        torch._C._jit_set_texpr_fuser_enabled(False)
    elif args.mode == "noopt":
        torch._C._set_graph_executor_optimize(False)
    elif args.mode == "legacy":
        torch._C._jit_set_profiling_executor(False)
    path = Path(args.work) / f"{args.model}.pt"
    if not path.exists():
        traced, _ = build(args.model, args.device, args.size, args.batch, args.seq)
        traced.save(str(path))
    _, example = build_inputs(args)
    module = torch.jit.load(str(path), map_location=args.device).eval()
    cuda = args.device == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    times = []
    with torch.no_grad():
        for _ in range(args.runs):
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            if dtype is not None and cuda:
                with torch.autocast("cuda", dtype=dtype, cache_enabled=False):
                    out = module(*example)
            else:
                out = module(*example)
            if cuda:
                torch.cuda.synchronize()
            times.append(round(time.perf_counter() - t, 4))
    logits = out["logits"] if isinstance(out, dict) else out[0] if isinstance(out, (tuple, list)) else out
    return {"model": args.model, "mode": args.mode, "precision": args.precision, "first_runs_s": times,
            "setup_s": round(sum(times[:4]) - 4 * min(times), 3), "steady_s": min(times),
            "top1_checksum": int(logits.float().argmax(-1).sum())}


def build_inputs(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    import torch

    torch.manual_seed(1)
    if args.model == "lm":
        ids = torch.randint(0, 32000, (args.batch, args.seq), device=args.device)
        return None, (ids, torch.ones(args.batch, args.seq, dtype=torch.int64, device=args.device))
    if args.model == "resnet50":
        return None, (torch.randn(args.batch, 3, args.size, args.size, device=args.device),)
    return None, (torch.randn(args.batch, 64, device=args.device),)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="lm", choices=["lm", "resnet50", "mlp"])
    p.add_argument("--modes", default="default,nofuse,noopt,legacy")
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--runs", type=int, default=8)
    p.add_argument("--work", default="/tmp/jit_warmup")
    args = p.parse_args()
    if args.mode:
        print(json.dumps(one_mode(args)), flush=True)
        return 0
    Path(args.work).mkdir(parents=True, exist_ok=True)
    base = [sys.executable, __file__, "--model", args.model, "--device", args.device, "--precision", args.precision,
            "--size", str(args.size), "--batch", str(args.batch), "--seq", str(args.seq), "--runs", str(args.runs),
            "--work", args.work]
    for mode in args.modes.split(","):
        out = subprocess.run([*base, "--mode", mode], capture_output=True, text=True)
        print(out.stdout.strip() or f"{mode}: failed {out.stderr[-800:]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
