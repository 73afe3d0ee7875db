"""Supervises one job inside a spawned worker process: verified inputs → sandboxed child → stored artifact.

This module is imported by the API process (the executor refers to ``run_job``), so it imports
neither torch nor ``calibration`` at module level. The spawned process is the job's *supervisor*
(trusted; it records the job's outcome through ``service.supervisor.record_outcome``, the one writer
of a run's end); the uploaded model runs only in the untrusted child that ``service.supervisor``
starts. Failures become a job error with a specific code: the calibration error's own (reported by
the child), or ``input_integrity_error``, ``job_out_of_memory``, ``job_timeout``,
``artifact_too_large``, ``artifact_write_failed``, ``storage_full``, ``sandbox_unavailable``,
``model_crashed``.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from . import isolation, sandbox
from .chunk_digests import ChunkDigests
from .failures import classify_failure, is_disk_error, root_cause_line
from .jsonable import jsonable
from .settings import Settings
from .storage import Storage, StoredFile, job_dir, sha256_file
from .supervisor import (CANCELLED, FAILED, SUCCEEDED, ChildRun, ChildSpec, Input, IntegrityError, Outcome,
                         record_outcome, remove_run_folder)

if TYPE_CHECKING:
    from .store import Job, JobStore

log = logging.getLogger("certiprune.worker")

PROGRESS_EVERY_S = 0.25  # at most 4 progress writes per second
STOP_POLL_EVERY_S = 0.5


def _die_with_parent(parent_pid: int | None) -> None:
    """Linux: get SIGKILL when the parent dies, so a killed server leaves no orphan still running a job."""
    if parent_pid is None or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except OSError:
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _select_gpu(gpu: int | None) -> None:
    if gpu is None:
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        devices = [d.strip() for d in visible.split(",") if d.strip()]
        os.environ["CUDA_VISIBLE_DEVICES"] = devices[gpu % len(devices)]
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)


def throttled_progress(store: JobStore, job_id: str,
                       run_id: str) -> Callable[[str, int, int, str | None], None]:
    """``report(stage, done, total, message)``: record progress, at most every PROGRESS_EVERY_S within a stage."""
    last: dict[str, Any] = {"t": 0.0, "stage": None}

    def report(stage: str, done: int, total: int, message: str | None) -> None:
        now = time.monotonic()
        if stage == last["stage"] and done < total and now - last["t"] < PROGRESS_EVERY_S:
            return
        last["t"], last["stage"] = now, stage
        try:
            store.update_progress(job_id=job_id, run_id=run_id, stage=stage, done=done, total=total,
                                  message=message or None)
        except Exception:  # progress is best effort; the job itself goes on
            log.warning("could not record progress of %s", job_id, exc_info=True)

    return report


def throttled_stop_check(store: JobStore, job_id: str, run_id: str) -> Callable[[], bool]:
    state = {"t": 0.0, "stop": False}

    def should_stop() -> bool:
        now = time.monotonic()
        if not state["stop"] and now - state["t"] >= STOP_POLL_EVERY_S:
            state["t"] = now
            try:
                state["stop"] = store.cancel_requested(job_id=job_id, run_id=run_id)
            except Exception:
                log.warning("could not poll the cancel flag of %s", job_id, exc_info=True)
        return bool(state["stop"])

    return should_stop


def _enter_worker(settings_dict: dict[str, Any], *, gpu: int | None, parent_pid: int | None,
                  spawned_at: float | None) -> tuple[Settings, dict[str, float]]:
    """A spawned worker's first steps: die with the executor, ignore Ctrl+C, take its GPU, read the settings."""
    entered = time.time()
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C in a terminal is for the server, which stops us
    _select_gpu(gpu)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [worker %(process)d] %(message)s")
    settings = Settings(**settings_dict)
    timings = {"worker_start_s": entered - spawned_at} \
        if spawned_at is not None and 0 <= entered - spawned_at < 3600 else {}
    return settings, timings


def run_job(job_id: str, run_id: str, settings_dict: dict[str, Any], *, gpu: int | None = None,
            parent_pid: int | None = None, spawned_at: float | None = None) -> None:
    """Entry point of a process spawned for one claimed job (the Ray task's). Records the job's outcome.

    The process runs exactly one job, so it is sandboxed (``service.sandbox``) before the model loads.
    ``spawned_at`` (the executor's ``time.time()`` when it started this process) times the worker's own start.
    The job store (SQLAlchemy, ≈ 0.15 s to import) is opened only once the child is started (:func:`_run`).
    """
    settings, timings = _enter_worker(settings_dict, gpu=gpu, parent_pid=parent_pid, spawned_at=spawned_at)
    _run(job_id, run_id, settings, None, sandbox_gpu=gpu, timings=timings)


def job_uses_cuda(job: Job, gpu: int | None) -> bool:
    """Whether the run may touch CUDA: it holds a GPU slot, or its config asks for CUDA."""
    return gpu is not None or job.config.get("device") == "cuda"


def _open_store(settings: Settings) -> JobStore:
    from .store import JobStore  # SQLAlchemy: imported while the child imports torch

    return JobStore.from_url(settings.resolved_database_url)


#: /proc/<pid>/comm of a local worker (at most 15 bytes): waiting for its job, and running it (for ``ps``).
IDLE_PROCESS_NAME = "certiprune-idle"
JOB_PROCESS_NAME = "certiprune-job"


def _name_process(name: str) -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except OSError:
        pass


def serve_one_job(claims: Connection, settings_dict: dict[str, Any], *, folder: str, gpu: int | None = None,
                  parent_pid: int | None = None, spawned_at: float | None = None) -> None:
    """Entry point of a local worker started *before* it has a job (``CERTIPRUNE_PRESTART_WORKERS``).

    It gets everything ready that needs no job — its sandboxed child started in the private, empty
    run folder ``folder`` (the child imports torch and the science and starts CUDA: seconds), the job
    store opened — then blocks until the executor sends it one claim ``(job_id, run_id, sent_at)`` over
    ``claims``; it runs that job exactly as :func:`run_job` would and exits. Still one fresh worker and one
    fresh child per job: the child has seen no other job's files (its /in is ``folder``'s own, empty until
    this job's verified inputs are staged there), and it gets its request only once they are. EOF on
    ``claims`` (the executor stopped, or gave this worker up) ends it without a job.
    """
    settings, timings = _enter_worker(settings_dict, gpu=gpu, parent_pid=parent_pid, spawned_at=spawned_at)
    _name_process(IDLE_PROCESS_NAME)
    t_entry = time.perf_counter()
    runner = _Runner(settings, sandbox_gpu=gpu, run_folder=Path(folder))
    store: JobStore | None = None
    try:
        timings["worker_setup_s"] = time.perf_counter() - t_entry
        store = _open_store(settings)
        ready = time.time()
        try:
            job_id, run_id, sent_at = claims.recv()
        except (EOFError, OSError):
            runner.close(grace_s=0)  # no job came: nothing to wait for
            return
        _name_process(JOB_PROCESS_NAME)
        now = time.time()
        timings["standby_s"] = max(0.0, now - ready)  # ready and idle before the job came: no cost to it
        timings["handoff_s"] = max(0.0, now - sent_at) if 0 <= now - sent_at < 3600 else 0.0
        runner.run(job_id, run_id, store, timings)
    finally:
        runner.close()
        if store is not None:
            store.close()


class _Runner:
    """One job's supervision, started before the job is known: the isolation decision and the started child."""

    def __init__(self, settings: Settings, *, sandbox_gpu: int | None, run_folder: Path) -> None:
        self.settings, self.sandbox_gpu, self.run_folder = settings, sandbox_gpu, run_folder
        self.isolate, self.why_not = sandbox_decision(settings)
        self.cuda = sandbox_gpu is not None  # the job's config may add CUDA (checked later; a child is restarted)
        self.child: ChildRun | None = None
        if self.isolate is not None:
            self.child = ChildRun(self.spec_for(self.cuda))
            self.child.start()  # imports in the sandbox while this process opens the store, fetches, stages, hashes

    def spec_for(self, cuda: bool) -> ChildSpec:
        settings = self.settings
        assert self.isolate is not None
        return ChildSpec(inputs=[], config={}, limits=sandbox.limits_from_settings(settings, cuda=cuda),
                         isolate=self.isolate, work=self.run_folder, log_path=None,
                         max_log_bytes=settings.max_log_bytes, tmp_bytes=settings.sandbox_tmp_bytes,
                         cuda_visible=os.environ.get("CUDA_VISIBLE_DEVICES") if self.sandbox_gpu is not None else None)

    def run(self, job_id: str, run_id: str, store: JobStore, timings: dict[str, float]) -> None:
        if self.child is None:
            _fail(store, job_id, run_id, "sandbox_unavailable",
                  f"The server requires the OS sandbox for every job but it cannot start here: {self.why_not}. The "
                  "operator must fix this; the model was not run.", only_if_held=True)
            return
        storage = Storage(self.settings.data_dir)
        _supervise(job_id, run_id, self.settings, store, storage, storage.work_dir(job_id), self.child,
                   self.spec_for, self.cuda, self.sandbox_gpu, timings)

    def close(self, grace_s: float | None = None) -> None:
        if self.child is not None:
            if grace_s is not None:
                self.child.abandon(grace_s=grace_s)
            self.child.close()
        remove_run_folder(self.run_folder)


def _run(job_id: str, run_id: str, settings: Settings, store: JobStore | None, *, sandbox_gpu: int | None = None,
         timings: dict[str, float] | None = None) -> None:
    """Supervise one claimed job: untrusted child started → verified inputs → request → stored artifact.

    This process is trusted: it holds the store and records how the run ended (``record_outcome``). The
    uploaded model runs only in the child, with the rlimits of ``service.sandbox`` and, unless the sandbox
    is off, inside bubblewrap (``service.isolation``). The child is started first of all — before the
    store is opened (``store`` None: opened here from ``settings``, and closed), the job read, the inputs
    fetched, staged and hashed — so its imports overlap with all of that; it gets its request only once
    every input is verified (``service.supervisor.ChildRun``). A run that turns out not to hold the job
    ends its child without a request. ``timings`` (this process's own, trusted) go into the result's
    ``timings`` beside the child's.
    """
    t_entry = time.perf_counter()
    timings = dict(timings or {})
    own_store = store is None
    runner = _Runner(settings, sandbox_gpu=sandbox_gpu,
                     run_folder=Storage(settings.data_dir).work_dir(job_id) / f".run-{run_id}")
    try:
        timings["worker_setup_s"] = time.perf_counter() - t_entry
        store = store or _open_store(settings)
        runner.run(job_id, run_id, store, timings)
    finally:
        runner.close()
        if own_store and store is not None:
            store.close()


def _fail(store: JobStore, job_id: str, run_id: str, code: str, message: str, *, only_if_held: bool = False) -> None:
    from .store import Claim

    if only_if_held:
        job = store.get(job_id=job_id)
        if job is None or job.run_id != run_id:
            return
    record_outcome(store, Claim(job_id=job_id, run_id=run_id), Outcome(FAILED, code=code, message=message))


def _supervise(job_id: str, run_id: str, settings: Settings, store: JobStore, storage: Storage, work: Path,
               child: ChildRun, spec_for: Callable[[bool], ChildSpec], cuda: bool, sandbox_gpu: int | None,
               timings: dict[str, float]) -> None:
    """The run once its child is started: check the claim, stage, send the request, judge, store the artifact."""
    from .store import Claim

    job = store.get(job_id=job_id)
    if job is None or job.run_id != run_id:
        log.warning("job %s is no longer held by run %s; nothing to do", job_id, run_id)
        child.abandon(grace_s=0)  # it was told of nothing
        return
    child.keep_log(work / "child.log")  # the job's log from now on (jobs/<id>/child.log)
    discard_partial_files(work, keep=child.spec.work.name)  # half-written by an earlier run that was killed
    if job_uses_cuda(job, sandbox_gpu) != cuda:  # the config asks for CUDA without a GPU slot: CUDA's limits
        child.restart(spec_for(True))
        child.keep_log(work / "child.log")
    limits = child.spec.limits
    claim = Claim(job_id=job_id, run_id=run_id)

    def fail(code: str, message: str) -> None:
        record_outcome(store, claim, Outcome(FAILED, code=code, message=message))

    store.update_progress(job_id=job_id, run_id=run_id, stage="loading", done=0, total=0,
                          message="Checking the inputs and starting the job's sandbox." if child.spec.isolate else
                          "Checking the inputs and starting the job's process (no OS sandbox).")
    report = throttled_progress(store, job_id, run_id)
    try:
        log.info("job %s: child %s, limits %s", job_id,
                 "sandboxed (bubblewrap)" if child.spec.isolate else "NOT sandboxed", asdict(limits))
        with storage.fetch_local(job.model_path) as model_path, \
                storage.fetch_local(job.data_path) as data_path, \
                storage.fetch_local(job.uncertainty_path) as uncertainty_path:
            refusal = check_room_for_artifact(model_path, work, limits)
            if refusal is not None:  # fail now, not after hours of work (the child gets no request)
                fail(*refusal)
                log.info("job %s refused: %s", job_id, refusal[1])
                return
            chunks = {k: ChunkDigests.from_json(v) for k, v in (job.input_chunks or {}).items()}
            inputs = [Input(Path(model_path), "model.pt", job.model_sha256, chunks.get("model")),
                      Input(Path(data_path), "data" + _data_suffix(job.data_path), job.data_sha256,
                            chunks.get("data"))]
            if uncertainty_path is not None:
                # a job admitted before the store recorded its sha256 (revision 0003): hash the copy the child gets
                inputs.append(Input(Path(uncertainty_path), "uncertainty.safetensors",
                                    job.uncertainty_sha256 or sha256_file(uncertainty_path), chunks.get("uncertainty")))
            child.stage(inputs)  # IntegrityError: the child never gets a request
            outcome = child.supervise(on_progress=report, should_stop=throttled_stop_check(store, job_id, run_id),
                                      config=dict(job.config))
        timings.update(child.timings)
        if outcome.status == CANCELLED:
            record_outcome(store, claim, Outcome(CANCELLED))
            log.info("job %s cancelled", job_id)
            return
        if outcome.status != SUCCEEDED:
            assert outcome.code is not None
            fail(outcome.code, outcome.message or "The job failed.")
            log.info("job %s failed: %s", job_id, outcome.code)
            return
        if not store.is_current_run(job_id=job_id, run_id=run_id):
            log.warning("job %s was taken from run %s while it ran; discarding its artifact", job_id, run_id)
            return
        assert outcome.artifact is not None and outcome.result is not None and outcome.artifact_sha256 is not None
        t = time.perf_counter()
        refusal = check_artifact(outcome.artifact)
        timings["artifact_check_s"] = time.perf_counter() - t
        if refusal is not None:
            fail(*refusal)
            return
        t = time.perf_counter()
        try:
            stored = store_artifact(storage, job_id, outcome)
        except OSError as exc:
            fail("artifact_write_failed", f"Writing the pruned model failed: {exc.strerror or exc}. The server's disk "
                                          "may be full. No artifact was stored; submit the job again once the "
                                          "operator has made room.")
            return
        timings["artifact_store_s"] = time.perf_counter() - t
        result = jsonable(outcome.result)
        result["artifact_sha256"] = stored.sha256  # the supervisor's hash, never the child's word
        result["timings"] = {**(result.get("timings") or {}),
                             **{k: round(v, 4) for k, v in timings.items() if k in SUPERVISOR_TIMINGS}}
        json.dumps(result, allow_nan=False)  # fail here, not when a client asks for the job
        record_outcome(store, claim, Outcome(SUCCEEDED, result=result, artifact_sha256=stored.sha256))
        log.info("job %s succeeded", job_id)
    except IntegrityError as exc:
        child.close()  # the child exits on EOF, told of nothing; then the job fails
        fail("input_integrity_error", str(exc))
        log.error("job %s: %s", job_id, exc)
    except Exception as exc:
        child.close()
        if is_disk_error(exc):
            fail("storage_full", f"The server could not prepare the job's files: {root_cause_line(exc)}. The server's "
                                 "disk may be full; submit the job again once the operator has made room.")
            return
        log.exception("job %s: the supervisor failed", job_id)
        fail("internal_error", f"The job failed unexpectedly ({type(exc).__name__}). This is a bug in certiprune; "
                               "the server log has the details.")


#: The supervisor's own timings added to ``result.timings`` (the rest are the child's and the engine's):
#: worker process start, its setup until the child is spawned, spawning it, staging + hashing the inputs
#: (overlapped with the child's imports), the child's exit after the artifact arrived, checking and storing it;
#: for a pre-started worker (``serve_one_job``) also how long it waited ready for its job (``standby_s``: no cost
#: to the job) and the hand-over of the claim (``handoff_s``).
SUPERVISOR_TIMINGS = ("worker_start_s", "worker_setup_s", "child_spawn_s", "staging_s", "child_exit_s",
                      "artifact_check_s", "artifact_store_s", "standby_s", "handoff_s")


def store_artifact(storage: Storage, job_id: str, outcome: Outcome) -> StoredFile:
    """Put the received artifact in place under the hash the supervisor computed while receiving it.

    The file lies in the run's private folder, written only by this process (``_CappedCopy``, which hashed
    exactly the bytes it wrote; the child cannot reach it), so it is not read a second time to hash it.
    """
    assert outcome.artifact is not None and outcome.artifact_sha256 is not None
    return storage.put_file(outcome.artifact, f"{job_dir(job_id)}/artifact.pt", sha256=outcome.artifact_sha256)


def _data_suffix(relpath: str) -> str:
    suffix = Path(relpath).suffix.lower()
    return suffix if suffix in (".npz", ".safetensors") else ".npz"


def check_artifact(path: Path) -> tuple[str, str] | None:
    """The child's artifact must at least be a TorchScript archive that passes the admission check."""
    from calibration.errors import CalibrationError  # lazy: calibration imports torch
    from calibration.archive import check_archive

    try:
        check_archive(path)
    except CalibrationError as exc:
        return ("artifact_invalid", f"The job produced an artifact that is not a valid TorchScript archive ({exc}); "
                                    "nothing was stored.")
    return None


def sandbox_decision(settings: Settings) -> tuple[bool | None, str | None]:
    """(isolate?, why not): True sandboxed, False not (allowed), None: required but unavailable."""
    if settings.sandbox == "off":
        return False, None
    why_not = isolation.probe()
    if why_not is None:
        return True, None
    if settings.sandbox == "on" or settings.sandbox_required:
        return None, why_not
    return False, why_not


# -- files ----------------------------------------------------------------------------------------

PARTIAL_PATTERNS = (".artifact-*", ".tmp-*", ".run-*")


def discard_partial_files(work: Path, *, keep: str | None = None) -> list[str]:
    """Remove temporary artifact files a killed run left in its job folder (all but ``keep``); returns their names."""
    removed = []
    for pattern in PARTIAL_PATTERNS:
        for path in work.glob(pattern):
            if path.name == keep:
                continue
            if path.is_dir() and not path.is_symlink():
                remove_run_folder(path)
            else:
                path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def discard_partial_job_files(settings: Settings, job_id: str) -> list[str]:
    """After a run died: remove what it half-wrote in the job's folder (local storage; remote runs use a temp dir)."""
    storage = Storage(settings.data_dir)
    if not storage.is_local:
        return []
    folder = storage.local_path(job_dir(job_id))
    return discard_partial_files(folder) if folder.is_dir() else []


def artifact_size_estimate(model_path: str | os.PathLike) -> int:
    """Bytes of tensor data in a TorchScript archive: the pruned artifact holds the same tensors again."""
    try:
        with zipfile.ZipFile(model_path) as zf:
            return sum(i.file_size for i in zf.infolist() if "/data/" in i.filename or i.filename.startswith("data/"))
    except (OSError, zipfile.BadZipFile):
        return 0


def check_room_for_artifact(model_path: str | os.PathLike, work: Path,
                            limits: sandbox.Limits | None) -> tuple[str, str] | None:
    """(code, message) when the artifact cannot be written: over the file-size limit, or more than the free disk."""
    need = artifact_size_estimate(model_path)
    if limits is not None and limits.file_bytes is not None and need > limits.file_bytes:
        return ("artifact_too_large",
                f"The pruned model would hold about {need:,} bytes of weights, more than a worker may write "
                f"({limits.file_bytes:,} bytes, CERTIPRUNE_SANDBOX_MAX_FILE_BYTES). Ask the operator to raise the "
                "limit.")
    try:
        free = shutil.disk_usage(work).free
    except OSError:
        return None
    if need > free:
        return ("storage_full",
                f"The pruned model needs about {need:,} bytes but the server's disk has {free:,} bytes free. "
                "Submit the job again once the operator has made room.")
    return None


__all__ = ["SUPERVISOR_TIMINGS", "artifact_size_estimate", "check_room_for_artifact", "classify_failure",
           "discard_partial_files", "discard_partial_job_files", "job_uses_cuda", "jsonable", "root_cause_line",
           "run_job", "sandbox_decision", "serve_one_job", "store_artifact"]
