"""RayExecutor: a dispatcher thread that claims queued jobs and runs each as a Ray task on a Ray cluster.

The API process only claims and dispatches. The uploaded model is loaded in the Ray worker
process that runs the task, by ``service.worker.run_job`` — the same code the local executor
runs in a spawned process. A job that wants CUDA asks Ray for ``num_gpus=1``, so Ray places it on
a free GPU and sets ``CUDA_VISIBLE_DEVICES`` for it.

Retries belong to the job store, not to Ray (``max_retries=0``): when a worker process or a node
dies, the job goes back to the queue with one more attempt counted (failed after
``max_attempts``) and a fresh claim, with a new ``run_id``, runs it again. The store's run_id
compare-and-set keeps a stale run from writing, and the run itself stops once it is no longer
the job's current run, so a job never runs twice at once. ``max_calls=1``: every job gets a
fresh worker process, because uploaded TorchScript is untrusted code that must not share an
interpreter with the next tenant's job.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray import exceptions as ray_errors

from ..settings import Settings
from ..storage import S3_ENDPOINT_ENV
from ..store import (
    CANCELLED,
    FAILED,
    RUNNING,
    Claim,
    JobStore,
    make_worker_id,
    stale_cutoff,
    utcnow,
    worker_is_gone_locally,
)

log = logging.getLogger("certiprune.executor.ray")

HEARTBEAT_EVERY_S = 2.0
SWEEP_EVERY_S = 5.0
RESOURCES_EVERY_S = 5.0
SHUTDOWN_WAIT_S = 5.0


def run_on_ray_worker(job_id: str, run_id: str, settings_dict: dict[str, Any]) -> dict[str, Any]:
    """The Ray task: record where it runs, then run the job exactly as a local worker process would."""
    from ..worker import run_job

    settings = Settings(**settings_dict)
    if settings.s3_endpoint_url:  # run_job's Storage reads the endpoint from the environment
        os.environ[S3_ENDPOINT_ENV] = settings.s3_endpoint_url
    context = ray.get_runtime_context()
    placement = {
        "executor": "ray",
        "node_ip": ray.util.get_node_ip_address(),
        "node_id": context.get_node_id(),
        "pid": os.getpid(),
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        "started_at": utcnow().isoformat(),
    }
    store = JobStore.from_url(settings.resolved_database_url)
    try:
        current = store.record_placement(job_id=job_id, run_id=run_id, placement=placement)
    finally:
        store.close()
    if current:  # else the claim moved on (cancelled, or requeued) while the task waited for a worker
        # gpu=0: the first (only) device Ray made visible, so the worker knows the job holds a GPU.
        run_job(job_id, run_id, settings_dict, gpu=0 if placement["gpu_ids"] else None)
    return placement


def gpus_for(config: dict[str, Any], cluster_gpus: float) -> int | None:
    """GPUs a job asks Ray for: 1 for 'cuda', 1 for 'auto' on a cluster with GPUs, else 0; None: cannot run."""
    device = config.get("device", "auto")
    if device == "cpu":
        return 0
    if cluster_gpus >= 1:
        return 1
    return None if device == "cuda" else 0


def describe_failure(error: BaseException | None) -> str:
    if error is None:
        return "The Ray task ended without recording an outcome."
    if isinstance(error, ray_errors.OutOfMemoryError):
        return "Ray's memory monitor killed the worker running the job (the node ran out of memory)."
    if isinstance(error, ray_errors.WorkerCrashedError):
        return "The Ray worker process running the job died (killed, out of memory, or crashed)."
    if isinstance(error, ray_errors.NodeDiedError):
        return "The Ray node running the job died."
    if isinstance(error, ray_errors.TaskCancelledError):
        return "The Ray task running the job was cancelled."
    text = str(error).strip().splitlines()
    return f"The Ray task failed ({type(error).__name__}: {text[0][:300] if text else ''})."


@dataclass
class _Run:
    claim: Claim
    ref: Any  # ray.ObjectRef
    gpus: int
    submitted: float = field(default_factory=time.monotonic)
    reason: str | None = None  # why the dispatcher is stopping it: cancel | timeout | shutdown
    stop_seen_at: float | None = None
    force_cancelled: bool = False


class RayExecutor:
    """Runs queued jobs from ``store`` as Ray tasks: at most one per GPU of the cluster (per CPU without GPUs)."""

    def __init__(self, settings: Settings, store: JobStore, *, poll_interval_s: float = 0.25) -> None:
        self.settings = settings
        self.store = store
        self.poll_interval_s = poll_interval_s
        self.worker_id = make_worker_id()
        # Ray workers never need the tenants' API keys: keep them off every node of the cluster.
        self._settings_dict = {**settings.model_dump(mode="json"), "api_keys": [], "host": "127.0.0.1"}
        self._task = ray.remote(max_retries=0, max_calls=1)(run_on_ray_worker)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._runs: dict[str, _Run] = {}  # by job id
        self._started_ray = False
        self._resources: dict[str, float] = {}
        self._resources_at = float("-inf")

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Connect to Ray (or start a local instance), recover orphaned jobs, then dispatch in a thread."""
        if self._thread is not None:
            return
        self.connect()
        try:
            self._recover()
        except Exception:
            log.exception("start-up recovery failed; the dispatcher will retry")
        self._thread = threading.Thread(target=self.run_forever, name="certiprune-ray-dispatcher", daemon=True)
        self._thread.start()

    def connect(self) -> None:
        if ray.is_initialized():
            return
        address = self.settings.ray_address
        # Workers import service.worker: installed on every node, or (one machine) found through the
        # driver's sys.path, which Ray hands to its workers. Not code_search_path: with it, Ray keeps
        # workers alive past max_calls=1.
        kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "namespace": "certiprune"}
        if not address:
            kwargs.update(num_cpus=self.settings.ray_num_cpus, include_dashboard=False)
            self._started_ray = True
        # ray.init replaces SIGTERM's handler in the main thread; the server's must stay (graceful stop).
        main = threading.current_thread() is threading.main_thread()
        handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)} if main else {}
        try:
            ray.init(address=address or None, **kwargs)
        finally:
            for sig, handler in handlers.items():
                if handler is not None:
                    signal.signal(sig, handler)
        log.info("connected to Ray (%s): %s", address or "local instance", self._cluster_resources(refresh=True))
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        shared = "://" in self.settings.data_dir and not self.settings.resolved_database_url.startswith("sqlite")
        if len({n.get("NodeManagerAddress") for n in nodes}) > 1 and not shared:
            log.warning("the Ray cluster spans %d machines but the data dir (%s) or the job store (%s) is local to "
                        "this one: jobs on other machines cannot read them. Use s3:// storage and PostgreSQL.",
                        len(nodes), self.settings.data_dir, self.settings.resolved_database_url.split("://")[0])

    def notify(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 20.0) -> None:
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._started_ray and ray.is_initialized():
            ray.shutdown()

    def request_stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def run_forever(self) -> None:
        """The dispatcher loop (a thread under ``serve``, the main thread under ``certiprune worker``)."""
        self.connect()
        log.info("ray executor %s started", self.worker_id)
        last_heartbeat = time.monotonic()
        last_sweep = 0.0
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
                    self._claim_and_submit()
                except Exception:  # the dispatcher must survive a database or cluster hiccup
                    log.exception("dispatcher tick failed; retrying")
                self._wake.wait(self.poll_interval_s)
                self._wake.clear()
        finally:
            self._shutdown_runs()
            log.info("ray executor %s stopped", self.worker_id)

    # -- steps --------------------------------------------------------------------------

    def _cluster_resources(self, refresh: bool = False) -> dict[str, float]:
        now = time.monotonic()
        if refresh or now - self._resources_at >= RESOURCES_EVERY_S:
            self._resources = dict(ray.cluster_resources())
            self._resources_at = now
        return self._resources

    def _capacity(self) -> int:
        if self.settings.max_concurrent_jobs is not None:
            return self.settings.max_concurrent_jobs
        resources = self._cluster_resources()
        return max(1, int(resources.get("GPU", 0)) or int(resources.get("CPU", 0)))

    def _recover(self) -> None:
        changed = self.store.requeue_interrupted(
            max_attempts=self.settings.max_attempts,
            stale_before=stale_cutoff(self.settings.heartbeat_timeout_s),
            is_gone=lambda w: w != self.worker_id and worker_is_gone_locally(w),
        )
        for job_id, status in changed.items():
            log.warning("job %s was left running by a dispatcher that is gone; now %s", job_id, status)

    def _claim_and_submit(self) -> None:
        while len(self._runs) < self._capacity() and not self._stop.is_set():
            claim = self.store.claim_next(worker_id=self.worker_id)
            if claim is None:
                return
            job = self.store.get(job_id=claim.job_id)
            gpus = gpus_for(job.config if job else {}, self._cluster_resources().get("GPU", 0))
            if gpus is None:
                self.store.finish(job_id=claim.job_id, run_id=claim.run_id, status=FAILED,
                                  error_code="cuda_unavailable",
                                  error_message="The config asks for device 'cuda' but the Ray cluster has no GPU. "
                                                "Use device 'auto' or 'cpu', or add a GPU worker to the cluster.")
                continue
            try:
                ref = self._task.options(num_gpus=gpus, name=f"certiprune:{claim.job_id}").remote(
                    claim.job_id, claim.run_id, self._settings_dict)
            except Exception as exc:
                log.exception("could not submit %s to Ray", claim.job_id)
                self.store.interrupt(job_id=claim.job_id, run_id=claim.run_id, max_attempts=self.settings.max_attempts,
                                     code="worker_start_failed", message=f"Could not submit the job to Ray: {exc}.")
                return
            self.store.update_progress(job_id=claim.job_id, run_id=claim.run_id, stage="starting", done=0, total=0,
                                       message="Waiting for a Ray worker" + (" with a GPU." if gpus else "."))
            self._runs[claim.job_id] = _Run(claim=claim, ref=ref, gpus=gpus)
            log.info("job %s submitted to Ray (%d GPU)", claim.job_id, gpus)

    def _reap_and_police(self) -> None:
        if not self._runs:
            return
        by_ref = {run.ref: run for run in self._runs.values()}
        ready, _ = ray.wait(list(by_ref), num_returns=len(by_ref), timeout=0, fetch_local=False)
        for ref in ready:
            run = by_ref[ref]
            error: BaseException | None = None
            try:
                ray.get(ref, timeout=0)
            except Exception as exc:
                error = exc
            self._finish_run(run, error)
            del self._runs[run.claim.job_id]
        now = time.monotonic()
        for run in self._runs.values():
            if run.reason is None and now - run.submitted > self.settings.job_timeout_s:
                run.reason, run.stop_seen_at = "timeout", now
                log.warning("job %s exceeded the %.0f s limit; cancelling its Ray task", run.claim.job_id,
                            self.settings.job_timeout_s)
                self._force_cancel(run)
        live = [r for r in self._runs.values() if r.reason is None]
        if live:
            wanted = self.store.cancel_requested_runs(run_ids=[r.claim.run_id for r in live])
            for run in live:
                if run.claim.run_id in wanted:
                    run.reason, run.stop_seen_at = "cancel", now
        for run in self._runs.values():
            # The worker polls for the cancel itself; a task that does not stop in time is killed.
            if run.reason == "cancel" and now - (run.stop_seen_at or now) >= self.settings.cancel_grace_s:
                self._force_cancel(run)

    def _force_cancel(self, run: _Run) -> None:
        if run.force_cancelled:
            return
        run.force_cancelled = True
        try:
            ray.cancel(run.ref, force=True)
        except Exception:
            log.exception("could not cancel the Ray task of %s", run.claim.job_id)

    def _finish_run(self, run: _Run, error: BaseException | None) -> None:
        """The task is over: if it did not record an outcome, record one for it."""
        job = self.store.get(job_id=run.claim.job_id)
        if job is None or job.status != RUNNING or job.run_id != run.claim.run_id:
            return  # the worker finished the job itself (or it was reassigned)
        if run.reason == "timeout":
            self.store.finish(job_id=job.id, run_id=run.claim.run_id, status=FAILED, error_code="job_timeout",
                              error_message=f"The job exceeded the time limit of {self.settings.job_timeout_s:.0f} s "
                                            "and was stopped. Use fewer sparsity levels, a smaller calibration set, "
                                            "or ask the operator to raise CERTIPRUNE_JOB_TIMEOUT_S.")
        elif run.reason == "cancel":
            self.store.finish(job_id=job.id, run_id=run.claim.run_id, status=CANCELLED)
        elif run.reason == "shutdown":
            new = self.store.requeue_run(job_id=job.id, run_id=run.claim.run_id,
                                         message="The service shut down while the job was running; it will run again.")
            log.warning("job %s interrupted by shutdown; now %s", job.id, new)
        else:
            new = self.store.interrupt(job_id=job.id, run_id=run.claim.run_id, max_attempts=self.settings.max_attempts,
                                       code="worker_died", message=describe_failure(error))
            log.warning("job %s: %s Job is now %s", job.id, describe_failure(error), new)

    def _shutdown_runs(self) -> None:
        """Orderly stop: cancel the tasks, then give their jobs back to the queue (no attempt counted)."""
        if not self._runs:
            return
        for run in self._runs.values():
            run.reason = run.reason or "shutdown"
            self._force_cancel(run)
        try:
            ray.wait([r.ref for r in self._runs.values()], num_returns=len(self._runs), timeout=SHUTDOWN_WAIT_S)
        except Exception:
            log.exception("waiting for cancelled Ray tasks failed")
        for run in self._runs.values():
            try:
                self._finish_run(run, None)
            except Exception:
                log.exception("could not record the end of job %s", run.claim.job_id)
        self._runs.clear()


__all__ = ["RayExecutor", "describe_failure", "gpus_for", "run_on_ray_worker"]
