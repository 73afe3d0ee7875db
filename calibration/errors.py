"""Exception types: every bad input has one, each with a stable snake_case ``code``.

The service maps ``code`` and ``str(exc)`` straight into the §3 error body, so messages
are written for a person: what was wrong, what was expected, what arrived, how to fix it.
"""

from __future__ import annotations


class CalibrationError(ValueError):
    """Base class. ``code`` is the machine-readable reason, the message is for people."""

    code: str = "calibration_error"  # the service maps it to an HTTP status (service/intake.py)

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class ConfigError(CalibrationError):
    """A certification parameter is missing, of the wrong type or out of range."""

    code = "invalid_config"


class DataError(CalibrationError):
    """The calibration data set is malformed (format, shapes, NaN, labels, pickles)."""

    code = "invalid_data"


class ModelError(CalibrationError):
    """The model archive cannot be loaded, pruned or run on the data."""

    code = "invalid_model"


class UncertaintyError(CalibrationError):
    """The uploaded per-parameter training statistics (for ``mu``) do not fit the model."""

    code = "invalid_uncertainty"


def exception_summary(exc: BaseException) -> str:
    """The most telling line of an error for a person.

    TorchScript wraps the model's own exception: its first line is "The following operation
    failed in the TorchScript interpreter." and the user's message comes last.
    """
    inner = exc
    seen: list[BaseException] = []
    while (inner.__cause__ or inner.__context__) is not None and inner not in seen and len(seen) < 20:
        seen.append(inner)
        inner = inner.__cause__ or inner.__context__  # type: ignore[assignment]
    lines = [ln.strip() for ln in str(inner).strip().splitlines() if ln.strip()]
    if not lines:
        return type(inner).__name__
    line = lines[-1] if "TorchScript" in lines[0] else lines[0]
    if ":" not in line.split(" ", 1)[0]:
        line = f"{type(inner).__name__}: {line}"
    return line[:500]


class CancelledError(Exception):
    """Raised inside the engine when the caller's ``should_stop`` says so."""


__all__ = [
    "CalibrationError",
    "CancelledError",
    "ConfigError",
    "DataError",
    "ModelError",
    "UncertaintyError",
    "exception_summary",
]
