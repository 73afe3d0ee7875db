"""Runs one job inside a spawned worker process: read its files, ``calibration.certify``, store the artifact.

This module is imported by the API process (the executor refers to ``run_job``), so it imports
neither torch nor ``calibration`` at module level: the worker picks its GPU first, then applies
the sandbox's resource limits (``service.sandbox``), then loads the model. Failures become a job
error with a specific code: the calibration error's own, or ``job_out_of_memory``,
``artifact_too_large``, ``artifact_write_failed``, ``storage_full`` for exhausted resources.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import sandbox
from .settings import Settings
from .storage import Storage, job_dir
from .store import CANCELLED, FAILED, SUCCEEDED, Job, JobStore

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


def jsonable(value: Any) -> Any:
    """A JSON-safe copy: numpy scalars to Python, NaN/inf to None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if hasattr(value, "tolist") and callable(value.tolist):
        return jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def throttled_progress(store: JobStore, job_id: str, run_id: str) -> Callable[[Any], None]:
    last = {"t": 0.0, "stage": None}

    def report(p: Any) -> None:
        now = time.monotonic()
        if p.stage == last["stage"] and p.done < p.total and now - last["t"] < PROGRESS_EVERY_S:
            return
        last["t"], last["stage"] = now, p.stage
        try:
            store.update_progress(job_id=job_id, run_id=run_id, stage=p.stage, done=p.done, total=p.total,
                                  message=p.message or None)
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


def run_job(job_id: str, run_id: str, settings_dict: dict[str, Any], *, gpu: int | None = None,
            parent_pid: int | None = None) -> None:
    """Entry point of the spawned process. Records the job's outcome; exits 0 unless the store is unreachable.

    The process runs exactly one job, so it is sandboxed (``service.sandbox``) before the model loads.
    """
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C in a terminal is for the server, which stops us
    _select_gpu(gpu)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [worker %(process)d] %(message)s")
    settings = Settings(**settings_dict)
    store = JobStore.from_url(settings.resolved_database_url)
    try:
        _run(job_id, run_id, settings, store, sandbox_gpu=gpu, sandboxed=True)
    finally:
        store.close()


def job_uses_cuda(job: Job, gpu: int | None) -> bool:
    """Whether the run may touch CUDA: it holds a GPU slot, or its config asks for CUDA."""
    return gpu is not None or job.config.get("device") == "cuda"


def _run(job_id: str, run_id: str, settings: Settings, store: JobStore, *, sandbox_gpu: int | None = None,
         sandboxed: bool = False) -> None:
    """Run one claimed job. ``sandboxed``: apply the resource limits first — only in a process that runs
    this one job and then exits (limits stay for the life of the process; CPU time adds up)."""
    job = store.get(job_id=job_id)
    if job is None or job.run_id != run_id:
        log.warning("job %s is no longer held by run %s; nothing to do", job_id, run_id)
        return
    limits: sandbox.Limits | None = None
    if sandboxed:
        cuda = job_uses_cuda(job, sandbox_gpu)
        limits = sandbox.limits_from_settings(settings, cuda=cuda)
        log.info("job %s: sandbox limits %s%s", job_id, sandbox.apply(limits),
                 " (no address-space limit: the job may use CUDA)" if cuda else "")
    storage = Storage(settings.data_dir)
    work = storage.work_dir(job_id)
    discard_partial_files(work)  # half-written by an earlier run that was killed
    tmp_artifact = work / f".artifact-{run_id}.pt"
    stage = {"name": "loading"}

    def fail(code: str, message: str) -> None:
        store.finish(job_id=job_id, run_id=run_id, status=FAILED, error_code=code, error_message=message)

    try:
        from calibration import CalibrationError, CancelledError, certify
    except Exception as exc:  # a broken install must fail the job, not leave it running
        log.exception("cannot import calibration")
        fail("internal_error", f"The worker could not load the calibration engine: {type(exc).__name__}: {exc}")
        return

    store.update_progress(job_id=job_id, run_id=run_id, stage="loading", done=0, total=0,
                          message="Loading the model and the calibration data.")
    report = throttled_progress(store, job_id, run_id)

    def progress(p: Any) -> None:
        stage["name"] = p.stage
        report(p)

    try:
        with storage.fetch_local(job.model_path) as model_path, \
                storage.fetch_local(job.data_path) as data_path, \
                storage.fetch_local(job.uncertainty_path) as uncertainty_path:
            refusal = check_room_for_artifact(model_path, work, limits)
            if refusal is not None:  # fail now, not after hours of work
                fail(*refusal)
                log.info("job %s refused: %s", job_id, refusal[1])
                return
            cert = certify(
                model_path,
                data_path,
                dict(job.config),
                out=tmp_artifact,
                uncertainty=uncertainty_path,
                progress=progress,
                should_stop=throttled_stop_check(store, job_id, run_id),
            )
        result = jsonable(cert.to_dict())
        if not tmp_artifact.is_file():
            raise RuntimeError("certify() returned without writing the artifact")
        if not store.is_current_run(job_id=job_id, run_id=run_id):
            log.warning("job %s was taken from run %s while it ran; discarding its artifact", job_id, run_id)
            return
        stage["name"] = "storing"
        stored = storage.put_file(tmp_artifact, f"{job_dir(job_id)}/artifact.pt")
        stage["name"] = "finishing"
        claimed = result.get("artifact_sha256")
        if claimed and claimed != stored.sha256:
            log.error("job %s: certify reported artifact sha256 %s but the stored file has %s", job_id, claimed,
                      stored.sha256)
        result["artifact_sha256"] = stored.sha256
        json.dumps(result, allow_nan=False)  # fail here, not when a client asks for the job
        store.finish(job_id=job_id, run_id=run_id, status=SUCCEEDED, result=result, artifact_sha256=stored.sha256)
        log.info("job %s succeeded", job_id)
    except CancelledError:
        store.finish(job_id=job_id, run_id=run_id, status=CANCELLED)
        log.info("job %s cancelled", job_id)
    except CalibrationError as exc:
        code, message = classify_failure(exc, stage["name"], limits)
        fail(code, message)
        log.info("job %s failed: %s: %s", job_id, code, message)
    except Exception as exc:
        code, message = classify_failure(exc, stage["name"], limits)
        if code == "internal_error":
            log.exception("job %s crashed", job_id)
        fail(code, message)
    finally:
        Path(tmp_artifact).unlink(missing_ok=True)


# -- files ----------------------------------------------------------------------------------------

PARTIAL_PATTERNS = (".artifact-*", ".tmp-*")


def discard_partial_files(work: Path) -> list[str]:
    """Remove temporary artifact files a killed run left in its job folder; returns their names."""
    removed = []
    for pattern in PARTIAL_PATTERNS:
        for path in work.glob(pattern):
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


# -- turning exceptions into job errors -------------------------------------------------------

_OOM_MARKERS = ("can't allocate memory", "cannot allocate memory", "out of memory", "unable to allocate",
                "bad_alloc", "std::bad_alloc")
_DISK_ERRNOS = (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC))
_DISK_MARKERS = ("no space left", "file too large", "disk quota", "file write failed", "database or disk is full")
_SAVING_STAGES = ("saving", "storing")


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes/contexts, outermost first (cycles cut)."""
    out: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in out and len(out) < 20:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def root_cause_line(exc: BaseException) -> str:
    """The most telling line of the innermost error (TorchScript puts the user's exception last)."""
    from calibration.errors import exception_summary  # lazy: calibration imports torch

    return exception_summary(exc)


def _is_out_of_memory(exc: BaseException) -> bool:
    for e in _chain(exc):
        if isinstance(e, MemoryError):
            return True
        if isinstance(e, RuntimeError) and any(m in str(e).lower() for m in _OOM_MARKERS):
            return True
    return False


def _is_disk_error(exc: BaseException) -> bool:
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in _DISK_ERRNOS:
            return True
        if any(m in str(e).lower() for m in _DISK_MARKERS):
            return True
    return False


def classify_failure(exc: BaseException, stage: str, limits: sandbox.Limits | None) -> tuple[str, str]:
    """(code, message) for a failed run: the calibration error, or a specific code for resource exhaustion."""
    from calibration import CalibrationError

    is_data_error = isinstance(exc, CalibrationError) and exc.code.startswith("data_")
    if _is_out_of_memory(exc) and not is_data_error:
        limit = limits.address_space_bytes if limits else None
        where = (f" (this worker may use at most {limit / 1024**3:.1f} GiB of address space, "
                 "CERTIPRUNE_SANDBOX_MAX_MEMORY_BYTES)") if limit else ""
        return ("job_out_of_memory",
                f"The job ran out of memory{where}: {root_cause_line(exc)}. Use a smaller batch_size or calibration "
                "set, or check that the model's forward does not allocate more than it needs.")
    limit = limits.file_bytes if limits else None
    bound = (f", or a file would exceed the worker's file-size limit of {limit} bytes "
             "(CERTIPRUNE_SANDBOX_MAX_FILE_BYTES)") if limit else ""
    if not isinstance(exc, CalibrationError) and stage in _SAVING_STAGES:
        return ("artifact_write_failed",
                f"Writing the pruned model failed: {root_cause_line(exc)}. The server's disk may be full{bound}. "
                "No artifact was stored; submit the job again once the operator has made room.")
    if not isinstance(exc, CalibrationError) and _is_disk_error(exc):
        return ("storage_full",
                f"The worker could not write to disk: {root_cause_line(exc)}. The server's disk may be full{bound}.")
    if isinstance(exc, CalibrationError):
        message = str(exc)
        if exc.__cause__ is not None and "TorchScript interpreter" in message:
            message = f"{message} The model raised: {root_cause_line(exc)}"
        return exc.code, message
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return ("internal_error", f"The job failed unexpectedly ({type(exc).__name__}: {text[:300]}). "
                              "This is a bug in certiprune; the server log has the details.")


__all__ = ["artifact_size_estimate", "check_room_for_artifact", "classify_failure", "discard_partial_files",
           "discard_partial_job_files",            "job_uses_cuda", "jsonable", "root_cause_line", "run_job"]
