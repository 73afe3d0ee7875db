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
import signal
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess

from ..settings import Settings
from ..store import (
    RUNNING,
    Claim,
    JobStore,
    make_worker_id,
    stale_cutoff,
    worker_is_gone_locally,
)
from ..worker import discard_partial_job_files, run_job

log = logging.getLogger("certiprune.executor")

HEARTBEAT_EVERY_S = 2.0
SWEEP_EVERY_S = 5.0
KILL_AFTER_TERM_S = 3.0


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "did not exit"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (often the kernel's out-of-memory killer)" if name == "SIGKILL" else ""
        return f"was killed by {name}{hint}"
    return f"exited with status {exitcode}"


def default_slots() -> list[int | None]:
    """One slot per visible GPU, else a single CPU slot."""
    try:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # no torch or a broken driver: run on CPU
        n = 0
    return list(range(n)) if n else [None]


@dataclass
class _Run:
    claim: Claim
    process: BaseProcess
    slot: int | None
    started: float = field(default_factory=time.monotonic)
    reason: str | None = None  # why the dispatcher is stopping it: cancel | timeout | shutdown
    stop_seen_at: float | None = None
    term_sent_at: float | None = None
    kill_sent: bool = False


class LocalExecutor:
    """Runs queued jobs from ``store`` in spawned processes on this machine."""

    def __init__(self, settings: Settings, store: JobStore, *, poll_interval_s: float = 0.25) -> None:
        self.settings = settings
        self.store = store
        self.poll_interval_s = poll_interval_s
        self.worker_id = make_worker_id()
        self._settings_dict = settings.model_dump(mode="json")
        self._ctx = multiprocessing.get_context("spawn")
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._runs: dict[str, _Run] = {}  # by job id
        gpu_slots = default_slots()
        if settings.max_concurrent_jobs is not None:
            n = settings.max_concurrent_jobs
            gpu_slots = [gpu_slots[i % len(gpu_slots)] for i in range(n)]
        self._free_slots: list[int | None] = gpu_slots

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Recover orphaned jobs now (so the API never shows them 'running' after a restart), then dispatch."""
        if self._thread is not None:
            return
        try:
            self._recover()
        except Exception:
            log.exception("start-up recovery failed; the dispatcher will retry")
        self._thread = threading.Thread(target=self.run_forever, name="certiprune-dispatcher", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 20.0) -> None:
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def request_stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def run_forever(self) -> None:
        """The dispatcher loop (a thread under ``serve``, the main thread under ``certiprune worker``)."""
        log.info("executor %s started with %d slot(s)", self.worker_id, len(self._free_slots))
        last_heartbeat = time.monotonic()
        last_sweep = 0.0  # sweep for orphaned jobs on the first tick
        try:
            while not self._stop.is_set():
                try:
                    self._reap_and_police()
                    now = time.monotonic()
                    if now - last_heartbeat >= HEARTBEAT_EVERY_S:
                        self.store.heartbeat(run_ids=[r.claim.run_id for r in self._runs.values()])
                        last_heartbeat = now
                    if now - last_sweep >= SWEEP_EVERY_S:
                        self._recover()
                        last_sweep = now
                    self._claim_into_free_slots()
                except Exception:  # the dispatcher must survive a database hiccup
                    log.exception("dispatcher tick failed; retrying")
                self._wake.wait(self.poll_interval_s)
                self._wake.clear()
        finally:
            self._shutdown_runs()
            log.info("executor %s stopped", self.worker_id)

    # -- steps --------------------------------------------------------------------------

    def _recover(self) -> None:
        changed = self.store.requeue_interrupted(
            max_attempts=self.settings.max_attempts,
            stale_before=stale_cutoff(self.settings.heartbeat_timeout_s),
            is_gone=lambda w: w != self.worker_id and worker_is_gone_locally(w),
        )
        for job_id, status in changed.items():
            log.warning("job %s was left running by a worker that is gone; now %s", job_id, status)

    def _claim_into_free_slots(self) -> None:
        while self._free_slots and not self._stop.is_set():
            claim = self.store.claim_next(worker_id=self.worker_id)
            if claim is None:
                return
            slot = self._free_slots.pop(0)
            try:
                process = self._ctx.Process(
                    target=run_job,
                    args=(claim.job_id, claim.run_id, self._settings_dict),
                    kwargs={"gpu": slot, "parent_pid": os.getpid()},
                    name=f"certiprune-{claim.job_id}",
                    daemon=False,
                )
                process.start()
            except Exception as exc:
                self._free_slots.append(slot)
                log.exception("could not start a worker for %s", claim.job_id)
                self.store.interrupt(job_id=claim.job_id, run_id=claim.run_id, max_attempts=self.settings.max_attempts,
                                     code="worker_start_failed", message=f"Could not start a worker process: {exc}.")
                return
            self._runs[claim.job_id] = _Run(claim=claim, process=process, slot=slot)
            log.info("job %s started in process %s (slot %s)", claim.job_id, process.pid, slot)

    def _reap_and_police(self) -> None:
        now = time.monotonic()
        for job_id, run in list(self._runs.items()):
            if not run.process.is_alive():
                run.process.join(0)
                self._finish_run(run)
                del self._runs[job_id]
                self._free_slots.append(run.slot)
                continue
            if run.reason is None and now - run.started > self.settings.job_timeout_s:
                run.reason, run.stop_seen_at = "timeout", now
                log.warning("job %s exceeded the %.0f s limit; killing it", job_id, self.settings.job_timeout_s)
                run.process.kill()
                run.kill_sent = True
        live = [r for r in self._runs.values() if r.reason is None]
        if live:
            wanted = self.store.cancel_requested_runs(run_ids=[r.claim.run_id for r in live])
            for run in live:
                if run.claim.run_id in wanted:
                    run.reason, run.stop_seen_at = "cancel", now
        for run in self._runs.values():
            if run.reason == "cancel":
                self._escalate(run, now, grace=self.settings.cancel_grace_s)

    def _escalate(self, run: _Run, now: float, *, grace: float) -> None:
        """The worker polls for the cancel itself; if it does not stop in time, SIGTERM, then SIGKILL."""
        assert run.stop_seen_at is not None
        if run.term_sent_at is None and now - run.stop_seen_at >= grace:
            log.info("job %s did not stop within %.1f s of its cancel; terminating", run.claim.job_id, grace)
            run.process.terminate()
            run.term_sent_at = now
        elif run.term_sent_at is not None and not run.kill_sent and now - run.term_sent_at >= KILL_AFTER_TERM_S:
            run.process.kill()
            run.kill_sent = True

    def _finish_run(self, run: _Run) -> None:
        """The process is gone: if it did not record an outcome, record one for it."""
        job = self.store.get(job_id=run.claim.job_id)
        if job is None or job.status != RUNNING or job.run_id != run.claim.run_id:
            return  # the worker finished the job itself (or it was reassigned)
        code = run.process.exitcode
        try:  # before the job can be claimed again: nobody else writes in its folder now
            discard_partial_job_files(self.settings, job.id)
        except OSError:
            log.warning("could not remove the partial files of %s", job.id, exc_info=True)
        if run.reason == "timeout":
            self.store.finish(job_id=job.id, run_id=run.claim.run_id, status="failed", error_code="job_timeout",
                              error_message=f"The job exceeded the time limit of {self.settings.job_timeout_s:.0f} s "
                                            "and was stopped. Use fewer sparsity levels, a smaller calibration set, "
                                            "or ask the operator to raise CERTIPRUNE_JOB_TIMEOUT_S.")
        elif run.reason == "cancel":
            self.store.finish(job_id=job.id, run_id=run.claim.run_id, status="cancelled")
        elif code == -signal.SIGXCPU:  # the sandbox's RLIMIT_CPU (service.sandbox): deterministic, no retry
            self.store.finish(job_id=job.id, run_id=run.claim.run_id, status="failed", error_code="job_timeout",
                              error_message="The job used up the CPU time a run may take and was stopped "
                                            "(CERTIPRUNE_SANDBOX_MAX_CPU_S). Check that the model's forward "
                                            "terminates, use fewer sparsity levels or a smaller calibration set, "
                                            "or ask the operator to raise the limit.")
        elif code == -signal.SIGABRT and job.progress_stage == "saving":
            # torch aborts the process when writing the artifact fails (disk full, RLIMIT_FSIZE): deterministic.
            self.store.finish(job_id=job.id, run_id=run.claim.run_id, status="failed",
                              error_code="artifact_write_failed",
                              error_message="The worker crashed while writing the pruned model: the server's disk is "
                                            "probably full, or the artifact is larger than a worker may write "
                                            "(CERTIPRUNE_SANDBOX_MAX_FILE_BYTES). No artifact was stored.")
        elif run.reason == "shutdown":
            new = self.store.requeue_run(job_id=job.id, run_id=run.claim.run_id,
                                         message="The service shut down while the job was running; it will run again.")
            log.warning("job %s interrupted by shutdown; now %s", job.id, new)
        else:
            new = self.store.interrupt(
                job_id=job.id, run_id=run.claim.run_id, max_attempts=self.settings.max_attempts, code="worker_died",
                message=f"The worker process {describe_exit(code)}.",
            )
            log.warning("job %s: worker %s; job is now %s", job.id, describe_exit(code), new)

    def _shutdown_runs(self) -> None:
        """Orderly stop: terminate workers, then give their jobs back to the queue (no attempt counted)."""
        if not self._runs:
            return
        for run in self._runs.values():
            if run.reason is None:
                run.reason = "shutdown"
            if run.process.is_alive():
                run.process.terminate()
        deadline = time.monotonic() + 5.0
        for run in self._runs.values():
            run.process.join(max(0.0, deadline - time.monotonic()))
            if run.process.is_alive():
                run.process.kill()
                run.process.join(2.0)
        for run in self._runs.values():
            try:
                self._finish_run(run)
            except Exception:
                log.exception("could not record the end of job %s", run.claim.job_id)
        self._runs.clear()


__all__ = ["LocalExecutor", "describe_exit"]
