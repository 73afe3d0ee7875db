"""The untrusted side of a job run: ``python -I -m service.child``, started by ``service.supervisor``.

It runs ``calibration.certify`` on the files it was handed and nothing else: it holds no
credentials, opens no database, and (inside the sandbox, ``service.isolation``) sees only its
read-only inputs under /in, a private /tmp and /out. It talks to the supervisor over descriptors:

- stdin: one JSON request ``{"model", "data", "uncertainty", "config", "limits"}`` (paths inside the
  sandbox);
- the events descriptor (named in the request): JSON lines ``{"event": "progress"|"result"|"error", ...}``;
- the artifact descriptor: after a ``result`` event, the raw bytes of the pruned model, then EOF;
- stdout/stderr: free text, which the supervisor keeps in the job's own size-capped log.

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


def _send(events: Any, **event: Any) -> None:
    events.write(json.dumps(event, allow_nan=False, default=str) + "\n")
    events.flush()


def _stream_artifact(path: str, fd: int) -> None:
    with open(path, "rb") as src, os.fdopen(fd, "wb", closefd=True) as out:
        for chunk in iter(lambda: src.read(1 << 20), b""):
            out.write(chunk)


def main() -> int:
    started = time.time()  # before any import of ours: with the request's spawned_at, the process's start
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from . import sandbox
    from .failures import classify_failure

    request = json.loads(sys.stdin.readline())
    events = os.fdopen(int(request["events_fd"]), "w", encoding="utf-8", closefd=True)
    limits = sandbox.Limits(**request["limits"]) if request.get("limits") else None
    out_dir = request.get("out_dir", "/out")
    stage = {"name": "loading"}

    def progress(p: Any) -> None:
        stage["name"] = p.stage
        _send(events, event="progress", stage=p.stage, done=int(p.done), total=int(p.total),
              message=p.message or None)

    try:
        t = time.perf_counter()
        from calibration import certify
        from calibration import engine  # noqa: F401  (torch and the science: timed as the job's imports)
        from .jsonable import jsonable
        imports_s = time.perf_counter() - t

        artifact = os.path.join(out_dir, ARTIFACT_NAME)
        cert = certify(request["model"], request["data"], dict(request["config"]), out=artifact,
                       uncertainty=request.get("uncertainty"), progress=progress)
        result = jsonable(cert.to_dict())
        # The process's own fixed costs, beside the engine's stages (wall clock of the spawn: a rough number).
        fixed = {"imports_s": round(imports_s, 4)}
        spawned_at = request.get("spawned_at")
        if isinstance(spawned_at, (int, float)) and 0 <= started - spawned_at < 3600:
            fixed["child_start_s"] = round(started - spawned_at, 4)
        result["timings"] = {**fixed, **(result.get("timings") or {})}
        size = os.path.getsize(artifact)
        _send(events, event="result", result=result, artifact_bytes=size)
        _stream_artifact(artifact, int(request["artifact_fd"]))
    except Exception as exc:
        code, message = classify_failure(exc, stage["name"], limits)
        if code == "internal_error":
            import traceback

            traceback.print_exc()
        _send(events, event="error", code=code, message=message, stage=stage["name"])
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
