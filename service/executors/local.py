"""LocalExecutor: a dispatcher thread that claims queued jobs and runs each in a spawned process.

Uploaded TorchScript is untrusted code, so it never runs in the API process: every job gets a
fresh interpreter started with multiprocessing's *spawn* context (never fork: the API process
has threads and open database connections). One job at a time on CPU, one per GPU with CUDA.
The dispatcher also enforces cancellation (grace period, then SIGTERM, then SIGKILL), the
wall-clock timeout, heartbeats, and recovery of jobs whose worker died. Each worker sandboxes
itself (``service.sandbox``: memory, CPU time, file size, open files) before loading the model;
a worker killed by its CPU-time limit (SIGXCPU) fails its job ``job_timeout``, and one that aborts
while writing the artifact (torch aborts on a failed write) fails it ``artifact_write_failed``,
both without a retry. A dead run's partial files are removed before its job can run again.

Each free slot, and each GPU slot while it runs a job, keeps one worker *started ahead*
(``CERTIPRUNE_PRESTART_WORKERS``, on by default;
``service.worker.serve_one_job``): it has spawned its sandboxed child, which has imported torch and
the science and started CUDA, and it waits for a claim. A claimed job is handed to it over a pipe,
so the job does not wait for interpreter start, imports and CUDA's start (seconds on a GPU). It is
still one fresh worker and one fresh child per job: each serves exactly one job and exits, and the
slot gets a new one. A worker ahead that dies idle is replaced (with a back-off).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path

from ..settings import Settings
from ..storage import Storage
from ..store import Claim, Job, JobStore
from ..worker import discard_partial_job_files, serve_one_job
from .base import DispatchingExecutor, Run, describe_exit, deterministic_failure

log = logging.getLogger("certiprune.executor")

SHUTDOWN_WAIT_S = 5.0
STANDBY_RETRY_MAX_S = 60.0  # back-off ceiling for replacing workers ahead that die idle


def visible_gpu_count(visible: str | None = None, driver_dir: Path = Path("/proc/driver/nvidia/gpus")) -> int:
    """NVIDIA GPUs this process may use, read from the driver and ``CUDA_VISIBLE_DEVICES`` without
    importing torch (the API process must not: a cold torch import costs seconds on a small machine).

    As CUDA does: the list is read up to its first invalid entry; an empty list hides every GPU."""
    try:
        present = sum(1 for _ in driver_dir.iterdir())
    except OSError:
        return 0
    if visible is None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return present
    count = 0
    for entry in visible.split(","):
        entry = entry.strip()
        if entry.isdigit() and int(entry) < present:
            count += 1
        elif entry.startswith(("GPU-", "MIG-")) and present:
            count += 1
        else:
            break
    return count


def default_slots() -> list[int | None]:
    """One slot per visible GPU, else a single CPU slot."""
    n = visible_gpu_count()
    return list(range(n)) if n else [None]


def standby_root(settings: Settings) -> Path:
    """Where workers started ahead keep their run folders: inside the data dir when it is local (the same file
    system as the jobs' files, so inputs are hard-linked and the artifact and log are moved by rename)."""
    storage = Storage(settings.data_dir)
    if storage.is_local:
        return storage.local_path(".standby")
    return Path(tempfile.gettempdir()) / "certiprune-standby"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def discard_stale_standby_folders(root: Path, host: str = socket.gethostname()) -> list[str]:
    """Remove run folders left by workers ahead of executors on this host that are gone (a killed server)."""
    removed = []
    try:
        entries = list(root.iterdir())
    except OSError:
        return removed
    for path in entries:
        owner_host, _, pid = path.name.rpartition("-")[0].rpartition("-")  # {host}-{pid}-{token}
        if owner_host != host or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    return removed


def workers_wanted(free_slots: list[int | None], busy_slots: list[int | None]) -> Counter[int | None]:
    """Workers to keep started ahead, by slot: one for each free slot, and one for each busy GPU slot, so that
    the job queued behind the running one does not wait for a worker's start either (on a GPU it costs seconds
    of imports and CUDA's start, and the waiting child holds only a CUDA context). A busy CPU slot gets none:
    its imports would take CPU from the job running there."""
    return Counter(free_slots) + Counter(slot for slot in busy_slots if slot is not None)


@dataclass(kw_only=True)
class _Worker:
    """A spawned worker (``serve_one_job``) for one slot, told its one claim over ``claims``."""

    process: BaseProcess
    claims: Connection  # the executor's end of the pipe
    folder: Path  # its private run folder (the sandbox's /in lives there)
    slot: int | None


@dataclass(kw_only=True)
class _Run(Run):
    process: BaseProcess
    slot: int | None
    folder: Path


class LocalExecutor(DispatchingExecutor[_Run]):
    """Runs queued jobs from ``store`` in spawned processes on this machine."""

    log = log

    def __init__(self, settings: Settings, store: JobStore, *, poll_interval_s: float = 0.25) -> None:
        super().__init__(settings, store, poll_interval_s=poll_interval_s)
        self._ctx = multiprocessing.get_context("spawn")
        gpu_slots = default_slots()
        if settings.max_concurrent_jobs is not None:
            n = settings.max_concurrent_jobs
            gpu_slots = [gpu_slots[i % len(gpu_slots)] for i in range(n)]
        self._slots = len(gpu_slots)
        self._free_slots: list[int | None] = gpu_slots
        self._standby: list[_Worker] = []  # workers ahead: see workers_wanted
        self._standby_failures = 0
        self._standby_retry_at = 0.0
        self._standby_root = standby_root(settings)
        self._folder_prefix = f"{socket.gethostname()}-{os.getpid()}"
        for name in discard_stale_standby_folders(self._standby_root):
            log.info("removed the run folder %s of a worker whose server is gone", name)

    def _started_note(self) -> str:
        ahead = ", workers started ahead" if self.settings.prestart_workers else ""
        return f" with {self._slots} slot(s){ahead}"

    def _capacity(self) -> int:
        return self._slots

    # -- workers ------------------------------------------------------------------------

    def _spawn_worker(self, slot: int | None) -> _Worker:
        folder = self._standby_root / f"{self._folder_prefix}-{uuid.uuid4().hex[:12]}"
        receive, send = self._ctx.Pipe(duplex=False)
        try:
            process = self._ctx.Process(
                target=serve_one_job,
                args=(receive, self._settings_dict),
                kwargs={"folder": str(folder), "gpu": slot, "parent_pid": os.getpid(), "spawned_at": time.time()},
                name=f"certiprune-worker-{folder.name}",
                daemon=False,
            )
            process.start()
        except BaseException:
            send.close()
            raise
        finally:
            receive.close()  # the worker has its own copy
        return _Worker(process=process, claims=send, folder=folder, slot=slot)

    def _retire(self, worker: _Worker, *, kill: bool) -> None:
        worker.claims.close()  # EOF: a worker still waiting for its claim ends (and kills its child)
        if kill and worker.process.is_alive():
            worker.process.kill()
        worker.process.join(0 if not kill else 2.0)
        shutil.rmtree(worker.folder, ignore_errors=True)

    def _keep_workers_ahead(self) -> None:
        """The workers ahead that ``workers_wanted`` asks for: replace those that died idle, start the missing ones."""
        if not self.settings.prestart_workers or self._stop.is_set():
            return
        for worker in [w for w in self._standby if not w.process.is_alive()]:
            self._standby.remove(worker)
            self._retire(worker, kill=False)
            self._standby_failures += 1
            self._standby_retry_at = time.monotonic() + min(STANDBY_RETRY_MAX_S, 2.0 ** self._standby_failures)
            log.warning("a worker started ahead for slot %s exited (%s) before it had a job; replacing it",
                        worker.slot, describe_exit(worker.process.exitcode))
        if time.monotonic() < self._standby_retry_at:
            return
        busy = [run.slot for run in self._runs.values()]
        missing = workers_wanted(self._free_slots, busy) - Counter(w.slot for w in self._standby)
        for slot, count in missing.items():
            for _ in range(count):
                self._standby.append(self._spawn_worker(slot))

    def _claim_into_free_capacity(self) -> None:
        super()._claim_into_free_capacity()
        self._keep_workers_ahead()

    def _take_worker(self, slot: int | None) -> _Worker | None:
        for worker in self._standby:
            if worker.slot == slot and worker.process.is_alive():
                self._standby.remove(worker)
                return worker
        return None

    def _start_run(self, claim: Claim) -> _Run:
        slot = self._free_slots.pop(0)
        try:
            worker = self._take_worker(slot)
            message = (claim.job_id, claim.run_id, time.time())
            if worker is not None:
                try:
                    worker.claims.send(message)
                except OSError:  # it died between the check and the send: start one now
                    self._retire(worker, kill=True)
                    worker = None
            if worker is None:
                worker = self._spawn_worker(slot)
                try:
                    worker.claims.send(message)
                except BaseException:
                    self._retire(worker, kill=True)  # never leave a worker waiting for a claim that will not come
                    raise
            else:
                self._standby_failures = 0
            worker.claims.close()
        except Exception:
            self._free_slots.append(slot)
            raise
        return _Run(claim=claim, process=worker.process, slot=slot, folder=worker.folder)

    def _run_started(self, run: _Run) -> None:
        log.info("job %s started in process %s (slot %s)", run.claim.job_id, run.process.pid, run.slot)

    def _reap(self) -> list[_Run]:
        over = [run for run in self._runs.values() if not run.process.is_alive()]
        for run in over:
            run.process.join(0)
        return over

    def _release(self, run: _Run) -> None:
        shutil.rmtree(run.folder, ignore_errors=True)  # the worker removes it itself unless it was killed
        self._free_slots.append(run.slot)
        self._keep_workers_ahead()

    def _terminate(self, run: _Run) -> bool:
        run.process.terminate()
        return True

    def _kill(self, run: _Run) -> None:
        run.process.kill()

    def _shutdown_runs(self) -> None:
        standby, self._standby = self._standby, []
        for worker in standby:
            worker.claims.close()  # EOF: it kills its child and exits
        super()._shutdown_runs()
        deadline = time.monotonic() + SHUTDOWN_WAIT_S
        for worker in standby:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            self._retire(worker, kill=True)

    def _stop_for_shutdown(self, runs: list[_Run]) -> None:
        for run in runs:
            if run.process.is_alive():
                run.process.terminate()
        deadline = time.monotonic() + SHUTDOWN_WAIT_S
        for run in runs:
            run.process.join(max(0.0, deadline - time.monotonic()))
            if run.process.is_alive():
                run.process.kill()
                run.process.join(2.0)

    def _before_recording(self, run: _Run, job: Job) -> None:
        try:  # before the job can be claimed again: nobody else writes in its folder now
            discard_partial_job_files(self.settings, job.id)
        except OSError:
            log.warning("could not remove the partial files of %s", job.id, exc_info=True)

    def _failure_without_retry(self, run: _Run, job: Job) -> tuple[str, str] | None:
        return deterministic_failure(run.process.exitcode, job.progress_stage)

    def _describe_death(self, run: _Run) -> str:
        return f"The worker process {describe_exit(run.process.exitcode)}."


__all__ = ["LocalExecutor"]
