"""The untrusted side of a job run: ``python -I -m service.child``, started by ``service.supervisor``.

It runs ``calibration.certify`` on the files it was handed and nothing else: it holds no
credentials, opens no database, and (inside the sandbox, ``service.isolation``) sees only its
read-only inputs under /in, a private /tmp and /out. It talks to the supervisor over descriptors:

- stdin: one JSON request ``{"model", "data", "uncertainty", "config", "limits"}`` (paths inside the
  sandbox). The child is started *before* its inputs are staged: it imports torch and
  ``calibration.engine`` (and, with a GPU visible, starts CUDA and loads cuBLAS/cuDNN) first, and only
  then reads stdin. The supervisor writes the request only once every input under /in is staged
  and verified, so nothing of /in is read before it is complete and checked; EOF instead of a
  request means the run was refused (an input failed verification): the child exits at once;
- the events descriptor (named in the request): JSON lines ``{"event": "progress"|"result"|"error", ...}``;
- the artifact descriptor: after a ``result`` event, the raw bytes of the pruned model, then EOF;
- stdout/stderr: free text, which the supervisor keeps in the job's own size-capped log.

Once the result is sent and the artifact streamed (or the error sent), the child flushes and leaves
with ``os._exit``: nothing it would do in interpreter and CUDA teardown matters to the job, and the
supervisor waits for its exit.

Everything it says is untrusted: the supervisor validates each event and re-hashes the artifact.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

ARTIFACT_NAME = "artifact.pt"
READY_LINE = "certiprune child: imports done, waiting for the request"
RECEIVED_LINE = "certiprune child: request received"
NO_REQUEST_LINE = "certiprune child: no request (the run was refused before it was sent); exiting"


def _send(events: Any, **event: Any) -> None:
    events.write(json.dumps(event, allow_nan=False, default=str) + "\n")
    events.flush()


def _stream_artifact(path: str, fd: int) -> None:
    with open(path, "rb") as src, os.fdopen(fd, "wb", closefd=True) as out:
        for chunk in iter(lambda: src.read(1 << 20), b""):
            out.write(chunk)


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def prepare() -> tuple[dict[str, float], BaseException | None]:
    """Everything that needs no input, done before the request: imports, then CUDA's start where a GPU is visible.

    Returns the timings and the import error, if any (reported as the job's error once the request
    names the events descriptor). A CUDA problem is only logged: the engine meets it again on the job's
    device and reports it there (a job whose config says ``cpu`` does not need CUDA at all).
    """
    timings: dict[str, float] = {}
    t = time.perf_counter()
    try:
        from calibration import certify  # noqa: F401
        from calibration import engine  # noqa: F401  (torch and the science: timed as the job's imports)

        from .jsonable import jsonable  # noqa: F401
    except Exception as exc:
        return timings, exc
    timings["imports_s"] = time.perf_counter() - t
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        import torch

        try:
            t = time.perf_counter()
            torch.cuda.init()
            torch.empty(1, device="cuda")
            torch.cuda.synchronize()
            timings["cuda_init_s"] = time.perf_counter() - t
            # cuBLAS and cuDNN are loaded on their first call (hundreds of MB of libraries): now, not in the job.
            t = time.perf_counter()
            a = torch.ones(8, 8, device="cuda")
            (a @ a).sum().item()
            torch.nn.functional.conv2d(torch.ones(1, 1, 4, 4, device="cuda"),
                                       torch.ones(1, 1, 3, 3, device="cuda")).sum().item()
            timings["cuda_libs_s"] = time.perf_counter() - t
        except Exception as exc:
            _log(f"certiprune child: CUDA did not start before the request ({type(exc).__name__}: {exc})")
    return timings, None


def _exit_now(code: int) -> None:
    """Leave without interpreter or CUDA teardown: everything the supervisor needs was flushed already."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def main() -> int:
    started = time.time()  # before any import of ours: with the request's spawned_at, the process's start
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from . import sandbox
    from .failures import classify_failure

    fixed, import_error = prepare()
    _log(READY_LINE)
    t = time.perf_counter()
    line = sys.stdin.readline()
    fixed["request_wait_s"] = time.perf_counter() - t  # ≈ 0 when the inputs were staged before the imports ended
    if not line.strip():
        _log(NO_REQUEST_LINE)
        _exit_now(0)
    _log(RECEIVED_LINE)
    request = json.loads(line)
    events = os.fdopen(int(request["events_fd"]), "w", encoding="utf-8", closefd=True)
    limits = sandbox.Limits(**request["limits"]) if request.get("limits") else None
    out_dir = request.get("out_dir", "/out")
    stage = {"name": "loading"}

    def progress(p: Any) -> None:
        stage["name"] = p.stage
        _send(events, event="progress", stage=p.stage, done=int(p.done), total=int(p.total),
              message=p.message or None)

    try:
        if import_error is not None:
            raise import_error
        from calibration import certify

        from .jsonable import jsonable

        artifact = os.path.join(out_dir, ARTIFACT_NAME)
        cert = certify(request["model"], request["data"], dict(request["config"]), out=artifact,
                       uncertainty=request.get("uncertainty"), progress=progress)
        result = jsonable(cert.to_dict())
        # The process's own fixed costs, beside the engine's stages (wall clock of the spawn: a rough number).
        spawned_at = request.get("spawned_at")
        if isinstance(spawned_at, (int, float)) and 0 <= started - spawned_at < 3600:
            fixed["child_start_s"] = started - spawned_at
        engine_timings = dict(result.get("timings") or {})
        if "cuda_init_s" in fixed and "cuda_init_s" in engine_timings:  # CUDA started before the request
            engine_timings["engine_cuda_init_s"] = engine_timings.pop("cuda_init_s")
        result["timings"] = {**{k: round(v, 4) for k, v in fixed.items()}, **engine_timings}
        size = os.path.getsize(artifact)
        _send(events, event="result", result=result, artifact_bytes=size)
        _stream_artifact(artifact, int(request["artifact_fd"]))
        events.close()
    except Exception as exc:
        code, message = classify_failure(exc, stage["name"], limits)
        if code == "internal_error":
            import traceback

            traceback.print_exc()
        _send(events, event="error", code=code, message=message, stage=stage["name"])
        _exit_now(1)
    _exit_now(0)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
