"""Workers started ahead (issue 17): each free slot's worker and sandboxed child are started before a job
comes, so a job does not wait for their start — and it is still one fresh worker and child per job.

Real servers on 127.0.0.1, the real sandbox, real TorchScript jobs; the processes are read from /proc.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from collections import Counter

from service_harness import FAST_CONFIG, Inputs, Server, pid_gone, submit, wait_for, wait_terminal

from service.child import READY_LINE
from service.executors.local import discard_stale_standby_folders, visible_gpu_count, workers_wanted

pytestmark = pytest.mark.timeout(240)


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (its sandbox: bwrap and the child it runs)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        current = todo.pop()
        try:
            tasks = list(Path(f"/proc/{current}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            found.extend(kids)
            todo.extend(kids)
    return found


def standby_folders(server: Server) -> list[Path]:
    root = server.data_dir / ".standby"
    return sorted(root.iterdir()) if root.is_dir() else []


def wait_child_ready(folder: Path, timeout: float = 60.0) -> None:
    """The idle worker's child has imported torch and the science and now waits for a request."""
    deadline = time.monotonic() + timeout
    log = folder / "child.log"
    while time.monotonic() < deadline:
        if log.exists() and READY_LINE in log.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise AssertionError(f"the child of the worker started ahead never got ready: {log}")


def one_idle_worker(server: Server) -> tuple[int, Path]:
    idle = server.idle_workers()
    assert len(idle) == 1, f"one slot, one worker ahead; found {idle}"
    deadline = time.monotonic() + 10
    while len(folders := standby_folders(server)) != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(folders) == 1, folders
    return idle[0], folders[0]


def test_a_job_runs_in_the_worker_started_ahead_and_its_slot_gets_a_fresh_one(make_server, inputs: Inputs) -> None:
    server = make_server()
    first_pid, first_folder = one_idle_worker(server)
    wait_child_ready(first_folder)
    assert list((first_folder / "in").iterdir()) == []  # the waiting child's /in: empty, no job's file yet
    assert descendants(first_pid), "the worker ahead has started its sandboxed child"
    time.sleep(1.0)
    with server.client() as c:
        job = wait_terminal(c, submit(c, inputs.model, data=inputs.data, config=FAST_CONFIG).json()["id"])
    assert job["status"] == "succeeded", job
    timings = job["result"]["timings"]
    # It ran in the worker that had waited (ready) since before the submission: ≥ the second slept above.
    assert timings["standby_s"] >= 1.0, timings
    assert 0 <= timings["handoff_s"] < 5, timings
    assert timings["request_wait_s"] >= 1.0  # the child, too, was ready before the job came
    # One process per job: that worker and its child are gone, its folder removed, a new worker waits.
    assert pid_gone(first_pid)
    second_pid, second_folder = one_idle_worker(server)
    assert second_pid != first_pid and second_folder != first_folder and not first_folder.exists()
    assert list((second_folder / "in").iterdir()) == []  # nothing of the last job reaches the next
    assert (server.data_dir / "jobs" / job["id"] / "child.log").is_file()  # the job's log went to the job


def test_an_idle_worker_that_dies_is_replaced_and_jobs_still_run(make_server, inputs: Inputs) -> None:
    server = make_server()
    pid, folder = one_idle_worker(server)
    os.kill(pid, signal.SIGKILL)
    assert pid_gone(pid)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (not (idle := server.idle_workers(timeout=1)) or idle == [pid]):
        time.sleep(0.1)
    assert idle and pid not in idle, idle
    assert not folder.exists()  # the dead worker's run folder was removed
    with server.client() as c:
        job = wait_terminal(c, submit(c, inputs.model, data=inputs.data, config=FAST_CONFIG).json()["id"])
    assert job["status"] == "succeeded", job
    assert "worker_died" not in server.log()


def test_without_prestart_no_worker_waits_and_the_job_starts_its_own(make_server, inputs: Inputs) -> None:
    server = make_server(prestart_workers="false")
    time.sleep(2.0)
    assert server.worker_pids(idle_too=True) == []
    with server.client() as c:
        job = wait_terminal(c, submit(c, inputs.model, data=inputs.data, config=FAST_CONFIG).json()["id"])
    assert job["status"] == "succeeded", job
    assert job["result"]["timings"]["standby_s"] < 1.0  # spawned for the job, not waiting before it
    assert server.workers_left() == []
    time.sleep(1.0)
    assert server.worker_pids(idle_too=True) == []  # and none started after it


def test_shutdown_ends_the_idle_worker_and_its_sandboxed_child(make_server) -> None:
    server = make_server()
    pid, folder = one_idle_worker(server)
    wait_child_ready(folder)
    below = descendants(pid)
    assert below
    assert server.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    assert all(pid_gone(p) for p in [pid, *below]), "a process of the idle worker outlived the server"
    assert not folder.exists()


def test_stale_run_folders_of_gone_servers_on_this_host_are_removed(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    gone = tmp_path / f"{host}-{dead.pid}-abc123"
    alive = tmp_path / f"{host}-{os.getpid()}-def456"
    elsewhere = tmp_path / f"other-host-{dead.pid}-0a1b2c"
    for folder in (gone, alive, elsewhere):
        (folder / "in").mkdir(parents=True)
        (folder / "in" / "model.pt").write_bytes(b"x")
    assert discard_stale_standby_folders(tmp_path, host) == [gone.name]
    assert not gone.exists() and alive.exists() and elsewhere.exists()
    assert discard_stale_standby_folders(tmp_path / "missing", host) == []


def test_workers_wanted_one_per_free_slot_and_one_behind_each_busy_gpu() -> None:
    assert workers_wanted([None], []) == Counter({None: 1})
    assert workers_wanted([], [None]) == Counter()  # a busy CPU slot: the job keeps the CPU to itself
    assert workers_wanted([1], [0]) == Counter({0: 1, 1: 1})
    assert workers_wanted([0], [0]) == Counter({0: 2})  # two slots on one GPU, one busy: one for each
    assert workers_wanted([], [0, 1]) == Counter({0: 1, 1: 1})


@pytest.mark.skipif(visible_gpu_count() == 0, reason="needs an NVIDIA GPU (a GPU slot)")
def test_a_busy_gpu_slot_starts_the_next_jobs_worker_while_its_job_runs(make_server, inputs: Inputs,
                                                                       hostile_models: dict[str, Path]) -> None:
    server = make_server(cancel_grace_s=1)
    with server.client() as c:
        spins = submit(c, hostile_models["spins"], data=inputs.data, config={"device": "cuda"}).json()["id"]
        wait_for(c, spins, lambda j: j["status"] == "running", 60, "the endless job to run")
        ahead = server.idle_workers(timeout=60)
        assert len(ahead) == 1, "no worker was started ahead behind the running job"
        assert c.get(f"/v1/jobs/{spins}").json()["status"] == "running"  # its forward never returns
        # The running job's folder holds its inputs once staged; the next one's /in exists and is empty once its
        # worker has made it (both are moments after the claim and the idle process name: wait for them).
        deadline = time.monotonic() + 60
        while True:
            folders = [f for f in standby_folders(server) if (f / "in").is_dir()]
            waiting = [f for f in folders if not any((f / "in").iterdir())]
            if (len(waiting) == 1 and len(folders) == 2) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert len(waiting) == 1 and len(folders) == 2, folders
        wait_child_ready(waiting[0])  # its child imported torch and started CUDA beside the running job
        nxt = submit(c, inputs.model, data=inputs.data, config={**FAST_CONFIG, "device": "cuda"}).json()["id"]
        time.sleep(1.0)
        assert c.post(f"/v1/jobs/{spins}/cancel").status_code == 200
        assert wait_terminal(c, spins, timeout=60)["status"] == "cancelled"
        job = wait_terminal(c, nxt, timeout=120)
    assert job["status"] == "succeeded", job
    timings = job["result"]["timings"]
    assert timings["standby_s"] >= 1.0, timings  # it ran in the worker that had waited behind the other
    assert pid_gone(ahead[0])  # which served that one job and exited
