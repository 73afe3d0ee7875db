"""The ``certiprune`` command, on click: a group with the server, client and offline commands in modules apart.

- ``server.py``: ``serve`` (the API with an embedded worker) and ``worker`` (scale-out);
- ``client.py``: ``submit``, ``jobs``, ``cancel``, ``delete``, ``datasets`` (HTTP to a server);
- ``offline.py``: ``certify`` (no server; the science is ``calibration.certify``);
- ``options.py``: the config options of ``certify`` and ``submit``, generated from
  ``calibration.config.PARAMETERS``, and ``config_from_options``.

Why click and not Typer: the config options are generated at import time from a table of constraint
objects, not declared as typed function parameters, which is what Typer is built around (Typer would
add its own layer, and rich/shellingham, on top of click for no gain here). click takes ``click.Option``
objects built from the table directly, and its ``Command`` hooks (``parse_args``, ``format_options``)
cover the two things argparse did that click does not (``--criterion mu obd``, a help section of their own).
One small, stable dependency (pallets; already pulled in by uvicorn).

Heavy imports (torch, uvicorn, the app) happen inside the commands: spawned worker processes re-import
the main module, and ``certiprune submit`` should start fast. Exit codes: 0 success, 1 a refused or failed
request (one line, ``certiprune: …``), 2 a usage error or a refused configuration.
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import click

from . import client, offline, server
from .base import CONTEXT_SETTINGS, ClientError
from .client import DEFAULT_SERVER, TERMINAL, download_artifact
from .options import verbatim_epilog

EPILOG = """examples:
  certiprune certify model.pt --data cal.npz --out pruned.pt --report report.json   # offline, no server
  certiprune serve                   # the API and a worker; open http://127.0.0.1:8000/ in a browser
  certiprune submit model.pt --data cal.npz --wait --out pruned.pt
  certiprune jobs
  certiprune cancel job_0123456789abcdef01234567

`certiprune COMMAND --help` shows each command's options and more examples.
"""


class Group(click.Group):
    """Commands listed in the order they are added; the examples printed as written."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        verbatim_epilog(self.epilog, formatter)


@click.group("certiprune", cls=Group, context_settings=CONTEXT_SETTINGS, epilog=EPILOG, no_args_is_help=False)
def cli() -> None:
    """Prune PyTorch models with a statistical guarantee."""


for _command in (*server.COMMANDS, *offline.COMMANDS, *client.COMMANDS):
    cli.add_command(_command)


def parse(argv: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """(command, its options) for a command line, without running it; a usage error exits as the CLI would (2)."""
    try:
        with click.Context(cli, info_name="certiprune") as ctx:
            if not argv:
                raise click.UsageError("Missing command.", ctx)
            name, command, rest = cli.resolve_command(ctx, list(argv))
            assert command is not None and name is not None
            with command.make_context(name, rest, parent=ctx) as sub:
                return name, dict(sub.params)
    except click.ClickException as exc:
        exc.show()
        raise SystemExit(exc.exit_code) from None


def main(argv: Sequence[str] | None = None) -> int:
    """The console script (``certiprune``, ``python -m service``, ``python -m service.cli``): the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        rv = cli.main(args=args, prog_name="certiprune", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        print("Aborted!", file=sys.stderr)
        return 130
    return int(rv or 0)


__all__ = ["cli", "main", "parse", "ClientError", "DEFAULT_SERVER", "TERMINAL", "download_artifact"]
