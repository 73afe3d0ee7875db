"""certiprune's job service: an HTTP API and workers, thin over ``calibration``.

Import-light on purpose: spawned worker processes import this package before choosing a GPU.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
