"""Faults: workers killed with SIGKILL mid-job, the API killed with jobs queued and running, a full
disk while the artifact is written, and models that exhaust memory or CPU inside the sandbox.

Every job ends succeeded (retried) or failed with a clear code; none stays queued or running,
none is lost, and no half-written artifact is ever served.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from service_harness import (
    FAST_CONFIG,
    REPO,
    SLOW_CONFIG,
    TERMINAL,
    Inputs,
    Server,
    assert_error,
    submit,
    wait_for,
    wait_terminal,
)

from service.sandbox import Limits, limits_from_settings
from service.settings import Settings

pytestmark = pytest.mark.timeout(300)

TINY = {"sparsities": [0.2, 0.5], "epsilon": 0.05}
WORKER_KILLS = 20


def pid_state(pid: int) -> str | None:
    """The process state letter, or None when it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return status.split("\nState:\t", 1)[1][:1]


def wait_pid_gone(pid: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pid_state(pid) in (None, "Z"):
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} is still alive")


def all_jobs(c: httpx.Client) -> dict[str, dict]:
    return {j["id"]: j for j in c.get("/v1/jobs", params={"limit": 1000}).json()["data"]}


def leftovers(server: Server, job_id: str) -> list[str]:
    folder = server.data_dir / "jobs" / job_id
    if not folder.exists():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name.startswith((".tmp", ".artifact")))


# -- the sandbox itself -------------------------------------------------------------------------

def test_sandbox_limits_follow_the_settings_and_skip_address_space_for_cuda() -> None:
    s = Settings(sandbox_max_memory_bytes=4 * 1024**3, sandbox_max_cpu_s=90.5, sandbox_max_file_bytes=1024**2,
                 sandbox_max_open_files=256, sandbox_max_processes=300)
    assert limits_from_settings(s, cuda=False) == Limits(4 * 1024**3, 91, 1024**2, 256, 300)
    assert limits_from_settings(s, cuda=True).address_space_bytes is None  # CUDA reserves huge virtual ranges
    off = Settings(sandbox_max_memory_bytes=0, sandbox_max_cpu_s=0, sandbox_max_file_bytes=0, sandbox_max_open_files=0,
                   sandbox_max_processes=0)
    assert limits_from_settings(off, cuda=False) == Limits(None, None, None, None, None)
    defaults = limits_from_settings(Settings(job_timeout_s=100), cuda=False)
    from service.sandbox import physical_memory_bytes

    physical = physical_memory_bytes()
    assert physical and defaults.address_space_bytes == physical // 2  # bounded per job, not all of the RAM
    assert defaults.processes and defaults.processes >= 64
    assert defaults.cpu_seconds and defaults.cpu_seconds >= 100
    assert defaults.file_bytes and defaults.file_bytes >= 8 * 1024**3 and defaults.open_files == 1024


def test_sandbox_applies_rlimits_and_turns_oversized_writes_into_errors(tmp_path: Path) -> None:
    code = f"""
import errno, resource
from service.sandbox import Limits, apply
apply(Limits(address_space_bytes=3 * 1024**3, cpu_seconds=120, file_bytes=4096, open_files=64))
print([resource.getrlimit(r) for r in (resource.RLIMIT_AS, resource.RLIMIT_CPU, resource.RLIMIT_FSIZE,
                                       resource.RLIMIT_NOFILE, resource.RLIMIT_CORE)])
try:
    open({str(tmp_path / 'big.bin')!r}, 'wb').write(b'x' * 10000)
except OSError as exc:
    print('EFBIG' if exc.errno == errno.EFBIG else exc)
try:
    bytearray(4 * 1024**3)
except MemoryError:
    print('MemoryError')
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == str([(3 * 1024**3,) * 2, (120, 125), (4096, 4096), (64, 64), (0, 0)])
    assert lines[1:] == ["EFBIG", "MemoryError"]


# -- SIGKILL workers mid-job, then the API -------------------------------------------------------

#: About two seconds of evaluation (after a worker's few seconds of start-up): long enough to be killed in it.
MEDIUM = {"sparsities": [round(0.02 * i, 2) for i in range(1, 21)], "epsilon": 0.05, "full_curve": True,
          "batch_size": 2048}
COMPUTE_STAGES = ("dense", "scoring", "testing", "saving")


def running_job(c: httpx.Client) -> dict | None:
    running = [j for j in all_jobs(c).values() if j["status"] == "running"]
    return running[0] if running else None


def test_killing_workers_and_the_api_loses_no_job(make_server, inputs: Inputs, tmp_path: Path) -> None:
    """SIGKILL the worker 20 times (every second kill once the job computes, the others anywhere from
    interpreter start-up on), then SIGKILL the API with jobs running and queued, and restart it."""
    data_dir = tmp_path / "data"
    settings = {"max_attempts": WORKER_KILLS + 5}  # even if every kill hits one job, it is retried
    server = make_server(data_dir, **settings)
    rng = random.Random(20)
    submitted: list[str] = []
    stages: Counter[str] = Counter()
    kills = 0
    with server.client() as c:
        ds = c.post("/v1/datasets", files={"file": ("big.npz", inputs.big_data.read_bytes())}).json()["id"]

        def new_job(tiny: bool = False) -> None:
            r = (submit(c, inputs.model, data=inputs.data, config=TINY) if tiny
                 else submit(c, inputs.big_model, dataset=ds, config=MEDIUM))
            assert r.status_code == 202, r.text
            submitted.append(r.json()["id"])

        new_job()
        deadline = time.monotonic() + 150
        while kills < WORKER_KILLS and time.monotonic() < deadline:
            if all(j["status"] in TERMINAL for j in all_jobs(c).values()):
                new_job()
            pids = server.worker_pids()
            job = running_job(c)
            if not pids or job is None:
                time.sleep(0.05)
                continue
            if kills % 2 == 1:  # in the middle of the computation
                if job["progress"]["stage"] not in COMPUTE_STAGES:
                    time.sleep(0.05)
                    continue
                time.sleep(rng.uniform(0.0, 0.8))
            else:  # anywhere from interpreter start-up to loading the model
                time.sleep(rng.uniform(0.0, 1.2))
            job = running_job(c)
            if job is None or pid_state(pids[0]) not in ("R", "S", "D"):
                continue
            try:
                os.kill(pids[0], signal.SIGKILL)
            except ProcessLookupError:
                continue
            kills += 1
            stages[job["progress"]["stage"] or "?"] += 1
            wait_pid_gone(pids[0])
        assert kills == WORKER_KILLS, f"only {kills} kills in the time allowed"

        # Now the API itself, with one job running and others queued.
        new_job(tiny=True)
        new_job(tiny=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            statuses = Counter(j["status"] for j in all_jobs(c).values())
            if statuses["running"] and statuses["queued"]:
                break
            time.sleep(0.1)
        assert statuses["running"] and statuses["queued"], statuses
    workers = server.worker_pids(idle_too=True)
    server.stop(signal.SIGKILL)
    for pid in workers:
        wait_pid_gone(pid)  # no orphan keeps computing
    server = make_server(data_dir, **settings)
    with server.client() as c:
        final = {job_id: wait_terminal(c, job_id, timeout=120) for job_id in submitted}
        listed = all_jobs(c)
        lost = [j for j in submitted if j not in listed]
        succeeded = [j for j in final.values() if j["status"] == "succeeded"]
        failed = [j for j in final.values() if j["status"] == "failed"]
        for job in failed:  # allowed, but only with a clear reason
            assert job["error"]["code"] in ("worker_died", "worker_interrupted") and job["error"]["message"], job
        for job in succeeded:
            r = c.get(f"/v1/jobs/{job['id']}/artifact")
            assert r.status_code == 200 and r.headers["x-checksum-sha256"] == job["result"]["artifact_sha256"]
            assert hashlib.sha256(r.content).hexdigest() == job["result"]["artifact_sha256"]
            assert leftovers(server, job["id"]) == []
        reruns = sum(j["attempts"] for j in final.values())
    print(f"\nfaults: {kills} workers killed mid-job (job stage at the kill: {dict(stages)}) + 1 API killed with "
          f"jobs running and queued = {kills + 1} faults injected, {kills + 1} survived; {len(submitted)} jobs, "
          f"{reruns} lost runs re-run, {len(succeeded)} succeeded, {len(failed)} failed clearly, 0 stuck; "
          f"jobs lost: {len(lost)}")
    assert not lost
    assert len(succeeded) + len(failed) == len(submitted)  # none queued, running or cancelled
    assert len(succeeded) == len(submitted)  # with attempts to spare, every job gets through
    assert sum(stages[s] for s in COMPUTE_STAGES) >= WORKER_KILLS // 2


# -- resource exhaustion inside the sandbox (hostile_models: tests/service/conftest.py) ---------

def artifact_bytes(path: Path) -> int:
    """The size of the pruned artifact: the same module saved again (zeros take the same room)."""
    import torch

    buf = io.BytesIO()
    torch.jit.save(torch.jit.load(str(path)), buf)
    return len(buf.getvalue())


def test_memory_hogs_endless_loops_and_a_full_disk_fail_their_job_clearly(
        make_server, inputs: Inputs, hostile_models: dict[str, Path]) -> None:
    """RLIMIT_AS stops a 12 GiB allocation, RLIMIT_CPU an endless loop; a file-size limit between the
    weights and the whole archive makes the artifact write itself fail (as a full disk would), and
    one below the weights is refused before any work."""
    from service.worker import artifact_size_estimate

    weights, whole = artifact_size_estimate(hostile_models["wide"]), artifact_bytes(hostile_models["wide"])
    assert weights < whole < artifact_size_estimate(hostile_models["wider"])
    limit = (weights + whole) // 2
    server = make_server(sandbox_max_memory_bytes=4 * 1024**3, sandbox_max_cpu_s=12, sandbox_max_file_bytes=limit,
                         max_concurrent_jobs=2, max_attempts=3)
    expected = {"hog": "job_out_of_memory", "spins": "job_timeout", "wide": "artifact_write_failed",
                "wider": "artifact_too_large"}
    with server.client() as c:
        ids = {name: submit(c, hostile_models[name], data=inputs.data, config=TINY).json()["id"] for name in expected}
        ok = submit(c, inputs.model, data=inputs.data, config=FAST_CONFIG).json()["id"]
        for name, code in expected.items():
            job = wait_terminal(c, ids[name], timeout=150)
            assert job["status"] == "failed" and job["error"]["code"] == code, (name, job, server.log())
            assert job["attempts"] == 0, job  # a deterministic failure, not a retried crash
            assert_error(c.get(f"/v1/jobs/{ids[name]}/artifact"), 409, "job_not_succeeded")
            folder = server.data_dir / "jobs" / ids[name]
            assert not (folder / "artifact.pt").exists() and leftovers(server, ids[name]) == [], name
        assert "4.0 GiB" in c.get(f"/v1/jobs/{ids['hog']}").json()["error"]["message"]
        assert "CERTIPRUNE_SANDBOX_MAX_FILE_BYTES" in c.get(f"/v1/jobs/{ids['wider']}").json()["error"]["message"]
        # The same limits let an ordinary job through.
        assert wait_terminal(c, ok, timeout=120)["status"] == "succeeded"
        assert c.get("/healthz").status_code == 200
    assert server.workers_left() == []


def _can_mount_tmpfs(where: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    trial = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            f'mount -t tmpfs -o size=1m tmpfs "{where}"'], capture_output=True, timeout=30)
    return trial.returncode == 0


def test_a_really_full_disk_fails_the_artifact_write_and_serves_nothing(tmp_path: Path, inputs: Inputs,
                                                                         hostile_models: dict[str, Path]) -> None:
    """ENOSPC for real: the server's data dir is a small tmpfs in its own mount namespace. While a slow job
    holds the only slot, the queued job's disk is filled to leave room for the weights (so the pre-check
    passes) but not for the whole archive; the artifact write then fails, the job fails clearly, and no
    partial file remains. Once space is freed, an ordinary job succeeds."""
    from service.worker import artifact_size_estimate

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    if not _can_mount_tmpfs(data_dir):
        pytest.skip("mounting a tmpfs in a private mount namespace needs CAP_SYS_ADMIN (or user namespaces)")
    need, whole = artifact_size_estimate(hostile_models["wide"]), artifact_bytes(hostile_models["wide"])
    target = -(-need // 4096) * 4096  # free space after filling: room for the weights, not the archive
    assert need <= target < whole
    server = Server(
        data_dir=data_dir,
        env={"CERTIPRUNE_DATABASE_URL": f"sqlite:///{tmp_path / 'jobs.db'}", "CERTIPRUNE_MAX_CONCURRENT_JOBS": "1",
             "CERTIPRUNE_MAX_ATTEMPTS": "3"},
        prefix=["unshare", "--mount", "--propagation", "private", "sh", "-c",
                f'mount -t tmpfs -o size=160m tmpfs "{data_dir}" && exec "$@"', "sh"],
    ).start()
    inside = Path(f"/proc/{server.proc.pid}/root") / data_dir.relative_to("/")  # the tmpfs, seen from outside
    try:
        with server.client() as c:
            slow = submit(c, inputs.big_model, data=inputs.big_data, config=SLOW_CONFIG).json()["id"]
            wait_for(c, slow, lambda j: j["status"] == "running", 60, "the slow job to hold the slot")
            victim = submit(c, hostile_models["wide"], data=inputs.data, config=TINY).json()["id"]
            assert c.get(f"/v1/jobs/{victim}").json()["status"] == "queued"
            stat = os.statvfs(inside)
            free = stat.f_bavail * stat.f_frsize
            assert free > target, (free, target)
            filler = inside / "filler.bin"
            with open(filler, "wb") as fh:
                left, block = free - target, b"\0" * (1 << 20)
                while left:
                    left -= fh.write(block[:min(left, len(block))])
            stat = os.statvfs(inside)
            assert stat.f_bavail * stat.f_frsize == target
            assert c.post(f"/v1/jobs/{slow}/cancel").status_code == 200
            job = wait_terminal(c, victim, timeout=120)
            assert job["status"] == "failed" and job["error"]["code"] == "artifact_write_failed", (job, server.log())
            assert job["attempts"] == 0, job  # a full disk is not retried as a crash
            print("ENOSPC job error:", job["error"])
            assert_error(c.get(f"/v1/jobs/{victim}/artifact"), 409, "job_not_succeeded")
            folder = inside / "jobs" / victim
            assert not (folder / "artifact.pt").exists()
            assert sorted(p.name for p in folder.iterdir() if p.name.startswith((".tmp", ".artifact"))) == []
            # Room again: the next job writes its artifact and serves it whole.
            filler.unlink()
            ok = submit(c, inputs.model, data=inputs.data, config=FAST_CONFIG).json()["id"]
            assert wait_terminal(c, ok, timeout=120)["status"] == "succeeded"
            r = c.get(f"/v1/jobs/{ok}/artifact")
            assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == r.headers["x-checksum-sha256"]
    finally:
        server.stop()
