"""DispatchingExecutor: the dispatcher loop that the local and Ray executors share.

A dispatcher thread (or the main thread, under ``certiprune worker``) ticks every
``poll_interval_s`` or when woken by ``notify``. Each tick it reaps the runs that are over and
records an outcome for those that did not record one themselves, polices the wall-clock timeout
and cancel requests (the worker polls for a cancel itself; after ``cancel_grace_s`` it is
terminated where the executor can, then killed), heartbeats its runs, sweeps for jobs orphaned
by a dead executor, and claims queued jobs into free capacity. On stop, its runs are stopped and
their jobs handed back to the queue without counting an attempt. It decides how such a run ended;
``service.supervisor.record_outcome`` writes it (the one writer of a run's end, as for the supervisor).

A subclass supplies only how a run starts, is reaped, is stopped and how many may run at once:
``_capacity``, ``_start_run``, ``_reap``, ``_kill``, ``_stop_for_shutdown``, ``_describe_death``
(and, where it has them, ``connect``/``disconnect``, ``_terminate``, ``_release``, ``_run_started``,
``_before_recording``, ``_failure_without_retry``).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from ..settings import Settings
from ..storage import Storage, job_dir
from ..store import (
    CANCELLED,
    FAILED,
    RUNNING,
    Claim,
    Job,
    JobStore,
    make_worker_id,
    stale_cutoff,
    worker_is_gone_locally,
)
from ..supervisor import INTERRUPTED, LOST, Outcome, record_outcome, recover_orphans

HEARTBEAT_EVERY_S = 2.0
SWEEP_EVERY_S = 5.0
KILL_AFTER_TERM_S = 3.0


def describe_exit(exitcode: int | None) -> str:
    """A worker process's end in words ("was killed by SIGKILL (often ...)")."""
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


def deterministic_failure(exitcode: int | None, progress_stage: str | None) -> tuple[str, str] | None:
    """(code, message) for a worker death that a retry would only repeat, else None (retry it).

    SIGXCPU is the sandbox's RLIMIT_CPU (``service.sandbox``); SIGABRT while saving is torch aborting on a
    failed write (disk full, RLIMIT_FSIZE). Both executors use this, each on the process that ran the job.
    """
    if exitcode == -signal.SIGXCPU:
        return "job_timeout", ("The job used up the CPU time a run may take and was stopped "
                               "(CERTIPRUNE_SANDBOX_MAX_CPU_S). Check that the model's forward "
                               "terminates, use fewer sparsity levels or a smaller calibration set, "
                               "or ask the operator to raise the limit.")
    if exitcode == -signal.SIGABRT and progress_stage == "saving":
        return "artifact_write_failed", ("The worker crashed while writing the pruned model: the server's "
                                         "disk is probably full, or the artifact is larger than a worker may "
                                         "write (CERTIPRUNE_SANDBOX_MAX_FILE_BYTES). No artifact was stored.")
    return None




@dataclass(kw_only=True)
class Run:
    """One claimed job the dispatcher is running; subclasses add their handle on the worker."""

    claim: Claim
    started: float = field(default_factory=time.monotonic)
    reason: str | None = None  # why the dispatcher is stopping it: cancel | timeout | shutdown
    stop_seen_at: float | None = None
    term_sent_at: float | None = None
    kill_sent: bool = False


RunT = TypeVar("RunT", bound=Run)


class DispatchingExecutor(ABC, Generic[RunT]):
    """Claims queued jobs from ``store`` and runs them, at most ``_capacity()`` at once."""

    log: ClassVar[logging.Logger]
    name: ClassVar[str] = "executor"  # in log lines
    thread_name: ClassVar[str] = "certiprune-dispatcher"
    start_failed: ClassVar[str] = "Could not start a worker"  # the job's message when _start_run raises

    def __init__(self, settings: Settings, store: JobStore, *, poll_interval_s: float = 0.25,
                 settings_dict: dict[str, Any] | None = None) -> None:
        self.settings = settings
        self.store = store
        self.poll_interval_s = poll_interval_s
        self.worker_id = make_worker_id()
        self._settings_dict = settings.model_dump(mode="json") if settings_dict is None else settings_dict
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._runs: dict[str, RunT] = {}  # by job id
        self._storage: Storage | None = None  # for retention, made on first use

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Recover orphaned jobs now (so the API never shows them 'running' after a restart), then dispatch."""
        if self._thread is not None:
            return
        self.connect()
        try:
            self._recover()
        except Exception:
            self.log.exception("start-up recovery failed; the dispatcher will retry")
        self._thread = threading.Thread(target=self.run_forever, name=self.thread_name, daemon=True)
        self._thread.start()

    def connect(self) -> None:
        """Reach what runs the jobs (a cluster) before the first tick; nothing to do by default."""

    def disconnect(self) -> None:
        """Undo ``connect`` once the dispatcher has stopped; nothing to do by default."""

    def notify(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 20.0) -> None:
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.disconnect()

    def request_stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def run_forever(self) -> None:
        """The dispatcher loop (a thread under ``serve``, the main thread under ``certiprune worker``)."""
        self.connect()
        self.log.info("%s %s started%s", self.name, self.worker_id, self._started_note())
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
                        self._expire_finished()
                        last_sweep = now
                    self._claim_into_free_capacity()
                except Exception:  # the dispatcher must survive a database (or cluster) hiccup
                    self.log.exception("dispatcher tick failed; retrying")
                self._wake.wait(self.poll_interval_s)
                self._wake.clear()
        finally:
            self._shutdown_runs()
            self.log.info("%s %s stopped", self.name, self.worker_id)

    # -- what differs between executors -------------------------------------------------

    def _started_note(self) -> str:
        """Appended to the 'started' log line."""
        return ""

    @abstractmethod
    def _capacity(self) -> int:
        """How many jobs may run at once."""

    @abstractmethod
    def _start_run(self, claim: Claim) -> RunT | None:
        """Start running ``claim``; None when the claim was settled instead (e.g. failed: cannot run here).
        Raising fails the start: the job is given back (``worker_start_failed``)."""

    def _run_started(self, run: RunT) -> None:
        """``run`` was started and is now tracked."""

    @abstractmethod
    def _reap(self) -> list[RunT]:
        """The tracked runs whose worker is over (what the run's outcome needs, recorded on the run)."""

    def _release(self, run: RunT) -> None:
        """``run`` is over and recorded: give back what it held."""

    def _terminate(self, run: RunT) -> bool:
        """Ask ``run``'s worker to stop (SIGTERM); False where the executor has no such step (then it kills)."""
        return False

    @abstractmethod
    def _kill(self, run: RunT) -> None:
        """Stop ``run``'s worker now, whatever it is doing."""

    @abstractmethod
    def _stop_for_shutdown(self, runs: list[RunT]) -> None:
        """Orderly stop: stop every worker of ``runs`` and wait (a bounded time) for them to be over."""

    def _before_recording(self, run: RunT, job: Job) -> None:
        """``run`` is over without recording an outcome: tidy up before the job can run again."""

    def _failure_without_retry(self, run: RunT, job: Job) -> tuple[str, str] | None:
        """(code, message) when the way ``run``'s worker died will recur on a retry; None: retry it."""
        return None

    @abstractmethod
    def _describe_death(self, run: RunT) -> str:
        """A sentence for a job whose worker ended without recording an outcome."""

    # -- steps --------------------------------------------------------------------------

    def _recover(self) -> None:
        changed = recover_orphans(
            self.store,
            max_attempts=self.settings.max_attempts,
            stale_before=stale_cutoff(self.settings.heartbeat_timeout_s),
            is_gone=lambda w: w != self.worker_id and worker_is_gone_locally(w),
        )
        for job_id, status in changed.items():
            self.log.warning("job %s was left running by an executor that is gone; now %s", job_id, status)

    def _expire_finished(self) -> None:
        """Retention (``job_retention_s``): delete jobs that finished long enough ago, row first, then files.
        Several dispatchers may sweep at once: the store's conditional delete lets one of them win."""
        if self.settings.job_retention_s is None:
            return
        for job_id in self.store.finished_before(cutoff=stale_cutoff(self.settings.job_retention_s)):
            if self.store.delete(job_id=job_id)[0] != "deleted":
                continue
            if self._storage is None:
                self._storage = Storage.from_settings(self.settings)
            self._storage.remove_tree(job_dir(job_id))
            self.log.info("job %s deleted: it finished more than %.0f s ago (CERTIPRUNE_JOB_RETENTION_S)",
                          job_id, self.settings.job_retention_s)

    def _claim_into_free_capacity(self) -> None:
        while len(self._runs) < self._capacity() and not self._stop.is_set():
            claim = self.store.claim_next(worker_id=self.worker_id)
            if claim is None:
                return
            try:
                run = self._start_run(claim)
            except Exception as exc:
                self.log.exception("could not start %s", claim.job_id)
                record_outcome(self.store, claim, Outcome(LOST, code="worker_start_failed",
                                                          message=f"{self.start_failed}: {exc}."),
                               max_attempts=self.settings.max_attempts)
                return
            if run is not None:
                self._runs[claim.job_id] = run
                self._run_started(run)

    def _reap_and_police(self) -> None:
        for run in self._reap():
            self._finish_run(run)
            del self._runs[run.claim.job_id]
            self._release(run)
        now = time.monotonic()
        for run in self._runs.values():
            if run.reason is None and now - run.started > self.settings.job_timeout_s:
                run.reason, run.stop_seen_at = "timeout", now
                self.log.warning("job %s exceeded the %.0f s limit; killing it", run.claim.job_id,
                                 self.settings.job_timeout_s)
                self._kill_once(run)
        live = [r for r in self._runs.values() if r.reason is None]
        if live:
            wanted = self.store.cancel_requested_runs(run_ids=[r.claim.run_id for r in live])
            for run in live:
                if run.claim.run_id in wanted:
                    run.reason, run.stop_seen_at = "cancel", now
        for run in self._runs.values():
            if run.reason == "cancel":
                self._escalate(run, now, grace=self.settings.cancel_grace_s)

    def _escalate(self, run: RunT, now: float, *, grace: float) -> None:
        """The worker polls for the cancel itself; if it does not stop in time, terminate it, then kill it."""
        assert run.stop_seen_at is not None
        if run.kill_sent or now - run.stop_seen_at < grace:
            return
        if run.term_sent_at is None and self._terminate(run):
            self.log.info("job %s did not stop within %.1f s of its cancel; terminating", run.claim.job_id, grace)
            run.term_sent_at = now
        elif run.term_sent_at is None or now - run.term_sent_at >= KILL_AFTER_TERM_S:
            if run.term_sent_at is None:
                self.log.info("job %s did not stop within %.1f s of its cancel; killing", run.claim.job_id, grace)
            self._kill_once(run)

    def _kill_once(self, run: RunT) -> None:
        if not run.kill_sent:
            run.kill_sent = True
            self._kill(run)

    def _finish_run(self, run: RunT) -> None:
        """The worker is over: if it did not record an outcome, record one for it."""
        job = self.store.get(job_id=run.claim.job_id)
        if job is None or job.status != RUNNING or job.run_id != run.claim.run_id:
            return  # the worker finished the job itself (or it was reassigned)
        self._before_recording(run, job)
        outcome = self._outcome_of(run, job)
        new = record_outcome(self.store, run.claim, outcome, max_attempts=self.settings.max_attempts)
        if outcome.status == INTERRUPTED:
            self.log.warning("job %s interrupted by shutdown; now %s", job.id, new)
        elif outcome.status == LOST:
            self.log.warning("job %s: %s Job is now %s", job.id, outcome.message, new)

    def _outcome_of(self, run: RunT, job: Job) -> Outcome:
        """How a run whose worker ended without recording an outcome ended, as this dispatcher saw it."""
        if run.reason == "timeout":
            return Outcome(FAILED, code="job_timeout",
                           message=f"The job exceeded the time limit of {self.settings.job_timeout_s:.0f} s and was "
                                   "stopped. Use fewer sparsity levels, a smaller calibration set, or ask the "
                                   "operator to raise CERTIPRUNE_JOB_TIMEOUT_S.")
        if run.reason == "cancel":
            return Outcome(CANCELLED)
        if (failure := self._failure_without_retry(run, job)) is not None:
            code, message = failure
            return Outcome(FAILED, code=code, message=message)
        if run.reason == "shutdown":
            return Outcome(INTERRUPTED, message="The service shut down while the job was running; it will run again.")
        return Outcome(LOST, code="worker_died", message=self._describe_death(run))

    def _shutdown_runs(self) -> None:
        """Orderly stop: stop the workers, then give their jobs back to the queue (no attempt counted)."""
        if not self._runs:
            return
        for run in self._runs.values():
            if run.reason is None:
                run.reason = "shutdown"
        self._stop_for_shutdown(list(self._runs.values()))
        for run in self._runs.values():
            try:
                self._finish_run(run)
            except Exception:
                self.log.exception("could not record the end of job %s", run.claim.job_id)
        self._runs.clear()


__all__ = ["HEARTBEAT_EVERY_S", "KILL_AFTER_TERM_S", "SWEEP_EVERY_S", "DispatchingExecutor", "Run",
           "describe_exit", "deterministic_failure"]
