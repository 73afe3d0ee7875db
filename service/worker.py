"""Runs one job inside a spawned worker process: read its files, ``calibration.certify``, store the artifact.

This module is imported by the API process (the executor refers to ``run_job``), so it imports
neither torch nor ``calibration`` at module level: the worker picks its GPU first.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .settings import Settings
from .storage import Storage, job_dir
from .store import CANCELLED, FAILED, SUCCEEDED, JobStore

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
    """Entry point of the spawned process. Records the job's outcome; exits 0 unless the store is unreachable."""
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C in a terminal is for the server, which stops us
    _select_gpu(gpu)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [worker %(process)d] %(message)s")
    settings = Settings(**settings_dict)
    store = JobStore.from_url(settings.resolved_database_url)
    try:
        _run(job_id, run_id, settings, store)
    finally:
        store.close()


def _run(job_id: str, run_id: str, settings: Settings, store: JobStore) -> None:
    job = store.get(job_id=job_id)
    if job is None or job.run_id != run_id:
        log.warning("job %s is no longer held by run %s; nothing to do", job_id, run_id)
        return
    storage = Storage(settings.data_dir)
    work = storage.work_dir(job_id)
    tmp_artifact = work / f".artifact-{run_id}.pt"

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
    try:
        with storage.fetch_local(job.model_path) as model_path, \
                storage.fetch_local(job.data_path) as data_path, \
                storage.fetch_local(job.uncertainty_path) as uncertainty_path:
            cert = certify(
                model_path,
                data_path,
                dict(job.config),
                out=tmp_artifact,
                uncertainty=uncertainty_path,
                progress=throttled_progress(store, job_id, run_id),
                should_stop=throttled_stop_check(store, job_id, run_id),
            )
        result = jsonable(cert.to_dict())
        if not tmp_artifact.is_file():
            raise RuntimeError("certify() returned without writing the artifact")
        if not store.is_current_run(job_id=job_id, run_id=run_id):
            log.warning("job %s was taken from run %s while it ran; discarding its artifact", job_id, run_id)
            return
        stored = storage.put_file(tmp_artifact, f"{job_dir(job_id)}/artifact.pt")
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
        fail(exc.code, str(exc))
        log.info("job %s failed: %s: %s", job_id, exc.code, exc)
    except Exception as exc:
        log.exception("job %s crashed", job_id)
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        fail("internal_error", f"The job failed unexpectedly ({type(exc).__name__}: {text[:300]}). "
                               "This is a bug in certiprune; the server log has the details.")
    finally:
        Path(tmp_artifact).unlink(missing_ok=True)


__all__ = ["jsonable", "run_job"]
