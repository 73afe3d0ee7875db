"""The click side of ``calibration.config.PARAMETERS``: the config options of ``certify`` and ``submit``.

``table_options`` turns every table entry with a flag (and its parts' flags, ``--finetune-lr``) into a click
option, from the constraint's command-line spelling (``Constraint.cli_kwargs``: type, choices, nargs, metavar,
const) and ``Param.flag_sets`` (``--exclude-first-last``, ``--no-bn-recalibration``); ``TableCommand`` (the
class of ``certify`` and ``submit``) adds them after the command's own options. ``config_from_options``
turns the parsed values back into the JSON config (``calibration.config.config_from_values``). Nothing here
validates: ``validate_config`` does, in the engine and on the server.

click has no "one or more values" option (argparse's ``nargs="+"``, as in ``--criterion mu obd``):
``TableCommand.parse_args`` rewrites such a group into one option per word before click parses it, keeping
argparse's meaning (the words up to the next option; a repeated option replaces the earlier group).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import click

from calibration.config import PARAMETERS, config_from_values
from calibration.params import Param

#: the option section the table's options are listed under in --help
SECTION = "Certification parameters"
SECTION_NOTE = "Each is also a field of --config's JSON object; a flag given here overrides that field."


class _Words(click.ParamType):
    """One word of a ``nargs="+"`` option, converted by the table's ``type`` (a ValueError is a usage error)."""

    def __init__(self, convert: Callable[[str], Any] | None, metavar: str | None) -> None:
        self._convert = convert
        self.name = metavar or "TEXT"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if self._convert is None or not isinstance(value, str):
            return value
        try:
            return self._convert(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class TableOption(click.Option):
    """An option generated from the table: listed in its own help section; ``greedy``: ``nargs="+"``."""

    def __init__(self, *args: Any, greedy: bool = False, section: str | None = SECTION, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.greedy = greedy
        self.section = section


def _option(name: str, param: Param) -> TableOption:
    assert param.flag is not None
    common: dict[str, Any] = {"help": param.help_text()}
    if param.flag_sets is not None:  # a flag without a value; config_from_options maps it to flag_sets
        return TableOption([param.flag, name], is_flag=True, default=False, **common)
    kw = param.constraint.cli_kwargs()
    metavar = param.metavar or kw.get("metavar")
    if kw.get("nargs") == "+":
        return TableOption([param.flag, name], multiple=True, greedy=True, type=_Words(kw.get("type"), metavar),
                           metavar=f"{metavar or 'TEXT'} ...", **common)
    if kw.get("nargs") == "?":  # --finetune [STEPS]
        return TableOption([param.flag, name], is_flag=False, flag_value=kw["const"], type=kw.get("type", str),
                           default=None, metavar=f"[{metavar}]" if metavar else None, **common)
    if "choices" in kw:
        return TableOption([param.flag, name], type=click.Choice(list(kw["choices"])), default=None,
                           metavar=metavar, **common)
    return TableOption([param.flag, name], type=kw.get("type", str), default=None, metavar=metavar, **common)


def table_options(table: Mapping[str, Param] = PARAMETERS) -> list[click.Parameter]:
    """Every entry with a flag, and its parts' flags (named ``<field>_<part>``), in the table's order."""
    out: list[click.Parameter] = []
    for name, param in table.items():
        if param.flag is None:
            continue
        out.append(_option(name, param))
        out += [_option(f"{name}_{part}", sub) for part, sub in param.constraint.parts().items()]
    return out


def config_from_options(values: Mapping[str, Any], base: Any = None) -> Any:
    """``base`` (the --config object) with the fields given as flags replaced; still to be validated."""
    given = dict(values)
    for name, param in PARAMETERS.items():
        if param.flag is not None and param.flag_sets is not None:
            given[name] = param.flag_sets if values.get(name) else None
    return config_from_values(given, base)


def _expand_greedy(command: click.Command, args: list[str]) -> list[str]:
    """``--criterion mu obd`` → ``--criterion mu --criterion obd``; a repeated greedy option drops the group before."""
    greedy = {opt: p.name for p in command.params if isinstance(p, TableOption) and p.greedy for opt in p.opts}
    out: list[tuple[str, str | None]] = []  # (token, the greedy option's name it belongs to)
    i = 0
    while i < len(args):
        token = args[i]
        i += 1
        if token == "--":
            out += [(t, None) for t in args[i - 1:]]
            break
        flag = token.split("=", 1)[0]
        name = greedy.get(flag)
        if name is None:
            out.append((token, None))
            continue
        out = [item for item in out if item[1] != name]  # argparse: the last occurrence wins
        if "=" in token:
            out.append((token, name))
            continue
        words = []
        while i < len(args) and not (args[i].startswith("-") and len(args[i]) > 1):
            words.append(args[i])
            i += 1
        out += [(x, name) for w in words for x in (flag, w)] if words else [(flag, name)]  # alone: click refuses
    return [token for token, _ in out]


class TableCommand(click.Command):
    """A command with the table's options (after its own): greedy ``nargs="+"`` groups, their own help section."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params.extend(table_options())

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, _expand_greedy(self, list(args)))

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        format_sections(self, ctx, formatter)

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        verbatim_epilog(self.epilog, formatter)


def format_sections(command: click.Command, ctx: click.Context, formatter: click.HelpFormatter) -> None:
    """The options (not the arguments, which the usage line and the description name), by section."""
    sections: dict[str | None, list[tuple[str, str]]] = {}
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx) if isinstance(param, click.Option) else None
        if record is not None:
            sections.setdefault(getattr(param, "section", None), []).append(record)
    for section, records in sections.items():
        with formatter.section(section or "Options"):
            if section == SECTION:
                formatter.write_text(SECTION_NOTE)
            formatter.write_dl(records)


def verbatim_epilog(epilog: str | None, formatter: click.HelpFormatter) -> None:
    """The examples as written (click would re-wrap them)."""
    if epilog:
        formatter.write_paragraph()
        formatter.write(epilog.rstrip("\n") + "\n")
