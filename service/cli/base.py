"""What every ``certiprune`` command shares: ``-h``, examples printed as written, the errors a command reports."""

from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import Any, Callable, Mapping

import click

from .options import TableCommand, format_sections, verbatim_epilog

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}


class ClientError(Exception):
    """A refusal or failure worth one line (``certiprune: …``, exit 1), not a traceback."""


class Command(click.Command):
    """A command whose epilog (its examples) is printed as written."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("context_settings", CONTEXT_SETTINGS)
        super().__init__(*args, **kwargs)

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        format_sections(self, ctx, formatter)

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        verbatim_epilog(self.epilog, formatter)


class ConfigCommand(TableCommand):
    """A command with the config options of ``calibration.config.PARAMETERS`` (``certify``, ``submit``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("context_settings", CONTEXT_SETTINGS)
        super().__init__(*args, **kwargs)


def run(func: Callable[[Any], int | None], options: Mapping[str, Any]) -> int:
    """Call a command's body with its options as attributes (``args.data_dir``); its errors as one line, exit 1."""
    try:
        return int(func(SimpleNamespace(**options)) or 0)
    except ClientError as exc:
        print(f"certiprune: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"certiprune: {exc}", file=sys.stderr)
        return 1
