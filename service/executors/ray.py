"""RayExecutor: a dispatcher thread that claims queued jobs and runs each as a Ray task on a Ray cluster.

The API process only claims and dispatches. The Ray task spawns the job's supervisor
(``service.worker.run_job``), which runs the uploaded model in its sandboxed child — the same code,
sandbox and processes as the local executor's; every end of a run is written by
``service.supervisor.record_outcome``. A job that wants CUDA asks Ray for ``num_gpus=1``, so Ray places it on
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
from dataclasses import dataclass
from typing import Any

import ray
from ray import exceptions as ray_errors

from ..settings import Settings
from ..storage import S3_ENDPOINT_ENV
from ..store import FAILED, RUNNING, Claim, JobStore, utcnow
from ..supervisor import Outcome, record_outcome
from .base import DispatchingExecutor, Run, describe_exit, deterministic_failure

log = logging.getLogger("certiprune.executor.ray")

RESOURCES_EVERY_S = 5.0
SHUTDOWN_WAIT_S = 5.0


class JobProcessDied(RuntimeError):
    """The job's process died in a way a retry may cure (killed, crashed): the dispatcher retries it."""


def run_on_ray_worker(job_id: str, run_id: str, settings_dict: dict[str, Any]) -> dict[str, Any]:
    """The Ray task: record where it runs, then run the job in a spawned, sandboxed child process.

    The Ray worker only supervises. Ray keeps no exit status of a worker it lost, so the job runs one
    process further down, where this task can read how it ended: the sandbox's CPU-time limit
    (SIGXCPU) or an abort while saving fails the job at once, like the local executor does, instead
    of being retried as a crash. The child dies with this worker (``parent_pid``), so cancelling the
    task or killing its worker stops the job too.
    """
    import multiprocessing

    from ..worker import discard_partial_job_files, run_job

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
        if not store.record_placement(job_id=job_id, run_id=run_id, placement=placement):
            return placement  # the claim moved on (cancelled, or requeued) while the task waited for a worker
        # gpu=0: the first (only) device Ray made visible, so the worker knows the job holds a GPU.
        child = multiprocessing.get_context("spawn").Process(
            target=run_job, args=(job_id, run_id, settings_dict),
            kwargs={"gpu": 0 if placement["gpu_ids"] else None, "parent_pid": os.getpid(), "spawned_at": time.time()},
            name=f"certiprune-{job_id}", daemon=False)
        child.start()
        child.join()
        if child.exitcode == 0:
            return placement
        job = store.get(job_id=job_id)
        if job is None or job.status != RUNNING or job.run_id != run_id:
            return placement  # it recorded its outcome before dying, or the job moved on
        discard_partial_job_files(settings, job_id)  # nobody else writes in its folder while this run holds it
        failure = deterministic_failure(child.exitcode, job.progress_stage)
        if failure is None:
            raise JobProcessDied(f"The job's process {describe_exit(child.exitcode)}.")
        code, message = failure
        record_outcome(store, Claim(job_id=job_id, run_id=run_id), Outcome(FAILED, code=code, message=message))
        return placement
    finally:
        store.close()


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
    cause = getattr(error, "cause", None)  # ray.get raises RayTaskError(cause) for an exception in the task
    if isinstance(cause, JobProcessDied):
        return str(cause)
    text = str(error).strip().splitlines()
    return f"The Ray task failed ({type(error).__name__}: {text[0][:300] if text else ''})."


@dataclass(kw_only=True)
class _Run(Run):
    ref: Any  # ray.ObjectRef
    gpus: int
    error: BaseException | None = None  # what ray.get raised once the task was over


class RayExecutor(DispatchingExecutor[_Run]):
    """Runs queued jobs from ``store`` as Ray tasks: at most one per GPU of the cluster (per CPU without GPUs).

    A Ray worker killed by a signal surfaces only as a bare ``WorkerCrashedError`` (Ray keeps no exit
    status or signal), so each task runs its job in a child process and reads the child's end itself
    (:func:`run_on_ray_worker`): deterministic deaths fail the job at once, others come back here as
    errors and are retried.
    """

    log = log
    name = "ray executor"
    thread_name = "certiprune-ray-dispatcher"
    start_failed = "Could not submit the job to Ray"

    def __init__(self, settings: Settings, store: JobStore, *, poll_interval_s: float = 0.25) -> None:
        # Ray workers never need the tenants' API keys: keep them off every node of the cluster. Without the
        # keys a worker could not tell that tenants share it, so the sandbox requirement travels explicitly.
        sandbox = "on" if settings.sandbox_required else settings.sandbox
        super().__init__(settings, store, poll_interval_s=poll_interval_s,
                         settings_dict={**settings.model_dump(mode="json"), "api_keys": [], "host": "127.0.0.1",
                                        "sandbox": sandbox})
        self._task = ray.remote(max_retries=0, max_calls=1)(run_on_ray_worker)
        self._started_ray = False
        self._resources: dict[str, float] = {}
        self._resources_at = float("-inf")

    # -- connection ---------------------------------------------------------------------

    def connect(self) -> None:
        """Connect to Ray (or start a local instance)."""
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

    def disconnect(self) -> None:
        if self._started_ray and ray.is_initialized():
            ray.shutdown()

    def _cluster_resources(self, refresh: bool = False) -> dict[str, float]:
        now = time.monotonic()
        if refresh or now - self._resources_at >= RESOURCES_EVERY_S:
            self._resources = dict(ray.cluster_resources())
            self._resources_at = now
        return self._resources

    # -- steps --------------------------------------------------------------------------

    def _capacity(self) -> int:
        if self.settings.max_concurrent_jobs is not None:
            return self.settings.max_concurrent_jobs
        resources = self._cluster_resources()
        return max(1, int(resources.get("GPU", 0)) or int(resources.get("CPU", 0)))

    def _start_run(self, claim: Claim) -> _Run | None:
        job = self.store.get(job_id=claim.job_id)
        gpus = gpus_for(job.config if job else {}, self._cluster_resources().get("GPU", 0))
        if gpus is None:
            record_outcome(self.store, claim, Outcome(
                FAILED, code="cuda_unavailable",
                message="The config asks for device 'cuda' but the Ray cluster has no GPU. Use device 'auto' or "
                        "'cpu', or add a GPU worker to the cluster."))
            return None
        ref = self._task.options(num_gpus=gpus, name=f"certiprune:{claim.job_id}").remote(
            claim.job_id, claim.run_id, self._settings_dict)
        return _Run(claim=claim, ref=ref, gpus=gpus)

    def _run_started(self, run: _Run) -> None:
        self.store.update_progress(job_id=run.claim.job_id, run_id=run.claim.run_id, stage="starting", done=0,
                                   total=0, message="Waiting for a Ray worker" + (" with a GPU." if run.gpus else "."))
        log.info("job %s submitted to Ray (%d GPU)", run.claim.job_id, run.gpus)

    def _reap(self) -> list[_Run]:
        if not self._runs:
            return []
        by_ref = {run.ref: run for run in self._runs.values()}
        ready, _ = ray.wait(list(by_ref), num_returns=len(by_ref), timeout=0, fetch_local=False)
        over = []
        for ref in ready:
            run = by_ref[ref]
            try:
                ray.get(ref, timeout=0)
            except Exception as exc:
                run.error = exc
            over.append(run)
        return over

    def _kill(self, run: _Run) -> None:
        try:
            ray.cancel(run.ref, force=True)
        except Exception:
            log.exception("could not cancel the Ray task of %s", run.claim.job_id)

    def _stop_for_shutdown(self, runs: list[_Run]) -> None:
        for run in runs:
            self._kill_once(run)
        try:
            ray.wait([r.ref for r in runs], num_returns=len(runs), timeout=SHUTDOWN_WAIT_S)
        except Exception:
            log.exception("waiting for cancelled Ray tasks failed")

    def _describe_death(self, run: _Run) -> str:
        return describe_failure(run.error)


__all__ = ["JobProcessDied", "RayExecutor", "describe_failure", "gpus_for", "run_on_ray_worker"]
