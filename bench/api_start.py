"""How soon `certiprune serve` answers /healthz, against the torch import it no longer pays.

Before issue 16's change the API process imported torch (through ``calibration/__init__`` and the
GPU-slot count): that import is the naive baseline, measured here in the same run, each in a fresh
interpreter. Run: ``python bench/api_start.py [--runs 5]``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_to_healthz(data_dir: str) -> float:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CERTIPRUNE_")}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--data-dir", data_dir,
                             "--log-level", "warning"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                    if r.status == 200:
                        return time.perf_counter() - t0
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"serve exited with {proc.returncode}")
                time.sleep(0.02)
    finally:
        proc.terminate()
        proc.wait(30)


def time_import(module: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True, cwd=REPO)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    serve, torch_import, app_import = [], [], []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as d:
            serve.append(time_to_healthz(d))
        torch_import.append(time_import("torch"))
        app_import.append(time_import("service.app"))
    med = statistics.median
    print(f"{os.cpu_count()} CPUs, {args.runs} runs each, medians (min–max):")
    print(f"  certiprune serve → first /healthz 200: {med(serve):.2f} s ({min(serve):.2f}–{max(serve):.2f})")
    print(f"  import service.app (the API):          {med(app_import):.2f} s")
    print(f"  import torch (what the API no longer pays; it used to on top): {med(torch_import):.2f} s "
          f"({min(torch_import):.2f}–{max(torch_import):.2f})")


if __name__ == "__main__":
    main()
