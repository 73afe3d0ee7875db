"""Declared constraints on config values, in the style of scikit-learn's ``_param_validation``.

A ``Constraint`` turns one JSON value into the value internal code trusts, or raises a ``ConfigError`` that
names the parameter, what was expected and what arrived. The same object describes itself for help text and
says how it is spelled on the command line (``cli_kwargs``: type, choices, nargs, metavar, const; in no CLI
library's terms), so one table (``calibration.config.PARAMETERS``) drives the validation, the CLI options of
``certiprune certify`` and ``certiprune submit`` (built with click by ``service/cli/options.py``), and the tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal, Mapping

from .errors import ConfigError

#: "not given on the command line": the config keeps what ``--config`` (or the default) says
MISSING: Any = type("Missing", (), {"__repr__": lambda self: "MISSING"})()


def fail(name: str, expected: str, got: Any, fix: str = "") -> ConfigError:
    """The one error format: "The 'x' parameter must be <expected>. Got <value>. <fix>"."""
    msg = f"The '{name}' parameter must be {expected}. Got {got!r}."
    return ConfigError(msg + (f" {fix}" if fix else ""))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _num(x: float) -> str:
    return f"{x:g}"


class Constraint:
    """One rule for a JSON value. Subclasses implement ``validate`` and ``describe``; the rest has defaults."""

    def validate(self, name: str, value: Any) -> Any:
        """The cleaned value (tuples for lists, floats for numbers), or raise ``ConfigError`` naming ``name``."""
        raise NotImplementedError

    def describe(self) -> str:
        """What is accepted, in words ("a number in (0, 10)"); the errors say the same."""
        raise NotImplementedError

    def cli_kwargs(self) -> dict[str, Any]:
        """How the value is spelled as an option: ``type``, ``choices``, ``nargs`` ("+": one or more words,
        "?": an optional value, ``const`` when it is left out), ``metavar``."""
        return {}

    def from_cli(self, value: Any, **parts: Any) -> Any:
        """The JSON value for what the command line gave (``None``: not given → ``MISSING``)."""
        return MISSING if value is None else value

    def parts(self) -> Mapping[str, Param]:
        """Sub-fields with options of their own (``finetune``'s ``--finetune-lr``); most have none."""
        return {}

    def examples(self) -> list[tuple[Any, Any]]:
        """(JSON value, cleaned value) pairs that must be accepted: the table's tests use them."""
        return []

    def counterexamples(self) -> list[Any]:
        """JSON values that must be refused."""
        return []


@dataclass(frozen=True)
class Options(Constraint):
    """One of a few strings: ``Options(("global", "layerwise"))``."""

    options: tuple[str, ...]

    def validate(self, name: str, value: Any) -> str:
        if not isinstance(value, str) or value not in self.options:
            raise fail(name, self.describe(), value)
        return value

    def describe(self) -> str:
        return "one of " + ", ".join(repr(o) for o in self.options)

    def cli_kwargs(self) -> dict[str, Any]:
        return {"choices": self.options}

    def examples(self) -> list[tuple[Any, Any]]:
        return [(o, o) for o in self.options]

    def counterexamples(self) -> list[Any]:
        return ["not-an-option", 1, None, list(self.options[:1])]


@dataclass(frozen=True)
class Interval(Constraint):
    """A real number between two bounds, converted to float: ``Interval(0, 1, closed="neither")``.

    ``note`` is added in parentheses ("relative: …"); ``expected`` replaces the wording altogether.
    NaN fails every comparison, so it is refused like any out-of-range number.
    """

    low: float
    high: float
    closed: Literal["left", "right", "both", "neither"] = "both"
    note: str | None = None
    expected: str | None = None

    def _contains(self, x: float) -> bool:
        above = x >= self.low if self.closed in ("left", "both") else x > self.low
        below = x <= self.high if self.closed in ("right", "both") else x < self.high
        return above and below

    def validate(self, name: str, value: Any) -> float:
        if not _is_number(value) or not self._contains(value):
            raise fail(name, self.describe(), value)
        return float(value)

    def describe(self) -> str:
        if self.expected:
            return self.expected
        left = "[" if self.closed in ("left", "both") else "("
        right = "]" if self.closed in ("right", "both") else ")"
        text = f"a number in {left}{_num(self.low)}, {_num(self.high)}{right}"
        return text + (f" ({self.note})" if self.note else "")

    def cli_kwargs(self) -> dict[str, Any]:
        return {"type": float}

    def examples(self) -> list[tuple[Any, Any]]:
        mid = (self.low + self.high) / 2
        out = [(mid, float(mid))]
        if self.closed in ("left", "both"):
            out.append((self.low, float(self.low)))
        if self.closed in ("right", "both"):
            out.append((self.high, float(self.high)))
        return out

    def counterexamples(self) -> list[Any]:
        out: list[Any] = [self.low - 1, self.high + 1, float("nan"), str((self.low + self.high) / 2), True]
        if self.closed in ("right", "neither"):
            out.append(self.low)
        if self.closed in ("left", "neither"):
            out.append(self.high)
        return out


@dataclass(frozen=True)
class IntRange(Constraint):
    """An integer in [low, high] (bools are not integers here)."""

    low: int
    high: int | None = None

    def validate(self, name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail(name, f"an integer ≥ {self.low}", value)
        if value < self.low or (self.high is not None and value > self.high):
            raise fail(name, self.describe(), value)
        return value

    def describe(self) -> str:
        return f"an integer in [{self.low}, {self.high}]" if self.high is not None else f"an integer ≥ {self.low}"

    def cli_kwargs(self) -> dict[str, Any]:
        return {"type": int}

    def examples(self) -> list[tuple[Any, Any]]:
        return [(self.low, self.low)] + ([(self.high, self.high)] if self.high is not None else [])

    def counterexamples(self) -> list[Any]:
        return [self.low - 1, float(self.low) + 0.5, str(self.low), True] + (
            [self.high + 1] if self.high is not None else [])


@dataclass(frozen=True)
class Boolean(Constraint):
    """``true`` or ``false``; on the command line a flag sets it (``Param.flag_sets``)."""

    def validate(self, name: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise fail(name, self.describe(), value)
        return value

    def describe(self) -> str:
        return "true or false"

    def examples(self) -> list[tuple[Any, Any]]:
        return [(True, True), (False, False)]

    def counterexamples(self) -> list[Any]:
        return ["yes", 1, 0, None]


@dataclass(frozen=True)
class Nullable(Constraint):
    """``null`` (mapped to ``null_value``) or what ``inner`` accepts.

    Without ``expected`` a refused value gets ``inner``'s message; with it, that wording ("true, false or null").
    """

    inner: Constraint
    expected: str | None = None
    null_value: Any = None

    def validate(self, name: str, value: Any) -> Any:
        if value is None:
            return self.null_value
        try:
            return self.inner.validate(name, value)
        except ConfigError:
            if self.expected is None:
                raise
            raise fail(name, self.expected, value) from None

    def describe(self) -> str:
        return self.expected or f"null or {self.inner.describe()}"

    def cli_kwargs(self) -> dict[str, Any]:
        return self.inner.cli_kwargs()

    def from_cli(self, value: Any, **parts: Any) -> Any:
        return self.inner.from_cli(value, **parts)

    def examples(self) -> list[tuple[Any, Any]]:
        return [(None, self.null_value), *self.inner.examples()]

    def counterexamples(self) -> list[Any]:
        return [v for v in self.inner.counterexamples() if v is not None]


# -- the special ones -----------------------------------------------------------------------

def _comma_separated(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    """The ``type`` of one word of ``--criterion mu,obd`` as well as ``--criterion mu obd``: a list of choices.

    Raises ``ValueError`` naming the bad choice; the CLI turns it into a usage error (exit 2)."""

    def parse(text: str) -> list[str]:
        items = [c.strip() for c in text.split(",") if c.strip()]
        for item in items:
            if item not in choices:
                raise ValueError(f"invalid choice: {item!r} (choose from {', '.join(choices)})")
        return items

    return parse


@dataclass(frozen=True)
class Choices(Constraint):
    """One of ``options`` or a non-empty list of them without duplicates (``criterion``)."""

    options: tuple[str, ...]

    def validate(self, name: str, value: Any) -> tuple[str, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not items:
            raise fail(name, f"one of {self.options} or a non-empty list of them", value)
        out = tuple(Options(self.options).validate(name, c) for c in items)
        if len(set(out)) != len(out):
            raise fail(name, "a list without duplicates", value)
        return out

    def describe(self) -> str:
        return f"one or a list of {', '.join(repr(o) for o in self.options)}"

    def cli_kwargs(self) -> dict[str, Any]:
        return {"nargs": "+", "type": _comma_separated(self.options), "metavar": "{" + ",".join(self.options) + "}"}

    def from_cli(self, value: Any, **parts: Any) -> Any:
        if not value:
            return MISSING
        return [c for group in value for c in group]

    def examples(self) -> list[tuple[Any, Any]]:
        return [(self.options[0], self.options[:1]), (list(self.options[-2:]), self.options[-2:])]

    def counterexamples(self) -> list[Any]:
        return [[], "not-an-option", [self.options[0], self.options[0]], 3, None]


@dataclass(frozen=True)
class Grid(Constraint):
    """A non-empty, strictly increasing list of numbers in [0, 1) (``sparsities``); ``0.1,0.2`` on the CLI."""

    max_levels: int = 1000

    def validate(self, name: str, value: Any) -> tuple[float, ...]:
        if not isinstance(value, (list, tuple)) or not value:
            raise fail(name, "a non-empty, strictly increasing list of numbers in [0, 1)", value)
        out = []
        for s in value:
            if not _is_number(s) or not 0.0 <= s < 1.0:  # NaN fails the comparison
                raise fail(name, "a list of numbers in [0, 1)", value, f"Offending entry: {s!r}.")
            out.append(float(s))
        for a, b in zip(out, out[1:]):
            if not b > a:
                raise fail(name, "strictly increasing (sorted, no duplicates)", value, f"{b!r} follows {a!r}.")
        if len(out) > self.max_levels:
            raise fail(name, f"at most {self.max_levels} levels", f"{len(out)} levels")
        return tuple(out)

    def describe(self) -> str:
        return f"a non-empty, strictly increasing list of at most {self.max_levels} numbers in [0, 1)"

    def cli_kwargs(self) -> dict[str, Any]:
        return {"metavar": "S1,S2,…"}

    def from_cli(self, value: Any, **parts: Any) -> Any:
        if not value:
            return MISSING
        try:
            return [float(s) for s in value.split(",") if s.strip()]
        except ValueError:
            raise SystemExit(f"--sparsities must be comma-separated numbers; got {value!r}") from None

    def examples(self) -> list[tuple[Any, Any]]:
        return [([0, 0.5], (0.0, 0.5)), ((0.1, 0.2, 0.3), (0.1, 0.2, 0.3))]

    def counterexamples(self) -> list[Any]:
        return [[], [0.2, 0.1], [0.1, 0.1], [0.5, 1.0], [-0.1], ["0.1"], [True], [float("nan")], 0.5, None,
                [i / (2 * self.max_levels + 2) for i in range(self.max_levels + 1)]]


@dataclass(frozen=True)
class NamePatterns(Constraint):
    """Glob patterns over parameter names (``fnmatch``: ``*``, ``?``, ``[seq]``), e.g. ``["*.attn.*", "fc.weight"]``.

    ``empty_hint``: refuse an empty list, with this advice (``prune_include``: it would leave nothing to prune).
    """

    empty_hint: str | None = None
    max_patterns: int = 1000
    max_length: int = 500

    def validate(self, name: str, value: Any) -> tuple[str, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or len(items) > self.max_patterns:
            raise fail(name, f"a list of at most {self.max_patterns} glob patterns over parameter names "
                       "(e.g. [\"encoder.*.weight\"])", value)
        for item in items:
            if not isinstance(item, str) or not item.strip() or len(item) > self.max_length:
                raise fail(name, f"a list of non-empty glob patterns (strings of at most {self.max_length} "
                           "characters)", value, f"Offending entry: {item!r}.")
        if not items and self.empty_hint:
            raise fail(name, "null or a non-empty list of glob patterns", value, self.empty_hint)
        return tuple(items)

    def describe(self) -> str:
        return "a list of glob patterns over parameter names (e.g. [\"encoder.*.weight\"])"

    def cli_kwargs(self) -> dict[str, Any]:
        return {"nargs": "+", "metavar": "PATTERN"}

    def from_cli(self, value: Any, **parts: Any) -> Any:
        return list(value) if value else MISSING

    def examples(self) -> list[tuple[Any, Any]]:
        return [("*.attn.*", ("*.attn.*",)), (["encoder.*", "fc.weight"], ("encoder.*", "fc.weight"))]

    def counterexamples(self) -> list[Any]:
        return [[3], [""], [" "], ["x" * (self.max_length + 1)], {"a": 1}, ["x"] * (self.max_patterns + 1)] + (
            [[]] if self.empty_hint else [])


@dataclass(frozen=True)
class IndexOrKey(Constraint):
    """``null``, an index into a tuple/list output or the key of a dict output (``output``)."""

    index: IntRange = IntRange(-64, 63)
    max_length: int = 200

    def validate(self, name: str, value: Any) -> int | str | None:
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            return self.index.validate(name, value)
        if isinstance(value, str) and 0 < len(value) <= self.max_length and value.isprintable():
            return value
        raise fail(name, self.describe(), value)

    def describe(self) -> str:
        return ("null, an index into a tuple/list output (an integer), or the key of a dict output (a string, "
                "e.g. 'logits')")

    def cli_kwargs(self) -> dict[str, Any]:
        return {"metavar": "INDEX_OR_KEY"}

    def from_cli(self, value: Any, **parts: Any) -> Any:
        if value is None:
            return MISSING
        text = value.strip()
        return int(text) if text.lstrip("-").isdigit() else text

    def examples(self) -> list[tuple[Any, Any]]:
        return [(None, None), (1, 1), (-1, -1), ("logits", "logits")]

    def counterexamples(self) -> list[Any]:
        return [self.index.high + 1, self.index.low - 1, "", "a\nb", "k" * (self.max_length + 1), True, 1.5]


@dataclass(frozen=True)
class Switchable(Constraint):
    """An optional stage with settings of its own (``finetune``): ``false``/``null`` off, ``true`` the defaults,
    an integer its ``count_field`` (steps), or an object with any of ``fields``, each validated by its own Param.

    On the command line ``--finetune [STEPS]`` switches it on; the sub-fields with a flag (``--finetune-lr``)
    switch it on too.
    """

    factory: Callable[..., Any]
    fields: Mapping[str, Param]
    count_field: str
    count: IntRange
    expected: str

    def validate(self, name: str, value: Any) -> Any:
        if value is None or value is False:
            return None
        if value is True:
            return self.factory()
        if isinstance(value, int) and not isinstance(value, bool):
            return self.factory(**{self.count_field: self.count.validate(name, value)})
        if not isinstance(value, dict):
            raise fail(name, self.expected, value)
        unknown = sorted(set(value) - set(self.fields))
        if unknown:
            raise fail(name, self.expected, value, f"Unknown key(s): {', '.join(map(repr, unknown))}.")
        return self.factory(**{key: param.constraint.validate(f"{name}.{key}", value[key])
                               for key, param in self.fields.items() if key in value})

    def describe(self) -> str:
        return self.expected

    def cli_kwargs(self) -> dict[str, Any]:
        return {"nargs": "?", "const": -1, "type": int, "metavar": self.count_field.upper()}

    def parts(self) -> Mapping[str, Param]:
        return {key: p for key, p in self.fields.items() if p.flag}

    def from_cli(self, value: Any, **parts: Any) -> Any:
        """``--finetune`` alone is ``{}`` (the defaults); a number there is the count; any part turns it on."""
        given = {key: v for key, v in parts.items() if v is not None}
        if value is None and not given:
            return MISSING
        out: dict[str, Any] = {}
        if value is not None and value >= 0:
            out[self.count_field] = value
        return {**out, **given}

    def examples(self) -> list[tuple[Any, Any]]:
        some = {key: p.constraint.examples()[0] for key, p in self.fields.items() if p.constraint.examples()}
        return [(None, None), (False, None), (True, self.factory()),
                (self.count.low, self.factory(**{self.count_field: self.count.low})),
                ({k: raw for k, (raw, _) in some.items()}, self.factory(**{k: v for k, (_, v) in some.items()}))]

    def counterexamples(self) -> list[Any]:
        out: list[Any] = ["yes", self.count.low - 1, 1.5, {"not_a_field": 1}]
        for key, p in self.fields.items():
            out += [{key: bad} for bad in p.constraint.counterexamples()[:2]]
        return out


@dataclass(frozen=True)
class Param:
    """One config field: its constraint, default, one line of help and its command-line spelling."""

    constraint: Constraint
    default: Any
    help: str
    flag: str | None = None  # the CLI option; None: settable only through --config
    flag_sets: bool | None = None  # a flag without a value: what giving it sets (--no-bn-recalibration: False)
    default_help: str | None = None  # the default in words, where its value alone says too little
    metavar: str | None = None

    def help_text(self) -> str:
        """The option's help: what it does and its default."""
        default = self.default_help
        unset = self.default is None or self.default is False or self.default == ()
        if default is None and self.flag_sets is None and not unset:
            default = ",".join(map(str, self.default)) if isinstance(self.default, tuple) else str(self.default)
        text = self.help + (f" (default {default})" if default else "")
        return text

    def cli_kwargs(self) -> dict[str, Any]:
        if self.flag_sets is not None:
            return {"action": "store_const", "const": self.flag_sets}
        kwargs = self.constraint.cli_kwargs()
        return {**kwargs, "metavar": self.metavar} if self.metavar else kwargs


def values_from_options(values: Mapping[str, Any], table: Mapping[str, Param]) -> dict[str, Any]:
    """The JSON values of the options given on the command line (the others are left out).

    ``values`` maps each flagged field's name (and ``<name>_<part>`` for its parts' flags) to what the command
    line gave: ``None`` (or an empty sequence for a ``nargs="+"`` option) when the option was not given; for a
    ``flag_sets`` field, ``flag_sets`` itself when the flag was given.
    """
    out: dict[str, Any] = {}
    for name, param in table.items():
        if param.flag is None:
            continue
        parts = {part: values.get(f"{name}_{part}") for part in param.constraint.parts()}
        value = param.constraint.from_cli(values.get(name), **parts)
        if value is not MISSING:
            out[name] = value
    return out


def describe_table(table: Mapping[str, Param], names: Iterable[str], prefix: str = "") -> str:
    """Help-text lines for fields without a flag: name and meaning, then what is accepted and the default."""
    lines = []
    for name in names:
        p = table[name]
        lines.append(f"  {prefix}{name}: {p.help}\n      {p.constraint.describe()}; default {json_text(p.default)}")
    return "\n".join(lines)


def json_text(value: Any) -> str:
    """A default as the user would write it in --config (null, true, 0.001)."""
    return json.dumps(list(value) if isinstance(value, tuple) else value)
