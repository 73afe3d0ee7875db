"""The ``certiprune`` command: serve, worker, certify (offline), submit (client), jobs, cancel.

Heavy imports (torch, uvicorn, the app) happen inside the subcommands: spawned worker processes
re-import the main module, and ``certiprune submit`` should start fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_SERVER = "http://127.0.0.1:8000"
TERMINAL = ("succeeded", "failed", "cancelled")


# -- serve / worker -----------------------------------------------------------------------

def _settings(overrides: dict[str, Any]):  # -> Settings
    from pydantic import ValidationError

    from .settings import Settings

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
    from . import isolation
    from .worker import sandbox_decision

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


def cmd_serve(args: argparse.Namespace) -> int:
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

    from .app import create_app

    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level,
                timeout_graceful_shutdown=10)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Scale-out: claim and run queued jobs from the shared store until SIGTERM/SIGINT."""
    import signal

    from .store import JobStore

    _configure_logging(args.log_level)
    settings = _settings({"data_dir": args.data_dir, "max_concurrent_jobs": args.concurrency,
                          "ray_address": args.ray_address, "sandbox": args.sandbox})
    if not _check_sandbox(settings):
        return 2
    store = JobStore.from_url(settings.resolved_database_url)
    if (args.executor or settings.executor) == "ray":
        from .executors.ray import RayExecutor

        executor: Any = RayExecutor(settings, store)
    else:
        from .executors.local import LocalExecutor

        executor = LocalExecutor(settings, store)

    def stop(signum: int, _frame: Any) -> None:
        executor.request_stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    executor.run_forever()
    store.close()
    return 0


def cmd_certify(argv: list[str]) -> int:
    try:
        from calibration import cli_certify  # type: ignore[attr-defined]
    except ImportError as exc:
        print(f"certiprune certify is not available in this installation: {exc}", file=sys.stderr)
        return 2
    return int(cli_certify.main(argv) or 0)


# -- client -------------------------------------------------------------------------------

class ClientError(Exception):
    pass


def _client(args: argparse.Namespace):  # -> httpx.Client
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    return httpx.Client(base_url=args.server.rstrip("/"), headers=headers, timeout=httpx.Timeout(60.0, connect=10.0))


def _check(response: Any) -> Any:
    if response.status_code < 400:
        return response
    try:
        err = response.json()["error"]
        raise ClientError(f"{err['code']}: {err['message']} (HTTP {response.status_code})")
    except (ValueError, KeyError, TypeError):
        raise ClientError(f"HTTP {response.status_code}: {response.text[:300]}") from None


def _build_config(args: argparse.Namespace) -> dict[str, Any]:
    config: dict[str, Any] = {}
    if args.config:
        text = Path(args.config[1:]).read_text() if args.config.startswith("@") else args.config
        try:
            config = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ClientError(f"--config is not valid JSON: {exc}") from exc
        if not isinstance(config, dict):
            raise ClientError("--config must be a JSON object")
    from calibration.config import config_from_args  # torch-free: the parameter table

    return config_from_args(args, config)


def _wait(client: Any, job_id: str, quiet: bool) -> dict[str, Any]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    job = _check(client.get(f"/v1/jobs/{job_id}")).json()
    if quiet:
        while job["status"] not in TERMINAL:
            time.sleep(1.0)
            job = _check(client.get(f"/v1/jobs/{job_id}")).json()
        return job
    columns = [TextColumn("[bold]{task.fields[status]}[/] {task.fields[stage]}"), BarColumn(),
               TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(), TextColumn("{task.fields[message]}")]
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(job_id, total=1.0, status=job["status"], stage="", message="")
        while True:
            p = job["progress"]
            bar.update(task, completed=p["fraction"], status=job["status"], stage=p.get("stage") or "",
                       message=(p.get("message") or "")[:60])
            if job["status"] in TERMINAL:
                return job
            time.sleep(1.0)
            job = _check(client.get(f"/v1/jobs/{job_id}")).json()


def download_artifact(client: Any, job_id: str, out: Path) -> str:
    """Stream the artifact to ``out`` (atomically) and verify it against X-Checksum-SHA256."""
    import hashlib
    import tempfile

    out.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as fh, client.stream("GET", f"/v1/jobs/{job_id}/artifact") as response:
            if response.status_code >= 400:
                response.read()
                _check(response)
            expected = response.headers.get("x-checksum-sha256", "")
            for chunk in response.iter_bytes():
                digest.update(chunk)
                fh.write(chunk)
        if not expected or digest.hexdigest() != expected:
            raise ClientError(f"Checksum mismatch for the artifact of {job_id}: server says {expected or 'nothing'}, "
                              f"received {digest.hexdigest()}. Nothing was written; try again.")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest.hexdigest()


def cmd_submit(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(stderr=True)
    config = _build_config(args)
    if not args.data and not args.dataset:
        raise ClientError("give --data FILE or --dataset ds_…")
    with _client(args) as client:
        files: dict[str, Any] = {"model": (Path(args.model).name, open(args.model, "rb"), "application/octet-stream")}
        form: dict[str, str] = {"config": json.dumps(config)}
        if args.data:
            files["data"] = (Path(args.data).name, open(args.data, "rb"), "application/octet-stream")
        else:
            form["dataset"] = args.dataset
        if args.uncertainty:
            files["uncertainty"] = (Path(args.uncertainty).name, open(args.uncertainty, "rb"),
                                    "application/octet-stream")
        try:
            job = _check(client.post("/v1/jobs", files=files, data=form, timeout=None)).json()
        finally:
            for _, fh, _ in files.values():
                fh.close()
        job_id = job["id"]
        console.print(f"Submitted [bold]{job_id}[/]")
        print(job_id)
        if not (args.wait or args.out):
            return 0
        try:
            job = _wait(client, job_id, args.quiet)
        except KeyboardInterrupt:
            console.print(f"\nStopped waiting; {job_id} goes on. Cancel it with: "
                          f"certiprune cancel {job_id} --server {args.server}")
            return 130
        if job["status"] != "succeeded":
            err = job.get("error") or {}
            console.print(f"[red]Job {job_id} {job['status']}[/]"
                          + (f": {err.get('code')}: {err.get('message')}" if err else ""))
            return 1
        result = job["result"]
        console.print(result.get("guarantee", ""))
        console.print(f"certified sparsity: [bold]{result.get('certified_sparsity')}[/] "
                      f"(certified: {result.get('certified')})")
        more = result.get("more_data") or {}
        if more.get("sparsity") is not None:
            needed = more.get("n_calibration_needed")
            console.print(f"next level {more['sparsity']:.0%}: "
                          + (f"≈ {needed:,} calibration samples would likely certify it (an estimate, not a guarantee)"
                             if needed else "its observed risk is too high for more data to help"))
        if args.out:
            sha = download_artifact(client, job_id, Path(args.out))
            console.print(f"Wrote {args.out} (sha256 {sha}, verified)")
            from calibration.pt2_archive import is_pt2

            if is_pt2(args.out) and not str(args.out).endswith(".pt2"):
                console.print("note: the artifact is a torch.export archive (the upload was one): name it .pt2 "
                              "(torch.export.load expects that suffix)")
        if args.report:
            Path(args.report).write_text(json.dumps(result, indent=2))
            console.print(f"Wrote {args.report}")
    return 0


def _fetch_page(args: argparse.Namespace, path: str, params: dict[str, Any]) -> dict[str, Any] | None:
    """One page of a list route; printed as JSON (and None returned) with --json."""
    with _client(args) as client:
        page = _check(client.get(path, params={"limit": args.limit, "offset": args.offset, **params})).json()
    if args.json:
        print(json.dumps(page, indent=2))
        return None
    return page


def _page_table(page: dict[str, Any], noun: str) -> tuple[Any, Any]:
    """A console and an empty table titled with the page's count, for ``certiprune jobs`` / ``datasets``."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    # Piped output is never wrapped: ids are copied into other commands and grepped for.
    console = Console() if sys.stdout.isatty() else Console(width=240)
    shown = len(page["data"])
    table = Table(title=f"{page['count']} {noun}(s)" + (f", {shown} shown" if shown < page["count"] else ""),
                  box=box.SIMPLE_HEAD, title_justify="left")
    return console, table


def cmd_jobs(args: argparse.Namespace) -> int:
    page = _fetch_page(args, "/v1/jobs", {"status": args.status} if args.status else {})
    if page is None:
        return 0
    console, table = _page_table(page, "job")
    shown = len(page["data"])
    table.add_column("id", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("created (UTC)", no_wrap=True)
    table.add_column("progress", no_wrap=True)
    table.add_column("criterion, ε")
    table.add_column("certified", justify="right", no_wrap=True)
    table.add_column("error")
    for job in page["data"]:
        result = job.get("result") or {}
        err = job.get("error") or {}
        prog = job["progress"]
        cfg = job.get("config") or {}
        active = job["status"] in ("queued", "running")
        criterion = cfg.get("criterion")
        criterion = "+".join(criterion) if isinstance(criterion, list) else str(criterion or "")
        certified = result.get("certified_sparsity")
        table.add_row(job["id"], job["status"], job["created_at"][:19].replace("T", " "),
                      f"{prog['fraction']:.0%}" + (f" {prog.get('stage')}" if active and prog.get("stage") else ""),
                      f"{criterion}, {cfg.get('epsilon')}" if cfg else "",
                      "" if certified is None else f"{certified:.0%}" if result.get("certified") else "none",
                      err.get("code", ""))
    console.print(table)
    if args.offset + shown < page["count"]:
        console.print(f"More: certiprune jobs --offset {args.offset + shown} --limit {args.limit}")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = _check(client.post(f"/v1/jobs/{args.job_id}/cancel")).json()
    print(f"{job['id']}: {job['status']}" + (" (cancel requested)" if job.get("cancel_requested") and
                                             job["status"] == "running" else ""))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    kind = "datasets" if args.id.startswith("ds_") else "jobs"
    with _client(args) as client:
        _check(client.delete(f"/v1/{kind}/{args.id}"))
    print(f"{args.id}: deleted")
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    page = _fetch_page(args, "/v1/datasets", {})
    if page is None:
        return 0
    console, table = _page_table(page, "dataset")
    for name, justify in (("id", "left"), ("created (UTC)", "left"), ("samples", "right"), ("x shape", "left"),
                          ("labels", "left"), ("bytes", "right"), ("sha256", "left")):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for ds in page["data"]:
        table.add_row(ds["id"], (ds.get("created_at") or "")[:19].replace("T", " "), f"{ds['n']:,}",
                      "×".join(str(d) for d in ds["x_shape"]), "yes" if ds["has_labels"] else "no",
                      f"{ds['size']:,}" if ds.get("size") is not None else "", ds["sha256"][:12])
    console.print(table)
    return 0


# -- parser -------------------------------------------------------------------------------

def _add_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default=os.environ.get("CERTIPRUNE_SERVER", DEFAULT_SERVER),
                   help="API base URL (env CERTIPRUNE_SERVER)")
    p.add_argument("--api-key", default=os.environ.get("CERTIPRUNE_API_KEY"), help="API key (env CERTIPRUNE_API_KEY)")


def _add_page_args(p: argparse.ArgumentParser, noun: str) -> None:
    p.add_argument("--limit", type=int, default=20, help=f"{noun} per page (default 20, at most 1000)")
    p.add_argument("--offset", type=int, default=0, help=f"skip this many of the newest {noun}")
    p.add_argument("--json", action="store_true", help="print the API's JSON page instead of a table")
    _add_client_args(p)


EPILOGS = {
    "certiprune": """examples:
  certiprune certify model.pt --data cal.npz --out pruned.pt --report report.json   # offline, no server
  certiprune serve                   # the API and a worker; open http://127.0.0.1:8000/ in a browser
  certiprune submit model.pt --data cal.npz --wait --out pruned.pt
  certiprune jobs
  certiprune cancel job_0123456789abcdef01234567

`certiprune COMMAND --help` shows each command's options and more examples.
""",
    "serve": """examples:
  certiprune serve                                  # http://127.0.0.1:8000, files and SQLite under ./data
  certiprune serve --port 9000 --data-dir /srv/certiprune
  CERTIPRUNE_API_KEYS=key-one,key-two certiprune serve --host 0.0.0.0   # other interfaces need API keys
  certiprune serve --executor none                  # API only; run `certiprune worker` elsewhere

In a browser, the server's address shows the jobs as they run, each with its report
(the risk curve, the guarantee, per-layer sparsity and a download button). With API keys,
type a key into the page's form; it stays in that browser tab.
Every setting can also come from a CERTIPRUNE_* environment variable (e.g. CERTIPRUNE_DATABASE_URL).
""",
    "worker": """examples:
  certiprune serve --executor none --data-dir /srv/certiprune          # the API, on one machine
  certiprune worker --data-dir /srv/certiprune --concurrency 2         # workers, on others
  CERTIPRUNE_DATABASE_URL=postgresql+psycopg://… certiprune worker --data-dir s3://bucket/certiprune
  certiprune worker --executor ray --ray-address auto                  # jobs as Ray tasks

Workers and the API must share the data dir and the database. Stop with Ctrl+C or SIGTERM:
the jobs it was running go back to the queue for another worker.
""",
    "submit": """examples:
  certiprune submit model.pt --data cal.npz --wait          # a progress bar, then the guarantee
  certiprune submit model.pt --data cal.npz --criterion magnitude obd --epsilon 0.02 --delta 0.05 \\
      --out pruned.pt --report report.json                  # download (checksum verified) and the result JSON
  certiprune submit model.pt --dataset ds_0123456789abcdef01234567 --config @config.json
  CERTIPRUNE_SERVER=https://prune.example.com CERTIPRUNE_API_KEY=… certiprune submit model.pt --data cal.npz

Without --wait or --out it prints the job id and returns; follow the job with `certiprune jobs`
or in a browser at the server's address. The certification parameters are those of `certiprune certify`;
the server validates them.
""",
    "jobs": """examples:
  certiprune jobs                             # the newest 20
  certiprune jobs --status running
  certiprune jobs --limit 50 --offset 50      # the next page
  certiprune jobs --json | jq -r '.data[].id'

The same list, updating live and linking to each report, is at the server's address in a browser.
""",
    "cancel": """examples:
  certiprune cancel job_0123456789abcdef01234567
  certiprune jobs --status running --json | jq -r '.data[].id' | xargs -n1 certiprune cancel

A queued job is cancelled at once; a running one stops at its next check (and is killed after a grace period).
""",
    "delete": """examples:
  certiprune delete job_0123456789abcdef01234567
  certiprune delete ds_0123456789abcdef01234567
  certiprune jobs --status failed --json | jq -r '.data[].id' | xargs -n1 certiprune delete

A job_ id: removes a finished job and its files (model, data copy, artifact) from the server; download the
artifact first. Queued or running jobs must be cancelled first. A ds_ id: removes a stored calibration set
(refused while a queued or running job reads it).
""",
    "datasets": """examples:
  certiprune datasets
  certiprune datasets --json | jq -r '.data[].id'
""",
}


def build_parser() -> argparse.ArgumentParser:
    from calibration.config import add_config_options, config_only_help  # torch-free: the parameter table

    parser = argparse.ArgumentParser(prog="certiprune",
                                     description="Prune PyTorch models with a statistical guarantee.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the HTTP API with an embedded worker (SQLite + files under --data-dir)")
    p.add_argument("--host", help="interface (default 127.0.0.1; others need CERTIPRUNE_API_KEYS)")
    p.add_argument("--port", type=int)
    p.add_argument("--data-dir")
    p.add_argument("--executor", choices=["local", "ray", "none"],
                   help="'local': worker processes here; 'ray': Ray tasks on a Ray cluster; 'none': API only, "
                        "run `certiprune worker` apart")
    p.add_argument("--ray-address", help="with --executor ray: 'auto', HOST:PORT or ray://HOST:10001 "
                                         "(default: start a Ray instance on this machine)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--api-keys", help="comma-separated bearer keys, one tenant each (env CERTIPRUNE_API_KEYS; "
                                      "visible to other users in `ps`: prefer the env or --api-keys-file)")
    p.add_argument("--api-keys-file", help="a file with one API key per line (added to --api-keys)")
    p.add_argument("--max-upload-bytes", type=int, help="largest upload, refused while streaming "
                                                        "(env CERTIPRUNE_MAX_UPLOAD_BYTES; default 2 GiB)")
    p.add_argument("--allowed-dataset-roots", help="comma-separated URI prefixes a job's dataset may name "
                                                   "(env CERTIPRUNE_ALLOWED_DATASET_ROOTS)")
    p.add_argument("--sandbox", choices=["auto", "on", "off"],
                   help="run uploaded models in the bubblewrap sandbox (env CERTIPRUNE_SANDBOX; default auto: when "
                        "available — required with API keys or a non-loopback bind)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="claim and run queued jobs from the shared store (scale-out)")
    p.add_argument("--data-dir")
    p.add_argument("--concurrency", type=int, help="jobs at once (default: 1 on CPU, one per GPU)")
    p.add_argument("--executor", choices=["local", "ray"],
                   help="'local' (default): run jobs in processes here; 'ray': dispatch them as tasks to a Ray "
                        "cluster (default when CERTIPRUNE_EXECUTOR=ray)")
    p.add_argument("--ray-address", help="with --executor ray: 'auto', HOST:PORT or ray://HOST:10001 "
                                         "(default: start a Ray instance on this machine)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--sandbox", choices=["auto", "on", "off"],
                   help="run uploaded models in the bubblewrap sandbox (env CERTIPRUNE_SANDBOX; default auto)")
    p.set_defaults(func=cmd_worker)

    sub.add_parser("certify", help="certify offline, without a server (see `certiprune certify --help`)",
                   add_help=False)

    p = sub.add_parser("submit", help="submit a job to a server; --wait shows progress, --out downloads the model")
    p.add_argument("model", help="TorchScript archive")
    p.add_argument("--data", help="calibration set (.npz or .safetensors)")
    p.add_argument("--dataset", help="instead of --data: a ds_ id (or a URI the server allows)")
    p.add_argument("--uncertainty", help="safetensors training statistics for criterion mu")
    p.add_argument("--config", help="JSON object of parameters, or @file.json")
    p.add_argument("--wait", action="store_true", help="poll until the job ends, with a progress bar")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--out", help="write the pruned model here (implies --wait); its checksum is verified")
    p.add_argument("--report", help="write the result JSON here")
    _add_client_args(p)
    add_config_options(p)  # the same options as `certiprune certify`, from calibration.config's table
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("jobs", help="list jobs on a server, newest first")
    _add_page_args(p, "jobs")
    p.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "cancelled"],
                   help="only jobs in this status")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("cancel", help="cancel a job on a server")
    p.add_argument("job_id")
    _add_client_args(p)
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("delete", help="delete a finished job (and its files) or a stored dataset on a server")
    p.add_argument("id", help="a job_… or a ds_… id")
    _add_client_args(p)
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser("datasets", help="list your stored calibration sets on a server")
    _add_page_args(p, "datasets")
    p.set_defaults(func=cmd_datasets)

    parser.epilog = EPILOGS["certiprune"]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    for name, subparser in sub.choices.items():
        if name in EPILOGS:
            subparser.epilog = EPILOGS[name] + ("\n" + config_only_help() if name == "submit" else "")
            subparser.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "certify":
        return cmd_certify(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ClientError as exc:
        print(f"certiprune: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"certiprune: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        import httpx

        if isinstance(exc, httpx.HTTPError):
            print(f"certiprune: cannot reach {getattr(args, 'server', 'the server')}: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    raise SystemExit(main())
