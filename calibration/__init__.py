"""certiprune's science: prune at a grid of sparsities and certify with Learn then Test.

No web dependency. ``certify`` is the one entry point the service and the CLI call.
"""

from .config import CertifyConfig, validate_config
from .errors import CalibrationError, CancelledError, ConfigError, DataError, ModelError, UncertaintyError
from .engine import Certificate, Progress, certify

__all__ = [
    "CalibrationError",
    "CancelledError",
    "CertifyConfig",
    "Certificate",
    "ConfigError",
    "DataError",
    "ModelError",
    "Progress",
    "UncertaintyError",
    "certify",
    "validate_config",
]
