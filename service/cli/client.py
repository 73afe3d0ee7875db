"""Client commands: ``certiprune submit``, ``jobs``, ``cancel``, ``delete``, ``datasets`` (talk to a server over HTTP).

They import no torch: ``certiprune submit`` should start fast. Its config options come from
``calibration.config.PARAMETERS`` (``service/cli/options.py``), the same as ``certiprune certify``'s.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import click

from calibration.config import config_only_help  # torch-free: the parameter table

from .base import ClientError, Command, ConfigCommand, run
from .options import config_from_options

DEFAULT_SERVER = "http://127.0.0.1:8000"
TERMINAL = ("succeeded", "failed", "cancelled")

EPILOGS = {  # the examples under each command's --help
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




def run_client(func: Callable[[Any], int | None], options: Mapping[str, Any]) -> int:
    """``run``, and a server that cannot be reached is one line too (exit 1)."""
    import httpx

    try:
        return run(func, options)
    except httpx.HTTPError as exc:
        print(f"certiprune: cannot reach {options.get('server', 'the server')}: {exc}", file=sys.stderr)
        return 1


# -- the commands' bodies ----------------------------------------------------------------

def _client(args: Any):  # -> httpx.Client
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


def _build_config(args: Any) -> dict[str, Any]:
    config: dict[str, Any] = {}
    if args.config:
        text = Path(args.config[1:]).read_text() if args.config.startswith("@") else args.config
        try:
            config = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ClientError(f"--config is not valid JSON: {exc}") from exc
        if not isinstance(config, dict):
            raise ClientError("--config must be a JSON object")
    return config_from_options(vars(args), config)


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


def cmd_submit(args: Any) -> int:
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


def _fetch_page(args: Any, path: str, params: dict[str, Any]) -> dict[str, Any] | None:
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


def cmd_jobs(args: Any) -> int:
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


def cmd_cancel(args: Any) -> int:
    with _client(args) as client:
        job = _check(client.post(f"/v1/jobs/{args.job_id}/cancel")).json()
    print(f"{job['id']}: {job['status']}" + (" (cancel requested)" if job.get("cancel_requested") and
                                             job["status"] == "running" else ""))
    return 0


def cmd_delete(args: Any) -> int:
    kind = "datasets" if args.id.startswith("ds_") else "jobs"
    with _client(args) as client:
        _check(client.delete(f"/v1/{kind}/{args.id}"))
    print(f"{args.id}: deleted")
    return 0


def cmd_datasets(args: Any) -> int:
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


# -- the commands ---------------------------------------------------------------------------

def client_options(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option("--api-key", envvar="CERTIPRUNE_API_KEY", help="API key (env CERTIPRUNE_API_KEY)")(func)
    return click.option("--server", envvar="CERTIPRUNE_SERVER", default=DEFAULT_SERVER,
                        help="API base URL (env CERTIPRUNE_SERVER)")(func)


def page_options(noun: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        func = client_options(func)
        func = click.option("--json", "json", is_flag=True, help="print the API's JSON page instead of a table")(func)
        func = click.option("--offset", type=int, default=0, help=f"skip this many of the newest {noun}")(func)
        return click.option("--limit", type=int, default=20, help=f"{noun} per page (default 20, at most 1000)")(func)
    return decorate


@click.command("submit", cls=ConfigCommand, epilog=EPILOGS["submit"] + "\n" + config_only_help(),
               short_help="submit a job to a server; --wait shows progress, --out downloads the model")
@click.argument("model")
@click.option("--data", help="calibration set (.npz or .safetensors)")
@click.option("--dataset", help="instead of --data: a ds_ id (or a URI the server allows)")
@click.option("--uncertainty", help="safetensors training statistics for criterion mu")
@click.option("--config", help="JSON object of parameters, or @file.json")
@click.option("--wait", is_flag=True, help="poll until the job ends, with a progress bar")
@click.option("--quiet", is_flag=True, help="no progress bar")
@click.option("--out", help="write the pruned model here (implies --wait); its checksum is verified")
@click.option("--report", help="write the result JSON here")
@client_options
def submit(**options: Any) -> int:
    """Submit a job to a server; --wait shows progress, --out downloads the model.

    MODEL: TorchScript archive. The certification parameters (below) are those of `certiprune certify`.
    """
    return run_client(cmd_submit, options)


@click.command("jobs", cls=Command, epilog=EPILOGS["jobs"], short_help="list jobs on a server, newest first")
@page_options("jobs")
@click.option("--status", type=click.Choice(["queued", "running", "succeeded", "failed", "cancelled"]),
              help="only jobs in this status")
def jobs(**options: Any) -> int:
    """List jobs on a server, newest first."""
    return run_client(cmd_jobs, options)


@click.command("cancel", cls=Command, epilog=EPILOGS["cancel"], short_help="cancel a job on a server")
@click.argument("job_id")
@client_options
def cancel(**options: Any) -> int:
    """Cancel a job on a server."""
    return run_client(cmd_cancel, options)


@click.command("delete", cls=Command, epilog=EPILOGS["delete"],
               short_help="delete a finished job (and its files) or a stored dataset on a server")
@click.argument("id")
@client_options
def delete(**options: Any) -> int:
    """Delete a finished job (and its files) or a stored dataset on a server.

    ID: a job_… or a ds_… id.
    """
    return run_client(cmd_delete, options)


@click.command("datasets", cls=Command, epilog=EPILOGS["datasets"],
               short_help="list your stored calibration sets on a server")
@page_options("datasets")
def datasets(**options: Any) -> int:
    """List your stored calibration sets on a server."""
    return run_client(cmd_datasets, options)


COMMANDS = [submit, jobs, cancel, delete, datasets]
