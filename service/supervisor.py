"""The trusted side of a job run: hand an untrusted child exactly its verified inputs, read what it says.

The supervisor runs in the executor's process for the job (a spawned process locally, the Ray
task's child on a cluster). For one run it

1. starts the child (``service.child``) first, in the OS sandbox (``service.isolation``; or, with
   the sandbox off, as a plain process with an empty environment), with the rlimits of
   ``service.sandbox``, its stdout/stderr going to the job's own size-capped log. The sandbox's
   read-only ``/in`` is this run's private staging folder, still empty: while the child imports
   torch and the science (and starts CUDA) — seconds — the supervisor fills that folder;
2. links (or copies) the job's inputs into the staging folder under a temporary name, hashes them
   there (by the 64 MiB chunk digests recorded at admission, on every core: ``service.chunk_digests``),
   and only then renames each to its final name; a hash that differs from the one recorded
   at admission ends the run (``input_integrity_error``) — so a file changed in storage after
   admission is never used. The child's request (stdin) is written only after *every* input is
   staged and verified: the child reads nothing of /in before it has the request, so it can never
   use a partial or unverified input. A run refused before the request gets EOF instead, and the
   child exits without having been told of any input;
3. reads the child's events (each line bounded in size, parsed as JSON, validated) and forwards
   progress; polls for a cancel and kills the child at once when one comes;
4. receives the artifact over a pipe, capped at the file-size limit, and hashes it itself, once:
   that hash is what is stored and reported (``Storage.put_file(..., sha256=)`` does not re-read it).

Nothing the child says is trusted beyond its own job: codes must look like codes, messages are
cut and stripped of control characters, the result must have the result's shape.

How a run ended is written to the job store by one function, :func:`record_outcome`, whoever
learnt it: the supervisor (the child's outcome, or its own refusal), the dispatcher (a timeout, a
cancel it had to enforce, a worker that died without recording an end, an orderly shutdown), the
Ray task (a supervisor killed by a sandbox limit), or the sweep for runs whose executor is gone
(:func:`recover_orphans`). Every write is a compare-and-set on the run id, so a run that no longer
holds its job writes nothing.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import isolation, sandbox
from .chunk_digests import ChunkDigests, mismatch

if TYPE_CHECKING:  # SQLAlchemy: the worker imports it only once the child is started
    from .store import Claim, JobStore

#: Final run states, spelt as ``service.store`` spells them (tests/service/test_child_overlap.py checks).
SUCCEEDED, FAILED, CANCELLED = "succeeded", "failed", "cancelled"

log = logging.getLogger("certiprune.supervisor")

MAX_EVENT_BYTES = 8 * 1024**2  # one JSON line (the result with a 1000-level table is ~0.3 MB)
MAX_MESSAGE_CHARS = 2000
POLL_S = 0.1
CODE_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u2028\u2029]")


@dataclass(frozen=True)
class Input:
    """One file to hand over: where it is now, its name under /in, the sha256 recorded at admission, and the
    digests of its 64 MiB chunks recorded with it (None for a job admitted before they were: the sha256 is
    checked then)."""

    source: Path
    name: str
    sha256: str
    chunks: ChunkDigests | None = None


#: Outcome statuses beyond the three final ones (only :func:`record_outcome` takes them): the run's worker
#: died without recording an end (retried, or failed once the job has had its runs), or the service shut down
#: (back to the queue, no attempt counted).
LOST = "lost"
INTERRUPTED = "interrupted"


@dataclass
class Outcome:
    """How a run ended: as the supervisor judged the child's run, or as an executor saw its worker end."""

    status: str  # succeeded | failed | cancelled (run_child returns only these) | lost | interrupted
    result: dict[str, Any] | None = None
    artifact: Path | None = None
    artifact_sha256: str | None = None
    code: str | None = None
    message: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


def clean_text(text: Any, limit: int = MAX_MESSAGE_CHARS) -> str:
    """Untrusted text as one safe line: no control characters (no forged log lines), bounded length."""
    out = CONTROL_RE.sub(" ", str(text))
    return out if len(out) <= limit else out[: limit - 1] + "…"


def check_result(result: Any) -> dict[str, Any]:
    """The child's result must have the result's shape; raises ValueError otherwise."""
    if not isinstance(result, dict):
        raise ValueError("the result is not an object")
    sparsity = result.get("certified_sparsity")
    if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool) or not 0.0 <= sparsity < 1.0:
        raise ValueError("certified_sparsity is not a number in [0, 1)")
    if not isinstance(result.get("certified"), bool):
        raise ValueError("certified is not a boolean")
    levels = result.get("levels")
    if not isinstance(levels, list) or not all(isinstance(level, dict) for level in levels):
        raise ValueError("levels is not a list of objects")
    if not isinstance(result.get("guarantee", ""), str):
        raise ValueError("guarantee is not text")
    return result


STAGING_PREFIX = ".staging-"


def stage_inputs(inputs: list[Input], folder: Path) -> dict[str, Path]:
    """Put each input into ``folder`` (readable by the sandbox's uid) and check the sha256 of what is there.

    A hard link when the file lies on the same file system and is world-readable (no copy of a
    multi-GB dataset, no disk space), else a copy, first under a temporary name: only a verified
    file gets its final name, so ``folder`` (the child's /in, which may already be mounted) never
    shows a partial or unverified input under an input's name. Only trusted processes write to
    storage, so the linked file cannot change between this check and the child's read. Raises
    IntegrityError naming the file whose content no longer matches what was admitted (its staged
    copy is removed).
    """
    folder.mkdir(mode=0o711, parents=True, exist_ok=True)
    os.chmod(folder, 0o711)
    staged: dict[str, Path] = {}
    for item in inputs:
        target = folder / item.name
        pending = folder / f"{STAGING_PREFIX}{item.name}"
        for path in (target, pending):
            path.unlink(missing_ok=True)
        try:
            if not os.stat(item.source).st_mode & 0o004:
                raise OSError("not world-readable: copy it")
            os.link(item.source, pending)
        except OSError:
            shutil.copyfile(item.source, pending)
            os.chmod(pending, 0o444)
        problem = _content_mismatch(pending, item)
        if problem is not None:
            pending.unlink(missing_ok=True)
            raise IntegrityError(item.name, problem)
        os.replace(pending, target)
        staged[item.name] = target
    return staged


def _content_mismatch(path: Path, item: Input) -> str | None:
    """None when ``path`` holds exactly the bytes admitted as ``item``; else what differs. By the chunk digests
    recorded at admission, checked on every core (``service.chunk_digests``: the same check as the sha256,
    which they were computed beside); without them, by the whole-file sha256."""
    if item.chunks is not None:
        return mismatch(path, item.chunks)
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    actual = digest.hexdigest()
    return None if actual == item.sha256 else f"sha256 {actual[:12]}… where {item.sha256[:12]}… was admitted"


class IntegrityError(Exception):
    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"The stored {name} no longer matches the sha256 recorded when it was submitted ({problem}): "
                         "it was changed after admission, so the job was not run. Submit the job again.")


def _signal_of(returncode: int | None, sandboxed: bool) -> int | None:
    if returncode is None:
        return None
    if returncode < 0:
        return -returncode
    if sandboxed and returncode > 128:  # bwrap reports a child killed by signal N as 128 + N
        return returncode - 128
    return None


class _CappedCopy(threading.Thread):
    """Copy a pipe into a file, keeping at most ``limit`` bytes; ``over`` once the child sent more."""

    def __init__(self, fd: int, path: Path, limit: int, *, drain: bool, digest: bool = False) -> None:
        super().__init__(daemon=True)
        self.fd, self.path, self.limit, self.drain = fd, path, limit, drain
        self.size = 0
        self.over = False
        self.digest = hashlib.sha256() if digest else None  # of exactly the bytes written to ``path``
        self.error: OSError | None = None
        self.done_at: float | None = None  # perf_counter at the pipe's EOF
        self._out = open(path, "wb")  # opened here, not in the thread: the file exists (and may be renamed) at once

    def run(self) -> None:
        try:
            with os.fdopen(self.fd, "rb", closefd=True) as src, self._out as out:
                for chunk in iter(lambda: src.read1(1 << 20), b""):  # what has arrived, not a full 1 MiB
                    room = self.limit - self.size
                    if len(chunk) > room:
                        self.over = True
                        chunk = chunk[:max(room, 0)]
                        if not self.drain:
                            out.write(chunk)
                            self.size += len(chunk)
                            return
                    out.write(chunk)
                    if self.digest is not None:
                        self.digest.update(chunk)
                    elif self.drain:
                        out.flush()  # the job's log, readable while the child runs
                    self.size += len(chunk)
            self.done_at = time.perf_counter()
        except OSError as exc:
            self.error = exc


class _Events(threading.Thread):
    """Read the child's JSON lines; forward progress; keep the last result or error."""

    def __init__(self, fd: int, on_progress: Callable[[str, int, int, str | None], None]) -> None:
        super().__init__(daemon=True)
        self.fd, self.on_progress = fd, on_progress
        self.result: dict[str, Any] | None = None
        self.artifact_bytes: int | None = None
        self.error: tuple[str, str] | None = None
        self.stage = "loading"
        self.bad: str | None = None

    def run(self) -> None:
        with os.fdopen(self.fd, "rb", closefd=True) as src:
            while True:
                line = src.readline(MAX_EVENT_BYTES + 1)
                if not line:
                    return
                if len(line) > MAX_EVENT_BYTES:
                    self.bad = f"an event of more than {MAX_EVENT_BYTES} bytes"
                    return
                try:
                    self._handle(json.loads(line))
                except (ValueError, TypeError, KeyError) as exc:
                    self.bad = f"a malformed event ({clean_text(exc, 200)})"
                    return

    def _handle(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "progress":
            stage, done, total = str(event["stage"])[:32], int(event["done"]), int(event["total"])
            self.stage = stage
            message = event.get("message")
            self.on_progress(stage, done, total, clean_text(message, 500) if message else None)
        elif kind == "result":
            self.result = check_result(event["result"])
            self.artifact_bytes = int(event["artifact_bytes"])
            self.stage = "storing"
        elif kind == "error":
            code = str(event["code"])
            self.error = (code if CODE_RE.match(code) else "model_failed", clean_text(event["message"]))
            self.stage = clean_text(event.get("stage", self.stage), 32)
        else:
            raise ValueError(f"unknown event {kind!r}")


@dataclass(frozen=True, kw_only=True)
class ChildSpec:
    """Everything one child run needs, fixed by the supervisor before it starts."""

    inputs: list[Input]
    config: dict[str, Any]
    limits: sandbox.Limits
    isolate: bool
    work: Path  # private folder for this run (staging, artifact, log)
    log_path: Path | None  # the job's log; None: not known yet (a pre-started worker), given to keep_log()
    max_log_bytes: int
    tmp_bytes: int
    cuda_visible: str | None = None


def child_command() -> list[str]:
    """``python -I`` (no environment variables, no user site, no cwd on the path) running ``service.child``.

    The folder holding the ``service`` package goes first on the path, so a source checkout that is not
    pip-installed works too; inside the sandbox that folder shows only the two packages (isolation.py).
    """
    import service

    root = str(Path(service.__file__).resolve().parent.parent)
    return [sys.executable, "-I", "-c",
            f"import sys; sys.path.insert(0, {root!r}); from service.child import main; sys.exit(main())"]


def _child_env(spec: ChildSpec, tmp: str) -> dict[str, str]:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8",
           "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}
    if spec.cuda_visible is not None:
        env.update(CUDA_VISIBLE_DEVICES=spec.cuda_visible, CUDA_DEVICE_ORDER="PCI_BUS_ID")
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


#: How long a child refused before its request (inputs that failed verification, no room for the artifact)
#: may take to see EOF and exit by itself (it reads stdin only once its imports are done) before it is killed.
REFUSED_EXIT_GRACE_S = 20.0


class ChildRun:
    """One child, started before its inputs are staged; it gets its request only once they are all verified.

    ``start()`` spawns the child with /in bound read-only to this run's staging folder (empty so far;
    only this job's files ever go there). The child imports torch and ``calibration.engine`` and starts
    CUDA, then blocks reading stdin. Meanwhile :meth:`stage` links/copies and hashes the inputs
    (:func:`stage_inputs`: a file appears under its name only once verified). :meth:`supervise` writes
    the request — only after :meth:`stage` returned — and judges the run. Used as a context manager,
    a run left before :meth:`supervise` (an IntegrityError, a refusal) closes stdin without a request:
    the child, told of no input, exits (or is killed after ``REFUSED_EXIT_GRACE_S``).
    """

    def __init__(self, spec: ChildSpec) -> None:
        self.spec = spec
        self.timings: dict[str, float] = {}
        self.staged: dict[str, Path] | None = None
        self.request_sent = False
        self.proc: subprocess.Popen[bytes] | None = None
        self._t0 = time.perf_counter()
        self._folder = spec.work / "in"
        self._closed = False
        self._config = spec.config

    def __enter__(self) -> ChildRun:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End the child however far the run got: no request yet → :meth:`abandon`; still running → killed."""
        if self.proc is None or self._closed:
            return
        if not self.request_sent:
            self.abandon()
            return
        if self.proc.poll() is None:  # supervise() raised: leave nothing running
            _kill(self.proc)
            self.proc.wait()
        self._closed = True

    def restart(self, spec: ChildSpec) -> None:
        """Replace a child that has no request yet by one started from ``spec`` (other limits, say)."""
        if self.request_sent:
            raise RuntimeError("restart() after the request was sent")
        self.abandon(grace_s=0)
        self.__init__(spec)  # type: ignore[misc]
        self.start()

    def start(self) -> None:
        """Spawn the child (sandboxed unless ``spec.isolate`` is off) with an empty, private /in."""
        spec = self.spec
        self._folder.mkdir(mode=0o711, parents=True, exist_ok=True)
        os.chmod(self._folder, 0o711)
        self._file_limit = spec.limits.file_bytes or (1 << 62)
        self.artifact = spec.work / "artifact.pt"
        python = child_command()
        events_r, events_w = os.pipe()
        artifact_r, artifact_w = os.pipe()
        log_r, log_w = os.pipe()
        if spec.isolate:
            view = isolation.SandboxView(inputs={}, inputs_dir=self._folder, tmp_bytes=spec.tmp_bytes,
                                         out_bytes=self._file_limit,
                                         gpu_devices=isolation.gpu_device_nodes(spec.cuda_visible),
                                         env=_child_env(spec, "/tmp"))
            argv = isolation.bwrap_argv(view, python)
            env: dict[str, str] = {}
            self._in_dir, self._out_dir = "/in", "/out"
            uid = isolation.outside_uid(view)
        else:
            tmp = spec.work / "tmp"
            out = spec.work / "out"
            for folder in (tmp, out):
                folder.mkdir(exist_ok=True)
            argv, env = python, _child_env(spec, str(tmp))
            self._in_dir, self._out_dir, uid = str(self._folder), str(out), None
        self._events_fd, self._artifact_fd = events_w, artifact_w

        def preexec() -> None:
            isolation.drop_to(uid)
            _die_with_supervisor()  # after the uid change, which clears it
            sandbox.apply(spec.limits)

        self._spawned_at = time.time()
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=log_w, stderr=log_w, env=env,
                                         pass_fds=(events_w, artifact_w), preexec_fn=preexec, start_new_session=True,
                                         cwd=self._out_dir if not spec.isolate else "/")
        except BaseException:
            for fd in (events_r, artifact_r, log_r):
                os.close(fd)
            raise
        finally:
            for fd in (events_w, artifact_w, log_w):
                os.close(fd)
        self.timings["child_spawn_s"] = time.perf_counter() - self._t0
        # The log starts in the run's own folder: a run that turns out not to hold its job must not overwrite the
        # job's log; keep_log() moves it to spec.log_path once the run is known to be the job's (same file system).
        self._run_log = spec.work / "child.log"
        self._log_copy = _CappedCopy(log_r, self._run_log, spec.max_log_bytes, drain=True)
        self._receiver = _CappedCopy(artifact_r, self.artifact, self._file_limit, drain=False, digest=True)
        self._events = _Events(events_r, lambda *a: None)
        for thread in (self._log_copy, self._receiver, self._events):
            thread.start()

    def keep_log(self, log_path: Path | None = None) -> None:
        """This run holds its job: its child's log becomes the job's log (``log_path``, default ``spec.log_path``;
        on the same file system), still being written."""
        target = log_path or self.spec.log_path
        if target is None:
            raise ValueError("keep_log() needs the job's log path")
        os.replace(self._run_log, target)

    def stage(self, inputs: list[Input]) -> dict[str, Path]:
        """Stage and verify ``inputs`` while the child imports (raises IntegrityError; nothing is sent then)."""
        t = time.perf_counter()
        self.staged = stage_inputs(inputs, self._folder)
        self.timings["staging_s"] = time.perf_counter() - t
        return self.staged

    def _request(self) -> dict[str, Any]:
        assert self.staged is not None
        names = list(self.staged)
        return {"model": f"{self._in_dir}/model.pt",
                "data": f"{self._in_dir}/{next(n for n in names if n.startswith('data'))}",
                "uncertainty": f"{self._in_dir}/uncertainty.safetensors" if "uncertainty.safetensors" in names
                else None,
                "config": self._config, "limits": asdict(self.spec.limits), "out_dir": self._out_dir,
                "events_fd": self._events_fd, "artifact_fd": self._artifact_fd, "spawned_at": self._spawned_at}

    def supervise(self, *, on_progress: Callable[[str, int, int, str | None], None],
                  should_stop: Callable[[], bool], config: dict[str, Any] | None = None) -> Outcome:
        """Send the request (every input is staged and verified by now), then watch the child to its end.

        ``config``: the job's configuration, when it was not known as the child started (else ``spec.config``).
        """
        if self.staged is None:
            raise RuntimeError("supervise() before stage(): the child must never get a request for unverified inputs")
        if config is not None:
            self._config = config
        proc, events, receiver = self.proc, self._events, self._receiver
        assert proc is not None and proc.stdin is not None
        events.on_progress = on_progress
        self.request_sent = True
        try:
            proc.stdin.write((json.dumps(self._request()) + "\n").encode())
            proc.stdin.close()
        except OSError:
            pass  # it died already; its exit status says why
        cancelled = killed_for = None
        while True:
            try:
                proc.wait(POLL_S)  # returns the moment the child exits
                break
            except subprocess.TimeoutExpired:
                pass
            if receiver.over:
                killed_for = "artifact"
            elif events.bad:
                killed_for = "event"
            elif should_stop():
                cancelled = True
            if cancelled or killed_for:
                _kill(proc)
                break
        proc.wait()
        exited = time.perf_counter()
        for thread in (events, receiver, self._log_copy):
            thread.join(10)
        if receiver.done_at is not None:  # the artifact's EOF → the child's exit: its teardown, as the job waits
            self.timings["child_exit_s"] = max(0.0, exited - receiver.done_at)
        self.timings["child_s"] = time.perf_counter() - self._t0
        if cancelled:
            return Outcome("cancelled", timings=self.timings)
        return _judge(proc.returncode, self.spec, events, receiver, self.artifact, killed_for, self.timings)

    def abandon(self, grace_s: float = REFUSED_EXIT_GRACE_S) -> None:
        """End a child that never got its request: EOF on stdin, up to ``grace_s`` to exit by itself, then SIGKILL."""
        proc = self.proc
        if proc is None or self._closed:
            return
        self._closed = True
        try:
            assert proc.stdin is not None
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            _kill(proc)
            proc.wait()
        for name in ("_events", "_receiver", "_log_copy"):
            thread = getattr(self, name, None)
            if thread is not None and thread.ident is not None:  # started (start() may have failed half-way)
                thread.join(10)


def run_child(spec: ChildSpec, *, on_progress: Callable[[str, int, int, str | None], None],
              should_stop: Callable[[], bool]) -> Outcome:
    """Run one job's certification in an untrusted child and judge its outcome.

    The child is started first and imports while ``spec.inputs`` are staged and verified
    (:class:`ChildRun`); it gets its request only after all of them are. Raises IntegrityError
    (the child then gets no request).
    """
    with ChildRun(spec) as run:
        run.keep_log()
        run.stage(spec.inputs)
        return run.supervise(on_progress=on_progress, should_stop=should_stop)


def _die_with_supervisor() -> None:
    """The child gets SIGKILL when the supervisor dies (killed by the executor on a timeout, say)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _kill(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # bwrap, or the whole unsandboxed child's group
    except ProcessLookupError:
        pass


def _judge(returncode: int, spec: ChildSpec, events: _Events, receiver: _CappedCopy, artifact: Path,
           killed_for: str | None, timings: dict[str, float]) -> Outcome:
    limit = spec.limits.file_bytes
    if killed_for == "artifact" or (events.artifact_bytes is not None and limit and events.artifact_bytes > limit):
        return Outcome("failed", code="artifact_write_failed", timings=timings,
                       message=f"The pruned model is larger than a job may write ({limit:,} bytes, "
                               "CERTIPRUNE_SANDBOX_MAX_FILE_BYTES). No artifact was stored.")
    if killed_for == "event" or events.bad:
        return Outcome("failed", code="model_protocol_violation", timings=timings,
                       message=f"The job's process sent {events.bad}; it was stopped and nothing it produced was kept.")
    if events.error is not None:
        code, message = events.error
        return Outcome("failed", code=code, message=message, timings=timings)
    sig = _signal_of(returncode, spec.isolate)
    if events.result is not None and returncode == 0:
        if receiver.error is not None:
            return Outcome("failed", code="artifact_write_failed", timings=timings,
                           message=f"Writing the pruned model failed: {clean_text(receiver.error, 300)}. The server's "
                                   "disk may be full. No artifact was stored.")
        if receiver.size != events.artifact_bytes:
            return Outcome("failed", code="artifact_write_failed", timings=timings,
                           message="The pruned model arrived incomplete; no artifact was stored.")
        return Outcome("succeeded", result=events.result, artifact=artifact,
                       artifact_sha256=receiver.digest.hexdigest() if receiver.digest else None, timings=timings)
    failure = sandbox_death(sig, events.stage)
    if failure is not None:
        return Outcome("failed", code=failure[0], message=failure[1], timings=timings)
    how = f"was killed by {signal.Signals(sig).name}" if sig else f"exited with status {returncode}"
    return Outcome("failed", code="model_crashed", timings=timings,
                   message=f"The process running the model {how} during '{events.stage}' without reporting an "
                           "outcome (a crash in the model's code or in a native library). The job's log holds its "
                           "output for the operator.")


def sandbox_death(sig: int | None, stage: str) -> tuple[str, str] | None:
    """(code, message) for a child killed by one of the sandbox's limits."""
    if sig == signal.SIGXCPU:
        return "job_timeout", ("The job used up the CPU time a run may take and was stopped "
                               "(CERTIPRUNE_SANDBOX_MAX_CPU_S). Check that the model's forward terminates, use fewer "
                               "sparsity levels or a smaller calibration set, or ask the operator to raise the limit.")
    if sig == signal.SIGXFSZ or (sig == signal.SIGABRT and stage == "saving"):
        return "artifact_write_failed", ("The job's process crashed while writing the pruned model: it is larger than "
                                         "a job may write (CERTIPRUNE_SANDBOX_MAX_FILE_BYTES). No artifact was stored.")
    return None


def remove_run_folder(work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)


# -- the job's state: its one writer --------------------------------------------------------------

ORPHAN_MESSAGE = "The worker running this job stopped (service restart or crash)."


def record_outcome(store: JobStore, claim: Claim, outcome: Outcome, *, max_attempts: int | None = None) -> str | None:
    """Write how run ``claim.run_id`` of job ``claim.job_id`` ended; the only code that ends a run.

    ``succeeded`` (``result``, ``artifact_sha256``), ``failed`` (``code``, ``message``) and ``cancelled`` are
    final. ``lost`` (the run's worker ended without recording an end; ``code``, ``message``) requeues the job
    with one more attempt counted, fails it with ``code`` once it has had ``max_attempts`` runs, or cancels it
    when a cancel was requested. ``interrupted`` (orderly shutdown; ``message``) requeues it without counting
    an attempt. Returns the job's new status, or None when the run no longer held the job (nothing written).
    """
    job_id, run_id = claim.job_id, claim.run_id
    if outcome.status == SUCCEEDED:
        done = store.finish(job_id=job_id, run_id=run_id, status=SUCCEEDED, result=outcome.result,
                            artifact_sha256=outcome.artifact_sha256)
    elif outcome.status == FAILED:
        if outcome.code is None:
            raise ValueError("a failed outcome needs an error code")
        done = store.finish(job_id=job_id, run_id=run_id, status=FAILED, error_code=outcome.code,
                            error_message=outcome.message)
    elif outcome.status == CANCELLED:
        done = store.finish(job_id=job_id, run_id=run_id, status=CANCELLED)
    elif outcome.status == LOST:
        if outcome.code is None or max_attempts is None:
            raise ValueError("a lost run needs an error code and max_attempts")
        return store.interrupt(job_id=job_id, run_id=run_id, max_attempts=max_attempts, code=outcome.code,
                               message=outcome.message or "The run was lost.")
    elif outcome.status == INTERRUPTED:
        return store.requeue_run(job_id=job_id, run_id=run_id, message=outcome.message or "The run was interrupted.")
    else:
        raise ValueError(f"unknown outcome status {outcome.status!r}")
    return outcome.status if done else None


def recover_orphans(store: JobStore, *, max_attempts: int, stale_before: datetime | None = None,
                    is_gone: Callable[[str | None], bool] | None = None) -> dict[str, str]:
    """Record runs left 'running' by executors that are gone as lost (``worker_interrupted``): start-up and sweep.

    A run is orphaned when ``is_gone(worker_id)`` says its process is gone, or its heartbeat is older than
    ``stale_before`` (``JobStore.orphaned_runs``). Returns {job_id: new status}.
    """
    changed: dict[str, str] = {}
    for claim in store.orphaned_runs(stale_before=stale_before, is_gone=is_gone):
        new = record_outcome(store, claim, Outcome(LOST, code="worker_interrupted", message=ORPHAN_MESSAGE),
                             max_attempts=max_attempts)
        if new:
            changed[claim.job_id] = new
    return changed


__all__ = ["INTERRUPTED", "LOST", "ChildRun", "ChildSpec", "Input", "IntegrityError", "Outcome", "check_result",
           "clean_text", "record_outcome", "recover_orphans", "remove_run_folder", "run_child", "sandbox_death",
           "stage_inputs"]
