"""certiprune's science: prune at a grid of sparsities and certify with Learn then Test.

No web dependency. ``certify`` is the one entry point the service and the CLI call.

The names below are loaded on first use (PEP 562): the API process imports ``calibration.config``,
``calibration.data`` and ``calibration.archive``, which need no torch, and must not pay for (or run)
torch's import just because the package was touched.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "CertifyConfig": "config", "validate_config": "config",
    "CalibrationError": "errors", "CancelledError": "errors", "ConfigError": "errors", "DataError": "errors",
    "ModelError": "errors", "UncertaintyError": "errors",
    "Certificate": "engine", "Progress": "engine", "certify": "engine",
}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:
    from .config import CertifyConfig, validate_config
    from .engine import Certificate, Progress, certify
    from .errors import CalibrationError, CancelledError, ConfigError, DataError, ModelError, UncertaintyError


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'calibration' has no attribute {name!r}")
