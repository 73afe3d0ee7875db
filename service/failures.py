"""Turning a failed run's exception into a job error (code, message): one place for the child and the supervisor.

Import-light (no torch, no store): the sandboxed child imports it before it loads anything.
"""

from __future__ import annotations

import errno

from . import sandbox

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


def is_disk_error(exc: BaseException) -> bool:
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
    if not isinstance(exc, CalibrationError) and is_disk_error(exc):
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


__all__ = ["classify_failure", "is_disk_error", "root_cause_line"]
