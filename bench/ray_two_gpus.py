"""Two jobs at once on a two-GPU machine through the 'ray' executor: do they run side by side, one per GPU?

Starts a local Ray cluster in this process (all GPUs of the machine), a real ``certiprune serve
--executor ray`` (uvicorn, SQLite job store and files in a temporary folder) that joins it,
submits ``--jobs`` jobs at once (a ResNet-ish TorchScript CNN on random CIFAR-sized data whose
labels are the dense predictions with 5 % noise, device ``cuda``), polls them, and prints a
timeline: per job when it was created, claimed by the dispatcher, started in its Ray worker,
and finished, with the node, worker pid and GPU id it ran on (from the job's placement, recorded
by the Ray task), then whether the jobs overlapped on distinct GPUs.

Needs only torch, numpy, fastapi, uvicorn, sqlalchemy, ray and httpx (no torchvision).
``--device cpu --gpus 0 --samples 2000`` is a CPU smoke run of the same path.

    python bench/ray_two_gpus.py                  # 2 jobs, 2 GPUs
    python bench/ray_two_gpus.py --jobs 4         # 4 jobs queue for 2 GPUs: two run, two wait
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

TERMINAL = ("succeeded", "failed", "cancelled")


def make_inputs(folder: Path, *, samples: int, width: int, seed: int) -> tuple[Path, Path]:
    """A scripted ResNet-ish CNN and an .npz of (samples, 3, 32, 32) inputs with near-dense labels."""
    import numpy as np
    import torch
    from _models import TinyResNet, calibrate

    torch.manual_seed(seed)
    x = torch.randn(samples, 3, 32, 32)
    model = calibrate(TinyResNet(num_classes=10, width=width).eval(), x[:1024], batch_size=256)
    with torch.no_grad():
        dense = torch.cat([model(x[s:s + 512]).argmax(1) for s in range(0, samples, 512)])
    rng = np.random.default_rng(seed)
    y = dense.numpy().copy()
    noisy = rng.random(samples) < 0.05
    y[noisy] = rng.integers(0, 10, int(noisy.sum()))
    model_path, data_path = folder / "model.pt", folder / "data.npz"
    torch.jit.script(model).save(str(model_path))
    np.savez(data_path, x=x.numpy(), y=y.astype(np.int64))
    return model_path, data_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(data_dir: Path, ray_address: str, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    import httpx

    env = {k: v for k, v in os.environ.items() if not k.startswith("CERTIPRUNE_")}
    env.update(PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--data-dir",
         str(data_dir), "--executor", "ray", "--ray-address", ray_address, "--log-level", "warning"],
        cwd=ROOT, env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the server did not come up:\n{log_path.read_text()[-4000:]}")


def placements(data_dir: Path, job_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Each job's placement as its Ray task recorded it (read from the job store)."""
    from service.store import JobStore

    store = JobStore.from_url(f"sqlite:///{data_dir.resolve() / 'certiprune.db'}", migrate=False)
    try:
        return {job_id: (store.get(job_id=job_id).placement or {}) for job_id in job_ids}
    finally:
        store.close()


def ts(value: str | None) -> float | None:
    return datetime.fromisoformat(value).timestamp() if value else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--gpus", type=int, default=None, help="GPUs for the local Ray cluster (default: all)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "auto", "cpu"])
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--width", type=int, default=64, help="channels of the first ResNet stage")
    parser.add_argument("--levels", type=int, default=100, help="sparsity levels (full curve: every one evaluated)")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)

    import httpx
    import ray

    work = Path(tempfile.mkdtemp(prefix="certiprune-ray-bench-"))
    print(f"work dir {work}")
    t0 = time.time()
    model_path, data_path = make_inputs(work, samples=args.samples, width=args.width, seed=0)
    print(f"inputs: {args.samples} samples, TinyResNet width {args.width} ({time.time() - t0:.1f} s)")

    handler = signal.getsignal(signal.SIGINT)
    ray.init(num_gpus=args.gpus, include_dashboard=False, logging_level="warning", namespace="certiprune-bench")
    signal.signal(signal.SIGINT, handler)
    resources = ray.cluster_resources()
    print(f"ray cluster: {int(resources.get('GPU', 0))} GPU, {int(resources.get('CPU', 0))} CPU")
    data_dir, port = work / "data", free_port()
    server = start_server(data_dir, ray.get_runtime_context().gcs_address, port, work / "server.log")
    config = {"device": args.device, "full_curve": True, "epsilon": 0.02, "criterion": "magnitude",
              "sparsities": [round(i / args.levels, 4) for i in range(1, args.levels)]}
    exit_code = 0
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            model_bytes, data_bytes = model_path.read_bytes(), data_path.read_bytes()
            dataset = client.post("/v1/datasets", files={"file": ("data.npz", data_bytes)}).json()["id"]
            submitted_at: dict[str, float] = {}
            ids = []
            for _ in range(args.jobs):  # back to back: all are queued before the first one starts
                r = client.post("/v1/jobs", files={"model": ("model.pt", model_bytes)},
                                data={"dataset": dataset, "config": json.dumps(config)})
                r.raise_for_status()
                ids.append(r.json()["id"])
                submitted_at[ids[-1]] = time.time()
            jobs: dict[str, dict[str, Any]] = {}
            deadline = time.monotonic() + args.timeout
            while time.monotonic() < deadline:
                jobs = {job_id: client.get(f"/v1/jobs/{job_id}").json() for job_id in ids}
                if all(j["status"] in TERMINAL for j in jobs.values()):
                    break
                time.sleep(0.25)
        where = placements(data_dir, ids)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        ray.shutdown()

    origin = min(submitted_at.values())
    rows = []
    print(f"\n{'job':<30} {'status':<10} {'claimed':>8} {'started':>8} {'finished':>9} {'run s':>7}  "
          f"{'gpu':<4} {'node':<15} pid")
    for job_id in ids:
        job, place = jobs[job_id], where[job_id]
        claimed, started, finished = ts(job.get("started_at")), ts(place.get("started_at")), ts(job.get("finished_at"))
        rel = [f"{v - origin:8.2f}" if v else f"{'-':>8}" for v in (claimed, started, finished)]
        run_s = f"{finished - started:7.2f}" if finished and started else f"{'-':>7}"
        gpus = ",".join(place.get("gpu_ids") or []) or "-"
        print(f"{job_id:<30} {job['status']:<10} {rel[0]} {rel[1]} {rel[2]:>9} {run_s}  {gpus:<4} "
              f"{place.get('node_ip', '-'):<15} {place.get('pid', '-')}")
        if job["status"] != "succeeded":
            print(f"    error: {job.get('error')}")
            exit_code = 1
        rows.append((started, finished, tuple(place.get("gpu_ids") or [])))
    print("(seconds since the first submission; claimed: the dispatcher took the job from the queue; started: "
          "its Ray worker began; gpu: the physical GPU id Ray gave it)")
    if len(rows) >= 2 and all(r[0] and r[1] for r in rows[:2]):
        (s1, f1, g1), (s2, f2, g2) = rows[0], rows[1]
        overlap = max(0.0, min(f1, f2) - max(s1, s2))
        distinct = bool(g1) and bool(g2) and set(g1).isdisjoint(g2)
        print(f"\nfirst two jobs overlapped {overlap:.2f} s; distinct GPUs: {distinct}")
        print(f"concurrent_on_distinct_gpus={'true' if overlap > 0 and distinct else 'false'}")
    if args.keep:
        print(f"kept {work}")
    else:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return exit_code


if __name__ == "__main__":
    raise SystemExit(main())
