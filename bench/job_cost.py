"""What a job costs as users get it: POST to ``certiprune serve`` → ``succeeded``, broken down by stage.

Unlike ``bench/gpu_speed.py`` (everything in one warm process), every job here runs the way the
service runs it: submitted through the HTTP API, claimed by the local executor, supervised in a spawned
process, certified in a fresh (sandboxed where bubblewrap works) child. The breakdown comes from the
job's own ``timings`` (``calibration.engine`` and ``service.child``) and its created/started/finished
times; what no stage claims is shown as ``other`` (worker spawn, input staging and hashing, the sandbox,
result and artifact transfer, storing).

The naive peer is timed the same way, a fresh process per job: import torch/torchvision, rebuild the
eager model, then for each level ``copy.deepcopy`` + ``torch.nn.utils.prune.global_unstructured`` (L1) and
a ``DataLoader`` pass over CPU tensors (no BN re-estimation, no test: the loop people write).

Model: torchvision ResNet-50 (random weights, BatchNorm statistics from the data, centred head; as in
``bench/_models.calibrate``), scripted; n random samples at ``--size``² (labels: dense predictions with
5 % noise), a 20-level grid with the full curve (every level evaluated), batch 500.

    python bench/job_cost.py --device cuda --size 112 --n 2000 --variants new_fp32,old_fp32 \
        --old-tree OLD --out DIR        # OLD: e.g. mkdir OLD && git archive <rev> calibration service | tar -x -C OLD
    python bench/job_cost.py --device cpu --arch tiny --size 32 --n 400 --variants new_fp32,naive_fp32
                                        # a torchvision-free smoke test on a CPU (about a minute)
    python bench/job_cost.py --device cpu --arch digits --variants old_fp32,new_fp32,old_fp32,new_fp32 \
        --old-tree OLD                  # scripts/demo.sh's job (digits MLP, ε = 0.02, δ = 0.1), A/B on a CPU

``--tree DIR`` runs the new_* variants from another checkout (e.g. one change applied alone). Timings of this
tree beyond the engine's: the child imports (``imports_s``), starts CUDA and loads cuBLAS/cuDNN (``cuda_init_s``,
``cuda_libs_s``) *before* it reads its request, then waits for it (``request_wait_s``) while the supervisor
stages and hashes the inputs (``staging_s``, overlapped); the worker's own start and setup (``worker_start_s``,
``worker_setup_s``, ``child_spawn_s``), the child's exit after the artifact (``child_exit_s``), checking and
storing the artifact (``artifact_check_s``, ``artifact_store_s``).

On the H200 (bench/NOTES_gpu.md) the wheels the device lacks (fastapi 0.165 needs opentelemetry-api too)
were carried in the ignored folder .gpu/wheels and installed with pip --target; the sandbox's bwrap came
from .gpu/bin.

Variants: ``new_<prec>[_on|_off]`` (this tree; cudnn_benchmark auto unless _on/_off; each job POSTed after
``--settle`` idle seconds, so its slot's worker started ahead is ready), ``cold_<prec>[_on|_off]`` (this tree with
``CERTIPRUNE_PRESTART_WORKERS=false``: worker and child started when the job is claimed); a ``_ds`` suffix
(``new_fp32_ds``) uploads the calibration set once as a stored dataset (``POST /v1/datasets``, timed as
``dataset_upload_s``, not part of the job) and the job names it instead of sending it; ``old_<prec>`` (a
server started from ``--old-tree``, the code before this change, which always autotuned), ``naive_<prec>``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GRID = [round(0.05 * i, 2) for i in range(20)]  # 0.00 … 0.95: 20 levels


def _now() -> float:
    return time.time()


# ---------------------------------------------------------------------------------------------- inputs

def make_digits_inputs(folder: Path) -> dict[str, Any]:
    """``scripts/demo.sh``'s inputs: the digits MLP (trained here, seconds) and its 1,197 held-out images."""
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT / "scripts"))
    from make_digits_example import digits_split, train_mlp

    x_train, y_train, x_pool, y_pool = digits_split()
    torch.jit.script(train_mlp(x_train, y_train)).save(str(folder / "model.pt"))
    np.savez(folder / "data.npz", x=x_pool, y=y_pool)
    return {"data_bytes": (folder / "data.npz").stat().st_size, "model_bytes": (folder / "model.pt").stat().st_size,
            "n": len(y_pool)}


#: ``scripts/demo.sh``'s job (``certiprune submit --epsilon 0.02 --delta 0.1``: the default grid).
DIGITS_CONFIG: dict[str, Any] = {"device": "cpu", "epsilon": 0.02, "delta": 0.1}


def make_inputs(folder: Path, size: int, n: int, device: str, arch: str = "resnet50") -> dict[str, Any]:
    import numpy as np
    import torch

    if arch == "digits":
        return make_digits_inputs(folder)

    sys.path.insert(0, str(ROOT / "bench"))
    from _models import build, calibrate

    dev = torch.device(device)
    model = build(arch).to(dev)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, size, size, generator=g)
    with torch.no_grad():
        calibrate(model, x.to(dev), 250)
        preds = torch.cat([model(x[s:s + 250].to(dev)).argmax(1).cpu() for s in range(0, n, 250)])
    noise = torch.rand(n, generator=g) < 0.05
    y = torch.where(noise, torch.randint(0, 10 if arch == "tiny" else 1000, (n,), generator=g), preds)
    model = model.cpu().eval()
    torch.save(model.state_dict(), folder / "state.pt")
    torch.jit.script(model).save(str(folder / "model.pt"))
    np.savez(folder / "data.npz", x=x.numpy(), y=y.numpy())
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return {"classes_predicted": int(preds.unique().numel()), "data_bytes": (folder / "data.npz").stat().st_size,
            "model_bytes": (folder / "model.pt").stat().st_size}


# ---------------------------------------------------------------------------------------------- naive peer

def naive_main(args: argparse.Namespace) -> int:
    """A fresh process: the loop people write. Prints one JSON line of timings."""
    t = {}
    t0 = time.perf_counter()
    import contextlib

    import numpy as np
    import torch
    from torch.nn.utils import prune
    from torch.utils.data import DataLoader, TensorDataset

    t["imports_s"] = time.perf_counter() - t0
    s = time.perf_counter()
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.empty(1, device=dev)
        torch.cuda.synchronize()
    t["cuda_init_s"] = time.perf_counter() - s
    s = time.perf_counter()
    if args.arch == "tiny":  # the CPU smoke test's torchvision-free model
        sys.path.insert(0, str(ROOT / "bench"))
        from _models import build

        model = build("tiny")
    else:
        import torchvision

        model = torchvision.models.resnet50(weights=None, num_classes=1000)
    model.load_state_dict(torch.load(Path(args.inputs) / "state.pt"))
    model = model.eval().to(dev)
    data = np.load(Path(args.inputs) / "data.npz")
    x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
    t["load_s"] = time.perf_counter() - s
    ctx = (torch.autocast("cuda", dtype=torch.bfloat16) if args.precision == "bf16" and dev.type == "cuda"
           else contextlib.nullcontext())
    levels = []
    s = time.perf_counter()
    for lam in GRID:
        ls = time.perf_counter()
        m = copy.deepcopy(model)
        if lam > 0:
            kinds = (torch.nn.Conv2d, torch.nn.Linear)
            prune.global_unstructured([(mod, "weight") for mod in m.modules() if isinstance(mod, kinds)],
                                      pruning_method=prune.L1Unstructured, amount=lam)
        preds = []
        with torch.no_grad(), ctx:
            for xb, _ in DataLoader(TensorDataset(x, y), batch_size=256, shuffle=False):
                preds.append(m(xb.to(dev)).argmax(1).cpu())
        torch.cat(preds)
        levels.append(time.perf_counter() - ls)
        del m
    t["levels_s"] = time.perf_counter() - s
    t["first_level_s"], t["later_level_s"] = levels[0], float(np.median(levels[1:]))
    t["total_s"] = time.perf_counter() - t0
    print("NAIVE " + json.dumps({k: round(v, 4) for k, v in t.items()}), flush=True)
    return 0


def run_naive(inputs: Path, precision: str, device: str, arch: str) -> dict[str, Any]:
    start = _now()
    proc = subprocess.run([sys.executable, __file__, "--naive", "--inputs", str(inputs), "--precision", precision,
                           "--device", device, "--arch", arch], capture_output=True, text=True)
    wall = _now() - start
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("NAIVE ")), None)
    if line is None:
        return {"error": (proc.stderr or proc.stdout)[-2000:], "e2e_s": wall}
    t = json.loads(line[6:])
    t["e2e_s"] = wall
    t["process_start_s"] = wall - t["total_s"]
    return t


# ---------------------------------------------------------------------------------------------- service

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, tree: Path, data_dir: Path, log: Path, sandbox: str, env: dict[str, str] | None = None) -> None:
        self.log_path = log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, **(env or {})}
        env["PYTHONPATH"] = str(tree) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.log = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(self.port),
                                      "--data-dir", str(data_dir), "--sandbox", sandbox],
                                     cwd=tree, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        import httpx

        self.client = httpx.Client(base_url=self.url, timeout=None)
        for _ in range(600):
            try:
                if self.client.get("/healthz").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        raise RuntimeError("the server did not answer /healthz")

    def dataset(self, inputs: Path) -> tuple[str, float]:
        """Upload the calibration set once (``POST /v1/datasets``); jobs then name it instead of sending it."""
        t0 = _now()
        with open(inputs / "data.npz", "rb") as d:
            r = self.client.post("/v1/datasets", files={"file": ("data.npz", d, "application/octet-stream")})
        r.raise_for_status()
        return r.json()["id"], _now() - t0

    def job(self, inputs: Path, config: dict[str, Any], dataset: str | None = None) -> dict[str, Any]:
        t0 = _now()
        with open(inputs / "model.pt", "rb") as m, open(inputs / "data.npz", "rb") as d:
            files = {"model": ("model.pt", m, "application/octet-stream")}
            form = {"config": json.dumps(config)}
            if dataset is None:
                files["data"] = ("data.npz", d, "application/octet-stream")
            else:
                form["dataset"] = dataset
            r = self.client.post("/v1/jobs", files=files, data=form)
        posted = _now()
        if r.status_code >= 300:
            return {"error": r.text[:2000]}
        job_id = r.json()["id"]
        while True:
            job = self.client.get(f"/v1/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(0.05)
        done = _now()
        if job["status"] != "succeeded":
            return {"error": json.dumps(job.get("error"))[:2000], "e2e_s": done - t0}
        res = job["result"]
        t = dict(res.get("timings") or {})

        def ts(key: str) -> float:
            return datetime.fromisoformat(job[key].replace("Z", "+00:00")).timestamp()

        t["post_s"] = posted - t0  # upload + admission (hashing, validation)
        t["queue_claim_s"] = ts("started_at") - ts("created_at")
        t["e2e_s"] = done - t0
        t["poll_lag_s"] = done - ts("finished_at")
        ev = res.get("evaluator") or {}
        t.update(self.log_marks(job_id, t))
        t["cudnn_benchmark"] = ev.get("cudnn_benchmark")
        t["layout"] = ev.get("layout")
        t["cuda_graph"] = ev.get("cuda_graph")
        t["expected_batches"] = ev.get("expected_batches")
        t["format_ms"] = ev.get("format_ms")
        t["certified_sparsity"] = res.get("certified_sparsity")
        t["precision"] = res.get("precision")
        t["device"] = res.get("device")
        return t

    def log_marks(self, job_id: str, t: dict[str, Any]) -> dict[str, Any]:
        """From the server log's timestamps: worker spawn + staging (claim → child launched), and after the
        child's own stages, what remains until ``succeeded`` (result and artifact transfer, storing)."""
        self.log.flush()
        marks: dict[str, float] = {}
        for line in self.log_path.read_text(errors="replace").splitlines():
            if job_id not in line or not line[:4].isdigit():
                continue
            when = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if "started in process" in line:
                marks["spawn"] = when
            elif ": child " in line:
                marks["child"] = when
                marks["sandboxed"] = float("child sandboxed" in line)
            elif line.rstrip().endswith("succeeded"):
                marks["done"] = when
        out: dict[str, Any] = {"sandboxed": bool(marks.get("sandboxed"))}
        ours = sum(float(t.get(k) or 0) for k in child_path(t))
        if started_ahead(t):  # its worker and child were started before the claim: none of that is the job's
            out["worker_staging_s"] = 0.0
            if "spawn" in marks and "done" in marks:
                out["after_child_s"] = marks["done"] - marks["spawn"] - ours
            return out
        if "worker_setup_s" in t:  # this tree: the worker's own timings up to the child's spawn (then all overlaps)
            out["worker_staging_s"] = sum(float(t.get(k) or 0) for k in ("worker_start_s", "worker_setup_s",
                                                                          "child_spawn_s"))
            if "spawn" in marks and "done" in marks:
                out["after_child_s"] = marks["done"] - marks["spawn"] - out["worker_staging_s"] - ours
            return out
        if "spawn" in marks and "child" in marks:
            out["worker_staging_s"] = marks["child"] - marks["spawn"]
        if "child" in marks and "done" in marks:
            out["after_child_s"] = marks["done"] - marks["child"] - ours
        return out

    def close(self) -> None:
        self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def started_ahead(t: dict[str, Any]) -> bool:
    """The job ran in a worker started ahead that was ready (waiting, ``standby_s``) before the job came."""
    return float(t.get("standby_s") or 0.0) > 0.05


def child_path(t: dict[str, Any]) -> tuple[str, ...]:
    """The stages in series from the claim (or the child's spawn) to the child's result. A worker started ahead:
    its child had imported and started CUDA before the job came, so from the claim only the hand-over, staging +
    hashing and the engine remain. This tree without it: the child imports (and starts CUDA) before it reads its
    request, then waits for it while the supervisor stages (``request_wait_s``): staging is hidden behind the
    imports. The old tree: spawned after staging; CUDA's start in ``total_s``."""
    if started_ahead(t):
        return ("handoff_s", "staging_s", "total_s")
    if "request_wait_s" in t:
        # cuda_init_s is the child's (before the request) when it also loaded the libraries or the engine's own
        # start was renamed engine_cuda_init_s; else it is the engine's, inside total_s
        before = "cuda_libs_s" in t or "engine_cuda_init_s" in t
        return ("child_start_s", "imports_s", *(("cuda_init_s", "cuda_libs_s") if before else ()), "request_wait_s",
                "total_s")
    return ("child_start_s", "imports_s", "total_s")


def breakdown(t: dict[str, Any]) -> dict[str, float]:
    """Fixed cost = end to end − (dense pass − its warm-up/capture) − (levels − their warm-ups)."""
    g = lambda k: float(t.get(k) or 0.0)  # noqa: E731
    dense_net = g("dense_s") - g("dense_setup_s")
    levels_net = g("testing_s") - g("testing_setup_s")
    fixed = g("e2e_s") - dense_net - levels_net - g("levels_s")
    if "levels_s" in t:  # the naive peer: no stages of ours
        return {"fixed_s": fixed}
    known = sum(g(k) for k in ("post_s", "queue_claim_s", "worker_staging_s", *child_path(t), "after_child_s",
                                "poll_lag_s"))
    return {"dense_net_s": dense_net, "levels_net_s": levels_net, "fixed_s": fixed, "other_s": g("e2e_s") - known}


#: Printed columns. ``worker``: worker process start → the child launched (this tree: the worker's own
#: worker_start_s + worker_setup_s + child_spawn_s; old tree: from the server log, with staging + hashing);
#: ``stage``: staging + hashing in the supervisor (this tree: overlapped with the child's imports, not in series);
#: ``wait``: the child waiting for its request after its imports; ``cudalib``: cuBLAS/cuDNN loaded before the
#: request; ``after``: the child's result → ``succeeded`` (``exit``: the child's exit after the artifact,
#: ``store``: storing it); ``other``: what no stage claims.
COLUMNS = {"e2e_s": "e2e", "fixed_s": "fixed", "post_s": "post", "queue_claim_s": "claim",
           "worker_staging_s": "worker", "handoff_s": "handoff", "staging_s": "stage", "child_start_s": "spawn", "imports_s": "imports",
           "cuda_init_s": "cuda", "cuda_libs_s": "cudalib", "request_wait_s": "wait",
           "model_load_s": "model", "load_s": "load", "layout_s": "layout", "dense_s": "dense",
           "dense_setup_s": "d.setup", "scoring_s": "score", "testing_s": "levels", "testing_setup_s": "l.setup",
           "levels_s": "naive.lvls", "save_s": "save", "after_child_s": "after", "child_exit_s": "exit",
           "artifact_store_s": "store", "other_s": "other"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--naive", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--inputs", help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda")
    p.add_argument("--arch", default="resnet50", choices=["resnet50", "tiny", "digits"],
                   help="tiny: a CPU smoke test; digits: scripts/demo.sh's job (its own data and config; "
                        "--size/--n ignored)")
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--variants", default="new_fp32,old_fp32,new_bf16,old_bf16,naive_fp32,naive_bf16")
    p.add_argument("--old-tree", help="a checkout of the code before the change, for old_* variants")
    p.add_argument("--tree", help="the code the new_* variants run (default: this checkout), e.g. one change alone")
    p.add_argument("--sandbox", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--out", default="/tmp/job_cost")
    p.add_argument("--settle", type=float, default=10.0,
                   help="seconds the server is left idle before each POST (a job arriving at an idle server: its "
                        "slot's worker started ahead is ready); 0: POST at once")
    args = p.parse_args()
    if args.naive:
        return naive_main(args)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("JOB_COST_WORK", "/tmp/job_cost_work"))
    shutil.rmtree(work, ignore_errors=True)
    inputs = work / "inputs"
    inputs.mkdir(parents=True)
    t = time.perf_counter()
    meta = make_inputs(inputs, args.size, args.n, args.device, args.arch)
    if args.arch != "digits":
        meta.update(size=args.size, n=args.n, levels=len(GRID))
    meta.update(arch=args.arch, make_inputs_s=round(time.perf_counter() - t, 2))
    print("inputs:", json.dumps(meta), flush=True)
    rows: list[dict[str, Any]] = []
    servers: dict[str, Server] = {}
    datasets: dict[str, tuple[str, float]] = {}
    results_path = out / "job_cost.json"
    try:
        for variant in args.variants.split(","):
            kind, prec, *mode = variant.split("_")
            t0 = time.perf_counter()
            if kind == "naive" and args.arch == "digits":
                row = {"error": "no naive peer for the digits job (its model is not rebuilt from a state dict)"}
            elif kind == "naive":
                row = run_naive(inputs, prec, args.device, args.arch)
            else:
                if kind not in servers:
                    tree = Path(args.tree or ROOT) if kind in ("new", "cold") else Path(args.old_tree or "")
                    env = {"CERTIPRUNE_PRESTART_WORKERS": "false"} if kind == "cold" else {}
                    servers[kind] = Server(tree, work / f"data-{kind}", out / f"server-{kind}.log", args.sandbox, env)
                config: dict[str, Any] = ({**DIGITS_CONFIG, "precision": prec} if args.arch == "digits" else
                                          {"device": args.device, "precision": prec, "sparsities": GRID,
                                           "full_curve": True, "epsilon": 0.05, "batch_size": 500})
                stored = "ds" in mode  # the calibration set uploaded once as a dataset; the job names it
                mode = [m for m in mode if m != "ds"]
                if mode and kind in ("new", "cold"):
                    config["cudnn_benchmark"] = mode[0] == "on"
                dataset = None
                if stored:
                    if kind not in datasets:
                        datasets[kind] = servers[kind].dataset(inputs)
                    dataset = datasets[kind][0]
                time.sleep(args.settle)
                row = servers[kind].job(inputs, config, dataset)
                if stored:
                    row["dataset_upload_s"] = datasets[kind][1]  # once, before: not part of this job's e2e
            row.update(breakdown(row))
            row["variant"] = variant
            rows.append(row)
            results_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
            print(f"{variant}: {time.perf_counter() - t0:.1f} s", json.dumps(row), flush=True)
    finally:
        for s in servers.values():
            s.close()
    print(f"\ndigits MLP, n = {meta['n']}, demo.sh's job ({json.dumps(DIGITS_CONFIG)})" if args.arch == "digits" else
          f"\n{args.arch} {args.size}×{args.size}, n = {args.n}, {len(GRID)} levels, full curve, device {args.device}")
    print("variant".ljust(16) + "".join(h.rjust(8) for h in COLUMNS.values()))
    for row in rows:
        print(row["variant"].ljust(16) + "".join(
            (f"{row[c]:.2f}" if isinstance(row.get(c), (int, float)) else "-").rjust(8) for c in COLUMNS)
            + ("  ERROR " + str(row["error"])[:200] if "error" in row else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
