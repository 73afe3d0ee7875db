"""What the OS sandbox costs a job: start-up, and a whole small job, with and without bubblewrap.

    python bench/sandbox_overhead.py [--repeats 5] [--device cpu|cuda]

Prints the median wall time of (1) a bare interpreter that imports torch (and, on CUDA,
initialises the device and runs one matmul), (2) a whole job through the supervisor
(``service.supervisor.run_child``: staging, child, certify on a digits MLP, artifact over the
pipe), each as a plain child process (sandbox off: the naive baseline) and inside bubblewrap. On
CUDA it also reports which NVIDIA device nodes the sandboxed child sees and how many devices
torch finds there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service import isolation, sandbox  # noqa: E402
from service.supervisor import ChildSpec, Input, run_child  # noqa: E402

PROBE = """
import os, time, json
t = time.perf_counter()
import torch
out = {"import_s": time.perf_counter() - t}
if os.environ.get("BENCH_CUDA") == "1":
    t = time.perf_counter()
    x = torch.randn(4096, 4096, device="cuda")
    (x @ x).sum().item()
    torch.cuda.synchronize()
    out["cuda_init_s"] = time.perf_counter() - t
    out["devices"] = torch.cuda.device_count()
    out["nodes"] = sorted(n for n in os.listdir("/dev") if n.startswith("nvidia"))
print(json.dumps(out))
"""


def make_inputs(folder: Path) -> tuple[Path, Path]:
    import numpy as np
    import torch
    from torch import nn

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 64)).astype(np.float32)
    w = rng.normal(size=(64, 10)).astype(np.float32)
    y = (x @ w).argmax(1).astype(np.int64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    model_path, data_path = folder / "model.pt", folder / "data.npz"
    torch.jit.script(model).save(str(model_path))
    np.savez(data_path, x=x, y=y)
    return model_path, data_path


def probe_once(isolate: bool, cuda: bool) -> tuple[float, dict]:
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "BENCH_CUDA": "1" if cuda else "0"}
    if cuda:
        env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    command = [sys.executable, "-I", "-c", PROBE]
    if isolate:
        view = isolation.SandboxView(inputs={}, tmp_bytes=256 << 20, out_bytes=1 << 20, env=env,
                                     gpu_devices=isolation.gpu_device_nodes(env.get("CUDA_VISIBLE_DEVICES")))
        argv, run_env = isolation.bwrap_argv(view, command), {}
    else:
        argv, run_env = command, env
    t = time.perf_counter()
    proc = subprocess.run(argv, env=run_env, capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return wall, json.loads(proc.stdout.strip().splitlines()[-1])


def job_once(isolate: bool, cuda: bool, model: Path, data: Path, work: Path) -> float:
    inputs = [Input(model, "model.pt", hashlib.sha256(model.read_bytes()).hexdigest()),
              Input(data, "data.npz", hashlib.sha256(data.read_bytes()).hexdigest())]
    limits = sandbox.Limits(address_space_bytes=None, cpu_seconds=3600, file_bytes=1 << 30, open_files=1024)
    config = {"sparsities": [round(0.05 * i, 2) for i in range(1, 20)], "epsilon": 0.05, "full_curve": True,
              "device": "cuda" if cuda else "cpu"}
    spec = ChildSpec(inputs=inputs, config=config, limits=limits, isolate=isolate, work=work,
                     log_path=work.parent / f"{work.name}.log", max_log_bytes=1 << 20, tmp_bytes=256 << 20,
                     cuda_visible=os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] if cuda else None)
    t = time.perf_counter()
    outcome = run_child(spec, on_progress=lambda *a: None, should_stop=lambda: False)
    wall = time.perf_counter() - t
    if outcome.status != "succeeded":
        raise RuntimeError(f"{outcome.code}: {outcome.message}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    why_not = isolation.probe()
    if why_not is not None:
        raise SystemExit(f"no sandbox here: {why_not}")
    with tempfile.TemporaryDirectory() as tmp:
        model, data = make_inputs(Path(tmp))
        rows = []
        for isolate in (False, True):
            probes = [probe_once(isolate, cuda) for _ in range(args.repeats)]
            jobs = [job_once(isolate, cuda, model, data, Path(tmp) / f"run-{isolate}-{i}") for i in range(args.repeats)]
            rows.append((isolate, statistics.median(p[0] for p in probes), statistics.median(jobs), probes[-1][1]))
    print(f"device: {args.device}; medians of {args.repeats} runs")
    print("| child | start + import torch" + (" + CUDA init + matmul" if cuda else "") + " | whole small job |")
    print("|---|---|---|")
    for isolate, start, job, _ in rows:
        print(f"| {'bubblewrap' if isolate else 'plain process (naive)'} | {start:.2f} s | {job:.2f} s |")
    (_, s0, j0, _), (_, s1, j1, info) = rows
    print(f"sandbox adds {s1 - s0:+.2f} s at start-up and {j1 - j0:+.2f} s per job")
    if cuda:
        print(f"sandboxed child sees device nodes {info.get('nodes')} and {info.get('devices')} CUDA device(s)")


if __name__ == "__main__":
    main()
