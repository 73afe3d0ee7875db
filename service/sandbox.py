"""Resource limits for a worker process that runs an uploaded model (untrusted code).

The supervisor (``service.supervisor``) applies them to the untrusted child it starts, before the
child's program runs (inherited through bubblewrap). They bound that child only — never the API
process or the supervisor, which hold the job store.

- ``RLIMIT_AS`` (address space): a forward pass that allocates enormous memory gets an
  allocation error (the job fails ``job_out_of_memory``) instead of waking the kernel's OOM
  killer. **Not applied when the job uses CUDA**: the driver reserves virtual address space far
  beyond physical memory (unified addressing), so any useful limit breaks CUDA initialisation.
- ``RLIMIT_CPU`` (CPU seconds, all threads together): the kernel sends SIGXCPU at the limit (the
  executor fails the job ``job_timeout``) and SIGKILL 5 s of CPU later. A backstop to the
  executor's wall-clock limit (``job_timeout_s``), which remains the primary one.
- ``RLIMIT_FSIZE`` (largest file the process may write): bounds the artifact and temporary
  files. SIGXFSZ is ignored, so an oversized write fails with EFBIG as an exception and the
  job fails ``artifact_write_failed`` rather than dying. It also bounds appends to every file the
  worker writes: the SQLite job store and a log file inherited from the server — keep it far
  above their sizes.
- ``RLIMIT_NOFILE`` (open file descriptors).
- ``RLIMIT_NPROC`` (processes and threads of the child's uid; the kernel exempts a uid-0 process, so
  it binds when the sandbox is entered as an unprivileged uid — ``service.isolation``).
- ``RLIMIT_CORE`` = 0: no core dumps of user code (they would hold user data and fill the disk).

Limits are only lowered, never raised above what the process already has.
"""

from __future__ import annotations

import logging
import math
import os
import signal
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .settings import Settings

log = logging.getLogger("certiprune.sandbox")

CPU_KILL_GRACE_S = 5  # SIGXCPU at the soft limit, SIGKILL at soft + this


@dataclass(frozen=True)
class Limits:
    """Resolved limits of one worker process; None: not limited."""

    address_space_bytes: int | None
    cpu_seconds: int | None
    file_bytes: int | None
    open_files: int | None
    processes: int | None = None


def physical_memory_bytes() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def usable_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _setting(value: float | None, default: float | None) -> float | None:
    """Settings convention: None → ``default``; 0 → no limit."""
    if value is None:
        return default
    return None if value == 0 else value


def limits_from_settings(settings: Settings, *, cuda: bool) -> Limits:
    """The limits for one job. ``cuda``: the job may use a GPU (then no address-space limit)."""
    physical = physical_memory_bytes()
    memory = _setting(settings.sandbox_max_memory_bytes, None if physical is None else physical // 2)
    cpu = _setting(settings.sandbox_max_cpu_s, settings.job_timeout_s * usable_cpus())
    files = _setting(settings.sandbox_max_file_bytes, max(4 * settings.max_upload_bytes, 8 * 1024**3))
    nofile = _setting(settings.sandbox_max_open_files, None)
    nproc = _setting(settings.sandbox_max_processes, 64 + 4 * usable_cpus())
    return Limits(
        address_space_bytes=None if cuda or memory is None else int(memory),
        cpu_seconds=None if cpu is None else max(1, math.ceil(cpu)),
        file_bytes=None if files is None else int(files),
        open_files=None if nofile is None else int(nofile),
        processes=None if nproc is None else int(nproc),
    )


def _lower(which: int, soft: int, hard: int | None = None) -> None:
    """Set (soft, hard) without raising either above the current hard limit."""
    import resource

    _, cur_hard = resource.getrlimit(which)
    hard = soft if hard is None else hard
    if cur_hard != resource.RLIM_INFINITY:
        hard = min(hard, cur_hard)
    resource.setrlimit(which, (min(soft, hard), hard))


def apply(limits: Limits) -> dict[str, int | None]:
    """Apply ``limits`` to this process; returns what was set (for the log). Linux/macOS only."""
    try:
        import resource
    except ImportError:  # Windows: no rlimits
        log.warning("resource limits are not supported on this platform; the worker runs unlimited")
        return {}
    _lower(resource.RLIMIT_CORE, 0)
    if limits.address_space_bytes is not None:
        _lower(resource.RLIMIT_AS, limits.address_space_bytes)
    if limits.cpu_seconds is not None:
        _lower(resource.RLIMIT_CPU, limits.cpu_seconds, limits.cpu_seconds + CPU_KILL_GRACE_S)
    if limits.file_bytes is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG as an exception, not a silent death
        _lower(resource.RLIMIT_FSIZE, limits.file_bytes)
    if limits.open_files is not None:
        _lower(resource.RLIMIT_NOFILE, limits.open_files)
    if limits.processes is not None:
        _lower(resource.RLIMIT_NPROC, limits.processes)
    return asdict(limits)


__all__ = ["CPU_KILL_GRACE_S", "Limits", "apply", "limits_from_settings", "physical_memory_bytes", "usable_cpus"]
