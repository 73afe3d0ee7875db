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
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path

from ..settings import Settings
from ..store import Claim, Job, JobStore
from ..worker import discard_partial_job_files, run_job
from .base import DispatchingExecutor, Run, describe_exit, deterministic_failure

log = logging.getLogger("certiprune.executor")

SHUTDOWN_WAIT_S = 5.0


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


@dataclass(kw_only=True)
class _Run(Run):
    process: BaseProcess
    slot: int | None


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

    def _started_note(self) -> str:
        return f" with {self._slots} slot(s)"

    def _capacity(self) -> int:
        return self._slots

    def _start_run(self, claim: Claim) -> _Run:
        slot = self._free_slots.pop(0)
        try:
            process = self._ctx.Process(
                target=run_job,
                args=(claim.job_id, claim.run_id, self._settings_dict),
                kwargs={"gpu": slot, "parent_pid": os.getpid(), "spawned_at": time.time()},
                name=f"certiprune-{claim.job_id}",
                daemon=False,
            )
            process.start()
        except Exception:
            self._free_slots.append(slot)
            raise
        return _Run(claim=claim, process=process, slot=slot)

    def _run_started(self, run: _Run) -> None:
        log.info("job %s started in process %s (slot %s)", run.claim.job_id, run.process.pid, run.slot)

    def _reap(self) -> list[_Run]:
        over = [run for run in self._runs.values() if not run.process.is_alive()]
        for run in over:
            run.process.join(0)
        return over

    def _release(self, run: _Run) -> None:
        self._free_slots.append(run.slot)

    def _terminate(self, run: _Run) -> bool:
        run.process.terminate()
        return True

    def _kill(self, run: _Run) -> None:
        run.process.kill()

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
