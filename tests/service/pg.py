"""A throwaway PostgreSQL server for tests: ``initdb`` + ``pg_ctl`` in a temporary folder, trust auth on 127.0.0.1.

``initdb`` refuses to run as root, so as root the server runs as the ``postgres`` user (through
``runuser``, else ``su``). ``PostgresServer.start()`` raises ``PostgresUnavailable`` — which tests
turn into a skip that says why — only where a server truly cannot start here: no PostgreSQL
binaries, no psycopg, or root without a ``postgres`` user. Any other failure is an error, with
the server's log.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

BIN_DIRS = [Path("/usr/local/bin"), *sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)]


class PostgresUnavailable(Exception):
    """PostgreSQL cannot run on this machine (the message says why)."""


def find_binary(name: str) -> Path | None:
    for folder in BIN_DIRS:
        if (folder / name).is_file():
            return folder / name
    found = shutil.which(name)
    return Path(found) if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PostgresServer:
    """One running server; ``create_database()`` gives each test its own empty database."""

    root: Path
    port: int
    run_as: list[str] = field(default_factory=list)  # prefix that runs a command as the server's user
    pg_ctl: Path = Path("pg_ctl")

    @classmethod
    def start(cls, timeout_s: int = 60) -> PostgresServer:
        try:
            import psycopg  # noqa: F401
        except ImportError as exc:
            raise PostgresUnavailable(f"psycopg is not installed ({exc}); pip install 'psycopg[binary]'") from exc
        initdb, pg_ctl = find_binary("initdb"), find_binary("pg_ctl")
        if initdb is None or pg_ctl is None:
            raise PostgresUnavailable("no initdb/pg_ctl found (apt-get install postgresql)")
        run_as: list[str] = []
        root = Path(tempfile.mkdtemp(prefix="certiprune-pg-"))
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(root, ignore_errors=True)
                raise PostgresUnavailable("running as root and there is no 'postgres' user for initdb") from None
            os.chown(root, user.pw_uid, user.pw_gid)
            runuser = shutil.which("runuser")
            run_as = [runuser, "-u", "postgres", "--"] if runuser else ["su", "postgres", "-s", "/bin/sh", "-c"]
        server = cls(root=root, port=_free_port(), run_as=run_as, pg_ctl=pg_ctl)
        try:
            server._run([str(initdb), "-D", str(root / "data"), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                         "--no-sync"], timeout_s)
            options = (f"-p {server.port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off "
                       "-c full_page_writes=off -c synchronous_commit=off -c max_connections=200")
            server._run([str(pg_ctl), "-D", str(root / "data"), "-l", str(root / "server.log"), "-w",
                         "-t", str(timeout_s), "-o", options, "start"], timeout_s + 10)
        except Exception:
            server.stop()
            raise
        return server

    def _run(self, cmd: list[str], timeout_s: int) -> None:
        if self.run_as and self.run_as[0] == "su":
            cmd = [*self.run_as, shlex.join(cmd)]
        else:
            cmd = [*self.run_as, *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=self.root, check=False)
        if done.returncode != 0:
            log = (self.root / "server.log").read_text(errors="replace")[-3000:] if (
                self.root / "server.log").exists() else ""
            raise RuntimeError(f"{shlex.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}\n{log}")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if (self.root / "data" / "postmaster.pid").exists():
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):  # cleanup goes on regardless
                self._run([str(self.pg_ctl), "-D", str(self.root / "data"), "-m", "immediate", "stop"], 30)
        shutil.rmtree(self.root, ignore_errors=True)
