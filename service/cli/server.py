"""Server-side commands: ``certiprune serve`` (the API, with an embedded worker) and ``certiprune worker``.

Heavy imports (uvicorn, the app, the executors) happen inside the commands: spawned worker processes
re-import the main module.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from .base import Command, run

LOG_LEVELS = ["critical", "error", "warning", "info", "debug"]
RAY_ADDRESS_HELP = ("with --executor ray: 'auto', HOST:PORT or ray://HOST:10001 "
                    "(default: start a Ray instance on this machine)")

SERVE_EPILOG = """examples:
  certiprune serve                                  # http://127.0.0.1:8000, files and SQLite under ./data
  certiprune serve --port 9000 --data-dir /srv/certiprune
  CERTIPRUNE_API_KEYS=key-one,key-two certiprune serve --host 0.0.0.0   # other interfaces need API keys
  certiprune serve --executor none                  # API only; run `certiprune worker` elsewhere

In a browser, the server's address shows the jobs as they run, each with its report
(the risk curve, the guarantee, per-layer sparsity and a download button). With API keys,
type a key into the page's form; it stays in that browser tab.
Every setting can also come from a CERTIPRUNE_* environment variable (e.g. CERTIPRUNE_DATABASE_URL).
"""

WORKER_EPILOG = """examples:
  certiprune serve --executor none --data-dir /srv/certiprune          # the API, on one machine
  certiprune worker --data-dir /srv/certiprune --concurrency 2         # workers, on others
  CERTIPRUNE_DATABASE_URL=postgresql+psycopg://… certiprune worker --data-dir s3://bucket/certiprune
  certiprune worker --executor ray --ray-address auto                  # jobs as Ray tasks

Workers and the API must share the data dir and the database. Stop with Ctrl+C or SIGTERM:
the jobs it was running go back to the queue for another worker.
"""


# -- the commands' bodies ----------------------------------------------------------------

def _settings(overrides: dict[str, Any]):  # -> Settings
    from pydantic import ValidationError

    from ..settings import Settings

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        messages = "; ".join(str(e.get("msg", e)).removeprefix("Value error, ") for e in exc.errors())
        print(f"certiprune: invalid configuration: {messages}", file=sys.stderr)
        raise SystemExit(2) from exc


def _configure_logging(level: str) -> None:
    import logging

    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _check_sandbox(settings: Any) -> bool:
    """Fail closed: refuse to run jobs without the OS sandbox where several tenants (or the network) reach us."""
    from .. import isolation
    from ..worker import sandbox_decision

    overlap = isolation.forbidden_overlap(settings.data_dir)
    if overlap is not None:
        print(f"certiprune: refusing to start: the data dir {settings.data_dir} lies inside {overlap}, which every "
              "job's sandbox can read. Choose a data dir outside the Python installation and the package.",
              file=sys.stderr)
        return False
    isolate, why_not = sandbox_decision(settings)
    if isolate is None:
        reason = ("API keys are configured" if settings.api_keys else f"it listens on {settings.host}") \
            if settings.sandbox_required else "CERTIPRUNE_SANDBOX=on"
        print(f"certiprune: refusing to start: {reason}, so uploaded models must run in the OS sandbox, but it is "
              f"unavailable: {why_not}.", file=sys.stderr)
        return False
    if not isolate:
        import logging

        logging.getLogger("certiprune").warning(
            "uploaded models run WITHOUT OS isolation (%s): acceptable only for one user running their own models on "
            "loopback. Install bubblewrap (apt-get install bubblewrap) to isolate them.",
            "CERTIPRUNE_SANDBOX=off" if settings.sandbox == "off" else why_not)
    return True


def cmd_serve(args: Any) -> int:
    _configure_logging(args.log_level)
    api_keys = args.api_keys
    if args.api_keys_file:
        try:
            lines = Path(args.api_keys_file).read_text().splitlines()
        except OSError as exc:
            print(f"certiprune: cannot read --api-keys-file: {exc}", file=sys.stderr)
            return 2
        file_keys = [k.strip() for k in lines if k.strip()]
        if not file_keys:
            print(f"certiprune: --api-keys-file {args.api_keys_file} holds no key", file=sys.stderr)
            return 2
        api_keys = ",".join(filter(None, [api_keys, *file_keys]))
    settings = _settings({"host": args.host, "port": args.port, "data_dir": args.data_dir, "executor": args.executor,
                          "ray_address": args.ray_address, "api_keys": api_keys,
                          "max_upload_bytes": args.max_upload_bytes,
                          "allowed_dataset_roots": args.allowed_dataset_roots, "sandbox": args.sandbox})
    # The local executor runs jobs here; with Ray, each worker node's supervisor enforces the sandbox itself
    # (required there whenever this server has keys or a public bind: RayExecutor passes sandbox=on).
    if settings.executor == "local" and not _check_sandbox(settings):
        return 2

    import uvicorn

    from ..app import create_app

    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level,
                timeout_graceful_shutdown=10)
    return 0


def cmd_worker(args: Any) -> int:
    """Scale-out: claim and run queued jobs from the shared store until SIGTERM/SIGINT."""
    import signal

    from ..store import JobStore

    _configure_logging(args.log_level)
    settings = _settings({"data_dir": args.data_dir, "max_concurrent_jobs": args.concurrency,
                          "ray_address": args.ray_address, "sandbox": args.sandbox})
    if not _check_sandbox(settings):
        return 2
    store = JobStore.from_url(settings.resolved_database_url)
    if (args.executor or settings.executor) == "ray":
        from ..executors.ray import RayExecutor

        executor: Any = RayExecutor(settings, store)
    else:
        from ..executors.local import LocalExecutor

        executor = LocalExecutor(settings, store)

    def stop(signum: int, _frame: Any) -> None:
        executor.request_stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    executor.run_forever()
    store.close()
    return 0


@click.command("serve", cls=Command, epilog=SERVE_EPILOG,
               short_help="run the HTTP API with an embedded worker (SQLite + files under --data-dir)")
@click.option("--host", help="interface (default 127.0.0.1; others need CERTIPRUNE_API_KEYS)")
@click.option("--port", type=int)
@click.option("--data-dir")
@click.option("--executor", type=click.Choice(["local", "ray", "none"]),
              help="'local': worker processes here; 'ray': Ray tasks on a Ray cluster; 'none': API only, "
                   "run `certiprune worker` apart")
@click.option("--ray-address", help=RAY_ADDRESS_HELP)
@click.option("--log-level", default="info", type=click.Choice(LOG_LEVELS))
@click.option("--api-keys", help="comma-separated bearer keys, one tenant each (env CERTIPRUNE_API_KEYS; "
                                 "visible to other users in `ps`: prefer the env or --api-keys-file)")
@click.option("--api-keys-file", help="a file with one API key per line (added to --api-keys)")
@click.option("--max-upload-bytes", type=int, help="largest upload, refused while streaming "
                                                   "(env CERTIPRUNE_MAX_UPLOAD_BYTES; default 2 GiB)")
@click.option("--allowed-dataset-roots", help="comma-separated URI prefixes a job's dataset may name "
                                              "(env CERTIPRUNE_ALLOWED_DATASET_ROOTS)")
@click.option("--sandbox", type=click.Choice(["auto", "on", "off"]),
              help="run uploaded models in the bubblewrap sandbox (env CERTIPRUNE_SANDBOX; default auto: when "
                   "available — required with API keys or a non-loopback bind)")
def serve(**options: Any) -> int:
    """Run the HTTP API with an embedded worker (SQLite + files under --data-dir)."""
    return run(cmd_serve, options)


@click.command("worker", cls=Command, epilog=WORKER_EPILOG,
               short_help="claim and run queued jobs from the shared store (scale-out)")
@click.option("--data-dir")
@click.option("--concurrency", type=int, help="jobs at once (default: 1 on CPU, one per GPU)")
@click.option("--executor", type=click.Choice(["local", "ray"]),
              help="'local' (default): run jobs in processes here; 'ray': dispatch them as tasks to a Ray "
                   "cluster (default when CERTIPRUNE_EXECUTOR=ray)")
@click.option("--ray-address", help=RAY_ADDRESS_HELP)
@click.option("--log-level", default="info", type=click.Choice(LOG_LEVELS))
@click.option("--sandbox", type=click.Choice(["auto", "on", "off"]),
              help="run uploaded models in the bubblewrap sandbox (env CERTIPRUNE_SANDBOX; default auto)")
def worker(**options: Any) -> int:
    """Claim and run queued jobs from the shared store (scale-out)."""
    return run(cmd_worker, options)


COMMANDS = [serve, worker]
