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
from service_harness import FAST_CONFIG, Inputs, Server, pid_gone, submit, wait_terminal

from service.child import READY_LINE
from service.executors.local import discard_stale_standby_folders

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
