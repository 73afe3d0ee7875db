"""A JSON-safe copy of a result: numpy scalars to Python, NaN/inf to None (JSON has no NaN)."""

from __future__ import annotations

import math
from typing import Any


def jsonable(value: Any) -> Any:
    """A JSON-safe copy: numpy scalars to Python, NaN/inf to None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if hasattr(value, "tolist") and callable(value.tolist):
        return jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


__all__ = ["jsonable"]
